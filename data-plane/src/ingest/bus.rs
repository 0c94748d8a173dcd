//! NATS JetStream: the streams (created if absent), the durable pull consumer the
//! workers share, and dead letters.
//!
//! Streams (`<P>` is the stream prefix, `<S>` the subject prefix):
//! * `<P>_EVENTS_IN` on `<S>.in.>`: work-queue retention (a message is removed
//!   once acknowledged), kept at most `max_age`;
//! * `<P>_EVENTS_DLQ` on `<S>.dlq`: what could never apply, with its reason, 30 days;
//! * `<P>_EVENTS_OUT` on `<S>.out.>`: what the outbox relay publishes, with a
//!   10-minute de-duplication window on `Nats-Msg-Id`, kept `max_age`.
//!
//! Each message is acknowledged only after its transaction committed (a crash
//! before the ack redelivers it, and the redelivery is a duplicate); a transient
//! failure is `nak`ed with a growing delay (an event deferred while its region
//! moves between clusters with a short one, at most 400 ms); a message that can never apply is
//! published to the dead-letter subject with its reason and then terminated, so
//! it is never redelivered. Nothing else stops the consumer.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{self, RetentionPolicy};
use async_nats::jetstream::{self, Context};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use tracing::{debug, info, warn};

use super::{Ingest, Rejection, SubmitError};
use crate::backoff::Backoff;

/// Header carrying why a message was dead-lettered (no personal data).
pub const REASON_HEADER: &str = "Umstore-Dlq-Reason";
/// Header carrying the rejection's code (`malformed`, `invalid`, ...).
pub const CODE_HEADER: &str = "Umstore-Dlq-Code";
/// Header carrying the subject the message arrived on.
pub const SUBJECT_HEADER: &str = "Umstore-Original-Subject";

/// Where the bus is and how the data plane uses it.
#[derive(Clone)]
pub struct BusConfig {
    /// `nats://host:4222` (or `tls://`).
    pub url: String,
    /// User name and password, when the server wants them.
    pub credentials: Option<(String, String)>,
    /// Subject prefix (`umstore.events`).
    pub subject_prefix: String,
    /// Stream prefix (`UMSTORE`).
    pub stream_prefix: String,
    /// Events applied at once by this process.
    pub workers: usize,
    /// How long the inbound and outbound streams keep a message.
    pub max_age: Duration,
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("url", &self.url)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("subject_prefix", &self.subject_prefix)
            .field("stream_prefix", &self.stream_prefix)
            .field("workers", &self.workers)
            .field("max_age", &self.max_age)
            .finish()
    }
}

impl BusConfig {
    /// The inbound stream's name.
    pub fn inbound_stream(&self) -> String {
        format!("{}_EVENTS_IN", self.stream_prefix)
    }
    /// The dead-letter stream's name.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}_EVENTS_DLQ", self.stream_prefix)
    }
    /// The outbound stream's name.
    pub fn outbound_stream(&self) -> String {
        format!("{}_EVENTS_OUT", self.stream_prefix)
    }
    /// The durable consumer every worker shares.
    pub fn consumer(&self) -> String {
        format!("{}_INGEST", self.stream_prefix)
    }
    /// Where producers publish an event: `<S>.in.<REGION>.<EVENT_TYPE>`.
    pub fn inbound_subject(&self, region: &str, event_type: &str) -> String {
        format!("{}.in.{region}.{event_type}", self.subject_prefix)
    }
    /// The dead-letter subject.
    pub fn dead_letter_subject(&self) -> String {
        format!("{}.dlq", self.subject_prefix)
    }
    /// Where the outbox relay publishes `event_type`: `<S>.out.<EVENT_TYPE>`.
    pub fn outbound_subject(&self, event_type: &str) -> String {
        format!("{}.out.{event_type}", self.subject_prefix)
    }
}

