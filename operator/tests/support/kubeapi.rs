//! What the tests against a real kube-apiserver share: the server (one per test
//! binary, or a skip), clients (admin, or a ServiceAccount's token), fresh
//! namespaces, the CRD, the chart's RBAC and the examples.
//!
//! Included by path (`#[path = "support/kubeapi.rs"] mod kubeapi;`) so the
//! mocked-API tests do not compile it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, CustomResourceExt, Resource};
use serde_json::{json, Value};
use umstore_crds::UserMetadataStore;
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_e2e::{shared, KubeApiServer};

/// The field manager of everything the tests apply as admin.
pub const TEST_MANAGER: &str = "umstore-kubeapi-test";

/// The CRD's name.
pub const CRD_NAME: &str = "usermetadatastores.umstore.io";

/// This test binary's kube-apiserver, or `None` after a skip (a failure under
/// `UMSTORE_REQUIRE_COMPONENTS=1`): the caller returns.
#[track_caller]
pub fn server_or_skip() -> Option<&'static KubeApiServer> {
    shared().kube_api_or_skip()
}

/// `helm` (`$HELM`, else on `PATH`), or `None` after a skip (a failure under
/// `UMSTORE_REQUIRE_COMPONENTS=1`).
#[track_caller]
pub fn helm_or_skip() -> Option<PathBuf> {
    let found = match std::env::var_os("HELM") {
        Some(h) => Some(PathBuf::from(h)).filter(|p| p.is_file()),
        None => std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("helm"))
                .find(|p| p.is_file())
        }),
    };
    if found.is_none() {
        skip_or_fail(
            Component::Helm,
            "no helm binary ($HELM or PATH) to render the chart's RBAC; \
             scripts/install-deps.sh --test builds one with Go",
        );
    }
    found
}

/// A client of [`umstore_e2e::ADMIN_USER`] (`system:masters`).
pub async fn admin_client(server: &KubeApiServer) -> Client {
    let kubeconfig = Kubeconfig::read_from(server.kubeconfig()).expect("read the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config from the kubeconfig");
    Client::try_from(config).expect("admin client")
}

/// A client that authenticates with `token` (and trusts the server's CA).
pub async fn token_client(server: &KubeApiServer, token: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(server.kubeconfig()).expect("read the kubeconfig");
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kube config from the kubeconfig");
    config.auth_info = serde_json::from_value(json!({ "token": token })).expect("auth info");
    Client::try_from(config).expect("token client")
}

/// Creates namespace `name` (it may exist already).
pub async fn ensure_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            name,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
}

/// Creates a namespace no other test of this process uses: `<prefix>-<n>`.
pub async fn fresh_namespace(client: &Client, prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let name = format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    ensure_namespace(client, &name).await;
    name
}

/// Installs (or updates) the generated CRD and waits until it is Established.
/// Panics if the API server refuses it (a non-structural schema, a CEL rule that does
/// not compile or is over the cost budget).
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        CRD_NAME,
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(UserMetadataStore::crd()),
    )
    .await
    .expect("the API server accepts the generated CRD (structural schema, CEL rules compile)");
    wait_for(
        "the CRD to be established",
        Duration::from_secs(30),
        || async {
            let crd = crds.get(CRD_NAME).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await;
}

/// A token for ServiceAccount `namespace/name`, from the TokenRequest API (the
/// account must exist).
pub async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"))
        .status
        .and_then(|s| s.token)
        .expect("a token is issued")
}

/// Creates ServiceAccount `namespace/name` and returns a token for it.
pub async fn new_service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).expect("service account"),
        )
        .await
        .unwrap_or_else(|e| panic!("create ServiceAccount {namespace}/{name}: {e}"));
    service_account_token(client, namespace, name).await
}

/// A client acting as ServiceAccount `namespace/name` (with a TokenRequest token).
pub async fn service_account_client(
    server: &KubeApiServer,
    admin: &Client,
    namespace: &str,
    name: &str,
) -> Client {
    let token = service_account_token(admin, namespace, name).await;
    token_client(server, &token).await
}

