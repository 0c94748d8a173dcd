//! One-user reads of a store of two clusters: `GET /api/v1/user-metadata/{id}`
//! as the AI core (PII decrypted), `--clients` concurrent connections from
//! `wrk` over `--hot` users, three ways side by side: one cluster (no
//! `--clusters`: the directory read in the user's database, as before tier 4),
//! two clusters with the route cache warm (the default), and two clusters with
//! the route cache off (`--route-cache-entries 0`: every read first reads the
//! route in home's `user_routes`). Reports requests per second, P50/P95/P99.
//!
//! ```sh
//! bash scripts/install-deps.sh --bench   # wrk
//! cargo bench -p umstore-data-plane --bench clusters -- --users 20000 --hot 2000 --seconds 5 --clients 16
//! ```
//!
//! The two clusters are two databases on the harness's PostgreSQL (home holds
//! AP, south the other 35 regions and every seeded user); `serve` (release
//! build) and wrk share this machine's cores with it, on loopback. The hot
//! users have no route before the first read: the warm-up finds each in
//! south's directory (the fallback) and writes its route back.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{cli, get_as, http_get, stderr, wait_for, Served, Store};
use umstore_migrations::regions::REGIONS;
use umstore_migrations::roles::Purpose;

struct Args {
    users: usize,
    hot: usize,
    seconds: u64,
    clients: usize,
}

