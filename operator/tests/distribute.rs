//! The distribute step (`steps::distribute::run`) as the pipeline runs it, on a real
//! Citus coordinator with two workers (the harness's, where Citus is built): a
//! tier-3 spec with two worker groups gets its tables distributed and each region on
//! its group, reconcile after reconcile, then holds still; reassigning one region
//! moves only it; a group whose primary Patroni has not registered yet is waited for.
//! On a PostgreSQL without Citus the step says what to change. Citus is in no package
//! registry: where `citus.so` is not installed the Citus tests say so and skip.

use std::collections::BTreeMap;

use tokio_postgres::{Client, NoTls};
use umstore_crds::UserMetadataStore;
use umstore_e2e::{shared, Citus};
use umstore_migrations::Runner;
use umstore_operator::apply::Observed;
use umstore_operator::steps::distribute::{self, Report};
use umstore_operator::steps::{Journal, Outcome, Reason};
use umstore_operator::validated::{validate, Validated};

fn store(groups: &str) -> Validated {
    let yaml = format!(
        r#"
apiVersion: umstore.io/v1alpha1
kind: UserMetadataStore
metadata: {{ name: pilot, namespace: umstore, uid: 00000000-0000-0000-0000-0000000000d3, generation: 1 }}
spec:
  tier: 3
  regions: [KA, TN, MH, DL]
  workerGroups:
{groups}
  encryption: {{ vaultAddress: "https://vault.example:8200" }}
"#
    );
    let store: UserMetadataStore = serde_yaml_ng::from_str(&yaml).expect("store parses");
    validate(&store).unwrap_or_else(|e| panic!("valid spec: {e}"))
}

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// Runs the step like successive reconciles until it is done; returns the last
/// report and every Event.
async fn reconcile_until_done(v: &Validated, admin: &Client) -> (Report, Journal) {
    let mut journal = Journal::default();
    for _ in 0..32 {
        let report = distribute::run(v, admin, &Observed::default(), &mut journal)
            .await
            .expect("the step runs");
        match &report.outcome {
            Outcome::Done(_) => return (report, journal),
            Outcome::Waiting(w) => assert_eq!(
                w.reason,
                Reason::PlacingRegions,
                "only placement takes more than one reconcile: {w:?}"
            ),
        }
    }
    panic!(
        "the step did not finish in 32 reconciles: {:?}",
        journal.events
    );
}

fn regions_of(report: &Report) -> BTreeMap<String, String> {
    report
        .placement
        .clone()
        .expect("placement observed")
        .regions
}

fn expected(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(r, g)| (r.to_string(), g.to_string()))
        .collect()
}

#[tokio::test]
async fn regions_land_on_their_worker_groups_and_a_reassigned_region_moves_alone() {
    let Some(citus) = Citus::start_or_skip() else {
        return;
    };
    let mut admin = connect(&citus.conninfo("postgres")).await;
    Runner::default().up(&mut admin).await.expect("migrations");

    let v =
        store("    - { name: south, regions: [KA, TN] }\n    - { name: north, regions: [MH, DL] }");
    // The harness registered its workers as Citus groups 1 and 2, the ids the
    // operator gives the spec's first two groups (what Patroni's citus.group says).
    assert_eq!(
        v.citus_groups,
        BTreeMap::from([("south".to_string(), 1), ("north".to_string(), 2)])
    );

    // Each region gets a shard of its own by its hash value: no two of the 36 may
    // share one, or they could never be placed apart.
    let distinct: i64 = admin
        .query_one(
            "SELECT count(DISTINCT worker_hash(region::char(2))) FROM umstore.regions",
            &[],
        )
        .await
        .expect("hashes")
        .get(0);
    assert_eq!(distinct, 36);

    let (report, journal) = reconcile_until_done(&v, &admin).await;
    assert_eq!(
        regions_of(&report),
        expected(&[
            ("KA", "south"),
            ("TN", "south"),
            ("MH", "north"),
            ("DL", "north")
        ]),
        "status.regions as pg_dist_placement shows it"
    );
    assert!(
        journal
            .events
            .iter()
            .any(|e| e.reason == Reason::Distributed),
        "{:?}",
        journal.events
    );
    assert!(!report.converting, "an empty store is not a conversion");

    // A further reconcile changes nothing and publishes nothing.
    let (again, quiet) = reconcile_until_done(&v, &admin).await;
    assert_eq!(regions_of(&again), regions_of(&report));
    assert!(quiet.events.is_empty(), "{:?}", quiet.events);

    // KA moves to north; TN, MH and DL stay where they are.
    let shards_before =
        umstore_migrations::citus::region_shards(&admin, &["TN".into(), "MH".into(), "DL".into()])
            .await
            .expect("shards");
    let moved =
        store("    - { name: south, regions: [TN] }\n    - { name: north, regions: [KA, MH, DL] }");
    let (report, journal) = reconcile_until_done(&moved, &admin).await;
    assert_eq!(
        regions_of(&report),
        expected(&[
            ("KA", "north"),
            ("TN", "south"),
            ("MH", "north"),
            ("DL", "north")
        ])
    );
    let moves: Vec<&str> = journal
        .events
        .iter()
        .filter(|e| e.reason == Reason::PlacingRegions)
        .map(|e| e.note.as_str())
        .collect();
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert!(moves[0].contains("moving region KA"), "{moves:?}");
    let shards_after =
        umstore_migrations::citus::region_shards(&admin, &["TN".into(), "MH".into(), "DL".into()])
            .await
            .expect("shards");
    assert_eq!(
        shards_before, shards_after,
        "the other regions did not move"
    );

    // A group whose primary is not in pg_dist_node yet is waited for, by name.
    let waiting = store(
        "    - { name: south, regions: [TN] }\n    - { name: north, regions: [KA, MH] }\n    - { name: east, regions: [DL] }",
    );
    let report = distribute::run(
        &waiting,
        &admin,
        &Observed::default(),
        &mut Journal::default(),
    )
    .await
    .expect("the step runs");
    match report.outcome {
        Outcome::Waiting(w) => {
            assert_eq!(w.reason, Reason::WorkersNotRegistered);
            assert!(w.message.contains("east (Citus group 3)"), "{}", w.message);
        }
        Outcome::Done(m) => panic!("done without east's primary: {m}"),
    }
}

#[tokio::test]
async fn without_citus_the_step_says_which_image_to_use() {
    let pg = shared()
        .postgres()
        .expect("PostgreSQL 15 (bash scripts/install-deps.sh --test)");
    let admin = connect(&pg.conninfo("postgres")).await;
    let v = store("    - { name: south, regions: [KA, TN, MH, DL] }");
    let report = distribute::run(&v, &admin, &Observed::default(), &mut Journal::default())
        .await
        .expect("the step runs");
    match report.outcome {
        Outcome::Waiting(w) => {
            assert_eq!(w.reason, Reason::CitusMissing);
            // Where the server offers the extension it is merely not created.
            let shipped: bool = admin
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'citus')",
                    &[],
                )
                .await
                .expect("pg_available_extensions")
                .get(0);
            let remedy = if shipped {
                "shared_preload_libraries"
            } else {
                "spec.postgres.image"
            };
            assert!(w.message.contains(remedy), "{}", w.message);
        }
        Outcome::Done(m) => panic!("distributed without Citus: {m}"),
    }
}
