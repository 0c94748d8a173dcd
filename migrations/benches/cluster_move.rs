//! Moving a region from one cluster to another (tier 4,
//! `umstore_migrations::moves`): two PostgreSQL 15 servers of the harness on
//! loopback play the home cluster and "south"; `--users` users in KA (a
//! directory row, a metadata row, a data key and a history row each) and
//! 10,000 in TN are seeded in home.
//!
//! * baseline: one writer (one connection, as the writer login), in a closed
//!   loop for `--seconds`, alternating a new KA user (directory and metadata
//!   rows) and an update of a seeded one (its metadata row and a history row),
//!   each transaction calling `umstore.region_write` first, as the data plane
//!   of a store with several clusters does: per-write latency P50/P95/P99;
//! * the same writer while KA moves to south (copy, catch-up, fence, switch,
//!   clean-up after a 2 s grace): the move's total time and fence, and the
//!   writer's latency meanwhile, a fenced write counted until it is
//!   acknowledged (retried every 5 ms, redirected to south after the switch).
//!
//! ```sh
//! cargo bench -p umstore-migrations --bench cluster_move -- --users 1000000 --seconds 20
//! cargo bench -p umstore-migrations --bench cluster_move -- --users 100000   # smaller
//! ```
//!
//! At the end it checks that south holds every seeded and every acknowledged
//! user of KA, with each acknowledged update, and home none. Prints a markdown
//! table.

#[path = "../tests/support/moving.rs"]
mod moving;
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{connect, ms, stats, Sample};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use umstore_e2e::Postgres;
use umstore_migrations::moves::{self, Clusters, MoveOptions};
use umstore_migrations::roles::Purpose;
use umstore_migrations::Runner;

/// A server with the store's database migrated and the writer login.
async fn cluster() -> (Postgres, String) {
    let pg = Postgres::start_with_replicas(0).expect("PostgreSQL 15 (the e2e harness)");
    let admin = pg.connect("postgres").await.expect("connect");
    admin
        .batch_execute("CREATE DATABASE umstore")
        .await
        .expect("create database");
    let url = pg.tcp_conninfo("umstore");
    let mut client = connect(&url).await;
    Runner::default().up(&mut client).await.expect("migrate");
    moving::login_role(&client, Purpose::Writer).await;
    (pg, url)
}

async fn seed(client: &Client, region: &str, users: i64) {
    moving::seed(client, region, users).await;
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .expect("vacuum");
}

/// What a writer did.
#[derive(Default)]
struct Written {
    samples: Vec<Sample>,
    created: Vec<String>,
    updated: BTreeMap<String, i64>,
    fenced: u64,
}

/// Which of the two clusters home's placement gives KA: 0 home, 1 south.
async fn placed(home: &Client) -> usize {
    let c: String = home
        .query_one(
            "SELECT cluster FROM umstore.region_placement WHERE region = 'KA'",
            &[],
        )
        .await
        .expect("placement")
        .get(0);
    usize::from(c != "home")
}

