//! One store's life on a control plane where pods really come and go
//! (`umstore_e2e::ControlPlane`: kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok's fake nodes), with the operator running as the chart's
//! ServiceAccount under the chart's RBAC, reaching Vault (a real OpenBao) with its
//! own policy and the coordinator's Service through the documented test-only
//! address map (`Connector::with_address`) to a real PostgreSQL:
//!
//! 1. a tier-1 store becomes Ready from pod readiness alone (nothing is marked ready
//!    by hand), with a `Ready` condition that names the generation it observed
//!    (what `kubectl wait --for=condition=Ready` relies on);
//! 2. users seeded past a lowered threshold promote it to tier 2 automatically: the
//!    pooler and the replica pools come up, `Promoting` names the stage, the
//!    connection Secrets switch to the pooler, `status.tier` becomes 2;
//! 3. `umstore.io/rotate-keys` rotates the transit key and rewraps every data key;
//! 4. deleting the store runs the finalizer: its pods go, `Retain` keeps the
//!    PersistentVolumeClaims and the credential Secrets.
//!
//! kwok runs no container: the database work of every pod is the harness's one
//! PostgreSQL. Skips with the reason where a binary is missing (fails instead under
//! `UMSTORE_REQUIRE_COMPONENTS=1`).

#[path = "support/kubeapi.rs"]
mod kubeapi;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use umstore_crds::{UserMetadataStore, UserMetadataStoreStatus};
use umstore_data_plane::crypto::{
    DataKeyCache, KeyProvider, Keyring, VaultConfig, VaultKeyProvider,
};
use umstore_e2e::{shared, Postgres};
use umstore_operator::db::Connector;
use umstore_operator::steps::keys::{
    data_plane_policy, operator_policy, VaultAccess, VaultLogin, ROTATE_ANNOTATION,
};

use kubeapi::{
    admin_client, example, fresh_namespace, helm_or_skip, install_chart_rbac, install_crd,
    service_account_client, start_operator, wait_for, TEST_MANAGER,
};

const OPERATOR_NS: &str = "umstore-system";
const IDENTITY: &str = "walk-replica";
const NAME: &str = "pilot";
/// Users from which this store runs tier 2 (lowered from 10,000).
const TIER2_USERS: i64 = 40;

fn condition<'a>(
    status: &'a UserMetadataStoreStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

fn is(status: &UserMetadataStoreStatus, type_: &str, value: &str) -> bool {
    condition(status, type_).is_some_and(|c| c.status == value)
}

