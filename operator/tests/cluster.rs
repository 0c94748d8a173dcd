//! On a real cluster (`KUBECONFIG` set): install the CRD and the chart, apply the
//! tier-1 example, and wait for it to become Ready. Skips with a message elsewhere
//! (also under `UMSTORE_REQUIRE_COMPONENTS=1`: no cluster is required); a missing
//! helm with `KUBECONFIG` set fails under that variable.
//!
//! The operator and data-plane images must be pullable by the cluster:
//! `UMSTORE_OPERATOR_IMAGE` (repository:tag, default the chart's) and the example's
//! data-plane image (override with `UMSTORE_DATA_PLANE_IMAGE`). The data plane needs
//! a Vault or OpenBao with the Kubernetes auth role of docs/encryption.md for the
//! ServiceAccount `pilot-data-plane` in namespace `umstore-e2e`: the example's
//! address, or `UMSTORE_VAULT_ADDRESS`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, CustomResourceExt};
use umstore_crds::UserMetadataStore;
use umstore_e2e::skip::{skip_or_fail, Component};

const NS: &str = "umstore-e2e";
const MANAGER: &str = "umstore-cluster-test";

fn helm() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("HELM") {
        return Some(PathBuf::from(h));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("helm"))
        .find(|p| p.is_file())
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

#[tokio::test]
async fn tier1_example_becomes_ready_on_a_cluster() {
    if std::env::var_os("KUBECONFIG").is_none() {
        // Exempt from UMSTORE_REQUIRE_COMPONENTS: CI has no cluster.
        skip_or_fail(
            Component::Cluster,
            "KUBECONFIG is not set; this test installs the CRD and chart on a real cluster \
             (a cluster is never required, also not in CI)",
        );
        return;
    }
    let Some(helm) = helm() else {
        skip_or_fail(
            Component::Helm,
            "KUBECONFIG is set but no helm binary ($HELM or PATH) to install the chart",
        );
        return;
    };
    let client = Client::try_default()
        .await
        .expect("cluster from KUBECONFIG");
    let apply = PatchParams::apply(MANAGER).force();

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = UserMetadataStore::crd();
    crds.patch("usermetadatastores.umstore.io", &apply, &Patch::Apply(&crd))
        .await
        .expect("install CRD");
    wait_for(
        "the CRD to be established",
        Duration::from_secs(60),
        || async {
            crds.get("usermetadatastores.umstore.io")
                .await
                .ok()
                .and_then(|c| c.status)
                .and_then(|s| s.conditions)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        },
    )
    .await;

    let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/umstore-operator");
    let mut install = Command::new(helm);
    install
        .args(["upgrade", "--install", "umstore-operator"])
        .arg(&chart)
        .args([
            "--namespace",
            "umstore-system",
            "--create-namespace",
            "--wait",
            "--timeout",
            "5m",
            "--skip-crds",
        ]);
    if let Ok(image) = std::env::var("UMSTORE_OPERATOR_IMAGE") {
        let (repo, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
        install
            .arg("--set")
            .arg(format!("image.repository={repo}"))
            .arg("--set")
            .arg(format!("image.tag={tag}"));
    }
    let out = install.output().expect("run helm");
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(NS, &apply, &Patch::Apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})))
        .await
        .expect("namespace");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tier1.yaml");
    let mut store: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("example")).expect("yaml");
    store["metadata"]["namespace"] = NS.into();
    if let Ok(image) = std::env::var("UMSTORE_DATA_PLANE_IMAGE") {
        store["spec"]["dataPlane"]["image"] = image.into();
    }
    if let Ok(address) = std::env::var("UMSTORE_VAULT_ADDRESS") {
        store["spec"]["encryption"]["vaultAddress"] = address.into();
    }
    let stores: Api<UserMetadataStore> = Api::namespaced(client.clone(), NS);
    stores
        .patch("pilot", &apply, &Patch::Apply(&store))
        .await
        .expect("apply the tier-1 example");

    wait_for(
        "the tier-1 store to be Ready",
        Duration::from_secs(600),
        || async {
            stores
                .get("pilot")
                .await
                .ok()
                .and_then(|s| s.status)
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
        },
    )
    .await;
    let status = stores
        .get("pilot")
        .await
        .expect("store")
        .status
        .expect("status");
    assert_eq!(status.tier, Some(1));
    assert!(status.endpoints.is_some());

    stores
        .delete("pilot", &DeleteParams::default())
        .await
        .expect("delete the store");
    wait_for(
        "the finalizer to finish",
        Duration::from_secs(120),
        || async { stores.get_opt("pilot").await.ok().flatten().is_none() },
    )
    .await;
}
