//! The data plane on a distributed store (tier 3): a real Citus coordinator with two
//! workers (the harness's, where Citus is built), the schema distributed and two
//! regions placed on different workers as the operator's distribute step does.
//! `seed` loads through the coordinator; events are applied and every one-user read
//! served on connections where Citus refuses any query that would touch more than
//! one shard (`citus.multi_task_query_log_level = error`), as the production logins.
//! Skips with the reason where `citus.so` is not installed (Citus is exempt from
//! `UMSTORE_REQUIRE_COMPONENTS`).

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_postgres::{Client, NoTls};
use umstore_data_plane::crypto::{DataKeyCache, KeyProvider, Keyring, LocalKeyProvider};
use umstore_data_plane::db::Database;
use umstore_data_plane::ingest::{ApplyConfig, Ingest};
use umstore_data_plane::seed;
use umstore_data_plane::store::{reads, users};
use umstore_e2e::Citus;
use umstore_migrations::citus;
use umstore_migrations::roles::Purpose;
use umstore_migrations::Runner;
use uuid::Uuid;

/// Any query spanning shards fails on connections opened with this.
const SINGLE_SHARD_ONLY: &str = "-c citus.multi_task_query_log_level=error";

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect to the coordinator");
    tokio::spawn(connection);
    client
}

fn login(citus: &Citus, purpose: Purpose) -> String {
    format!(
        "{} user={} options='{SINGLE_SHARD_ONLY}'",
        citus.conninfo("postgres"),
        purpose.login().expect("a client purpose has a login")
    )
}

