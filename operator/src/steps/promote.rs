//! Automatic promotion (SPEC §2): with `spec.autoPromotion.enabled`, the user count
//! is measured cheaply and compared with the thresholds; a count past the next
//! tier's threshold records that tier in `status.promotion.targetTier`, which the
//! validate step takes as a floor like `spec.tier`. From there a promotion runs the
//! same steps as a raised `spec.tier`: topology creates the new tier's objects,
//! the endpoints switch once the pooler and the pools are ready
//! ([`crate::validated::Validated::endpoint_tier`]), distribute converts the tables
//! into Citus, and `status.tier` moves once all of it is done (the `Promoting`
//! condition names the stage). Every stage is read back from the cluster and the
//! database, so a crash anywhere resumes where it was.
//!
//! The count is never a full scan: it is the larger of the statistics collector's
//! `n_live_tup` (kept current as rows commit) and the planner's `reltuples` (kept
//! by ANALYZE, and surviving a crash that resets the collector) of
//! `umstore.user_directory`, one row per user. Under Citus the same figures are
//! summed over the directory's shards.

use k8s_openapi::jiff::Timestamp;
use tokio_postgres::Client;
use umstore_crds::{PromotionStatus, UserMetadataStore};

use crate::error::Error;
use crate::validated::{validate, Validated};

/// Users in one table from the statistics: no scan.
const USERS: &str = "SELECT greatest(coalesce(s.n_live_tup, 0), c.reltuples::int8, 0)::int8 \
     FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
     WHERE c.oid = 'umstore.user_directory'::regclass";

/// Whether Citus's catalog is here (asked first: a query naming a missing table
/// fails when planned, whatever its other conditions).
const CITUS_CATALOG: &str = "SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL";

/// Whether the directory is a Citus distributed table (its rows are on the workers).
const DISTRIBUTED: &str = "SELECT EXISTS (SELECT 1 FROM pg_dist_partition \
     WHERE logicalrelid = 'umstore.user_directory'::regclass)";

/// The same figures summed over the directory's shards.
const USERS_CITUS: &str = "SELECT coalesce(sum(result::int8), 0)::int8 \
     FROM run_command_on_shards('umstore.user_directory', \
        $$SELECT greatest(coalesce(s.n_live_tup, 0), c.reltuples::int8, 0) \
          FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
          WHERE c.oid = '%s'::regclass$$) \
     WHERE success";

/// The user count as the statistics estimate it.
pub async fn measure(client: &Client) -> Result<i64, Error> {
    let citus: bool = client
        .query_one(CITUS_CATALOG, &[])
        .await
        .map_err(Error::db("looking for Citus's catalog"))?
        .get(0);
    let distributed = citus
        && client
            .query_one(DISTRIBUTED, &[])
            .await
            .map_err(Error::db("looking for a distributed user directory"))?
            .get::<_, bool>(0);
    let sql = if distributed { USERS_CITUS } else { USERS };
    Ok(client
        .query_one(sql, &[])
        .await
        .map_err(Error::db("estimating the user count from the statistics"))?
        .get(0))
}

/// What automatic promotion decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// For `status.promotion`.
    pub status: PromotionStatus,
    /// A tier was recorded just now: reconcile again at once to take it.
    pub raised: bool,
}

/// Compares `users` with the thresholds: the tier they call for is recorded when
/// it is above the running one and the spec can run it (tier 3 needs worker
/// groups); otherwise the message says what stops it.
pub fn decide(store: &UserMetadataStore, v: &Validated, users: i64, now: Timestamp) -> Decision {
    let mut decision = decide_at(store, v, users, now);
    // An unchanged measurement keeps its time: a steady store's status is not
    // rewritten on every reconcile.
    if let Some(old) = store.status.as_ref().and_then(|s| s.promotion.as_ref()) {
        let same = PromotionStatus {
            measured_at: old.measured_at.clone(),
            ..decision.status.clone()
        };
        if &same == old {
            decision.status = same;
        }
    }
    decision
}

