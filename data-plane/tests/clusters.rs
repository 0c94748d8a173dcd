//! A store of two clusters (`--clusters` / `UMSTORE_CLUSTERS`): two PostgreSQL
//! servers of the harness, each migrated as one cluster, home (AP, TS) and
//! south (KA, KL); one `serve` process over both, every purpose logging in as
//! its own user with the same password on both servers. Writes land in their
//! region's cluster only; one-user reads find the user through home's routes
//! (or, for a user without one, every cluster's directory, then write the
//! route back); stats merge both clusters with small groups suppressed by
//! their totals; erasure reaches the user's cluster; bad layouts stop the
//! process with a message that says what to fix. A region moving between the
//! clusters: home's `umstore.region_placement` moves its reads and writes; a
//! fenced region's events wait and then all land, once; a region moved away
//! sends its writes to the new cluster at once; a region copied into another
//! cluster is counted once by the stats.

mod support;

use std::time::Duration;

use chrono::{Duration as Span, Utc};
use serde_json::{json, Value};
use support::ingest::{created, envelope};
use support::{
    cli, connect, free_port, get_as, get_with, http_post, stderr, stdout, wait_for, Served, Store,
    BIN,
};
use tokio_postgres::Client;
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

/// The layout: home first; south's AI core reads its streaming replica.
fn layout(home: &Store, south: &Store, south_replica: u16) -> String {
    json!([
        {"name": "home", "regions": ["AP", "TS"],
         "primary": {"host": "127.0.0.1", "port": home.port(), "dbname": home.name}},
        {"name": "south", "regions": ["KA", "KL"],
         "primary": {"host": "127.0.0.1", "port": south.port(), "dbname": south.name},
         "replicas": {"ai": {"host": "127.0.0.1", "port": south_replica, "dbname": south.name}}},
    ])
    .to_string()
}

struct Api {
    served: Option<Served>,
    port: u16,
    dir: tempfile::TempDir,
    clusters: String,
    writer: String,
}

impl Api {
    /// `serve` over both clusters, given home's URLs only (the layout moves
    /// them onto south).
    async fn start(home: &Store, south: &Store, south_replica: u16, nats: &str) -> Self {
        Self::start_with(home, south, south_replica, nats, &[]).await
    }

    /// [`Self::start`] with more flags.
    async fn start_with(
        home: &Store,
        south: &Store,
        south_replica: u16,
        nats: &str,
        extra: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let data_dir = dir.path().display().to_string();
        let urls: Vec<(String, String)> = [
            Purpose::Ai,
            Purpose::Rules,
            Purpose::JsonGenerator,
            Purpose::Dashboard,
            Purpose::Analytics,
        ]
        .into_iter()
        .map(|p| (format!("--{}-database-url", p.slug()), home.url(p)))
        .collect();
        let writer = home.url(Purpose::Writer);
        let admin = home.admin_url().await;
        // The same administrator login in the other cluster, as the operator
        // keeps every login in every cluster.
        south.admin_url().await;
        let mut args = vec![
            "serve",
            "--no-migrate",
            "--listen",
            &listen,
            "--database-url",
            &writer,
            "--data-dir",
            &data_dir,
            "--admin-database-url",
            &admin,
            "--stats-min-group",
            "10",
            "--nats-url",
            nats,
        ];
        for (flag, url) in &urls {
            args.push(flag);
            args.push(url);
        }
        args.extend_from_slice(extra);
        let clusters = layout(home, south, south_replica);
        let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
        let served = Served::start_logging_env(
            &args,
            log,
            &[
                ("UMSTORE_CLUSTERS", clusters.as_str()),
                // As the operator sets it: every region in exactly one cluster.
                ("UMSTORE_REGIONS", "AP,TS,KA,KL"),
            ],
        );
        let ready = wait_for(port, "/readyz", Duration::from_secs(60), |s, _| s == 200);
        let api = Self {
            served: Some(served),
            port,
            dir,
            clusters,
            writer,
        };
        assert!(
            matches!(ready, Some((200, _))),
            "not ready: {ready:?}\n{}",
            api.log()
        );
        api
    }

