//! The three changes, decided from the store as read: what to patch (only the one
//! annotation, or only `spec.tier`), what to say, or why not. Pure, so every
//! decision is unit-tested; `main` reads the store and sends the patch.

use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use umstore_crds::annotations::{approved_version, APPROVE_ANNOTATION, ROTATE_ANNOTATION};
use umstore_crds::refusals::{
    approval_unknown, demotion_refused, TIER_NEVER_DECREASES, TIER_RANGE,
};
use umstore_crds::{MigrationPolicy, UserMetadataStore};
use umstore_migrations::Runner;

/// What to do with a store.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Send `patch`; then print `summary` and `notes`.
    Patch(Change),
    /// Nothing to change: why.
    Unchanged(String),
}

/// One change: the merge patch and what to tell the user about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// A JSON merge patch of only the field that changes.
    pub patch: serde_json::Value,
    /// What changed, from what to what (`spec.tier 1 -> 2`).
    pub summary: String,
    /// What happens next.
    pub notes: Vec<String>,
    /// What the user should know first (the change may do nothing as things are).
    pub warnings: Vec<String>,
}

/// Why a change was refused: the operator's or the CRD's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

fn annotation<'a>(store: &'a UserMetadataStore, key: &str) -> Option<&'a String> {
    store.metadata.annotations.as_ref().and_then(|a| a.get(key))
}

fn was(current: Option<&String>) -> String {
    current.map_or("unset".to_string(), |v| format!("\"{v}\""))
}

fn annotation_patch(key: &str, value: &str) -> serde_json::Value {
    json!({"metadata": {"annotations": {key: value}}})
}