fn decide_at(store: &UserMetadataStore, v: &Validated, users: i64, now: Timestamp) -> Decision {
    let thresholds = &v.spec.auto_promotion.thresholds;
    let recorded = store
        .status
        .as_ref()
        .and_then(|s| s.promotion.as_ref())
        .and_then(|p| p.target_tier);
    let wanted = thresholds.tier_for(users);
    let mut status = PromotionStatus {
        measured_users: users,
        measured_at: now.to_string(),
        target_tier: recorded,
        message: String::new(),
    };
    if wanted <= v.tier {
        return Decision {
            status,
            raised: false,
        };
    }
    // Checked as a raised spec.tier would be.
    let mut candidate = store.clone();
    candidate.spec.tier = wanted;
    match validate(&candidate) {
        Ok(_) => {
            status.target_tier = Some(wanted);
            status.message = format!(
                "{users} users reached the tier-{wanted} threshold of {}: promoting from tier {}",
                thresholds.users_for(wanted),
                v.tier
            );
            Decision {
                status,
                raised: true,
            }
        }
        Err(invalid) => {
            status.message = format!(
                "{users} users reached the tier-{wanted} threshold of {}, but tier {wanted} \
                 cannot run with this spec: {invalid}",
                thresholds.users_for(wanted)
            );
            Decision {
                status,
                raised: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(spec: serde_json::Value, status: serde_json::Value) -> UserMetadataStore {
        serde_json::from_value(json!({
            "apiVersion": "umstore.io/v1alpha1",
            "kind": "UserMetadataStore",
            "metadata": {"name": "pilot", "namespace": "umstore", "uid": "u-1", "generation": 1},
            "spec": spec,
            "status": status,
        }))
        .expect("store")
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("time")
    }

    #[test]
    fn below_the_threshold_nothing_is_recorded() {
        let s = store(json!({"tier": 1}), json!({"tier": 1}));
        let v = validate(&s).expect("valid");
        let d = decide(&s, &v, 9_999, now());
        assert!(!d.raised);
        assert_eq!(d.status.target_tier, None);
        assert_eq!(d.status.measured_users, 9_999);
    }

    #[test]
    fn crossing_tier_2_records_it_and_validate_takes_it_as_a_floor() {
        let s = store(json!({"tier": 1}), json!({"tier": 1}));
        let v = validate(&s).expect("valid");
        let d = decide(&s, &v, 10_000, now());
        assert!(d.raised);
        assert_eq!(d.status.target_tier, Some(2));
        let mut promoted = s.clone();
        promoted.status.as_mut().expect("status").promotion = Some(d.status);
        let v = validate(&promoted).expect("valid");
        assert_eq!(v.tier, 2);
        assert!(v.pooled());
        assert!(v.demotion_refused.is_none());
        // Once tier 2 runs, spec.tier 1 below it is no demotion: auto-promotion raised it.
        promoted.status.as_mut().expect("status").tier = Some(2);
        let v = validate(&promoted).expect("valid");
        assert_eq!(v.tier, 2);
        assert!(v.demotion_refused.is_none(), "{:?}", v.demotion_refused);
        // With auto-promotion switched off afterwards, the spec must say tier 2.
        promoted.spec.auto_promotion.enabled = false;
        let v = validate(&promoted).expect("valid");
        assert_eq!(v.tier, 2);
        assert!(v.demotion_refused.is_some());
    }

    #[test]
    fn an_unchanged_count_keeps_its_measurement_time() {
        let s = store(
            json!({"tier": 1}),
            json!({"tier": 1, "promotion": {"measuredUsers": 12,
                "measuredAt": "2026-06-01T00:00:00Z"}}),
        );
        let v = validate(&s).expect("valid");
        let d = decide(&s, &v, 12, now());
        assert_eq!(d.status.measured_at, "2026-06-01T00:00:00Z");
        let d = decide(&s, &v, 13, now());
        assert_ne!(d.status.measured_at, "2026-06-01T00:00:00Z");
    }

    #[test]
    fn lowered_thresholds_are_used() {
        let s = store(
            json!({"tier": 1, "autoPromotion": {"thresholds":
                {"tier2Users": 100, "tier3Users": 1000, "tier4Users": 10000}}}),
            json!({"tier": 1}),
        );
        let v = validate(&s).expect("valid");
        assert_eq!(decide(&s, &v, 150, now()).status.target_tier, Some(2));
    }

    #[test]
    fn tier_3_without_worker_groups_is_not_taken_and_says_why() {
        let s = store(json!({"tier": 2}), json!({"tier": 2}));
        let v = validate(&s).expect("valid");
        let d = decide(&s, &v, 2_000_000, now());
        assert!(!d.raised);
        assert_eq!(d.status.target_tier, None);
        assert!(
            d.status.message.contains("tier 3 cannot run")
                && d.status.message.contains("workerGroups"),
            "{}",
            d.status.message
        );
    }

    #[test]
    fn disabled_auto_promotion_ignores_a_recorded_target() {
        let s = store(
            json!({"tier": 1, "autoPromotion": {"enabled": false}}),
            json!({"tier": 1, "promotion": {"measuredUsers": 20000,
                "measuredAt": "2027-01-15T08:00:00Z", "targetTier": 2}}),
        );
        assert_eq!(validate(&s).expect("valid").tier, 1);
    }
}
