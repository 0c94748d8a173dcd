//! Drift on a real kube-apiserver, as the chart's ServiceAccount: once a store's
//! objects are applied, a reconcile with nothing to do sends no write at all (the
//! API server's defaults are not mistaken for drift), and a hand edit of each owned
//! kind (`kubectl scale`, `kubectl edit` of a ConfigMap, a Service's selector
//! changed, ...) is put back by the next reconcile and reported.
//!
//! Skips with the reason where kube-apiserver, etcd or helm are missing (fails
//! instead under `UMSTORE_REQUIRE_COMPONENTS=1`).

#[path = "support/kubeapi.rs"]
mod kubeapi;

use std::sync::Arc;

use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::{Client, ResourceExt};
use serde_json::{json, Value};
use umstore_crds::UserMetadataStore;
use umstore_operator::builders::{owned_kinds, Env};
use umstore_operator::leader::Leadership;
use umstore_operator::metrics::Metrics;
use umstore_operator::steps::Reason;
use umstore_operator::{controller, pipeline, Context};

use kubeapi::{
    admin_client, example, fresh_namespace, helm_or_skip, install_chart_rbac, install_crd,
    server_or_skip, service_account_client, TEST_MANAGER,
};

/// Every owned object's `kind/name` → resourceVersion.
async fn versions(client: &Client, ns: &str, store: &str) -> Vec<(String, String)> {
    let selector = format!("app.kubernetes.io/instance={store}");
    let mut out = Vec::new();
    for ar in owned_kinds() {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        for obj in api
            .list(&ListParams::default().labels(&selector))
            .await
            .expect("list owned objects")
        {
            out.push((
                format!("{}/{}", ar.kind, obj.name_any()),
                obj.resource_version().unwrap_or_default(),
            ));
        }
    }
    out.sort();
    out
}

async fn reconcile_once(
    ctx: &Context,
    stores: &Api<UserMetadataStore>,
    name: &str,
) -> pipeline::Report {
    let store = stores.get(name).await.expect("get the store");
    pipeline::run(ctx, &store).await.expect("reconcile")
}

/// A hand edit as `kubectl edit` makes it: a JSON merge patch under another manager.
async fn edit(admin: &Client, ns: &str, kind: &str, name: &str, patch: Value) {
    let ar: ApiResource = umstore_operator::apply::api_resource_of_kind(kind).expect("owned kind");
    let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), ns, &ar);
    api.patch(
        name,
        &PatchParams {
            field_manager: Some("kubectl-edit".into()),
            ..PatchParams::default()
        },
        &Patch::Merge(&patch),
    )
    .await
    .unwrap_or_else(|e| panic!("edit {kind}/{name}: {e}"));
}

async fn get(admin: &Client, ns: &str, kind: &str, name: &str) -> Value {
    let ar: ApiResource = umstore_operator::apply::api_resource_of_kind(kind).expect("owned kind");
    let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), ns, &ar);
    serde_json::to_value(api.get(name).await.expect("get")).expect("json")
}

/// The admin client and an operator context acting as the chart's ServiceAccount
/// with exactly the chart's RBAC; `None` after a skip (a failure in CI).
async fn operator_as_chart_account() -> Option<(Client, Context)> {
    let server = server_or_skip()?;
    let helm = helm_or_skip()?;
    let admin = admin_client(server).await;
    install_crd(&admin).await;
    let rbac = install_chart_rbac(&admin, &helm, "umstore-system").await;
    let operator =
        service_account_client(server, &admin, &rbac.namespace, &rbac.service_account).await;
    let ctx = Context::new(
        operator,
        Arc::new(Metrics::new()),
        Leadership::new(true),
        Env {
            operator_namespace: rbac.namespace.clone(),
        },
        Some("drift-test".into()),
    );
    Some((admin, ctx))
}

