//! The moves step (`steps::moves::run`) as the pipeline runs it on a tier-4
//! store: two real PostgreSQL servers play the coordinators of the home
//! cluster (north) and south, reached through the operator's connector at the
//! Service names the store's layout gives them, as the operator's superuser.
//! A store that ran with every region at home and now gives KA and TN to south
//! gets them moved, one region per reconcile, with its status following the
//! home cluster's placement; after that the step holds still.

use std::collections::BTreeMap;

use tokio_postgres::Client;
use umstore_crds::{ClusterStatus, UserMetadataStore};
use umstore_e2e::Postgres;
use umstore_migrations::Runner;
use umstore_operator::builders::credentials::{generate_password, Credentials, Role};
use umstore_operator::db::Connector;
use umstore_operator::steps::bootstrap::{bootstrap, ensure_database};
use umstore_operator::steps::moves;
use umstore_operator::steps::{Journal, Reason};
use umstore_operator::validated::{validate, Validated};

const HOME: &str = "pilot-coordinator.umstore.svc";
const SOUTH: &str = "pilot-south-coordinator.umstore.svc";

fn credentials() -> Credentials {
    Credentials {
        passwords: Role::ALL
            .iter()
            .map(|r| (*r, generate_password().expect("password")))
            .collect(),
        ..Credentials::default()
    }
}

/// A tier-4 store of two clusters that ran with every region at home
/// (`status.schemaVersion` set, no `status.clusters` yet).
fn store() -> Validated {
    let yaml = r#"
apiVersion: umstore.io/v1alpha1
kind: UserMetadataStore
metadata: { name: pilot, namespace: umstore, uid: 00000000-0000-0000-0000-0000000000e4, generation: 2 }
spec:
  tier: 4
  regions: [KA, TN, DL]
  clusters:
    - name: north
      workerGroups: [{ name: n1, regions: [DL] }]
    - name: south
      workerGroups: [{ name: s1, regions: [KA, TN] }]
  encryption: { vaultAddress: "https://vault.example:8200" }
status:
  schemaVersion: 13
"#;
    let store: UserMetadataStore = serde_yaml_ng::from_str(yaml).expect("store parses");
    validate(&store).unwrap_or_else(|e| panic!("valid spec: {e}"))
}

/// A server with the image's `postgres` superuser, bootstrapped and migrated
/// as the operator's steps leave a cluster.
async fn coordinator(credentials: &Credentials) -> Postgres {
    let pg = Postgres::start_with_replicas(0).expect("start PostgreSQL");
    let local = pg.connect("postgres").await.expect("connect");
    local
        .batch_execute(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'postgres') THEN
                 CREATE ROLE postgres SUPERUSER LOGIN;
               END IF;
             END $$",
        )
        .await
        .expect("postgres role");
    ensure_database(&local).await.expect("database");
    let mut client = pg.connect("umstore").await.expect("connect umstore");
    // Plain PostgreSQL coordinators: bootstrapped as below tier 3 (no Citus).
    bootstrap(&mut client, credentials, 2)
        .await
        .expect("bootstrap");
    Runner::default().up(&mut client).await.expect("migrate");
    pg
}

