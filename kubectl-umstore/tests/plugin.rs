//! `kubectl umstore` as a user runs it: the binary, a kubeconfig of its own, against
//! the harness's real kube-apiserver with the generated CRD (its CEL rules enforced),
//! as an identity that holds only what the chart's user ClusterRoles grant (rendered
//! by helm, bound in the test's namespace). Each change is checked on the resource
//! afterwards, each refusal by its exit status and words and by the resource being
//! unchanged. Skips with the reason where kube-apiserver, etcd or helm is missing
//! (fails instead under `UMSTORE_REQUIRE_COMPONENTS=1`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, CustomResourceExt};
use serde_json::{json, Value};
use umstore_crds::annotations::{APPROVE_ANNOTATION, ROTATE_ANNOTATION};
use umstore_crds::refusals::{approval_unknown, demotion_refused, TIER_RANGE};
use umstore_crds::UserMetadataStore;
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_e2e::{shared, KubeApiServer, PLAIN_USER};
use umstore_migrations::Runner;

const MANAGER: &str = "kubectl-umstore-test";
const CRD_NAME: &str = "usermetadatastores.umstore.io";

/// A namespace of its own, the user bound to one of the chart's user roles there,
/// and a kubeconfig for that user whose context names the namespace.
struct Setup {
    admin: Client,
    namespace: String,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

/// `helm` ($HELM, the workspace's `.bin/helm`, or on PATH), or `None` after a skip.
fn helm_or_skip() -> Option<PathBuf> {
    let workspace_bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.bin/helm");
    let found = std::env::var_os("HELM")
        .map(PathBuf::from)
        .into_iter()
        .chain(Some(workspace_bin))
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("helm"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        )
        .find(|p| p.is_file());
    if found.is_none() {
        skip_or_fail(
            Component::Helm,
            "no helm binary ($HELM, .bin/helm or PATH) to render the chart's user roles; \
             scripts/install-deps.sh --test builds one with Go",
        );
    }
    found
}

/// The chart's `umstore-view` and `umstore-edit` ClusterRoles, rendered by helm.
fn user_roles(helm: &Path) -> Vec<ClusterRole> {
    let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/umstore-operator");
    let out = std::process::Command::new(helm)
        .args(["template", "umstore", "--kube-version", "1.37.0"])
        .args(["--show-only", "templates/user-roles.yaml"])
        .arg(&chart)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    text.split("\n---")
        .filter_map(|doc| serde_yaml_ng::from_str::<Option<ClusterRole>>(doc).expect("YAML"))
        .collect()
}

async fn admin_client(server: &KubeApiServer) -> Client {
    let kubeconfig = Kubeconfig::read_from(server.kubeconfig()).expect("read the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("admin client")
}

async fn install_crd(admin: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    crds.patch(
        CRD_NAME,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(UserMetadataStore::crd()),
    )
    .await
    .expect("the API server accepts the generated CRD");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let established = crds
            .get(CRD_NAME)
            .await
            .ok()
            .and_then(|c| c.status)
            .and_then(|s| s.conditions)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            return;
        }
        assert!(Instant::now() < deadline, "the CRD is not established");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn apply<K>(api: &Api<K>, name: &str, object: &K)
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize
        + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

/// Binds [`PLAIN_USER`] to ClusterRole `role` (one of the chart's) in `namespace`.
async fn bind(admin: &Client, namespace: &str, role: &str) {
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("plugin-user-{role}"), "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": PLAIN_USER}],
    }))
    .expect("binding");
    let name = format!("plugin-user-{role}");
    apply(&Api::namespaced(admin.clone(), namespace), &name, &binding).await;
    // The authorizer sees a new binding from its cache, a moment later.
    let review: SubjectAccessReview = serde_json::from_value(json!({"spec": {
        "user": PLAIN_USER,
        "resourceAttributes": {"namespace": namespace, "verb": "get",
                               "group": "umstore.io", "resource": "usermetadatastores"},
    }}))
    .expect("review");
    let reviews: Api<SubjectAccessReview> = Api::all(admin.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .expect("SubjectAccessReview");
        if answer.status.is_some_and(|s| s.allowed) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{role} is not in effect for the user"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fresh_namespace(admin: &Client, prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let name = format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    apply(&Api::all(admin.clone()), &name, &ns).await;
    name
}

