//! The Argo CD health check, `deploy/argocd/health.lua` (docs/argocd.md), run in
//! Lua 5.1 with the libraries Argo CD opens for an `argocd-cm` check (base, table,
//! package and a restricted os the script does not use; no string library), on
//! stores built from this crate's types and passed in as Argo CD passes them: the
//! object's JSON as a Lua table, `null` as `nil`.

use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use mlua::serde::SerializeOptions;
use mlua::{Lua, LuaOptions, LuaSerdeExt, StdLib, Table};
use umstore_crds::{
    condition, MigrationsStatus, Phase, UserMetadataStore, UserMetadataStoreStatus,
};

const SCRIPT: &str = "deploy/argocd/health.lua";
const DOC: &str = "docs/argocd.md";
/// The `argocd-cm` key the docs show the script under, with the indentation of its
/// lines.
const DOC_KEY: &str = "  resource.customizations.health.umstore.io_UserMetadataStore: |";
const DOC_INDENT: &str = "    ";

fn repo_file(path: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What the script returned.
#[derive(Debug)]
struct Health {
    status: String,
    message: String,
}

/// Runs the script on `store` as Argo CD does.
fn health(store: &UserMetadataStore) -> Health {
    let lua = Lua::new_with(StdLib::TABLE | StdLib::PACKAGE, LuaOptions::default())
        .expect("a Lua 5.1 state");
    let json = serde_json::to_value(store).expect("the store serializes");
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
        .set_array_metatable(false);
    let obj = lua.to_value_with(&json, options).expect("JSON to Lua");
    lua.globals().set("obj", obj).expect("set obj");
    let hs: Table = lua
        .load(repo_file(SCRIPT))
        .set_name("health.lua")
        .eval()
        .unwrap_or_else(|e| panic!("health.lua failed: {e}"));
    let health = Health {
        status: hs.get("status").expect("hs.status is a string"),
        message: hs.get("message").expect("hs.message is a string"),
    };
    assert!(
        [
            "Healthy",
            "Progressing",
            "Degraded",
            "Suspended",
            "Missing",
            "Unknown"
        ]
        .contains(&health.status.as_str()),
        "{health:?} is not an Argo CD health"
    );
    assert!(!health.message.is_empty(), "{health:?} has no message");
    health
}

/// The tier-2 example at `generation`, with `status`.
fn store(generation: i64, status: Option<UserMetadataStoreStatus>) -> UserMetadataStore {
    let mut store: UserMetadataStore =
        serde_yaml_ng::from_str(&repo_file("examples/tier2.yaml")).expect("example parses");
    store.metadata.generation = Some(generation);
    store.status = status;
    store
}

fn cond(type_: &str, ok: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(4),
        last_transition_time: Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).expect("a time"),
        ),
    }
}

/// A status the operator wrote for generation 4.
fn status(phase: Phase, conditions: Vec<Condition>) -> UserMetadataStoreStatus {
    UserMetadataStoreStatus {
        observed_generation: Some(4),
        tier: Some(2),
        phase: Some(phase),
        conditions,
        ..Default::default()
    }
}

fn as_expected() -> Condition {
    cond(
        condition::DEGRADED,
        false,
        "AsExpected",
        "nothing needs attention",
    )
}

/// Every step done and every workload ready.
fn ready_conditions() -> Vec<Condition> {
    vec![
        cond(
            condition::PROVISIONED,
            true,
            "Applied",
            "applied 23 objects",
        ),
        cond(
            condition::BOOTSTRAPPED,
            true,
            "Bootstrapped",
            "database, extensions and roles in place",
        ),
        cond(
            condition::SCHEMA_READY,
            true,
            "Migrated",
            "schema at version 9",
        ),
        cond(
            condition::READY,
            true,
            "AllComponentsReady",
            "7 workloads ready",
        ),
        as_expected(),
    ]
}

const PENDING: &str = "migrations 10, 11 are pending (schema at version 9) and \
    spec.migrations.policy is Manual: approve them with the annotation \
    umstore.io/approve-migrations: \"11\" (or set the policy to Auto)";

/// `Manual` policy, migrations 10 and 11 pending: the pipeline stopped at migrate.
fn pending_migrations() -> UserMetadataStoreStatus {
    status(
        Phase::Provisioning,
        vec![
            cond(
                condition::PROVISIONED,
                true,
                "Applied",
                "applied 23 objects",
            ),
            cond(
                condition::BOOTSTRAPPED,
                true,
                "Bootstrapped",
                "database, extensions and roles in place",
            ),
            cond(condition::SCHEMA_READY, false, "MigrationsPending", PENDING),
            cond(condition::READY, false, "MigrationsPending", PENDING),
            as_expected(),
        ],
    )
}

fn assert_health(h: &Health, status: &str, message: &str) {
    assert_eq!(h.status, status, "{h:?}");
    assert_eq!(h.message, message, "{h:?}");
}

