//! Where reads go: a purpose's replica while it keeps up, the primary when the
//! replica lags past the bound, is stopped, or has not replayed the caller's
//! own write (read-your-writes), and back. A PostgreSQL primary with a
//! streaming replica and PgBouncer (transaction pooling) in front of the
//! primary, all of the test's own; every purpose logs in as its own user.

mod support;

use std::time::{Duration, Instant};

use chrono::{Duration as Span, Utc};
use serde_json::{json, Value};
use support::ingest::{created, envelope};
use support::{connect, free_port, get_as, http_get, http_post, password, wait_for, Served, Store};
use umstore_e2e::{PgBouncer, Postgres};
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

struct Api {
    served: Served,
    port: u16,
    dir: std::path::PathBuf,
}

impl Api {
    /// Serves from `dir` (its key file and tokens: two servers may share it).
    fn start(
        dir: &std::path::Path,
        writer: &str,
        ai_primary: &str,
        ai_replica: &str,
        max_lag: &str,
    ) -> Self {
        let dir = dir.to_path_buf();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let data_dir = dir.display().to_string();
        let log = std::fs::File::create(dir.join(format!("serve-{port}.log"))).expect("log");
        let served = Served::start_logging(
            &[
                "serve",
                "--no-migrate",
                "--listen",
                &listen,
                "--database-url",
                writer,
                "--data-dir",
                &data_dir,
                "--ai-database-url",
                ai_primary,
                "--ai-replica-url",
                ai_replica,
                "--max-replica-lag",
                max_lag,
            ],
            log,
        );
        let ready = wait_for(port, "/readyz", Duration::from_secs(60), |s, _| s == 200);
        assert!(matches!(ready, Some((200, _))), "not ready: {ready:?}");
        Self { served, port, dir }
    }

    fn token(&self, purpose: Purpose) -> String {
        std::fs::read_to_string(self.dir.join("api-tokens").join(purpose.slug()))
            .expect("token")
            .trim()
            .to_owned()
    }

    /// Posts events as the writer, sending them again after a 503 as clients are
    /// told to (for up to 20 seconds); the `lsn` the answer carries. The
    /// harness's PgBouncer is Debian's 1.18, which predates
    /// `max_prepared_statements` (1.21, what the chart's pooler runs): under load
    /// a statement prepared on one server connection now and then meets another,
    /// and the write answers 503 (five in a row once failed CI on a busy machine).
    fn write(&self, events: Value) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let (status, body) = loop {
            let (status, body) = http_post(
                self.port,
                "/api/v1/events",
                Some(&self.token(Purpose::Writer)),
                &events.to_string(),
            );
            if status != 503 || std::time::Instant::now() >= deadline {
                break (status, body);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).expect("json");
        body["lsn"]
            .as_str()
            .expect("a write returns its lsn")
            .to_owned()
    }