/// The chart's RBAC as installed by [`install_chart_rbac`].
#[derive(Debug)]
pub struct ChartRbac {
    /// The release namespace (the operator's; its Lease lives there).
    pub namespace: String,
    /// The operator's ServiceAccount.
    pub service_account: String,
}

fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/umstore-operator")
}

/// `helm template` of the chart into `namespace` (default values): its documents.
pub fn render_chart(helm: &Path, namespace: &str) -> Vec<Value> {
    let out = Command::new(helm)
        .args(["template", "umstore", "--namespace", namespace])
        .args(["--kube-version", "1.37.0"])
        .arg(chart_dir())
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    text.split("\n---")
        .map(|doc| serde_yaml_ng::from_str::<Value>(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

async fn apply_as_admin<K>(api: Api<K>, doc: &Value)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object: K =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{doc} does not parse: {e}"));
    let name = object.meta().name.clone().expect("named");
    api.patch(
        &name,
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {} {name}: {e}", K::kind(&())));
}

/// Renders the chart into `namespace` and applies, as admin, exactly its RBAC: the
/// ServiceAccount, ClusterRole, ClusterRoleBinding, Role and RoleBinding. Nothing
/// else of the chart is applied (no kubelet runs its Deployment).
pub async fn install_chart_rbac(admin: &Client, helm: &Path, namespace: &str) -> ChartRbac {
    ensure_namespace(admin, namespace).await;
    let docs = render_chart(helm, namespace);
    let mut service_account = None;
    for doc in &docs {
        match doc["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => {
                service_account = doc["metadata"]["name"].as_str().map(str::to_owned);
                apply_as_admin(
                    Api::<ServiceAccount>::namespaced(admin.clone(), namespace),
                    doc,
                )
                .await;
            }
            "ClusterRole" => apply_as_admin(Api::<ClusterRole>::all(admin.clone()), doc).await,
            "ClusterRoleBinding" => {
                apply_as_admin(Api::<ClusterRoleBinding>::all(admin.clone()), doc).await
            }
            "Role" => apply_as_admin(Api::<Role>::namespaced(admin.clone(), namespace), doc).await,
            "RoleBinding" => {
                apply_as_admin(
                    Api::<RoleBinding>::namespaced(admin.clone(), namespace),
                    doc,
                )
                .await
            }
            _ => {}
        }
    }
    ChartRbac {
        namespace: namespace.to_owned(),
        service_account: service_account.expect("the chart renders a ServiceAccount"),
    }
}

/// `examples/tier<tier>.yaml` as JSON, moved into `namespace`.
pub fn example(tier: i32, namespace: &str) -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/tier{tier}.yaml"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut store: Value = serde_yaml_ng::from_str(&text).expect("example is YAML");
    store["metadata"]["namespace"] = json!(namespace);
    store
}

/// Polls `check` every 200 ms until it returns a value; panics naming `what` after
/// `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
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

/// Runs the operator in this process as `client` (the chart's ServiceAccount):
/// the leader Lease `umstore-operator` in `operator_namespace` held as `identity`,
/// and the controller over every namespace. `configure` adds what a test needs
/// (a connector's address map, a Vault login).
pub fn start_operator(
    client: Client,
    operator_namespace: &str,
    identity: &str,
    configure: impl FnOnce(umstore_operator::Context) -> umstore_operator::Context,
) {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use umstore_operator::leader::{Leadership, LeaseLock};
    let leadership = Leadership::new(false);
    let lock = LeaseLock::new(
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
            client.clone(),
            operator_namespace,
        ),
        "umstore-operator",
        identity,
        Duration::from_secs(15),
    );
    tokio::spawn(lock.run(leadership.clone(), Duration::from_secs(1)));
    let ctx = Arc::new(configure(umstore_operator::Context::new(
        client,
        Arc::new(umstore_operator::metrics::Metrics::new()),
        leadership,
        umstore_operator::builders::Env {
            operator_namespace: operator_namespace.into(),
        },
        Some(identity.into()),
    )));
    tokio::spawn(umstore_operator::controller::run(
        ctx,
        None,
        Arc::new(AtomicBool::new(false)),
    ));
}
