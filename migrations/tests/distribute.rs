//! The distribute step's SQL (`umstore_migrations::citus`) on a real Citus cluster
//! (coordinator + 2 workers from the harness, where Citus is built): distribution of
//! an empty and of a populated store, one shard per region placed on its worker group,
//! online region moves under a concurrent writer and reader, interrupted operations
//! finished by the next run, draining a group, and a migration applied after
//! distribution. Each test gets a cluster of its own. Skips with the reason where
//! `citus.so` is not installed (Citus is exempt from `UMSTORE_REQUIRE_COMPONENTS`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use umstore_e2e::Citus;
use umstore_migrations::citus::{self, Action};
use umstore_migrations::roles::Purpose;
use umstore_migrations::{Migration, Runner};

const REGIONS: [&str; 4] = ["KA", "TN", "MH", "DL"];

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect to the coordinator");
    tokio::spawn(connection);
    client
}

/// The admin connection (the operator's: the cluster's superuser) to a migrated
/// coordinator, and a writer login as the data plane has (a member of
/// `umstore_writer`), created the way bootstrap does.
async fn migrated(citus: &Citus) -> Client {
    durable_commits(citus).await;
    let mut admin = connect(&citus.conninfo("postgres")).await;
    Runner::default().up(&mut admin).await.expect("migrations");
    for purpose in [Purpose::Writer, Purpose::Dashboard] {
        let login = purpose.login().expect("a client purpose has a login");
        admin
            .batch_execute(&format!(
                "CREATE ROLE {login} LOGIN IN ROLE {}",
                purpose.group()
            ))
            .await
            .expect("login role");
    }
    admin
}

/// Every node commits with `synchronous_commit = on`, PostgreSQL's default and what
/// the store runs with; the harness turns it off for speed. With it off, an online
/// move or split can lose acknowledged writes: Citus blocks writes, reads the source's
/// `pg_current_wal_lsn()` (the WAL *written*, which an asynchronous commit of the last
/// ~`wal_writer_delay` may not have reached) and waits for the subscription to reach
/// it, so a single-node transaction committed just before the cut-over is never
/// replicated (seen here: 2 of 14,056 acknowledged KA users lost in a 1M-user move).
async fn durable_commits(citus: &Citus) {
    for node in std::iter::once(citus.coordinator()).chain(citus.workers()) {
        let client = connect(&node.conninfo("postgres")).await;
        for sql in [
            "ALTER SYSTEM SET synchronous_commit = on",
            "SELECT pg_reload_conf()",
        ] {
            client.batch_execute(sql).await.expect("synchronous_commit");
        }
        let client = connect(&node.conninfo("postgres")).await;
        let setting: String = client
            .query_one("SHOW synchronous_commit", &[])
            .await
            .expect("SHOW")
            .get(0);
        assert_eq!(setting, "on", "{}", node.conninfo("postgres"));
    }
}

fn as_login(citus: &Citus, purpose: Purpose) -> String {
    format!(
        "{} user={}",
        citus.conninfo("postgres"),
        purpose.login().expect("login")
    )
}

/// The two workers' Citus groups, in order.
async fn worker_groups(admin: &Client) -> (i32, i32) {
    let groups: Vec<i32> = citus::nodes(admin)
        .await
        .expect("nodes")
        .into_keys()
        .filter(|g| *g != citus::COORDINATOR_GROUP)
        .collect();
    assert_eq!(groups.len(), 2, "two workers: {groups:?}");
    (groups[0], groups[1])
}

fn regions() -> Vec<String> {
    REGIONS.iter().map(|r| r.to_string()).collect()
}

/// Runs plan → apply until the placement matches; returns the actions taken.
async fn place(admin: &Client, desired: &BTreeMap<String, i32>) -> Vec<Action> {
    let mut taken = Vec::new();
    for _ in 0..64 {
        let next = citus::plan(admin, desired).await.expect("plan");
        let Some(action) = next.into_iter().next() else {
            return taken;
        };
        citus::apply(admin, &action)
            .await
            .unwrap_or_else(|e| panic!("{action}: {e:?}"));
        taken.push(action);
    }
    panic!("placement did not converge: {taken:?}");
}

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
                "INSERT INTO umstore.user_metadata (user_id, region, gender) VALUES ($1::text::uuid, $2, 'female')",
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

