//! What the read API serves besides the metadata itself: derived attributes,
//! risk scores, the eligibility cache and the change history of one user. Each
//! query reads the user's row too (its region found first in the directory, then
//! one region's partition), so an unknown user and an erased one are told apart
//! from a user with nothing computed yet.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_postgres::Row;

use super::reader::Reader;
use uuid::Uuid;

use super::users::ReadError;

const DERIVED: &str = "SELECT u.region::text, u.erased_at::text, d.age_group, d.income_bracket,
        d.life_stage, d.employment_category, d.bpl_status, d.tax_bracket, d.is_senior_citizen,
        d.is_farmer, d.per_capita_income_lakh::float8, d.computed_at::text, d.source_version
     FROM umstore.user_metadata u
     LEFT JOIN umstore.user_derived_attributes d ON d.region = u.region AND d.user_id = u.user_id
     WHERE u.region = $2 AND u.user_id = $1";

const RISK: &str = "SELECT u.region::text, u.erased_at::text, r.financial_risk::float8,
        r.deadline_risk::float8, r.benefit_loss_risk::float8, r.overall_risk::float8,
        r.model_version, r.computed_at::text
     FROM umstore.user_metadata u
     LEFT JOIN umstore.user_risk_scores r ON r.region = u.region AND r.user_id = u.user_id
     WHERE u.region = $2 AND u.user_id = $1";

/// Unexpired entries only; `$3` narrows to one scheme when not null.
const ELIGIBILITY: &str = "SELECT u.region::text, u.erased_at::text, e.scheme_id, e.eligible,
        e.score::float8, e.reasons, e.rules_version, e.computed_at::text, e.expires_at::text
     FROM umstore.user_metadata u
     LEFT JOIN umstore.user_eligibility_cache e ON e.region = u.region AND e.user_id = u.user_id
        AND e.expires_at > now() AND ($3::text IS NULL OR e.scheme_id = $3)
     WHERE u.region = $2 AND u.user_id = $1
     ORDER BY e.scheme_id";

const USER: &str = "SELECT region::text, erased_at::text FROM umstore.user_metadata
     WHERE region = $2 AND user_id = $1";

/// The directory: which region holds a user. Looked up first, on its own, so that
/// each query after it names the region as a constant and stays on one shard when
/// the tables are distributed by region (Citus cannot route a query whose region is
/// computed by a function reading another distributed table).
const REGION: &str = "SELECT region::text FROM umstore.user_directory WHERE user_id = $1";

/// The region holding `user_id`, or `None` for an unknown user.
pub async fn region_of(client: &impl Reader, user_id: Uuid) -> Result<Option<String>, ReadError> {
    if let Some(region) = client.region_hint(user_id) {
        return Ok(Some(region));
    }
    Ok(client
        .query_opt(REGION, &[&user_id])
        .await
        .map_err(db(user_id))?
        .map(|r| r.get(0)))
}

/// Newest first; `$3`/`$4` is the cursor (the last row of the previous page),
/// `$5` the page size plus one (to know whether another page follows).
const HISTORY: &str = "SELECT id, change_type, changed_fields, old_values, new_values, changed_by,
        event_id, version, changed_at::text AS changed_at_text, changed_at
     FROM umstore.user_metadata_history
     WHERE region = $1 AND user_id = $2
       AND ($3::timestamptz IS NULL OR (changed_at, id) < ($3::timestamptz, $4::int8))
     ORDER BY changed_at DESC, id DESC
     LIMIT $5";

/// A position in a user's history: a change's time and id. Its text form,
/// `<microseconds since the epoch>.<id>`, is what pages hand back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The change's time.
    pub changed_at: DateTime<Utc>,
    /// The change's id.
    pub id: i64,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.changed_at.timestamp_micros(), self.id)
    }
}

