//! Patroni as the operator configures it, on loopback: real PostgreSQL 15 servers each
//! run by Patroni, with the real kube-apiserver as the DCS (Patroni authenticates as a
//! ServiceAccount bound to the Role the operator renders for the database pods).
//!
//! Each member's `patroni.yml` is [`patroni::config`] for the tier-2 example, and its
//! `postgresql.conf` and `pg_hba.conf` are the rendered ones; only what a pod would
//! provide differs (ports, addresses, directories, the binaries' directory: the
//! harness fills those in), and TLS is off (the test clients connect without it).
//! Timings are the operator's own (ttl 20 s, loop_wait 5 s, retry_timeout 7 s).
//!
//! A writer commits numbered rows in a loop through the read-write path (libpq's
//! multi-host `target_session_attrs=read-write` over every member: what the read-write
//! Service selecting Patroni's role label gives in a cluster) while members are
//! killed (SIGKILL) or switched over; every row whose commit was acknowledged is
//! looked for afterwards.

#[path = "support/patroni.rs"]
mod fixture;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fixture::{members, operator_rules, tier2, RenderedConf};
use serde_json::Value;
use umstore_crds::{ReplicaPurpose, SynchronousMode};
use umstore_e2e::patroni::writer::{self, WriteLog, Writer};
use umstore_e2e::{connect, shared, KubeApiServer, PatroniCluster};
use umstore_operator::builders::patroni;
use umstore_operator::builders::postgres::PgRole;

/// How long a cluster may take to bootstrap (initdb, then each standby's basebackup).
const BOOTSTRAP: Duration = Duration::from_secs(90);
/// How long a failover may take: ttl + loop_wait, with room for a loaded machine.
const FAILOVER: Duration = Duration::from_secs(60);
/// Acknowledged writes wanted before and after a kill or switchover.
const WRITES: usize = 30;

/// Each test runs up to three PostgreSQL servers and three Patronis on a small
/// machine: one at a time, so failover times mean something.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn kube() -> Option<&'static KubeApiServer> {
    shared().kube_api_or_skip()
}

/// Waits on the harness's blocking calls without stalling the test's runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Every acknowledged row is on `member` (read over its own port); returns how many
/// rows it has.
async fn assert_all_acknowledged_present(cluster: &PatroniCluster, member: &str, log: &WriteLog) {
    let (missing, rows) = writer::missing_on(cluster, member, log)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes are missing on {member}: {missing:?}",
        missing.len(),
        log.acknowledged.len()
    );
    eprintln!(
        "{member}: all {} acknowledged writes present ({rows} rows, {} failed attempts)",
        log.acknowledged.len(),
        log.failed.len()
    );
}

