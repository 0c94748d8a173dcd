//! A tier-4 store with several Citus clusters on a control plane where pods really
//! come and go (`umstore_e2e::ControlPlane`: kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok), with the operator as the chart's
//! ServiceAccount under the chart's RBAC: each cluster's database pods land only on
//! the nodes of its zones (and its node selector), no cluster's pods are another's,
//! and `status.clusters` says per cluster whether it is ready and, for one whose
//! zone has no node, why (the scheduler's words), until a node comes.
//!
//! No PostgreSQL answers here, so the home cluster never gets past bootstrap and the
//! other clusters report that their database steps wait for it; the steps
//! themselves are the tier-3 steps, tested elsewhere. Skips with the reason where a
//! binary is missing (fails instead under `UMSTORE_REQUIRE_COMPONENTS=1`).

#[path = "support/kubeapi.rs"]
mod kubeapi;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use umstore_crds::{ClusterStatus, UserMetadataStore, UserMetadataStoreStatus};
use umstore_e2e::{shared, FakeNode};
use umstore_operator::steps::clusters::PENDING;

use kubeapi::{
    admin_client, example, fresh_namespace, helm_or_skip, install_chart_rbac, install_crd,
    service_account_client, start_operator, TEST_MANAGER,
};

const OPERATOR_NS: &str = "umstore-system";
const IDENTITY: &str = "clusters-replica";
const ZONE: &str = "topology.kubernetes.io/zone";

fn cluster<'a>(status: &'a UserMetadataStoreStatus, name: &str) -> Option<&'a ClusterStatus> {
    status.clusters.iter().find(|c| c.name == name)
}

