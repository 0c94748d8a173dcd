//! The stats views' SQL (migration 0011): which requests they answer, their
//! partials for a request, their age, and the refresh. Filters and dimensions
//! map to fixed column names; every value is a bound parameter.

use std::time::Duration;

use thiserror::Error;
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

use super::{Partial, Sum};
use crate::store::query::Filter;

/// The view the stats endpoint reads, as the refresh log and the metrics
/// name it.
pub const STATS_GROUPS: &str = "stats_groups";

/// Reads the refresh log: the view's age by the database's clock (on a
/// replica, the replica's: the age of what that replica holds).
pub const SELECT_AGE: &str = "SELECT extract(epoch FROM now() - refreshed_at)::float8
     FROM umstore.stats_refreshes WHERE view_name = $1";

/// Every view's age and size, for /metrics.
pub const SELECT_AGES: &str =
    "SELECT view_name, extract(epoch FROM now() - refreshed_at)::float8, groups
     FROM umstore.stats_refreshes";

/// Refreshes every stats view (waiting for a running refresh, or not).
pub const REFRESH: &str =
    "SELECT view_name, refreshed, groups, duration_ms FROM umstore.refresh_stats_views($1)";

/// What went wrong reading or refreshing the stats views.
#[derive(Debug, Error)]
pub enum StatsError {
    /// The refresh log could not be read.
    #[error("reading the stats views' refresh log (umstore.stats_refreshes): {0}")]
    Age(#[source] tokio_postgres::Error),
    /// The partials could not be read.
    #[error("reading partials from umstore.stats_groups: {0}")]
    Partials(#[source] tokio_postgres::Error),
    /// The refresh failed (the login needs EXECUTE on umstore.refresh_stats_views:
    /// the writer and administrators have it).
    #[error(
        "refreshing the stats views (umstore.refresh_stats_views; the writer and \
         administrators may run it): {0}"
    )]
    Refresh(#[source] tokio_postgres::Error),
}

/// The view's column of a stats dimension (a fixed name, never input).
fn column(dimension: &str) -> Option<&'static str> {
    Some(match dimension {
        "region" => "region::text",
        "gender" => "gender",
        "area_type" => "area_type",
        "social_category" => "social_category",
        "age_group" => "age_group",
        "income_bracket" => "income_bracket",
        "life_stage" => "life_stage",
        "employment_category" => "employment_category",
        "bpl_status" => "bpl_status::text",
        _ => return None,
    })
}

/// The view's condition for a filter, numbered `$n`, and its value; `None`
/// when the view cannot answer it (age, eligibility, risk: not in the view).
fn condition(filter: &Filter, n: usize) -> Option<(String, Box<dyn ToSql + Sync + Send>)> {
    Some(match filter {
        Filter::Region(r) => (format!("region = ${n}::text::bpchar"), Box::new(r.clone())),
        Filter::State(s) => (
            format!("region = (SELECT region FROM umstore.regions WHERE lower(name) = lower(${n}::text))"),
            Box::new(s.clone()),
        ),
        Filter::Gender(g) => (format!("gender = ${n}::text"), Box::new(g.clone())),
        Filter::IncomeBracket(b) => (format!("income_bracket = ${n}::text"), Box::new(b.clone())),
        Filter::LifeStage(l) => (format!("life_stage = ${n}::text"), Box::new(l.clone())),
        Filter::BplStatus(b) => (format!("bpl_status = ${n}::bool"), Box::new(*b)),
        Filter::InRegions(r) => (
            format!("region = ANY(${n}::text[]::bpchar[])"),
            Box::new(r.clone()),
        ),
        Filter::AgeMin(_)
        | Filter::AgeMax(_)
        | Filter::EligibleFor(_)
        | Filter::RiskAbove(_)
        | Filter::IdentityTokenIndex(_) => return None,
    })
}

/// Whether the views answer a request with these filters and dimensions
/// (otherwise the endpoint reads the tables).
pub fn answers(filters: &[Filter], dimensions: &[String]) -> bool {
    filters.iter().all(|f| condition(f, 1).is_some())
        && dimensions.iter().all(|d| column(d).is_some())
}

