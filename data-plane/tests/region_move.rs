//! A region moved between two clusters while the data plane serves it: two
//! PostgreSQL servers of the harness as home (AP, KA) and south (KL), one
//! `serve` process over both (placement read every 200 ms), a writer posting
//! KA's events over HTTP and a reader reading KA's users, both for the whole
//! test. The mover is the real `umstore-data-plane regions move` process, as
//! the administrator login, killed (SIGKILL) once at a random point and once
//! after each phase, then run again: KA goes home → south → home → south →
//! home → south. Every write acknowledged is there exactly once, every read
//! finds its user, and home keeps nothing of KA.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{Duration as Span, Utc};
use serde_json::{json, Value};
use support::ingest::{created, envelope};
use support::{connect, free_port, get_as, http_post, wait_for, Served, Store, BIN};
use tokio_postgres::Client;
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

fn layout(home: &Store, south: &Store) -> String {
    json!([
        {"name": "home", "regions": ["AP", "KA"],
         "primary": {"host": "127.0.0.1", "port": home.port(), "dbname": home.name}},
        {"name": "south", "regions": ["KL"],
         "primary": {"host": "127.0.0.1", "port": south.port(), "dbname": south.name}},
    ])
    .to_string()
}

/// The API: its port and tokens.
#[derive(Clone)]
struct Api {
    port: u16,
    writer: String,
    reader: String,
}

impl Api {
    fn post(&self, events: &Value) -> (u16, String) {
        http_post(
            self.port,
            "/api/v1/events",
            Some(&self.writer),
            &events.to_string(),
        )
    }
}

fn token(dir: &std::path::Path, purpose: Purpose) -> String {
    let path = dir.join("api-tokens").join(purpose.slug());
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// What the writer had acknowledged.
#[derive(Default)]
struct Written {
    created: Vec<Uuid>,
    /// (user, acknowledged updates).
    updates: Vec<(Uuid, i64)>,
    refused: Vec<String>,
}

/// Posts a new KA user, then an update of one of the users so far, in a loop.
fn writer(api: Api, seeded: Vec<Uuid>, stop: Arc<AtomicBool>) -> Written {
    let mut w = Written::default();
    let mut updates: Vec<i64> = vec![0; seeded.len()];
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let (event, which) = if i % 2 == 1 {
            let user = Uuid::new_v4();
            (created(user, Utc::now() - Span::seconds(1)), None)
        } else {
            let k = (i * 31) % seeded.len();
            let event = envelope(
                "METADATA_UPDATED",
                seeded[k],
                Utc::now(),
                json!({"district": format!("d{i}")}),
            );
            (event, Some(k))
        };
        let (status, body) = api.post(&json!([event]));
        let applied = status == 200
            && serde_json::from_str::<Value>(&body)
                .ok()
                .is_some_and(|a| a["results"][0]["status"] == "applied");
        if !applied {
            w.refused.push(format!("{status} {body}"));
            continue;
        }
        match which {
            None => w.created.push(
                event["user_id"]
                    .as_str()
                    .and_then(|u| u.parse().ok())
                    .expect("user id"),
            ),
            Some(k) => updates[k] += 1,
        }
    }
    w.updates = seeded.into_iter().zip(updates).collect();
    w
}