/// A writer (as the writer login) adding users to `region` and a reader (as the
/// dashboard login) counting them, until stopped; every acknowledged insert counted.
struct Traffic {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    reads: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    async fn start(citus: &Citus, region: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = connect(&as_login(citus, Purpose::Writer)).await;
        let reader = connect(&as_login(citus, Purpose::Dashboard)).await;
        let w = {
            let (stop, acked, errors) = (stop.clone(), acked.clone(), errors.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match insert_user(&writer, region).await {
                        Ok(()) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.lock().expect("lock").push(format!("write: {e:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let r = {
            let (stop, reads, errors) = (stop.clone(), reads.clone(), errors.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match reader
                        .query_one(
                            "SELECT count(*) FROM umstore.user_metadata WHERE region = $1",
                            &[&region],
                        )
                        .await
                    {
                        Ok(_) => {
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.lock().expect("lock").push(format!("read: {e:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        Self {
            stop,
            acked,
            errors,
            reads,
            tasks: vec![w, r],
        }
    }

    /// Stops; returns (acknowledged writes, reads, errors).
    async fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("traffic task");
        }
        let errors = self.errors.lock().expect("lock").clone();
        (
            self.acked.load(Ordering::Relaxed),
            self.reads.load(Ordering::Relaxed),
            errors,
        )
    }
}

#[tokio::test]
async fn an_empty_store_distributes_once_and_each_region_gets_a_shard_on_its_group() {
    let Some(citus) = Citus::start_or_skip() else {
        return;
    };
    let admin = migrated(&citus).await;
    assert!(matches!(
        citus::availability(&admin).await.expect("availability"),
        citus::Availability::Installed { .. }
    ));

    let first = citus::distribute(&admin, |_, _, _| {})
        .await
        .expect("distribute");
    assert!(first.tables.len() >= 13, "{first:?}");
    assert!(first.concurrently.is_empty(), "empty tables: {first:?}");
    assert!(first.restored > 0, "constraints put back: {first:?}");
    let again = citus::distribute(&admin, |_, _, _| {})
        .await
        .expect("again");
    assert!(!again.changed(), "a second run changes nothing: {again:?}");

    let (south, north) = worker_groups(&admin).await;
    let desired: BTreeMap<String, i32> =
        [("KA", south), ("TN", south), ("MH", north), ("DL", north)]
            .into_iter()
            .map(|(r, g)| (r.to_string(), g))
            .collect();
    let taken = place(&admin, &desired).await;
    assert!(
        taken.iter().any(|a| matches!(a, Action::Isolate { .. })),
        "{taken:?}"
    );
    let observed = citus::observed_placement(&admin, &regions())
        .await
        .expect("observed");
    assert_eq!(observed, desired, "pg_dist_placement follows the spec");
    let shards = citus::region_shards(&admin, &regions())
        .await
        .expect("shards");
    assert!(shards.iter().all(|s| s.isolated), "{shards:?}");
    assert!(citus::plan(&admin, &desired)
        .await
        .expect("plan")
        .is_empty());

    // Rows written through the coordinator land on the region's group, and the
    // constraints set aside while distributing hold again.
    let writer = connect(&as_login(&citus, Purpose::Writer)).await;
    for region in REGIONS {
        insert_user(&writer, region).await.expect("insert");
    }
    let ka = shards.iter().find(|s| s.region == "KA").expect("KA");
    let on_shard: i64 = admin
        .query_one(
            "SELECT result::bigint FROM run_command_on_placements('umstore.user_metadata', \
             'SELECT count(*) FROM %s') WHERE shardid = $1",
            &[&ka.shard],
        )
        .await
        .expect("count on the KA shard")
        .get(0);
    assert_eq!(on_shard, 1, "KA's user is in KA's own shard");
    let bad_gender = writer
        .execute(
            "INSERT INTO umstore.user_metadata (user_id, region, gender) VALUES (gen_random_uuid(), 'KA', 'x')",
            &[],
        )
        .await
        .expect_err("CHECK constraint restored");
    assert!(
        format!("{bad_gender:?}").contains("user_metadata_gender_check"),
        "{bad_gender:?}"
    );
    let orphan = writer
        .execute(
            "INSERT INTO umstore.user_risk_scores (user_id, region, financial_risk, deadline_risk, \
             benefit_loss_risk, overall_risk, model_version, computed_at) \
             VALUES (gen_random_uuid(), 'KA', 0.1, 0.2, 0.3, 0.4, 'm1', now())",
            &[],
        )
        .await
        .expect_err("foreign key to user_metadata restored");
    assert!(format!("{orphan:?}").contains("foreign key"), "{orphan:?}");
    let left: i64 = admin
        .query_one("SELECT count(*) FROM umstore_citus.set_aside", &[])
        .await
        .expect("set_aside")
        .get(0);
    assert_eq!(left, 0);
}

fn assignment(pairs: &[(&str, i32)]) -> BTreeMap<String, i32> {
    pairs.iter().map(|(r, g)| (r.to_string(), *g)).collect()
}

/// A migrated, distributed store with KA and TN placed on the first worker group and
/// MH and DL on the second; returns the admin connection and the two groups.
async fn placed(citus: &Citus) -> (Client, i32, i32) {
    let admin = migrated(citus).await;
    citus::distribute(&admin, |_, _, _| {})
        .await
        .expect("distribute");
    let (south, north) = worker_groups(&admin).await;
    let desired = assignment(&[("KA", south), ("TN", south), ("MH", north), ("DL", north)]);
    place(&admin, &desired).await;
    assert_eq!(
        citus::observed_placement(&admin, &regions())
            .await
            .expect("observed"),
        desired
    );
    (admin, south, north)
}

/// Adds `users` users to `region` (directory and metadata rows) in two statements, as
/// the admin; ids are derived from the region and a counter, so they never collide
/// across regions.
async fn seed(admin: &Client, region: &str, users: i64) {
    admin
        .execute(
            "INSERT INTO umstore.user_directory (user_id, region) \
             SELECT md5($1::text || '/' || i)::uuid, $1::text FROM generate_series(1, $2::bigint) i",
            &[&region, &users],
        )
        .await
        .expect("seed user_directory");
    admin
        .execute(
            "INSERT INTO umstore.user_metadata (user_id, region, gender, birth_year) \
             SELECT md5($1::text || '/' || i)::uuid, $1::text, 'female', 1950 + (i % 50)::int \
             FROM generate_series(1, $2::bigint) i",
            &[&region, &users],
        )
        .await
        .expect("seed user_metadata");
}

async fn total(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM umstore.user_metadata", &[])
        .await
        .expect("count")
        .get(0)
}

/// Each region's (anchor shard, Citus group).
async fn shards_by_region(admin: &Client) -> BTreeMap<String, (i64, i32)> {
    citus::region_shards(admin, &regions())
        .await
        .expect("region shards")
        .into_iter()
        .map(|s| (s.region, (s.shard, s.group)))
        .collect()
}

/// A superuser connection to the worker of Citus group `group`.
async fn worker(citus: &Citus, admin: &Client, group: i32) -> Client {
    let nodes = citus::nodes(admin).await.expect("nodes");
    let port = nodes.get(&group).expect("the group's node").port;
    let node = citus
        .workers()
        .iter()
        .find(|w| i32::from(w.port()) == port)
        .expect("a harness worker on that port");
    connect(&node.conninfo("postgres")).await
}

/// Polls `in_progress` until it reports an operation naming `function`; fails when
/// `task` (the session running it) ends first or nothing shows within a minute.
async fn wait_for_in_progress<T>(
    admin: &Client,
    function: &str,
    task: &tokio::task::JoinHandle<T>,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(running) = citus::in_progress(admin).await.expect("in_progress") {
            if running.contains(function) {
                return running;
            }
        }
        assert!(
            !task.is_finished(),
            "{function} ended before it was seen running"
        );
        assert!(Instant::now() < deadline, "{function} never showed up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kills the backend running `function` (found in `pg_stat_activity`) and waits for
/// the process to exit; returns its pid.
async fn terminate(admin: &Client, function: &str) -> i32 {
    let pid: i32 = admin
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
             AND state <> 'idle' AND query LIKE '%' || $1 || '(%'",
            &[&function],
        )
        .await
        .expect("the backend running it")
        .get(0);
    let killed: bool = admin
        .query_one(
            "SELECT pg_terminate_backend($1::int, 30000::bigint)",
            &[&pid],
        )
        .await
        .expect("pg_terminate_backend")
        .get(0);
    assert!(killed, "backend {pid} did not exit");
    pid
}

#[tokio::test]
async fn reassigning_one_region_moves_only_it_while_a_writer_and_reader_continue() {
    let Some(citus) = Citus::start_or_skip() else {
        return;
    };
    let (admin, south, north) = placed(&citus).await;
    let before = shards_by_region(&admin).await;

    let traffic = Traffic::start(&citus, "KA").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked_at_start = traffic.acked.load(Ordering::Relaxed);
    let desired = assignment(&[("KA", north), ("TN", south), ("MH", north), ("DL", north)]);
    let taken = place(&admin, &desired).await;
    let acked_at_end = traffic.acked.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, reads, errors) = traffic.stop().await;

    assert!(
        matches!(taken.as_slice(), [Action::Move { region, group, .. }] if region == "KA" && *group == north),
        "one move, of KA: {taken:?}"
    );
    let after = shards_by_region(&admin).await;
    for region in ["TN", "MH", "DL"] {
        assert_eq!(
            after[region], before[region],
            "{region} stayed where it was"
        );
    }
    assert_eq!(
        after["KA"],
        (before["KA"].0, north),
        "KA's shard is on {north}"
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert!(reads > 0, "the reader read");
    assert!(
        acked_at_end > acked_at_start,
        "writes were acknowledged while KA moved"
    );
    assert_eq!(
        count(&admin, "KA").await,
        i64::try_from(acked).expect("count"),
        "every acknowledged write is there, and nothing else"
    );
}

#[tokio::test]
async fn an_interrupted_move_is_finished_by_the_next_run() {
    let Some(citus) = Citus::start_or_skip() else {
        return;
    };
    let (admin, south, north) = placed(&citus).await;
    seed(&admin, "KA", 20_000).await;
    let rows = count(&admin, "KA").await;
    assert_eq!(rows, 20_000);
    let ka = shards_by_region(&admin).await["KA"];
    assert_eq!(ka.1, south);

    let desired = assignment(&[("KA", north), ("TN", south), ("MH", north), ("DL", north)]);
    let planned = citus::plan(&admin, &desired).await.expect("plan");
    let [action @ Action::Move { .. }] = planned.as_slice() else {
        panic!("one move: {planned:?}");
    };
    let mover = connect(&citus.conninfo("postgres")).await;
    let mover_pid: i32 = mover
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let task = {
        let action = action.clone();
        tokio::spawn(async move { citus::apply(&mover, &action).await })
    };
    let running = wait_for_in_progress(&admin, "citus_move_shard_placement", &task).await;
    assert!(
        running.contains(&format!("backend {mover_pid} ")),
        "{running}"
    );
    // Killed once the move has made something on the target (recorded for cleanup).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let recorded: i64 = admin
            .query_one("SELECT count(*) FROM pg_dist_cleanup", &[])
            .await
            .expect("pg_dist_cleanup")
            .get(0);
        if recorded > 0 {
            break;
        }
        assert!(!task.is_finished(), "the move ended before it was killed");
        assert!(
            Instant::now() < deadline,
            "the move recorded nothing to clean up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        terminate(&admin, "citus_move_shard_placement").await,
        mover_pid
    );
    let outcome = task.await.expect("mover task");
    assert!(outcome.is_err(), "the killed move failed: {outcome:?}");

    assert_eq!(citus::in_progress(&admin).await.expect("in_progress"), None);
    citus::cleanup(&admin).await.expect("cleanup");
    let taken = place(&admin, &desired).await;
    assert!(
        matches!(taken.as_slice(), [Action::Move { region, .. }] if region == "KA"),
        "{taken:?}"
    );
    assert_eq!(shards_by_region(&admin).await["KA"], (ka.0, north));
    assert_eq!(count(&admin, "KA").await, rows, "no row lost or doubled");
    let on_source: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_dist_placement WHERE shardid = $1 AND groupid = $2",
            &[&ka.0, &south],
        )
        .await
        .expect("placements")
        .get(0);
    assert_eq!(on_source, 0, "no placement of KA's shard left on {south}");

    // Nothing of the interrupted attempt or of the old placement stays on the
    // workers once cleaned up: no shard table, no replication slot holding WAL.
    citus::cleanup(&admin).await.expect("cleanup");
    let source = worker(&citus, &admin, south).await;
    let target = worker(&citus, &admin, north).await;
    let shard_table = format!("user_metadata_{}", ka.0);
    let left: i64 = source
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'umstore' AND c.relname = $1",
            &[&shard_table],
        )
        .await
        .expect("source tables")
        .get(0);
    assert_eq!(left, 0, "{shard_table} dropped on the source");
    for (name, node) in [("source", &source), ("target", &target)] {
        let slots: i64 = node
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .expect("slots")
            .get(0);
        let subscriptions: i64 = node
            .query_one("SELECT count(*) FROM pg_subscription", &[])
            .await
            .expect("subscriptions")
            .get(0);
        assert_eq!((slots, subscriptions), (0, 0), "left on the {name}");
    }
    let recorded: i64 = admin
        .query_one("SELECT count(*) FROM pg_dist_cleanup", &[])
        .await
        .expect("pg_dist_cleanup")
        .get(0);
    assert_eq!(recorded, 0, "nothing left to clean up");
}

/// Promotion of a populated tier-2 store (200,000 users over four regions) while a
/// writer and a reader keep going; the first attempt is killed while it copies rows.
#[tokio::test]
async fn a_populated_store_is_distributed_while_writes_continue() {
    const USERS: i64 = 200_000;
    let Some(citus) = Citus::start_or_skip() else {
        return;
    };
    let admin = migrated(&citus).await;
    for region in REGIONS {
        seed(&admin, region, USERS / 4).await;
    }
    assert_eq!(total(&admin).await, USERS);
    let traffic = Traffic::start(&citus, "TN").await;

    // A first run killed while it converts a populated table.
    let crashing = connect(&citus.conninfo("postgres")).await;
    let task = tokio::spawn(async move { citus::distribute(&crashing, |_, _, _| {}).await });
    wait_for_in_progress(&admin, "create_distributed_table_concurrently", &task).await;
    terminate(&admin, "create_distributed_table_concurrently").await;
    let outcome = task.await.expect("distribute task");
    assert!(outcome.is_err(), "the killed run failed: {outcome:?}");
    assert_eq!(citus::in_progress(&admin).await.expect("in_progress"), None);

    // The next run, as the operator's step does it: clean up, then distribute.
    citus::cleanup(&admin).await.expect("cleanup");
    let acked_at_start = traffic.acked.load(Ordering::Relaxed);
    let report = citus::distribute(&admin, |_, _, _| {})
        .await
        .expect("distribute");
    assert!(
        traffic.acked.load(Ordering::Relaxed) > acked_at_start,
        "writes were acknowledged while the tables were converted"
    );
    for table in ["user_metadata", "user_directory"] {
        assert!(
            report.concurrently.iter().any(|t| t == table),
            "{table} converted without blocking writes: {report:?}"
        );
    }
    let (south, north) = worker_groups(&admin).await;
    let desired = assignment(&[("KA", south), ("TN", south), ("MH", north), ("DL", north)]);
    place(&admin, &desired).await;
    let (acked, reads, errors) = traffic.stop().await;

    assert!(errors.is_empty(), "{errors:?}");
    assert!(reads > 0 && acked > 0, "acked {acked}, reads {reads}");
    assert_eq!(
        total(&admin).await,
        USERS + i64::try_from(acked).expect("count"),
        "every seeded row and every acknowledged write, once"
    );
    let directory: i64 = admin
        .query_one("SELECT count(*) FROM umstore.user_directory", &[])
        .await
        .expect("directory")
        .get(0);
    assert_eq!(directory, USERS + i64::try_from(acked).expect("count"));
    assert_eq!(
        citus::observed_placement(&admin, &regions())
            .await
            .expect("observed"),
        desired
    );
}

#[tokio::test]
async fn removing_a_worker_group_drains_it_first() {
    let Some(citus) = Citus::start_or_skip() else {
        return;
    };
    let (admin, south, north) = placed(&citus).await;
    for region in REGIONS {
        seed(&admin, region, 100).await;
    }
    let mut before = BTreeMap::new();
    for region in REGIONS {
        before.insert(region, count(&admin, region).await);
    }

    let desired = assignment(&[("KA", south), ("TN", south), ("MH", south), ("DL", south)]);
    let taken = place(&admin, &desired).await;
    let mut moves: Vec<&str> = taken
        .iter()
        .filter_map(|a| match a {
            Action::Move { region, .. } => Some(region.as_str()),
            _ => None,
        })
        .collect();
    let drains = taken
        .iter()
        .filter(|a| matches!(a, Action::Drain { .. }))
        .count();
    moves.sort_unstable();
    assert_eq!(
        moves,
        ["DL", "MH"],
        "the regions on {north} moved: {taken:?}"
    );
    assert!(drains > 0, "{taken:?}");
    let first_drain = taken
        .iter()
        .position(|a| matches!(a, Action::Drain { .. }))
        .expect("a drain");
    assert!(
        taken[..first_drain]
            .iter()
            .all(|a| matches!(a, Action::Move { .. })),
        "moves first, then drains: {taken:?}"
    );
    // Every shard of a distributed table is off the group; the reference tables keep
    // a copy on every node until the node is removed.
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_dist_placement p \
             JOIN pg_dist_shard s ON s.shardid = p.shardid \
             JOIN pg_dist_partition t ON t.logicalrelid = s.logicalrelid \
             WHERE p.groupid = $1 AND t.partmethod = 'h'",
            &[&north],
        )
        .await
        .expect("placements")
        .get(0);
    assert_eq!(left, 0, "no shard of a distributed table left on {north}");

    assert_eq!(
        citus::remove_drained(&admin, &[north])
            .await
            .expect("remove_drained"),
        vec![north],
        "the drained group is removed"
    );
    let (nodes, placements): (i64, i64) = {
        let row = admin
            .query_one(
                "SELECT (SELECT count(*) FROM pg_dist_node WHERE groupid = $1), \
                        (SELECT count(*) FROM pg_dist_placement WHERE groupid = $1)",
                &[&north],
            )
            .await
            .expect("pg_dist_node");
        (row.get(0), row.get(1))
    };
    assert_eq!((nodes, placements), (0, 0), "group {north} is gone");
    for region in REGIONS {
        assert_eq!(count(&admin, region).await, before[region], "{region}");
    }
}

#[tokio::test]
async fn a_migration_applied_after_distribution_reaches_the_shards() {
    let Some(citus) = Citus::start_or_skip() else {
        return;
    };
    let (mut admin, _, _) = placed(&citus).await;
    let mut migrations = umstore_migrations::embedded();
    let latest = migrations.last().expect("migrations").version;
    migrations.push(Migration {
        version: latest + 1,
        name: "test_extra",
        sql: "ALTER TABLE umstore.user_metadata ADD COLUMN nickname_test text; \
              CREATE TABLE umstore.test_notes (region char(2) NOT NULL, user_id uuid NOT NULL, \
              note text, PRIMARY KEY (region, user_id));",
    });
    let report = Runner::new(migrations)
        .up(&mut admin)
        .await
        .expect("the new migration");
    assert_eq!(report.applied.len(), 1, "{report:?}");

    let id: String = admin
        .query_one(
            "INSERT INTO umstore.user_metadata (user_id, region, gender, nickname_test) \
             VALUES (gen_random_uuid(), 'KA', 'male', 'kitty') RETURNING user_id::text",
            &[],
        )
        .await
        .expect("insert with the new column")
        .get(0);
    let nickname: Option<String> = admin
        .query_one(
            "SELECT nickname_test FROM umstore.user_metadata \
             WHERE region = 'KA' AND user_id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("read the new column")
        .get(0);
    assert_eq!(nickname.as_deref(), Some("kitty"));
    let everywhere: bool = admin
        .query_one(
            "SELECT bool_and(success AND result = '1') FROM run_command_on_placements( \
             'umstore.user_metadata', \
             $$SELECT count(*) FROM pg_attribute WHERE attrelid = '%s'::regclass \
               AND attname = 'nickname_test' AND NOT attisdropped$$)",
            &[],
        )
        .await
        .expect("the column on each shard")
        .get(0);
    assert!(
        everywhere,
        "every shard of user_metadata has the new column"
    );

    let report = citus::distribute(&admin, |_, _, _| {})
        .await
        .expect("distribute");
    assert_eq!(report.tables, vec!["test_notes".to_string()]);
    let colocation: Vec<i32> = admin
        .query(
            "SELECT colocationid FROM pg_dist_partition WHERE logicalrelid IN \
             ('umstore.user_metadata'::regclass, 'umstore.test_notes'::regclass)",
            &[],
        )
        .await
        .expect("pg_dist_partition")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(colocation.len(), 2, "both distributed: {colocation:?}");
    assert_eq!(
        colocation[0], colocation[1],
        "test_notes colocated with user_metadata"
    );
}
