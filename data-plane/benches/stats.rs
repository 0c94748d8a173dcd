//! Stats over a seeded store: `GET /api/v1/user-metadata/stats` answered from
//! the materialized views (`--stats-max-age 1h`) vs the same request answered
//! by the live GROUP BY on the tables (`--stats-max-age 0`), side by side on
//! one store, one request at a time, as the analytics login. Reports P50/P95
//! per request of each and the ratio, the refresh's duration and the view's
//! rows, as BENCHMARKS.md shows them.
//!
//! ```sh
//! cargo bench -p umstore-data-plane --bench stats -- --users 1000000 --view-requests 200 --live-requests 10
//! ```
//!
//! Everything runs on this machine: the harness's PostgreSQL primary, two
//! `serve` processes (release build) on the same store.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use support::{cli, get_as, stderr, stdout, wait_for, Served, Store};
use umstore_migrations::roles::Purpose;

struct Args {
    users: u64,
    view_requests: usize,
    live_requests: usize,
}

fn args() -> Args {
    let mut a = Args {
        users: 1_000_000,
        view_requests: 200,
        live_requests: 10,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = |i: usize| -> u64 {
            argv.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} takes a number", argv[i]))
        };
        match argv[i].as_str() {
            "--users" => a.users = value(i),
            "--view-requests" => a.view_requests = value(i) as usize,
            "--live-requests" => a.live_requests = value(i) as usize,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// The requests measured: the dashboard's usual ones.
const QUERIES: [&str; 5] = [
    "group_by=region,income_bracket",
    "group_by=gender,life_stage&region=UP",
    "group_by=age_group,bpl_status",
    "group_by=area_type,social_category,employment_category&income_bracket=BPL",
    "",
];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `serve` on the store with the seed's key file (and, made by the first,
/// the API tokens) in `dir/seed`; its log in `dir/<name>.log`.
fn start(store: &Store, dir: &std::path::Path, name: &str, max_age: &str) -> (Served, u16) {
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let writer = store.url(Purpose::Writer);
    let analytics = store.url(Purpose::Analytics);
    let data_dir = dir.join("seed").display().to_string();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    let served = Served::start_logging(
        &[
            "serve",
            "--no-migrate",
            "--listen",
            &listen,
            "--database-url",
            &writer,
            "--analytics-database-url",
            &analytics,
            "--data-dir",
            &data_dir,
            "--stats-max-age",
            max_age,
        ],
        log,
    );
    let ready = wait_for(port, "/readyz", Duration::from_secs(120), |s, _| s == 200);
    assert!(
        matches!(ready, Some((200, _))),
        "{name} not ready: {ready:?}"
    );
    (served, port)
}

/// `n` sequential requests of `query`: (P50 ms, P95 ms), checking the source.
fn measure(port: u16, token: &str, query: &str, n: usize, source: &str) -> (f64, f64) {
    let path = format!("/api/v1/user-metadata/stats?{query}");
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let answer = get_as(port, &path, Some(token));
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        assert_eq!(answer.header("x-stats-source"), Some(source), "{path}");
    }
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 50.0), percentile(&ms, 95.0))
}

async fn bench(args: Args) {
    let store = Store::migrated().await;
    let su = support::connect(store.superuser()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("seed").display().to_string();
    let users = args.users.to_string();
    let t = Instant::now();
    let seeded = cli(&[
        "seed",
        "--users",
        &users,
        "--seed",
        "1",
        "--database-url",
        store.superuser(),
        "--data-dir",
        &data_dir,
    ]);
    assert!(seeded.status.success(), "{}", stderr(&seeded));
    println!(
        "seeded {} users in {:.0} s: {}",
        args.users,
        t.elapsed().as_secs_f64(),
        stdout(&seeded).trim().replace('\n', "; ")
    );
    // seed writes no risk scores; the AI core would: one per user, so the
    // live GROUP BY joins a full table as in production.
    let t = Instant::now();
    su.batch_execute(
        "INSERT INTO umstore.user_risk_scores (user_id, region, financial_risk, deadline_risk,
             benefit_loss_risk, overall_risk, model_version, computed_at)
         SELECT user_id, region, r, r, r, r, 'bench/1', now()
         FROM (SELECT user_id, region, round(random()::numeric, 2) AS r
               FROM umstore.user_metadata) s",
    )
    .await
    .expect("risk scores");
    su.batch_execute(
        "VACUUM ANALYZE umstore.user_metadata, umstore.user_derived_attributes,
             umstore.user_risk_scores",
    )
    .await
    .expect("vacuum analyze");
    println!(
        "risk scores for every user, vacuum analyze: {:.0} s",
        t.elapsed().as_secs_f64()
    );
    // The refresh as the writer (what the scheduler and the CronJob run),
    // twice: the first after the load, then one with nothing changed.
    for _ in 0..2 {
        let t = Instant::now();
        let refreshed = cli(&[
            "stats",
            "refresh",
            "--database-url",
            &store.url(Purpose::Writer),
        ]);
        assert!(refreshed.status.success(), "{}", stderr(&refreshed));
        println!(
            "{} (wall {:.1} s)",
            stdout(&refreshed).trim(),
            t.elapsed().as_secs_f64()
        );
    }
    let size: String = su
        .query_one(
            "SELECT pg_size_pretty(pg_total_relation_size('umstore.stats_groups_mv'))",
            &[],
        )
        .await
        .expect("size")
        .get(0);
    println!("stats_groups_mv: {size} with its index");

    let (view, view_port) = start(&store, dir.path(), "view", "1h");
    let (live, live_port) = start(&store, dir.path(), "live", "0");
    let token = std::fs::read_to_string(dir.path().join("seed/api-tokens/analytics"))
        .expect("analytics token")
        .trim()
        .to_owned();
    let (view_token, live_token) = (&token, &token);
    println!(
        "\n| request | view P50 ms | view P95 ms | live P50 ms | live P95 ms | live / view (P50) |"
    );
    println!("|---|---|---|---|---|---|");
    for q in QUERIES {
        // One warm-up each.
        measure(view_port, view_token, q, 1, "view");
        measure(live_port, live_token, q, 1, "live");
        let (v50, v95) = measure(view_port, view_token, q, args.view_requests, "view");
        let (l50, l95) = measure(live_port, live_token, q, args.live_requests, "live");
        let shown = if q.is_empty() { "(none)" } else { q };
        println!(
            "| `{shown}` | {v50:.2} | {v95:.2} | {l50:.1} | {l95:.1} | {:.0}× |",
            l50 / v50
        );
    }
    view.stop();
    live.stop();
}

fn main() {
    let args = args();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(bench(args));
}
