//! The API's response bodies, as typed values: what the handlers serialize and
//! what the OpenAPI document (`/openapi.json`, docs/openapi.json) describes.

use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::store::query::{Group, Match};
use crate::store::reads::{Change, Derived, Eligibility, RiskScores};
use crate::store::users::Pii;

/// Every error: a stable code, what to do, and the schema version.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// `unauthorized`, `forbidden`, `invalid_user_id`, `invalid_parameter`,
    /// `unknown_parameter`, `invalid_filter`, `no_filter`, `invalid_header`,
    /// `not_found`, `erased`, `unavailable`, `internal`, and for
    /// `POST /api/v1/events` also `too_large`, `malformed`, `bad_batch`,
    /// `not_ready`.
    pub error: String,
    /// What is wrong and what to do about it.
    pub detail: String,
    /// The schema version the server reads.
    pub schema_version: u32,
}

/// A user's non-PII attributes, as stored.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Attributes {
    /// Year of birth (from the date of birth).
    pub birth_year: Option<i32>,
    /// `female`, `male`, `transgender`, `undisclosed`.
    pub gender: Option<String>,
    /// Marital status.
    pub marital_status: Option<String>,
    /// `rural` or `urban`.
    pub area_type: Option<String>,
    /// `general`, `obc`, `sc`, `st`.
    pub social_category: Option<String>,
    /// Has a disability.
    pub disability: bool,
    /// Annual income in whole lakh INR (from the annual income).
    pub income_lakh: Option<i64>,
    /// Occupation.
    pub occupation: Option<String>,
    /// Employment type.
    pub employment_type: Option<String>,
    /// Land holding, acres.
    pub land_holding_acres: Option<f64>,
    /// Holds a bank account.
    pub has_bank_account: Option<bool>,
    /// Ration card (`apl`, `bpl`, `aay`, `none`).
    pub ration_card: Option<String>,
    /// Household size.
    pub household_size: Option<i32>,
    /// Dependents.
    pub dependents: Option<i32>,
    /// Children.
    pub children: Option<i32>,
    /// Members 60 or older.
    pub senior_members: Option<i32>,
    /// Head of the household.
    pub head_of_household: Option<bool>,
}

/// `GET /api/v1/user-metadata/{user_id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserMetadata {
    /// The schema version the server reads.
    pub schema_version: u32,
    /// The user.
    pub user_id: Uuid,
    /// Region (state or union territory) code.
    pub region: String,
    /// Row version (1 when created, one more per change).
    pub version: i64,
    /// The last change (at or before `as_of` when given).
    pub updated_at: String,
    /// The time asked for, when the answer is "as of" it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of: Option<String>,
    /// Whether `pii` is included (the caller's purpose may see PII).
    pub pii_included: bool,
    /// Personal data, decrypted (only when `pii_included`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pii: Option<Pii>,
    /// Everything else.
    pub attributes: Attributes,
}

/// `GET /api/v1/user-metadata/{user_id}/derived`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DerivedBody {
    /// The schema version the server reads.
    pub schema_version: u32,
    /// The user.
    pub user_id: Uuid,
    /// Region code.
    pub region: String,
    /// Derived attributes; null until computed.
    pub derived: Option<Derived>,
}

/// `GET /api/v1/user-metadata/{user_id}/risk-scores`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RiskScoresBody {
    /// The schema version the server reads.
    pub schema_version: u32,
    /// The user.
    pub user_id: Uuid,
    /// Region code.
    pub region: String,
    /// The AI core's scores; null until computed.
    pub risk_scores: Option<RiskScores>,
}

/// `GET /api/v1/user-metadata/{user_id}/eligibility`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EligibilityBody {
    /// The schema version the server reads.
    pub schema_version: u32,
    /// The user.
    pub user_id: Uuid,
    /// Region code.
    pub region: String,
    /// Unexpired results (none: a cache miss; ask the rules engine).
    pub eligibility: Vec<Eligibility>,
}

/// `GET /api/v1/user-metadata/{user_id}/history`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryBody {
    /// The schema version the server reads.
    pub schema_version: u32,
    /// The user.
    pub user_id: Uuid,
    /// Region code.
    pub region: String,
    /// Whether PII values are shown (else they are left out of the values).
    pub pii_included: bool,
    /// Changes, newest first.
    pub changes: Vec<Change>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// `GET /api/v1/user-metadata/query`.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueryBody {
    /// The schema version the server reads.
    pub schema_version: u32,
    /// Matching users in (region, user id) order.
    pub users: Vec<Match>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// `GET /api/v1/user-metadata/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsBody {
    /// The schema version the server reads.
    pub schema_version: u32,
    /// The dimensions grouped by, in order.
    pub group_by: Vec<String>,
    /// Groups with fewer users than this are left out.
    pub min_group_size: i64,
    /// The groups shown.
    pub groups: Vec<Group>,
}

/// One event's result in `POST /api/v1/events`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Settled {
    /// The event's id, when it had a readable one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<Uuid>,
    /// `applied`, `duplicate`, `stale`, `rejected` or `failed`.
    pub status: &'static str,
    /// The user's row version after an applied metadata event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// Why it was rejected or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `POST /api/v1/events`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventsBody {
    /// One per event, in order.
    pub results: Vec<Settled>,
    /// The WAL position to send as `X-Min-Lsn` to read these writes; null
    /// when nothing was applied.
    pub lsn: Option<String>,
    /// The schema version the server reads.
    pub schema_version: u32,
}