    fn token(&self, purpose: Purpose) -> String {
        let path = self.dir.path().join("api-tokens").join(purpose.slug());
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    fn get(&self, purpose: Purpose, path: &str) -> support::Answer {
        get_as(self.port, path, Some(&self.token(purpose)))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Posts `events`; the answer's body.
    fn send(&self, events: Value) -> Value {
        let (status, body) = http_post(
            self.port,
            "/api/v1/events",
            Some(&self.token(Purpose::Writer)),
            &events.to_string(),
        );
        assert_eq!(status, 200, "{body}\n{}", self.log());
        assert!(!body.contains("rejected"), "{body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// Runs the CLI with the layout in its environment.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "warn")
            .env("UMSTORE_CLUSTERS", &self.clusters)
            .output()
            .expect("run umstore-data-plane")
    }

    fn stop(&mut self) -> String {
        if let Some(served) = self.served.take() {
            served.stop();
        }
        self.log()
    }
}

/// `created(user)` in `region`, with `area_type` set when given.
fn created_in(user: Uuid, region: &str, area_type: Option<&str>) -> Value {
    let mut event = created(user, Utc::now() - Span::minutes(5));
    event["region"] = json!(region);
    if let Some(a) = area_type {
        event["payload"]["area_type"] = json!(a);
    }
    event
}

async fn count(client: &Client, sql: &str, user: Uuid) -> i64 {
    client
        .query_one(sql, &[&user])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// How many of the events `ids` (as text) a cluster recorded as processed.
async fn processed_count(client: &Client, ids: &[String]) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM umstore.processed_events WHERE event_id::text = ANY($1)",
            &[&ids],
        )
        .await
        .expect("processed")
        .get(0)
}

/// Rows of `user` in the tables a write fills, in one cluster: directory,
/// metadata, outbox (1: any), route.
async fn rows(client: &Client, user: Uuid) -> [i64; 4] {
    [
        count(
            client,
            "SELECT count(*) FROM umstore.user_directory WHERE user_id = $1",
            user,
        )
        .await,
        count(
            client,
            "SELECT count(*) FROM umstore.user_metadata WHERE user_id = $1",
            user,
        )
        .await,
        count(
            client,
            "SELECT count(*) FROM umstore.outbox WHERE user_id = $1",
            user,
        )
        .await
        .min(1),
        count(
            client,
            "SELECT count(*) FROM umstore.user_routes WHERE user_id = $1",
            user,
        )
        .await,
    ]
}

fn metric(body: &str, line_start: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_route_every_read_and_write_by_region() {
    let home = Store::migrated().await;
    let pg = umstore_e2e::Postgres::start_with_replicas(1)
        .expect("PostgreSQL 15 (a second server, with a streaming replica)");
    let south = Store::migrated_on(&pg).await;
    let replica = pg.replica(0).expect("south's replica").port();
    let nats = umstore_e2e::Nats::start().expect("nats-server (apt-get install nats-server)");
    let mut api = Api::start(&home, &south, replica, &nats.url()).await;
    let home_db = connect(home.superuser()).await;
    let south_db = connect(south.superuser()).await;

    // Writes land in their region's cluster only; the route is in home.
    let (in_south, in_home) = (Uuid::new_v4(), Uuid::new_v4());
    let answer = api.send(json!([
        created_in(in_south, "KA", None),
        envelope(
            "METADATA_UPDATED",
            in_south,
            Utc::now() - Span::minutes(4),
            json!({"district": "Udupi"}),
        ),
    ]));
    let token = answer["lsn"].as_str().expect("an lsn").to_owned();
    assert!(
        token.starts_with("south:") && !token.contains("home:"),
        "the token names the cluster written to: {token}"
    );
    let home_token = api.send(json!(created_in(in_home, "AP", None)))["lsn"]
        .as_str()
        .expect("an lsn")
        .to_owned();
    assert!(home_token.starts_with("home:"), "{home_token}");
    // Both writes' positions: south's AI core reads a replica, which must
    // have replayed the write to serve it (else the primary does).
    let both = format!("{token},{home_token}");
    let read = |purpose: Purpose, path: &str| {
        get_with(api.port, path, &api.token(purpose), &[("X-Min-Lsn", &both)])
    };
    assert_eq!(rows(&south_db, in_south).await, [1, 1, 1, 0]);
    assert_eq!(rows(&home_db, in_south).await, [0, 0, 0, 1]);
    assert_eq!(rows(&home_db, in_home).await, [1, 1, 1, 1]);
    assert_eq!(rows(&south_db, in_home).await, [0, 0, 0, 0]);
    // Each cluster's outbox is relayed to the stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for (name, db) in [("home", &home_db), ("south", &south_db)] {
        loop {
            let waiting: i64 = db
                .query_one(
                    "SELECT count(*) FROM umstore.outbox WHERE published_at IS NULL",
                    &[],
                )
                .await
                .expect("outbox")
                .get(0);
            if waiting == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}'s outbox is not relayed ({waiting} waiting)\n{}",
                api.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // One-user reads: each user from their cluster, which the answer names.
    for (user, cluster, region) in [(in_south, "south", "KA"), (in_home, "home", "AP")] {
        for suffix in ["", "/derived", "/risk-scores", "/eligibility", "/history"] {
            let a = read(
                Purpose::Ai,
                &format!("/api/v1/user-metadata/{user}{suffix}"),
            );
            assert_eq!(a.status, 200, "{user}{suffix}: {}", a.body);
            assert_eq!(a.header("x-cluster"), Some(cluster), "{suffix}");
            assert_eq!(a.json()["region"], region);
        }
    }
    let a = read(Purpose::Ai, &format!("/api/v1/user-metadata/{in_south}"));
    assert_eq!(a.json()["pii"]["district"], "Udupi", "{}", a.body);
    // South's AI reads go to south's replica once its probe finds it caught
    // up; home has none, so home's AI reads stay on its primary.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let a = read(Purpose::Ai, &format!("/api/v1/user-metadata/{in_south}"));
        assert_eq!(a.status, 200, "{}", a.body);
        if a.header("x-served-by") == Some("replica") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "south's replica never served\n{}",
            api.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = read(Purpose::Ai, &format!("/api/v1/user-metadata/{in_home}"));
    assert_eq!(a.header("x-served-by"), Some("primary"));
    // Read-your-writes: the write's token is honoured against its cluster.
    let a = get_with(
        api.port,
        &format!("/api/v1/user-metadata/{in_south}"),
        &api.token(Purpose::Ai),
        &[("X-Min-Lsn", &token)],
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let a = get_with(
        api.port,
        &format!("/api/v1/user-metadata/{in_south}"),
        &api.token(Purpose::Ai),
        &[("X-Min-Lsn", "south:nonsense")],
    );
    assert_eq!(a.status, 400, "{}", a.body);
    // A user no cluster holds is unknown, as with one cluster.
    let nobody = Uuid::new_v4();
    let a = api.get(Purpose::Ai, &format!("/api/v1/user-metadata/{nobody}"));
    assert_eq!(a.status, 404, "{}", a.body);
    assert!(a.header("x-cluster").is_none());

    // A user written before the store had clusters has no route: found in
    // south's directory by asking every cluster, and the route written back.
    let before = Uuid::new_v4();
    api.send(json!(created_in(before, "KL", None)));
    home_db
        .execute(
            "DELETE FROM umstore.user_routes WHERE user_id = $1",
            &[&before],
        )
        .await
        .expect("drop the route");
    let a = api.get(
        Purpose::Dashboard,
        &format!("/api/v1/user-metadata/{before}"),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-cluster"), Some("south"));
    assert_eq!(
        rows(&home_db, before).await[3],
        1,
        "the route was backfilled"
    );
    let route: String = home_db
        .query_one(
            "SELECT region::text FROM umstore.user_routes WHERE user_id = $1",
            &[&before],
        )
        .await
        .expect("route")
        .get(0);
    assert_eq!(route, "KL");
    let metrics = support::http_get(api.port, "/metrics").expect("metrics").1;
    assert_eq!(
        metric(&metrics, "umstore_route_fallbacks_total{result=\"hit\"}"),
        1.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "umstore_route_cache_lookups_total{result=\"hit\"}"
        ) >= 1.0
    );
    assert!(metric(&metrics, "umstore_cluster_queries_total{cluster=\"south\"}") >= 1.0);
    assert_eq!(
        metric(
            &metrics,
            "umstore_cluster_replica_up{cluster=\"south\",purpose=\"ai\"}"
        ),
        1.0,
        "{metrics}"
    );

    // A user routed to KA cannot be created again in AP (another cluster).
    let (status, body) = http_post(
        api.port,
        "/api/v1/events",
        Some(&api.token(Purpose::Writer)),
        &created_in(in_south, "AP", None).to_string(),
    );
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("lives in region KA"), "{body}");
    assert_eq!(rows(&home_db, in_south).await[..2], [0, 0]);
    // A user without a route, in south: created again in home's AP, they are
    // found in south's directory, routed there, and the event refused.
    let unrouted = Uuid::new_v4();
    api.send(json!(created_in(unrouted, "KL", None)));
    home_db
        .execute(
            "DELETE FROM umstore.user_routes WHERE user_id = $1",
            &[&unrouted],
        )
        .await
        .expect("drop the route");
    let (status, body) = http_post(
        api.port,
        "/api/v1/events",
        Some(&api.token(Purpose::Writer)),
        &created_in(unrouted, "TS", None).to_string(),
    );
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("lives in region KL"), "{body}");
    assert_eq!(rows(&home_db, unrouted).await, [0, 0, 0, 1]);
    assert_eq!(rows(&south_db, unrouted).await[..2], [1, 1]);

    // Stats: 6 urban users in each cluster make a group of 12 (shown with a
    // threshold of 10); 6 rural users in south alone are left out, although
    // each cluster's urban 6 would be too.
    let mut events = Vec::new();
    for region in ["AP", "TS", "KA", "KL", "AP", "KA"] {
        events.push(created_in(Uuid::new_v4(), region, Some("urban")));
    }
    for region in ["AP", "TS", "KA", "KL", "AP", "KA"] {
        events.push(created_in(Uuid::new_v4(), region, Some("urban")));
    }
    for _ in 0..6 {
        events.push(created_in(Uuid::new_v4(), "KA", Some("rural")));
    }
    api.send(Value::Array(events));
    let check = |source: &str| {
        let a = api.get(
            Purpose::Analytics,
            "/api/v1/user-metadata/stats?group_by=area_type",
        );
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.header("x-stats-source"), Some(source), "{}", a.body);
        let groups = a.json()["groups"].as_array().cloned().unwrap_or_default();
        assert_eq!(groups.len(), 1, "{}", a.body);
        assert_eq!(groups[0]["group"]["area_type"], "urban");
        assert_eq!(groups[0]["users"], 12);
        assert_eq!(groups[0]["avg_household_size"], 4.0);
    };
    check("live");
    // A region-scoped stats request reads its cluster alone: 4 urban in KA.
    let a = api.get(
        Purpose::Analytics,
        "/api/v1/user-metadata/stats?group_by=area_type&region=KA",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["groups"].as_array().map(Vec::len), Some(0));
    // The views of both clusters, refreshed by one command.
    let out = api.cli(&["stats", "refresh", "--database-url", &api.writer]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("home: refreshed") && text.contains("south: refreshed"),
        "{text}"
    );
    check("view");

    // Users by attribute, across both clusters.
    let a = api.get(
        Purpose::Admin,
        "/api/v1/user-metadata/query?gender=female&limit=500",
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["users"].as_array().map(Vec::len), Some(22));

    // Erasure reaches the user's cluster.
    let data_dir = api.dir.path().display().to_string();
    let user_text = in_south.to_string();
    let out = api.cli(&[
        "keys",
        "forget-user",
        &user_text,
        "--actor",
        "dpo",
        "--database-url",
        &api.writer,
        "--data-dir",
        &data_dir,
    ]);
    assert!(stdout(&out).contains("erased"), "{}", stderr(&out));
    assert_eq!(
        count(
            &south_db,
            "SELECT count(*) FROM umstore.user_metadata WHERE user_id = $1 AND erased_at IS NOT NULL",
            in_south,
        )
        .await,
        1
    );
    let a = api.get(
        Purpose::Dashboard,
        &format!("/api/v1/user-metadata/{in_south}"),
    );
    assert_eq!(a.status, 410, "{}", a.body);
    let log = api.stop();
    for secret in ["Asha", "9876543210", "Udupi", &every_logins_password()] {
        assert!(!log.contains(secret), "the log shows {secret}");
    }
}

/// A password every login has in this test process (never logged).
fn every_logins_password() -> String {
    support::password(Purpose::Writer)
}

#[test]
fn bad_layouts_stop_the_process_with_what_to_fix() {
    let cases = [
        ("[{\"name\":", "not a JSON array of clusters"),
        (
            r#"[{"name":"home","regions":["KA"],"primary":{"host":"h","port":1}},
                {"name":"south","regions":["KA"],"primary":{"host":"s","port":1}}]"#,
            "region KA is in two clusters, \"home\" and \"south\"",
        ),
        (
            r#"[{"name":"home","regions":["ZZ"],"primary":{"host":"h","port":1}}]"#,
            "region \"ZZ\" of cluster \"home\" is none of the store's regions",
        ),
        (
            r#"[{"name":"home","regions":["KA"],"primary":{"host":"h","port":1},
                 "replicas":{"reporting":{"host":"r","port":1}}}]"#,
            "\"reporting\", which is not a reading purpose",
        ),
    ];
    for (layout, expected) in cases {
        let out = std::process::Command::new(BIN)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", free_port()),
                "--database-url",
                "postgres://w:pw-not-shown@127.0.0.1:1/x",
            ])
            .env("UMSTORE_CLUSTERS", layout)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run");
        assert!(!out.status.success(), "{layout} accepted");
        let err = stderr(&out);
        assert!(err.contains(expected), "{layout}: {err}");
        assert!(err.contains("UMSTORE_CLUSTERS"), "{err}");
        assert!(!err.contains("pw-not-shown"));
    }
    // The store's regions (the operator's UMSTORE_REGIONS) each in a cluster.
    let out = std::process::Command::new(BIN)
        .args([
            "stats",
            "refresh",
            "--database-url",
            "postgres://w@127.0.0.1:1/x",
        ])
        .env("UMSTORE_CLUSTERS", two_local())
        .env("UMSTORE_REGIONS", "AP,KA,DL")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the store's region(s) DL are in no cluster"),
        "{}",
        stderr(&out)
    );
    // Several clusters need a database URL to move onto them.
    let out = cli(&["--clusters", &two_local(), "stats", "refresh"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("give --database-url"),
        "{}",
        stderr(&out)
    );
}

