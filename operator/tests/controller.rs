//! The controller against the mocked API (`support::FakeApi`): which requests each
//! reconcile makes, in order, and what they carry.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use support::scenario::*;
use support::{paths, FakeApi, Recorded};
use umstore_crds::UserMetadataStore;
use umstore_operator::builders::credentials::Credentials;
use umstore_operator::builders::{topology, Env};
use umstore_operator::controller::{error_policy, reconcile, Guarded, NOT_LEADER_RECHECK};
use umstore_operator::steps::bootstrap;
use umstore_operator::validated::validate;
use umstore_operator::{Context, Error};

#[tokio::test]
async fn first_reconcile_applies_every_object_then_the_status() {
    let (api, ctx, name) = seeded_without_credentials(example(2)).await;
    reconcile(stored(&api, &name), ctx)
        .await
        .expect("reconcile");
    let writes = api.writes();

    // Role Secrets and the API tokens first, each created once.
    let created: Vec<String> = writes
        .iter()
        .filter(|w| w.method == "POST" && w.path == paths::secrets(NS))
        .map(|w| {
            w.body.as_ref().expect("body")["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        created.len(),
        10,
        "9 role Secrets and the tokens: {created:?}"
    );
    assert!(created.contains(&"state-rollout-role-writer".to_string()));
    assert!(created.contains(&"state-rollout-role-admin-login".to_string()));
    assert_eq!(
        created.last().map(String::as_str),
        Some("state-rollout-api-tokens")
    );

    // Then every object of the tier, server-side applied in builder order, then the status.
    let store: UserMetadataStore =
        serde_json::from_value(api.get(&paths::stores(NS), &name).expect("store")).expect("store");
    let desired = topology(
        &validate(&store).expect("valid"),
        &Credentials::fixed_for_tests(),
        &Env {
            operator_namespace: "umstore-system".into(),
        },
    );
    let applied = applies(&writes);
    assert_eq!(applied.len(), desired.len() + 1, "{:#?}", lines(&writes));
    for (w, o) in applied.iter().zip(&desired) {
        assert!(
            w.path.ends_with(&format!("/{}", o.name())),
            "{} vs {}",
            w.path,
            o.key()
        );
        assert!(
            w.query.contains("fieldManager=umstore-operator") && w.query.contains("force=true"),
            "{}",
            w.query
        );
        let body = w.body.as_ref().expect("body");
        assert_eq!(body["kind"], o.api_resource().kind);
        assert!(body["metadata"]["annotations"]["umstore.io/applied-hash"].is_string());
    }
    let status_write = applied.last().expect("status");
    assert_eq!(
        status_write.path,
        format!("{}/{name}/status", paths::stores(NS))
    );

    // The coordinator's StatefulSet carries what the builder made.
    let sts = applied
        .iter()
        .find(|w| w.path.ends_with("/statefulsets/state-rollout-coordinator"))
        .expect("sts");
    let body = sts.body.as_ref().expect("body");
    assert_eq!(
        body["spec"]["template"]["spec"]["containers"][0]["name"],
        "postgres"
    );
    assert_eq!(
        body["spec"]["template"]["spec"]["containers"][1]["name"],
        "exporter"
    );

    let status = status_of(&api, &name);
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["tier"], 2);
    assert_eq!(status["phase"], "Provisioning");
    assert_eq!(condition(&status, "Provisioned")["status"], "True");
    // The pipeline waits in bootstrap until the coordinator has a ready replica.
    assert_eq!(condition(&status, "Bootstrapped")["status"], "False");
    assert_eq!(condition(&status, "Ready")["reason"], "CoordinatorNotReady");
    assert!(status["schemaVersion"].is_null());
    assert_eq!(
        status["endpoints"]["readWrite"],
        "state-rollout-pgbouncer.umstore.svc:6432"
    );
    assert_eq!(
        status["endpoints"]["replicaPools"]["ai"],
        "state-rollout-replica-ai.umstore.svc:5432"
    );
    let reasons = events(&writes);
    for r in ["CredentialsCreated", "Applied"] {
        assert!(reasons.contains(&r.to_string()), "{reasons:?}");
    }
}

#[tokio::test]
async fn second_reconcile_with_nothing_changed_writes_nothing() {
    let (api, ctx, name) = seeded(example(1)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    api.clear_log();
    let action = reconcile(stored(&api, &name), ctx).await.expect("second");
    let log = api.log();
    assert!(api.writes().is_empty(), "{:#?}", lines(&api.writes()));
    assert!(log.iter().all(|r| r.method == "GET"), "only reads");
    assert_eq!(
        action,
        Action::requeue(bootstrap::NOT_READY_WAIT),
        "the coordinator is not ready yet (its pods and StatefulSet are watched)"
    );
}

#[tokio::test]
async fn readiness_change_updates_only_the_status() {
    let (api, ctx, name) = seeded(example(1)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    api.mark_workloads_ready();
    api.clear_log();
    let action = reconcile(stored(&api, &name), ctx).await.expect("second");
    let writes = api.writes();
    assert_eq!(
        lines(&applies(&writes).into_iter().cloned().collect::<Vec<_>>()),
        [format!("PATCH {}/{name}/status", paths::stores(NS))]
    );
    let status = status_of(&api, &name);
    assert_eq!(status["phase"], "Ready");
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(condition(&status, "Bootstrapped")["status"], "True");
    assert_eq!(condition(&status, "SchemaReady")["status"], "True");
    assert_eq!(
        status["schemaVersion"],
        umstore_migrations::Runner::default().latest_version()
    );
    let reasons = events(&writes);
    assert!(
        reasons.contains(&"AllComponentsReady".to_string()),
        "{reasons:?}"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
async fn raising_the_tier_reports_promoting_until_the_new_tier_is_ready() {
    let (api, ctx, name) = seeded(example(1)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    api.mark_workloads_ready();
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("ready");
    assert_eq!(status_of(&api, &name)["tier"], 1);

    let mut store = api.get(&paths::stores(NS), &name).expect("store");
    store["spec"]["tier"] = json!(2);
    store["metadata"]["generation"] = json!(2);
    api.put_raw(&paths::stores(NS), store);
    api.clear_log();
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("promote");
    assert!(
        api.get(&paths::deployments(NS), "pilot-pgbouncer")
            .is_some(),
        "tier-2 objects applied"
    );
    let status = status_of(&api, &name);
    assert_eq!(status["tier"], 1, "still running tier 1");
    assert_eq!(condition(&status, "Promoting")["status"], "True");
    assert_eq!(status["phase"], "Provisioning");

    api.mark_workloads_ready();
    reconcile(stored(&api, &name), ctx).await.expect("promoted");
    let status = status_of(&api, &name);
    assert_eq!(status["tier"], 2);
    assert_eq!(
        condition(&status, "Promoting")["reason"],
        "PromotionComplete"
    );
    assert_eq!(status["phase"], "Ready");
}

#[tokio::test]
async fn spec_change_patches_only_what_changed() {
    let (api, ctx, name) = seeded(example(2)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    let mut store = api.get(&paths::stores(NS), &name).expect("store");
    store["spec"]["dataPlane"]["replicas"] = json!(5);
    store["metadata"]["generation"] = json!(2);
    api.put_raw(&paths::stores(NS), store);
    api.clear_log();
    reconcile(stored(&api, &name), ctx).await.expect("second");
    let writes = api.writes();
    assert_eq!(
        lines(&applies(&writes).into_iter().cloned().collect::<Vec<_>>()),
        [
            "PATCH /apis/apps/v1/namespaces/umstore/deployments/state-rollout-data-plane"
                .to_string(),
            format!("PATCH {}/{name}/status", paths::stores(NS)),
        ]
    );
    assert_eq!(status_of(&api, &name)["observedGeneration"], 2);
}

#[tokio::test]
async fn removed_replica_pool_is_deleted_by_owner_uid_only() {
    let (api, ctx, name) = seeded(example(2)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    // A look-alike with our labels but another owner must survive.
    let mut foreign = api
        .get(&paths::services(NS), "state-rollout-replica-analytics")
        .expect("svc");
    foreign["metadata"]["name"] = json!("state-rollout-lookalike");
    foreign["metadata"]["ownerReferences"][0]["uid"] = json!("someone-else");
    api.insert(&paths::services(NS), foreign);

    let mut store = api.get(&paths::stores(NS), &name).expect("store");
    store["spec"]["replicaPools"] = json!([{"purpose": "ai", "replicas": 2}]);
    store["metadata"]["generation"] = json!(2);
    api.put_raw(&paths::stores(NS), store);
    api.clear_log();
    reconcile(stored(&api, &name), ctx).await.expect("second");

    let deletes: Vec<Recorded> = api
        .writes()
        .into_iter()
        .filter(|w| w.method == "DELETE")
        .collect();
    let deleted: Vec<String> = deletes
        .iter()
        .map(|d| {
            d.path
                .rsplit("/namespaces/umstore/")
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    // Workloads before the Services they use; the one-replica pool had no PDB.
    assert_eq!(
        deleted,
        [
            "statefulsets/state-rollout-replica-analytics",
            "services/state-rollout-replica-analytics",
            "services/state-rollout-replica-analytics-hl",
        ]
    );
    for d in &deletes {
        assert!(
            d.body
                .as_ref()
                .is_some_and(|b| b["preconditions"]["uid"].is_string()),
            "uid precondition on {}",
            d.path
        );
    }
    assert!(api
        .get(&paths::services(NS), "state-rollout-lookalike")
        .is_some());
    assert!(api
        .get(&paths::statefulsets(NS), "state-rollout-replica-analytics")
        .is_none());
    // Analytics and dashboard now connect to the read-write endpoint.
    let applied: Vec<String> = applies(&api.writes())
        .iter()
        .map(|w| w.path.clone())
        .collect();
    assert!(
        applied
            .iter()
            .any(|p| p.ends_with("/secrets/state-rollout-conn-analytics")),
        "{applied:?}"
    );
}

#[tokio::test]
async fn removed_worker_group_is_kept_until_its_regions_are_moved() {
    let (api, ctx, name) = seeded(example(3)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    let mut store = api.get(&paths::stores(NS), &name).expect("store");
    // The distribute step recorded that `central` holds CG and MP.
    store["status"]["placement"] = json!({"central": ["CG", "MP"]});
    // Remove `central`, moving its regions to `north` in the spec.
    store["spec"]["workerGroups"] = json!([
        {"name": "north", "replicas": 3, "regions": ["CH", "DL", "HP", "HR", "JK", "LA", "PB", "UK", "UP", "CG", "MP"]},
        {"name": "west", "replicas": 3, "regions": ["DD", "GA", "GJ", "MH", "RJ"]},
        {"name": "south", "replicas": 3, "regions": ["AN", "AP", "KA", "KL", "LD", "PY", "TN", "TS"]},
        {"name": "east", "replicas": 3, "regions": ["AR", "AS", "BR", "JH", "ML", "MN", "MZ", "NL", "OD", "SK", "TR", "WB"]},
    ]);
    store["metadata"]["generation"] = json!(2);
    api.put_raw(&paths::stores(NS), store.clone());
    api.clear_log();
    let action = reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("second");
    assert!(
        api.writes().iter().all(|w| w.method != "DELETE"),
        "{:#?}",
        lines(&api.writes())
    );
    assert!(api
        .get(&paths::statefulsets(NS), "national-worker-central")
        .is_some());
    let status = status_of(&api, &name);
    let provisioned = condition(&status, "Provisioned");
    assert_eq!(provisioned["status"], "False");
    assert_eq!(provisioned["reason"], "WorkerGroupDraining");
    assert!(provisioned["message"]
        .as_str()
        .unwrap_or_default()
        .contains("'central' still holds CG, MP"));
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));

    // Once drained, the group goes.
    let mut store = api.get(&paths::stores(NS), &name).expect("store");
    store["status"]["placement"] = json!({"central": []});
    api.put_raw(&paths::stores(NS), store);
    reconcile(stored(&api, &name), ctx).await.expect("third");
    assert!(api
        .get(&paths::statefulsets(NS), "national-worker-central")
        .is_none());
}

#[tokio::test]
async fn invalid_spec_gives_a_condition_and_one_event_not_an_error_loop() {
    let mut bad = example(3);
    // CEL would refuse this at admission; the operator must still say what is wrong.
    bad["spec"]["workerGroups"][1]["regions"] = json!(["DD", "GA", "GJ", "MH", "RJ", "UP"]);
    let (api, ctx, name) = seeded(bad).await;
    let action = reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("no error");
    assert_eq!(action, Action::await_change());
    let writes = api.writes();
    assert_eq!(
        lines(&writes),
        [
            format!("PATCH {}/{name}/status", paths::stores(NS)),
            format!("POST {}", paths::events(NS))
        ]
    );
    assert_eq!(
        events(&writes),
        ["InvalidSpec"],
        "one Event although Provisioned and Ready both turn False"
    );
    let status = status_of(&api, &name);
    assert_eq!(status["phase"], "Invalid");
    let ready = condition(&status, "Ready");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains("region UP is in groups 'north' and 'west'"),
        "{ready}"
    );

    api.clear_log();
    reconcile(stored(&api, &name), ctx).await.expect("again");
    assert!(
        api.writes().is_empty(),
        "no event spam: {:#?}",
        lines(&api.writes())
    );
}

#[tokio::test]
async fn demotion_is_refused_and_the_running_tier_kept() {
    let (api, ctx, name) = seeded(example(2)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    let mut store = api.get(&paths::stores(NS), &name).expect("store");
    store["spec"]["tier"] = json!(1);
    store["metadata"]["generation"] = json!(2);
    api.put_raw(&paths::stores(NS), store);
    api.clear_log();
    reconcile(stored(&api, &name), ctx).await.expect("second");
    let status = status_of(&api, &name);
    assert_eq!(status["tier"], 2);
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "DemotionRefused");
    assert!(
        api.get(&paths::deployments(NS), "state-rollout-pgbouncer")
            .is_some(),
        "tier 2 objects stay"
    );
    assert!(api.writes().iter().all(|w| w.method != "DELETE"));
    assert!(events(&api.writes()).contains(&"DemotionRefused".to_string()));
}

#[tokio::test]
async fn role_passwords_are_never_regenerated() {
    let (api, ctx, name) = seeded_without_credentials(example(2)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    let before = api
        .get(&paths::secrets(NS), "state-rollout-role-writer")
        .expect("secret");
    let mut store = api.get(&paths::stores(NS), &name).expect("store");
    store["spec"]["pgbouncer"]["replicas"] = json!(3);
    store["metadata"]["generation"] = json!(2);
    api.put_raw(&paths::stores(NS), store);
    api.clear_log();
    reconcile(stored(&api, &name), ctx).await.expect("second");
    assert!(api
        .writes()
        .iter()
        .all(|w| !(w.method == "POST" && w.path == paths::secrets(NS))));
    assert_eq!(
        api.get(&paths::secrets(NS), "state-rollout-role-writer")
            .expect("secret")["data"],
        before["data"]
    );
}

/// The API tokens Secret's `data`, decoded: purpose slug → token.
fn tokens_in(api: &FakeApi, name: &str) -> BTreeMap<String, String> {
    let secret = api.get(&paths::secrets(NS), name).expect("tokens Secret");
    decoded(&secret)
}

fn decoded(secret: &Value) -> BTreeMap<String, String> {
    use base64::Engine;
    secret["data"]
        .as_object()
        .expect("data")
        .iter()
        .map(|(k, v)| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().expect("base64 string"))
                .expect("base64");
            (k.clone(), String::from_utf8(bytes).expect("utf-8"))
        })
        .collect()
}

/// Every digest is `sha256:` of its purpose's token, and no token is in there.
#[track_caller]
fn assert_digests_match(tokens: &BTreeMap<String, String>, digests: &BTreeMap<String, String>) {
    use sha2::Digest;
    assert_eq!(
        tokens.keys().collect::<Vec<_>>(),
        digests.keys().collect::<Vec<_>>()
    );
    for (slug, token) in tokens {
        assert_eq!(
            digests[slug],
            format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(token.as_bytes()))
            ),
            "{slug}"
        );
        assert!(digests.values().all(|d| !d.contains(token.as_str())));
    }
}

#[tokio::test]
async fn api_tokens_are_created_once_with_their_digests_and_never_changed() {
    let (api, ctx, name) = seeded_without_credentials(example(2)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    let writes = api.writes();
    let tokens_name = format!("{name}-api-tokens");
    let digests_name = format!("{name}-api-token-digests");
    let created = writes
        .iter()
        .find(|w| {
            w.method == "POST"
                && w.path == paths::secrets(NS)
                && w.body
                    .as_ref()
                    .is_some_and(|b| b["metadata"]["name"] == tokens_name)
        })
        .expect("the tokens Secret is created");
    let body = created.body.as_ref().expect("body");
    assert_eq!(body["immutable"], true);
    assert_eq!(
        body["metadata"]["labels"]["umstore.io/credential"],
        "api-tokens"
    );
    assert_eq!(
        body["metadata"]["labels"]["app.kubernetes.io/instance"],
        name.as_str()
    );
    assert_eq!(
        body["metadata"]["ownerReferences"][0]["kind"],
        "UserMetadataStore"
    );
    let tokens = tokens_in(&api, &tokens_name);
    assert_eq!(
        tokens.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "admin",
            "ai",
            "analytics",
            "dashboard",
            "json-generator",
            "rules",
            "writer"
        ]
    );
    assert!(
        tokens.values().all(|t| t.len() == 64),
        "{:?}",
        tokens.keys()
    );
    // The digests are applied with the other objects, before the data plane.
    let applied = apply_lines(&writes);
    let digests_at = applied
        .iter()
        .position(|l| l.ends_with(&format!("/secrets/{digests_name}")))
        .expect("digests applied");
    let data_plane_at = applied
        .iter()
        .position(|l| l.ends_with(&format!("/deployments/{name}-data-plane")))
        .expect("data plane applied");
    assert!(digests_at < data_plane_at, "{applied:#?}");
    let digests = decoded(
        &api.get(&paths::secrets(NS), &digests_name)
            .expect("digests"),
    );
    assert_digests_match(&tokens, &digests);
    let events = events(&writes);
    assert!(
        events.contains(&"CredentialsCreated".to_string()),
        "{events:?}"
    );

    // A later reconcile (a spec change, workloads ready) neither creates nor changes them.
    let mut store = api.get(&paths::stores(NS), &name).expect("store");
    store["spec"]["pgbouncer"]["replicas"] = json!(3);
    store["metadata"]["generation"] = json!(2);
    api.put_raw(&paths::stores(NS), store);
    api.mark_workloads_ready();
    api.clear_log();
    reconcile(stored(&api, &name), ctx).await.expect("second");
    let writes = api.writes();
    let touches_them = |w: &Recorded| {
        w.path.ends_with(&tokens_name)
            || w.path.ends_with(&digests_name)
            || (w.method == "POST" && w.path == paths::secrets(NS))
    };
    assert!(!writes.iter().any(touches_them), "{:#?}", lines(&writes));
    assert_eq!(tokens_in(&api, &tokens_name), tokens);
}

#[tokio::test]
async fn a_deleted_tokens_secret_is_recreated_and_the_digests_and_pods_follow() {
    let (api, ctx, name) = seeded(example(1)).await;
    steady(&api, &ctx, &name).await;
    let tokens_name = format!("{name}-api-tokens");
    let digests_name = format!("{name}-api-token-digests");
    let before = tokens_in(&api, &tokens_name);
    let hash = |api: &FakeApi| {
        api.get(&paths::deployments(NS), &format!("{name}-data-plane"))
            .expect("data plane")["spec"]["template"]["metadata"]["annotations"]
            ["umstore.io/config-hash"]
            .clone()
    };
    let hash_before = hash(&api);

    api.remove(&paths::secrets(NS), &tokens_name)
        .expect("deleted by hand");
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("recreates");
    let writes = api.writes();
    let after = tokens_in(&api, &tokens_name);
    assert_ne!(after, before, "new tokens");
    for (slug, token) in &after {
        assert_ne!(Some(token), before.get(slug), "{slug}: a new token");
    }
    assert_digests_match(
        &after,
        &decoded(
            &api.get(&paths::secrets(NS), &digests_name)
                .expect("digests"),
        ),
    );
    assert_ne!(
        hash(&api),
        hash_before,
        "the data plane's pods roll to the new digests"
    );
    let applied = apply_lines(&writes);
    for object in [
        format!("/secrets/{digests_name}"),
        format!("/deployments/{name}-data-plane"),
    ] {
        assert!(applied.iter().any(|l| l.ends_with(&object)), "{applied:#?}");
    }
    assert!(events(&writes).contains(&"CredentialsCreated".to_string()));
    // Role passwords are untouched.
    assert!(
        writes.iter().all(|w| !w.path.contains("-role-")),
        "{:#?}",
        lines(&writes)
    );

    // Then nothing more to do.
    api.clear_log();
    reconcile(stored(&api, &name), ctx).await.expect("steady");
    assert!(
        applies(&api.writes())
            .iter()
            .all(|w| w.path.ends_with("/status")),
        "{:#?}",
        lines(&api.writes())
    );
}

#[tokio::test]
async fn deletion_runs_the_finalizer_and_retains_secrets() {
    let (api, ctx, name) = seeded(example(1)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    // kubectl delete: the finalizer holds the object, deletionTimestamp set.
    let mut store = api.get(&paths::stores(NS), &name).expect("store");
    store["metadata"]["deletionTimestamp"] = json!("2026-01-01T01:00:00Z");
    api.put_raw(&paths::stores(NS), store);
    api.clear_log();
    reconcile(stored(&api, &name), ctx).await.expect("cleanup");
    let writes = api.writes();
    let orphaned: Vec<&Recorded> = writes
        .iter()
        .filter(|w| w.method == "PATCH" && w.path.contains("/secrets/"))
        .collect();
    assert_eq!(
        orphaned.len(),
        18,
        "9 role + 7 connection Secrets, the API tokens and their digests: {:#?}",
        lines(&writes)
    );
    for w in &orphaned {
        assert_eq!(
            w.body.as_ref().expect("body")["metadata"]["ownerReferences"],
            Value::Null
        );
    }
    assert_eq!(events(&writes), ["Deleting"]);
    let last = writes.last().expect("finalizer removal");
    assert_eq!(last.line(), format!("PATCH {}/{name}", paths::stores(NS)));
    assert_eq!(last.content_type, "application/json-patch+json");
    // Every write of the cleanup, the finalizer's removal included, under one manager.
    for w in &writes {
        if w.path.starts_with(&paths::events(NS)) {
            continue;
        }
        assert!(
            w.query.contains("fieldManager=umstore-operator"),
            "{} {}",
            w.line(),
            w.query
        );
    }
    assert!(
        api.get(&paths::stores(NS), &name).is_none(),
        "finalizer removed, object gone"
    );
    let secret = api
        .get(&paths::secrets(NS), "pilot-role-admin")
        .expect("retained");
    assert!(secret["metadata"]["ownerReferences"].is_null());
}

#[tokio::test]
async fn not_being_leader_means_no_requests_at_all() {
    let (client, api) = FakeApi::start();
    api.insert(&paths::stores(NS), example(1));
    let ctx = context(client, false);
    let action = reconcile(stored(&api, "pilot"), ctx).await.expect("ok");
    assert_eq!(action, Action::requeue(NOT_LEADER_RECHECK));
    assert!(api.log().is_empty(), "{:#?}", api.log());
}

#[tokio::test]
async fn malformed_object_is_reported_on_itself() {
    let (client, api) = FakeApi::start();
    let mut bad = example(1);
    bad["spec"]["tier"] = json!("three");
    api.insert(&paths::stores(NS), bad);
    let guard: Arc<Guarded> = stored(&api, "pilot");
    assert!(guard.0.is_err(), "tier is not a number");
    let ctx = context(client, true);
    let action = reconcile(guard, ctx).await.expect("reported, not an error");
    assert_eq!(action, Action::await_change());
    let writes = api.writes();
    assert_eq!(events(&writes), ["Malformed"]);
    let status = status_of(&api, "pilot");
    assert_eq!(status["phase"], "Invalid");
    assert_eq!(condition(&status, "Ready")["reason"], "Malformed");
    let _: Option<DeserializeGuard<UserMetadataStore>> = None;
}

#[tokio::test]
async fn a_refused_immutable_change_is_a_condition_not_an_error_loop() {
    let (api, ctx, name) = seeded(example(1)).await;
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("first");
    let mut store = api.get(&paths::stores(NS), &name).expect("store");
    store["spec"]["postgres"]["coordinator"]["storage"]["size"] = json!("50Gi");
    store["spec"]["dataPlane"]["replicas"] = json!(2);
    store["metadata"]["generation"] = json!(2);
    api.put_raw(&paths::stores(NS), store);
    // The API server forbids changing volumeClaimTemplates.
    api.fail_next("PATCH", "/statefulsets/pilot-coordinator", 422);
    api.clear_log();
    let action = reconcile(stored(&api, &name), ctx)
        .await
        .expect("reported, not an error");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    let applied: Vec<String> = applies(&api.writes())
        .iter()
        .map(|w| w.path.clone())
        .collect();
    assert!(
        applied
            .iter()
            .any(|p| p.ends_with("/deployments/pilot-data-plane")),
        "others still applied: {applied:?}"
    );
    let provisioned = condition(&status_of(&api, &name), "Provisioned").clone();
    assert_eq!(provisioned["reason"], "ApplyRejected");
    assert!(provisioned["message"]
        .as_str()
        .unwrap_or_default()
        .contains("StatefulSet/pilot-coordinator"));
}

#[tokio::test]
async fn api_failure_is_retried_with_growing_backoff() {
    let (api, ctx, name) = seeded(example(1)).await;
    api.fail_next("PATCH", "/statefulsets/", 500);
    let store = stored(&api, &name);
    let error = reconcile(store.clone(), ctx.clone())
        .await
        .expect_err("injected failure");
    assert_eq!(error.metric_label(), "kube");
    assert!(
        error
            .to_string()
            .contains("applying StatefulSet/pilot-coordinator"),
        "{error}"
    );
    assert_eq!(
        error_policy(store.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(store.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains("umstore_operator_reconcile_failures_total{error=\"kube\"} 2"),
        "{metrics}"
    );
    // The next reconcile succeeds and resets the backoff.
    reconcile(store.clone(), ctx.clone())
        .await
        .expect("recovers");
    assert_eq!(
        error_policy(store, &Error::MissingMetadata, ctx),
        Action::requeue(Duration::from_secs(5))
    );
}

/// One hand edit per owned kind, each of a field the operator sets.
fn hand_edits() -> Vec<(String, &'static str, &'static str, Value)> {
    vec![
        (
            paths::statefulsets(NS),
            "state-rollout-replica-ai",
            "/spec/replicas",
            json!(7),
        ),
        (
            paths::deployments(NS),
            "state-rollout-data-plane",
            "/spec/replicas",
            json!(0),
        ),
        (
            paths::configmaps(NS),
            "state-rollout-pgbouncer",
            "/data/pgbouncer.ini",
            json!("[databases]\n* = host=evil.example\n"),
        ),
        (
            paths::services(NS),
            "state-rollout-pgbouncer",
            "/spec/selector/app.kubernetes.io~1component",
            json!("data-plane"),
        ),
        (
            paths::secrets(NS),
            "state-rollout-conn-writer",
            "/data/host",
            json!("ZXZpbC5leGFtcGxl"),
        ),
        (
            paths::pdbs(NS),
            "state-rollout-replica-ai",
            "/spec/maxUnavailable",
            json!(3),
        ),
        (
            paths::networkpolicies(NS),
            "state-rollout-postgres",
            "/spec/ingress",
            json!([{}]),
        ),
    ]
}

#[tokio::test]
async fn hand_edits_of_owned_objects_are_put_back_on_the_next_reconcile() {
    let (api, ctx, name) = seeded(example(2)).await;
    steady(&api, &ctx, &name).await;
    for (collection, object, pointer, value) in hand_edits() {
        let before = api.get(&collection, object).expect("owned object");
        let wanted = before.pointer(pointer).cloned();
        assert!(wanted.is_some(), "{object} sets {pointer}");
        hand_edit(&api, &collection, object, pointer, value);
        api.clear_log();
        // A fresh recorder, so each correction is its own Event, not a series.
        let ctx = context(ctx.client.clone(), true);
        reconcile(stored(&api, &name), ctx.clone())
            .await
            .expect("reconcile");
        let writes = api.writes();
        assert_eq!(
            apply_lines(&writes),
            [format!("PATCH {collection}/{object}")],
            "only the edited object is applied: {:#?}",
            lines(&api.log())
        );
        assert_eq!(
            api.get(&collection, object)
                .expect("object")
                .pointer(pointer)
                .cloned(),
            wanted,
            "{object} {pointer} put back"
        );
        assert_eq!(events(&writes), ["DriftCorrected"], "{object}");
        api.clear_log();
        reconcile(stored(&api, &name), ctx.clone())
            .await
            .expect("reconcile");
        assert!(
            api.writes().is_empty(),
            "after the correction nothing more: {:#?}",
            api.writes()
        );
    }
}

#[tokio::test]
async fn fields_only_others_set_are_left_alone() {
    let (api, ctx, name) = seeded(example(2)).await;
    steady(&api, &ctx, &name).await;
    // What the API server defaults and other tools add is not drift.
    hand_edit(
        &api,
        &paths::services(NS),
        "state-rollout-pgbouncer",
        "/spec",
        {
            let mut spec = api
                .get(&paths::services(NS), "state-rollout-pgbouncer")
                .expect("service")["spec"]
                .clone();
            spec["clusterIP"] = json!("10.0.0.12");
            spec["ports"][0]["protocol"] = json!("TCP");
            spec
        },
    );
    hand_edit(
        &api,
        &paths::configmaps(NS),
        "state-rollout-pgbouncer",
        "/metadata/annotations",
        {
            let mut annotations = api
                .get(&paths::configmaps(NS), "state-rollout-pgbouncer")
                .expect("configmap")["metadata"]["annotations"]
                .clone();
            annotations["kubectl.kubernetes.io/last-applied-configuration"] = json!("{}");
            annotations
        },
    );
    reconcile(stored(&api, &name), ctx)
        .await
        .expect("reconcile");
    assert!(
        api.writes().is_empty(),
        "defaults and foreign fields are not drift: {:#?}",
        lines(&api.writes())
    );
}

#[tokio::test]
async fn a_steady_state_reconcile_only_lists() {
    // Tier 2 migrates automatically; tier 3's Manual policy would see the shared
    // database's schema move as other scenarios migrate it.
    let (api, ctx, name) = seeded(example(2)).await;
    steady(&api, &ctx, &name).await;
    reconcile(stored(&api, &name), ctx)
        .await
        .expect("reconcile");
    let log = api.log();
    let status = status_of(&api, &name);
    assert!(api.writes().is_empty(), "{:#?}\n{status:#}", api.writes());
    // One LIST per owned kind and one of the database pods; one GET only, of the
    // TLS Secret whose CA the bootstrap step connects with (the example sets one).
    assert_eq!(log.len(), 12, "{:#?}", lines(&log));
    let gets: Vec<String> = log
        .iter()
        .filter(|r| r.method == "GET" && r.path.starts_with(&format!("{}/", paths::secrets(NS))))
        .map(Recorded::line)
        .collect();
    assert_eq!(
        gets,
        [format!("GET {}/state-rollout-tls", paths::secrets(NS))],
        "{:#?}",
        lines(&log)
    );
}

/// The `DELETE path` lines among the recorded writes.
fn delete_lines(api: &FakeApi) -> Vec<String> {
    api.writes()
        .iter()
        .filter(|w| w.method == "DELETE")
        .map(Recorded::line)
        .collect()
}

/// A database pod as its StatefulSet and Patroni leave it.
fn db_pod(name: &str, sts: &str, revision: &str, role: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": NS,
            "labels": {
                "app.kubernetes.io/instance": "state-rollout",
                "umstore.io/patroni-cluster": "state-rollout-coordinator",
                "umstore.io/role": role,
                "controller-revision-hash": revision,
            },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts,
                                  "uid": "sts", "controller": true}],
        },
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

/// A stand-in for the leader's Patroni REST API: answers one request with 200 and
/// hands back what it was asked.
async fn patroni_stub() -> (u16, tokio::sync::oneshot::Receiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 4096];
        let mut got = String::new();
        while !got.contains("candidate") {
            let n = socket.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let body = "Successfully switched over";
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(reply.as_bytes()).await.expect("write");
        let _ = tx.send(got);
    });
    (port, rx)
}

#[tokio::test]
async fn a_new_template_replaces_replicas_then_switches_over_then_replaces_the_old_leader() {
    let (api, ctx, name) = seeded(example(2)).await;
    steady(&api, &ctx, &name).await;
    let sts = "state-rollout-coordinator";
    let mut set = api.get(&paths::statefulsets(NS), sts).expect("coordinator");
    set["status"]["updateRevision"] = json!("rev-2");
    api.put_raw(&paths::statefulsets(NS), set);
    api.insert(
        &paths::pods(NS),
        db_pod("state-rollout-coordinator-0", sts, "rev-1", "primary", true),
    );
    api.insert(
        &paths::pods(NS),
        db_pod("state-rollout-coordinator-1", sts, "rev-1", "replica", true),
    );

    // 1. The outdated replica goes first.
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("reconcile");
    let deletes = delete_lines(&api);
    assert_eq!(
        deletes,
        [format!(
            "DELETE {}/state-rollout-coordinator-1",
            paths::pods(NS)
        )]
    );
    assert!(events(&api.writes()).contains(&"RollingUpdate".to_string()));

    // 2. It is back on the new template: the leader is handed over to it.
    api.insert(
        &paths::pods(NS),
        db_pod("state-rollout-coordinator-1", sts, "rev-2", "replica", true),
    );
    let (port, asked) = patroni_stub().await;
    let ctx = Arc::new(
        Context::new(
            ctx.client.clone(),
            ctx.metrics.clone(),
            umstore_operator::leader::Leadership::new(true),
            umstore_operator::builders::Env {
                operator_namespace: "umstore-system".into(),
            },
            Some("test".into()),
        )
        .with_connector(connector().with_address(
            &format!("state-rollout-coordinator-0.state-rollout-coordinator-hl.{NS}.svc"),
            8008,
            ("127.0.0.1".into(), port),
        ))
        .with_vault(support::scenario::vault()),
    );
    api.clear_log();
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("reconcile");
    let request = asked.await.expect("Patroni was asked");
    assert!(request.starts_with("POST /switchover"), "{request}");
    assert!(
        request.contains(r#""leader":"state-rollout-coordinator-0""#)
            && request.contains(r#""candidate":"state-rollout-coordinator-1""#),
        "{request}"
    );
    assert!(
        api.writes().iter().all(|w| w.method != "DELETE"),
        "no pod deleted meanwhile"
    );

    // 3. The old leader, now a replica, is replaced; then nothing is left to do.
    api.insert(
        &paths::pods(NS),
        db_pod("state-rollout-coordinator-0", sts, "rev-1", "replica", true),
    );
    api.insert(
        &paths::pods(NS),
        db_pod("state-rollout-coordinator-1", sts, "rev-2", "primary", true),
    );
    api.clear_log();
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("reconcile");
    let deletes = delete_lines(&api);
    assert_eq!(
        deletes,
        [format!(
            "DELETE {}/state-rollout-coordinator-0",
            paths::pods(NS)
        )]
    );
    api.insert(
        &paths::pods(NS),
        db_pod("state-rollout-coordinator-0", sts, "rev-2", "replica", true),
    );
    api.clear_log();
    reconcile(stored(&api, &name), ctx)
        .await
        .expect("reconcile");
    assert!(
        api.writes().iter().all(|w| w.method != "DELETE"),
        "rolled out"
    );
}

/// A backup Job's pod that ended with `exit_code` and `message` at `finished`.
fn backup_pod(name: &str, store: &str, exit_code: i32, finished: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {
            "app.kubernetes.io/name": "umstore",
            "app.kubernetes.io/instance": store,
            "app.kubernetes.io/component": "backup",
        }},
        "spec": {"containers": [{"name": "backup", "image": "x"}]},
        "status": {
            "phase": if exit_code == 0 { "Succeeded" } else { "Failed" },
            "containerStatuses": [{
                "name": "backup", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"terminated": {
                    "exitCode": exit_code, "finishedAt": finished, "message": message,
                }},
            }],
        },
    })
}

#[tokio::test]
async fn a_store_with_backups_gets_its_secrets_schedules_first_backup_and_status() {
    let mut store = example(1);
    store["spec"]["backup"] = json!({
        "repository": {"volume": {"size": "20Gi", "storageClassName": "nfs"}},
        "retention": {"full": 3},
        "schedule": {"full": "30 2 * * 0", "differential": "30 2 * * 1-6", "timeZone": "Asia/Kolkata"},
    });
    let (api, ctx, name) = seeded(store).await;
    steady(&api, &ctx, &name).await;

    // The passphrase, generated once, immutable; the TLS material.
    let secret = api
        .get(&paths::secrets(NS), &format!("{name}-backup-encryption"))
        .expect("the passphrase Secret");
    assert_eq!(secret["immutable"], true);
    assert_eq!(decoded(&secret)["passphrase"].len(), 64);
    let tls = decoded(
        &api.get(&paths::secrets(NS), &format!("{name}-backup-tls"))
            .expect("the backup TLS Secret"),
    );
    for key in ["ca.crt", "tls.crt", "tls.key", "client.crt", "client.key"] {
        assert!(tls[key].starts_with("-----BEGIN"), "{key}");
    }
    // The pods' and the Jobs' pgBackRest configuration.
    let conf = api
        .get(&paths::configmaps(NS), &format!("{name}-pgbackrest"))
        .expect("the pgBackRest ConfigMap");
    let server = conf["data"]["pgbackrest.conf"]
        .as_str()
        .expect("server conf");
    assert!(server.contains("repo1-type=posix"), "{server}");
    assert!(server.contains("repo1-cipher-type=aes-256-cbc"), "{server}");
    assert!(
        server.contains("tls-server-auth=umstore-backup=*"),
        "{server}"
    );
    assert!(
        !server.contains("cipher-pass"),
        "no secret in the ConfigMap"
    );
    let job = conf["data"]["job.conf"].as_str().expect("job conf");
    assert!(
        job.contains(&format!("pg1-host={name}-coordinator.{NS}.svc")),
        "{job}"
    );
    assert!(job.contains("repo1-retention-full=3"), "{job}");
    let postgres_conf = api
        .get(&paths::configmaps(NS), &format!("{name}-postgres"))
        .expect("postgres ConfigMap");
    assert!(postgres_conf["data"]["postgresql.conf"]
        .as_str()
        .is_some_and(|c| c.contains("archive_mode = on")));
    // The coordinator runs the pgBackRest server beside PostgreSQL, which archives
    // with the stanza and passphrase in its environment.
    let sts = api
        .get(&paths::statefulsets(NS), &format!("{name}-coordinator"))
        .expect("coordinator");
    let containers = sts["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert!(containers.iter().any(|c| c["name"] == "pgbackrest"));
    let env = containers[0]["env"].as_array().expect("env");
    assert!(env
        .iter()
        .any(|e| e["name"] == "PGBACKREST_STANZA" && e["value"] == "coordinator"));
    assert!(env
        .iter()
        .any(|e| e["name"] == "PGBACKREST_REPO1_CIPHER_PASS"
            && e["valueFrom"]["secretKeyRef"]["name"] == format!("{name}-backup-encryption")));
    // The schedules.
    let cron = |kind: &str| {
        api.get(
            &format!("/apis/batch/v1/namespaces/{NS}/cronjobs"),
            &format!("{name}-backup-{kind}"),
        )
        .unwrap_or_else(|| panic!("the {kind} CronJob"))
    };
    assert_eq!(cron("full")["spec"]["schedule"], "30 2 * * 0");
    assert_eq!(cron("full")["spec"]["timeZone"], "Asia/Kolkata");
    assert_eq!(cron("full")["spec"]["concurrencyPolicy"], "Forbid");
    assert_eq!(cron("diff")["spec"]["schedule"], "30 2 * * 1-6");
    // The repository volume, shared (ReadWriteMany) and kept with the store's
    // default reclaimPolicy Retain (no owner).
    let claim = api
        .get(
            &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims"),
            &format!("{name}-backup-repo"),
        )
        .expect("the repository claim");
    assert_eq!(claim["spec"]["accessModes"], json!(["ReadWriteMany"]));
    assert_eq!(claim["spec"]["storageClassName"], "nfs");
    assert!(claim["metadata"]["ownerReferences"].is_null(), "{claim:#}");
    // The first full backup runs at once; until it ends, BackupReady says so.
    assert!(api
        .get(
            &format!("/apis/batch/v1/namespaces/{NS}/jobs"),
            &format!("{name}-backup-first")
        )
        .is_some());
    let status = status_of(&api, &name);
    assert_eq!(condition(&status, "BackupReady")["status"], "False");
    assert_eq!(condition(&status, "BackupReady")["reason"], "BackupPending");

    // The Job's pod reports the backup: BackupReady, status.backup.
    api.insert(
        &paths::pods(NS),
        backup_pod(
            "first-1",
            &name,
            0,
            "2026-12-01T01:02:00Z",
            r#"{"backups": 1, "oldestStop": 1796086920, "last": {"label": "20261201-010000F",
               "type": "full", "start": 1796086800, "stop": 1796086920, "size": 52428800,
               "repoSize": 4194304}}"#,
        ),
    );
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("reconcile");
    let status = status_of(&api, &name);
    assert_eq!(
        condition(&status, "BackupReady")["status"],
        "True",
        "{status:#}"
    );
    assert_eq!(status["backup"]["lastBackup"]["label"], "20261201-010000F");
    assert_eq!(
        status["backup"]["lastBackup"]["completedAt"],
        "2026-12-01T01:02:00Z"
    );
    assert_eq!(status["backup"]["lastBackup"]["sizeBytes"], 52_428_800);
    assert_eq!(
        status["backup"]["earliestRecoverableTime"],
        "2026-12-01T01:02:00Z"
    );
    assert_eq!(condition(&status, "Degraded")["status"], "False");

    // A later backup fails: not ready, Degraded, the last good backup still shown.
    api.insert(
        &paths::pods(NS),
        backup_pod(
            "full-2",
            &name,
            56,
            "2026-12-08T02:31:00Z",
            "ERROR: [056]: unable to find primary cluster - cannot proceed",
        ),
    );
    reconcile(stored(&api, &name), ctx.clone())
        .await
        .expect("reconcile");
    let status = status_of(&api, &name);
    let ready = condition(&status, "BackupReady");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "BackupFailed");
    assert!(ready["message"]
        .as_str()
        .is_some_and(|m| m.contains("unable to find primary cluster")));
    assert_eq!(condition(&status, "Degraded")["status"], "True");
    assert_eq!(status["backup"]["lastBackup"]["label"], "20261201-010000F");
}
