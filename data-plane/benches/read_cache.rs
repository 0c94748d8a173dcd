//! The read cache under load: `GET /api/v1/user-metadata/{id}` as the AI core
//! (PII decrypted), `--clients` concurrent connections from `wrk` over a hot
//! set of `--hot` users (each read once first), served by one `serve` process three ways, side by
//! side: the cache off, the cache warm with every hit checked against the
//! user's row (`--read-cache-verify version`, the default), and the cache warm
//! with memory-only hits (`--read-cache-verify none`, kept fresh by the
//! outbound events). Reports requests per second, P50/P95/P99 and the ratios.
//!
//! ```sh
//! bash scripts/install-deps.sh --bench   # wrk
//! cargo bench -p umstore-data-plane --bench read_cache -- --users 20000 --hot 2000 --seconds 5 --clients 16
//! ```
//!
//! Everything runs on this machine, on loopback: the harness's PostgreSQL
//! primary (reads from the primary: no replica here), NATS JetStream, `serve`
//! (release build) and wrk share the cores.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{cli, get_as, http_get, stderr, wait_for, Served, Store};
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

/// One `serve` with `cache` (`--read-cache-verify`'s value, or off), warmed
/// and measured.
fn measure(store: &Store, nats: &str, dir: &Path, args: &Args, cache: Option<&str>) -> Run {
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let writer = store.url(Purpose::Writer);
    let ai = store.url(Purpose::Ai);
    let data_dir = dir.display().to_string();
    let pool = args.clients.to_string();
    let entries = (args.hot * 2).to_string();
    let mut argv = vec![
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
        "--nats-url",
        nats,
    ];
    if let Some(verify) = cache {
        argv.extend([
            "--read-cache-entries",
            &entries,
            "--read-cache-ttl",
            "10m",
            "--read-cache-verify",
            verify,
        ]);
    }
    let log = std::fs::File::create(dir.join(format!("serve-{}.log", cache.unwrap_or("off"))))
        .expect("log");
    let served = Served::start_logging(&argv, log);
    let ready = wait_for(port, "/readyz", Duration::from_secs(120), |s, _| s == 200);
    assert!(
        matches!(ready, Some((200, _))),
        "serve not ready: {ready:?}"
    );
    if cache.is_some() {
        let live = wait_for(port, "/metrics", Duration::from_secs(30), |_, b| {
            b.lines().any(|l| l == "umstore_read_cache_live 1")
        });
        assert!(live.is_some(), "the cache never went live");
    }
    let token = std::fs::read_to_string(dir.join("api-tokens").join("ai"))
        .expect("ai token")
        .trim()
        .to_owned();
    let ids = std::fs::read_to_string(dir.join("ids.txt")).expect("ids");
    let first = ids.lines().next().expect("an id");
    let answer = get_as(
        port,
        &format!("/api/v1/user-metadata/{first}"),
        Some(&token),
    );
    assert_eq!(answer.json()["pii_included"], true, "PII decrypted");
    // Warm: every hot user read once (a miss that fills the cache, or with
    // the cache off the data key cached), then connections and plans.
    for id in ids.lines() {
        let answer = get_as(port, &format!("/api/v1/user-metadata/{id}"), Some(&token));
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    wrk(port, dir, &token, args.clients, 2);
    let before = metric(port, r#"umstore_read_cache_lookups_total{result="miss"}"#);
    let run = wrk(port, dir, &token, args.clients, args.seconds);
    if cache.is_some() {
        let misses = metric(port, r#"umstore_read_cache_lookups_total{result="miss"}"#) - before;
        let ratio = metric(port, "umstore_read_cache_hit_ratio");
        eprintln!(
            "cache {}: {misses} misses while measured, hit ratio since start {ratio:.3}",
            cache.unwrap_or("")
        );
    }
    served.stop();
    run
}

async fn bench(args: Args) {
    let store = Store::migrated().await;
    let nats = umstore_e2e::Nats::start().expect("nats-server");
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
        store.superuser(),
        "--data-dir",
        &data_dir,
    ]);
    assert!(seeded.status.success(), "{}", stderr(&seeded));
    eprintln!("seeded {} users in {:.0?}", args.users, started.elapsed());
    let admin = support::connect(store.superuser()).await;
    admin
        .batch_execute("VACUUM (ANALYZE)")
        .await
        .expect("vacuum");
    let hot: Vec<String> = admin
        .query(
            "SELECT user_id::text FROM umstore.user_directory ORDER BY user_id LIMIT $1",
            &[&(args.hot as i64)],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    std::fs::write(dir.path().join("ids.txt"), hot.join("\n") + "\n").expect("ids file");

    let mut rows = Vec::new();
    for (name, cache) in [
        ("cache off", None),
        ("cache warm, hits checked (version)", Some("version")),
        ("cache warm, memory only (none)", Some("none")),
    ] {
        let run = measure(&store, &nats.url(), dir.path(), &args, cache);
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
    let off = &rows[0].1;
    for (name, r) in &rows[1..] {
        println!(
            "| **{name} / off** | **{:.2}x** | {:.2}x | {:.2}x | {:.2}x |",
            r.per_second / off.per_second,
            r.p50_ms / off.p50_ms,
            r.p95_ms / off.p95_ms,
            r.p99_ms / off.p99_ms
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
