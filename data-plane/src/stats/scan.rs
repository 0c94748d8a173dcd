//! The rows of a stats request copied out of the tables as columns, for an
//! engine to group ([`crate::bulk::aggregate`]): what `bulk stats` reads.
//!
//! One `COPY (SELECT ...) TO STDOUT (FORMAT binary)` of just the columns the
//! request needs: the dimensions grouped by and filtered on (the stats
//! endpoint's expressions, [`crate::store::query`]), `birth_year` for an age
//! filter, and the three measures. COPY takes no parameters, so no value is
//! ever part of its text: the regions read are set with `set_config` (a bound
//! parameter) in the same read-only transaction and named by
//! `current_setting`, and every other filter is applied to the rows here, with
//! the endpoint's meaning (a NULL never matches; ages by birth year).

use std::collections::BTreeSet;

use chrono::{Datelike, Utc};
use futures_util::{pin_mut, TryStreamExt};
use thiserror::Error;
use tokio_postgres::binary_copy::BinaryCopyOutStream;
use tokio_postgres::types::Type;
use tracing::debug;

use crate::bulk::aggregate::{AggregateError, Columns};
use crate::store::query::{dimension_sql, Filter};

/// Why the rows could not be read.
#[derive(Debug, Error)]
pub enum ScanError {
    /// A filter the bulk path does not evaluate.
    #[error("{filter} is not available to bulk stats (it reads other tables per user); use the stats endpoint for it")]
    UnsupportedFilter {
        /// The filter's name.
        filter: &'static str,
    },
    /// A dimension that is not one of the allowed set.
    #[error("cannot group by {0:?}")]
    UnknownDimension(String),
    /// The database refused or failed.
    #[error("{what}: {source}")]
    Database {
        /// What was being done.
        what: &'static str,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// The columns could not be built.
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
}

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ScanError {
    move |source| ScanError::Database { what, source }
}

/// The session setting that names the regions a scan reads.
const REGIONS_SETTING: &str = "umstore.bulk_stats_regions";

/// The measures every stats answer has, in the order of [`Columns`].
const MEASURES: [&str; 3] = [
    "m.income_lakh",
    "m.household_size",
    "(r.overall_risk * 100)::int2",
];

/// A filter applied to the copied rows: a column's text equal to a value.
#[derive(Debug, Clone)]
struct Equals {
    column: usize,
    value: String,
}

/// The request compiled against the columns read.
#[derive(Debug, Default)]
struct Plan {
    /// Select expressions, all from the fixed set.
    exprs: Vec<&'static str>,
    /// Index in `exprs` of each dimension grouped by.
    grouped: Vec<usize>,
    equals: Vec<Equals>,
    /// Index in `exprs` of `birth_year` and its bounds.
    birth_year: Option<(usize, i16, i16)>,
    /// The regions to read; `None`: every region.
    regions: Option<BTreeSet<String>>,
}

impl Plan {
    fn column(&mut self, expr: &'static str) -> usize {
        match self.exprs.iter().position(|e| *e == expr) {
            Some(i) => i,
            None => {
                self.exprs.push(expr);
                self.exprs.len() - 1
            }
        }
    }

    fn only_regions(&mut self, regions: impl IntoIterator<Item = String>) {
        let given: BTreeSet<String> = regions.into_iter().collect();
        self.regions = Some(match self.regions.take() {
            None => given,
            Some(before) => before.intersection(&given).cloned().collect(),
        });
    }

    fn sql(&self) -> String {
        let derived = self.exprs.iter().any(|e| e.starts_with("d."));
        let mut sql = format!(
            "COPY (SELECT {} FROM umstore.user_metadata m",
            self.exprs.join(", ")
        );
        if derived {
            sql.push_str(
                " LEFT JOIN umstore.user_derived_attributes d \
                 ON d.region = m.region AND d.user_id = m.user_id",
            );
        }
        sql.push_str(
            " LEFT JOIN umstore.user_risk_scores r \
             ON r.region = m.region AND r.user_id = m.user_id \
             WHERE m.erased_at IS NULL",
        );
        if self.regions.is_some() {
            sql.push_str(&format!(
                " AND m.region = ANY(string_to_array(current_setting('{REGIONS_SETTING}'), \
                 ',')::bpchar[])"
            ));
        }
        sql.push_str(") TO STDOUT (FORMAT binary)");
        sql
    }