fn two_local() -> String {
    r#"[{"name":"home","regions":["AP"],"primary":{"host":"127.0.0.1","port":1}},
        {"name":"south","regions":["KA"],"primary":{"host":"127.0.0.1","port":2}}]"#
        .to_owned()
}

/// Two clusters (home: AP, TS; south: KA, KL) and one `serve` over them,
/// reading the region placement every `refresh`; for the tests of a region
/// moving between them. South has no replica (its AI reads its primary).
struct Moving {
    api: Api,
    home_db: Client,
    south_db: Client,
    js: async_nats::jetstream::Context,
    _nats: umstore_e2e::Nats,
    _pg: umstore_e2e::Postgres,
    _stores: (Store, Store),
}

async fn moving(refresh: &str) -> Moving {
    moving_with(refresh, &[]).await
}

/// [`moving`], `serve` started with the flags `extra` too.
async fn moving_with(refresh: &str, extra: &[&str]) -> Moving {
    let home = Store::migrated().await;
    let pg = umstore_e2e::Postgres::start().expect("PostgreSQL 15 (a second server)");
    let south = Store::migrated_on(&pg).await;
    let nats = umstore_e2e::Nats::start().expect("nats-server (apt-get install nats-server)");
    let api = Api::start_with(
        &home,
        &south,
        south.port(),
        &nats.url(),
        &[&["--placement-refresh", refresh], extra].concat(),
    )
    .await;
    let home_db = connect(home.superuser()).await;
    let south_db = connect(south.superuser()).await;
    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    // The process makes the streams once it is connected.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while js.get_stream("UMSTORE_EVENTS_IN").await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no inbound stream\n{}",
            api.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Moving {
        api,
        home_db,
        south_db,
        js,
        _nats: nats,
        _pg: pg,
        _stores: (home, south),
    }
}