/// Reads seeded users in a loop; returns the reads and the failures.
fn reader(api: Api, seeded: Vec<Uuid>, stop: Arc<AtomicBool>) -> (u64, Vec<String>) {
    let (mut reads, mut failures) = (0u64, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        let user = seeded[(reads as usize * 7) % seeded.len()];
        let a = get_as(
            api.port,
            &format!("/api/v1/user-metadata/{user}"),
            Some(&api.reader),
        );
        if a.status != 200 {
            failures.push(format!("{user}: {} {}", a.status, a.body));
        }
        reads += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    (reads, failures)
}

/// The mover, as its own process.
struct Mover {
    child: Child,
    lines: mpsc::Receiver<String>,
    output: Arc<Mutex<Vec<String>>>,
}

impl Mover {
    fn start(clusters: &str, admin: &str, to: &str, hold_after: Option<&str>) -> Self {
        let mut args = vec![
            "regions", "move", "--region", "KA", "--to", to, "--grace", "1s",
        ];
        if let Some(p) = hold_after {
            args.extend(["--hold-after", p]);
        }
        let mut child = Command::new(BIN)
            .args(&args)
            .env("UMSTORE_CLUSTERS", clusters)
            .env("UMSTORE_DATABASE_URL", admin)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the mover");
        let (tx, lines) = mpsc::channel();
        let output = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (tx, output) = (tx.clone(), output.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    output.lock().expect("output").push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Self {
            child,
            lines,
            output,
        }
    }

    fn output(&self) -> String {
        self.output.lock().expect("output").join("\n")
    }

    /// Waits for a line containing `text`, or the process to end.
    fn wait_for_line(&mut self, text: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.contains(text) => return true,
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(_)) = self.child.try_wait() {
                        return false;
                    }
                }
            }
        }
        false
    }

    /// SIGKILL: nothing of the mover runs after this.
    fn kill(mut self) {
        self.child.kill().expect("kill the mover");
        self.child.wait().expect("reap the mover");
    }

    /// Waits for it to finish; its output.
    fn finish(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the pipe readers drain.
                std::thread::sleep(Duration::from_millis(100));
                assert!(status.success(), "the mover failed:\n{}", self.output());
                return self.output();
            }
            assert!(
                Instant::now() < deadline,
                "the mover did not finish:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn placed(home: &Client) -> (String, i64) {
    let row = home
        .query_one(
            "SELECT cluster, epoch FROM umstore.region_placement WHERE region = 'KA'",
            &[],
        )
        .await
        .expect("placement");
    (row.get(0), row.get(1))
}