#[test]
fn a_store_without_status_is_progressing() {
    let h = health(&store(1, None));
    assert_health(
        &h,
        "Progressing",
        "waiting for the operator to report status",
    );
}

#[test]
fn a_spec_change_not_observed_yet_is_progressing_whatever_the_old_status_says() {
    // The old spec was invalid; the new one (generation 5) may fix it. A Degraded
    // here would fail the Argo CD sync that applied the fix.
    let invalid = status(
        Phase::Invalid,
        vec![
            cond(
                condition::PROVISIONED,
                false,
                "InvalidSpec",
                "spec.tier: 5 is not 1-4",
            ),
            cond(
                condition::READY,
                false,
                "InvalidSpec",
                "spec.tier: 5 is not 1-4",
            ),
        ],
    );
    let h = health(&store(5, Some(invalid)));
    assert_health(
        &h,
        "Progressing",
        "waiting for the operator to observe generation 5",
    );
    let h = health(&store(5, Some(pending_migrations())));
    assert_eq!(h.status, "Progressing", "{h:?}");
}

#[test]
fn a_store_being_deleted_is_progressing() {
    let mut s = store(4, Some(status(Phase::Ready, ready_conditions())));
    s.metadata.deletion_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(1_700_000_100).expect("a time"),
    ));
    assert_health(&health(&s), "Progressing", "being deleted");
    let deleting = status(Phase::Deleting, ready_conditions());
    assert_health(
        &health(&store(4, Some(deleting))),
        "Progressing",
        "being deleted",
    );
}

#[test]
fn provisioning_is_progressing_with_the_ready_message() {
    let waiting = "the coordinator has no ready replica yet";
    let s = status(
        Phase::Provisioning,
        vec![
            cond(
                condition::PROVISIONED,
                true,
                "Applied",
                "applied 23 objects",
            ),
            cond(
                condition::BOOTSTRAPPED,
                false,
                "CoordinatorNotReady",
                waiting,
            ),
            cond(condition::READY, false, "CoordinatorNotReady", waiting),
            as_expected(),
        ],
    );
    assert_health(&health(&store(4, Some(s))), "Progressing", waiting);

    let s = status(
        Phase::Provisioning,
        vec![
            cond(
                condition::PROVISIONED,
                true,
                "Applied",
                "applied 23 objects",
            ),
            cond(
                condition::READY,
                false,
                "ComponentsNotReady",
                "waiting for state-rollout-api 1/3",
            ),
            as_expected(),
        ],
    );
    assert_health(
        &health(&store(4, Some(s))),
        "Progressing",
        "waiting for state-rollout-api 1/3",
    );
}

#[test]
fn a_promotion_is_progressing_with_its_message() {
    let promoting = "promoting from tier 2 to tier 3: waiting for state-rollout-worker-north 0/2 \
                     (clients stay on the primary until the pooler and the replica pools are ready)";
    let mut conditions = ready_conditions();
    conditions.retain(|c| c.type_ != condition::READY);
    conditions.push(cond(
        condition::READY,
        false,
        "ComponentsNotReady",
        "waiting for state-rollout-worker-north 0/2",
    ));
    conditions.push(cond(condition::PROMOTING, true, "TierRaised", promoting));
    let h = health(&store(4, Some(status(Phase::Provisioning, conditions))));
    assert_health(&h, "Progressing", promoting);
}

#[test]
fn pending_manual_migrations_are_suspended_with_the_versions_and_how_to_approve() {
    let mut s = pending_migrations();
    s.migrations = Some(MigrationsStatus {
        pending: vec![10, 11],
        approved: None,
        approved_generation: None,
    });
    let h = health(&store(4, Some(s)));
    assert_health(
        &h,
        "Suspended",
        "migrations 10, 11 are waiting for approval (spec.migrations.policy is Manual): \
         approve them with the annotation umstore.io/approve-migrations: \"11\" on the store, \
         in the manifest Argo CD syncs or with kubectl -n umstore annotate --overwrite ums \
         state-rollout umstore.io/approve-migrations=11 (a lower version applies up to it), \
         or set the policy to Auto",
    );
}

#[test]
fn pending_migrations_without_the_pending_list_are_suspended_with_the_condition_message() {
    // An operator that does not write status.migrations: its message is all there is.
    let h = health(&store(4, Some(pending_migrations())));
    assert_health(&h, "Suspended", &format!("waiting for approval: {PENDING}"));
}

#[test]
fn pending_migrations_are_suspended_above_a_promotion() {
    let mut s = pending_migrations();
    s.conditions.push(cond(
        condition::PROMOTING,
        true,
        "TierRaised",
        "promoting from tier 2 to tier 3: waiting for the steps after provisioning",
    ));
    assert_eq!(health(&store(4, Some(s))).status, "Suspended");
}

