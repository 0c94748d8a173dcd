//! Patroni's Citus integration as the operator configures tier 3, on loopback: a
//! coordinator (Citus group 0) and a worker group (group 1) in one Patroni scope, real
//! PostgreSQL 15 with Citus under Patroni, the real kube-apiserver as the DCS with the
//! operator's Role for the database pods.
//!
//! The worker group's leader is SIGKILLed while a writer commits rows of a distributed
//! table through the coordinator: Patroni promotes the standby, the coordinator's
//! Patroni points `pg_dist_node` at it (no operator action), distributed writes resume
//! and every acknowledged row is there.
//!
//! Citus is in no package registry: where `citus.so` is not installed the test says so
//! and skips (the one component exempt from `UMSTORE_REQUIRE_COMPONENTS`).

#[path = "support/patroni.rs"]
mod fixture;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fixture::{members, operator_rules, tier3, RenderedConf};
use umstore_e2e::localpg::PgBinaries;
use umstore_e2e::patroni::writer::{self, Writer, TABLE};
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_e2e::{connect, shared, PatroniCluster};
use umstore_migrations::roles::DATABASE;
use umstore_operator::builders::patroni;
use umstore_operator::builders::postgres::PgRole;

const BOOTSTRAP: Duration = Duration::from_secs(120);
const FAILOVER: Duration = Duration::from_secs(90);
const WRITES: usize = 30;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// The port `pg_dist_node` names as group `group`'s primary, read on `coordinator`.
async fn registered_primary(
    cluster: &PatroniCluster,
    coordinator: &str,
    group: i32,
) -> Option<u16> {
    let client = connect(&cluster.member_conninfo(coordinator, DATABASE))
        .await
        .ok()?;
    let row = client
        .query_opt(
            "SELECT nodeport FROM pg_dist_node \
             WHERE groupid = $1 AND noderole = 'primary' AND isactive",
            &[&group],
        )
        .await
        .ok()??;
    u16::try_from(row.get::<_, i32>(0)).ok()
}

/// Waits until `pg_dist_node` names `member` as group `group`'s primary.
async fn wait_for_registration(
    cluster: &PatroniCluster,
    coordinator: &str,
    group: i32,
    member: &str,
    timeout: Duration,
) {
    let want = cluster.pg_port(member);
    let deadline = Instant::now() + timeout;
    loop {
        let seen = registered_primary(cluster, coordinator, group).await;
        if seen == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pg_dist_node on {coordinator} names port {seen:?} as group {group}'s primary, \
             not {member} ({want}), after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citus_worker_group_failover_moves_pg_dist_node_and_distributed_writes_resume() {
    let Some(kube) = shared().kube_api_or_skip() else {
        return;
    };
    let bins = PgBinaries::discover().expect("PostgreSQL binaries");
    if !bins.has_citus() {
        skip_or_fail(
            Component::Citus,
            "citus.so is not installed: build Citus from source to run this test",
        );
        return;
    }
    let v = tier3();
    let conf = RenderedConf::write(&v);
    let group = &v.spec.worker_groups[0];
    let worker = PgRole::Worker {
        group: &group.name,
        replicas: 2,
    };
    let citus_group = patroni::citus_group(&v, &worker).expect("a worker group has a Citus group");
    let coordinators = members(&v, &conf, &PgRole::Coordinator, 0..1);
    let workers = members(&v, &conf, &worker, 0..2);
    let coordinator_names: Vec<String> = coordinators.iter().map(|m| m.name.clone()).collect();
    let worker_names: Vec<String> = workers.iter().map(|m| m.name.clone()).collect();
    let Some(mut cluster) = PatroniCluster::start_or_skip(
        kube,
        coordinators.into_iter().chain(workers).collect(),
        &operator_rules(),
    ) else {
        return;
    };

    let coordinator = cluster
        .wait_for_new_leader_of(&coordinator_names, None, BOOTSTRAP)
        .unwrap_or_else(|e| panic!("{e}"));
    let leader = cluster
        .wait_for_new_leader_of(&worker_names, None, BOOTSTRAP)
        .unwrap_or_else(|e| panic!("{e}"));
    let standby = worker_names
        .iter()
        .find(|n| **n != leader)
        .expect("a second worker member")
        .clone();
    // Synchronous mode: only the standby Patroni has recorded as synchronous may be
    // promoted, so the kill waits for that (the group's own `GET /cluster`).
    cluster
        .wait_until(
            BOOTSTRAP,
            &format!("{standby} a streaming sync standby"),
            || {
                let Ok((200, state)) = cluster.rest_get(&standby, "/cluster") else {
                    return false;
                };
                state["members"].as_array().is_some_and(|members| {
                    members.iter().any(|m| {
                        m["name"] == standby.as_str()
                            && m["role"] == "sync_standby"
                            && m["state"] == "streaming"
                    })
                })
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    // Patroni registered the worker group's leader, without anyone calling citus_add_node.
    wait_for_registration(&cluster, &coordinator, citus_group, &leader, BOOTSTRAP).await;

    let through_coordinator = cluster.member_conninfo(&coordinator, DATABASE);
    let client = connect(&through_coordinator)
        .await
        .expect("connect to the coordinator");
    client
        .batch_execute(&format!(
            "CREATE TABLE {TABLE} (id bigint PRIMARY KEY); \
             SELECT create_distributed_table('{TABLE}', 'id');"
        ))
        .await
        .expect("a distributed table");
    let placements: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) \
             WHERE n.groupid = $1",
            &[&citus_group],
        )
        .await
        .expect("placements")
        .get(0);
    assert!(
        placements > 0,
        "no shard of {TABLE} is placed on group {citus_group}"
    );
    drop(client);

    let started = Instant::now();
    let writer = Writer::start(through_coordinator).expect("start the writer");
    writer
        .wait_for_writes(started, WRITES, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let killed_at = Instant::now();
    cluster.kill_member(&leader);
    let cluster = Arc::new(cluster);
    let promoted = {
        let (cluster, names, old) = (cluster.clone(), worker_names.clone(), leader.clone());
        blocking(move || cluster.wait_for_new_leader_of(&names, Some(&old), FAILOVER))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(promoted, standby, "the worker group's standby is promoted");
    let elected_after = killed_at.elapsed();
    wait_for_registration(&cluster, &coordinator, citus_group, &promoted, FAILOVER).await;
    let registered_after = killed_at.elapsed();
    writer
        .wait_for_writes(killed_at, WRITES, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = writer.finish();
    eprintln!(
        "worker group failover: {promoted} elected after {elected_after:?}, in pg_dist_node \
         after {registered_after:?}; writes resumed after {:?}; {} acknowledged, {} failed",
        log.resumed_after(killed_at),
        log.acknowledged.len(),
        log.failed.len()
    );
    let (missing, rows) = writer::missing_in(&cluster, &coordinator, DATABASE, &log)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged distributed writes are missing after the worker failover \
         (synchronous mode on): {missing:?}",
        missing.len(),
        log.acknowledged.len()
    );
    assert!(rows >= log.acknowledged.len());
}
