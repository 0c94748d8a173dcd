//! The Patroni clusters as their pods report them: Patroni keeps each member's
//! role in the pod's role label and its state (`state`, `role`, `timeline`,
//! `xlog_location`) as JSON in the pod's `status` annotation. Pure functions over
//! the listed pods; the operator asks no member anything.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use umstore_crds::{GroupStatus, MemberStatus};

use crate::builders::patroni::{GROUP_LABEL, PRIMARY, REPLICA, ROLE_LABEL, SCOPE_LABEL};

/// The annotation in which Patroni's Kubernetes DCS publishes a member's state.
pub const PATRONI_STATUS_ANNOTATION: &str = "status";

/// Whether the pod's Ready condition is true.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Each group among `pods` (by their group label; a pod from before it, by its
/// scope label), members
/// sorted by name, with the WAL lag of each replica behind the leader.
pub fn groups(pods: &[Pod]) -> Vec<GroupStatus> {
    let mut by_scope: BTreeMap<String, Vec<(MemberStatus, Option<i64>)>> = BTreeMap::new();
    for pod in pods {
        // Pods from before the group label: their scope was their group.
        let Some(scope) = pod
            .labels()
            .get(GROUP_LABEL)
            .or_else(|| pod.labels().get(SCOPE_LABEL))
        else {
            continue;
        };
        let state: serde_json::Value = pod
            .annotations()
            .get(PATRONI_STATUS_ANNOTATION)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        let member = MemberStatus {
            name: pod.name_any(),
            role: pod.labels().get(ROLE_LABEL).cloned().unwrap_or_default(),
            state: state["state"].as_str().map(str::to_owned),
            timeline: state["timeline"].as_i64(),
            lag_bytes: None,
            ready: pod_ready(pod),
        };
        by_scope
            .entry(scope.clone())
            .or_default()
            .push((member, state["xlog_location"].as_i64()));
    }
    by_scope
        .into_iter()
        .map(|(name, mut members)| {
            members.sort_by(|a, b| a.0.name.cmp(&b.0.name));
            let leader = members.iter().find(|(m, _)| m.role == PRIMARY);
            let leader_name = leader.map(|(m, _)| m.name.clone());
            let leader_lsn = leader.and_then(|(_, lsn)| *lsn);
            GroupStatus {
                name,
                leader: leader_name,
                members: members
                    .into_iter()
                    .map(|(mut m, lsn)| {
                        if m.role == REPLICA {
                            m.lag_bytes = leader_lsn
                                .zip(lsn)
                                .map(|(leader, own)| (leader - own).max(0));
                        }
                        m
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Groups whose leader changed since `old`: `(group, old leader, new leader)`.
pub fn leader_changes(old: &[GroupStatus], new: &[GroupStatus]) -> Vec<(String, String, String)> {
    new.iter()
        .filter_map(|g| {
            let before = old.iter().find(|o| o.name == g.name)?.leader.clone()?;
            let now = g.leader.clone()?;
            (before != now).then(|| (g.name.clone(), before, now))
        })
        .collect()
}

/// Groups that have a leader and more than one member but no ready standby: a
/// failover now would have nothing to promote.
pub fn without_standby(groups: &[GroupStatus]) -> Vec<&GroupStatus> {
    groups
        .iter()
        .filter(|g| g.leader.is_some() && g.members.len() > 1)
        .filter(|g| !g.members.iter().any(|m| m.role == REPLICA && m.ready))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, scope: &str, role: &str, ready: bool, lsn: i64) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": {SCOPE_LABEL: scope, ROLE_LABEL: role},
                "annotations": {PATRONI_STATUS_ANNOTATION: json!({
                    "state": "running", "role": role, "timeline": 3, "xlog_location": lsn
                }).to_string()},
            },
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .expect("pod")
    }

    #[test]
    fn members_leader_and_lag_come_from_the_pods() {
        let pods = [
            pod("s-coordinator-1", "s-coordinator", "replica", true, 900),
            pod("s-coordinator-0", "s-coordinator", "primary", true, 1000),
            pod("s-worker-a-0", "s-worker-a", "primary", true, 50),
        ];
        let groups = groups(&pods);
        assert_eq!(groups.len(), 2);
        let c = &groups[0];
        assert_eq!(c.name, "s-coordinator");
        assert_eq!(c.leader.as_deref(), Some("s-coordinator-0"));
        assert_eq!(c.members[0].name, "s-coordinator-0");
        assert_eq!(c.members[0].lag_bytes, None, "the leader has no lag");
        assert_eq!(c.members[1].lag_bytes, Some(100));
        assert_eq!(c.members[1].timeline, Some(3));
        assert!(
            without_standby(&groups).is_empty(),
            "one member alone needs none"
        );
    }

    #[test]
    fn a_group_whose_standbys_are_not_ready_has_none() {
        let pods = [
            pod("s-coordinator-0", "s-coordinator", "primary", true, 10),
            pod("s-coordinator-1", "s-coordinator", "replica", false, 10),
        ];
        let groups = groups(&pods);
        assert_eq!(without_standby(&groups).len(), 1);
    }

    #[test]
    fn a_new_leader_is_a_change_a_missing_one_is_not() {
        let before = groups(&[
            pod("c-0", "c", "primary", true, 1),
            pod("c-1", "c", "replica", true, 1),
        ]);
        let after = groups(&[
            pod("c-0", "c", "replica", true, 1),
            pod("c-1", "c", "primary", true, 1),
        ]);
        assert_eq!(
            leader_changes(&before, &after),
            [("c".to_string(), "c-0".to_string(), "c-1".to_string())]
        );
        let none = groups(&[pod("c-0", "c", "replica", false, 1)]);
        assert!(leader_changes(&before, &none).is_empty());
        assert!(leader_changes(&before, &before).is_empty());
    }
}