/// The view's age in seconds, or `None` when it was never refreshed.
pub async fn age(client: &impl GenericClient) -> Result<Option<Duration>, StatsError> {
    let row = client
        .query_opt(SELECT_AGE, &[&STATS_GROUPS])
        .await
        .map_err(StatsError::Age)?;
    Ok(row.map(|r| Duration::from_secs_f64(r.get::<_, f64>(0).max(0.0))))
}

/// This cluster's partials of the users matching `filters`, grouped by
/// `dimensions`, every group however small (suppression comes after the
/// merge). Call only when [`answers`] says the view can.
pub async fn partials(
    client: &impl GenericClient,
    filters: &[Filter],
    dimensions: &[String],
) -> Result<Vec<Partial>, StatsError> {
    let mut clauses = vec!["true".to_owned()];
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    for f in filters {
        if let Some((clause, value)) = condition(f, params.len() + 1) {
            clauses.push(clause);
            params.push(value);
        }
    }
    let columns: Vec<&str> = dimensions.iter().filter_map(|d| column(d)).collect();
    let (select, group_by) = super::grouped(&columns);
    let sql = format!(
        "SELECT {select}coalesce(sum(users), 0)::int8,
                coalesce(sum(income_n), 0)::int8, coalesce(sum(income_sum), 0)::int8,
                coalesce(sum(household_n), 0)::int8, coalesce(sum(household_sum), 0)::int8,
                coalesce(sum(risk_n), 0)::int8, coalesce(sum(risk_centi_sum), 0)::int8
         FROM umstore.stats_groups
         WHERE {}
         {group_by}",
        clauses.join(" AND ")
    );
    let refs: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let rows = client
        .query(&sql, &refs)
        .await
        .map_err(StatsError::Partials)?;
    let k = columns.len();
    let sum = |r: &tokio_postgres::Row, i: usize| Sum {
        n: r.get(i),
        total: r.get(i + 1),
    };
    Ok(rows
        .iter()
        .map(|r| Partial {
            key: (0..k).map(|i| r.get::<_, Option<String>>(i)).collect(),
            users: r.get(k),
            income_lakh: sum(r, k + 1),
            household_size: sum(r, k + 3),
            overall_risk_centi: sum(r, k + 5),
        })
        .collect())
}

/// What one refresh call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshed {
    /// The view.
    pub view: String,
    /// False when another session was refreshing (and `wait` was not given).
    pub refreshed: bool,
    /// Rows (groups) in the view after the refresh.
    pub groups: Option<i64>,
    /// Milliseconds the refresh took in the database.
    pub duration_ms: Option<i64>,
}

/// Refreshes every stats view, concurrently (readers keep reading the old
/// rows meanwhile). With `wait`, waits for a refresh under way elsewhere and
/// then refreshes; without, returns `refreshed: false` at once if one is.
pub async fn refresh(
    client: &impl GenericClient,
    wait: bool,
) -> Result<Vec<Refreshed>, StatsError> {
    let rows = client
        .query(REFRESH, &[&wait])
        .await
        .map_err(StatsError::Refresh)?;
    Ok(rows
        .iter()
        .map(|r| Refreshed {
            view: r.get(0),
            refreshed: r.get(1),
            groups: r.get(2),
            duration_ms: r.get(3),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::query::DIMENSIONS;

    #[test]
    fn every_dimension_has_a_column_in_the_view() {
        for d in DIMENSIONS {
            assert!(column(d).is_some(), "{d}");
        }
    }

    #[test]
    fn filters_outside_the_view_send_the_request_to_the_tables() {
        let dims = vec!["region".to_owned()];
        assert!(answers(&[], &dims));
        assert!(answers(
            &[
                Filter::Region("KA".into()),
                Filter::State("Kerala".into()),
                Filter::Gender("female".into()),
                Filter::IncomeBracket("BPL".into()),
                Filter::LifeStage("retired".into()),
                Filter::BplStatus(true),
                Filter::InRegions(vec!["KA".into(), "KL".into()]),
            ],
            &dims
        ));
        for f in [
            Filter::AgeMin(18),
            Filter::AgeMax(60),
            Filter::EligibleFor("pm-kisan".into()),
            Filter::RiskAbove(0.5),
        ] {
            assert!(!answers(std::slice::from_ref(&f), &dims), "{f:?}");
        }
        assert!(!answers(&[], &["full_name".to_owned()]));
    }
}