    fn types(&self) -> Vec<Type> {
        let measures = self.exprs.len() - MEASURES.len();
        self.exprs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if i >= measures || *e == "m.birth_year" {
                    Type::INT2
                } else {
                    Type::TEXT
                }
            })
            .collect()
    }
}

/// Compiles `filters` and `dimensions` (each one of
/// [`crate::store::query::DIMENSIONS`]) into the columns to read. `State` is
/// resolved to its region through `client`.
async fn plan(
    client: &tokio_postgres::Transaction<'_>,
    filters: &[Filter],
    dimensions: &[String],
) -> Result<Plan, ScanError> {
    let mut plan = Plan::default();
    for d in dimensions {
        let expr = dimension_sql(d).ok_or_else(|| ScanError::UnknownDimension(d.clone()))?;
        let column = plan.column(expr);
        plan.grouped.push(column);
    }
    let year = Utc::now().year();
    let (mut oldest, mut youngest) = (i16::MIN, i16::MAX);
    let mut age = false;
    for f in filters {
        let (name, value) = match f {
            Filter::Region(r) => {
                plan.only_regions([r.clone()]);
                continue;
            }
            Filter::InRegions(r) => {
                plan.only_regions(r.iter().cloned());
                continue;
            }
            Filter::State(s) => {
                let region: Option<String> = client
                    .query_opt(
                        "SELECT region::text FROM umstore.regions WHERE lower(name) = lower($1::text)",
                        &[s],
                    )
                    .await
                    .map_err(db("looking up the state's region"))?
                    .map(|row| row.get(0));
                plan.only_regions(region);
                continue;
            }
            // As the endpoint's WHERE: born in or before / after the year
            // that makes them this old.
            Filter::AgeMin(a) => {
                age = true;
                youngest = youngest.min(i16::try_from(year - a).unwrap_or(i16::MAX));
                continue;
            }
            Filter::AgeMax(a) => {
                age = true;
                oldest = oldest.max(i16::try_from(year - a).unwrap_or(i16::MIN));
                continue;
            }
            Filter::Gender(g) => ("gender", g.clone()),
            Filter::IncomeBracket(b) => ("income_bracket", b.clone()),
            Filter::LifeStage(l) => ("life_stage", l.clone()),
            Filter::BplStatus(b) => ("bpl_status", b.to_string()),
            Filter::EligibleFor(_) => {
                return Err(ScanError::UnsupportedFilter {
                    filter: "eligible_for",
                })
            }
            Filter::RiskAbove(_) => {
                return Err(ScanError::UnsupportedFilter {
                    filter: "risk_above",
                })
            }
            Filter::IdentityTokenIndex(_) => {
                return Err(ScanError::UnsupportedFilter {
                    filter: "identity_token",
                })
            }
        };
        let expr = dimension_sql(name).ok_or_else(|| ScanError::UnknownDimension(name.into()))?;
        let column = plan.column(expr);
        plan.equals.push(Equals { column, value });
    }
    if age {
        let column = plan.column("m.birth_year");
        plan.birth_year = Some((column, oldest, youngest));
    }
    for m in MEASURES {
        plan.exprs.push(m);
    }
    Ok(plan)
}

/// The rows of the users matching `filters`, as columns grouped by
/// `dimensions`, copied out in one read-only transaction on `client`.
pub async fn scan(
    client: &mut tokio_postgres::Client,
    filters: &[Filter],
    dimensions: &[String],
) -> Result<Columns, ScanError> {
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(db("starting a read-only transaction"))?;
    let plan = plan(&tx, filters, dimensions).await?;
    let columns = copy_columns(&tx, &plan, dimensions).await?;
    tx.commit().await.map_err(db("ending the transaction"))?;
    Ok(columns)
}

/// The planner's estimate of the rows of `umstore.user_metadata` in
/// `regions` (`None`: every region), from each region's partition in
/// `pg_class` (0 for a partition never analyzed, and under Citus, where the
/// coordinator holds no rows).
const ESTIMATE_ROWS: &str = "\
    SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::float8 \
    FROM pg_catalog.pg_inherits i \
    JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid \
    JOIN umstore.regions r ON c.relname = 'user_metadata_' || lower(r.region::text) \
    WHERE i.inhparent = 'umstore.user_metadata'::regclass \
      AND ($1::text[] IS NULL OR r.region::text = ANY ($1::text[]))";

