//! The data plane's Vault login as it runs in a cluster: OpenBao's `kubernetes` auth
//! method checks the pod's service-account token with a real kube-apiserver's
//! TokenReview, and only the service account bound to the role gets transit access.
//! Skips with the reason where kube-apiserver/etcd or OpenBao are missing.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::json;
use umstore_data_plane::crypto::{DataKey, VaultAuth, VaultConfig, VaultKeyProvider};
use umstore_e2e::{KubeApiServer, KubeApiUnavailable, OpenBao};

const NS: &str = "umstore";
const ROLE: &str = "umstore";

async fn client_of(server: &KubeApiServer) -> Client {
    let kubeconfig = Kubeconfig::read_from(server.kubeconfig()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

async fn token_of(client: &Client, service_account: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": service_account}}))
                .expect("service account"),
        )
        .await
        .expect("create service account");
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    accounts
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .and_then(|s| s.token)
        .expect("token issued")
}

fn config(bao: &OpenBao, token_path: std::path::PathBuf) -> VaultConfig {
    let mut config = VaultConfig::with_token(bao.address(), "");
    config.auth = VaultAuth::Kubernetes {
        role: ROLE.into(),
        token_path,
        mount: "kubernetes".into(),
    };
    config.attempts = 1;
    config.timeout = Duration::from_secs(10);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_logs_in_with_its_service_account_and_no_other_account_does() {
    let server = match KubeApiServer::start() {
        Ok(server) => server,
        Err(KubeApiUnavailable::Skip(why)) => {
            eprintln!("skipping: {why}");
            return;
        }
        Err(e) => panic!("kube-apiserver failed to start: {e}"),
    };
    let bao = match OpenBao::start() {
        Ok(bao) => bao,
        Err(e) => {
            eprintln!("skipping: OpenBao is not available here: {e}");
            return;
        }
    };
    let client = client_of(&server).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).expect("namespace"),
        )
        .await
        .expect("namespace");
    let data_plane_jwt = token_of(&client, "pilot-data-plane").await;
    let other_jwt = token_of(&client, "someone-else").await;

    // What docs/encryption.md tells operators to configure in Vault.
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.hcl");
    std::fs::write(
        &policy,
        "path \"transit/*\" { capabilities = [\"create\", \"read\", \"update\", \"list\"] }\n",
    )
    .expect("policy");
    bao.cli(&["auth", "enable", "kubernetes"])
        .expect("enable kubernetes auth");
    bao.cli(&[
        "write",
        "auth/kubernetes/config",
        &format!("kubernetes_host={}", server.url()),
        &format!("kubernetes_ca_cert=@{}", server.ca_cert().display()),
        &format!("token_reviewer_jwt={}", server.admin_token()),
    ])
    .expect("configure kubernetes auth");
    bao.cli(&[
        "policy",
        "write",
        "umstore-transit",
        &policy.display().to_string(),
    ])
    .expect("policy");
    bao.cli(&[
        "write",
        &format!("auth/kubernetes/role/{ROLE}"),
        "bound_service_account_names=pilot-data-plane",
        &format!("bound_service_account_namespaces={NS}"),
        "token_policies=umstore-transit",
        "token_ttl=10m",
    ])
    .expect("role");

    // The pod's projected token, as the kubelet mounts it.
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, &data_plane_jwt).expect("token file");
    let provider = VaultKeyProvider::connect(config(&bao, token_path.clone()))
        .await
        .expect("the data plane's service account logs in and may use transit");
    let key = DataKey::generate();
    let wrapped = provider.wrap(&key).await.expect("wrap");
    let unwrapped = provider
        .unwrap_key(uuid::Uuid::nil(), &wrapped)
        .await
        .expect("unwrap");
    let aad = umstore_data_plane::crypto::FieldAad {
        user_id: uuid::Uuid::nil(),
        region: "KA",
        column: "phone_enc",
    };
    let sealed = key.seal(&aad, b"+91 98450 00000");
    assert_eq!(
        unwrapped.open(&aad, &sealed.0).expect("open"),
        b"+91 98450 00000"
    );

    // Another service account of the namespace is refused, and the error says where.
    std::fs::write(&token_path, &other_jwt).expect("token file");
    let refused = VaultKeyProvider::connect(config(&bao, token_path.clone()))
        .await
        .err()
        .map(|e| e.to_string())
        .expect("a service account not bound to the role is refused");
    assert!(
        refused.contains("Kubernetes service account"),
        "says which login failed: {refused}"
    );

    // A token the API server did not issue is refused by its TokenReview.
    std::fs::write(&token_path, "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl").expect("token file");
    assert!(
        VaultKeyProvider::connect(config(&bao, token_path))
            .await
            .is_err(),
        "a forged token must not log in"
    );
}
