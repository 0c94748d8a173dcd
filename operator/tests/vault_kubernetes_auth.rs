//! The data plane's Vault login as it runs in a cluster: OpenBao's `kubernetes` auth
//! method checks the pod's service-account token with a real kube-apiserver's
//! TokenReview, and only the service account bound to the role gets transit access.
//! Skips with the reason where kube-apiserver/etcd or OpenBao are missing (fails
//! instead under `UMSTORE_REQUIRE_COMPONENTS=1`).

#[path = "support/kubeapi.rs"]
mod kubeapi;

use std::time::Duration;

use umstore_data_plane::crypto::{DataKey, VaultAuth, VaultConfig, VaultKeyProvider};
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_e2e::{HarnessError, OpenBao};
use umstore_operator::steps::keys::{data_plane_policy, operator_policy};

use kubeapi::{admin_client, fresh_namespace, new_service_account_token, server_or_skip};

const ROLE: &str = "umstore";

const OPERATOR_ROLE: &str = "umstore-operator";

fn config(bao: &OpenBao, token_path: std::path::PathBuf) -> VaultConfig {
    config_as(bao, ROLE, token_path)
}

fn config_as(bao: &OpenBao, role: &str, token_path: std::path::PathBuf) -> VaultConfig {
    let mut config = VaultConfig::with_token(bao.address(), "");
    config.auth = VaultAuth::Kubernetes {
        role: role.into(),
        token_path,
        mount: "kubernetes".into(),
    };
    config.attempts = 1;
    config.timeout = Duration::from_secs(10);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_logs_in_with_its_service_account_and_no_other_account_does() {
    let Some(server) = server_or_skip() else {
        return;
    };
    let bao = match OpenBao::start() {
        Ok(bao) => bao,
        Err(e @ HarnessError::ProgramNotFound { .. }) => {
            skip_or_fail(Component::OpenBao, e);
            return;
        }
        Err(e) => panic!("OpenBao is installed but did not start: {e}"),
    };
    let client = admin_client(server).await;
    let ns = fresh_namespace(&client, "umstore").await;
    let data_plane_jwt = new_service_account_token(&client, &ns, "pilot-data-plane").await;
    let other_jwt = new_service_account_token(&client, &ns, "someone-else").await;

    let operator_jwt = new_service_account_token(&client, &ns, "umstore-operator").await;

    // What docs/encryption.md tells operators to configure in Vault: one policy per
    // identity, for the store's key only.
    let dir = tempfile::tempdir().expect("tempdir");
    let write_policy = |name: &str, hcl: &str| {
        let file = dir.path().join(format!("{name}.hcl"));
        std::fs::write(&file, hcl).expect("policy");
        bao.cli(&["policy", "write", name, &file.display().to_string()])
            .expect("policy write");
    };
    write_policy(
        "umstore-data-plane",
        &data_plane_policy("transit", "umstore-pii"),
    );
    write_policy(
        "umstore-operator",
        &operator_policy("transit", "umstore-pii"),
    );
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
        "write",
        &format!("auth/kubernetes/role/{ROLE}"),
        "bound_service_account_names=pilot-data-plane",
        &format!("bound_service_account_namespaces={ns}"),
        "token_policies=umstore-data-plane",
        "token_ttl=10m",
    ])
    .expect("role");
    bao.cli(&[
        "write",
        &format!("auth/kubernetes/role/{OPERATOR_ROLE}"),
        "bound_service_account_names=umstore-operator",
        &format!("bound_service_account_namespaces={ns}"),
        "token_policies=umstore-operator",
        "token_ttl=10m",
    ])
    .expect("operator role");

    // The operator creates the key (the keys step); the data plane may not.
    let operator_token = dir.path().join("operator-token");
    std::fs::write(&operator_token, &operator_jwt).expect("token file");
    let operator = VaultKeyProvider::connect(config_as(&bao, OPERATOR_ROLE, operator_token))
        .await
        .expect("the operator's service account logs in and creates the key");
    assert_eq!(operator.versions().await.expect("versions").latest, 1);

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
    let refused = provider
        .rotate()
        .await
        .expect_err("the data plane's token must not rotate the key");
    assert!(
        refused.to_string().contains("permission denied"),
        "{refused}"
    );
    operator.rotate().await.expect("the operator rotates");
    let rewrapped = provider.rewrap_one(&wrapped).await.expect("rewrap");
    assert_eq!(rewrapped.kek_version, 2);

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
