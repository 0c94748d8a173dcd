//! The read cache's invalidations: every data-plane process follows the
//! outbound stream (`METADATA_STORED` and `USER_ERASED` matter) with an
//! ordered consumer of its own (ephemeral, `DeliverPolicy::New`, no acks), so
//! each process sees every event; a durable consumer would share them out.
//!
//! An ordered consumer notices a gap in its sequence or missed heartbeats and
//! resumes from the last message it delivered, so an event is not skipped
//! while the stream keeps it. When the connection drops or the consumer fails
//! for good, the cache is cleared and (with `--read-cache-verify none`) serves
//! nothing until a new consumer is in place, which clears it once more: an
//! invalidation missed meanwhile leaves nothing stale behind.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::Message;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{Invalidation, ReadCache};
use crate::backoff::Backoff;
use crate::ingest::bus::{BusConfig, BusError};

/// The event a metadata change queues (docs/events.md, "Events out").
pub const METADATA_STORED: &str = "METADATA_STORED";
/// The event an erasure queues.
pub const USER_ERASED: &str = "USER_ERASED";

/// What the cache reads of an outbound event (the rest is ignored).
#[derive(Debug, Deserialize)]
struct Announced {
    event_type: String,
    user_id: Uuid,
    version: Option<i64>,
}

/// Follows the outbound stream until the task is dropped, invalidating
/// `cache`; reconnects with backoff after any failure.
pub async fn follow(config: BusConfig, cache: ReadCache) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let stopped = run(&config, &cache, &mut backoff).await;
        cache.set_live(false);
        let delay = backoff.next_delay();
        warn!(
            error = %stopped,
            retry_in_ms = delay.as_millis() as u64,
            "read cache: event subscription down; the cache is cleared{}",
            if cache.is_live() { "" } else { " and serves nothing until it is back" }
        );
        tokio::time::sleep(delay).await;
    }
}

/// One subscription, until it fails.
async fn run(config: &BusConfig, cache: &ReadCache, backoff: &mut Backoff) -> BusError {
    let (lost_tx, mut lost) = mpsc::unbounded_channel();
    let mut options = async_nats::ConnectOptions::new()
        .name("umstore-data-plane-read-cache")
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let lost_tx = lost_tx.clone();
            async move {
                if matches!(
                    event,
                    async_nats::Event::Disconnected | async_nats::Event::Closed
                ) {
                    let _ = lost_tx.send(event.to_string());
                }
            }
        });
    if let Some((user, password)) = &config.credentials {
        options = options.user_and_password(user.clone(), password.clone());
    }
    let client = match tokio::time::timeout(Duration::from_secs(10), options.connect(&config.url))
        .await
    {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return BusError::new(config, "read cache: connecting", e),
        Err(_) => return BusError::new(config, "read cache: connecting", "no answer within 10 s"),
    };
    let js = async_nats::jetstream::new(client);
    let stream = match js.get_stream(config.outbound_stream()).await {
        Ok(s) => s,
        Err(e) => return BusError::new(config, "read cache: opening the outbound stream", e),
    };
    let consumer = match stream
        .create_consumer(pull::OrderedConfig {
            // Every outbound event (one filter subject: the client is built
            // without NATS 2.10's several); the others are skipped by type.
            filter_subject: config.outbound_subject(">"),
            deliver_policy: DeliverPolicy::New,
            description: Some("umstore: one data-plane process's read cache".into()),
            ..Default::default()
        })
        .await
    {
        Ok(c) => c,
        Err(e) => return BusError::new(config, "read cache: creating the ordered consumer", e),
    };
    let mut messages = match consumer.messages().await {
        Ok(m) => m,
        Err(e) => return BusError::new(config, "read cache: pulling events", e),
    };
    // From here every event is seen: what was cached before may have missed one.
    cache.set_live(true);
    backoff.reset();
    info!(
        stream = %config.outbound_stream(),
        verify = cache.config().verify.as_str(),
        "read cache: following METADATA_STORED and USER_ERASED"
    );
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(message)) => apply(cache, &message).await,
                Some(Err(e)) => return BusError::new(config, "read cache: following events", e),
                None => return BusError::new(config, "read cache: following events", "the stream ended"),
            },
            event = lost.recv() => {
                let what = event.unwrap_or_else(|| "closed".into());
                return BusError::new(config, "read cache: the connection", what);
            }
        }
    }
}

/// Invalidates the user an event names.
async fn apply(cache: &ReadCache, message: &Message) {
    let announced: Announced = match serde_json::from_slice(&message.payload) {
        Ok(a) => a,
        Err(e) => {
            // Outbound payloads carry no PII; the subject says which kind.
            warn!(subject = %message.subject, error = %e, "read cache: an event it cannot read");
            return;
        }
    };
    let why = match announced.event_type.as_str() {
        METADATA_STORED => Invalidation::MetadataStored,
        USER_ERASED => Invalidation::UserErased,
        other => {
            debug!(event_type = other, "read cache: not an invalidation");
            return;
        }
    };
    cache
        .invalidate(announced.user_id, announced.version, why)
        .await;
    if let Ok(info) = message.info() {
        let published_ns = info.published.unix_timestamp_nanos();
        let now_ns = chrono::Utc::now()
            .timestamp_nanos_opt()
            .map_or(published_ns, i128::from);
        let lag = (now_ns - published_ns).max(0) as f64 / 1e9;
        cache
            .metrics()
            .read_cache_invalidation_lag_seconds
            .observe(lag);
    }
    debug!(user_id = %announced.user_id, event_type = %announced.event_type, "read cache: invalidated");
}
