//! The read API under load: `GET /api/v1/user-metadata/{id}` as the AI core (PII
//! decrypted, served by its replica pool), `--clients` concurrent connections
//! from `wrk` choosing a random seeded user per request; then, side by side,
//! `pgbench -M prepared` running the SQL one such request runs (a read-only
//! transaction: the user's row, the user's wrapped data key) at the same
//! concurrency, as the same login, on the same replica. Reports requests per
//! second, P50/P95/P99 and the ratios, as BENCHMARKS.md shows them.
//!
//! ```sh
//! bash scripts/install-deps.sh --bench   # wrk, pgbench (PostgreSQL 15)
//! cargo bench -p umstore-data-plane --bench read -- --users 100000 --seconds 20 --clients 16
//! ```
//!
//! Everything runs on this machine, on loopback: a PostgreSQL primary with a
//! streaming replica of the bench's own, `serve` (release build), wrk, pgbench.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{cli, get_as, stderr, wait_for, Served, Store};
use umstore_migrations::roles::Purpose;

struct Args {
    /// Requests pick among the first this many users (all by default).
    pick: usize,
    users: usize,
    seconds: u64,
    clients: usize,
}

fn args() -> Args {
    let mut a = Args {
        pick: usize::MAX,
        users: 100_000,
        seconds: 20,
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
            "--pick" => a.pick = value(i) as usize,
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

/// Latency percentiles and throughput of one run.
struct Run {
    per_second: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    count: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
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
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, summary.errors.status + summary.errors.connect
      + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), 0))
end
"#;

