//! What a region move and a promotion cost the writers, on the harness's Citus
//! (a coordinator and two workers on loopback, on this machine):
//!
//! * promotion: `citus::distribute` of a populated, undistributed store (`--users`
//!   users in KA and `--others` in each of TN, MH and DL), then the placement that
//!   gives each region a shard of its own on its worker group;
//! * a writer (one connection, as the writer login, one user per transaction: the
//!   directory row and the metadata row) adding users to KA for `--seconds` with no
//!   shard operation running: per-insert latency P50/P95/P99;
//! * the same writer while KA's shard (and its colocated shards) moves online to the
//!   other worker group: how long the move takes and the writer's latency meanwhile.
//!
//! ```sh
//! cargo bench -p umstore-migrations --bench region_move -- --users 1000000 --seconds 20
//! cargo bench -p umstore-migrations --bench region_move -- --users 200000   # smaller
//! ```
//!
//! Every node runs with `synchronous_commit = on` (the harness turns it off for
//! speed; with it off a move can lose a write acknowledged just before its cut-over).
//! At the end it checks that KA holds every seeded and every acknowledged user.
//!
//! Needs Citus built and installed (`citus.so` in `pg_config --pkglibdir`); says so
//! and exits otherwise. Prints a markdown table.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{connect, ms, stats, Sample};
use tokio_postgres::Client;
use umstore_e2e::{Citus, CitusUnavailable};
use umstore_migrations::citus::{self, Action};
use umstore_migrations::roles::Purpose;
use umstore_migrations::Runner;

struct Args {
    users: i64,
    others: i64,
    seconds: u64,
}

fn args() -> Args {
    let [users, others, seconds] = support::numbers(
        ["--users", "--others", "--seconds"],
        [1_000_000, 10_000, 20],
    );
    Args {
        users: i64::try_from(users).expect("--users fits i64"),
        others: i64::try_from(others).expect("--others fits i64"),
        seconds,
    }
}

/// Adds `users` users to `region` (directory and metadata rows), as the admin.
async fn seed(admin: &Client, region: &str, users: i64) {
    for sql in [
        "INSERT INTO umstore.user_directory (user_id, region) \
         SELECT md5($1::text || '/' || i)::uuid, $1::text FROM generate_series(1, $2::bigint) i",
        "INSERT INTO umstore.user_metadata (user_id, region, gender, birth_year) \
         SELECT md5($1::text || '/' || i)::uuid, $1::text, 'female', 1950 + (i % 50)::int \
         FROM generate_series(1, $2::bigint) i",
    ] {
        admin
            .execute(sql, &[&region, &users])
            .await
            .expect("seed users");
    }
}

/// One user in one transaction, as the data plane's writer does it.
async fn insert_user(client: &Client, region: &str) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let result = async {
        let id: String = client
            .query_one(
                "INSERT INTO umstore.user_directory (user_id, region) \
                 VALUES (gen_random_uuid(), $1) RETURNING user_id::text",
                &[&region],
            )
            .await?
            .get(0);
        client
            .execute(
                "INSERT INTO umstore.user_metadata (user_id, region, gender) \
                 VALUES ($1::text::uuid, $2, 'female')",
                &[&id, &region],
            )
            .await?;
        client.batch_execute("COMMIT").await
    }
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// A writer adding users to `region` in a closed loop until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<Sample>, Vec<String>)>,
}

impl Writer {
    async fn start(conninfo: &str, region: &'static str) -> Self {
        let client = connect(conninfo).await;
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let result = insert_user(&client, region).await;
                    samples.push((started, started.elapsed(), result.is_ok()));
                    if let Err(e) = result {
                        errors.push(e.to_string());
                    }
                }
                (samples, errors)
            })
        };
        Self { stop, task }
    }

    async fn stop(self) -> (Vec<Sample>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer task")
    }
}

/// Runs plan → apply until the placement matches; returns the actions taken.
async fn place(admin: &Client, desired: &BTreeMap<String, i32>) -> Vec<Action> {
    let mut taken = Vec::new();
    loop {
        let next = citus::plan(admin, desired).await.expect("plan");
        let Some(action) = next.into_iter().next() else {
            return taken;
        };
        citus::apply(admin, &action)
            .await
            .unwrap_or_else(|e| panic!("{action}: {e}"));
        taken.push(action);
    }
}

async fn count(client: &Client, region: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM umstore.user_metadata WHERE region = $1",
            &[&region],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::main]
