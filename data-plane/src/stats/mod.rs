//! Materialized stats: the views of migration 0011 read as mergeable partials
//! ([`views`]), merged across clusters with the small-group suppression
//! applied to the merged totals ([`merge`]), and refreshed on a schedule by
//! one process at a time ([`refresher`]).
//!
//! A partial is a group's user count and, per averaged measure, how many of
//! its users have the measure and its sum. Sums and counts add up across
//! clusters; an average does not, so averages are computed only after the
//! merge. A group is suppressed by its merged total: a group under the
//! threshold in every cluster but above it in total is shown, and a group
//! under it in total is left out even when one cluster alone would not say
//! so.

pub mod mean;
pub mod refresher;
pub mod scan;
pub mod views;

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde_json::Map;

use crate::store::query::{json_text, Group};

/// Groups with fewer users than this are left out of stats unless told
/// otherwise (`serve --stats-min-group`, `bulk stats --min-group`).
pub const DEFAULT_MIN_GROUP: u32 = 10;

/// Decimal places of `overall_risk` (`numeric(3, 2)`): its partial sums are
/// in hundredths.
pub const RISK_SCALE: u32 = 2;

/// A measure's partial: how many users have it, and its sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sum {
    /// Users with a value.
    pub n: i64,
    /// The sum of their values (for risk: in hundredths).
    pub total: i64,
}

impl Sum {
    fn add(&mut self, other: Sum) {
        self.n = self.n.saturating_add(other.n);
        self.total = self.total.saturating_add(other.total);
    }

    /// The mean, `total / 10^scale / n` rounded as PostgreSQL's
    /// `avg(...)::float8` rounds it ([`mean::pg_avg`]), or `None` without
    /// values.
    fn mean(self, scale: u32) -> Option<f64> {
        mean::pg_avg(self.total, scale, self.n)
    }
}

/// One group's partial from one cluster: the value of each dimension grouped
/// by, in order (`None` for SQL NULL), and what sums across clusters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Partial {
    /// The dimensions' values, in the order of the request's `group_by`.
    pub key: Vec<Option<String>>,
    /// Users in the group.
    pub users: i64,
    /// `income_lakh`.
    pub income_lakh: Sum,
    /// `household_size`.
    pub household_size: Sum,
    /// `overall_risk`, in hundredths.
    pub overall_risk_centi: Sum,
}

impl Partial {
    fn add(&mut self, other: &Partial) {
        self.users = self.users.saturating_add(other.users);
        self.income_lakh.add(other.income_lakh);
        self.household_size.add(other.household_size);
        self.overall_risk_centi.add(other.overall_risk_centi);
    }
}

/// Merges per-cluster partials (one list per cluster) into the stats
/// answer: counts and sums added per group, groups with fewer than
/// `min_group` users in total left out, averages computed from the merged
/// sums. Groups come in the order of their values (NULL last, as
/// PostgreSQL's `ORDER BY` puts it).
pub fn merge(clusters: &[Vec<Partial>], dimensions: &[String], min_group: i64) -> Vec<Group> {
    let mut merged: BTreeMap<Vec<Option<String>>, Partial> = BTreeMap::new();
    for partial in clusters.iter().flatten() {
        merged
            .entry(partial.key.clone())
            .or_insert_with(|| Partial {
                key: partial.key.clone(),
                ..Partial::default()
            })
            .add(partial);
    }
    let mut kept: Vec<Partial> = merged
        .into_values()
        .filter(|p| p.users >= min_group)
        .collect();
    kept.sort_by(|a, b| nulls_last(&a.key, &b.key));
    kept.into_iter()
        .map(|p| {
            let group: Map<_, _> = dimensions
                .iter()
                .zip(p.key.iter())
                .map(|(d, v)| (d.clone(), json_text(v.clone())))
                .collect();
            Group {
                group,
                users: p.users,
                avg_income_lakh: p.income_lakh.mean(0),
                avg_household_size: p.household_size.mean(0),
                avg_overall_risk: p.overall_risk_centi.mean(RISK_SCALE),
            }
        })
        .collect()
}