impl Moving {
    /// Publishes `event` on its inbound subject, as a producer does.
    async fn publish(&self, event: &Value) {
        let subject = format!(
            "umstore.events.in.{}.{}",
            event["region"].as_str().expect("region"),
            event["event_type"].as_str().expect("event type")
        );
        self.js
            .publish(subject, event.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    fn metrics(&self) -> String {
        support::http_get(self.api.port, "/metrics")
            .expect("metrics")
            .1
    }

    /// How long until the process has read placement `epoch`.
    async fn wait_for_epoch(&self, epoch: f64) -> Duration {
        let started = std::time::Instant::now();
        while metric(&self.metrics(), "umstore_region_placement_epoch ") != epoch {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "placement epoch {epoch} never read\n{}",
                self.api.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }

    /// Places `region` in `cluster` in home's placement, as the operator (or
    /// the mover's switch) does.
    async fn place(&self, region: &str, cluster: &str, epoch: i64) {
        self.home_db
            .execute(
                "INSERT INTO umstore.region_placement (region, cluster, epoch)
                 VALUES ($1::text::bpchar, $2, $3)
                 ON CONFLICT (region) DO UPDATE SET cluster = EXCLUDED.cluster,
                    epoch = EXCLUDED.epoch, placed_at = now()",
                &[&region, &cluster, &epoch],
            )
            .await
            .expect("place the region");
    }

    /// Sets `region`'s state in one cluster, as the mover does.
    async fn set_state(db: &Client, region: &str, state: &str, peer: Option<&str>) {
        db.execute(
            "UPDATE umstore.region_state SET state = $2, peer = $3, changed_at = now()
             WHERE region = $1::text::bpchar",
            &[&region, &state, &peer],
        )
        .await
        .expect("set the region's state");
    }
}

/// Waits until `done` (a query's count) reaches `want`, for at most `within`.
async fn wait_count(db: &Client, sql: &str, user: Uuid, want: i64, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let n = count(db, sql, user).await;
        if n == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{sql} ({user}): {n}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const METADATA_ROWS: &str = "SELECT count(*) FROM umstore.user_metadata WHERE user_id = $1";
const ERASED_ROWS: &str =
    "SELECT count(*) FROM umstore.user_metadata WHERE user_id = $1 AND erased_at IS NOT NULL";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_row_moves_a_regions_reads_and_writes_within_the_refresh() {
    let m = moving("200ms").await;
    let before = Uuid::new_v4();
    m.api.send(json!(created_in(before, "KA", None)));
    assert_eq!(rows(&m.south_db, before).await, [1, 1, 1, 0]);
    assert_eq!(metric(&m.metrics(), "umstore_region_placement_epoch "), 0.0);

    // KA is home's now (nobody copied its rows: only where things go is
    // tested here).
    m.place("KA", "home", 2).await;
    let took = m.wait_for_epoch(2.0).await;
    assert!(
        took < Duration::from_millis(1500),
        "a refresh every 200 ms took {took:?}"
    );
    let after = Uuid::new_v4();
    let answer = m.api.send(json!(created_in(after, "KA", None)));
    let token = answer["lsn"].as_str().expect("an lsn");
    assert!(token.starts_with("home:"), "{token}");
    assert_eq!(rows(&m.home_db, after).await, [1, 1, 1, 1]);
    assert_eq!(rows(&m.south_db, after).await, [0, 0, 0, 0]);
    // Reads follow the placement: the route says KA, the placement home.
    let a = m
        .api
        .get(Purpose::Ai, &format!("/api/v1/user-metadata/{after}"));
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-cluster"), Some("home"));
    // The user written before the switch is still only in south, which KA
    // is no longer read from.
    let a = m
        .api
        .get(Purpose::Ai, &format!("/api/v1/user-metadata/{before}"));
    assert_eq!(a.status, 404, "{}", a.body);
    // Over the bus too.
    let bus = Uuid::new_v4();
    m.publish(&created_in(bus, "KA", None)).await;
    wait_count(&m.home_db, METADATA_ROWS, bus, 1, Duration::from_secs(10)).await;
    assert_eq!(rows(&m.south_db, bus).await, [0, 0, 0, 0]);

    // A row naming a cluster the layout does not have: warned about, and the
    // layout's cluster kept for the region.
    m.place("KL", "north", 9).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let kl = Uuid::new_v4();
    m.api.send(json!(created_in(kl, "KL", None)));
    assert_eq!(rows(&m.south_db, kl).await, [1, 1, 1, 0]);
    assert_eq!(metric(&m.metrics(), "umstore_region_placement_epoch "), 2.0);
    let log = m.api.log();
    assert!(
        log.contains("region placement changed") && log.contains("\"south\""),
        "{log}"
    );
    assert!(
        log.contains("names a cluster that is not in --clusters"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_regions_events_wait_and_then_all_land_once() {
    let m = moving("200ms").await;
    let t0 = Utc::now() - Span::minutes(10);
    let (base, forgotten) = (Uuid::new_v4(), Uuid::new_v4());
    m.api.send(json!([
        created_in(base, "KA", None),
        created_in(forgotten, "KA", None)
    ]));

    // The mover's fence: no write of KA lands in south meanwhile.
    Moving::set_state(&m.south_db, "KA", "fenced", Some("home")).await;
    let fenced_at = std::time::Instant::now();
    let created: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    let mut ids = Vec::new();
    for user in &created {
        let event = created_in(*user, "KA", None);
        ids.push(event["event_id"].as_str().expect("id").to_owned());
        m.publish(&event).await;
    }
    let districts: Vec<String> = (1..=5).map(|i| format!("District {i}")).collect();
    for (i, district) in districts.iter().enumerate() {
        let event = envelope(
            "METADATA_UPDATED",
            base,
            t0 + Span::minutes(6) + Span::seconds(i as i64),
            json!({"district": district}),
        );
        ids.push(event["event_id"].as_str().expect("id").to_owned());
        m.publish(&event).await;
    }
    // An HTTP caller writing KA meanwhile waits for the fence, and is not
    // told to send it again.
    let over_http = Uuid::new_v4();
    let (port, token) = (m.api.port, m.api.token(Purpose::Writer));
    let body = created_in(over_http, "KA", None).to_string();
    let caller = std::thread::spawn(move || http_post(port, "/api/v1/events", Some(&token), &body));
    // Other regions go on.
    let elsewhere = Uuid::new_v4();
    m.publish(&created_in(elsewhere, "AP", None)).await;
    wait_count(
        &m.home_db,
        METADATA_ROWS,
        elsewhere,
        1,
        Duration::from_secs(10),
    )
    .await;
    // Reads of KA go on too.
    let a = m
        .api
        .get(Purpose::Dashboard, &format!("/api/v1/user-metadata/{base}"));
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-cluster"), Some("south"));
    // An erasure waits for the fence too.
    let erasure = {
        let (clusters, writer) = (m.api.clusters.clone(), m.api.writer.clone());
        let data_dir = m.api.dir.path().display().to_string();
        std::thread::spawn(move || {
            std::process::Command::new(BIN)
                .args([
                    "keys",
                    "forget-user",
                    &forgotten.to_string(),
                    "--actor",
                    "dpo",
                    "--database-url",
                    &writer,
                    "--data-dir",
                    &data_dir,
                ])
                .env("RUST_LOG", "warn")
                .env("UMSTORE_CLUSTERS", clusters)
                .output()
                .expect("run umstore-data-plane")
        })
    };
    // Hold the fence for three seconds: long enough for several redeliveries.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(fenced_at.elapsed())).await;
    let processed = processed_count(&m.south_db, &ids).await;
    assert_eq!(processed, 0, "an event applied while its region was fenced");
    assert_eq!(count(&m.south_db, METADATA_ROWS, over_http).await, 0);
    assert!(
        !caller.is_finished(),
        "the HTTP caller was answered while fenced"
    );
    assert!(!erasure.is_finished(), "the erasure ended while fenced");
    assert_eq!(count(&m.south_db, ERASED_ROWS, forgotten).await, 0);
    let metrics = m.metrics();
    assert!(
        metric(
            &metrics,
            "umstore_region_write_refusals_total{reason=\"fenced\"}"
        ) >= 2.0,
        "{metrics}"
    );

    // The fence comes down: everything lands within a moment.
    Moving::set_state(&m.south_db, "KA", "open", None).await;
    let opened = std::time::Instant::now();
    for user in &created {
        wait_count(
            &m.south_db,
            METADATA_ROWS,
            *user,
            1,
            Duration::from_secs(10),
        )
        .await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let processed = processed_count(&m.south_db, &ids).await;
        if processed == ids.len() as i64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{processed} of {}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let landed = opened.elapsed();
    assert!(
        landed < Duration::from_millis(2500),
        "the deferred events took {landed:?} to land after the fence came down"
    );
    let (status, body) = caller.join().expect("the HTTP caller");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"applied\""), "{body}");
    assert_eq!(rows(&m.south_db, over_http).await, [1, 1, 1, 0]);
    // None lost, none doubled: each event recorded once, each update applied
    // (or found stale, when a redelivery overtook a newer one) once.
    let per_event: Vec<i64> = m
        .south_db
        .query(
            "SELECT count(*) FROM umstore.processed_events WHERE event_id::text = ANY($1)
             GROUP BY event_id",
            &[&ids],
        )
        .await
        .expect("per event")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(per_event, vec![1; ids.len()]);
    let updates: i64 = count(
        &m.south_db,
        "SELECT count(*) FROM umstore.user_metadata_history
         WHERE user_id = $1 AND change_type = 'updated'",
        base,
    )
    .await;
    let stale: i64 = count(
        &m.south_db,
        "SELECT count(*) FROM umstore.processed_events
         WHERE user_id = $1 AND event_type = 'METADATA_UPDATED' AND outcome = 'stale'",
        base,
    )
    .await;
    assert_eq!(updates + stale, 5, "{updates} applied, {stale} stale");
    // The newest update wins, whatever the order of redelivery.
    let a = m
        .api
        .get(Purpose::Ai, &format!("/api/v1/user-metadata/{base}"));
    assert_eq!(a.json()["pii"]["district"], "District 5", "{}", a.body);
    let dead =
        m.js.get_stream("UMSTORE_EVENTS_DLQ")
            .await
            .expect("dlq")
            .info()
            .await
            .expect("info")
            .state
            .messages;
    assert_eq!(dead, 0, "nothing is dead-lettered");
    let out = erasure.join().expect("the erasure");
    assert!(stdout(&out).contains("erased"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("moving between clusters (fenced"),
        "{}",
        stderr(&out)
    );
    assert_eq!(count(&m.south_db, ERASED_ROWS, forgotten).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_moved_away_sends_its_writes_to_the_new_cluster_at_once() {
    // The placement is read hourly: only a refusal makes it read sooner.
    let m = moving("1h").await;
    let first = Uuid::new_v4();
    m.api.send(json!(created_in(first, "KA", None)));
    assert_eq!(rows(&m.south_db, first).await, [1, 1, 1, 0]);

    // The switch, as the mover makes it: south no longer serves KA, and
    // home's placement says home.
    Moving::set_state(&m.south_db, "KA", "moved", Some("home")).await;
    m.place("KA", "home", 2).await;
    let over_http = Uuid::new_v4();
    let answer = m.api.send(json!(created_in(over_http, "KA", None)));
    assert_eq!(answer["results"][0]["status"], "applied", "{answer}");
    let token = answer["lsn"].as_str().expect("an lsn");
    assert!(token.starts_with("home:"), "{token}");
    assert_eq!(rows(&m.home_db, over_http).await, [1, 1, 1, 1]);
    assert_eq!(rows(&m.south_db, over_http).await, [0, 0, 0, 0]);
    let over_bus = Uuid::new_v4();
    m.publish(&created_in(over_bus, "KA", None)).await;
    wait_count(
        &m.home_db,
        METADATA_ROWS,
        over_bus,
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(rows(&m.south_db, over_bus).await, [0, 0, 0, 0]);
    let a = m
        .api
        .get(Purpose::Ai, &format!("/api/v1/user-metadata/{over_http}"));
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-cluster"), Some("home"));
    let metrics = m.metrics();
    assert!(
        metric(
            &metrics,
            "umstore_region_write_refusals_total{reason=\"moved\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "umstore_region_placement_epoch "), 2.0);
    // Nothing of KA was written in south after the switch.
    let ka: i64 = m
        .south_db
        .query_one(
            "SELECT count(*) FROM umstore.user_metadata WHERE region = 'KA'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(ka, 1);
}

/// Copies `region`'s rows of the tables a user's reads and stats need from
/// one cluster into another, as a move's copy does.
async fn copy_region(from: &Client, to: &Client) {
    use futures_util::{SinkExt, TryStreamExt};
    for (out, into) in [
        (
            "COPY (SELECT * FROM umstore.user_directory WHERE region = 'KA') TO STDOUT",
            "COPY umstore.user_directory FROM STDIN",
        ),
        (
            "COPY (SELECT * FROM umstore.user_data_keys WHERE region = 'KA') TO STDOUT",
            "COPY umstore.user_data_keys FROM STDIN",
        ),
        (
            "COPY (SELECT * FROM umstore.user_metadata WHERE region = 'KA') TO STDOUT",
            "COPY umstore.user_metadata FROM STDIN",
        ),
        (
            "COPY (SELECT * FROM umstore.user_derived_attributes WHERE region = 'KA') TO STDOUT",
            "COPY umstore.user_derived_attributes FROM STDIN",
        ),
    ] {
        let chunks: Vec<bytes::Bytes> = from
            .copy_out(out)
            .await
            .expect(out)
            .try_collect()
            .await
            .expect(out);
        let sink = to.copy_in::<_, bytes::Bytes>(into).await.expect(into);
        futures_util::pin_mut!(sink);
        for chunk in chunks {
            sink.send(chunk).await.expect(into);
        }
        sink.finish().await.expect(into);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_a_region_present_in_two_clusters_once() {
    // Scans of 10 rows or more are grouped on the bulk engine.
    let m = moving_with("200ms", &["--stats-engine-rows", "10"]).await;
    let mut events = Vec::new();
    for _ in 0..12 {
        events.push(created_in(Uuid::new_v4(), "KA", Some("urban")));
    }
    for _ in 0..10 {
        events.push(created_in(Uuid::new_v4(), "AP", Some("urban")));
    }
    m.api.send(Value::Array(events));
    // KA being copied into home: its rows are in both clusters.
    copy_region(&m.south_db, &m.home_db).await;
    Moving::set_state(&m.home_db, "KA", "incoming", Some("south")).await;
    let ka_rows: i64 = m
        .home_db
        .query_one(
            "SELECT count(*) FROM umstore.user_metadata WHERE region = 'KA'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(ka_rows, 12, "the copy");
    let check = |source: &str| {
        let a = m.api.get(
            Purpose::Analytics,
            "/api/v1/user-metadata/stats?group_by=region",
        );
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.header("x-stats-source"), Some(source), "{}", a.body);
        let body = a.json();
        let users: Vec<(String, i64)> = body["groups"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|g| {
                (
                    g["group"]["region"].as_str().unwrap_or("?").to_owned(),
                    g["users"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        assert_eq!(
            users,
            [("AP".to_owned(), 10), ("KA".to_owned(), 12)],
            "{}",
            a.body
        );
        let a = m.api.get(
            Purpose::Analytics,
            "/api/v1/user-metadata/stats?group_by=area_type",
        );
        assert_eq!(a.json()["groups"][0]["users"], 22, "{}", a.body);
    };
    // Not analyzed yet, the planner knows no rows: the databases group.
    check("live");
    // Analyzed: each cluster's regions hold 10 or more rows by the estimate
    // (home AP's 10, its copy of KA not counted; south KA's 12), so each
    // cluster's rows are grouped on the engine, still counting KA once.
    for db in [&m.home_db, &m.south_db] {
        db.batch_execute("ANALYZE umstore.user_metadata")
            .await
            .expect("analyze");
    }
    check("engine");
    let users = |m: &Moving| {
        let a = m.api.get(
            Purpose::Admin,
            "/api/v1/user-metadata/query?gender=female&limit=500",
        );
        assert_eq!(a.status, 200, "{}", a.body);
        a.json()["users"].as_array().map(Vec::len)
    };
    assert_eq!(users(&m), Some(22), "users by attribute list KA once");
    let out = m
        .api
        .cli(&["stats", "refresh", "--database-url", &m.api.writer]);
    assert!(out.status.success(), "{}", stderr(&out));
    check("view");

    // The switch: KA is read from home's copy now, still once.
    m.place("KA", "home", 2).await;
    Moving::set_state(&m.home_db, "KA", "open", None).await;
    Moving::set_state(&m.south_db, "KA", "moved", Some("home")).await;
    m.wait_for_epoch(2.0).await;
    check("view");
    assert_eq!(users(&m), Some(22));
    let out = m
        .api
        .cli(&["stats", "refresh", "--database-url", &m.api.writer]);
    assert!(out.status.success(), "{}", stderr(&out));
    check("view");
}
