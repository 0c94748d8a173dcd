//! The write path under real failures, through the `serve` binary: a worker
//! process killed with SIGKILL while 10,000 events stream in (and the store's
//! connections terminated after its restart), and PostgreSQL crashed (SIGKILL to
//! the postmaster) and restarted mid-stream. Afterwards every event is applied exactly once (rows and
//! history counted), every outbox event published exactly once (the outbound
//! stream counted), nothing valid dead-lettered, and no personal data in the
//! database in plaintext (a `pg_dump` is searched) or in the logs.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::Context;
use chrono::{Duration as Span, Utc};
use serde_json::{json, Value};
use support::ingest::envelope;
use support::{connect, free_port, http_get, Store, BIN};
use umstore_data_plane::ingest::bus::{self, BusConfig};
use umstore_e2e::Nats;
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

const EVENTS: usize = 10_000;

/// One user's METADATA_CREATED with distinctive personal data (`n` in it), so
/// a dump or a log can be searched for it.
fn created(n: usize, at: chrono::DateTime<Utc>) -> Value {
    envelope(
        "METADATA_CREATED",
        Uuid::new_v4(),
        at,
        json!({
            "full_name": format!("Zorawar Plaintext{n:05}"),
            "date_of_birth": "1988-07-15",
            "gender": "male",
            "annual_income": 480000 + n,
            "household_size": 3,
            "employment_type": "salaried",
            "ration_card": "apl",
            "phone": format!("98{n:08}"),
            "pincode": "560034",
            "identity_token": format!("IDTOKEN-SECRET-{n:06}"),
        }),
    )
}

/// `serve` with the bus, as the writer login, its log in `dir`.
struct Worker {
    child: Child,
    port: u16,
}