    /// Reads the user as the AI core: (served by, version, phone).
    fn read(&self, user: Uuid, min_lsn: Option<&str>) -> (String, i64, String) {
        let path = format!("/api/v1/user-metadata/{user}");
        let token = self.token(Purpose::Ai);
        // Asked again after a 503, as for writes (see `write`).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let answer = loop {
            let answer = match min_lsn {
                None => get_as(self.port, &path, Some(&token)),
                Some(lsn) => support::get_with(self.port, &path, &token, &[("X-Min-Lsn", lsn)]),
            };
            if answer.status != 503 || std::time::Instant::now() >= deadline {
                break answer;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(
            answer.status,
            200,
            "{:?} {}\n{}",
            answer.headers,
            answer.body,
            self.log()
        );
        let body = answer.json();
        (
            answer.header("x-served-by").unwrap_or("").to_owned(),
            body["version"].as_i64().unwrap_or(0),
            body["pii"]["phone"].as_str().unwrap_or("").to_owned(),
        )
    }

    fn metrics(&self) -> String {
        http_get(self.port, "/metrics")
            .map(|m| m.1)
            .unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("serve-{}.log", self.port)))
            .unwrap_or_default()
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_the_replica_while_it_keeps_up_and_the_primary_otherwise() {
    let mut pg = Postgres::start_with_replicas(1).expect("PostgreSQL 15");
    let store = Store::migrated_on(&pg).await;
    let replica_port = pg.replica(0).expect("a streaming replica").port();
    let writer_password = password(Purpose::Writer);
    let ai_password = password(Purpose::Ai);
    let bouncer = PgBouncer::start_with_logins(
        &pg,
        &[
            ("umstore_writer_login", &writer_password),
            ("umstore_ai_login", &ai_password),
        ],
    )
    .expect("pgbouncer (apt-get install pgbouncer)");
    let writer = store.url_at(Purpose::Writer, bouncer.port());
    let ai_primary = store.url_at(Purpose::Ai, bouncer.port());
    let ai_replica = store.url_at(Purpose::Ai, replica_port);
    // A generous bound first: only read-your-writes moves reads.
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Api::start(dir.path(), &writer, &ai_primary, &ai_replica, "60s");

    let user = Uuid::new_v4();
    let t0 = Utc::now() - Span::minutes(30);
    let first = api.write(json!(created(user, t0)));
    wait_until(
        "the replica to serve the user",
        Duration::from_secs(20),
        || {
            let (by, version, _) = api.read(user, Some(&first));
            by == "replica" && version == 1
        },
    );
    let metrics = api.metrics();
    assert!(
        metrics.contains("umstore_replica_up{purpose=\"ai\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("umstore_replica_lag_bytes{purpose=\"ai\"}"));

    // The replica stops replaying: a read without a position may be stale,
    // one with the write's position is served by the primary, up to date.
    let replica_admin = connect(&pg.replica(0).expect("replica").conninfo(&store.name)).await;
    replica_admin
        .execute("SELECT pg_wal_replay_pause()", &[])
        .await
        .expect("pause replay");
    let second = api.write(json!(envelope(
        "METADATA_UPDATED",
        user,
        t0 + Span::minutes(1),
        json!({"phone": "9000000001"}),
    )));
    let (by, version, phone) = api.read(user, None);
    assert_eq!(
        (by.as_str(), version),
        ("replica", 1),
        "within the lag bound"
    );
    assert_eq!(phone, "9876543210");
    let (by, version, phone) = api.read(user, Some(&second));
    assert_eq!(
        (by.as_str(), version, phone.as_str()),
        ("primary", 2, "9000000001"),
        "read-your-writes through PgBouncer"
    );
    let bad = support::get_with(
        api.port,
        &format!("/api/v1/user-metadata/{user}"),
        &api.token(Purpose::Ai),
        &[("X-Min-Lsn", "yesterday")],
    );
    assert_eq!(bad.status, 400, "{}", bad.body);

    // A tight bound: the paused replica falls behind it and reads move to the
    // primary; replaying again brings them back.
    let tight = Api::start(dir.path(), &writer, &ai_primary, &ai_replica, "1s");
    api.write(json!(envelope(
        "METADATA_UPDATED",
        user,
        t0 + Span::minutes(2),
        json!({"children": 5}),
    )));
    wait_until(
        "reads to leave the lagging replica",
        Duration::from_secs(20),
        || tight.read(user, None).0 == "primary",
    );
    assert_eq!(tight.read(user, None).1, 3, "the primary is up to date");
    let lagging = tight.metrics();
    let lag: f64 = lagging
        .lines()
        .find_map(|l| l.strip_prefix("umstore_replica_lag_seconds{purpose=\"ai\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(lag > 1.0, "the exported lag shows it: {lag}\n{lagging}");
    replica_admin
        .execute("SELECT pg_wal_replay_resume()", &[])
        .await
        .expect("resume replay");
    wait_until(
        "reads to come back to the replica",
        Duration::from_secs(20),
        || {
            let (by, version, _) = tight.read(user, None);
            by == "replica" && version == 3
        },
    );

    // A stopped replica: reads go on, from the primary; back once it is up.
    drop(replica_admin);
    pg.stop_replica(0).expect("stop the replica");
    wait_until(
        "reads to leave the stopped replica",
        Duration::from_secs(20),
        || tight.read(user, None).0 == "primary",
    );
    wait_until("the probe to see it down", Duration::from_secs(10), || {
        tight
            .metrics()
            .contains("umstore_replica_up{purpose=\"ai\"} 0")
    });
    pg.restart_replica(0).expect("restart the replica");
    wait_until(
        "reads to come back after the restart",
        Duration::from_secs(30),
        || tight.read(user, None).0 == "replica",
    );
    for api in [api, tight] {
        let (_, log) = api.served.stop();
        assert!(!log.contains("9000000001"), "the log shows PII");
    }
    drop(bouncer);
}