async fn count(client: &Client, table: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM umstore.{table} WHERE region = 'KA'"),
            &[],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_moves_back_and_forth_under_load_with_the_mover_killed_at_each_phase() {
    let home = Store::migrated().await;
    let pg =
        umstore_e2e::Postgres::start_with_replicas(0).expect("PostgreSQL 15 (a second server)");
    let south = Store::migrated_on(&pg).await;
    let nats = umstore_e2e::Nats::start().expect("nats-server (apt-get install nats-server)");
    let admin = home.admin_url().await;
    south.admin_url().await;
    let clusters = layout(&home, &south);

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let data_dir = dir.path().display().to_string();
    let writer_url = home.url(Purpose::Writer);
    let ai_url = home.url(Purpose::Ai);
    let nats_url = nats.url();
    let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
    let served = Served::start_logging_env(
        &[
            "serve",
            "--no-migrate",
            "--listen",
            &listen,
            "--database-url",
            &writer_url,
            "--ai-database-url",
            &ai_url,
            "--data-dir",
            &data_dir,
            "--admin-database-url",
            &admin,
            "--nats-url",
            &nats_url,
            "--placement-refresh",
            "200ms",
        ],
        log,
        &[
            ("UMSTORE_CLUSTERS", clusters.as_str()),
            ("UMSTORE_REGIONS", "AP,KA,KL"),
        ],
    );
    let serve_log = || std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
    let ready = wait_for(port, "/readyz", Duration::from_secs(60), |s, _| s == 200);
    assert!(
        matches!(ready, Some((200, _))),
        "not ready: {ready:?}\n{}",
        serve_log()
    );
    let api = Api {
        port,
        writer: token(dir.path(), Purpose::Writer),
        reader: token(dir.path(), Purpose::Ai),
    };

    // 1,000 KA users, at home.
    let seeded: Vec<Uuid> = (0..1_000).map(|_| Uuid::new_v4()).collect();
    for chunk in seeded.chunks(250) {
        let events: Vec<Value> = chunk
            .iter()
            .map(|u| created(*u, Utc::now() - Span::minutes(10)))
            .collect();
        let (status, body) = api.post(&json!(events));
        assert_eq!(status, 200, "{body}\n{}", serve_log());
        assert!(!body.contains("rejected"), "{body}");
    }
    let home_db = connect(home.superuser()).await;
    let south_db = connect(south.superuser()).await;
    assert_eq!(count(&home_db, "user_metadata").await, 1_000);

    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (api, seeded, stop) = (api.clone(), seeded.clone(), stop.clone());
        std::thread::spawn(move || writer(api, seeded, stop))
    };
    let r = {
        let (api, seeded, stop) = (api.clone(), seeded.clone(), stop.clone());
        std::thread::spawn(move || reader(api, seeded, stop))
    };
    std::thread::sleep(Duration::from_millis(500));

    // 1. home → south: killed at a random point (150 ms in), then run again.
    let m = Mover::start(&clusters, &admin, "south", None);
    std::thread::sleep(Duration::from_millis(150));
    m.kill();
    let out = Mover::start(&clusters, &admin, "south", None).finish();
    assert!(out.contains("moved region KA from home to south"), "{out}");
    assert_eq!(placed(&home_db).await.0, "south");
    // 2–5: killed after each phase, then resumed; the region goes back and forth.
    let mut to = "home";
    for phase in ["copying", "catching_up", "fenced", "switched"] {
        let from = if to == "home" { "south" } else { "home" };
        let mut m = Mover::start(&clusters, &admin, to, Some(phase));
        let held = m.wait_for_line(
            &format!("holding after phase {phase}"),
            Duration::from_secs(120),
        );
        assert!(
            held,
            "the mover did not hold after {phase}:\n{}",
            m.output()
        );
        m.kill();
        // Killed here, the region is served by exactly one cluster: the old one
        // until the switch, the new one from it.
        let (cluster, _) = placed(&home_db).await;
        let expected = if phase == "switched" { to } else { from };
        assert_eq!(cluster, expected, "KA after a mover killed after {phase}");
        std::thread::sleep(Duration::from_millis(300));
        let out = Mover::start(&clusters, &admin, to, None).finish();
        assert!(
            out.contains(&format!("moved region KA from {from} to {to}"))
                && out.contains("resumed"),
            "after {phase}: {out}"
        );
        to = from;
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let written = w.join().expect("writer");
    let (reads, failures) = r.join().expect("reader");
    let log = served.stop().1;

    let (cluster, epoch) = placed(&home_db).await;
    assert_eq!((cluster.as_str(), epoch), ("south", 6), "five moves");
    println!(
        "{} users created and {} updates acknowledged, {} refused; {reads} reads",
        written.created.len(),
        written.updates.iter().map(|(_, n)| n).sum::<i64>(),
        written.refused.len()
    );
    assert!(
        written.refused.is_empty(),
        "writes refused: {:?}\n{log}",
        &written.refused[..written.refused.len().min(5)]
    );
    assert!(
        failures.is_empty(),
        "reads failed: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(
        reads > 50 && written.created.len() > 20,
        "too little traffic to mean anything"
    );

    // Every acknowledged write is in south exactly once; home keeps no KA row.
    let total = 1_000 + written.created.len() as i64;
    assert_eq!(count(&south_db, "user_metadata").await, total);
    assert_eq!(count(&south_db, "user_directory").await, total);
    for table in [
        "user_metadata",
        "user_directory",
        "user_metadata_history",
        "user_data_keys",
        "processed_events",
    ] {
        assert_eq!(count(&home_db, table).await, 0, "{table} left at home");
    }
    let ids: Vec<Uuid> = written.created.clone();
    let found: i64 = south_db
        .query_one(
            "SELECT count(*) FROM umstore.user_metadata WHERE region = 'KA' AND user_id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("created")
        .get(0);
    assert_eq!(found, written.created.len() as i64);
    for (user, n) in &written.updates {
        let version: i64 = south_db
            .query_one(
                "SELECT version FROM umstore.user_metadata WHERE region = 'KA' AND user_id = $1",
                &[user],
            )
            .await
            .expect("seeded user")
            .get(0);
        assert_eq!(version, 1 + n, "user {user}: {n} updates acknowledged");
    }
    // Each event recorded once.
    let events: i64 = south_db
        .query_one(
            "SELECT count(*) - count(DISTINCT event_id) FROM umstore.processed_events WHERE region = 'KA'",
            &[],
        )
        .await
        .expect("events")
        .get(0);
    assert_eq!(events, 0);
    let status = Command::new(BIN)
        .args(["regions", "status"])
        .env("UMSTORE_CLUSTERS", &clusters)
        .env("UMSTORE_DATABASE_URL", &admin)
        .output()
        .expect("regions status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("KA → south"), "{text}");
    assert_eq!(text.matches(", done").count(), 5, "{text}");
    assert_eq!(text.matches("finished").count(), 5, "{text}");
}