fn args() -> Args {
    let mut a = Args {
        users: 20_000,
        hot: 2_000,
        seconds: 5,
        clients: 16,
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
            "--users" => a.users = value(i) as usize,
            "--hot" => a.hot = value(i) as usize,
            "--seconds" => a.seconds = value(i),
            "--clients" => a.clients = value(i) as usize,
            // cargo bench passes --bench.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

struct Run {
    per_second: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
}

const WRK_SCRIPT: &str = r#"
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS")) do ids[#ids + 1] = line end
local token = os.getenv("BENCH_TOKEN")
local counter = 0
setup = function(thread)
  counter = counter + 1
  thread:set("seed", counter)
end
init = function(args)
  math.randomseed(os.time() * 1000 + seed)
end
request = function()
  local id = ids[math.random(#ids)]
  return wrk.format("GET", "/api/v1/user-metadata/" .. id, { ["Authorization"] = "Bearer " .. token })
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d\n",
    summary.requests, summary.duration, summary.errors.status + summary.errors.connect
      + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"#;

fn wrk(port: u16, dir: &Path, token: &str, clients: usize, seconds: u64) -> Run {
    let script = dir.join("get-user.lua");
    std::fs::write(&script, WRK_SCRIPT).expect("write the wrk script");
    let out = Command::new("wrk")
        .args(["-t", &clients.min(2).to_string()])
        .args(["-c", &clients.to_string()])
        .args(["-d", &format!("{seconds}s"), "--timeout", "5s"])
        .args(["-s", &script.display().to_string()])
        .arg(format!("http://127.0.0.1:{port}"))
        .env("BENCH_IDS", dir.join("ids.txt"))
        .env("BENCH_TOKEN", token)
        .output()
        .expect("wrk (bash scripts/install-deps.sh --bench, or apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("wrk printed no result:\n{text}"));
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(v[2], 0, "wrk saw errors or non-2xx answers:\n{text}");
    Run {
        per_second: v[0] as f64 / (v[1] as f64 / 1e6),
        p50_ms: v[3] as f64 / 1000.0,
        p95_ms: v[4] as f64 / 1000.0,
        p99_ms: v[5] as f64 / 1000.0,
    }
}

fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = http_get(port, "/metrics").expect("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// One `serve`: over `south` alone (`layout` None), or over both clusters
/// with `route_cache` routes cached; warmed, then measured.
fn measure(
    home: &Store,
    south: &Store,
    dir: &Path,
    args: &Args,
    layout: Option<&str>,
    route_cache: u64,
) -> Run {
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    // With the layout, home's URLs (moved onto south by it); else south's.
    let base = if layout.is_some() { home } else { south };
    let writer = base.url(Purpose::Writer);
    let ai = base.url(Purpose::Ai);
    let data_dir = dir.display().to_string();
    let pool = args.clients.to_string();
    let routes = route_cache.to_string();
    let argv = vec![
        "serve",
        "--no-migrate",
        "--listen",
        &listen,
        "--database-url",
        &writer,
        "--ai-database-url",
        &ai,
        "--read-pool-size",
        &pool,
        "--data-dir",
        &data_dir,
        "--route-cache-entries",
        &routes,
    ];
    let log = std::fs::File::create(dir.join(format!(
        "serve-{}-{route_cache}.log",
        layout.map_or("one", |_| "two")
    )))
    .expect("log");
    let env: Vec<(&str, &str)> = layout
        .map(|l| vec![("UMSTORE_CLUSTERS", l)])
        .unwrap_or_default();
    let served = Served::start_logging_env(&argv, log, &env);
    let ready = wait_for(port, "/readyz", Duration::from_secs(120), |s, _| s == 200);
    assert!(
        matches!(ready, Some((200, _))),
        "serve not ready: {ready:?}"
    );
    let token = std::fs::read_to_string(dir.join("api-tokens").join("ai"))
        .expect("ai token")
        .trim()
        .to_owned();
    let ids = std::fs::read_to_string(dir.join("ids.txt")).expect("ids");
    // Warm: every hot user read once (routes found, or backfilled, and
    // cached; data keys cached), then connections and plans.
    let started = Instant::now();
    for id in ids.lines() {
        let answer = get_as(port, &format!("/api/v1/user-metadata/{id}"), Some(&token));
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.json()["pii_included"], true, "PII decrypted");
        if layout.is_some() {
            assert_eq!(answer.header("x-cluster"), Some("south"));
        }
    }
    eprintln!(
        "warm-up: {} users in {:.0?} (route fallbacks so far: {})",
        ids.lines().count(),
        started.elapsed(),
        metric(port, r#"umstore_route_fallbacks_total{result="hit"}"#)
    );
    wrk(port, dir, &token, args.clients, 2);
    let run = wrk(port, dir, &token, args.clients, args.seconds);
    if layout.is_some() {
        eprintln!(
            "route lookups: {} hits, {} misses; fallbacks {}",
            metric(port, r#"umstore_route_cache_lookups_total{result="hit"}"#),
            metric(port, r#"umstore_route_cache_lookups_total{result="miss"}"#),
            metric(port, r#"umstore_route_fallbacks_total{result="hit"}"#),
        );
    }
    served.stop();
    run
}

async fn bench(args: Args) {
    let home = Store::migrated().await;
    let south = Store::migrated().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().display().to_string();
    let started = Instant::now();
    let seeded = cli(&[
        "seed",
        "--users",
        &args.users.to_string(),
        "--seed",
        "1",
        "--database-url",
        south.superuser(),
        "--data-dir",
        &data_dir,
    ]);
    assert!(seeded.status.success(), "{}", stderr(&seeded));
    eprintln!("seeded {} users in {:.0?}", args.users, started.elapsed());
    let admin = support::connect(south.superuser()).await;
    admin
        .batch_execute("VACUUM (ANALYZE)")
        .await
        .expect("vacuum");
    let hot: Vec<String> = admin
        .query(
            "SELECT user_id::text FROM umstore.user_directory WHERE region <> 'AP'
             ORDER BY user_id LIMIT $1",
            &[&(args.hot as i64)],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    std::fs::write(dir.path().join("ids.txt"), hot.join("\n") + "\n").expect("ids file");
    // The same logins on both "clusters" (one server): only the database differs.
    let south_regions: Vec<&str> = REGIONS
        .iter()
        .map(|r| r.code)
        .filter(|c| *c != "AP")
        .collect();
    let layout = serde_json::json!([
        {"name": "home", "regions": ["AP"],
         "primary": {"host": "127.0.0.1", "port": home.port(), "dbname": home.name}},
        {"name": "south", "regions": south_regions,
         "primary": {"host": "127.0.0.1", "port": south.port(), "dbname": south.name}},
    ])
    .to_string();

    let mut rows = Vec::new();
    for (name, layout, cache) in [
        ("one cluster (directory in the user's database)", None, 0),
        (
            "two clusters, route cache warm",
            Some(layout.as_str()),
            1_000_000,
        ),
        (
            "two clusters, route cache off (home read each time)",
            Some(layout.as_str()),
            0,
        ),
    ] {
        let run = measure(&home, &south, dir.path(), &args, layout, cache);
        eprintln!(
            "{name}: {:.0}/s P50 {:.2} ms P95 {:.2} ms",
            run.per_second, run.p50_ms, run.p95_ms
        );
        rows.push((name, run));
    }
    println!(
        "\nGET one user (PII decrypted, primary), {} clients, {} s each, {} hot users of {}:\n",
        args.clients, args.seconds, args.hot, args.users
    );
    println!("| run | requests/s | P50 ms | P95 ms | P99 ms |");
    println!("|---|---:|---:|---:|---:|");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} |",
            r.per_second, r.p50_ms, r.p95_ms, r.p99_ms
        );
    }
    let one = &rows[0].1;
    for (name, r) in &rows[1..] {
        println!(
            "| **{name} / one cluster** | **{:.2}x** | {:.2}x | {:.2}x | {:.2}x |",
            r.per_second / one.per_second,
            r.p50_ms / one.p50_ms,
            r.p95_ms / one.p95_ms,
            r.p99_ms / one.p99_ms
        );
    }
}

fn main() {
    let args = args();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench(args));
}