/// The server, CRD and roles in place, a namespace where the user holds `role`.
async fn setup(prefix: &str, role: Option<&str>) -> Option<Setup> {
    let server = shared().kube_api_or_skip()?;
    let helm = helm_or_skip()?;
    let admin = admin_client(server).await;
    install_crd(&admin).await;
    for role in user_roles(&helm) {
        let name = role.metadata.name.clone().expect("named");
        apply(&Api::all(admin.clone()), &name, &role).await;
    }
    let namespace = fresh_namespace(&admin, prefix).await;
    if let Some(role) = role {
        bind(&admin, &namespace, role).await;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": server.url(),
            "certificate-authority": server.ca_cert(),
        }}],
        "users": [{"name": "platform-user", "user": {"token": server.user_token()}}],
        "contexts": [{"name": "platform", "context": {
            "cluster": "test", "user": "platform-user", "namespace": namespace,
        }}],
        "current-context": "platform",
    });
    std::fs::write(&kubeconfig, config.to_string()).expect("write the kubeconfig");
    Some(Setup {
        admin,
        namespace,
        kubeconfig,
        _dir: dir,
    })
}

/// `examples/tier1.yaml` as store `name` in `namespace`, with the `Manual` policy.
fn tier1(namespace: &str, name: &str) -> UserMetadataStore {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tier1.yaml");
    let text = std::fs::read_to_string(&path).expect("read the tier-1 example");
    let mut store: Value = serde_yaml_ng::from_str(&text).expect("YAML");
    store["metadata"] = json!({"name": name, "namespace": namespace});
    store["spec"]["migrations"] = json!({"policy": "Manual"});
    serde_json::from_value(store).expect("a store")
}

impl Setup {
    fn stores(&self) -> Api<UserMetadataStore> {
        Api::namespaced(self.admin.clone(), &self.namespace)
    }

    async fn create(&self, name: &str) -> UserMetadataStore {
        self.stores()
            .create(&PostParams::default(), &tier1(&self.namespace, name))
            .await
            .unwrap_or_else(|e| panic!("create store {name}: {e}"))
    }

    /// Writes `status` through the status subresource, as the operator would.
    async fn write_status(&self, name: &str, status: Value) -> UserMetadataStore {
        self.stores()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
            .unwrap_or_else(|e| panic!("write the status of {name}: {e}"))
    }

    async fn get(&self, name: &str) -> UserMetadataStore {
        self.stores().get(name).await.expect("get the store")
    }

    /// Runs the plugin with the user's kubeconfig.
    async fn plugin(&self, args: &[&str]) -> Run {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-umstore"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .await
            .expect("run kubectl-umstore");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn succeeded(&self) -> &str {
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        &self.stdout
    }

    /// Exit status 1 and one `error:` line on stderr, which is returned.
    #[track_caller]
    fn failed(&self) -> &str {
        assert_eq!(self.code, Some(1), "expected exit status 1: {self:#?}");
        assert!(self.stdout.is_empty(), "nothing on stdout: {self:#?}");
        assert!(self.stderr.starts_with("error: "), "{self:#?}");
        &self.stderr
    }
}

/// A `Label:  value` line of the status page (values start in column 18).
fn field(label: &str, value: &str) -> String {
    format!("{:<15}  {value}", format!("{label}:"))
}

fn annotation(store: &UserMetadataStore, key: &str) -> Option<String> {
    store
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .cloned()
}

/// The managers that last changed the store's metadata or spec.
fn managers(store: &UserMetadataStore) -> Vec<String> {
    store
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.manager.clone())
        .collect()
}