/// The bus could not be reached or set up.
#[derive(Debug, thiserror::Error)]
#[error("NATS at {url}: {what}: {detail}")]
pub struct BusError {
    url: String,
    what: &'static str,
    detail: String,
}

impl BusError {
    /// `what` failed talking to the bus `config` names, and why.
    pub fn new(config: &BusConfig, what: &'static str, e: impl std::fmt::Display) -> Self {
        Self {
            url: config.url.clone(),
            what,
            detail: e.to_string(),
        }
    }
}

/// Connects to NATS (the client reconnects by itself afterwards).
pub async fn connect(config: &BusConfig) -> Result<Context, BusError> {
    let mut options = async_nats::ConnectOptions::new()
        .name("umstore-data-plane")
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect();
    if let Some((user, password)) = &config.credentials {
        options = options.user_and_password(user.clone(), password.clone());
    }
    let client = tokio::time::timeout(Duration::from_secs(10), options.connect(&config.url))
        .await
        .map_err(|_| BusError::new(config, "connecting", "no answer within 10 s"))?
        .map_err(|e| BusError::new(config, "connecting", e))?;
    Ok(jetstream::new(client))
}

/// Creates the three streams where absent (an existing stream is left as it is).
pub async fn ensure_streams(js: &Context, config: &BusConfig) -> Result<(), BusError> {
    let streams = [
        stream::Config {
            name: config.inbound_stream(),
            subjects: vec![format!("{}.in.>", config.subject_prefix)],
            retention: RetentionPolicy::WorkQueue,
            max_age: config.max_age,
            description: Some("umstore: inbound metadata events".into()),
            ..Default::default()
        },
        stream::Config {
            name: config.dead_letter_stream(),
            subjects: vec![config.dead_letter_subject()],
            max_age: Duration::from_secs(30 * 24 * 3600),
            description: Some("umstore: events that could never apply, with the reason".into()),
            ..Default::default()
        },
        stream::Config {
            name: config.outbound_stream(),
            subjects: vec![format!("{}.out.>", config.subject_prefix)],
            max_age: config.max_age,
            duplicate_window: Duration::from_secs(600),
            description: Some("umstore: events the store publishes (outbox)".into()),
            ..Default::default()
        },
    ];
    for s in streams {
        js.get_or_create_stream(s)
            .await
            .map_err(|e| BusError::new(config, "creating the streams", e))?;
    }
    Ok(())
}