async fn main() {
    let args = args();
    let citus = match Citus::start() {
        Ok(citus) => citus,
        Err(CitusUnavailable::Skip(reason)) => {
            eprintln!("region_move: {reason}");
            return;
        }
        Err(e) => panic!("Citus did not start: {e}"),
    };
    // PostgreSQL's default, which the harness turns off for speed: with asynchronous
    // commits a move's cut-over can miss a write acknowledged just before it (see
    // `durable_commits` in tests/distribute.rs).
    for node in std::iter::once(citus.coordinator()).chain(citus.workers()) {
        let client = connect(&node.conninfo("postgres")).await;
        for sql in [
            "ALTER SYSTEM SET synchronous_commit = on",
            "SELECT pg_reload_conf()",
        ] {
            client.batch_execute(sql).await.expect("synchronous_commit");
        }
    }
    let mut admin = connect(&citus.conninfo("postgres")).await;
    Runner::default().up(&mut admin).await.expect("migrations");
    let writer_login = Purpose::Writer.login().expect("the writer has a login");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {writer_login} LOGIN IN ROLE {}",
            Purpose::Writer.group()
        ))
        .await
        .expect("writer login");
    let writer_conninfo = format!("{} user={writer_login}", citus.conninfo("postgres"));

    let seeding = Instant::now();
    seed(&admin, "KA", args.users).await;
    for region in ["TN", "MH", "DL"] {
        seed(&admin, region, args.others).await;
    }
    admin.batch_execute("VACUUM ANALYZE").await.expect("vacuum");
    let seeded = args.users + 3 * args.others;
    eprintln!(
        "seeded {seeded} users ({} in KA) in {:.1} s",
        args.users,
        seeding.elapsed().as_secs_f64()
    );

    // (c) Promotion: the populated store distributed, then each region placed.
    let promotion = Instant::now();
    let mut table_started = Instant::now();
    let report = citus::distribute(&admin, |p, i, n| {
        eprintln!(
            "distribute: starting {}/{n} {} ({:.1} s since the previous table started)",
            i + 1,
            p.table,
            table_started.elapsed().as_secs_f64()
        );
        table_started = Instant::now();
    })
    .await
    .expect("distribute");
    let distributed_in = promotion.elapsed();
    eprintln!(
        "distributed {} tables ({} concurrently) in {:.1} s",
        report.tables.len(),
        report.concurrently.join(", "),
        distributed_in.as_secs_f64()
    );
    let groups: Vec<i32> = citus::nodes(&admin)
        .await
        .expect("nodes")
        .into_keys()
        .filter(|g| *g != citus::COORDINATOR_GROUP)
        .collect();
    let (south, north) = (groups[0], groups[1]);
    let assign = |pairs: [(&str, i32); 4]| -> BTreeMap<String, i32> {
        pairs.iter().map(|(r, g)| (r.to_string(), *g)).collect()
    };
    let placing = Instant::now();
    let initial = assign([("KA", south), ("TN", south), ("MH", north), ("DL", north)]);
    let actions = place(&admin, &initial).await;
    let placed_in = placing.elapsed();
    eprintln!(
        "placed in {:.1} s: {}",
        placed_in.as_secs_f64(),
        actions
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    citus::cleanup(&admin).await.expect("cleanup");

    // (a) The writer alone.
    let writer = Writer::start(&writer_conninfo, "KA").await;
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let to = Instant::now();
    let (samples, errors) = writer.stop().await;
    let quiet = stats(&samples, from, to);
    let mut acked = samples.iter().filter(|(_, _, ok)| *ok).count();
    if let Some(e) = errors.first() {
        eprintln!("writer, no move: {} errors, first: {e}", errors.len());
    }

    // (b) The writer while KA moves to the other group.
    let writer = Writer::start(&writer_conninfo, "KA").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let move_from = Instant::now();
    let moved = place(
        &admin,
        &assign([("KA", north), ("TN", south), ("MH", north), ("DL", north)]),
    )
    .await;
    let move_to = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (samples, errors) = writer.stop().await;
    let during = stats(&samples, move_from, move_to);
    acked += samples.iter().filter(|(_, _, ok)| *ok).count();
    if let Some(e) = errors.first() {
        eprintln!(
            "writer during the move: {} errors, first: {e}",
            errors.len()
        );
    }
    assert!(
        matches!(moved.as_slice(), [Action::Move { region, .. }] if region == "KA"),
        "one move, of KA: {moved:?}"
    );
    let in_ka = count(&admin, "KA").await;
    let expected = args.users + i64::try_from(acked).expect("count");
    assert_eq!(
        in_ka, expected,
        "KA holds its seeded and acknowledged users"
    );

    let move_took = move_to - move_from;
    println!(
        "\nRegion move and promotion on the harness Citus (coordinator + 2 workers, \
         loopback, {} CPUs); {} users in KA, {} in each of TN, MH, DL.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.users,
        args.others
    );
    println!("| phase | took | inserts | errors | P50 ms | P95 ms | P99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| writer into KA, no move | {} s | {} | {} | {} | {} | {} | {} |",
        args.seconds,
        quiet.count,
        quiet.errors,
        ms(quiet.p50),
        ms(quiet.p95),
        ms(quiet.p99),
        ms(quiet.max)
    );
    println!(
        "| writer into KA while KA moves | {:.1} s (move) | {} | {} | {} | {} | {} | {} |",
        move_took.as_secs_f64(),
        during.count,
        during.errors,
        ms(during.p50),
        ms(during.p95),
        ms(during.p99),
        ms(during.max)
    );
    println!(
        "| promotion: `citus::distribute` of {seeded} users | {:.1} s | | | | | | |",
        distributed_in.as_secs_f64()
    );
    println!(
        "| promotion: placement ({} split/move) | {:.1} s | | | | | | |",
        actions.len(),
        placed_in.as_secs_f64()
    );
}
