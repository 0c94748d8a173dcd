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
