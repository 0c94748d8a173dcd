//! Users by attributes, and anonymized counts: the filters are an allow-list of
//! typed values, each turned into a fixed SQL fragment with a bound parameter.
//! No value is ever part of the SQL text.

use chrono::{Datelike, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// The values a filter or a dimension may take, where they are an enum.
pub const GENDERS: &[&str] = &["female", "male", "transgender", "undisclosed"];
/// Income brackets.
pub const INCOME_BRACKETS: &[&str] = &["BPL", "LIG", "MIG", "HIG"];
/// Life stages.
pub const LIFE_STAGES: &[&str] = &[
    "childhood",
    "student",
    "early_career",
    "family_building",
    "established",
    "pre_retirement",
    "retired",
];

/// One validated filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Region code (`KA`).
    Region(String),
    /// State or union territory by name (`Karnataka`), any case.
    State(String),
    /// At least this old (whole years, by birth year).
    AgeMin(i32),
    /// At most this old.
    AgeMax(i32),
    /// Gender.
    Gender(String),
    /// Derived income bracket.
    IncomeBracket(String),
    /// Derived life stage.
    LifeStage(String),
    /// Below the poverty line or not.
    BplStatus(bool),
    /// An unexpired eligibility result saying eligible for this scheme.
    EligibleFor(String),
    /// Overall risk strictly above.
    RiskAbove(f64),
    /// The blind index of an identity token (computed by the caller).
    IdentityTokenIndex(Vec<u8>),
    /// Only these regions: a cluster's share of a query over every cluster
    /// of a store with several, the regions the placement gives it (a region
    /// being copied in from another cluster is not counted twice). Never
    /// parsed from a request.
    InRegions(Vec<String>),
}

impl Filter {
    /// The query parameters a filter is given by.
    pub const NAMES: &'static [&'static str] = &[
        "region",
        "state",
        "age_min",
        "age_max",
        "gender",
        "income_bracket",
        "life_stage",
        "bpl_status",
        "eligible_for",
        "risk_above",
        "identity_token",
    ];

    /// Parses the filter `name` from its text; the error says what is expected.
    /// `identity_token` is not parsed here (it needs the blind-index key).
    pub fn parse(name: &str, value: &str) -> Result<Self, String> {
        let one_of = |allowed: &[&str]| {
            allowed
                .iter()
                .find(|a| **a == value)
                .map(|a| (*a).to_owned())
                .ok_or_else(|| format!("{name} is one of {}", allowed.join(", ")))
        };
        let age = || {
            value
                .parse::<i32>()
                .ok()
                .filter(|a| (0..=130).contains(a))
                .ok_or_else(|| format!("{name} is a whole number of years from 0 to 130"))
        };
        Ok(match name {
            "region" => {
                if value.len() == 2 && value.bytes().all(|b| b.is_ascii_uppercase()) {
                    Filter::Region(value.to_owned())
                } else {
                    return Err("region is a two-letter code such as KA".into());
                }
            }
            "state" => {
                if value.is_empty() || value.chars().count() > 64 {
                    return Err("state is a state's name such as Karnataka".into());
                }
                Filter::State(value.to_owned())
            }
            "age_min" => Filter::AgeMin(age()?),
            "age_max" => Filter::AgeMax(age()?),
            "gender" => Filter::Gender(one_of(GENDERS)?),
            "income_bracket" => Filter::IncomeBracket(one_of(INCOME_BRACKETS)?),
            "life_stage" => Filter::LifeStage(one_of(LIFE_STAGES)?),
            "bpl_status" => match value {
                "true" => Filter::BplStatus(true),
                "false" => Filter::BplStatus(false),
                _ => return Err("bpl_status is true or false".into()),
            },
            "eligible_for" => {
                let ok = !value.is_empty()
                    && value.len() <= 128
                    && value.chars().enumerate().all(|(i, c)| {
                        c.is_ascii_alphanumeric() || (i > 0 && matches!(c, '_' | '.' | ':' | '-'))
                    });
                if !ok {
                    return Err(
                        "eligible_for is a scheme id: 1 to 128 of A-Z a-z 0-9 _ . : -".into(),
                    );
                }
                Filter::EligibleFor(value.to_owned())
            }
            "risk_above" => Filter::RiskAbove(
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or("risk_above is a number from 0 to 1")?,
            ),
            _ => return Err(format!("{name} is not a filter")),
        })
    }
}

