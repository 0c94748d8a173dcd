//! The operator against a real kube-apiserver (with etcd, built from their Go modules
//! by `scripts/install-deps.sh --test`) and a real PostgreSQL: the CRD is installed
//! and its CEL rules enforced by the API server, the controller runs as the binary
//! runs it (Lease leader election, watches, finalizer), every object of the tier-1
//! example is accepted by the API server's validation, and the store walks
//! Provisioned → Bootstrapped → SchemaReady → Ready.
//!
//! No kubelet or controller-manager runs here, so the test plays their part where it
//! must: it marks the coordinator StatefulSet and then the data-plane Deployment ready
//! through their status subresources, and points the coordinator's Service name at
//! a PostgreSQL on loopback. Skips with the reason where the binaries are missing.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, CustomResourceExt};
use serde_json::{json, Value};
use umstore_crds::{UserMetadataStore, UserMetadataStoreStatus};
use umstore_e2e::{KubeApiServer, KubeApiUnavailable, Postgres};
use umstore_migrations::Runner;
use umstore_operator::builders::credentials::Role;
use umstore_operator::builders::Env;
use umstore_operator::db::Connector;
use umstore_operator::leader::{Leadership, LeaseLock};
use umstore_operator::metrics::Metrics;
use umstore_operator::{controller, Context};

const NS: &str = "umstore";
const OPERATOR_NS: &str = "umstore-system";
const TEST_MANAGER: &str = "umstore-apiserver-test";

fn example(tier: i32) -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/tier{tier}.yaml"));
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("example")).expect("yaml")
}

async fn client_of(server: &KubeApiServer) -> Client {
    let kubeconfig = Kubeconfig::read_from(server.kubeconfig()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "usermetadatastores.umstore.io",
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(UserMetadataStore::crd()),
    )
    .await
    .expect("the API server accepts the generated CRD (structural schema, CEL rules compile)");
    wait_for(
        "the CRD to be established",
        Duration::from_secs(30),
        || async {
            let crd = crds.get("usermetadatastores.umstore.io").await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await;
}

async fn namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace"),
        )
        .await
        .expect("create namespace");
}

fn condition<'a>(status: &'a UserMetadataStoreStatus, type_: &str) -> Option<&'a str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

fn start_or_skip() -> Option<KubeApiServer> {
    match KubeApiServer::start() {
        Ok(server) => Some(server),
        Err(KubeApiUnavailable::Skip(why)) => {
            eprintln!("skipping: {why}");
            None
        }
        Err(e) => panic!("kube-apiserver failed to start: {e}"),
    }
}