/// Consumes the inbound stream until the connection is lost beyond repair:
/// `workers` messages at a time, each applied, acknowledged or dead-lettered.
pub async fn consume(js: &Context, config: &BusConfig, ingest: &Ingest) -> Result<(), BusError> {
    let stream = js
        .get_stream(config.inbound_stream())
        .await
        .map_err(|e| BusError::new(config, "opening the inbound stream", e))?;
    let workers = config.workers.max(1);
    let consumer = stream
        .get_or_create_consumer(
            &config.consumer(),
            pull::Config {
                durable_name: Some(config.consumer()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                // Bounded in flight across every process sharing the consumer.
                max_ack_pending: i64::try_from(workers * 16).unwrap_or(1024),
                description: Some("umstore: the data plane's apply workers".into()),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| BusError::new(config, "creating the durable consumer", e))?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(workers)
        .messages()
        .await
        .map_err(|e| BusError::new(config, "pulling messages", e))?;
    info!(
        stream = %config.inbound_stream(),
        consumer = %config.consumer(),
        workers,
        "consuming events"
    );
    messages
        .for_each_concurrent(workers, |message| async move {
            match message {
                Ok(message) => handle(js, config, ingest, message).await,
                Err(e) => warn!(error = %e, "receiving from the inbound stream"),
            }
        })
        .await;
    Err(BusError::new(
        config,
        "consuming",
        "the message stream ended",
    ))
}

/// Applies one message and settles it.
async fn handle(js: &Context, config: &BusConfig, ingest: &Ingest, message: jetstream::Message) {
    match ingest.submit(&message.payload).await {
        Ok((event, outcome)) => {
            debug!(event_id = %event.event_id, outcome = outcome.as_str(), "event settled");
            if let Err(e) = message.ack().await {
                // Redelivered later, and then a duplicate.
                warn!(error = %e, "acknowledging an applied event");
            }
        }
        Err(SubmitError::Rejected(rejection)) => {
            let event_id = super::event::peek_event_id(&message.payload);
            warn!(
                event_id = ?event_id,
                code = rejection.code(),
                reason = %rejection,
                "event dead-lettered"
            );
            match dead_letter(js, config, &message, &rejection).await {
                Ok(()) => {
                    ingest.dead_lettered();
                    if let Err(e) = message.ack_with(AckKind::Term).await {
                        warn!(error = %e, "terminating a dead-lettered event");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "the dead-letter subject refused; retrying later");
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                        .await;
                }
            }
        }
        Err(SubmitError::RegionMoving(reason)) => {
            // A fence lasts a second or two: retried soon, whatever the
            // number of deliveries, so it does not become a long backoff.
            let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
            let delay = moving_retry_delay(delivered);
            debug!(
                %reason,
                delivered,
                retry_in_ms = delay.as_millis() as u64,
                "event deferred while its region moves between clusters"
            );
            if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
                warn!(error = %e, "nak");
            }
        }
        Err(SubmitError::Transient(reason)) => {
            let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
            let delay = retry_delay(delivered);
            warn!(
                %reason,
                delivered,
                retry_in_ms = delay.as_millis() as u64,
                "event not applied; redelivering later"
            );
            if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
                warn!(error = %e, "nak");
            }
        }
    }
}

/// The delay before the `delivered`-th redelivery: 200 ms doubling to 30 s.
fn retry_delay(delivered: i64) -> Duration {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut delay = backoff.next_delay();
    for _ in 1..delivered.clamp(1, 16) {
        delay = backoff.next_delay();
    }
    delay
}

/// The delay before redelivering an event deferred by its region's move
/// (`delivered` deliveries so far): 50 ms doubling to 400 ms, never more.
fn moving_retry_delay(delivered: i64) -> Duration {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
    let mut delay = backoff.next_delay();
    for _ in 1..delivered.clamp(1, 8) {
        delay = backoff.next_delay();
    }
    delay
}

/// Publishes the original message to the dead-letter subject with the reason,
/// and waits for the stream to store it.
async fn dead_letter(
    js: &Context,
    config: &BusConfig,
    message: &jetstream::Message,
    rejection: &Rejection,
) -> Result<(), BusError> {
    let mut headers = HeaderMap::new();
    // Header values are one line.
    let reason: String = rejection
        .to_string()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    headers.insert(REASON_HEADER, reason.as_str());
    headers.insert(CODE_HEADER, rejection.code());
    headers.insert(SUBJECT_HEADER, message.subject.as_str());
    if let Ok(info) = message.info() {
        // A dead letter published twice (a crash before `term`) is stored once.
        let id = format!("dlq:{}:{}", info.stream, info.stream_sequence);
        headers.insert("Nats-Msg-Id", id.as_str());
    }
    js.publish_with_headers(
        config.dead_letter_subject(),
        headers,
        message.payload.clone(),
    )
    .await
    .map_err(|e| BusError::new(config, "dead-lettering", e))?
    .await
    .map_err(|e| BusError::new(config, "dead-lettering", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_deferred_by_a_move_comes_back_within_half_a_second() {
        assert_eq!(moving_retry_delay(1), Duration::from_millis(50));
        assert_eq!(moving_retry_delay(2), Duration::from_millis(100));
        for delivered in [4, 10, 1000] {
            assert_eq!(moving_retry_delay(delivered), Duration::from_millis(400));
        }
        // Other transient failures back off to 30 s.
        assert_eq!(retry_delay(100), Duration::from_secs(30));
    }
}