impl std::str::FromStr for Cursor {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (micros, id) = s.split_once('.').ok_or(())?;
        let changed_at =
            DateTime::from_timestamp_micros(micros.parse().map_err(|_| ())?).ok_or(())?;
        Ok(Self {
            changed_at,
            id: id.parse().map_err(|_| ())?,
        })
    }
}

/// A user as far as these reads care: where they live and whether erased.
#[derive(Debug, Clone)]
pub struct Found<T> {
    /// The user's region.
    pub region: String,
    /// When they were erased, if they were.
    pub erased_at: Option<String>,
    /// What was asked for.
    pub value: T,
}

/// Derived attributes (recomputed by every metadata event).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Derived {
    /// `child`, `youth`, `adult`, `senior`.
    pub age_group: String,
    /// `BPL`, `LIG`, `MIG`, `HIG`.
    pub income_bracket: String,
    /// Life stage.
    pub life_stage: String,
    /// Employment category.
    pub employment_category: String,
    /// Below the poverty line.
    pub bpl_status: bool,
    /// Income tax slab (`nil`, `5` ... `30`).
    pub tax_bracket: String,
    /// 60 or older.
    pub is_senior_citizen: bool,
    /// Agricultural occupation or land holding.
    pub is_farmer: bool,
    /// Household income per member, lakh INR.
    pub per_capita_income_lakh: Option<f64>,
    /// When computed.
    pub computed_at: String,
    /// The metadata version they were computed from.
    pub source_version: i64,
}

/// Risk scores from the AI core, 0.00 to 1.00.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RiskScores {
    /// Financial risk.
    pub financial_risk: f64,
    /// Risk of missing a deadline.
    pub deadline_risk: f64,
    /// Risk of losing a benefit.
    pub benefit_loss_risk: f64,
    /// Overall.
    pub overall_risk: f64,
    /// The model that computed them.
    pub model_version: String,
    /// When.
    pub computed_at: String,
}

/// One unexpired eligibility result.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Eligibility {
    /// The scheme.
    pub scheme_id: String,
    /// Whether the user is eligible.
    pub eligible: bool,
    /// The rules engine's score, 0.00 to 1.00.
    pub score: Option<f64>,
    /// Why (the rules engine's reasons).
    #[schema(value_type = Vec<String>)]
    pub reasons: Value,
    /// The rules that decided.
    pub rules_version: Option<String>,
    /// When computed.
    pub computed_at: String,
    /// Until when it holds.
    pub expires_at: String,
}

/// One change.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Change {
    /// The change's id (per region).
    pub id: i64,
    /// `created`, `updated` or `erased`.
    pub change_type: String,
    /// The fields it changed.
    pub changed_fields: Vec<String>,
    /// Their values before (PII fields sealed, base64, until the caller opens them).
    #[schema(value_type = Object)]
    pub old_values: Map<String, Value>,
    /// Their values after.
    #[schema(value_type = Object)]
    pub new_values: Map<String, Value>,
    /// Who made it (the event's source).
    pub changed_by: String,
    /// The event that made it.
    pub event_id: Option<Uuid>,
    /// The row version it produced.
    pub version: i64,
    /// When it happened (the event's `occurred_at`).
    pub changed_at: String,
    /// Where the next page starts after this row.
    #[serde(skip)]
    #[schema(ignore)]
    pub cursor: Cursor,
}

fn db(user_id: Uuid) -> impl Fn(tokio_postgres::Error) -> ReadError {
    move |source| ReadError::Database { user_id, source }
}

fn found<T>(rows: &[Row], value: T) -> Option<Found<T>> {
    rows.first().map(|r| Found {
        region: r.get(0),
        erased_at: r.get(1),
        value,
    })
}