#[tokio::test]
async fn status_shows_conditions_components_keys_migrations_and_more() {
    let Some(env) = setup("plugin-status", Some("umstore-view")).await else {
        return;
    };
    env.create("pilot").await;
    // 20m30s ago: the AGE column says 20m for the half minute either side of it.
    let twenty_minutes_ago = Timestamp::now() - Duration::from_secs(20 * 60 + 30);
    let written = env
        .write_status(
            "pilot",
            json!({
                "observedGeneration": 1, "tier": 1, "phase": "Provisioning", "schemaVersion": 9,
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "MigrationsPending",
                     "message": "migrations 10, 11 are pending", "lastTransitionTime": twenty_minutes_ago.to_string()},
                    {"type": "Provisioned", "status": "True", "reason": "Applied",
                     "message": "every object applied", "lastTransitionTime": twenty_minutes_ago.to_string()},
                ],
                "components": [
                    {"name": "pilot-coordinator", "kind": "StatefulSet", "replicas": 1, "readyReplicas": 1, "ready": true},
                    {"name": "pilot-api", "kind": "Deployment", "replicas": 1, "readyReplicas": 0, "ready": false,
                     "message": "pod pilot-api-0: image ghcr.io/umstore/data-plane:0.1.0 cannot be pulled"},
                ],
                "endpoints": {"readWrite": "pilot-coordinator.ns.svc:5432", "api": "pilot-api.ns.svc:8080",
                              "secrets": {"writer": "pilot-conn-writer"}},
                "migrations": {"pending": [10, 11]},
                "keys": {"key": "transit/umstore-pii", "version": 2, "minDecryptionVersion": 2,
                         "lastRotation": "2026-03-01T10:00:00Z",
                         "rotation": {"state": "Succeeded", "trigger": "Annotation", "rewrapped": 300,
                                      "startedAt": "2026-03-01T10:00:00Z", "attempts": 1}},
                "replicaLag": [{"pool": "ai", "pod": "pilot-replica-ai-0", "lagBytes": 0, "lagSeconds": 0.0}],
            }),
        )
        .await;

    // The namespace comes from the kubeconfig's context.
    let page = env.plugin(&["status", "pilot"]).await;
    let page = page.succeeded();
    for expected in [
        field("Name", "pilot"),
        field("Namespace", &env.namespace),
        field("Tier", "1\n"),
        field("Phase", "Provisioning"),
        field(
            "Schema",
            "version 9; pending 10, 11 (policy Manual: kubectl umstore approve-migrations pilot 11)",
        ),
        field(
            "Keys",
            "transit/umstore-pii version 2 (oldest usable 2); last rotation 2026-03-01T10:00:00Z (",
        ),
        field("Key rotation", "Succeeded (Annotation), 300 data keys rewrapped"),
        field("Backup", "not configured (spec.backup)"),
        "  TYPE          STATUS   REASON              AGE   MESSAGE".to_string(),
        "  Ready         False    MigrationsPending   20m   migrations 10, 11 are pending".to_string(),
        "  Provisioned   True     Applied             20m   every object applied".to_string(),
        "  pilot-api           Deployment    0/1     pod pilot-api-0: image ghcr.io/umstore/data-plane:0.1.0 cannot be pulled".to_string(),
        "  pilot-coordinator   StatefulSet   1/1\n".to_string(),
        "  read-write   pilot-coordinator.ns.svc:5432\n".to_string(),
        "  writer    pilot-conn-writer".to_string(),
        "Regions:  KA TN KL (all on the coordinator".to_string(),
        "  ai     pilot-replica-ai-0   0 B      0.000s".to_string(),
    ] {
        assert!(page.contains(&expected), "missing {expected:?} in:\n{page}");
    }

    // -o json and -o yaml are the status object as stored.
    let stored = serde_json::to_value(written.status.expect("status")).expect("json");
    let json = env.plugin(&["status", "pilot", "-o", "json"]).await;
    let json: Value = serde_json::from_str(json.succeeded()).expect("JSON");
    assert_eq!(json, stored);
    assert_eq!(
        json["components"][1]["message"],
        stored["components"][1]["message"]
    );
    let yaml = env.plugin(&["status", "pilot", "-o", "yaml"]).await;
    let yaml: Value = serde_yaml_ng::from_str(yaml.succeeded()).expect("YAML");
    assert_eq!(yaml, stored);
}

