//! The status names the cause, on a control plane where pods really come and go
//! (`umstore_e2e::ControlPlane`: kube-apiserver, kube-controller-manager,
//! kube-scheduler, kwok), with the operator as the chart's ServiceAccount under the
//! chart's RBAC. Each cause is provoked the way a platform team meets it:
//!
//! 1. a coordinator whose claim names a StorageClass that does not exist
//!    (`fast-ssd`);
//! 2. a data plane asking for a GPU no node offers (`amd.com/gpu`);
//! 3. a coordinator image that cannot be pulled (kwok's pod stage for images under
//!    `unpullable.invalid/`, `e2e/kwok-stages/`);
//! 4. a coordinator that was ready and starts crash-looping (kwok's pod stage for a
//!    pod labelled `umstore.io/kwok-test=crash-loop`).
//!
//! Each shows in `status.components[].message`, in the `Ready` condition's message
//! where the store waits for that workload, and as a Warning Event with the same
//! words. No PostgreSQL answers here: the stores never get past bootstrap, which is
//! all these causes need.

#[path = "support/kubeapi.rs"]
mod kubeapi;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use umstore_crds::{ComponentStatus, UserMetadataStore, UserMetadataStoreStatus};
use umstore_e2e::shared;

use kubeapi::{
    admin_client, example, fresh_namespace, helm_or_skip, install_chart_rbac, install_crd,
    service_account_client, start_operator, TEST_MANAGER,
};

const OPERATOR_NS: &str = "umstore-system";
const IDENTITY: &str = "causes-replica";

fn component<'a>(status: &'a UserMetadataStoreStatus, name: &str) -> Option<&'a ComponentStatus> {
    status.components.iter().find(|c| c.name == name)
}