async fn wait_for_status(
    stores: &Api<UserMetadataStore>,
    what: &str,
    timeout: Duration,
    done: impl Fn(&UserMetadataStore) -> bool,
) -> UserMetadataStore {
    let deadline = Instant::now() + timeout;
    loop {
        let store = stores.get(NAME).await.ok();
        if let Some(s) = store.as_ref().filter(|s| done(s)) {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; the store's status: {:#?}",
            store.and_then(|s| s.status)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn annotate(stores: &Api<UserMetadataStore>, key: &str, value: &str) {
    stores
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("annotate {key}: {e}"));
}

fn secret_value(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_walks_from_tier_1_through_promotion_rotation_and_deletion() {
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
    let crd_installed = Instant::now();
    let ns = fresh_namespace(&admin, "walk").await;
    let rbac = install_chart_rbac(&admin, &helm, OPERATOR_NS).await;
    let operator_client =
        service_account_client(cp.api(), &admin, &rbac.namespace, &rbac.service_account).await;

    // The coordinator's PostgreSQL, with the image's superuser.
    let pg = Postgres::start_with_replicas(0).expect("PostgreSQL");
    pg.primary()
        .psql("postgres", "CREATE ROLE postgres SUPERUSER LOGIN")
        .expect("postgres role");
    let connector = Connector::in_cluster().with_address(
        &format!("{NAME}-coordinator.{ns}.svc"),
        5432,
        ("127.0.0.1".to_string(), pg.port()),
    );
    let bao = shared().openbao().expect("OpenBao");
    let operator_token = bao
        .token_with_policy("walk-operator", &operator_policy("transit", "umstore-pii"))
        .expect("operator token");
    let data_plane_token = bao
        .token_with_policy(
            "walk-data-plane",
            &data_plane_policy("transit", "umstore-pii"),
        )
        .expect("data-plane token");
    start_operator(operator_client, OPERATOR_NS, IDENTITY, |ctx| {
        ctx.with_connector(connector).with_vault(VaultAccess {
            login: VaultLogin::Token(operator_token),
            ..VaultAccess::default()
        })
    });

    // 1. Tier 1, Ready from the pods' readiness as the cluster reports it.
    let mut store = example(1, &ns);
    store["spec"]["encryption"]["vaultAddress"] = json!(bao.address());
    store["spec"]["autoPromotion"] = json!({"enabled": true, "thresholds":
        {"tier2Users": TIER2_USERS, "tier3Users": 1_000_000, "tier4Users": 10_000_000}});
    store["spec"]["replicaPools"] = json!([
        {"purpose": "ai", "replicas": 1}, {"purpose": "analytics", "replicas": 1}]);
    let stores: Api<UserMetadataStore> = Api::namespaced(admin.clone(), &ns);
    let started = Instant::now();
    stores
        .patch(
            NAME,
            &PatchParams::apply(TEST_MANAGER),
            &Patch::Apply(&store),
        )
        .await
        .expect("apply the tier-1 store");
    let ready = wait_for_status(&stores, "Ready", Duration::from_secs(120), |s| {
        s.status.as_ref().is_some_and(|st| is(st, "Ready", "True"))
    })
    .await;
    let to_ready = started.elapsed();
    let status = ready.status.clone().expect("status");
    let ready_condition = condition(&status, "Ready").expect("Ready");
    assert_eq!(
        ready_condition.observed_generation, ready.metadata.generation,
        "Ready names the generation it describes"
    );
    assert_eq!(status.observed_generation, ready.metadata.generation);
    assert_eq!(status.tier, Some(1));
    assert!(is(&status, "KeysReady", "True"), "{status:#?}");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let running = pods.list(&ListParams::default()).await.expect("pods").items;
    assert!(
        running
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some("pilot-coordinator-0")),
        "the coordinator pod was scheduled and runs"
    );
    eprintln!("tier 1 Ready {:.1} s after apply", to_ready.as_secs_f64());

    // 2. Users past the lowered threshold: promotion to tier 2.
    let mut seeder = pg.connect("umstore").await.expect("connect");
    let mut dp = VaultConfig::with_token(bao.address(), data_plane_token);
    dp.key_name = "umstore-pii".into();
    let keyring = Keyring::open(
        KeyProvider::Vault(Box::new(
            VaultKeyProvider::connect(dp)
                .await
                .expect("data plane's Vault"),
        )),
        DataKeyCache::new(16, Duration::from_secs(60)),
        &seeder,
    )
    .await
    .expect("keyring");
    let users = u64::try_from(TIER2_USERS).unwrap_or(40) + 10;
    umstore_data_plane::seed::seed(&mut seeder, users, 11, &keyring)
        .await
        .expect("seed");
    // What autovacuum does after a bulk load; the step reads the statistics only.
    seeder
        .batch_execute("ANALYZE umstore.user_directory")
        .await
        .expect("analyze");
    // A reconcile comes every 5 minutes when nothing changes; any change brings it now.
    let promoting_from = Instant::now();
    annotate(&stores, "example.com/poke", "1").await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    let promoting = wait_for_status(&stores, "Promoting", Duration::from_secs(60), |s| {
        s.status
            .as_ref()
            .is_some_and(|st| is(st, "Promoting", "True"))
    })
    .await;
    let st = promoting.status.expect("status");
    let promotion = st.promotion.clone().expect("status.promotion");
    assert_eq!(promotion.target_tier, Some(2), "{promotion:?}");
    assert!(promotion.measured_users >= TIER2_USERS, "{promotion:?}");
    assert_eq!(st.tier, Some(1), "status.tier moves only once tier 2 runs");
    let message = &condition(&st, "Promoting").expect("Promoting").message;
    assert!(
        message.contains("promoting from tier 1 to tier 2"),
        "{message}"
    );

    let promoted = wait_for_status(&stores, "tier 2", Duration::from_secs(120), |s| {
        s.status.as_ref().is_some_and(|st| st.tier == Some(2))
    })
    .await;
    let promotion_took = promoting_from.elapsed();
    let st = promoted.status.expect("status");
    assert!(is(&st, "Promoting", "False"), "{st:#?}");
    assert_eq!(
        condition(&st, "Promoting").map(|c| c.reason.as_str()),
        Some("PromotionComplete")
    );
    let writer = secrets
        .get("pilot-conn-writer")
        .await
        .expect("writer Secret");
    assert!(
        secret_value(&writer, "uri").contains(&format!("@pilot-pgbouncer.{ns}.svc:")),
        "the writer's Secret names the pooler: {}",
        secret_value(&writer, "uri")
    );
    let ai = secrets.get("pilot-conn-ai").await.expect("ai Secret");
    assert!(secret_value(&ai, "uri").contains(&format!("@pilot-replica-ai.{ns}.svc:5432/")));
    let sets: Api<StatefulSet> = Api::namespaced(admin.clone(), &ns);
    for name in ["pilot-replica-ai", "pilot-replica-analytics"] {
        let set = sets.get(name).await.expect("pool StatefulSet");
        assert_eq!(set.status.and_then(|s| s.ready_replicas), Some(1), "{name}");
    }
    eprintln!(
        "promotion 1 -> 2 took {:.1} s",
        promotion_took.as_secs_f64()
    );

    // 3. Rotation by annotation: every data key rewrapped.
    annotate(&stores, ROTATE_ANNOTATION, "walk-1").await;
    let rotated = wait_for_status(&stores, "the rotation", Duration::from_secs(60), |s| {
        s.status
            .as_ref()
            .and_then(|st| st.keys.as_ref())
            .and_then(|k| k.rotation.as_ref())
            .is_some_and(|r| r.state == "Succeeded")
    })
    .await;
    let keys = rotated.status.and_then(|s| s.keys).expect("status.keys");
    assert_eq!(keys.version, Some(2));
    assert_eq!(keys.min_decryption_version, Some(2));
    assert_eq!(keys.rotate_request.as_deref(), Some("walk-1"));
    let below: i64 = seeder
        .query_one(
            "SELECT count(*) FROM umstore.user_data_keys WHERE kek_version < 2 \
             AND wrapped_key IS NOT NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(below, 0, "every data key rewrapped");

    // 4. Deletion: the finalizer, Retain keeps claims and credentials.
    // The garbage collector watches a custom resource's kind once its discovery,
    // refreshed every 30 s, has found it; a store deleted before then leaves its
    // dependents behind (never so in a cluster whose CRD predates its stores).
    tokio::time::sleep(Duration::from_secs(40).saturating_sub(crd_installed.elapsed())).await;
    stores
        .delete(NAME, &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("the store to be gone", Duration::from_secs(60), || async {
        stores
            .get_opt(NAME)
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<String> = pods
            .list(&ListParams::default())
            .await
            .expect("pods")
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pods left after the store was deleted: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), &ns);
    let kept = claims
        .list(&ListParams::default())
        .await
        .expect("claims")
        .items;
    assert!(
        kept.iter()
            .any(|c| c.metadata.name.as_deref() == Some("data-pilot-coordinator-0")),
        "Retain keeps the coordinator's claim: {:?}",
        kept.iter()
            .map(|c| c.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    for name in ["pilot-role-admin", "pilot-conn-writer"] {
        let secret = secrets
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("{name} kept: {e}"));
        assert!(
            secret
                .metadata
                .owner_references
                .unwrap_or_default()
                .is_empty(),
            "{name} is orphaned so garbage collection keeps it"
        );
    }
}
