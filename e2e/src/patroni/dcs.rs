//! The API-server side of a [`super::PatroniCluster`]: a fresh namespace, the
//! ServiceAccount Patroni runs as with the Role a test supplies, that account's token
//! in a kubeconfig, and one Pod object per member for Patroni to label.
//!
//! Plain JSON over HTTPS with the admin token ([`crate::http::https`]).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::http::https;
use crate::{HarnessError, KubeApiServer};

/// The ServiceAccount (and Role, RoleBinding) the members authenticate as.
pub(super) const SERVICE_ACCOUNT: &str = "patroni";
/// The kubeconfig context naming that account (Patroni's `kubernetes.context`).
pub const CONTEXT: &str = "patroni";

/// Admin access to the test API server.
#[derive(Debug, Clone)]
pub(super) struct Admin {
    port: u16,
    ca_cert: PathBuf,
    token: String,
}

impl Admin {
    pub(super) fn new(kube: &KubeApiServer) -> Self {
        Self {
            port: kube.port(),
            ca_cert: kube.ca_cert().to_path_buf(),
            token: kube.admin_token().to_owned(),
        }
    }

    /// `method path` with a JSON body: the status and the parsed answer (`null` when
    /// it is not JSON).
    pub(super) fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), HarnessError> {
        let body = body.map(Value::to_string);
        let (status, text) = https(
            self.port,
            &self.ca_cert,
            &self.token,
            method,
            path,
            body.as_deref(),
        )
        .map_err(|e| {
            HarnessError::io(format!("{method} https://127.0.0.1:{}{path}", self.port), e)
        })?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// `POST path body`, which must answer 201 (or 200): the created object.
    pub(super) fn create(&self, path: &str, body: &Value) -> Result<Value, HarnessError> {
        let (status, answer) = self.request("POST", path, Some(body))?;
        if matches!(status, 200 | 201) {
            return Ok(answer);
        }
        Err(HarnessError::CommandFailed {
            command: format!("POST {path}"),
            output: format!("{status}: {answer}"),
        })
    }

    /// `GET path`, which must answer 200.
    pub(super) fn get(&self, path: &str) -> Result<Value, HarnessError> {
        let (status, answer) = self.request("GET", path, None)?;
        if status == 200 {
            return Ok(answer);
        }
        Err(HarnessError::CommandFailed {
            command: format!("GET {path}"),
            output: format!("{status}: {answer}"),
        })
    }

    /// Makes `namespace` with the ServiceAccount [`SERVICE_ACCOUNT`], a Role of that
    /// name holding `rules` (a JSON array of RBAC `PolicyRule`s) bound to it; returns
    /// a token of the account (TokenRequest, one day).
    pub(super) fn set_up_namespace(
        &self,
        namespace: &str,
        rules: &Value,
    ) -> Result<String, HarnessError> {
        self.create(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        )?;
        let ns = format!("/api/v1/namespaces/{namespace}");
        let rbac = format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}");
        self.create(
            &format!("{ns}/serviceaccounts"),
            &json!({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": SERVICE_ACCOUNT}}),
        )?;
        self.create(
            &format!("{rbac}/roles"),
            &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": {"name": SERVICE_ACCOUNT}, "rules": rules}),
        )?;
        self.create(
            &format!("{rbac}/rolebindings"),
            &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": {"name": SERVICE_ACCOUNT},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                "name": SERVICE_ACCOUNT},
                    "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                                  "namespace": namespace}]}),
        )?;
        let answer = self.create(
            &format!("{ns}/serviceaccounts/{SERVICE_ACCOUNT}/token"),
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": {"expirationSeconds": 86400}}),
        )?;
        answer["status"]["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| HarnessError::CommandFailed {
                command: format!("POST {ns}/serviceaccounts/{SERVICE_ACCOUNT}/token"),
                output: format!("no status.token in {answer}"),
            })
    }

    /// A Pod object standing for a member's database pod: it runs as the
    /// ServiceAccount (which exists, unlike `default`) and, with no kubelet here,
    /// stays Pending; Patroni keeps its member state and role label on it.
    pub(super) fn create_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: &Value,
    ) -> Result<(), HarnessError> {
        self.create(
            &format!("/api/v1/namespaces/{namespace}/pods"),
            &json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "labels": labels},
                    "spec": {"serviceAccountName": SERVICE_ACCOUNT,
                             "automountServiceAccountToken": false,
                             "containers": [{"name": "postgres",
                                             "image": "umstore.test/patroni:none"}]}}),
        )
        .map(drop)
    }

    /// The Pod `name` in `namespace`.
    pub(super) fn pod(&self, namespace: &str, name: &str) -> Result<Value, HarnessError> {
        self.get(&format!("/api/v1/namespaces/{namespace}/pods/{name}"))
    }

    /// A kubeconfig whose only context, [`CONTEXT`], is the ServiceAccount's `token`
    /// in `namespace`, trusting the CA file `ca`.
    pub(super) fn kubeconfig(&self, namespace: &str, token: &str, ca: &Path) -> String {
        // JSON is YAML, and Patroni reads the kubeconfig with a YAML parser.
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "umstore-test", "cluster": {
                "server": format!("https://127.0.0.1:{}", self.port),
                "certificate-authority": ca.display().to_string(),
            }}],
            "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
            "contexts": [{"name": CONTEXT, "context": {
                "cluster": "umstore-test", "user": SERVICE_ACCOUNT, "namespace": namespace,
            }}],
            "current-context": CONTEXT,
        });
        serde_json::to_string_pretty(&config).unwrap_or_default()
    }

    /// The CA file the API server's certificate chains to.
    pub(super) fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }
}