fn ready_message(status: &UserMetadataStoreStatus) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Waits until `name`'s component `workload` has a message containing every one of
/// `words`; returns that message and the status.
async fn wait_for_cause(
    stores: &Api<UserMetadataStore>,
    name: &str,
    workload: &str,
    words: &[&str],
) -> (String, UserMetadataStoreStatus) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = stores.get(name).await.ok().and_then(|s| s.status);
        let message = status
            .as_ref()
            .and_then(|s| component(s, workload))
            .and_then(|c| c.message.clone());
        if let (Some(m), Some(s)) = (&message, &status) {
            if words.iter().all(|w| m.contains(w)) {
                return (m.clone(), s.clone());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{name}: timed out waiting for {workload}'s cause to say {words:?}; status: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The Warning Event about store `name` with `reason`; its note.
async fn warning(admin: &Client, ns: &str, name: &str, reason: &str) -> String {
    let events: Api<Event> = Api::namespaced(admin.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = events
            .list(&ListParams::default())
            .await
            .expect("list Events");
        let found = list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some(reason)
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        });
        if let Some(note) = found.and_then(|e| e.note) {
            return note;
        }
        assert!(
            Instant::now() < deadline,
            "no Warning Event {reason} about {name}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn apply(stores: &Api<UserMetadataStore>, store: &serde_json::Value) {
    let name = store["metadata"]["name"]
        .as_str()
        .expect("a name")
        .to_string();
    stores
        .patch(
            &name,
            &PatchParams::apply(TEST_MANAGER),
            &Patch::Apply(store),
        )
        .await
        .unwrap_or_else(|e| panic!("apply store {name}: {e}"));
}

fn named(ns: &str, name: &str) -> serde_json::Value {
    let mut store = example(1, ns);
    store["metadata"]["name"] = json!(name);
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_names_why_a_workload_is_not_ready() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .try_init();
    let Some(cp) = shared().control_plane_or_skip() else {
        return;
    };
    let Some(helm) = helm_or_skip() else {
        return;
    };
    let admin = admin_client(cp.api()).await;
    install_crd(&admin).await;
    let ns = fresh_namespace(&admin, "causes").await;
    let rbac = install_chart_rbac(&admin, &helm, OPERATOR_NS).await;
    let operator_client =
        service_account_client(cp.api(), &admin, &rbac.namespace, &rbac.service_account).await;
    start_operator(operator_client, OPERATOR_NS, IDENTITY, |ctx| ctx);
    let stores: Api<UserMetadataStore> = Api::namespaced(admin.clone(), &ns);

    // All four at once: each waits on the cluster, not on the others.
    let mut no_class = named(&ns, "no-class");
    no_class["spec"]["postgres"]["coordinator"]["storage"]["storageClassName"] = json!("fast-ssd");
    apply(&stores, &no_class).await;
    let mut no_gpu = named(&ns, "no-gpu");
    no_gpu["spec"]["dataPlane"]["gpu"] = json!({"count": 1, "resourceName": "amd.com/gpu"});
    apply(&stores, &no_gpu).await;
    let mut no_image = named(&ns, "no-image");
    no_image["spec"]["postgres"]["image"] = json!("unpullable.invalid/umstore/postgres:missing");
    apply(&stores, &no_image).await;
    apply(&stores, &named(&ns, "crashing")).await;

    // 1. A StorageClass that does not exist, named before the scheduler's "unbound
    //    immediate PersistentVolumeClaims".
    let (message, status) = wait_for_cause(
        &stores,
        "no-class",
        "no-class-coordinator",
        &["StorageClass \"fast-ssd\" does not exist"],
    )
    .await;
    assert!(
        message.starts_with("PersistentVolumeClaim data-no-class-coordinator-0 is Pending"),
        "{message}"
    );
    assert!(
        ready_message(&status).contains(&message),
        "Ready says why: {}",
        ready_message(&status)
    );
    let note = warning(&admin, &ns, "no-class", "VolumeClaimPending").await;
    assert_eq!(note, format!("StatefulSet no-class-coordinator: {message}"));

    // 2. A GPU no node offers: the scheduler's own words.
    let (message, _) = wait_for_cause(
        &stores,
        "no-gpu",
        "no-gpu-data-plane",
        &["cannot be scheduled", "Insufficient amd.com/gpu"],
    )
    .await;
    assert!(message.starts_with("pod no-gpu-data-plane-"), "{message}");
    let note = warning(&admin, &ns, "no-gpu", "Unschedulable").await;
    assert_eq!(note, format!("Deployment no-gpu-data-plane: {message}"));

    // 3. An image that cannot be pulled.
    let (message, status) = wait_for_cause(
        &stores,
        "no-image",
        "no-image-coordinator",
        &[
            "image \"unpullable.invalid/umstore/postgres:missing\"",
            "cannot be pulled (ImagePullBackOff",
        ],
    )
    .await;
    assert!(ready_message(&status).contains(&message));
    let note = warning(&admin, &ns, "no-image", "ImagePullFailed").await;
    assert_eq!(note, format!("StatefulSet no-image-coordinator: {message}"));

    // 4. A coordinator that was ready, then crash-loops.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = stores.get("crashing").await.ok().and_then(|s| s.status);
        if status
            .as_ref()
            .and_then(|s| component(s, "crashing-coordinator"))
            .is_some_and(|c| c.ready && c.message.is_none())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "crashing's coordinator never became ready: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    pods.patch(
        "crashing-coordinator-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"umstore.io/kwok-test": "crash-loop"}}})),
    )
    .await
    .expect("label the coordinator's pod");
    let (message, status) = wait_for_cause(
        &stores,
        "crashing",
        "crashing-coordinator",
        &["is crash-looping (4 restarts, last exit: Error with code 1)"],
    )
    .await;
    assert!(
        message.starts_with("pod crashing-coordinator-0: container "),
        "{message}"
    );
    assert!(ready_message(&status).contains(&message));
    let note = warning(&admin, &ns, "crashing", "CrashLooping").await;
    assert_eq!(note, format!("StatefulSet crashing-coordinator: {message}"));

    // The store that only waits for its database: no cause is invented.
    let status = stores
        .get("no-gpu")
        .await
        .expect("no-gpu")
        .status
        .expect("status");
    let coordinator = component(&status, "no-gpu-coordinator").expect("coordinator");
    assert!(
        coordinator.ready && coordinator.message.is_none(),
        "{coordinator:?}"
    );
}
