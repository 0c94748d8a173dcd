//! The write path through a real NATS JetStream server: the consumer applies
//! what is valid, dead-letters what is not (with a reason and then `term`), the
//! outbox relay publishes exactly once, and a NATS restart mid-stream loses and
//! doubles nothing. Each test has its own subjects and streams.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, Context};
use chrono::{Duration as Span, Utc};
use futures_util::StreamExt;
use serde_json::{json, Value};
use support::ingest::{created, envelope, fixture_with, Fixture};
use umstore_data_plane::db::Database;
use umstore_data_plane::ingest::bus::{self, BusConfig, CODE_HEADER, REASON_HEADER};
use umstore_data_plane::ingest::outbox;
use umstore_data_plane::metrics::Metrics;
use umstore_e2e::Nats;
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

fn nats() -> Nats {
    Nats::start().expect("nats-server (apt-get install nats-server)")
}

fn config(nats: &Nats) -> BusConfig {
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    BusConfig {
        url: nats.url(),
        credentials: None,
        subject_prefix: format!("t{tag}.events"),
        stream_prefix: format!("T{}", tag.to_uppercase()),
        workers: 4,
        max_age: Duration::from_secs(3600),
    }
}

/// The ingest, its consumer and the outbox relay, running on `nats`.
struct Running {
    f: Fixture,
    config: BusConfig,
    js: Context,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// What the ingest counts, as `serve` exports it.
    metrics: Arc<Metrics>,
}

impl Running {
    async fn start(nats: &Nats) -> Self {
        let config = config(nats);
        let mut f = fixture_with(&config.subject_prefix).await;
        let metrics = Arc::new(Metrics::new());
        f.ingest = f.ingest.clone().with_metrics(metrics.clone());
        let js = bus::connect(&config).await.expect("connect");
        bus::ensure_streams(&js, &config).await.expect("streams");
        let mut running = Self {
            f,
            config,
            js,
            tasks: Vec::new(),
            metrics,
        };
        running.spawn();
        running
    }