/// A dimension stats may group by.
pub const DIMENSIONS: &[&str] = &[
    "region",
    "gender",
    "area_type",
    "social_category",
    "age_group",
    "income_bracket",
    "life_stage",
    "employment_category",
    "bpl_status",
];

/// The SQL expression of a dimension (a fixed column, never input).
pub(crate) fn dimension_sql(name: &str) -> Option<&'static str> {
    Some(match name {
        "region" => "m.region::text",
        "gender" => "m.gender",
        "area_type" => "m.area_type",
        "social_category" => "m.social_category",
        "age_group" => "d.age_group",
        "income_bracket" => "d.income_bracket",
        "life_stage" => "d.life_stage",
        "employment_category" => "d.employment_category",
        "bpl_status" => "d.bpl_status::text",
        _ => return None,
    })
}

/// The WHERE clause of `filters` and its parameters, numbered from `$1`.
struct Where {
    sql: Vec<String>,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Where {
    fn new(filters: &[Filter]) -> Self {
        let mut w = Where {
            sql: vec!["m.erased_at IS NULL".to_owned()],
            params: Vec::new(),
        };
        let year = Utc::now().year();
        for f in filters {
            let n = w.params.len() + 1;
            let (clause, param): (String, Box<dyn ToSql + Sync + Send>) = match f {
                Filter::Region(r) => (format!("m.region = ${n}::text::bpchar"), Box::new(r.clone())),
                Filter::State(s) => (
                    format!(
                        "m.region = (SELECT region FROM umstore.regions WHERE lower(name) = lower(${n}::text))"
                    ),
                    Box::new(s.clone()),
                ),
                // Born in or before the year that makes them this old.
                Filter::AgeMin(a) => (
                    format!("m.birth_year <= ${n}::int2"),
                    Box::new(i16::try_from(year - a).unwrap_or(i16::MAX)),
                ),
                Filter::AgeMax(a) => (
                    format!("m.birth_year >= ${n}::int2"),
                    Box::new(i16::try_from(year - a).unwrap_or(i16::MIN)),
                ),
                Filter::Gender(g) => (format!("m.gender = ${n}::text"), Box::new(g.clone())),
                Filter::IncomeBracket(b) => {
                    (format!("d.income_bracket = ${n}::text"), Box::new(b.clone()))
                }
                Filter::LifeStage(l) => (format!("d.life_stage = ${n}::text"), Box::new(l.clone())),
                Filter::BplStatus(b) => (format!("d.bpl_status = ${n}::bool"), Box::new(*b)),
                Filter::EligibleFor(s) => (
                    format!(
                        "EXISTS (SELECT 1 FROM umstore.user_eligibility_cache e
                          WHERE e.region = m.region AND e.user_id = m.user_id
                            AND e.scheme_id = ${n}::text AND e.eligible AND e.expires_at > now())"
                    ),
                    Box::new(s.clone()),
                ),
                Filter::RiskAbove(r) => (
                    format!(
                        "EXISTS (SELECT 1 FROM umstore.user_risk_scores r
                          WHERE r.region = m.region AND r.user_id = m.user_id
                            AND r.overall_risk > ${n}::float8::numeric)"
                    ),
                    Box::new(*r),
                ),
                Filter::IdentityTokenIndex(i) => (
                    format!("m.identity_token_bidx = ${n}::bytea"),
                    Box::new(i.clone()),
                ),
                Filter::InRegions(r) => (
                    format!("m.region = ANY(${n}::text[]::bpchar[])"),
                    Box::new(r.clone()),
                ),
            };
            w.sql.push(clause);
            w.params.push(param);
        }
        w
    }

    fn clause(&self) -> String {
        self.sql.join(" AND ")
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// A user a query found: what identifies them and their non-PII attributes.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Match {
    /// The user.
    pub user_id: Uuid,
    /// Their region.
    pub region: String,
    /// Birth year.
    pub birth_year: Option<i16>,
    /// Gender.
    pub gender: Option<String>,
    /// Income bracket (derived).
    pub income_bracket: Option<String>,
    /// Life stage (derived).
    pub life_stage: Option<String>,
    /// Below the poverty line (derived).
    pub bpl_status: Option<bool>,
    /// Row version.
    pub version: i64,
}

