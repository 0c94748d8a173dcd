//! Why a workload is not ready, in the words an operator on call needs: from what
//! the cluster reports on its pods and their volume claims, never from guessing.
//!
//! Looked at in this order, the first that applies wins, for the first pod (by
//! name) that is not ready:
//!
//! 1. a volume claim Pending: its StorageClass does not exist, it names none and
//!    the cluster has no default, or no volume was provisioned yet;
//! 2. the pod cannot be scheduled: the scheduler's own message (insufficient CPU,
//!    memory or GPUs, taints, a node selector matching no node);
//! 3. a container waiting: its image cannot be pulled, it is crash-looping (restart
//!    count, last exit), or it cannot be created;
//! 4. a container running but not ready: its readiness probe fails (the kubelet's
//!    last `Unhealthy` Event, when there is one).
//!
//! Gathering costs nothing while every workload is ready: the pods come from the
//! reconcile's one pod LIST; claims, StorageClasses and probe Events are read only
//! for a pod that is not ready and only as far as needed.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ContainerStatus, Event, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tracing::warn;
use umstore_crds::ComponentStatus;

use crate::steps::Reason;

/// The annotation that marks the cluster's default StorageClass.
const DEFAULT_CLASS_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";
/// The longest cause kept (the scheduler's messages can be long).
const MAX_MESSAGE: usize = 400;
/// Container waiting reasons that mean the image cannot be pulled.
const PULL_FAILURES: [&str; 5] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "RegistryUnavailable",
];
/// Container waiting reasons that mean it cannot be created or started.
const START_FAILURES: [&str; 4] = [
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "PreCreateHookError",
];

/// What the cluster reported about the store's pods that are not ready.
#[derive(Clone, Debug, Default)]
pub struct Evidence {
    /// The store's pods.
    pub pods: Vec<Pod>,
    /// The store's volume claims, by name (read only when a pod that is not ready
    /// mounts one).
    pub claims: BTreeMap<String, PersistentVolumeClaim>,
    /// StorageClasses named by a Pending claim that do not exist.
    pub missing_classes: BTreeSet<String>,
    /// Whether the cluster has a default StorageClass (looked up only for a Pending
    /// claim that names none).
    pub default_class: Option<bool>,
    /// The last readiness-probe failure the kubelet reported, by pod.
    pub probe_failures: BTreeMap<String, String>,
}

/// A cause: the Event reason it is reported under and the sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// The Warning Event's reason.
    pub reason: Reason,
    /// What is wrong and what to do.
    pub message: String,
}

impl Cause {
    fn new(reason: Reason, message: String) -> Self {
        let message = if message.chars().count() > MAX_MESSAGE {
            let mut cut: String = message.chars().take(MAX_MESSAGE - 1).collect();
            cut.push('…');
            cut
        } else {
            message
        };
        Self { reason, message }
    }
}

/// Whether `pod` belongs to `component` (a StatefulSet's pods are owned by it; a
/// Deployment's by a ReplicaSet named after it and the pod-template hash).
fn belongs(pod: &Pod, component: &ComponentStatus) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| match component.kind.as_str() {
            "StatefulSet" => o.kind == "StatefulSet" && o.name == component.name,
            "Deployment" => {
                o.kind == "ReplicaSet"
                    && o.name
                        .rsplit_once('-')
                        .is_some_and(|(deployment, _)| deployment == component.name)
            }
            _ => false,
        })
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The component's pods that are not ready, by name.
fn unready_pods<'a>(component: &ComponentStatus, pods: &'a [Pod]) -> Vec<&'a Pod> {
    let mut out: Vec<&Pod> = pods
        .iter()
        .filter(|p| belongs(p, component) && !pod_ready(p))
        .collect();
    out.sort_by_key(|p| p.name_any());
    out
}