/// Waits until Patroni has put `value` in member `name`'s Pod role label.
async fn wait_for_pod_role(cluster: &Arc<PatroniCluster>, name: &str, value: &'static str) {
    let (cluster, name) = (cluster.clone(), name.to_owned());
    blocking(move || {
        cluster
            .wait_until(FAILOVER, &format!("{name}'s Pod labelled {value}"), || {
                cluster.pod_role(&name).ok().flatten().as_deref() == Some(value)
            })
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .await;
}

/// The PostgreSQL port that `conninfo` (the read-write path) lands on.
async fn read_write_port(cluster: &PatroniCluster) -> u16 {
    let client = connect(&cluster.read_write_conninfo("postgres"))
        .await
        .expect("connect through the read-write path");
    let row = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("inet_server_port()");
    u16::try_from(row.get::<_, i32>(0)).expect("a port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_writes_loses_no_acknowledged_write_in_synchronous_mode() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(kube) = kube() else { return };
    let v = tier2(SynchronousMode::On);
    let conf = RenderedConf::write(&v);
    let specs = members(&v, &conf, &PgRole::Coordinator, 0..3);
    let Some(mut cluster) = PatroniCluster::start_or_skip(kube, specs, &operator_rules()) else {
        return;
    };
    let leader = cluster
        .wait_for_leader(BOOTSTRAP)
        .unwrap_or_else(|e| panic!("{e}"));
    cluster
        .wait_for_replication(1, BOOTSTRAP)
        .unwrap_or_else(|e| panic!("{e}"));
    Writer::create_table(&cluster)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let started = Instant::now();
    let writer = Writer::start(cluster.read_write_conninfo("postgres")).expect("start the writer");
    writer
        .wait_for_writes(started, WRITES, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let killed_at = Instant::now();
    cluster.kill_member(&leader);
    let cluster = Arc::new(cluster);
    let new_leader = {
        let (cluster, old) = (cluster.clone(), leader.clone());
        blocking(move || cluster.wait_for_new_leader(Some(&old), FAILOVER))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let elected_after = killed_at.elapsed();
    writer
        .wait_for_writes(killed_at, WRITES, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = writer.finish();
    let resumed_after = log
        .resumed_after(killed_at)
        .expect("writes failed, then resumed");
    eprintln!(
        "leader {leader} killed: {new_leader} leader after {:.1}s, first write acknowledged \
         after {:.1}s (longest pause between writes {:.1}s)",
        elected_after.as_secs_f64(),
        resumed_after.as_secs_f64(),
        log.longest_pause().as_secs_f64()
    );

    // The read-write path lands on the new leader, whose Pod Patroni labelled.
    assert_eq!(
        read_write_port(&cluster).await,
        cluster.pg_port(&new_leader)
    );
    wait_for_pod_role(&cluster, &new_leader, patroni::PRIMARY).await;
    assert_all_acknowledged_present(&cluster, &new_leader, &log).await;

    // The killed member comes back as a replica of the new leader (pg_rewind), and
    // Patroni relabels its Pod.
    let mut cluster = Arc::try_unwrap(cluster).expect("no other handle");
    cluster
        .restart_member(&leader)
        .expect("restart the killed member");
    let cluster = Arc::new(cluster);
    {
        let cluster = cluster.clone();
        blocking(move || cluster.wait_for_replication(1, FAILOVER))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(cluster.leader().as_deref(), Some(new_leader.as_str()));
    wait_for_pod_role(&cluster, &leader, patroni::REPLICA).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_writes_moves_the_leader_and_loses_no_acknowledged_write() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(kube) = kube() else { return };
    // Asynchronous replication (the example's default): a switchover shuts the old
    // primary down cleanly, and its last WAL reaches the standbys before it stops.
    let v = tier2(SynchronousMode::Off);
    let conf = RenderedConf::write(&v);
    let specs = members(&v, &conf, &PgRole::Coordinator, 0..3);
    let Some(cluster) = PatroniCluster::start_or_skip(kube, specs, &operator_rules()) else {
        return;
    };
    let cluster = Arc::new(cluster);
    let leader = cluster
        .wait_for_leader(BOOTSTRAP)
        .unwrap_or_else(|e| panic!("{e}"));
    cluster
        .wait_for_replication(0, BOOTSTRAP)
        .unwrap_or_else(|e| panic!("{e}"));
    Writer::create_table(&cluster)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let candidate = cluster
        .member_names()
        .into_iter()
        .find(|m| *m != leader)
        .expect("a standby");

    let started = Instant::now();
    let writer = Writer::start(cluster.read_write_conninfo("postgres")).expect("start the writer");
    writer
        .wait_for_writes(started, WRITES, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let asked_at = Instant::now();
    let (status, message) = {
        let (cluster, leader, candidate) = (cluster.clone(), leader.clone(), candidate.clone());
        blocking(move || cluster.switchover(&leader, &candidate))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let answered_after = asked_at.elapsed();
    assert_eq!(status, 200, "POST /switchover: {message}");
    assert_eq!(
        cluster.leader().as_deref(),
        Some(candidate.as_str()),
        "the candidate leads after the switchover ({message})"
    );
    writer
        .wait_for_writes(asked_at, WRITES, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = writer.finish();
    eprintln!(
        "switchover {leader} -> {candidate}: answered after {:.1}s, writes resumed after {}, \
         longest pause between writes {:.1}s",
        answered_after.as_secs_f64(),
        log.resumed_after(asked_at)
            .map_or("no failed write".to_owned(), |d| format!(
                "{:.1}s",
                d.as_secs_f64()
            )),
        log.longest_pause().as_secs_f64()
    );
    // A switchover is planned: writes pause for a clean hand-over, well under the
    // leader lock's ttl that a failover waits out.
    let ttl = Duration::from_secs(u64::from(patroni::TTL));
    assert!(
        log.longest_pause() < ttl,
        "writes paused for {:.1}s (ttl {}s)",
        log.longest_pause().as_secs_f64(),
        ttl.as_secs()
    );

    assert_eq!(read_write_port(&cluster).await, cluster.pg_port(&candidate));
    wait_for_pod_role(&cluster, &candidate, patroni::PRIMARY).await;
    wait_for_pod_role(&cluster, &leader, patroni::REPLICA).await;
    assert_all_acknowledged_present(&cluster, &candidate, &log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_replica_is_never_promoted_even_as_the_last_member_left() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(kube) = kube() else { return };
    let v = tier2(SynchronousMode::Off);
    let conf = RenderedConf::write(&v);
    // Two coordinator members and one analytics pool member: one Patroni cluster.
    let analytics = PgRole::Replica {
        purpose: ReplicaPurpose::Analytics,
        replicas: 1,
    };
    let mut specs = members(&v, &conf, &PgRole::Coordinator, 0..2);
    specs.extend(members(&v, &conf, &analytics, 0..1));
    let pool_member = specs[2].name.clone();
    assert_eq!(specs[2].config["tags"]["nofailover"], true);
    let Some(mut cluster) = PatroniCluster::start_or_skip(kube, specs, &operator_rules()) else {
        return;
    };
    let leader = cluster
        .wait_for_leader(BOOTSTRAP)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(leader, pool_member);
    cluster
        .wait_for_replication(0, BOOTSTRAP)
        .unwrap_or_else(|e| panic!("{e}"));
    let standby = cluster
        .member_names()
        .into_iter()
        .find(|m| *m != leader && *m != pool_member)
        .expect("a coordinator standby");

    // The other coordinator member goes first, then the leader: the analytics member
    // is all that is left, and must stay a replica past the leader lock's expiry.
    cluster.kill_member(&standby);
    cluster.kill_member(&leader);
    let cluster = Arc::new(cluster);
    let watch = ttl_and_loop() * 2;
    {
        let (cluster, pool_member) = (cluster.clone(), pool_member.clone());
        blocking(move || {
            let until = Instant::now() + watch;
            while Instant::now() < until {
                assert_eq!(cluster.leader(), None, "a member took the leader lock");
                if let Some((role, _)) = cluster.member_state(&pool_member) {
                    assert_ne!(role, "leader", "the analytics member was promoted");
                }
                assert_ne!(
                    cluster.pod_role(&pool_member).ok().flatten().as_deref(),
                    Some(patroni::PRIMARY),
                    "the analytics member's Pod was labelled primary"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        })
        .await;
    }

    // A coordinator member back: it leads, the analytics member follows it.
    let mut cluster = Arc::try_unwrap(cluster).expect("no other handle");
    cluster
        .restart_member(&standby)
        .expect("restart the standby");
    let new_leader = cluster
        .wait_for_leader(FAILOVER)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(new_leader, standby);
    cluster
        .wait_for_replication(0, FAILOVER)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The operator's own code on what real Patroni publishes: `status.groups` from the
/// listed pods (role label, `status` annotation), the switchover the annotation
/// asks for sent to Patroni's REST API, and the leader change it reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reads_groups_from_real_pods_and_its_switchover_request_moves_the_leader() {
    use umstore_operator::steps::status::groups::leader_changes;
    use umstore_operator::steps::switchover;

    let _one = ONE_AT_A_TIME.lock().await;
    let Some(kube) = kube() else { return };
    let v = tier2(SynchronousMode::Off);
    let conf = RenderedConf::write(&v);
    let specs = members(&v, &conf, &PgRole::Coordinator, 0..2);
    let Some(cluster) = PatroniCluster::start_or_skip(kube, specs, &operator_rules()) else {
        return;
    };
    let cluster = Arc::new(cluster);
    let leader = cluster
        .wait_for_leader(BOOTSTRAP)
        .unwrap_or_else(|e| panic!("{e}"));
    cluster
        .wait_for_replication(0, BOOTSTRAP)
        .unwrap_or_else(|e| panic!("{e}"));
    let standby = cluster
        .member_names()
        .into_iter()
        .find(|m| *m != leader)
        .expect("a standby");
    let scope = patroni::group(&v, &PgRole::Coordinator);

    let before = settled_groups(&cluster, &leader, &standby).await;
    let group = &before[0];
    assert_eq!(group.name, scope);
    assert_eq!(group.members.len(), 2);
    let lead = group
        .members
        .iter()
        .find(|m| m.name == leader)
        .expect("the leader listed");
    assert_eq!(lead.role, patroni::PRIMARY);
    assert_eq!(lead.state.as_deref(), Some("running"));
    assert_eq!(lead.timeline, Some(1));
    let replica = group
        .members
        .iter()
        .find(|m| m.name == standby)
        .expect("the standby listed");
    assert!(
        replica.lag_bytes.is_some_and(|lag| lag >= 0),
        "a replica's lag is known: {replica:?}"
    );

    // `umstore.io/switchover-to: <standby>` on the store: the step finds the group
    // and its leader, and Patroni accepts the request the operator sends.
    let mut store: umstore_crds::UserMetadataStore = serde_json::from_value(serde_json::json!({
        "apiVersion": "umstore.io/v1alpha1", "kind": "UserMetadataStore",
        "metadata": {"name": "s", "namespace": cluster.namespace(),
                     "annotations": {switchover::SWITCHOVER_ANNOTATION: standby}},
        "spec": {},
    }))
    .expect("a store");
    let wanted = switchover::wanted(&store, &before).expect("a valid request");
    assert_eq!(
        wanted,
        Some((scope.clone(), leader.clone(), standby.clone()))
    );
    let answer = switchover::request("127.0.0.1", cluster.api_port(&leader), &leader, &standby)
        .await
        .unwrap_or_else(|e| panic!("Patroni refused the operator's switchover: {e}"));
    eprintln!("Patroni: {}", answer.trim());

    let after = settled_groups(&cluster, &standby, &leader).await;
    assert_eq!(
        leader_changes(&before, &after),
        vec![(scope.clone(), leader.clone(), standby.clone())],
        "the leader change the Event reports"
    );
    let promoted = after[0]
        .members
        .iter()
        .find(|m| m.name == standby)
        .expect("the new leader listed");
    assert_eq!(
        promoted.timeline,
        Some(2),
        "a switchover starts a new timeline"
    );

    // Acted on once: the same annotation, recorded in status, asks for nothing more.
    store.status = Some(umstore_crds::UserMetadataStoreStatus {
        switchover: Some(standby.clone()),
        ..Default::default()
    });
    assert_eq!(switchover::wanted(&store, &after), Ok(None));
    // A pod that is no member is refused with a message naming what to do.
    let annotations = store
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(
        switchover::SWITCHOVER_ANNOTATION.into(),
        "s-coordinator-9".into(),
    );
    let refused = switchover::wanted(&store, &after).expect_err("not a member");
    assert!(refused.contains("status.groups"), "{refused}");
}

/// `status.groups` as the status step makes it of the listed pods, once Patroni has
/// published `leader` as the leader and `standby` as a running replica (on the pod,
/// Patroni's state is PostgreSQL's: `running`, not the REST API's `streaming`).
async fn settled_groups(
    cluster: &Arc<PatroniCluster>,
    leader: &str,
    standby: &str,
) -> Vec<umstore_crds::GroupStatus> {
    use umstore_operator::steps::status::groups::groups;
    let (cluster, leader, standby) = (cluster.clone(), leader.to_owned(), standby.to_owned());
    blocking(move || {
        let mut seen = Vec::new();
        cluster
            .wait_until(FAILOVER, "status.groups to settle", || {
                let pods: Vec<k8s_openapi::api::core::v1::Pod> = cluster
                    .pods()
                    .unwrap_or_else(|e| panic!("{e}"))
                    .into_iter()
                    .map(|p| serde_json::from_value(p).expect("a Pod"))
                    .collect();
                seen = groups(&pods);
                seen.len() == 1
                    && seen[0].leader.as_deref() == Some(leader.as_str())
                    && seen[0].members.iter().any(|m| {
                        m.name == standby
                            && m.role == patroni::REPLICA
                            && m.state.as_deref() == Some("running")
                    })
            })
            .unwrap_or_else(|e| panic!("{e}; last seen: {seen:?}"));
        seen
    })
    .await
}

/// The operator's ttl plus loop_wait: how long after a leader dies the others may
/// take the lock.
fn ttl_and_loop() -> Duration {
    Duration::from_secs(u64::from(patroni::TTL + patroni::LOOP_WAIT))
}

/// One-member clusters, each in its own namespace, whose ServiceAccount has the
/// operator's Role with `remove` taken out (`(resource, verb)` pairs).
fn rules_without(remove: &[(&str, &str)]) -> Value {
    let mut rules = patroni::pod_rules();
    for rule in &mut rules {
        let resources = rule.resources.clone().unwrap_or_default();
        rule.verbs.retain(|verb| {
            !remove
                .iter()
                .any(|(r, v)| v == verb && resources.iter().any(|res| res == r))
        });
    }
    rules.retain(|r| !r.verbs.is_empty());
    serde_json::to_value(rules).expect("rules serialize")
}

/// A Role the database pods' ServiceAccount might have, and what Patroni makes of it.
struct RbacCase {
    what: String,
    rules: Value,
    /// What Patroni's log shows of the API server's refusal ("" for none).
    refusal: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_leads_with_the_operators_role_and_fails_without_any_one_of_its_verbs() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(kube) = kube() else { return };
    let v = tier2(SynchronousMode::Off);
    let conf = RenderedConf::write(&v);
    let mut cases = vec![RbacCase {
        what: "the operator's Role".into(),
        rules: operator_rules(),
        refusal: String::new(),
    }];
    // Every verb the Role grants is one Patroni calls. Without one of these the API
    // server refuses Patroni and it cannot lead, or leads unseen (its pod is never
    // labelled primary, so the read-write Service would find no one). The other two
    // cannot be provoked by a lone member: `get` on configmaps reads the leader lock
    // after a conflicting write (two members racing), and without `watch` Patroni's
    // caches fall back to listing every second.
    let breaks_a_lone_member = [
        ("configmaps", "list"),
        ("configmaps", "create"),
        ("configmaps", "patch"),
        ("pods", "list"),
        ("pods", "patch"),
    ];
    for rule in patroni::pod_rules() {
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                let pair = (resource.as_str(), verb.as_str());
                if !breaks_a_lone_member.contains(&pair) {
                    assert!(
                        matches!(pair, ("configmaps", "get" | "watch") | ("pods", "watch")),
                        "the Role grants {verb} on {resource}, which Patroni does not call"
                    );
                    continue;
                }
                // A refused list shows as the cache's error; the others by name.
                let refusal = if verb == "list" {
                    "ObjectCache.run ApiException".to_owned()
                } else {
                    format!(r#"cannot {verb} resource \\"{resource}\\""#)
                };
                cases.push(RbacCase {
                    what: format!("without {verb} on {resource}"),
                    rules: rules_without(&[pair]),
                    refusal,
                });
            }
        }
    }
    cases.push(RbacCase {
        what: "no rules".into(),
        rules: Value::Array(Vec::new()),
        refusal: "Can not get cluster from dcs".into(),
    });
    // One single-member cluster per case, each in its own namespace, all at once.
    let mut clusters = Vec::new();
    for case in &cases {
        let specs = members(&v, &conf, &PgRole::Coordinator, 0..1);
        let Some(cluster) = PatroniCluster::start_or_skip(kube, specs, &case.rules) else {
            return;
        };
        clusters.push(Arc::new(cluster));
    }

    let name = clusters[0].member_names().remove(0);
    let allowed = cases
        .iter()
        .zip(&clusters)
        .filter(|(c, _)| c.refusal.is_empty());
    for (case, cluster) in allowed {
        let what = case.what.clone();
        let leads = cluster.clone();
        blocking(move || leads.wait_for_leader(BOOTSTRAP))
            .await
            .unwrap_or_else(|e| panic!("with {what}: {e}"));
        wait_for_pod_role(cluster, &name, patroni::PRIMARY).await;
    }

    // The others had as long, and a lock's ttl more: each shows the refusal, and
    // none is labelled primary (the read-write Service would find no one).
    tokio::time::sleep(ttl_and_loop()).await;
    let mut failures = Vec::new();
    let refused = cases
        .iter()
        .zip(&clusters)
        .filter(|(c, _)| !c.refusal.is_empty());
    for (case, cluster) in refused {
        let what = &case.what;
        let log = std::fs::read_to_string(cluster.log(&name)).unwrap_or_default();
        if !log.contains(&case.refusal) {
            failures.push(format!(
                "{what}: Patroni's log does not show the refusal ({}):\n{}",
                case.refusal,
                log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
            ));
        }
        let labelled = cluster.pod_role(&name).ok().flatten().as_deref() == Some(patroni::PRIMARY);
        if labelled && cluster.leader().is_some() {
            failures.push(format!(
                "{what}: Patroni leads and its Pod is labelled primary all the same"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
