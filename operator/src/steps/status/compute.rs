//! The status a reconcile observed, computed from the [`Progress`] the pipeline
//! reached and the status it found: pure functions, covered by table tests.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use umstore_crds::{
    condition, ClusterStatus, ComponentStatus, Endpoints, Phase, UserMetadataStoreStatus,
};

use crate::apply::Observed;
use crate::builders::credentials::{read_write_endpoint, Role};
use crate::builders::Object;
use crate::meta::{API_PORT, PG_PORT};
use crate::steps::topology::ready_replicas;
use crate::steps::{Progress, Reason, Step};
use crate::validated::Validated;

/// Readiness of the desired workloads, from the objects observed at the start of the
/// reconcile (a workload created in this reconcile counts as not ready).
pub fn components(desired: &[Object], observed: &Observed) -> Vec<ComponentStatus> {
    let mut out: Vec<ComponentStatus> = desired
        .iter()
        .filter_map(|o| {
            let (kind, replicas) = match o {
                Object::StatefulSet(s) => ("StatefulSet", s.spec.replicas.unwrap_or(1)),
                Object::Deployment(d) => ("Deployment", d.spec.replicas.unwrap_or(1)),
                _ => return None,
            };
            let ready_replicas = ready_replicas(observed, kind, o.name());
            Some(ComponentStatus {
                name: o.name().to_string(),
                kind: kind.to_string(),
                replicas,
                ready_replicas,
                ready: ready_replicas >= replicas,
                message: None,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The endpoints clients use.
pub fn endpoints(v: &Validated) -> Endpoints {
    let owner = &v.owner;
    let (host, port) = read_write_endpoint(v);
    Endpoints {
        read_write: format!("{host}:{port}"),
        replica_pools: v
            .pool_purposes()
            .iter()
            .filter(|_| v.endpoint_tier >= 2)
            .map(|p| {
                let service = owner.child(&format!("replica-{}", p.as_str()));
                (
                    p.as_str().to_string(),
                    format!("{}:{PG_PORT}", owner.service_host(&service)),
                )
            })
            .collect(),
        api: format!("{}:{API_PORT}", owner.service_host(&owner.child("api"))),
        secrets: Role::CLIENTS
            .iter()
            .map(|r| {
                (
                    r.purpose_slug().to_string(),
                    r.connection_secret_name(owner),
                )
            })
            .collect(),
    }
}

/// Each cluster of a store with `spec.clusters`, home first: whether its
/// database workloads are ready (and why not), the regions it holds and its
/// endpoints.
pub fn clusters(v: &Validated, components: &[ComponentStatus]) -> Vec<ClusterStatus> {
    crate::builders::clusters::layout(v)
        .into_iter()
        .zip(&v.clusters)
        .map(|(layout, cluster)| {
            let view = v.for_cluster(cluster);
            let prefix = view.owner.child(&view.cluster_prefix());
            // The cluster's database workloads: `<store>-<prefix>{coordinator,worker-*,replica-*}`.
            let ours = |name: &str| {
                name.strip_prefix(&prefix).is_some_and(|rest| {
                    rest == "coordinator"
                        || view
                            .spec
                            .worker_groups
                            .iter()
                            .any(|g| rest == format!("worker-{}", g.name))
                        || rest.starts_with("replica-")
                })
            };
            let mine: Vec<&ComponentStatus> = components.iter().filter(|c| ours(&c.name)).collect();
            let waiting = mine.iter().find(|c| !c.ready);
            ClusterStatus {
                name: cluster.name.clone(),
                home: cluster.home,
                ready: !mine.is_empty() && waiting.is_none(),
                message: waiting.map(|c| match &c.message {
                    Some(cause) => {
                        format!("{} {}/{} ({cause})", c.name, c.ready_replicas, c.replicas)
                    }
                    None => format!("{} {}/{}", c.name, c.ready_replicas, c.replicas),
                }),
                regions: layout.regions,
                read_write: layout.primary.display(),
                replica_pools: layout
                    .replicas
                    .into_iter()
                    .map(|(purpose, e)| (purpose, e.display()))
                    .collect(),
                schema_version: None,
                max_lag_bytes: None,
            }
        })
        .collect()
}

/// The workloads not ready yet, as `name ready/desired`.
fn not_ready(components: &[ComponentStatus]) -> Vec<String> {
    components
        .iter()
        .filter(|c| !c.ready)
        .map(|c| match &c.message {
            Some(cause) => format!("{} {}/{} ({cause})", c.name, c.ready_replicas, c.replicas),
            None => format!("{} {}/{}", c.name, c.ready_replicas, c.replicas),
        })
        .collect()
}

pub(super) fn condition(
    type_: &str,
    ok: bool,
    reason: Reason,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.as_str().to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Keeps each new condition's `lastTransitionTime` from the old one of the same type
/// when the status is unchanged; keeps old conditions of types this step does not
/// compute (later steps own them).
pub fn merge_conditions(old: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    let mut merged: BTreeMap<String, Condition> =
        old.iter().map(|c| (c.type_.clone(), c.clone())).collect();
    for mut c in new {
        if let Some(prev) = merged.get(&c.type_) {
            if prev.status == c.status {
                c.last_transition_time = prev.last_transition_time.clone();
            }
        }
        merged.insert(c.type_.clone(), c);
    }
    merged.into_values().collect()
}

/// The status a reconcile that reached `progress` observed, given the status it
/// found (`old`) and the store's generation. Pure: the table tests cover it.
pub fn compute(
    old: &UserMetadataStoreStatus,
    generation: Option<i64>,
    progress: &Progress,
    now: &Time,
) -> UserMetadataStoreStatus {
    let cond = |type_: &str, ok: bool, reason: Reason, message: String| {
        condition(type_, ok, reason, message, generation, now)
    };
    let r = match progress {
        Progress::Invalid(w) => {
            // Nothing else was looked at: keep what was observed before.
            let conditions = vec![
                cond(condition::PROVISIONED, false, w.reason, w.message.clone()),
                cond(condition::READY, false, w.reason, w.message.clone()),
            ];
            return UserMetadataStoreStatus {
                observed_generation: generation,
                phase: Some(Phase::Invalid),
                conditions: merge_conditions(&old.conditions, conditions),
                ..old.clone()
            };
        }
        Progress::Reached(r) => r,
    };
    let all_ready = progress.all_ready();

    // Each step's condition: true once it finished, false with the pipeline's reason
    // where it stopped; the conditions of steps not reached are left as they were.
    let mut new_conditions: Vec<Condition> = r
        .steps
        .iter()
        .map(|s| cond(s.step.condition(), s.done, s.reason, s.message.clone()))
        .collect();
    let ready = match &r.waiting {
        Some(w) => cond(condition::READY, false, w.reason, w.message.clone()),
        None if all_ready => cond(
            condition::READY,
            true,
            Reason::AllComponentsReady,
            format!("{} workloads ready", r.components.len()),
        ),
        None => {
            let waiting = not_ready(&r.components);
            cond(
                condition::READY,
                false,
                Reason::ComponentsNotReady,
                format!("waiting for {}", waiting.join(", ")),
            )
        }
    };
    new_conditions.push(ready);

    // A raised tier is a promotion until every component of the new tier is ready;
    // status.tier moves only then, so it always names the tier that is running.
    // The tier's objects are in place once topology finished, even while later
    // steps (bootstrap, migrate) still wait.
    let target = r.tier;
    let promoting_from = old.tier.filter(|t| target > *t);
    let provisioned = r.passed(Step::Provision);
    // Into Citus, the promotion also waits for the tables and regions to be placed.
    let promoted = provisioned && all_ready && (target < 3 || r.passed(Step::Distribute));
    let tier = match (provisioned, old.tier) {
        (true, None) => Some(target),
        (true, Some(_)) if promoting_from.is_none() || promoted => Some(target),
        _ => old.tier,
    };
    if let Some(from) = promoting_from {
        new_conditions.push(if promoted {
            cond(
                condition::PROMOTING,
                false,
                Reason::PromotionComplete,
                format!("running tier {target}"),
            )
        } else {
            let stage = match &r.waiting {
                Some(w) if r.steps.last().is_some_and(|s| s.step == Step::Distribute) => {
                    w.message.clone()
                }
                _ if r.converting => "tables holding rows were distributed".to_string(),
                _ => {
                    let waiting = not_ready(&r.components);
                    if waiting.is_empty() {
                        "waiting for the steps after provisioning".to_string()
                    } else {
                        format!(
                            "waiting for {} (clients stay on the primary until the pooler and \
                             the replica pools are ready)",
                            waiting.join(", ")
                        )
                    }
                }
            };
            cond(
                condition::PROMOTING,
                true,
                Reason::TierRaised,
                format!("promoting from tier {from} to tier {target}: {stage}"),
            )
        });
    }

    let mut degraded_reasons = Vec::new();
    if let Some(msg) = &r.demotion_refused {
        degraded_reasons.push((Reason::DemotionRefused, msg.clone()));
    }
    for g in super::groups::without_standby(&r.groups) {
        degraded_reasons.push((
            Reason::NoHealthyStandby,
            format!(
                "{} has no ready standby: a failover now would have nothing to promote \
                 (see status.groups and the pods of {})",
                g.name, g.name
            ),
        ));
    }
    degraded_reasons.extend(r.degraded.iter().cloned());
    // The home cluster holds the store back through its components and steps;
    // another cluster that is not ready is named here.
    for c in r.clusters.iter().filter(|c| !c.home && !c.ready) {
        degraded_reasons.push((
            Reason::ClusterNotReady,
            format!(
                "cluster {} is not ready: {}",
                c.name,
                c.message
                    .as_deref()
                    .unwrap_or("its workloads are not ready yet")
            ),
        ));
    }
    if !r.vault_configured {
        degraded_reasons.push((
            Reason::NoVault,
            "spec.encryption.vaultAddress is unset: the data plane refuses to start in Kubernetes \
             without Vault (local keys are for development only); set a Vault or OpenBao address"
                .to_string(),
        ));
    }
    new_conditions.push(match degraded_reasons.first() {
        Some((reason, _)) => {
            let message = degraded_reasons
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            cond(condition::DEGRADED, true, *reason, message)
        }
        None => cond(
            condition::DEGRADED,
            false,
            Reason::AsExpected,
            "nothing needs attention".to_string(),
        ),
    });

    let phase = if r.waiting.is_some() || !all_ready {
        Phase::Provisioning
    } else if !degraded_reasons.is_empty() {
        Phase::Degraded
    } else {
        Phase::Ready
    };

    UserMetadataStoreStatus {
        observed_generation: generation,
        tier,
        phase: Some(phase),
        conditions: merge_conditions(&old.conditions, new_conditions),
        components: r.components.clone(),
        groups: r.groups.clone(),
        switchover: r.switchover.clone(),
        endpoints: Some(r.endpoints.clone()),
        clusters: r.clusters.clone(),
        region_moves: r
            .region_moves
            .clone()
            .unwrap_or_else(|| old.region_moves.clone()),
        schema_version: r.schema_version.or(old.schema_version),
        replica_lag: r
            .replica_lag
            .clone()
            .unwrap_or_else(|| old.replica_lag.clone()),
        stats_views: r
            .stats_views
            .clone()
            .unwrap_or_else(|| old.stats_views.clone()),
        placement: r
            .placement
            .as_ref()
            .map_or_else(|| old.placement.clone(), |p| p.by_group.clone()),
        regions: r
            .placement
            .as_ref()
            .map_or_else(|| old.regions.clone(), |p| p.regions.clone()),
        draining: r
            .placement
            .as_ref()
            .map_or_else(|| old.draining.clone(), |p| p.draining.clone()),
        worker_group_ids: if r.tier >= 3 {
            r.worker_group_ids.clone()
        } else {
            old.worker_group_ids.clone()
        },
        keys: r
            .keys
            .as_ref()
            .and_then(|k| k.status.clone())
            .or_else(|| old.keys.clone()),
        key_version: r
            .keys
            .as_ref()
            .and_then(|k| k.status.as_ref())
            .and_then(|k| k.version)
            .or(old.key_version),
        last_key_rotation: r
            .keys
            .as_ref()
            .and_then(|k| k.status.as_ref())
            .and_then(|k| k.last_rotation.clone())
            .or_else(|| old.last_key_rotation.clone()),
        promotion: r.promotion.clone().or_else(|| old.promotion.clone()),
        backup: r.backup.clone().or_else(|| old.backup.clone()),
        migrations: match &r.migrations {
            Some(m) => m.clone().map(|mut m| {
                // An approval keeps the generation it was first acted on at.
                if let Some(prev) = old.migrations.as_ref() {
                    if prev.approved == m.approved && prev.approved_generation.is_some() {
                        m.approved_generation = prev.approved_generation;
                    }
                }
                m
            }),
            None => old.migrations.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::{Reached, Waiting};
    use umstore_crds::{GroupStatus, MemberStatus, ReplicaLag};

    fn cond(type_: &str, status: &str, reason: &str, time: i64) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(
                k8s_openapi::jiff::Timestamp::from_second(time).unwrap_or_default(),
            ),
        }
    }

    #[test]
    fn unchanged_status_keeps_its_transition_time() {
        let old = vec![
            cond("Ready", "False", "ComponentsNotReady", 100),
            cond("SchemaReady", "True", "Migrated", 50),
        ];
        let merged = merge_conditions(&old, vec![cond("Ready", "False", "InvalidSpec", 200)]);
        let ready = merged.iter().find(|c| c.type_ == "Ready").expect("ready");
        assert_eq!(
            ready.last_transition_time, old[0].last_transition_time,
            "status unchanged"
        );
        assert_eq!(ready.reason, "InvalidSpec", "reason still updated");
        assert!(
            merged.iter().any(|c| c.type_ == "SchemaReady"),
            "other steps' conditions kept"
        );
    }

    #[test]
    fn changed_status_takes_the_new_transition_time() {
        let old = vec![cond("Ready", "False", "ComponentsNotReady", 100)];
        let merged = merge_conditions(&old, vec![cond("Ready", "True", "AllComponentsReady", 200)]);
        assert_eq!(
            merged[0].last_transition_time,
            cond("x", "", "", 200).last_transition_time
        );
    }

    #[test]
    fn the_ready_message_carries_each_workloads_cause() {
        let mut r = reached(1, false);
        r.components[0].message = Some("pod p-0 cannot be scheduled: 0/1 nodes".into());
        let progress = through_migrate(r);
        let status = compute(
            &UserMetadataStoreStatus::default(),
            Some(1),
            &progress,
            &Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        );
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        let name = &status.components[0].name;
        assert_eq!(
            ready.message,
            format!("waiting for {name} 0/1 (pod p-0 cannot be scheduled: 0/1 nodes)")
        );
    }

    fn component(name: &str, ready: bool) -> ComponentStatus {
        ComponentStatus {
            name: name.into(),
            kind: "StatefulSet".into(),
            replicas: 1,
            ready_replicas: i32::from(ready),
            ready,
            message: None,
        }
    }

    fn reached(tier: i32, ready: bool) -> Reached {
        Reached {
            tier,
            demotion_refused: None,
            vault_configured: true,
            components: vec![component("s-coordinator", ready)],
            groups: Vec::new(),
            switchover: None,
            endpoints: Endpoints::default(),
            steps: Vec::new(),
            waiting: None,
            schema_version: None,
            replica_lag: None,
            worker_group_ids: BTreeMap::new(),
            placement: None,
            converting: false,
            ..Reached::default()
        }
    }

    fn through_migrate(mut r: Reached) -> Progress {
        r.done(Step::Provision, Reason::Applied, "applied");
        r.done(Step::Bootstrap, Reason::Bootstrapped, "bootstrapped");
        r.done(Step::Migrate, Reason::Migrated, "schema at version 9");
        r.schema_version = Some(9);
        Progress::Reached(Box::new(r))
    }

    fn running(tier: i32) -> UserMetadataStoreStatus {
        UserMetadataStoreStatus {
            tier: Some(tier),
            conditions: vec![cond("Ready", "True", "AllComponentsReady", 10)],
            ..UserMetadataStoreStatus::default()
        }
    }

    fn get<'a>(s: &'a UserMetadataStoreStatus, type_: &str) -> Option<&'a Condition> {
        s.conditions.iter().find(|c| c.type_ == type_)
    }

    /// (case, old status, progress) → (phase, tier, Ready reason, other expected
    /// `(type, status, reason)` conditions).
    #[test]
    fn status_follows_where_the_pipeline_stopped() {
        let invalid = Waiting::new(Reason::InvalidSpec, "spec.tier: 7 is not 1-4", None);
        let at_bootstrap = reached(1, true).stopped(
            Step::Bootstrap,
            Waiting::new(Reason::CoordinatorNotReady, "waiting", None),
        );
        let mut provisioned = reached(1, false);
        provisioned.done(Step::Provision, Reason::Applied, "applied");
        let at_bootstrap_after_provision = provisioned.stopped(
            Step::Bootstrap,
            Waiting::new(Reason::CoordinatorNotReady, "waiting", None),
        );
        let mut no_vault = reached(1, true);
        no_vault.vault_configured = false;
        let mut no_standby = reached(2, true);
        no_standby.groups = vec![GroupStatus {
            name: "s-coordinator".into(),
            leader: Some("s-coordinator-0".into()),
            members: ["primary", "replica"]
                .iter()
                .enumerate()
                .map(|(i, role)| MemberStatus {
                    name: format!("s-coordinator-{i}"),
                    role: role.to_string(),
                    state: Some("running".into()),
                    timeline: Some(1),
                    lag_bytes: None,
                    ready: *role == "primary",
                })
                .collect(),
        }];
        let mut demoted = reached(2, true);
        demoted.demotion_refused = Some("tier 1 is below the running tier 2".into());
        type Row<'a> = (
            &'a str,
            UserMetadataStoreStatus,
            Progress,
            Phase,
            Option<i32>,
            &'a str,
            Vec<(&'a str, &'a str, &'a str)>,
        );
        let table: Vec<Row> = vec![
            (
                "invalid spec",
                running(1),
                Progress::Invalid(invalid),
                Phase::Invalid,
                Some(1),
                "InvalidSpec",
                vec![("Provisioned", "False", "InvalidSpec")],
            ),
            (
                "first reconcile, coordinator not ready",
                UserMetadataStoreStatus::default(),
                at_bootstrap_after_provision,
                Phase::Provisioning,
                Some(1),
                "CoordinatorNotReady",
                vec![
                    ("Provisioned", "True", "Applied"),
                    ("Bootstrapped", "False", "CoordinatorNotReady"),
                ],
            ),
            (
                "stopped before provisioning finished keeps the old tier",
                UserMetadataStoreStatus::default(),
                at_bootstrap,
                Phase::Provisioning,
                None,
                "CoordinatorNotReady",
                vec![("Bootstrapped", "False", "CoordinatorNotReady")],
            ),
            (
                "everything ready",
                UserMetadataStoreStatus::default(),
                through_migrate(reached(1, true)),
                Phase::Ready,
                Some(1),
                "AllComponentsReady",
                vec![
                    ("SchemaReady", "True", "Migrated"),
                    ("Degraded", "False", "AsExpected"),
                ],
            ),
            (
                "ran through, a workload not ready",
                UserMetadataStoreStatus::default(),
                through_migrate(reached(1, false)),
                Phase::Provisioning,
                Some(1),
                "ComponentsNotReady",
                vec![],
            ),
            (
                "tier raised, new components not ready",
                running(1),
                through_migrate(reached(2, false)),
                Phase::Provisioning,
                Some(1),
                "ComponentsNotReady",
                vec![("Promoting", "True", "TierRaised")],
            ),
            (
                "tier raised and ready",
                running(1),
                through_migrate(reached(2, true)),
                Phase::Ready,
                Some(2),
                "AllComponentsReady",
                vec![("Promoting", "False", "PromotionComplete")],
            ),
            (
                "raised into Citus, all ready, regions still being placed",
                running(2),
                {
                    let mut r = reached(3, true);
                    r.done(Step::Provision, Reason::Applied, "applied");
                    r.done(Step::Bootstrap, Reason::Bootstrapped, "bootstrapped");
                    r.done(Step::Migrate, Reason::Migrated, "schema at version 9");
                    r.stopped(
                        Step::Distribute,
                        Waiting::new(Reason::PlacingRegions, "moving region KA", None),
                    )
                },
                Phase::Provisioning,
                Some(2),
                "PlacingRegions",
                vec![
                    ("Promoting", "True", "TierRaised"),
                    ("Distributed", "False", "PlacingRegions"),
                ],
            ),
            (
                "raised into Citus and distributed",
                running(2),
                {
                    let mut r = reached(3, true);
                    r.done(Step::Provision, Reason::Applied, "applied");
                    r.done(Step::Bootstrap, Reason::Bootstrapped, "bootstrapped");
                    r.done(Step::Migrate, Reason::Migrated, "schema at version 9");
                    r.done(Step::Distribute, Reason::RegionsPlaced, "placed");
                    Progress::Reached(Box::new(r))
                },
                Phase::Ready,
                Some(3),
                "AllComponentsReady",
                vec![
                    ("Promoting", "False", "PromotionComplete"),
                    ("Distributed", "True", "RegionsPlaced"),
                ],
            ),
            (
                "no Vault",
                UserMetadataStoreStatus::default(),
                through_migrate(no_vault),
                Phase::Degraded,
                Some(1),
                "AllComponentsReady",
                vec![("Degraded", "True", "NoVault")],
            ),
            (
                "a group without a ready standby",
                running(2),
                through_migrate(no_standby),
                Phase::Degraded,
                Some(2),
                "AllComponentsReady",
                vec![("Degraded", "True", "NoHealthyStandby")],
            ),
            (
                "demotion refused",
                running(2),
                through_migrate(demoted),
                Phase::Degraded,
                Some(2),
                "AllComponentsReady",
                vec![("Degraded", "True", "DemotionRefused")],
            ),
        ];
        let now = cond("x", "", "", 500).last_transition_time;
        for (case, old, progress, phase, tier, ready, others) in table {
            let s = compute(&old, Some(3), &progress, &now);
            assert_eq!(s.phase, Some(phase), "{case}: phase");
            assert_eq!(s.tier, tier, "{case}: tier");
            assert_eq!(s.observed_generation, Some(3), "{case}");
            let r = get(&s, "Ready").unwrap_or_else(|| panic!("{case}: no Ready"));
            assert_eq!(r.reason, ready, "{case}: Ready reason");
            for (type_, status, reason) in others {
                let c = get(&s, type_).unwrap_or_else(|| panic!("{case}: no {type_}"));
                assert_eq!(
                    (c.status.as_str(), c.reason.as_str()),
                    (status, reason),
                    "{case}: {type_}"
                );
            }
        }
    }

    #[test]
    fn replica_lag_is_the_probes_when_it_measured_else_the_last_one() {
        let lag = |pod: &str, bytes: i64| ReplicaLag {
            pool: "ai".into(),
            pod: pod.into(),
            lag_bytes: bytes,
            lag_seconds: Some(0.0),
        };
        let old = UserMetadataStoreStatus {
            replica_lag: vec![lag("s-replica-ai-0", 10), lag("s-replica-ai-1", 20)],
            ..running(2)
        };
        let now = cond("x", "", "", 500).last_transition_time;
        let mut measured = reached(2, true);
        measured.replica_lag = Some(vec![lag("s-replica-ai-0", 0)]);
        let s = compute(&old, Some(2), &through_migrate(measured), &now);
        assert_eq!(
            s.replica_lag,
            [lag("s-replica-ai-0", 0)],
            "a member no longer streaming is absent"
        );
        let s = compute(&old, Some(2), &through_migrate(reached(2, true)), &now);
        assert_eq!(s.replica_lag, old.replica_lag, "not measured: kept");
        let mut none = reached(2, true);
        none.replica_lag = Some(Vec::new());
        let s = compute(&old, Some(2), &through_migrate(none), &now);
        assert!(s.replica_lag.is_empty(), "measured, no member streams");
    }

    #[test]
    fn invalid_spec_keeps_components_and_the_ready_transition_time() {
        let old = UserMetadataStoreStatus {
            components: vec![component("s-coordinator", true)],
            conditions: vec![cond("Ready", "False", "ComponentsNotReady", 10)],
            ..UserMetadataStoreStatus::default()
        };
        let now = cond("x", "", "", 500).last_transition_time;
        let s = compute(
            &old,
            Some(2),
            &Progress::Invalid(Waiting::new(Reason::InvalidSpec, "bad", None)),
            &now,
        );
        assert_eq!(s.components, old.components);
        let ready = get(&s, "Ready").expect("Ready");
        assert_eq!(ready.reason, "InvalidSpec");
        assert_eq!(
            ready.last_transition_time,
            old.conditions[0].last_transition_time
        );
    }

    #[test]
    fn the_same_progress_twice_computes_the_same_status() {
        let now = cond("x", "", "", 500).last_transition_time;
        let later = cond("x", "", "", 900).last_transition_time;
        let progress = through_migrate(reached(1, true));
        let first = compute(
            &UserMetadataStoreStatus::default(),
            Some(1),
            &progress,
            &now,
        );
        let second = compute(&first, Some(1), &progress, &later);
        assert_eq!(first, second, "no write on an unchanged store");
    }
}