/// Waits until `check` holds for the store's status; returns that status.
async fn wait_for(
    stores: &Api<UserMetadataStore>,
    what: &str,
    check: impl Fn(&UserMetadataStoreStatus) -> bool,
) -> UserMetadataStoreStatus {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let status = stores.get("national").await.ok().and_then(|s| s.status);
        if let Some(s) = status.as_ref().filter(|s| check(s)) {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The node of every database pod of the store, by pod name, with the cluster its
/// labels put it in.
async fn database_pods(pods: &Api<Pod>) -> Vec<(String, String, Option<String>)> {
    pods.list(&ListParams::default().labels("app.kubernetes.io/instance=national"))
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| {
            let component = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/component"))
                .cloned()
                .unwrap_or_default();
            ["coordinator", "worker", "replica"].contains(&component.as_str())
        })
        .map(|p| {
            let cluster = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("umstore.io/cluster"))
                .cloned()
                .unwrap_or_else(|| "north".into());
            (
                p.metadata.name.clone().unwrap_or_default(),
                cluster,
                p.spec.and_then(|s| s.node_name),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cluster_runs_in_its_zones_and_the_status_says_which_cannot() {
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
    cp.add_node(FakeNode::cpu("zone-a-1").with_label(ZONE, "zone-a"))
        .expect("a node in zone-a");
    cp.add_node(
        FakeNode::cpu("zone-b-1")
            .with_label(ZONE, "zone-b")
            .with_label("umstore.io/residency", "south"),
    )
    .expect("a node in zone-b");
    // Also in zone-b but without the residency label south's placement selects.
    cp.add_node(FakeNode::cpu("zone-b-2").with_label(ZONE, "zone-b"))
        .expect("another node in zone-b");

    let admin = admin_client(cp.api()).await;
    install_crd(&admin).await;
    let ns = fresh_namespace(&admin, "clusters").await;
    let rbac = install_chart_rbac(&admin, &helm, OPERATOR_NS).await;
    let operator_client =
        service_account_client(cp.api(), &admin, &rbac.namespace, &rbac.service_account).await;
    start_operator(operator_client, OPERATOR_NS, IDENTITY, |ctx| ctx);
    let stores: Api<UserMetadataStore> = Api::namespaced(admin.clone(), &ns);

    let mut store = example(1, &ns);
    store["metadata"]["name"] = json!("national");
    store["spec"]["tier"] = json!(4);
    store["spec"]["regions"] = json!(["DL", "KA", "TN"]);
    store["spec"]["clusters"] = json!([
        {"name": "north", "placement": {"zones": ["zone-a"]},
         "workerGroups": [{"name": "n1", "regions": ["DL"]}]},
        {"name": "south",
         "placement": {"zones": ["zone-b"], "nodeSelector": {"umstore.io/residency": "south"}},
         "workerGroups": [{"name": "s1", "regions": ["KA"]}]},
        {"name": "east", "placement": {"zones": ["zone-c"]},
         "workerGroups": [{"name": "e1", "regions": ["TN"]}]},
    ]);
    stores
        .patch(
            "national",
            &PatchParams::apply(TEST_MANAGER),
            &Patch::Apply(&store),
        )
        .await
        .expect("apply the store");

    // east's zone has no node: its coordinator cannot be scheduled, and the
    // status says so for east alone.
    let status = wait_for(
        &stores,
        "north up, south waiting for home, east unschedulable",
        |s| {
            cluster(s, "north").is_some_and(|c| c.ready)
                && cluster(s, "south").is_some_and(|c| {
                    c.message.as_deref() == Some(PENDING) && c.read_write.contains("pgbouncer")
                })
                && cluster(s, "east").is_some_and(|c| {
                    c.message
                        .as_deref()
                        .is_some_and(|m| m.contains("node affinity"))
                })
        },
    )
    .await;
    let names: Vec<&str> = status.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["north", "south", "east"], "home first");
    let north = cluster(&status, "north").expect("north");
    assert!(north.home && north.regions == ["DL"], "{north:?}");
    let south = cluster(&status, "south").expect("south");
    assert!(
        !south.home && !south.ready && south.regions == ["KA"],
        "{south:?}"
    );
    assert_eq!(
        south.read_write,
        format!("national-pgbouncer.{ns}.svc:6432/umstore_south")
    );
    assert_eq!(
        south.replica_pools.get("ai").map(String::as_str),
        Some(format!("national-south-replica-ai.{ns}.svc:5432/umstore").as_str())
    );
    let east = cluster(&status, "east").expect("east");
    let message = east.message.clone().unwrap_or_default();
    assert!(
        message.starts_with("national-east-coordinator 0/"),
        "east names its workload: {message}"
    );
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert!(
        degraded
            .message
            .contains("cluster east is not ready: national-east-coordinator"),
        "{}",
        degraded.message
    );

    // Every scheduled database pod is on its cluster's nodes only.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let placed = database_pods(&pods).await;
    let mut seen = std::collections::BTreeSet::new();
    for (pod, cluster, node) in &placed {
        let Some(node) = node else {
            assert_eq!(cluster, "east", "{pod} is not scheduled");
            continue;
        };
        let allowed: &[&str] = match cluster.as_str() {
            "north" => &["zone-a-1"],
            "south" => &["zone-b-1"],
            other => panic!("{pod} of {other} was scheduled on {node}"),
        };
        assert!(
            allowed.contains(&node.as_str()),
            "{pod} of {cluster} on {node}"
        );
        seen.insert(cluster.clone());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["north", "south"],
        "{placed:#?}"
    );

    // A node in zone-c: east's pods come up and it too waits only for home.
    cp.add_node(FakeNode::cpu("zone-c-1").with_label(ZONE, "zone-c"))
        .expect("a node in zone-c");
    wait_for(&stores, "east scheduled", |s| {
        cluster(s, "east").is_some_and(|c| c.message.as_deref() == Some(PENDING))
    })
    .await;
    let placed = database_pods(&pods).await;
    for (pod, cluster, node) in placed.iter().filter(|(_, c, _)| c == "east") {
        assert_eq!(node.as_deref(), Some("zone-c-1"), "{pod} of {cluster}");
    }
}