/// Writes until `stop`, where home's placement says KA is.
async fn writer(
    urls: [String; 2],
    home_url: String,
    seeded: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
) -> Written {
    let login = Purpose::Writer.login().expect("login");
    let home = connect(&home_url).await;
    let mut clients = Vec::new();
    for url in &urls {
        clients.push(connect(&format!("{url} user={login}")).await);
    }
    let mut at = placed(&home).await;
    let mut w = Written::default();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let existing = i
            .is_multiple_of(2)
            .then(|| seeded[(i * 7919) % seeded.len()].as_str());
        let started = Instant::now();
        loop {
            match moving::write_once(&mut clients[at], existing).await {
                Ok((id, version)) => {
                    match existing {
                        Some(_) => {
                            w.updated.insert(id, version);
                        }
                        None => w.created.push(id),
                    }
                    w.samples.push((started, started.elapsed(), true));
                    break;
                }
                Err(e) if e.code().map(SqlState::code) == Some("UMF01") => {
                    w.fenced += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) if e.code().map(SqlState::code) == Some("UMM01") => {
                    at = placed(&home).await;
                }
                Err(e) => panic!("a write failed: {e}"),
            }
        }
    }
    w
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

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let [users, seconds] = support::numbers(["--users", "--seconds"], [1_000_000, 20]);
    let users = i64::try_from(users).expect("--users fits i64");
    let (_home_pg, home_url) = cluster().await;
    let (_south_pg, south_url) = cluster().await;
    let home = connect(&home_url).await;
    let t = Instant::now();
    seed(&home, "KA", users).await;
    seed(&home, "TN", 10_000).await;
    eprintln!(
        "seeded {users} users in KA in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    moves::seed_placement(
        &home,
        &[("KA".into(), "home".into()), ("TN".into(), "home".into())],
    )
    .await
    .expect("placement");
    let seeded: Arc<Vec<String>> = Arc::new(
        home.query(
            "SELECT user_id::text FROM umstore.user_directory WHERE region = 'KA' LIMIT 100000",
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect(),
    );
    let urls = [home_url.clone(), south_url.clone()];

    // Baseline: no move.
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(writer(
        urls.clone(),
        home_url.clone(),
        seeded.clone(),
        stop.clone(),
    ));
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let to = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let base = task.await.expect("writer");
    let baseline = stats(&base.samples, from, to);

    // The move, with the writer going on.
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(writer(
        urls.clone(),
        home_url.clone(),
        seeded.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let move_from = Instant::now();
    // When each phase begins, as the journal shows it (polled every 50 ms).
    let phases = {
        let url = home_url.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let home = connect(&url).await;
            let mut seen: Vec<(String, Duration)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(row)) = home
                    .query_opt(
                        "SELECT phase FROM umstore.region_moves ORDER BY id DESC LIMIT 1",
                        &[],
                    )
                    .await
                {
                    let phase: String = row.get(0);
                    if seen.last().map(|(p, _)| p) != Some(&phase) {
                        seen.push((phase, move_from.elapsed()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        })
    };
    let mut source = connect(&home_url).await;
    let mut target = connect(&south_url).await;
    let report = moves::move_region(
        Clusters {
            home: &home,
            source: &mut source,
            target: &mut target,
        },
        "KA",
        "home",
        "south",
        &MoveOptions {
            grace: Duration::from_secs(2),
            ..MoveOptions::default()
        },
    )
    .await
    .expect("the move");
    let move_to = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let during = task.await.expect("writer");
    let phases = phases.await.expect("phases");
    let moving = stats(&during.samples, move_from, move_to);

    // Nothing lost, nothing left behind.
    let south = connect(&south_url).await;
    let created = (base.created.len() + during.created.len()) as i64;
    assert_eq!(count(&south, "user_metadata").await, users + created);
    assert_eq!(count(&south, "user_directory").await, users + created);
    assert_eq!(count(&home, "user_metadata").await, 0);
    for (id, version) in &during.updated {
        let got: i64 = south
            .query_one(
                "SELECT version FROM umstore.user_metadata WHERE region = 'KA' AND user_id = $1::text::uuid",
                &[id],
            )
            .await
            .expect("updated user")
            .get(0);
        assert!(got >= *version, "user {id}: {got} < acknowledged {version}");
    }

    let fence = report.fence_ms.unwrap_or_default();
    println!(
        "KA: {users} users ({} rows) moved home → south in {:.1} s; {} users caught up in {} \
         rounds; fence {fence:.1} ms; {} writes fenced and retried; checked: none lost\n",
        report.rows_copied,
        report.took.as_secs_f64(),
        report.users_caught_up,
        report.catch_up_rounds,
        during.fenced
    );
    println!(
        "phases began at (s): {}\n",
        phases
            .iter()
            .map(|(p, at)| format!("{p} {:.1}", at.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("| writer | took | writes | errors | P50 ms | P95 ms | P99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, took, s) in [
        ("no move (baseline)", to - from, &baseline),
        ("while KA moves", move_to - move_from, &moving),
    ] {
        println!(
            "| {name} | {:.1} s | {} | {} | {} | {} | {} | {} |",
            took.as_secs_f64(),
            s.count,
            s.errors,
            ms(s.p50),
            ms(s.p95),
            ms(s.p99),
            ms(s.max)
        );
    }
    println!(
        "\nP50 {:.2}×, P95 {:.2}×, P99 {:.2}× the baseline",
        moving.p50.as_secs_f64() / baseline.p50.as_secs_f64().max(1e-9),
        moving.p95.as_secs_f64() / baseline.p95.as_secs_f64().max(1e-9),
        moving.p99.as_secs_f64() / baseline.p99.as_secs_f64().max(1e-9)
    );
}