impl Worker {
    fn start(store: &Store, nats: &Nats, config: &BusConfig, dir: &std::path::Path) -> Self {
        let port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .expect("log file");
        let child = Command::new(BIN)
            .args([
                "serve",
                "--no-migrate",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--database-url", &store.url(Purpose::Writer)])
            .args(["--data-dir", &dir.display().to_string()])
            .env("UMSTORE_NATS_URL", nats.url())
            .env("UMSTORE_EVENTS_SUBJECT_PREFIX", &config.subject_prefix)
            .env("UMSTORE_EVENTS_STREAM_PREFIX", &config.stream_prefix)
            .env("UMSTORE_INGEST_WORKERS", "4")
            .env("RUST_LOG", "info")
            .env_remove("UMSTORE_VAULT_ADDR")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        Self { child, port }
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn count(admin: &tokio_postgres::Client, sql: &str) -> i64 {
    admin
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

async fn messages(js: &Context, stream: String) -> u64 {
    let mut s = js.get_stream(stream).await.expect("stream");
    s.info().await.expect("info").state.messages
}

async fn wait(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_leaves_every_event_applied_and_published_exactly_once() {
    let store = Store::migrated().await;
    let admin = connect(store.superuser()).await;
    let nats = Nats::start().expect("nats-server (apt-get install nats-server)");
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let config = BusConfig {
        url: nats.url(),
        credentials: None,
        subject_prefix: format!("c{tag}.events"),
        stream_prefix: format!("C{}", tag.to_uppercase()),
        workers: 4,
        max_age: Duration::from_secs(3600),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let js = bus::connect(&config).await.expect("connect");
    bus::ensure_streams(&js, &config).await.expect("streams");

    // Two worker processes share the durable consumer.
    let worker = Worker::start(&store, &nats, &config, dir.path());
    let other = Worker::start(&store, &nats, &config, dir.path());
    let t0 = Utc::now() - Span::hours(2);
    let events: Vec<Value> = (0..EVENTS)
        .map(|n| created(n, t0 + Span::milliseconds(n as i64)))
        .collect();
    // Publish everything (acknowledged by the stream), in pipelined batches.
    let subject = config.inbound_subject("KA", "METADATA_CREATED");
    for chunk in events.chunks(500) {
        let mut acks = Vec::new();
        for e in chunk {
            acks.push(
                js.publish(subject.clone(), e.to_string().into_bytes().into())
                    .await
                    .expect("publish"),
            );
        }
        for a in acks {
            a.await.expect("stored");
        }
    }

    // Kill one worker process with SIGKILL once a part is applied, mid-transaction
    // for some of its four workers; the other goes on.
    wait("1,500 applied", Duration::from_secs(120), async || {
        count(&admin, "SELECT count(*) FROM umstore.processed_events").await >= 1_500
    })
    .await;
    worker.kill9();
    let at_kill = count(&admin, "SELECT count(*) FROM umstore.processed_events").await;
    assert!(at_kill < EVENTS as i64, "the kill came after the end");

    // Every connection to the store cut while the restarted worker applies the
    // rest (the crash of the server itself is the next test).
    let worker = Worker::start(&store, &nats, &config, dir.path());
    wait(
        "the restarted worker applying",
        Duration::from_secs(60),
        async || {
            count(&admin, "SELECT count(*) FROM umstore.processed_events").await > at_kill + 500
        },
    )
    .await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("terminate the store's connections");

    wait("all 10,000 applied", Duration::from_secs(240), async || {
        count(&admin, "SELECT count(*) FROM umstore.processed_events").await == EVENTS as i64
    })
    .await;
    wait(
        "20,000 outbound events",
        Duration::from_secs(120),
        async || messages(&js, config.outbound_stream()).await == 2 * EVENTS as u64,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&admin, "SELECT count(*) FROM umstore.user_metadata").await,
        EVENTS as i64
    );
    assert_eq!(
        count(&admin, "SELECT count(*) FROM umstore.user_metadata_history").await,
        EVENTS as i64,
        "one history row per event"
    );
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM umstore.outbox WHERE published_at IS NULL"
        )
        .await,
        0
    );
    assert_eq!(
        messages(&js, config.outbound_stream()).await,
        2 * EVENTS as u64,
        "an outbound event published twice"
    );
    assert_eq!(messages(&js, config.dead_letter_stream()).await, 0);
    assert_eq!(messages(&js, config.inbound_stream()).await, 0);
    assert!(http_get(worker.port, "/readyz").is_some_and(|(s, _)| s == 200));
    drop(worker);
    drop(other);

    // No personal data in plaintext: not in a dump of the database, not in logs.
    let dump = Command::new(pg_dump())
        .args(["--data-only", "--schema=umstore"])
        .arg(format!("--dbname={}", store.superuser()))
        .output()
        .expect("pg_dump");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.len() > 100_000, "the dump holds the data");
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
    for secret in ["Zorawar", "Plaintext0", "IDTOKEN-SECRET", "1988-07-15"] {
        assert!(!dump.contains(secret), "the dump shows {secret}");
        assert!(!log.contains(secret), "the log shows {secret}");
    }
}

fn pg_dump() -> std::path::PathBuf {
    let bins = umstore_e2e::localpg::PgBinaries::discover().expect("PostgreSQL binaries");
    bins.bindir.join("pg_dump")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_crashed_and_restarted_mid_stream_loses_and_doubles_nothing() {
    const N: usize = 3_000;
    // A server of its own: this test crashes it. Its commits are durable, as in
    // production: with `synchronous_commit = off` (every other test's server) a
    // crash loses commits already acknowledged, and so events already acked.
    let mut pg = umstore_e2e::Postgres::start_crash_safe().expect("PostgreSQL 15");
    let store = Store::migrated_on(&pg).await;
    let nats = Nats::start().expect("nats-server (apt-get install nats-server)");
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let config = BusConfig {
        url: nats.url(),
        credentials: None,
        subject_prefix: format!("p{tag}.events"),
        stream_prefix: format!("P{}", tag.to_uppercase()),
        workers: 4,
        max_age: Duration::from_secs(3600),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let js = bus::connect(&config).await.expect("connect");
    bus::ensure_streams(&js, &config).await.expect("streams");
    let _worker = Worker::start(&store, &nats, &config, dir.path());
    let t0 = Utc::now() - Span::hours(2);
    let subject = config.inbound_subject("KA", "METADATA_CREATED");
    let mut acks = Vec::new();
    for n in 0..N {
        let e = created(n, t0 + Span::milliseconds(n as i64));
        acks.push(
            js.publish(subject.clone(), e.to_string().into_bytes().into())
                .await
                .expect("publish"),
        );
    }
    for a in acks {
        a.await.expect("stored");
    }
    {
        let admin = connect(store.superuser()).await;
        wait("500 applied", Duration::from_secs(120), async || {
            count(&admin, "SELECT count(*) FROM umstore.processed_events").await >= 500
        })
        .await;
    }
    pg.crash_and_restart_primary()
        .expect("PostgreSQL restarts after the crash");
    let admin = connect(store.superuser()).await;
    let before = count(&admin, "SELECT count(*) FROM umstore.processed_events").await;
    assert!(before < N as i64, "the crash came after the end");
    wait(
        "all applied after the crash",
        Duration::from_secs(240),
        async || count(&admin, "SELECT count(*) FROM umstore.processed_events").await == N as i64,
    )
    .await;
    wait(
        "every outbound event",
        Duration::from_secs(120),
        async || messages(&js, config.outbound_stream()).await == 2 * N as u64,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&admin, "SELECT count(*) FROM umstore.user_metadata_history").await,
        N as i64,
        "one history row per event"
    );
    assert_eq!(
        messages(&js, config.outbound_stream()).await,
        2 * N as u64,
        "an outbound event published twice"
    );
    assert_eq!(messages(&js, config.dead_letter_stream()).await, 0);
}