/// A page of users matching `filters`, in (region, user id) order after
/// `after`; `limit` at most, and whether more follow.
pub async fn find(
    client: &impl GenericClient,
    filters: &[Filter],
    after: Option<(String, Uuid)>,
    limit: u32,
) -> Result<(Vec<Match>, bool), tokio_postgres::Error> {
    let mut w = Where::new(filters);
    if let Some((region, user)) = after {
        let n = w.params.len() + 1;
        w.sql.push(format!(
            "(m.region, m.user_id) > (${n}::text::bpchar, ${}::uuid)",
            n + 1
        ));
        w.params.push(Box::new(region));
        w.params.push(Box::new(user));
    }
    let n = w.params.len() + 1;
    let sql = format!(
        "SELECT m.user_id, m.region::text, m.birth_year, m.gender, d.income_bracket,
                d.life_stage, d.bpl_status, m.version
         FROM umstore.user_metadata m
         LEFT JOIN umstore.user_derived_attributes d
           ON d.region = m.region AND d.user_id = m.user_id
         WHERE {}
         ORDER BY m.region, m.user_id
         LIMIT ${n}::int8",
        w.clause()
    );
    w.params.push(Box::new(i64::from(limit) + 1));
    let rows = client.query(&sql, &w.refs()).await?;
    let more = rows.len() > limit as usize;
    let found = rows
        .iter()
        .take(limit as usize)
        .map(|r| Match {
            user_id: r.get(0),
            region: r.get(1),
            birth_year: r.get(2),
            gender: r.get(3),
            income_bracket: r.get(4),
            life_stage: r.get(5),
            bpl_status: r.get(6),
            version: r.get(7),
        })
        .collect();
    Ok((found, more))
}

/// One group of the stats: its dimension values, size and averages.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Group {
    /// The value of each dimension grouped by.
    #[schema(value_type = Object)]
    pub group: Map<String, Value>,
    /// Users in the group (never below the suppression threshold).
    pub users: i64,
    /// Mean annual income, in lakh INR (from `income_lakh`).
    pub avg_income_lakh: Option<f64>,
    /// Mean household size.
    pub avg_household_size: Option<f64>,
    /// Mean overall risk, over the users that have scores.
    pub avg_overall_risk: Option<f64>,
}

/// Counts and averages of the users matching `filters`, grouped by
/// `dimensions` (validated against [`DIMENSIONS`]); groups with fewer than
/// `min_group` users are left out by the database and never leave it.
pub async fn stats(
    client: &impl GenericClient,
    filters: &[Filter],
    dimensions: &[String],
    min_group: i64,
) -> Result<Vec<Group>, tokio_postgres::Error> {
    let mut w = Where::new(filters);
    let exprs: Vec<&'static str> = dimensions.iter().filter_map(|d| dimension_sql(d)).collect();
    let (select_dims, group_by) = crate::stats::grouped(&exprs);
    let n = w.params.len() + 1;
    let sql = format!(
        "SELECT {select_dims} count(*)::int8, avg(m.income_lakh)::float8,
                avg(m.household_size)::float8, avg(r.overall_risk)::float8
         FROM umstore.user_metadata m
         LEFT JOIN umstore.user_derived_attributes d
           ON d.region = m.region AND d.user_id = m.user_id
         LEFT JOIN umstore.user_risk_scores r
           ON r.region = m.region AND r.user_id = m.user_id
         WHERE {}
         {group_by}
         HAVING count(*) >= ${n}::int8
         ORDER BY 1",
        w.clause()
    );
    w.params.push(Box::new(min_group));
    let rows = client.query(&sql, &w.refs()).await?;
    let k = exprs.len();
    Ok(rows
        .iter()
        .map(|r| {
            let group = dimensions
                .iter()
                .enumerate()
                .map(|(i, d)| (d.clone(), json_text(r.get::<_, Option<String>>(i))))
                .collect();
            Group {
                group,
                users: r.get(k),
                avg_income_lakh: r.get(k + 1),
                avg_household_size: r.get(k + 2),
                avg_overall_risk: r.get(k + 3),
            }
        })
        .collect())
}