fn nulls_last(a: &[Option<String>], b: &[Option<String>]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = match (x, y) {
            (Some(x), Some(y)) => x.cmp(y),
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (None, None) => Ordering::Equal,
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

/// The grouping part of a stats query over the trusted SQL expressions `exprs`
/// (allow-listed dimension columns, never user input): `e0 AS g0, e1 AS g1, `
/// to put before the aggregates, and `GROUP BY g0, g1` (empty without any).
pub(crate) fn grouped(exprs: &[&str]) -> (String, String) {
    let select = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| format!("{e} AS g{i}, "))
        .collect();
    let group_by = if exprs.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = (0..exprs.len()).map(|i| format!("g{i}")).collect();
        format!("GROUP BY {}", names.join(", "))
    };
    (select, group_by)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(key: &[&str], users: i64, income: (i64, i64), risk: (i64, i64)) -> Partial {
        Partial {
            key: key.iter().map(|k| Some((*k).to_owned())).collect(),
            users,
            income_lakh: Sum {
                n: income.0,
                total: income.1,
            },
            household_size: Sum {
                n: users,
                total: users * 4,
            },
            overall_risk_centi: Sum {
                n: risk.0,
                total: risk.1,
            },
        }
    }

    fn dims() -> Vec<String> {
        vec!["region".to_owned(), "income_bracket".to_owned()]
    }

    #[test]
    fn a_group_small_in_each_cluster_but_not_in_total_is_kept() {
        let a = vec![partial(&["KA", "BPL"], 6, (6, 12), (2, 50))];
        let b = vec![partial(&["KA", "BPL"], 7, (5, 20), (3, 150))];
        let groups = merge(&[a, b], &dims(), 10);
        assert_eq!(groups.len(), 1);
        let g = &groups[0];
        assert_eq!(g.users, 13);
        assert_eq!(g.group["region"], "KA");
        assert_eq!(g.group["income_bracket"], "BPL");
        // (12 + 20) / (6 + 5), not the mean of the two clusters' means.
        assert_eq!(g.avg_income_lakh, Some(32.0 / 11.0));
        assert_eq!(g.avg_household_size, Some(4.0));
        assert_eq!(g.avg_overall_risk, Some(200.0 / 500.0));
    }

    #[test]
    fn a_group_small_in_total_is_suppressed_even_when_split() {
        let a = vec![
            partial(&["KA", "HIG"], 4, (4, 80), (0, 0)),
            partial(&["TN", "LIG"], 30, (30, 90), (0, 0)),
        ];
        let b = vec![partial(&["KA", "HIG"], 5, (5, 100), (0, 0))];
        let groups = merge(&[a, b], &dims(), 10);
        assert_eq!(groups.len(), 1, "{groups:?}");
        assert_eq!(groups[0].group["region"], "TN");
        assert_eq!(groups[0].avg_overall_risk, None, "no scores: no mean");
        // At the threshold exactly it is shown.
        let c = vec![partial(&["KA", "HIG"], 1, (1, 1), (0, 0))];
        let b = vec![partial(&["KA", "HIG"], 5, (5, 100), (0, 0))];
        let a = vec![partial(&["KA", "HIG"], 4, (4, 80), (0, 0))];
        assert_eq!(merge(&[a, b, c], &dims(), 10)[0].users, 10);
    }

    #[test]
    fn one_cluster_is_its_own_merge_and_groups_are_ordered_nulls_last() {
        let mut unknown = partial(&["KA"], 12, (0, 0), (0, 0));
        unknown.key = vec![None];
        let groups = merge(
            &[vec![
                unknown,
                partial(&["TN"], 10, (10, 10), (0, 0)),
                partial(&["AP"], 11, (11, 11), (0, 0)),
                partial(&["BR"], 9, (9, 9), (0, 0)),
            ]],
            &["region".to_owned()],
            10,
        );
        let order: Vec<_> = groups.iter().map(|g| g.group["region"].clone()).collect();
        assert_eq!(
            order,
            vec![
                serde_json::json!("AP"),
                serde_json::json!("TN"),
                serde_json::Value::Null
            ]
        );
        assert_eq!(groups[2].avg_income_lakh, None);
    }

    #[test]
    fn bpl_status_is_a_boolean_and_no_dimensions_is_one_group() {
        let groups = merge(
            &[vec![partial(&["true"], 10, (1, 1), (0, 0))]],
            &["bpl_status".to_owned()],
            10,
        );
        assert_eq!(groups[0].group["bpl_status"], serde_json::json!(true));
        let mut total = partial(&[], 25, (25, 50), (0, 0));
        total.key.clear();
        let groups = merge(&[vec![total.clone()], vec![total]], &[], 10);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].users, 50);
        assert!(groups[0].group.is_empty());
    }

    #[test]
    fn no_partials_no_groups() {
        assert!(merge(&[], &dims(), 10).is_empty());
        assert!(merge(&[Vec::new(), Vec::new()], &dims(), 10).is_empty());
    }
}