#[tokio::test]
async fn approve_migrations_sets_the_annotation_and_refuses_unknown_versions() {
    let Some(env) = setup("plugin-approve", Some("umstore-edit")).await else {
        return;
    };
    env.create("pilot").await;
    env.write_status(
        "pilot",
        json!({"tier": 1, "migrations": {"pending": [10, 11]}}),
    )
    .await;
    let latest = Runner::default().latest_version().to_string();

    let out = env.plugin(&["approve-migrations", "pilot", &latest]).await;
    assert!(
        out.succeeded().starts_with(&format!(
            "{}/pilot: {APPROVE_ANNOTATION}=\"{latest}\" (was unset)\n",
            env.namespace
        )),
        "{out:#?}"
    );
    let store = env.get("pilot").await;
    assert_eq!(annotation(&store, APPROVE_ANNOTATION), Some(latest.clone()));
    assert!(
        managers(&store).iter().any(|m| m == "kubectl-umstore"),
        "{:?}",
        managers(&store)
    );

    // A version the operator does not have: its words, and nothing changed.
    for value in ["v11", "9999"] {
        let out = env.plugin(&["approve-migrations", "pilot", value]).await;
        let expected = approval_unknown(value, Runner::default().latest_version(), &[10, 11]);
        assert_eq!(
            out.failed(),
            format!(
                "error: cannot approve migrations up to \"{value}\" on {}/pilot: {expected}\n",
                env.namespace
            )
        );
        let after = env.get("pilot").await;
        assert_eq!(
            after.metadata.resource_version,
            store.metadata.resource_version
        );
    }
}

#[tokio::test]
async fn rotate_keys_sets_a_new_value_each_time() {
    let Some(env) = setup("plugin-rotate", Some("umstore-edit")).await else {
        return;
    };
    env.create("pilot").await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let before = Timestamp::now();
        let out = env.plugin(&["rotate-keys", "pilot"]).await;
        let stdout = out.succeeded();
        let value = annotation(&env.get("pilot").await, ROTATE_ANNOTATION).expect("annotation");
        let at: Timestamp = value.parse().expect("an RFC 3339 time");
        assert!(at >= before, "{value} is the time of the request");
        assert!(
            stdout.contains(&format!("{ROTATE_ANNOTATION}=\"{value}\"")),
            "{stdout}"
        );
        assert!(stdout.contains("rewraps every data key"), "{stdout}");
        seen.push(value);
    }
    assert_ne!(seen[0], seen[1], "each request is a new value");
}