/// [`scan`] inside the caller's read-only transaction `tx`, when the request
/// is one the scan evaluates and the regions it reads hold at least
/// `min_rows` rows by the planner's estimate: what the stats endpoint does
/// for large scans (`serve --stats-engine-rows`). `None`: answer it with the
/// `GROUP BY` instead (a filter the scan does not evaluate, or a small scan).
pub async fn scan_if_large(
    tx: &tokio_postgres::Transaction<'_>,
    filters: &[Filter],
    dimensions: &[String],
    min_rows: f64,
) -> Result<Option<Columns>, ScanError> {
    let plan = match plan(tx, filters, dimensions).await {
        Ok(plan) => plan,
        Err(ScanError::UnsupportedFilter { .. }) => return Ok(None),
        Err(other) => return Err(other),
    };
    let regions: Option<Vec<String>> = plan.regions.as_ref().map(|r| r.iter().cloned().collect());
    let estimate: f64 = tx
        .query_one(ESTIMATE_ROWS, &[&regions])
        .await
        .map_err(db("estimating the rows a stats scan reads"))?
        .get(0);
    debug!(estimate, min_rows, "stats scan estimate");
    if estimate < min_rows {
        return Ok(None);
    }
    copy_columns(tx, &plan, dimensions).await.map(Some)
}

/// Copies the rows `plan` reads out in `tx`, applying its filters, into
/// columns grouped by `dimensions`.
async fn copy_columns(
    tx: &tokio_postgres::Transaction<'_>,
    plan: &Plan,
    dimensions: &[String],
) -> Result<Columns, ScanError> {
    let mut columns = Columns::new(dimensions);
    if let Some(regions) = &plan.regions {
        if regions.is_empty() {
            return Ok(columns);
        }
        let list: Vec<&str> = regions.iter().map(String::as_str).collect();
        tx.query_one(
            "SELECT set_config($1::text, $2::text, true)",
            &[&REGIONS_SETTING, &list.join(",")],
        )
        .await
        .map_err(db("naming the regions to read"))?;
    }
    let sql = plan.sql();
    debug!(%sql, "copying the stats columns out");
    let stream = tx
        .copy_out(sql.as_str())
        .await
        .map_err(db("starting COPY of the stats columns"))?;
    let rows = BinaryCopyOutStream::new(stream, &plan.types());
    pin_mut!(rows);
    let measures = plan.exprs.len() - MEASURES.len();
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(db("reading the copied rows"))?
    {
        let keep = plan.equals.iter().all(|e| {
            row.try_get::<Option<&str>>(e.column)
                .ok()
                .flatten()
                .is_some_and(|v| v == e.value)
        }) && plan.birth_year.is_none_or(|(column, oldest, youngest)| {
            row.try_get::<Option<i16>>(column)
                .ok()
                .flatten()
                .is_some_and(|y| (oldest..=youngest).contains(&y))
        });
        if !keep {
            continue;
        }
        for (d, &column) in columns.dimensions.iter_mut().zip(&plan.grouped) {
            d.push(row.try_get::<Option<&str>>(column).ok().flatten())?;
        }
        let measure = |i: usize| row.try_get::<Option<i16>>(measures + i).ok().flatten();
        columns.income_lakh.push(measure(0));
        columns.household_size.push(measure(1));
        columns.overall_risk_centi.push(measure(2));
    }
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_names_only_fixed_columns_and_the_regions_setting() {
        let mut plan = Plan::default();
        let region = plan.column("m.region::text");
        assert_eq!(plan.column("m.region::text"), region, "read once");
        plan.only_regions(["KA".to_owned(), "TN".to_owned()]);
        plan.only_regions(["TN".to_owned(), "UP".to_owned()]);
        assert_eq!(
            plan.regions.iter().flatten().collect::<Vec<_>>(),
            ["TN"],
            "both filters hold"
        );
        for m in MEASURES {
            plan.exprs.push(m);
        }
        let sql = plan.sql();
        assert!(sql.starts_with("COPY (SELECT m.region::text, m.income_lakh"));
        assert!(!sql.contains("user_derived_attributes"), "{sql}");
        assert!(!sql.contains("TN"), "no value in the text: {sql}");
        assert!(sql.contains("current_setting('umstore.bulk_stats_regions')"));
        assert_eq!(
            plan.types(),
            [Type::TEXT, Type::INT2, Type::INT2, Type::INT2]
        );
    }
}