/// This cluster's partials of the users matching `filters`, grouped by
/// `dimensions`, read from the tables, every group however small: what a store
/// with several clusters merges ([`crate::stats::merge`]) so that small groups
/// are suppressed by their totals across clusters. Same sums as the stats
/// views, so both paths merge alike.
pub async fn stats_partials(
    client: &impl GenericClient,
    filters: &[Filter],
    dimensions: &[String],
) -> Result<Vec<crate::stats::Partial>, tokio_postgres::Error> {
    let w = Where::new(filters);
    let exprs: Vec<&'static str> = dimensions.iter().filter_map(|d| dimension_sql(d)).collect();
    let (select_dims, group_by) = crate::stats::grouped(&exprs);
    let sql = format!(
        "SELECT {select_dims} count(*)::int8,
                count(m.income_lakh)::int8, coalesce(sum(m.income_lakh), 0)::int8,
                count(m.household_size)::int8, coalesce(sum(m.household_size), 0)::int8,
                count(r.overall_risk)::int8, coalesce(sum(r.overall_risk * 100), 0)::int8
         FROM umstore.user_metadata m
         LEFT JOIN umstore.user_derived_attributes d
           ON d.region = m.region AND d.user_id = m.user_id
         LEFT JOIN umstore.user_risk_scores r
           ON r.region = m.region AND r.user_id = m.user_id
         WHERE {}
         {group_by}",
        w.clause()
    );
    let rows = client.query(&sql, &w.refs()).await?;
    let k = exprs.len();
    let sum = |r: &tokio_postgres::Row, i: usize| crate::stats::Sum {
        n: r.get(i),
        total: r.get(i + 1),
    };
    Ok(rows
        .iter()
        .filter(|r| r.get::<_, i64>(k) > 0)
        .map(|r| crate::stats::Partial {
            key: (0..k).map(|i| r.get::<_, Option<String>>(i)).collect(),
            users: r.get(k),
            income_lakh: sum(r, k + 1),
            household_size: sum(r, k + 3),
            overall_risk_centi: sum(r, k + 5),
        })
        .collect())
}

/// A group value as JSON: `true`/`false` for `bpl_status`, else the text.
pub(crate) fn json_text(v: Option<String>) -> Value {
    match v.as_deref() {
        None => Value::Null,
        Some("true") => Value::Bool(true),
        Some("false") => Value::Bool(false),
        Some(s) => Value::String(s.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_typed_values_and_name_what_is_expected() {
        assert_eq!(
            Filter::parse("region", "KA"),
            Ok(Filter::Region("KA".into()))
        );
        assert!(Filter::parse("region", "ka").is_err());
        assert!(Filter::parse("region", "KA' OR 1=1").is_err());
        assert_eq!(Filter::parse("age_min", "18"), Ok(Filter::AgeMin(18)));
        assert!(Filter::parse("age_max", "-1")
            .unwrap_err()
            .contains("0 to 130"));
        assert!(Filter::parse("gender", "robot")
            .unwrap_err()
            .contains("female"));
        assert!(Filter::parse("risk_above", "1.5").is_err());
        assert!(Filter::parse("eligible_for", "PM KISAN").is_err());
        assert_eq!(
            Filter::parse("state", "कर्नाटक"),
            Ok(Filter::State("कर्नाटक".into()))
        );
    }

    #[test]
    fn every_dimension_has_a_column() {
        for d in DIMENSIONS {
            assert!(dimension_sql(d).is_some(), "{d}");
        }
    }
}