#[tokio::test]
async fn promote_raises_the_tier_and_refuses_what_the_operator_or_the_crd_would() {
    let Some(env) = setup("plugin-promote", Some("umstore-edit")).await else {
        return;
    };
    env.create("pilot").await;
    env.write_status("pilot", json!({"tier": 1})).await;
    let ns = env.namespace.clone();

    let out = env.plugin(&["promote", "pilot", "2"]).await;
    assert!(
        out.succeeded()
            .starts_with(&format!("{ns}/pilot: spec.tier 1 -> 2\n")),
        "{out:#?}"
    );
    let store = env.get("pilot").await;
    assert_eq!(store.spec.tier, 2);
    assert!(managers(&store).iter().any(|m| m == "kubectl-umstore"));

    // The store now runs tier 2.
    env.write_status("pilot", json!({"tier": 2})).await;
    let store = env.get("pilot").await;
    let refusals = [
        (
            "1",
            format!(
                "error: cannot promote {ns}/pilot to tier 1: {}\n",
                demotion_refused(1, 2)
            ),
        ),
        (
            "5",
            format!("error: cannot promote {ns}/pilot to tier 5: {TIER_RANGE}\n"),
        ),
        (
            "0",
            format!("error: cannot promote {ns}/pilot to tier 0: {TIER_RANGE}\n"),
        ),
        (
            "-1",
            format!("error: cannot promote {ns}/pilot to tier -1: {TIER_RANGE}\n"),
        ),
    ];
    for (tier, expected) in refusals {
        let out = env.plugin(&["promote", "pilot", tier]).await;
        assert_eq!(out.failed(), expected);
    }
    // Tier 3 without worker groups: the API server's CEL rule, in its words.
    let out = env.plugin(&["promote", "pilot", "3"]).await;
    let stderr = out.failed();
    assert!(
        stderr.starts_with(&format!(
            "error: cannot promote {ns}/pilot to tier 3: the API server refused it: \
             UserMetadataStore.umstore.io \"pilot\" is invalid: "
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "tier 3 and 4 need spec.workerGroups (or, at tier 4, spec.clusters): at least one group with the regions it holds"
        ),
        "{stderr}"
    );
    let after = env.get("pilot").await;
    assert_eq!(after.spec.tier, 2);
    assert_eq!(
        after.metadata.resource_version, store.metadata.resource_version,
        "no refusal changed the store"
    );

    let out = env.plugin(&["promote", "pilot", "2"]).await;
    assert_eq!(
        out.succeeded(),
        format!("{ns}/pilot: spec.tier is already 2; nothing changed\n")
    );
}

#[tokio::test]
async fn an_unknown_store_is_named_with_its_namespace() {
    let Some(env) = setup("plugin-unknown", Some("umstore-edit")).await else {
        return;
    };
    // Another namespace where the user holds the role, picked with -n.
    let other = fresh_namespace(&env.admin, "plugin-unknown-other").await;
    bind(&env.admin, &other, "umstore-edit").await;
    for (args, namespace) in [
        (vec!["status", "nope"], env.namespace.as_str()),
        (
            vec!["approve-migrations", "nope", "1"],
            env.namespace.as_str(),
        ),
        (vec!["rotate-keys", "nope"], env.namespace.as_str()),
        (vec!["promote", "nope", "2"], env.namespace.as_str()),
        (vec!["-n", &other, "status", "nope"], other.as_str()),
        (
            vec!["rotate-keys", "nope", "--namespace", &other],
            other.as_str(),
        ),
    ] {
        let out = env.plugin(&args).await;
        assert!(
            out.failed().starts_with(&format!(
                "error: no UserMetadataStore \"nope\" in namespace \"{namespace}\"; `kubectl get \
                 ums -n {namespace}` lists the stores there"
            )),
            "{args:?}: {out:#?}"
        );
    }
}

#[tokio::test]
async fn a_viewer_reads_but_cannot_change_and_a_stranger_cannot_read() {
    let Some(env) = setup("plugin-rbac", Some("umstore-view")).await else {
        return;
    };
    let store = env.create("pilot").await;
    env.plugin(&["status", "pilot"]).await.succeeded();
    let out = env.plugin(&["rotate-keys", "pilot"]).await;
    let stderr = out.failed();
    assert!(
        stderr.starts_with(&format!(
            "error: not allowed to change UserMetadataStore \"pilot\" in namespace \"{}\": ",
            env.namespace
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("User \"{PLAIN_USER}\" cannot patch")),
        "{stderr}"
    );
    assert!(stderr.contains("umstore-edit"), "{stderr}");
    let after = env.get("pilot").await;
    assert_eq!(
        after.metadata.resource_version,
        store.metadata.resource_version
    );
    assert_eq!(annotation(&after, ROTATE_ANNOTATION), None);

    // A namespace where the user holds nothing.
    let stranger = fresh_namespace(&env.admin, "plugin-rbac-none").await;
    let out = env.plugin(&["-n", &stranger, "status", "pilot"]).await;
    let stderr = out.failed();
    assert!(
        stderr.starts_with(&format!(
            "error: not allowed to read UserMetadataStore \"pilot\" in namespace \"{stranger}\": "
        )),
        "{stderr}"
    );
    assert!(stderr.contains("umstore-view"), "{stderr}");
}