/// Marks a workload's replicas ready, as the kubelet and controller-manager would.
async fn mark_ready<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let status = json!({"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch workload status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_takes_the_tier1_example_to_ready_on_a_real_api_server() {
    let Some(server) = start_or_skip() else {
        return;
    };
    let client = client_of(&server).await;
    install_crd(&client).await;
    namespace(&client, NS).await;
    namespace(&client, OPERATOR_NS).await;

    // The coordinator's PostgreSQL (trust authentication; passwords are tested in
    // tests/bootstrap.rs) with the image's `postgres` superuser.
    let pg = Postgres::start_with_replicas(0).expect("PostgreSQL");
    pg.primary()
        .psql("postgres", "CREATE ROLE postgres SUPERUSER LOGIN")
        .expect("postgres role");
    let connector = Connector::in_cluster().with_address(
        &format!("pilot-coordinator.{NS}.svc"),
        5432,
        ("127.0.0.1".to_string(), pg.port()),
    );

    // The operator as its binary runs it: a Lease, then the controller.
    let leadership = Leadership::new(false);
    let lock = LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), OPERATOR_NS),
        "umstore-operator",
        "test-replica",
        Duration::from_secs(15),
    );
    tokio::spawn(lock.run(leadership.clone(), Duration::from_secs(1)));
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Arc::new(Metrics::new()),
            leadership.clone(),
            Env {
                operator_namespace: OPERATOR_NS.into(),
            },
            Some("test-replica".into()),
        )
        .with_connector(connector),
    );
    let operator = tokio::spawn(controller::run(ctx, None, Arc::new(AtomicBool::new(false))));

    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NS);
    wait_for("the Lease to be held", Duration::from_secs(20), || async {
        let lease = leases.get("umstore-operator").await.ok()?;
        (lease.spec?.holder_identity.as_deref() == Some("test-replica")).then_some(())
    })
    .await;

    let stores: Api<UserMetadataStore> = Api::namespaced(client.clone(), NS);
    stores
        .patch(
            "pilot",
            &PatchParams::apply(TEST_MANAGER),
            &Patch::Apply(example(1)),
        )
        .await
        .expect("apply the tier-1 example");

    // Topology: every object accepted by the API server; bootstrap waits.
    let status = wait_for(
        "Provisioned, waiting for the coordinator",
        Duration::from_secs(60),
        || async {
            let s = stores.get("pilot").await.ok()?.status?;
            (condition(&s, "Provisioned") == Some("True")
                && condition(&s, "Bootstrapped") == Some("False"))
            .then_some(s)
        },
    )
    .await;
    assert_eq!(status.tier, Some(1));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    for role in Role::ALL {
        secrets
            .get(&format!("pilot-role-{}", role.slug()))
            .await
            .expect("role Secret");
    }
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), NS);
    assert!(!policies
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .is_empty());

    // The coordinator comes up: bootstrap and migrate run against PostgreSQL.
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    mark_ready(&statefulsets, "pilot-coordinator").await;
    let latest = Runner::default().latest_version();
    let status = wait_for("SchemaReady", Duration::from_secs(60), || async {
        let s = stores.get("pilot").await.ok()?.status?;
        (condition(&s, "SchemaReady") == Some("True")).then_some(s)
    })
    .await;
    assert_eq!(condition(&status, "Bootstrapped"), Some("True"));
    assert_eq!(status.schema_version, Some(latest as i32));
    assert_eq!(
        condition(&status, "Ready"),
        Some("False"),
        "the data plane is not ready yet"
    );
    let store_db = pg
        .connect("umstore")
        .await
        .expect("database umstore exists");
    let logins: i64 = store_db
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'umstore\\_%\\_login' AND rolcanlogin",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(logins, Role::CLIENTS.len() as i64);

    // The data plane comes up: the store is Ready.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    mark_ready(&deployments, "pilot-data-plane").await;
    let status = wait_for("Ready", Duration::from_secs(60), || async {
        let s = stores.get("pilot").await.ok()?.status?;
        (condition(&s, "Ready") == Some("True")).then_some(s)
    })
    .await;
    assert_eq!(status.phase.map(|p| format!("{p:?}")), Some("Ready".into()));

    // CEL rules, enforced by the API server: a tier decrease and an unknown region.
    let mut lower = example(1);
    lower["spec"]["tier"] = json!(1);
    let mut raised = example(1);
    raised["spec"]["tier"] = json!(2);
    stores
        .patch(
            "pilot",
            &PatchParams::apply(TEST_MANAGER),
            &Patch::Apply(&raised),
        )
        .await
        .expect("raising the tier is allowed");
    let refused = stores
        .patch(
            "pilot",
            &PatchParams::apply(TEST_MANAGER),
            &Patch::Apply(&lower),
        )
        .await
        .expect_err("lowering the tier is refused at admission");
    assert!(
        refused.to_string().contains("tier"),
        "names the field: {refused}"
    );
    let mut bad = example(1);
    bad["metadata"]["name"] = json!("bad-region");
    bad["spec"]["regions"] = json!(["KA", "XX"]);
    let refused = stores
        .patch(
            "bad-region",
            &PatchParams::apply(TEST_MANAGER),
            &Patch::Apply(&bad),
        )
        .await
        .expect_err("an unknown region is refused at admission");
    let refused = refused.to_string();
    assert!(
        refused.contains("spec.regions") && refused.contains("unknown region code"),
        "names the field and what is wrong: {refused}"
    );

    // Deletion runs the finalizer; Retain keeps the credential Secrets.
    stores
        .delete("pilot", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("the store to be gone", Duration::from_secs(60), || async {
        stores
            .get_opt("pilot")
            .await
            .ok()
            .and_then(|o| o.is_none().then_some(()))
    })
    .await;
    secrets
        .get("pilot-role-admin")
        .await
        .expect("reclaimPolicy Retain keeps the admin Secret");
    operator.abort();
}