/// The user's derived attributes (`None` inside: not computed yet).
pub async fn derived(
    client: &impl Reader,
    user_id: Uuid,
) -> Result<Option<Found<Option<Derived>>>, ReadError> {
    let Some(region) = region_of(client, user_id).await? else {
        return Ok(None);
    };
    let rows = client
        .query(DERIVED, &[&user_id, &region])
        .await
        .map_err(db(user_id))?;
    let value = rows.first().and_then(|r| {
        Some(Derived {
            age_group: r.get::<_, Option<String>>(2)?,
            income_bracket: r.get(3),
            life_stage: r.get(4),
            employment_category: r.get(5),
            bpl_status: r.get(6),
            tax_bracket: r.get(7),
            is_senior_citizen: r.get(8),
            is_farmer: r.get(9),
            per_capita_income_lakh: r.get(10),
            computed_at: r.get(11),
            source_version: r.get(12),
        })
    });
    Ok(found(&rows, value))
}

/// The user's risk scores (`None` inside: none computed yet).
pub async fn risk_scores(
    client: &impl Reader,
    user_id: Uuid,
) -> Result<Option<Found<Option<RiskScores>>>, ReadError> {
    let Some(region) = region_of(client, user_id).await? else {
        return Ok(None);
    };
    let rows = client
        .query(RISK, &[&user_id, &region])
        .await
        .map_err(db(user_id))?;
    let value = rows.first().and_then(|r| {
        Some(RiskScores {
            financial_risk: r.get::<_, Option<f64>>(2)?,
            deadline_risk: r.get(3),
            benefit_loss_risk: r.get(4),
            overall_risk: r.get(5),
            model_version: r.get(6),
            computed_at: r.get(7),
        })
    });
    Ok(found(&rows, value))
}

/// The user's unexpired eligibility results, all or for one scheme.
pub async fn eligibility(
    client: &impl Reader,
    user_id: Uuid,
    scheme_id: Option<&str>,
) -> Result<Option<Found<Vec<Eligibility>>>, ReadError> {
    let Some(region) = region_of(client, user_id).await? else {
        return Ok(None);
    };
    let rows = client
        .query(ELIGIBILITY, &[&user_id, &region, &scheme_id])
        .await
        .map_err(db(user_id))?;
    let value = rows
        .iter()
        .filter_map(|r| {
            Some(Eligibility {
                scheme_id: r.get::<_, Option<String>>(2)?,
                eligible: r.get(3),
                score: r.get(4),
                reasons: r.get(5),
                rules_version: r.get(6),
                computed_at: r.get(7),
                expires_at: r.get(8),
            })
        })
        .collect();
    Ok(found(&rows, value))
}

/// A page of the user's history, newest first, after `cursor` (the previous
/// page's last row); `limit` rows at most, and whether more follow.
pub async fn history(
    client: &impl Reader,
    user_id: Uuid,
    cursor: Option<Cursor>,
    limit: u32,
) -> Result<Option<Found<(Vec<Change>, bool)>>, ReadError> {
    let Some(region) = region_of(client, user_id).await? else {
        return Ok(None);
    };
    let Some(user) = client
        .query_opt(USER, &[&user_id, &region])
        .await
        .map_err(db(user_id))?
    else {
        return Ok(None);
    };
    let region: String = user.get(0);
    let (at, id) = cursor.map(|c| (c.changed_at, c.id)).unzip();
    let take = i64::from(limit) + 1;
    let rows = client
        .query(HISTORY, &[&region, &user_id, &at, &id, &take])
        .await
        .map_err(db(user_id))?;
    let more = rows.len() > limit as usize;
    let object = |v: Value| match v {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let changes = rows
        .iter()
        .take(limit as usize)
        .map(|r| Change {
            id: r.get(0),
            change_type: r.get(1),
            changed_fields: r.get(2),
            old_values: object(r.get(3)),
            new_values: object(r.get(4)),
            changed_by: r.get(5),
            event_id: r.get(6),
            version: r.get(7),
            changed_at: r.get(8),
            cursor: Cursor {
                changed_at: r.get(9),
                id: r.get(0),
            },
        })
        .collect();
    Ok(Some(Found {
        region,
        erased_at: user.get(1),
        value: (changes, more),
    }))
}