fn joined<T: ToString>(values: &[T]) -> String {
    values
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `approve-migrations <store> <value>`: approves the pending migrations up to a
/// version the operator embeds (as this plugin was built with the same migrations),
/// refusing any other value with the operator's words.
pub fn approve(store: &UserMetadataStore, value: &str, runner: &Runner) -> Result<Plan, Refusal> {
    let status = store.status.as_ref();
    let pending: Vec<u32> = status
        .and_then(|s| s.migrations.as_ref())
        .map(|m| {
            m.pending
                .iter()
                .filter_map(|v| u32::try_from(*v).ok())
                .collect()
        })
        .unwrap_or_default();
    let Some(version) = approved_version(value, runner.migrations()) else {
        return Err(Refusal(approval_unknown(
            value,
            runner.latest_version(),
            &pending,
        )));
    };
    let value = version.to_string();
    let current = annotation(store, APPROVE_ANNOTATION);
    if current == Some(&value) {
        return Ok(Plan::Unchanged(format!(
            "{APPROVE_ANNOTATION} is already \"{value}\"; nothing changed"
        )));
    }
    let mut warnings = Vec::new();
    let mut notes = Vec::new();
    if store.spec.migrations.policy == MigrationPolicy::Auto {
        warnings.push(
            "spec.migrations.policy is Auto: the operator applies every migration without \
             approval, and reads this annotation only under the Manual policy"
                .to_string(),
        );
    } else {
        let (now, later): (Vec<u32>, Vec<u32>) = pending.iter().partition(|p| **p <= version);
        if now.is_empty() {
            notes.push(format!(
                "no pending migration is at or below {version}, so the operator applies \
                 nothing (pending: {})",
                if pending.is_empty() {
                    "none in status.migrations".to_string()
                } else {
                    joined(&pending)
                }
            ));
        } else {
            notes.push(format!(
                "the operator applies migrations {} on its next reconcile",
                joined(&now)
            ));
        }
        if !later.is_empty() {
            notes.push(format!("{} stay pending", joined(&later)));
        }
    }
    Ok(Plan::Patch(Change {
        patch: annotation_patch(APPROVE_ANNOTATION, &value),
        summary: format!("{APPROVE_ANNOTATION}=\"{value}\" (was {})", was(current)),
        notes,
        warnings,
    }))
}

/// `rotate-keys <store>`: a new value of `umstore.io/rotate-keys` (the time, RFC
/// 3339), which the operator takes as a request for one rotation.
pub fn rotate(store: &UserMetadataStore, now: Timestamp) -> Plan {
    let current = annotation(store, ROTATE_ANNOTATION);
    let mut value = now.to_string();
    // The operator rotates when the value differs from the last one it acted on.
    let acted = store
        .status
        .as_ref()
        .and_then(|s| s.keys.as_ref())
        .and_then(|k| k.rotate_request.as_ref());
    if current == Some(&value) || acted == Some(&value) {
        value.push_str("-again");
    }
    let keys = store.status.as_ref().and_then(|s| s.keys.as_ref());
    let mut warnings = Vec::new();
    let mut notes = Vec::new();
    if store.spec.encryption.vault_address.is_none() {
        warnings.push(
            "spec.encryption.vaultAddress is not set: the store has no transit key to rotate \
             until it is (KeysReady=False, NoVault)"
                .to_string(),
        );
    }
    let key = keys.map_or_else(
        || {
            let e = &store.spec.encryption;
            format!("{}/{}", e.transit_mount, e.key_name)
        },
        |k| k.key.clone(),
    );
    match keys.and_then(|k| k.rotation.as_ref()) {
        Some(r) if r.state == "Running" => notes.push(format!(
            "a rotation of {key} is running ({} data keys rewrapped so far); the operator \
             starts this one once it has finished",
            r.rewrapped
        )),
        _ => notes.push(format!(
            "the operator rotates transit key {key} and rewraps every data key while the \
             store keeps serving"
        )),
    }
    Plan::Patch(Change {
        patch: annotation_patch(ROTATE_ANNOTATION, &value),
        summary: format!("{ROTATE_ANNOTATION}=\"{value}\" (was {})", was(current)),
        notes,
        warnings,
    })
}

/// `promote <store> <tier>`: raises `spec.tier`. Refuses a tier outside 1 to 4 and
/// a lower tier with the CRD's words, a tier below the one that runs with the
/// operator's; the rest of the CRD's rules (tier 3 needs worker groups) are the API
/// server's to refuse, in its words. The patch carries the resourceVersion read, so
/// a store changed meanwhile is not promoted on stale grounds.
pub fn promote(store: &UserMetadataStore, tier: i32) -> Result<Plan, Refusal> {
    if !(1..=4).contains(&tier) {
        return Err(Refusal(TIER_RANGE.to_string()));
    }
    let spec_tier = store.spec.tier;
    let status = store.status.as_ref();
    let running = status.and_then(|s| s.tier).unwrap_or(0);
    // As the operator decides (operator/src/validated.rs): a tier reached by automatic
    // promotion is a floor like spec.tier, so a spec.tier below it is no demotion.
    let promoted = status
        .filter(|_| store.spec.auto_promotion.enabled)
        .and_then(|s| s.promotion.as_ref())
        .and_then(|p| p.target_tier)
        .unwrap_or(0);
    if tier < running && promoted < running {
        return Err(Refusal(demotion_refused(tier, running)));
    }
    if tier < spec_tier {
        return Err(Refusal(format!(
            "spec.tier is already {spec_tier}; {TIER_NEVER_DECREASES}"
        )));
    }
    if tier == spec_tier {
        return Ok(Plan::Unchanged(format!(
            "spec.tier is already {tier}; nothing changed"
        )));
    }
    let mut notes = Vec::new();
    if tier <= running {
        notes.push(format!(
            "the store already runs tier {running} (reached by automatic promotion); spec.tier \
             is a floor, so nothing that runs changes"
        ));
    } else {
        notes.push(format!(
            "the operator promotes the store: Promoting=True until every component of tier \
             {tier} is ready, then status.tier is {tier}"
        ));
    }
    let mut patch = json!({"spec": {"tier": tier}});
    if let Some(rv) = &store.metadata.resource_version {
        patch["metadata"] = json!({"resourceVersion": rv});
    }
    Ok(Plan::Patch(Change {
        patch,
        summary: format!("spec.tier {spec_tier} -> {tier}"),
        notes,
        warnings: Vec::new(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use umstore_crds::{
        KeysStatus, MigrationsStatus, PromotionStatus, RotationStatus, UserMetadataStoreStatus,
    };

    fn store(tier: i32, status: Option<UserMetadataStoreStatus>) -> UserMetadataStore {
        let mut store: UserMetadataStore = serde_json::from_value(json!({
            "apiVersion": "umstore.io/v1alpha1",
            "kind": "UserMetadataStore",
            "metadata": {"name": "pilot", "namespace": "umstore", "resourceVersion": "42"},
            "spec": {"tier": tier, "migrations": {"policy": "Manual"},
                     "encryption": {"vaultAddress": "https://vault.vault.svc:8200"}},
        }))
        .expect("a store");
        store.status = status;
        store
    }

    fn running(tier: i32) -> UserMetadataStoreStatus {
        UserMetadataStoreStatus {
            tier: Some(tier),
            ..UserMetadataStoreStatus::default()
        }
    }

    fn patch_of(plan: Plan) -> Change {
        match plan {
            Plan::Patch(change) => change,
            Plan::Unchanged(why) => panic!("expected a patch, got: {why}"),
        }
    }

    #[test]
    fn promotion_patches_only_the_tier_with_the_version_read() {
        let change = patch_of(promote(&store(1, Some(running(1))), 2).expect("allowed"));
        assert_eq!(
            change.patch,
            json!({"spec": {"tier": 2}, "metadata": {"resourceVersion": "42"}})
        );
        assert_eq!(change.summary, "spec.tier 1 -> 2");
    }

    #[test]
    fn tiers_outside_one_to_four_are_refused_with_the_crd_words() {
        for tier in [0, 5, -1] {
            assert_eq!(
                promote(&store(1, None), tier),
                Err(Refusal("tier must be 1, 2, 3 or 4".into()))
            );
        }
    }

    #[test]
    fn a_tier_below_the_running_one_is_refused_with_the_operator_words() {
        let refusal = promote(&store(2, Some(running(3))), 2).expect_err("refused");
        assert_eq!(refusal.0, demotion_refused(2, 3));
        assert!(refusal
            .0
            .contains("the operator never demotes: set spec.tier to 3 or higher"));
    }

    #[test]
    fn a_tier_below_spec_tier_is_refused_with_the_transition_rule_words() {
        let refusal = promote(&store(3, Some(running(2))), 2).expect_err("refused");
        assert_eq!(
            refusal.0,
            format!("spec.tier is already 3; {TIER_NEVER_DECREASES}")
        );
    }

    #[test]
    fn the_same_tier_changes_nothing() {
        assert_eq!(
            promote(&store(2, Some(running(2))), 2),
            Ok(Plan::Unchanged(
                "spec.tier is already 2; nothing changed".into()
            ))
        );
    }

    #[test]
    fn raising_the_floor_under_an_automatic_promotion_is_no_demotion() {
        let mut status = running(3);
        status.promotion = Some(PromotionStatus {
            measured_users: 2_000_000,
            target_tier: Some(3),
            ..PromotionStatus::default()
        });
        let change = patch_of(promote(&store(1, Some(status)), 2).expect("allowed"));
        assert!(change.notes[0].contains("reached by automatic promotion"));
    }

    #[test]
    fn approval_of_an_embedded_version_sets_only_the_annotation() {
        let runner = Runner::default();
        let latest = runner.latest_version();
        let mut status = running(1);
        status.migrations = Some(MigrationsStatus {
            pending: vec![i32::try_from(latest).expect("small")],
            ..MigrationsStatus::default()
        });
        let change = patch_of(
            approve(&store(1, Some(status)), &format!(" {latest} "), &runner).expect("allowed"),
        );
        assert_eq!(
            change.patch,
            json!({"metadata": {"annotations": {APPROVE_ANNOTATION: latest.to_string()}}})
        );
        assert_eq!(
            change.summary,
            format!("{APPROVE_ANNOTATION}=\"{latest}\" (was unset)")
        );
        assert_eq!(
            change.notes,
            [format!(
                "the operator applies migrations {latest} on its next reconcile"
            )]
        );
    }

    #[test]
    fn approval_of_an_unknown_version_is_refused_with_the_operator_words() {
        let runner = Runner::default();
        let mut status = running(1);
        status.migrations = Some(MigrationsStatus {
            pending: vec![10, 11],
            ..MigrationsStatus::default()
        });
        let refusal = approve(&store(1, Some(status)), "v11", &runner).expect_err("refused");
        assert_eq!(
            refusal.0,
            approval_unknown("v11", runner.latest_version(), &[10, 11])
        );
    }

    #[test]
    fn approval_under_auto_policy_warns_that_it_does_nothing() {
        let mut s = store(1, None);
        s.spec.migrations.policy = MigrationPolicy::Auto;
        let change = patch_of(approve(&s, "1", &Runner::default()).expect("allowed"));
        assert!(change.warnings[0].contains("policy is Auto"));
    }

    #[test]
    fn rotation_writes_the_time_and_tells_of_a_running_rotation() {
        let now: Timestamp = "2026-03-01T10:00:00Z".parse().expect("time");
        let mut status = running(1);
        status.keys = Some(KeysStatus {
            key: "transit/umstore-pii".into(),
            rotation: Some(RotationStatus {
                state: "Running".into(),
                rewrapped: 120,
                ..RotationStatus::default()
            }),
            ..KeysStatus::default()
        });
        let change = patch_of(rotate(&store(1, Some(status)), now));
        assert_eq!(
            change.patch,
            json!({"metadata": {"annotations": {ROTATE_ANNOTATION: "2026-03-01T10:00:00Z"}}})
        );
        assert!(change.notes[0].contains("is running (120 data keys rewrapped so far)"));
    }

    #[test]
    fn rotation_never_repeats_the_value_acted_on() {
        let now: Timestamp = "2026-03-01T10:00:00Z".parse().expect("time");
        let mut status = running(1);
        status.keys = Some(KeysStatus {
            rotate_request: Some(now.to_string()),
            ..KeysStatus::default()
        });
        let change = patch_of(rotate(&store(1, Some(status)), now));
        assert_eq!(
            change.patch["metadata"]["annotations"][ROTATE_ANNOTATION],
            "2026-03-01T10:00:00Z-again"
        );
    }
}