fn claim_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .map(|v| {
            v.iter()
                .filter_map(|v| v.persistent_volume_claim.as_ref())
                .map(|c| c.claim_name.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn claim_pending(claim: &PersistentVolumeClaim) -> bool {
    claim.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound")
}

fn running_unready(status: &ContainerStatus) -> bool {
    !status.ready && status.state.as_ref().is_some_and(|s| s.running.is_some())
}

/// Reads what [`explain`] needs beyond the pods: the claims of pods that are not
/// ready (one LIST), each StorageClass a Pending claim names (one GET each), and
/// the last `Unhealthy` Event of a pod whose container runs but is not ready (one
/// LIST each, at most three pods). Nothing at all while every workload is ready. A
/// read the API refuses leaves that part of the evidence out (logged), never the
/// reconcile.
pub async fn gather(
    client: &Client,
    namespace: &str,
    selector: &str,
    components: &[ComponentStatus],
    pods: Vec<Pod>,
) -> Evidence {
    let mut evidence = Evidence {
        pods,
        ..Evidence::default()
    };
    let unready: Vec<Pod> = components
        .iter()
        .filter(|c| !c.ready)
        .flat_map(|c| unready_pods(c, &evidence.pods))
        .cloned()
        .collect();
    if unready.is_empty() {
        return evidence;
    }
    if unready.iter().any(|p| !claim_names(p).is_empty()) {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
        match api.list(&ListParams::default().labels(selector)).await {
            Ok(list) => {
                evidence.claims = list.items.into_iter().map(|c| (c.name_any(), c)).collect()
            }
            Err(error) => warn!(%error, "listing the store's volume claims"),
        }
    }
    let classes = Api::<StorageClass>::all(client.clone());
    let mut looked: BTreeSet<String> = BTreeSet::new();
    for claim in evidence.claims.values().filter(|c| claim_pending(c)) {
        match claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
        {
            Some(class) if !class.is_empty() => {
                if !looked.insert(class.clone()) {
                    continue;
                }
                match classes.get_opt(&class).await {
                    Ok(None) => {
                        evidence.missing_classes.insert(class);
                    }
                    Ok(Some(_)) => {}
                    Err(error) => warn!(%error, %class, "reading a StorageClass"),
                }
            }
            _ if evidence.default_class.is_none() => {
                match classes.list(&ListParams::default()).await {
                    Ok(list) => {
                        evidence.default_class = Some(list.items.iter().any(|c| {
                            c.annotations()
                                .get(DEFAULT_CLASS_ANNOTATION)
                                .map(String::as_str)
                                == Some("true")
                        }))
                    }
                    Err(error) => warn!(%error, "listing StorageClasses"),
                }
            }
            _ => {}
        }
    }
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let probing = unready.iter().filter(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| c.iter().any(running_unready))
    });
    for pod in probing.take(3) {
        let name = pod.name_any();
        let params = ListParams::default().fields(&format!(
            "involvedObject.kind=Pod,involvedObject.name={name},reason=Unhealthy"
        ));
        match events.list(&params).await {
            Ok(list) => {
                let last = list
                    .items
                    .into_iter()
                    .filter(|e| e.message.as_deref().is_some_and(|m| m.contains("eadiness")))
                    .max_by_key(|e| {
                        e.last_timestamp
                            .as_ref()
                            .map(|t| t.0)
                            .or_else(|| e.event_time.as_ref().map(|t| t.0))
                    });
                if let Some(message) = last.and_then(|e| e.message) {
                    evidence.probe_failures.insert(name, message);
                }
            }
            Err(error) => warn!(%error, pod = %name, "listing a pod's Unhealthy Events"),
        }
    }
    evidence
}

/// Why `component` is not ready, if the cluster says: see the module's order.
pub fn explain(component: &ComponentStatus, evidence: &Evidence) -> Option<Cause> {
    if component.ready {
        return None;
    }
    unready_pods(component, &evidence.pods)
        .into_iter()
        .find_map(|pod| explain_pod(pod, evidence))
}

fn explain_pod(pod: &Pod, evidence: &Evidence) -> Option<Cause> {
    let name = pod.name_any();
    for claim_name in claim_names(pod) {
        let Some(claim) = evidence.claims.get(&claim_name) else {
            continue;
        };
        if !claim_pending(claim) {
            continue;
        }
        let class = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .filter(|c| !c.is_empty());
        let message = match &class {
            Some(class) if evidence.missing_classes.contains(class) => format!(
                "PersistentVolumeClaim {claim_name} is Pending: StorageClass \"{class}\" does not \
                 exist; create it or set the store's storageClassName to one that does \
                 (kubectl get storageclass)"
            ),
            None if evidence.default_class == Some(false) => format!(
                "PersistentVolumeClaim {claim_name} is Pending: it names no StorageClass and the \
                 cluster has no default one; set the store's storageClassName or mark a class \
                 as the default"
            ),
            Some(class) => format!(
                "PersistentVolumeClaim {claim_name} is Pending: StorageClass \"{class}\" has not \
                 provisioned a volume yet (kubectl describe pvc {claim_name})"
            ),
            None => format!(
                "PersistentVolumeClaim {claim_name} is Pending: no volume has been provisioned \
                 yet (kubectl describe pvc {claim_name})"
            ),
        };
        return Some(Cause::new(Reason::VolumeClaimPending, message));
    }
    let status = pod.status.as_ref()?;
    if let Some(unscheduled) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        let why = unscheduled
            .message
            .as_deref()
            .filter(|m| !m.is_empty())
            .or(unscheduled.reason.as_deref())
            .unwrap_or("no reason given");
        return Some(Cause::new(
            Reason::Unschedulable,
            format!("pod {name} cannot be scheduled: {}", why.trim()),
        ));
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers.clone() {
        if let Some(cause) = explain_container(&name, c) {
            return Some(cause);
        }
    }
    if let Some(c) = containers.clone().find(|c| running_unready(c)) {
        let detail = evidence
            .probe_failures
            .get(&name)
            .map(|m| format!(": {}", m.trim()))
            .unwrap_or_else(|| format!(" (kubectl describe pod {name})"));
        return Some(Cause::new(
            Reason::ProbeFailing,
            format!(
                "pod {name}: container {} is running but its readiness probe fails{detail}",
                c.name
            ),
        ));
    }
    if status.phase.as_deref() == Some("Failed") {
        let why = status
            .message
            .as_deref()
            .or(status.reason.as_deref())
            .unwrap_or("its containers exited");
        return Some(Cause::new(
            Reason::ContainerFailing,
            format!("pod {name} failed: {why}"),
        ));
    }
    None
}

fn explain_container(pod: &str, c: &ContainerStatus) -> Option<Cause> {
    let state = c.state.as_ref()?;
    if let Some(waiting) = &state.waiting {
        let reason = waiting.reason.as_deref().unwrap_or_default();
        let detail = waiting
            .message
            .as_deref()
            .filter(|m| !m.is_empty())
            .map(|m| format!(": {}", m.trim()))
            .unwrap_or_default();
        if PULL_FAILURES.contains(&reason) {
            return Some(Cause::new(
                Reason::ImagePullFailed,
                format!(
                    "pod {pod}: image \"{}\" of container {} cannot be pulled ({reason}{detail}); \
                     check the image name and tag and the pull secret",
                    c.image, c.name
                ),
            ));
        }
        if reason == "CrashLoopBackOff" {
            let last = c
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| {
                    let why = t.reason.as_deref().unwrap_or("exited");
                    format!(", last exit: {why} with code {}", t.exit_code)
                })
                .unwrap_or_default();
            return Some(Cause::new(
                Reason::CrashLooping,
                format!(
                    "pod {pod}: container {} is crash-looping ({} restarts{last}); see kubectl \
                     logs {pod} -c {} --previous",
                    c.name, c.restart_count, c.name
                ),
            ));
        }
        if START_FAILURES.contains(&reason) {
            return Some(Cause::new(
                Reason::ContainerFailing,
                format!(
                    "pod {pod}: container {} cannot start ({reason}{detail})",
                    c.name
                ),
            ));
        }
    }
    if let Some(t) = &state.terminated {
        if t.exit_code != 0 {
            let why = t.reason.as_deref().unwrap_or("exited");
            return Some(Cause::new(
                Reason::ContainerFailing,
                format!(
                    "pod {pod}: container {} exited ({why}, code {})",
                    c.name, t.exit_code
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn component(name: &str, kind: &str) -> ComponentStatus {
        ComponentStatus {
            name: name.into(),
            kind: kind.into(),
            replicas: 1,
            ready_replicas: 0,
            ready: false,
            message: None,
        }
    }

    fn pod(name: &str, owner: (&str, &str), status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": owner.0, "name": owner.1, "uid": "u"
            }]},
            "spec": {
                "containers": [{"name": "postgres", "image": "pg"}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": format!("data-{name}")}}]
            },
            "status": status,
        }))
        .expect("a pod")
    }

    fn claim(name: &str, class: Option<&str>, phase: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"storageClassName": class},
            "status": {"phase": phase},
        }))
        .expect("a claim")
    }

    fn sts_pod(status: serde_json::Value) -> Pod {
        pod(
            "pilot-coordinator-0",
            ("StatefulSet", "pilot-coordinator"),
            status,
        )
    }

    fn explain_one(pods: Vec<Pod>, evidence: Evidence) -> Option<Cause> {
        explain(
            &component("pilot-coordinator", "StatefulSet"),
            &Evidence { pods, ..evidence },
        )
    }

    #[test]
    fn a_missing_storage_class_is_named_before_the_scheduler_message() {
        let p = sts_pod(json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/2 nodes are available: pod has unbound immediate PersistentVolumeClaims."
        }]}));
        let mut evidence = Evidence::default();
        evidence.claims.insert(
            "data-pilot-coordinator-0".into(),
            claim("data-pilot-coordinator-0", Some("fast-ssd"), "Pending"),
        );
        evidence.missing_classes.insert("fast-ssd".into());
        let cause = explain_one(vec![p], evidence).expect("a cause");
        assert_eq!(cause.reason, Reason::VolumeClaimPending);
        assert!(
            cause
                .message
                .contains("StorageClass \"fast-ssd\" does not exist"),
            "{}",
            cause.message
        );
    }

    #[test]
    fn a_claim_without_class_and_no_default_says_so() {
        let p = sts_pod(json!({"phase": "Pending"}));
        let evidence = Evidence {
            claims: [(
                "data-pilot-coordinator-0".to_string(),
                claim("data-pilot-coordinator-0", None, "Pending"),
            )]
            .into(),
            default_class: Some(false),
            ..Evidence::default()
        };
        let cause = explain_one(vec![p], evidence).expect("a cause");
        assert!(
            cause.message.contains("no default one"),
            "{}",
            cause.message
        );
    }

    #[test]
    fn an_unschedulable_pod_carries_the_scheduler_message() {
        let p = sts_pod(json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
        }]}));
        let cause = explain_one(vec![p], Evidence::default()).expect("a cause");
        assert_eq!(cause.reason, Reason::Unschedulable);
        assert_eq!(
            cause.message,
            "pod pilot-coordinator-0 cannot be scheduled: 0/3 nodes are available: 3 \
             Insufficient nvidia.com/gpu."
        );
    }

    #[test]
    fn image_pull_crash_loop_and_probe_are_told_apart() {
        let pull = sts_pod(json!({"phase": "Pending", "containerStatuses": [{
            "name": "postgres", "image": "registry.invalid/pg:1", "imageID": "", "ready": false,
            "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}
        }]}));
        let cause = explain_one(vec![pull], Evidence::default()).expect("a cause");
        assert_eq!(cause.reason, Reason::ImagePullFailed);
        assert!(cause.message.contains("\"registry.invalid/pg:1\""));

        let crash = sts_pod(json!({"phase": "Running", "containerStatuses": [{
            "name": "postgres", "image": "pg", "imageID": "", "ready": false, "restartCount": 7,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}
        }]}));
        let cause = explain_one(vec![crash], Evidence::default()).expect("a cause");
        assert_eq!(cause.reason, Reason::CrashLooping);
        assert!(
            cause
                .message
                .contains("(7 restarts, last exit: Error with code 1)"),
            "{}",
            cause.message
        );

        let probing = sts_pod(json!({"phase": "Running", "containerStatuses": [{
            "name": "postgres", "image": "pg", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"running": {}}
        }]}));
        let evidence = Evidence {
            probe_failures: [(
                "pilot-coordinator-0".to_string(),
                "Readiness probe failed: connection refused".to_string(),
            )]
            .into(),
            ..Evidence::default()
        };
        let cause = explain_one(vec![probing.clone()], evidence).expect("a cause");
        assert_eq!(cause.reason, Reason::ProbeFailing);
        assert!(cause
            .message
            .ends_with("readiness probe fails: Readiness probe failed: connection refused"));
        let cause = explain_one(vec![probing], Evidence::default()).expect("a cause");
        assert!(cause
            .message
            .ends_with("(kubectl describe pod pilot-coordinator-0)"));
    }

    #[test]
    fn deployment_pods_are_matched_through_their_replica_set_and_ready_pods_say_nothing() {
        let dp = pod(
            "pilot-data-plane-7d9f-abcde",
            ("ReplicaSet", "pilot-data-plane-7d9f"),
            json!({"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "message": "0/1 nodes are available"
            }]}),
        );
        let c = component("pilot-data-plane", "Deployment");
        let evidence = Evidence {
            pods: vec![dp.clone()],
            ..Evidence::default()
        };
        assert_eq!(
            explain(&c, &evidence).map(|c| c.reason),
            Some(Reason::Unschedulable)
        );
        // Another workload's pods are not this one's.
        assert_eq!(
            explain(&component("pilot-coordinator", "StatefulSet"), &evidence),
            None
        );
        let ready = pod(
            "pilot-coordinator-0",
            ("StatefulSet", "pilot-coordinator"),
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}),
        );
        assert_eq!(explain_one(vec![ready], Evidence::default()), None);
    }

    #[test]
    fn a_long_scheduler_message_is_cut() {
        let long = "x".repeat(2000);
        let p = sts_pod(json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "message": long
        }]}));
        let cause = explain_one(vec![p], Evidence::default()).expect("a cause");
        assert_eq!(cause.message.chars().count(), MAX_MESSAGE);
    }
}