#[test]
fn a_pending_migration_behind_an_earlier_step_is_not_suspended() {
    // The coordinator restarted: the pipeline stops at bootstrap and SchemaReady is
    // still what the last reconcile that reached migrate wrote.
    let waiting = "the coordinator has no ready replica yet";
    let s = status(
        Phase::Provisioning,
        vec![
            cond(
                condition::PROVISIONED,
                true,
                "Applied",
                "applied 23 objects",
            ),
            cond(
                condition::BOOTSTRAPPED,
                false,
                "CoordinatorNotReady",
                waiting,
            ),
            cond(condition::SCHEMA_READY, false, "MigrationsPending", PENDING),
            cond(condition::READY, false, "CoordinatorNotReady", waiting),
            as_expected(),
        ],
    );
    assert_health(&health(&store(4, Some(s))), "Progressing", waiting);
}

#[test]
fn an_approval_naming_an_unknown_version_is_degraded() {
    let unknown = "umstore.io/approve-migrations is \"v11\", which is not the version of a \
                   migration this operator has (it has 1 to 11); nothing was applied. \
                   Pending: 10, 11. Set it to one of those versions";
    let mut s = pending_migrations();
    for c in &mut s.conditions {
        if c.type_ == condition::SCHEMA_READY || c.type_ == condition::READY {
            c.reason = "MigrationApprovalUnknown".into();
            c.message = unknown.into();
        }
    }
    assert_health(&health(&store(4, Some(s))), "Degraded", unknown);
}

#[test]
fn a_failed_migration_is_degraded() {
    let failed = "migration 10 (user_notes) failed and was rolled back: column \"x\" exists";
    let mut s = pending_migrations();
    for c in &mut s.conditions {
        if c.type_ == condition::SCHEMA_READY || c.type_ == condition::READY {
            c.reason = "MigrationFailed".into();
            c.message = failed.into();
        }
    }
    assert_health(&health(&store(4, Some(s))), "Degraded", failed);
}

#[test]
fn an_invalid_spec_is_degraded_with_what_to_change() {
    let invalid = "spec.workerGroups: tier 3 needs at least one worker group";
    let s = status(
        Phase::Invalid,
        vec![
            cond(condition::PROVISIONED, false, "InvalidSpec", invalid),
            cond(condition::READY, false, "InvalidSpec", invalid),
        ],
    );
    assert_health(&health(&store(4, Some(s))), "Degraded", invalid);
}

#[test]
fn a_malformed_object_is_degraded() {
    let malformed = "spec.tier: invalid type: string \"two\", expected i32";
    let s = status(
        Phase::Invalid,
        vec![cond(condition::READY, false, "Malformed", malformed)],
    );
    assert_health(&health(&store(4, Some(s))), "Degraded", malformed);
}

#[test]
fn a_degraded_condition_is_degraded_even_while_serving() {
    let no_standby = "state-rollout-coordinator has no ready standby: a failover now would have \
                      nothing to promote (see status.groups and the pods of \
                      state-rollout-coordinator)";
    let mut conditions = ready_conditions();
    conditions.retain(|c| c.type_ != condition::DEGRADED);
    conditions.push(cond(
        condition::DEGRADED,
        true,
        "NoHealthyStandby",
        no_standby,
    ));
    let h = health(&store(4, Some(status(Phase::Degraded, conditions))));
    assert_health(
        &h,
        "Degraded",
        &format!("{no_standby} (still serving: Ready is True)"),
    );
}

#[test]
fn a_refused_demotion_is_degraded_above_a_promotion_and_pending_migrations() {
    let refused = "spec.tier 1 is below the running tier 2: tiers are never lowered";
    let mut s = pending_migrations();
    s.conditions.retain(|c| c.type_ != condition::DEGRADED);
    s.conditions
        .push(cond(condition::DEGRADED, true, "DemotionRefused", refused));
    s.conditions.push(cond(
        condition::PROMOTING,
        true,
        "TierRaised",
        "promoting from tier 2 to tier 3: waiting for the steps after provisioning",
    ));
    assert_health(&health(&store(4, Some(s))), "Degraded", refused);
}

#[test]
fn a_ready_store_is_healthy() {
    let h = health(&store(4, Some(status(Phase::Ready, ready_conditions()))));
    assert_health(&h, "Healthy", "7 workloads ready");
}

#[test]
fn the_docs_embed_the_script_verbatim() {
    let script = repo_file(SCRIPT);
    let doc = repo_file(DOC);
    let mut lines = doc.lines().skip_while(|l| *l != DOC_KEY);
    assert!(
        lines.next().is_some(),
        "{DOC} has no line `{DOC_KEY}` followed by the script"
    );
    let embedded: Vec<&str> = lines
        .take_while(|l| !l.starts_with("```"))
        .map(|l| l.strip_prefix(DOC_INDENT).unwrap_or(l))
        .collect();
    assert!(
        embedded.join("\n") == script.trim_end(),
        "the script under `{DOC_KEY}` in {DOC} differs from {SCRIPT}: paste {SCRIPT} there, \
         each line indented by 4 spaces"
    );
}