/// Applies `examples/tier<tier>.yaml` into `ns` as a user would; its API and name.
async fn apply_example(admin: &Client, tier: i32, ns: &str) -> (Api<UserMetadataStore>, String) {
    let store = example(tier, ns);
    let name = store["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let stores: Api<UserMetadataStore> = Api::namespaced(admin.clone(), ns);
    stores
        .patch(
            &name,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&store),
        )
        .await
        .expect("apply the example");
    (stores, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_are_put_back_and_a_steady_state_writes_nothing() {
    let Some((admin, ctx)) = operator_as_chart_account().await else {
        return;
    };
    let ctx = Arc::new(ctx);
    let ns = fresh_namespace(&admin, "drift").await;

    // A tier-2 store: every owned kind (ServiceAccount, ConfigMap, Secret, Service,
    // StatefulSet, Deployment, PodDisruptionBudget, NetworkPolicy).
    let (stores, name) = apply_example(&admin, 2, &ns).await;
    // First the finalizer, through the controller's entry point; then the pipeline.
    let guarded: DeserializeGuard<UserMetadataStore> =
        DeserializeGuard(Ok(stores.get(&name).await.expect("store")));
    controller::reconcile(Arc::new(guarded), ctx.clone())
        .await
        .expect("finalizer added");
    let first = reconcile_once(&ctx, &stores, &name).await;
    assert!(
        first.journal.applied.len() > 20,
        "{:?}",
        first.journal.applied
    );

    // Nothing changed: no object is written, not one resourceVersion moves.
    let before = versions(&admin, &ns, &name).await;
    let steady = reconcile_once(&ctx, &stores, &name).await;
    assert_eq!(
        steady.journal.applied,
        Vec::<String>::new(),
        "the API server's defaults were taken for drift"
    );
    assert!(steady.journal.created.is_empty() && steady.journal.deleted.is_empty());
    assert_eq!(versions(&admin, &ns, &name).await, before);

    let replica = format!("{name}-replica-ai");
    let pgbouncer = format!("{name}-pgbouncer");
    let edits: Vec<(&str, String, Value, &str)> = vec![
        (
            "StatefulSet",
            replica.clone(),
            json!({"spec": {"replicas": 9}}),
            "/spec/replicas",
        ),
        (
            "Deployment",
            format!("{name}-data-plane"),
            json!({"spec": {"replicas": 0}}),
            "/spec/replicas",
        ),
        (
            "ConfigMap",
            pgbouncer.clone(),
            json!({"data": {"pgbouncer.ini": "[databases]\n"}}),
            "/data/pgbouncer.ini",
        ),
        (
            "Service",
            pgbouncer.clone(),
            json!({"spec": {"selector": {"app.kubernetes.io/component": "data-plane"}}}),
            "/spec/selector",
        ),
        (
            "Secret",
            format!("{name}-conn-writer"),
            json!({"data": {"host": "ZXZpbC5leGFtcGxl"}}),
            "/data/host",
        ),
        (
            "PodDisruptionBudget",
            replica,
            json!({"spec": {"maxUnavailable": 5}}),
            "/spec/maxUnavailable",
        ),
        (
            "NetworkPolicy",
            format!("{name}-postgres"),
            json!({"spec": {"ingress": []}}),
            "/spec/ingress",
        ),
    ];
    for (kind, object, patch, pointer) in edits {
        let wanted = get(&admin, &ns, kind, &object)
            .await
            .pointer(pointer)
            .cloned();
        edit(&admin, &ns, kind, &object, patch).await;
        assert_ne!(
            get(&admin, &ns, kind, &object)
                .await
                .pointer(pointer)
                .cloned(),
            wanted,
            "the edit of {kind}/{object} took"
        );
        let report = reconcile_once(&ctx, &stores, &name).await;
        assert_eq!(
            report.journal.applied,
            [format!("{kind}/{object}")],
            "only the edited object"
        );
        assert!(
            report
                .journal
                .events
                .iter()
                .any(|e| e.reason == Reason::DriftCorrected),
            "{kind}: {:?}",
            report.journal.events
        );
        assert_eq!(
            get(&admin, &ns, kind, &object)
                .await
                .pointer(pointer)
                .cloned(),
            wanted,
            "{kind}/{object} {pointer} put back"
        );
        let again = reconcile_once(&ctx, &stores, &name).await;
        assert!(
            again.journal.applied.is_empty(),
            "{kind}: {:?}",
            again.journal.applied
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_tier_reaches_a_steady_state_that_writes_nothing() {
    let Some((admin, ctx)) = operator_as_chart_account().await else {
        return;
    };
    for tier in 1..=4 {
        let ns = fresh_namespace(&admin, "steady").await;
        let (stores, name) = apply_example(&admin, tier, &ns).await;
        let first = reconcile_once(&ctx, &stores, &name).await;
        assert!(!first.journal.applied.is_empty(), "tier {tier}");
        let before = versions(&admin, &ns, &name).await;
        let steady = reconcile_once(&ctx, &stores, &name).await;
        assert_eq!(
            steady.journal.applied,
            Vec::<String>::new(),
            "tier {tier}: the API server's defaults were taken for drift"
        );
        assert_eq!(versions(&admin, &ns, &name).await, before, "tier {tier}");
    }
}
