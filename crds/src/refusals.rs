//! What the operator and `kubectl umstore` say when they refuse a change, formed
//! in one place so both use the same words, and the words of the CRD's tier rules
//! ([`crate::rules`]), which the API server says at admission.

use crate::annotations::APPROVE_ANNOTATION;

/// The message of the CEL rule on `spec.tier` that keeps it within 1 to 4.
pub const TIER_RANGE: &str = "tier must be 1, 2, 3 or 4";

/// The message of the CEL transition rule on `spec.tier` that refuses lowering it.
pub const TIER_NEVER_DECREASES: &str =
    "tier cannot be decreased: the operator promotes but never demotes a store; \
     set spec.tier back to its previous value";

/// A spec that asks for tier `spec_tier` while the store runs tier `running`
/// (higher): the operator keeps the running tier and says this.
pub fn demotion_refused(spec_tier: i32, running: i32) -> String {
    format!(
        "spec.tier is {spec_tier} but the store runs tier {running}; the operator never \
         demotes: set spec.tier to {running} or higher"
    )
}

/// An `umstore.io/approve-migrations` value that names no migration embedded in the
/// operator (whose migrations are 1 to `latest`), with the versions still `pending`
/// (named when there are any).
pub fn approval_unknown(value: &str, latest: u32, pending: &[u32]) -> String {
    let head = format!(
        "{APPROVE_ANNOTATION} is \"{value}\", which is not the version of a migration this \
         operator has (it has 1 to {latest}); nothing was applied."
    );
    if pending.is_empty() {
        return format!("{head} Set it to one of those versions");
    }
    let pending = pending
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!("{head} Pending: {pending}. Set it to one of those versions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demotion_names_both_tiers_and_what_to_set() {
        assert_eq!(
            demotion_refused(1, 3),
            "spec.tier is 1 but the store runs tier 3; the operator never demotes: \
             set spec.tier to 3 or higher"
        );
    }

    #[test]
    fn unknown_approval_names_the_value_the_range_and_what_is_pending() {
        assert_eq!(
            approval_unknown("v11", 12, &[11, 12]),
            "umstore.io/approve-migrations is \"v11\", which is not the version of a \
             migration this operator has (it has 1 to 12); nothing was applied. \
             Pending: 11, 12. Set it to one of those versions"
        );
        assert_eq!(
            approval_unknown("99", 12, &[]),
            "umstore.io/approve-migrations is \"99\", which is not the version of a \
             migration this operator has (it has 1 to 12); nothing was applied. \
             Set it to one of those versions"
        );
    }
}