async fn count(client: &Client, region: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM umstore.user_metadata WHERE region = $1::text::bpchar",
            &[&region],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_given_to_another_cluster_move_there_one_per_reconcile() {
    let creds = credentials();
    let north = coordinator(&creds).await;
    let south = coordinator(&creds).await;
    let connector = Connector::in_cluster()
        .with_address(HOME, 5432, ("127.0.0.1".to_string(), north.port()))
        .with_address(SOUTH, 5432, ("127.0.0.1".to_string(), south.port()));
    let home = north.connect("umstore").await.expect("home");
    let other = south.connect("umstore").await.expect("south");
    for (region, users) in [("KA", 3_000i64), ("TN", 1_000), ("DL", 500)] {
        home.execute(
            "WITH u AS (INSERT INTO umstore.user_directory (user_id, region)
                        SELECT gen_random_uuid(), $1::text::bpchar FROM generate_series(1, $2::int8)
                        RETURNING user_id, region)
             INSERT INTO umstore.user_metadata (user_id, region, gender)
             SELECT user_id, region, 'female' FROM u",
            &[&region, &users],
        )
        .await
        .expect("seed");
    }

    let v = store();
    assert_eq!(
        v.clusters[0].holds,
        ["DL", "KA", "TN"],
        "held at home first"
    );
    let mut statuses: Vec<ClusterStatus> = ["north", "south"]
        .iter()
        .map(|name| ClusterStatus {
            name: (*name).into(),
            home: *name == "north",
            ready: true,
            ..Default::default()
        })
        .collect();

    let mut reasons = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..3 {
        let mut journal = Journal::default();
        let moved = moves::run(&v, &connector, &creds, &mut statuses, &mut journal)
            .await
            .expect("the step runs");
        assert_eq!(moved.failed, None);
        pending.push(moved.pending);
        reasons.extend(journal.events.iter().map(|e| (e.reason, e.note.clone())));
        let regions: BTreeMap<&str, Vec<String>> = statuses
            .iter()
            .map(|s| (s.name.as_str(), s.regions.clone()))
            .collect();
        println!("pending {}: {regions:?}", moved.pending);
        let journal = moved.journal.expect("journal read");
        assert!(journal.iter().all(|m| m.phase == "done"), "{journal:?}");
    }
    // One region per reconcile, then nothing.
    assert_eq!(pending, [1, 0, 0]);
    let kinds: Vec<Reason> = reasons.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        kinds,
        [
            Reason::RegionMoving,
            Reason::RegionMoved,
            Reason::RegionMoving,
            Reason::RegionMoved
        ],
        "{reasons:?}"
    );
    assert!(
        // 3,000 users: a directory row and a metadata row each.
        reasons[1]
            .1
            .starts_with("region KA moved from cluster north to cluster south: 6000 rows"),
        "{}",
        reasons[1].1
    );
    assert!(reasons[1].1.contains("held back"), "{}", reasons[1].1);
    assert_eq!(statuses[0].regions, ["DL"]);
    assert_eq!(statuses[1].regions, ["KA", "TN"]);
    assert_eq!(count(&other, "KA").await, 3_000);
    assert_eq!(count(&other, "TN").await, 1_000);
    assert_eq!(count(&home, "KA").await, 0);
    assert_eq!(count(&home, "DL").await, 500);
    let placement: Vec<(String, String)> = home
        .query(
            "SELECT region::text, cluster FROM umstore.region_placement ORDER BY 1",
            &[],
        )
        .await
        .expect("placement")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        placement,
        [
            ("DL".to_owned(), "north".to_owned()),
            ("KA".to_owned(), "south".to_owned()),
            ("TN".to_owned(), "south".to_owned())
        ]
    );

    // A cluster that is not ready holds a move back without failing it.
    let back = {
        let yaml = r#"
apiVersion: umstore.io/v1alpha1
kind: UserMetadataStore
metadata: { name: pilot, namespace: umstore, uid: 00000000-0000-0000-0000-0000000000e4, generation: 3 }
spec:
  tier: 4
  regions: [KA, TN, DL]
  clusters:
    - name: north
      workerGroups: [{ name: n1, regions: [DL, TN] }]
    - name: south
      workerGroups: [{ name: s1, regions: [KA] }]
  encryption: { vaultAddress: "https://vault.example:8200" }
status:
  schemaVersion: 13
  clusters:
    - { name: north, ready: true, readWrite: x, regions: [DL] }
    - { name: south, ready: true, readWrite: x, regions: [KA, TN] }
"#;
        let store: UserMetadataStore = serde_yaml_ng::from_str(yaml).expect("store parses");
        validate(&store).expect("valid")
    };
    assert_eq!(back.clusters[1].holds, ["KA", "TN"]);
    statuses[0].ready = false;
    let mut journal = Journal::default();
    let moved = moves::run(&back, &connector, &creds, &mut statuses, &mut journal)
        .await
        .expect("the step runs");
    assert_eq!((moved.pending, moved.failed), (1, None));
    assert!(journal.events.is_empty(), "{:?}", journal.events);
    assert_eq!(count(&other, "TN").await, 1_000);
}