#[tokio::test]
async fn seed_writes_and_one_user_reads_work_on_a_distributed_store_one_shard_each() {
    let Some(citus) = Citus::start_or_skip() else {
        return;
    };
    let mut admin = connect(&citus.conninfo("postgres")).await;
    Runner::default().up(&mut admin).await.expect("migrations");
    for purpose in [Purpose::Writer, Purpose::Dashboard] {
        let name = purpose.login().expect("login");
        admin
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN IN ROLE {}",
                purpose.group()
            ))
            .await
            .expect("login role");
    }
    citus::distribute(&admin, |_, _, _| {})
        .await
        .expect("distribute");
    // The routing index of a store with several clusters (migration 0012):
    // by user id, colocated with the directory.
    let colocated: bool = admin
        .query_one(
            "SELECT r.partmethod = 'h' AND r.colocationid = d.colocationid
             FROM pg_dist_partition r, pg_dist_partition d
             WHERE r.logicalrelid = 'umstore.user_routes'::regclass
               AND d.logicalrelid = 'umstore.user_directory'::regclass",
            &[],
        )
        .await
        .expect("user_routes distributed")
        .get(0);
    assert!(colocated, "user_routes is distributed with user_directory");
    let workers: Vec<i32> = citus::nodes(&admin)
        .await
        .expect("nodes")
        .into_keys()
        .filter(|g| *g != citus::COORDINATOR_GROUP)
        .collect();
    let desired = BTreeMap::from([
        ("KA".to_string(), workers[0]),
        ("TN".to_string(), workers[1]),
    ]);
    loop {
        let next = citus::plan(&admin, &desired).await.expect("plan");
        let Some(action) = next.first() else { break };
        citus::apply(&admin, action).await.expect("place");
    }

    // Seed through the coordinator (the admin's bulk load).
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = || {
        KeyProvider::Local(Box::new(
            LocalKeyProvider::open_or_create(dir.path()).expect("keys"),
        ))
    };
    let keys = Keyring::open(
        provider(),
        DataKeyCache::new(1_000, Duration::from_secs(60)),
        &admin,
    )
    .await
    .expect("keyring");
    let report = seed::seed(&mut admin, 600, 7, &keys)
        .await
        .expect("seed on Citus");
    assert_eq!(report.users, 600);
    let seeded: i64 = admin
        .query_one("SELECT count(*) FROM umstore.user_metadata", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(seeded, 600);

    // The stats views over the distributed tables (a local materialized view on
    // the coordinator): the writer refreshes them, twice (the second concurrently),
    // and they count every seeded user. A refresh reads every shard, so this
    // connection is the writer's without the single-shard guard.
    let writer = connect(&format!(
        "{} user={}",
        citus.conninfo("postgres"),
        Purpose::Writer.login().expect("the writer has a login")
    ))
    .await;
    for _ in 0..2 {
        let refreshed: bool = writer
            .query_one(
                "SELECT refreshed FROM umstore.refresh_stats_views(true)",
                &[],
            )
            .await
            .expect("the writer refreshes the stats views on Citus")
            .get(0);
        assert!(refreshed);
    }
    let in_views: i64 = admin
        .query_one("SELECT sum(users)::int8 FROM umstore.stats_groups_mv", &[])
        .await
        .expect("read the view")
        .get(0);
    assert_eq!(in_views, 600, "the views count every seeded user");

    // Events applied as the writer login, each a single-shard transaction.
    let writer_keys = Arc::new(
        Keyring::open(
            provider(),
            DataKeyCache::new(1_000, Duration::from_secs(60)),
            &connect(&login(&citus, Purpose::Writer)).await,
        )
        .await
        .expect("writer keyring"),
    );
    let ingest = Ingest::new(
        &Database::parse(&login(&citus, Purpose::Writer)).expect("url"),
        2,
        writer_keys,
        ApplyConfig {
            subject_prefix: "umstore".into(),
            eligibility_ttl: chrono::Duration::hours(24),
        },
    )
    .expect("pool");
    let mut created = Vec::new();
    for (i, region) in ["KA", "TN", "KA", "MH"].iter().enumerate() {
        let user = Uuid::new_v4();
        let mut event = support::ingest::created(user, Utc::now());
        event["region"] = (*region).into();
        event["event_id"] = Uuid::new_v4().to_string().into();
        ingest
            .submit(event.to_string().as_bytes())
            .await
            .unwrap_or_else(|e| panic!("event {i} in {region} on Citus: {e:?}"));
        created.push((user, *region));
    }

    // One-user reads as the dashboard login: the seeded users and the new ones.
    let reader = connect(&login(&citus, Purpose::Dashboard)).await;
    let refused = reader
        .query("SELECT count(*) FROM umstore.user_metadata", &[])
        .await
        .expect_err("a query over every shard is refused on this connection");
    assert!(format!("{refused:?}").contains("multi-task"), "{refused:?}");
    let mut ids: Vec<Uuid> = Vec::new();
    ids.extend(created.iter().map(|(u, _)| *u));
    let seeded_ids: Vec<Uuid> = admin
        .query("SELECT user_id FROM umstore.user_directory LIMIT 20", &[])
        .await
        .expect("some seeded users")
        .iter()
        .map(|r| r.get(0))
        .collect();
    ids.extend(seeded_ids);
    for id in ids {
        let user = users::read_user(&reader, &keys, id, false)
            .await
            .unwrap_or_else(|e| panic!("read {id}: {e:?}"))
            .unwrap_or_else(|| panic!("{id} is there"));
        assert!(!user.region.is_empty());
        reads::derived(&reader, id)
            .await
            .unwrap_or_else(|e| panic!("derived {id}: {e:?}"))
            .expect("known user");
        reads::risk_scores(&reader, id)
            .await
            .unwrap_or_else(|e| panic!("risk {id}: {e:?}"))
            .expect("known user");
        reads::eligibility(&reader, id, None)
            .await
            .unwrap_or_else(|e| panic!("eligibility {id}: {e:?}"))
            .expect("known user");
        reads::history(&reader, id, None, 10)
            .await
            .unwrap_or_else(|e| panic!("history {id}: {e:?}"))
            .expect("known user");
    }
    for (user, region) in &created {
        let stored: String = admin
            .query_one(
                "SELECT region::text FROM umstore.user_metadata WHERE user_id = $1",
                &[user],
            )
            .await
            .expect("stored")
            .get(0);
        assert_eq!(&stored, region);
    }
    assert!(reads::derived(&reader, Uuid::new_v4())
        .await
        .expect("unknown user")
        .is_none());

    // `bulk import` through the coordinator as the writer login (row-level
    // security applies: temporary tables, then INSERT ... SELECT into the
    // distributed tables), resumable progress in a coordinator-local table.
    let file = dir.path().join("import.jsonl");
    seed::write_import_file(&file, 1_500, 99).expect("import file");
    let out = std::process::Command::new(support::BIN)
        .args(["bulk", "import"])
        .arg(&file)
        .args(["--engine", "cpu", "--batch-users", "400"])
        .env(
            "UMSTORE_DATABASE_URL",
            format!(
                "{} user={}",
                citus.conninfo("postgres"),
                Purpose::Writer.login().expect("login")
            ),
        )
        .env("UMSTORE_DATA_DIR", dir.path())
        .env_remove("UMSTORE_VAULT_ADDR")
        .env_remove("UMSTORE_CLUSTERS")
        .output()
        .expect("run bulk import");
    assert!(
        out.status.success(),
        "bulk import on Citus: {}",
        support::stderr(&out)
    );
    assert!(
        support::stdout(&out).contains("1500 users imported, 0 records refused"),
        "{}",
        support::stdout(&out)
    );
    for table in ["user_directory", "user_metadata", "user_metadata_history"] {
        let n: i64 = admin
            .query_one(&format!("SELECT count(*) FROM umstore.{table}"), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 600 + 4 + 1_500, "{table} after the import");
    }
}
