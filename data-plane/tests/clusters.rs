//! A store of two clusters (`--clusters` / `UMSTORE_CLUSTERS`): two PostgreSQL
//! servers of the harness, each migrated as one cluster, home (AP, TS) and
//! south (KA, KL); one `serve` process over both, every purpose logging in as
//! its own user with the same password on both servers. Writes land in their
//! region's cluster only; one-user reads find the user through home's routes
//! (or, for a user without one, every cluster's directory, then write the
//! route back); stats merge both clusters with small groups suppressed by
//! their totals; erasure reaches the user's cluster; bad layouts stop the
//! process with a message that says what to fix.

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