    /// Starts the consumer (retrying as `serve` does) and the relay.
    fn spawn(&mut self) {
        let (js, config, ingest) = (self.js.clone(), self.config.clone(), self.f.ingest.clone());
        self.tasks.push(tokio::spawn(async move {
            loop {
                let _ = bus::consume(&js, &config, &ingest).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
        let database = Database::parse(&self.f.store.url(Purpose::Writer)).expect("url");
        self.tasks
            .push(tokio::spawn(outbox::relay(database, self.js.clone())));
    }

    async fn publish(&self, event: &Value) {
        let region = event["region"].as_str().unwrap_or("KA");
        let kind = event["event_type"].as_str().unwrap_or("UNKNOWN");
        self.publish_raw(
            self.config.inbound_subject(region, kind),
            event.to_string().into_bytes(),
        )
        .await;
    }

    async fn publish_raw(&self, subject: String, bytes: Vec<u8>) {
        self.js
            .publish(subject, bytes.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    async fn stream_messages(&self, name: String) -> u64 {
        let mut stream = self.js.get_stream(name).await.expect("stream");
        stream.info().await.expect("info").state.messages
    }

    async fn wait_for(&self, what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn processed(&self) -> i64 {
        self.f
            .admin
            .query_one("SELECT count(*) FROM umstore.processed_events", &[])
            .await
            .expect("count")
            .get(0)
    }

    /// Every dead letter: its reason, code and payload.
    async fn dead_letters(&self) -> Vec<(String, String, String)> {
        let stream = self
            .js
            .get_stream(self.config.dead_letter_stream())
            .await
            .expect("dlq stream");
        let reader = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .expect("dlq reader");
        let mut batch = reader
            .fetch()
            .max_messages(100)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("fetch");
        let mut out = Vec::new();
        while let Some(Ok(m)) = batch.next().await {
            let headers = m.headers.clone().unwrap_or_default();
            let get = |h: &str| {
                headers
                    .get(h)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            out.push((
                get(REASON_HEADER),
                get(CODE_HEADER),
                String::from_utf8_lossy(&m.payload).into_owned(),
            ));
        }
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_events_apply_and_publish_once_and_bad_ones_are_dead_lettered_with_a_reason() {
    let nats = nats();
    let r = Running::start(&nats).await;
    let t0 = Utc::now() - Span::hours(1);
    let users: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for (i, user) in users.iter().enumerate() {
        r.publish(&created(*user, t0 + Span::seconds(i as i64)))
            .await;
    }
    // One redelivered by its producer: the same event twice.
    let update = envelope(
        "METADATA_UPDATED",
        users[0],
        t0 + Span::minutes(30),
        json!({"occupation": "tailor"}),
    );
    r.publish(&update).await;
    r.publish(&update).await;

    // The poison: each must land in the DLQ, and the stream keep flowing.
    let mut unknown_region = created(Uuid::new_v4(), t0);
    unknown_region["region"] = json!("QQ");
    let risk_for_stranger = envelope(
        "RISK_SCORES_COMPUTED",
        Uuid::new_v4(),
        t0,
        json!({"financial_risk": 0.1, "deadline_risk": 0.1, "benefit_loss_risk": 0.1,
               "overall_risk": 0.1, "model_version": "m1", "computed_at": t0}),
    );
    let mut score = risk_for_stranger.clone();
    score["event_id"] = json!(Uuid::new_v4());
    score["payload"]["overall_risk"] = json!(1.5);
    let mut missing = created(Uuid::new_v4(), t0);
    missing["payload"]
        .as_object_mut()
        .expect("payload")
        .remove("date_of_birth");
    let mut unknown_type = created(Uuid::new_v4(), t0);
    unknown_type["event_type"] = json!("METADATA_MERGED");
    r.publish_raw(
        r.config.inbound_subject("KA", "METADATA_CREATED"),
        b"{not json".to_vec(),
    )
    .await;
    for e in [
        &unknown_region,
        &risk_for_stranger,
        &score,
        &missing,
        &unknown_type,
    ] {
        r.publish(e).await;
    }
    // And valid events after the poison still apply.
    let late = Uuid::new_v4();
    r.publish(&created(late, t0)).await;

    r.wait_for("22 events applied", Duration::from_secs(60), async || {
        r.processed().await == 22
    })
    .await;
    r.wait_for("6 dead letters", Duration::from_secs(30), async || {
        r.stream_messages(r.config.dead_letter_stream()).await == 6
    })
    .await;
    // What UmstoreDeadLettersGrowing counts (docs/monitoring.md); counted once
    // the stream acknowledged the publish, so a moment after the stream has it.
    r.wait_for(
        "6 dead letters counted",
        Duration::from_secs(5),
        async || r.metrics.ingest_dead_letters.get() == 6,
    )
    .await;
    // Every metadata event applied queued two outbound events; each published once.
    r.wait_for("44 outbound events", Duration::from_secs(30), async || {
        r.stream_messages(r.config.outbound_stream()).await == 44
    })
    .await;
    // The relay marks a row published once JetStream acknowledged it: the last
    // marks may trail the messages by a moment.
    r.wait_for(
        "every outbox row marked published",
        Duration::from_secs(10),
        async || {
            let unpublished: i64 =
                r.f.admin
                    .query_one(
                        "SELECT count(*) FROM umstore.outbox WHERE published_at IS NULL",
                        &[],
                    )
                    .await
                    .expect("count")
                    .get(0);
            unpublished == 0
        },
    )
    .await;

    let letters = r.dead_letters().await;
    let mut codes: Vec<&str> = letters.iter().map(|(_, c, _)| c.as_str()).collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "invalid",
            "invalid",
            "invalid",
            "malformed",
            "unappliable",
            "unknown_type"
        ]
    );
    for (reason, _, payload) in &letters {
        assert!(!reason.is_empty(), "a dead letter without a reason");
        // The original message, unchanged; its reason shows no personal data.
        assert!(
            payload.contains("Asha") || !payload.contains("full_name") || payload == "{not json"
        );
        for secret in ["Asha", "9876543210", "570001", "1960-04-02"] {
            assert!(!reason.contains(secret), "{reason} shows {secret}");
        }
    }
    assert!(letters
        .iter()
        .any(|(reason, _, _)| reason.contains("region \"QQ\"")));
    assert!(letters
        .iter()
        .any(|(reason, _, _)| reason.contains("unknown user")));

    // Settled: nothing left for the consumer, nothing redelivered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(r.stream_messages(r.config.inbound_stream()).await, 0);
    assert_eq!(r.processed().await, 22);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_stream_loses_and_doubles_nothing() {
    let mut nats = nats();
    let r = Running::start(&nats).await;
    let t0 = Utc::now() - Span::hours(1);
    let first: Vec<Value> = (0..150)
        .map(|i| created(Uuid::new_v4(), t0 + Span::seconds(i)))
        .collect();
    for e in &first {
        r.publish(e).await;
    }
    r.wait_for("some applied", Duration::from_secs(30), async || {
        r.processed().await >= 20
    })
    .await;
    nats.restart().expect("restart nats-server");
    // The clients reconnect by themselves; publish the rest after the restart.
    let second: Vec<Value> = (0..50)
        .map(|i| created(Uuid::new_v4(), t0 + Span::seconds(200 + i)))
        .collect();
    for e in &second {
        r.publish(e).await;
    }
    r.wait_for("all 200 applied", Duration::from_secs(120), async || {
        r.processed().await == 200
    })
    .await;
    r.wait_for("400 outbound events", Duration::from_secs(60), async || {
        r.stream_messages(r.config.outbound_stream()).await == 400
    })
    .await;
    let history: i64 =
        r.f.admin
            .query_one("SELECT count(*) FROM umstore.user_metadata_history", &[])
            .await
            .expect("count")
            .get(0);
    assert_eq!(history, 200, "each event applied once");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        r.stream_messages(r.config.outbound_stream()).await,
        400,
        "nothing published twice"
    );
    assert_eq!(r.stream_messages(r.config.dead_letter_stream()).await, 0);
    let _ = jetstream::new;
}