fn wrk(port: u16, dir: &Path, token: &str, clients: usize, seconds: u64) -> Run {
    let script = dir.join("get-user.lua");
    std::fs::write(&script, WRK_SCRIPT).expect("write the wrk script");
    let out = Command::new("wrk")
        .args([
            "-t",
            &clients.min(2).to_string(),
            "-c",
            &clients.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--timeout",
            "5s",
            "-s",
            &script.display().to_string(),
            &format!("http://127.0.0.1:{port}"),
        ])
        .env("BENCH_IDS", dir.join("ids.txt"))
        .env("BENCH_TOKEN", token)
        .output()
        .expect("wrk (bash scripts/install-deps.sh --bench, or apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "wrk printed no result:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let (requests, duration_us, errors) = (v[0], v[1], v[2]);
    assert_eq!(errors, 0, "wrk saw errors or non-2xx answers:\n{text}");
    Run {
        per_second: requests as f64 / (duration_us as f64 / 1e6),
        p50_ms: v[3] as f64 / 1000.0,
        p95_ms: v[4] as f64 / 1000.0,
        p99_ms: v[5] as f64 / 1000.0,
        count: requests,
    }
}

/// The SQL of one GET, as the product sends it: in a read-only transaction,
/// the user's row by id (region through the directory) and then the user's
/// wrapped data key by (region, id), each value a parameter. pgbench first
/// looks a random seeded id up in `bench_ids` (`\gset`), outside the
/// transaction: one extra small query per transaction that the API does not make.
fn pgbench_script(users: usize) -> String {
    format!(
        "\\set i random(1, {users})\n\
         SELECT user_id AS u FROM public.bench_ids WHERE n = :i \\gset\n\
         BEGIN READ ONLY;\n\
         SELECT region::text AS r, full_name_enc, date_of_birth_enc, district_enc, pincode_enc, \
         phone_enc, identity_token_enc, annual_income_enc, birth_year, gender, marital_status, \
         area_type, social_category, disability, income_lakh, occupation, employment_type, \
         land_holding_acres::float8, has_bank_account, ration_card, household_size, dependents, \
         children, senior_members, head_of_household, version, updated_at::text, erased_at::text \
         FROM umstore.user_metadata WHERE region = umstore.user_region(:u) AND user_id = :u \\gset\n\
         SELECT wrapped_key, kek_name, kek_version, destroyed_at::text FROM umstore.user_data_keys \
         WHERE region = :r AND user_id = :u;\n\
         COMMIT;\n"
    )
}

fn pgbench(port: u16, db: &str, dir: &Path, users: usize, clients: usize, seconds: u64) -> Run {
    let bins = umstore_localpg::PgBinaries::discover().expect("PostgreSQL 15 binaries");
    let script = dir.join("get-user.sql");
    std::fs::write(&script, pgbench_script(users)).expect("write the pgbench script");
    let logs = dir.join("pgbench-logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let login = Purpose::Ai.login().expect("the ai login");
    let out = Command::new(bins.bindir.join("pgbench"))
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
            "-T",
            &seconds.to_string(),
            "-f",
            &script.display().to_string(),
            "-l",
            "--log-prefix",
            &logs.join("pgbench").display().to_string(),
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            login,
            db,
        ])
        .env("PGPASSWORD", support::password(Purpose::Ai))
        .output()
        .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(&logs).expect("pgbench logs").flatten() {
        let text = std::fs::read_to_string(entry.path()).expect("a pgbench log");
        for line in text.lines() {
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<f64>().ok())
            {
                latencies.push(us / 1000.0);
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let tps = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    Run {
        per_second: tps,
        p50_ms: percentile(&latencies, 50.0),
        p95_ms: percentile(&latencies, 95.0),
        p99_ms: percentile(&latencies, 99.0),
        count: latencies.len() as u64,
    }
}

async fn bench(args: Args) {
    let pg = umstore_e2e::Postgres::start_with_replicas(1).expect("PostgreSQL 15");
    let store = Store::migrated_on(&pg).await;
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
        .batch_execute(
            "CREATE TABLE public.bench_ids AS
                 SELECT row_number() OVER (ORDER BY user_id) AS n, user_id
                 FROM umstore.user_directory;
             CREATE UNIQUE INDEX ON public.bench_ids (n);
             GRANT SELECT ON public.bench_ids TO umstore_ai;
             ANALYZE;",
        )
        .await
        .expect("bench ids");
    let ids: Vec<String> = admin
        .query("SELECT user_id::text FROM public.bench_ids ORDER BY n", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let picked = &ids[..args.pick.min(ids.len())];
    std::fs::write(dir.path().join("ids.txt"), picked.join("\n") + "\n").expect("ids file");
    // Vacuumed and analyzed now, not by autovacuum during a run (its WAL
    // would put the replica behind and move reads to the primary).
    admin
        .batch_execute("VACUUM (ANALYZE)")
        .await
        .expect("vacuum");
    let target: String = admin
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("primary position")
        .get(0);
    let replica = pg.replica(0).expect("a streaming replica");
    let replica_admin = support::connect(&replica.conninfo(&store.name)).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let caught_up: bool = replica_admin
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&target],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(false);
        if caught_up {
            break;
        }
        assert!(Instant::now() < deadline, "the replica did not catch up");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Both runs start from a warm replica: every table and index of the schema
    // read into the page cache (the first run would otherwise pay for it).
    admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        .await
        .expect("pg_prewarm (postgresql-contrib)");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let blocks: i64 = replica_admin
        .query_one(
            "SELECT sum(pg_prewarm(c.oid, 'read'))::int8 FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname IN ('umstore', 'public') AND c.relkind IN ('r', 'i')",
            &[],
        )
        .await
        .expect("prewarm the replica")
        .get(0);
    eprintln!("prewarmed {blocks} blocks on the replica");

    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let writer = store.url(Purpose::Writer);
    let ai_primary = store.url(Purpose::Ai);
    let ai_replica = store.url_at(Purpose::Ai, replica.port());
    let rules_primary = store.url(Purpose::Rules);
    let rules_replica = store.url_at(Purpose::Rules, replica.port());
    let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
    let served = Served::start_logging(
        &[
            "serve",
            "--no-migrate",
            "--listen",
            &listen,
            "--database-url",
            &writer,
            "--ai-database-url",
            &ai_primary,
            "--ai-replica-url",
            &ai_replica,
            "--rules-database-url",
            &rules_primary,
            "--rules-replica-url",
            &rules_replica,
            "--read-pool-size",
            &args.clients.to_string(),
            "--data-dir",
            &data_dir,
        ],
        log,
    );
    let ready = wait_for(port, "/readyz", Duration::from_secs(120), |s, _| s == 200);
    assert!(
        matches!(ready, Some((200, _))),
        "serve not ready: {ready:?}"
    );
    let token = std::fs::read_to_string(dir.path().join("api-tokens").join("ai"))
        .expect("ai token")
        .trim()
        .to_owned();
    let served_by = |id: &str| {
        get_as(port, &format!("/api/v1/user-metadata/{id}"), Some(&token))
            .header("x-served-by")
            .map(str::to_owned)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_by(&ids[0]).as_deref() != Some("replica") {
        assert!(Instant::now() < deadline, "reads never reached the replica");
        std::thread::sleep(Duration::from_millis(200));
    }
    let answer = get_as(
        port,
        &format!("/api/v1/user-metadata/{}", ids[1]),
        Some(&token),
    );
    assert_eq!(answer.json()["pii_included"], true, "PII decrypted");

    // Warm both paths (connections, plans), then measure.
    wrk(port, dir.path(), &token, args.clients, 3);
    let product = wrk(port, dir.path(), &token, args.clients, args.seconds);
    assert_eq!(
        served_by(&ids[2]).as_deref(),
        Some("replica"),
        "the replica served throughout"
    );
    let hot: Vec<(String, String)> = admin
        .query(
            "SELECT d.user_id::text, d.region::text FROM public.bench_ids b
             JOIN umstore.user_directory d USING (user_id) WHERE b.n <= 2000",
            &[],
        )
        .await
        .expect("hot users")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mix = eligibility_mix(port, dir.path(), &hot, args.seconds);
    let (_, serve_log) = served.stop();
    pgbench(
        replica.port(),
        &store.name,
        dir.path(),
        ids.len(),
        args.clients,
        3,
    );
    std::fs::remove_dir_all(dir.path().join("pgbench-logs")).expect("clear logs");
    let baseline = pgbench(
        replica.port(),
        &store.name,
        dir.path(),
        ids.len(),
        args.clients,
        args.seconds,
    );
    assert!(
        !serve_log.contains("ERROR"),
        "serve logged errors:\n{serve_log}"
    );

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\nGET /api/v1/user-metadata/{{id}} as ai (PII decrypted, replica pool), {} users, \
         {} clients, {} s, {cores} cores (load generator, server and PostgreSQL share them)\n",
        ids.len(),
        args.clients,
        args.seconds
    );
    println!("| run | requests/s | P50 ms | P95 ms | P99 ms | requests |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, r) in [
        ("umstore API (wrk)", &product),
        ("pgbench, same SQL", &baseline),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            r.per_second, r.p50_ms, r.p95_ms, r.p99_ms, r.count
        );
    }
    println!(
        "\nratio API/pgbench: throughput {:.2}x, P50 {:.2}x, P95 {:.2}x",
        product.per_second / baseline.per_second,
        product.p50_ms / baseline.p50_ms,
        product.p95_ms / baseline.p95_ms
    );
    println!(
        "\neligibility cache under a mix ({} hot users, {} s): {} lookups by the rules \
         engine ({} refills on a miss), {} metadata updates invalidating; hit rate {:.1}% \
         (umstore_eligibility_cache_hit_ratio {:.3})",
        hot.len(),
        args.seconds,
        mix.lookups,
        mix.refills,
        mix.updates,
        100.0 * mix.hits as f64 / mix.lookups.max(1) as f64,
        mix.exported_ratio
    );
}

struct Mix {
    lookups: u64,
    hits: u64,
    refills: u64,
    updates: u64,
    exported_ratio: f64,
}

/// A realistic eligibility mix on a hot set of users: four rules-engine
/// workers look a random user's PMJAY result up (`rules` token, replica pool)
/// and, on a miss, compute and post it (`ELIGIBILITY_COMPUTED`, writer token);
/// meanwhile the metadata engine updates 20 random users a second
/// (`METADATA_UPDATED`), each invalidating that user's cached results.
fn eligibility_mix(port: u16, dir: &Path, hot: &[(String, String)], seconds: u64) -> Mix {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let read = |p: &str| {
        std::fs::read_to_string(dir.join("api-tokens").join(p))
            .expect("token")
            .trim()
            .to_owned()
    };
    let (rules, writer) = (read("rules"), read("writer"));
    let (lookups, hits, refills, updates) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let event = |kind: &str, user: &str, region: &str, payload: serde_json::Value| {
        serde_json::json!({
            "event_id": uuid::Uuid::new_v4(),
            "event_type": kind,
            "occurred_at": chrono::Utc::now(),
            "user_id": user,
            "region": region,
            "source": "bench",
            "schema_version": 1,
            "payload": payload,
        })
        .to_string()
    };
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                while Instant::now() < deadline {
                    let (user, region) = &hot[fastrand::usize(..hot.len())];
                    let answer = get_as(
                        port,
                        &format!("/api/v1/user-metadata/{user}/eligibility?scheme_id=PMJAY"),
                        Some(&rules),
                    );
                    assert_eq!(answer.status, 200, "{}", answer.body);
                    lookups.fetch_add(1, Relaxed);
                    if answer.json()["eligibility"]
                        .as_array()
                        .is_some_and(|e| !e.is_empty())
                    {
                        hits.fetch_add(1, Relaxed);
                        continue;
                    }
                    let computed = event(
                        "ELIGIBILITY_COMPUTED",
                        user,
                        region,
                        serde_json::json!({
                            "computed_at": chrono::Utc::now(),
                            "rules_version": "bench",
                            "results": [{"scheme_id": "PMJAY", "eligible": true, "score": 0.5}],
                        }),
                    );
                    let (status, body) =
                        support::http_post(port, "/api/v1/events", Some(&writer), &computed);
                    assert_eq!(status, 200, "{body}");
                    refills.fetch_add(1, Relaxed);
                }
            });
        }
        scope.spawn(|| {
            while Instant::now() < deadline {
                let (user, region) = &hot[fastrand::usize(..hot.len())];
                let update = event(
                    "METADATA_UPDATED",
                    user,
                    region,
                    serde_json::json!({"household_size": fastrand::u8(1..9)}),
                );
                let (status, body) =
                    support::http_post(port, "/api/v1/events", Some(&writer), &update);
                assert_eq!(status, 200, "{body}");
                updates.fetch_add(1, Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    });
    let metrics = support::http_get(port, "/metrics")
        .map(|m| m.1)
        .unwrap_or_default();
    let exported_ratio = metrics
        .lines()
        .find_map(|l| l.strip_prefix("umstore_eligibility_cache_hit_ratio "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    Mix {
        lookups: lookups.into_inner(),
        hits: hits.into_inner(),
        refills: refills.into_inner(),
        updates: updates.into_inner(),
        exported_ratio,
    }
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
