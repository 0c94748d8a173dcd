//! The inbound event contract (docs/events.md): an envelope and one payload per
//! type, parsed strictly (unknown fields refused, ranges, region codes, dates).
//!
//! A rejection names the JSON path and what is wrong, and never repeats a value
//! of a personal-data field: the reason goes to the dead-letter subject and the
//! logs.

use chrono::{DateTime, NaiveDate, SubsecRound, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

/// The schema version this binary reads.
pub const SCHEMA_VERSION: u32 = 1;

/// How far in the future an `occurred_at` may lie (clock skew between producers).
pub const MAX_CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);

/// The payload fields that hold personal data: their values never appear in a
/// rejection reason.
pub const PII_FIELDS: [&str; 7] = [
    "full_name",
    "date_of_birth",
    "district",
    "pincode",
    "phone",
    "identity_token",
    "annual_income",
];

/// The event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
    /// A new user (or every field of one, replaced).
    MetadataCreated,
    /// Some fields of a user changed.
    MetadataUpdated,
    /// The AI core scored a user.
    RiskScoresComputed,
    /// The rules engine decided a user's eligibility for schemes.
    EligibilityComputed,
}

impl EventType {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::MetadataCreated => "METADATA_CREATED",
            EventType::MetadataUpdated => "METADATA_UPDATED",
            EventType::RiskScoresComputed => "RISK_SCORES_COMPUTED",
            EventType::EligibilityComputed => "ELIGIBILITY_COMPUTED",
        }
    }
}

/// A parsed, valid event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Unique per event; a redelivery carries the same id.
    pub event_id: Uuid,
    /// When the change happened at its source.
    pub occurred_at: DateTime<Utc>,
    /// The user.
    pub user_id: Uuid,
    /// The user's region (one of the 36 codes).
    pub region: &'static str,
    /// The producer (`metadata-engine`, `ai-core`, `rules-engine`, ...).
    pub source: String,
    /// What happened.
    pub body: Body,
}

impl Event {
    /// The event's type.
    pub fn event_type(&self) -> EventType {
        match self.body {
            Body::MetadataCreated(_) => EventType::MetadataCreated,
            Body::MetadataUpdated(_) => EventType::MetadataUpdated,
            Body::RiskScores(_) => EventType::RiskScoresComputed,
            Body::Eligibility(_) => EventType::EligibilityComputed,
        }
    }
}

/// The payload, by type.
#[derive(Debug, Clone)]
pub enum Body {
    /// Every field: [`MetadataFields`] as a patch that sets the required fields
    /// and sets or clears every other.
    MetadataCreated(MetadataPatch),
    /// The fields present change; `null` clears an optional field.
    MetadataUpdated(MetadataPatch),
    /// Risk scores.
    RiskScores(RiskScores),
    /// Eligibility per scheme.
    Eligibility(Eligibility),
}

/// A personal-data text value: plaintext, or already encrypted by the Metadata
/// Engine under the Vault transit key (`vault:v<N>:...`). Never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct PiiText(pub String);

impl std::fmt::Debug for PiiText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PiiText(<redacted>)")
    }
}

/// Gender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Gender {
    Female,
    Male,
    Transgender,
    Undisclosed,
}

/// Marital status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum MaritalStatus {
    Single,
    Married,
    Widowed,
    Divorced,
    Separated,
}

/// Rural or urban.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum AreaType {
    Rural,
    Urban,
}

/// Social category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum SocialCategory {
    General,
    Obc,
    Sc,
    St,
}

/// Employment type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum EmploymentType {
    Salaried,
    SelfEmployed,
    Agriculture,
    DailyWage,
    Unemployed,
    Student,
    Retired,
    Homemaker,
}

/// Ration card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum RationCard {
    None,
    Apl,
    Bpl,
    Aay,
}

macro_rules! wire_names {
    ($($ty:ident { $($variant:ident => $name:literal),+ $(,)? })+) => {$(
        impl $ty {
            /// The value as stored (the schema's check constraint).
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }
    )+};
}

wire_names! {
    Gender { Female => "female", Male => "male", Transgender => "transgender", Undisclosed => "undisclosed" }
    MaritalStatus { Single => "single", Married => "married", Widowed => "widowed", Divorced => "divorced", Separated => "separated" }
    AreaType { Rural => "rural", Urban => "urban" }
    SocialCategory { General => "general", Obc => "obc", Sc => "sc", St => "st" }
    EmploymentType {
        Salaried => "salaried", SelfEmployed => "self_employed", Agriculture => "agriculture",
        DailyWage => "daily_wage", Unemployed => "unemployed", Student => "student",
        Retired => "retired", Homemaker => "homemaker",
    }
    RationCard { None => "none", Apl => "apl", Bpl => "bpl", Aay => "aay" }
}

/// The fields of `METADATA_CREATED`. The first seven are required (the derived
/// attributes are computed from them); the rest may be absent or `null`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataFields {
    /// Full name (personal data; plaintext or transit ciphertext).
    pub full_name: PiiText,
    /// Date of birth, `YYYY-MM-DD` (personal data; plaintext only: the derived
    /// attributes need it).
    pub date_of_birth: NaiveDate,
    /// Gender.
    pub gender: Gender,
    /// Annual income in whole rupees (personal data; plaintext only).
    pub annual_income: i64,
    /// People in the household, the user included (1–50).
    pub household_size: i16,
    /// Employment type.
    pub employment_type: EmploymentType,
    /// Ration card.
    pub ration_card: RationCard,
    /// Marital status.
    #[serde(default)]
    pub marital_status: Option<MaritalStatus>,
    /// District (personal data).
    #[serde(default)]
    pub district: Option<PiiText>,
    /// Six-digit postal code (personal data).
    #[serde(default)]
    pub pincode: Option<PiiText>,
    /// Rural or urban.
    #[serde(default)]
    pub area_type: Option<AreaType>,
    /// Social category.
    #[serde(default)]
    pub social_category: Option<SocialCategory>,
    /// Registered disability (absent: false).
    #[serde(default)]
    pub disability: Option<bool>,
    /// Mobile number (personal data).
    #[serde(default)]
    pub phone: Option<PiiText>,
    /// Tokenised national identity number (personal data; blind-indexed).
    #[serde(default)]
    pub identity_token: Option<PiiText>,
    /// Occupation, free text (up to 100 characters).
    #[serde(default)]
    pub occupation: Option<String>,
    /// Land held, in acres (two decimals).
    #[serde(default)]
    pub land_holding_acres: Option<f64>,
    /// Whether the user has a bank account.
    #[serde(default)]
    pub has_bank_account: Option<bool>,
    /// Dependents (0–50).
    #[serde(default)]
    pub dependents: Option<i16>,
    /// Children in the household (0–30).
    #[serde(default)]
    pub children: Option<i16>,
    /// Members aged 60 or more (0–30).
    #[serde(default)]
    pub senior_members: Option<i16>,
    /// Whether the user heads the household.
    #[serde(default)]
    pub head_of_household: Option<bool>,
}

/// A field of `METADATA_UPDATED`: absent (unchanged), `null` (cleared) or a value.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Change<T> {
    /// Not in the event: unchanged.
    #[default]
    Absent,
    /// `null`: cleared.
    Clear,
    /// A new value.
    Set(T),
}

impl<T> Change<T> {
    /// Whether the event carries this field.
    pub fn is_present(&self) -> bool {
        !matches!(self, Change::Absent)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Change<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Change::Clear,
            Some(v) => Change::Set(v),
        })
    }
}

/// The fields of `METADATA_UPDATED`: at least one; the required fields of
/// [`MetadataFields`] cannot be cleared.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct MetadataPatch {
    #[serde(default)]
    pub full_name: Change<PiiText>,
    #[serde(default)]
    pub date_of_birth: Change<NaiveDate>,
    #[serde(default)]
    pub gender: Change<Gender>,
    #[serde(default)]
    pub annual_income: Change<i64>,
    #[serde(default)]
    pub household_size: Change<i16>,
    #[serde(default)]
    pub employment_type: Change<EmploymentType>,
    #[serde(default)]
    pub ration_card: Change<RationCard>,
    #[serde(default)]
    pub marital_status: Change<MaritalStatus>,
    #[serde(default)]
    pub district: Change<PiiText>,
    #[serde(default)]
    pub pincode: Change<PiiText>,
    #[serde(default)]
    pub area_type: Change<AreaType>,
    #[serde(default)]
    pub social_category: Change<SocialCategory>,
    #[serde(default)]
    pub disability: Change<bool>,
    #[serde(default)]
    pub phone: Change<PiiText>,
    #[serde(default)]
    pub identity_token: Change<PiiText>,
    #[serde(default)]
    pub occupation: Change<String>,
    #[serde(default)]
    pub land_holding_acres: Change<f64>,
    #[serde(default)]
    pub has_bank_account: Change<bool>,
    #[serde(default)]
    pub dependents: Change<i16>,
    #[serde(default)]
    pub children: Change<i16>,
    #[serde(default)]
    pub senior_members: Change<i16>,
    #[serde(default)]
    pub head_of_household: Change<bool>,
}

impl From<MetadataFields> for MetadataPatch {
    /// Every field set (absent optional fields cleared): what `METADATA_CREATED`
    /// applies.
    fn from(f: MetadataFields) -> Self {
        fn opt<T>(v: Option<T>) -> Change<T> {
            v.map_or(Change::Clear, Change::Set)
        }
        MetadataPatch {
            full_name: Change::Set(f.full_name),
            date_of_birth: Change::Set(f.date_of_birth),
            gender: Change::Set(f.gender),
            annual_income: Change::Set(f.annual_income),
            household_size: Change::Set(f.household_size),
            employment_type: Change::Set(f.employment_type),
            ration_card: Change::Set(f.ration_card),
            marital_status: opt(f.marital_status),
            district: opt(f.district),
            pincode: opt(f.pincode),
            area_type: opt(f.area_type),
            social_category: opt(f.social_category),
            disability: Change::Set(f.disability.unwrap_or(false)),
            phone: opt(f.phone),
            identity_token: opt(f.identity_token),
            occupation: opt(f.occupation),
            land_holding_acres: opt(f.land_holding_acres),
            has_bank_account: opt(f.has_bank_account),
            dependents: opt(f.dependents),
            children: opt(f.children),
            senior_members: opt(f.senior_members),
            head_of_household: opt(f.head_of_household),
        }
    }
}

/// `RISK_SCORES_COMPUTED`: each score 0–1 (stored to two decimals).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RiskScores {
    pub financial_risk: f64,
    pub deadline_risk: f64,
    pub benefit_loss_risk: f64,
    pub overall_risk: f64,
    /// The model that computed them (1–64 characters).
    pub model_version: String,
    /// When they were computed (an older computation never overwrites a newer one).
    pub computed_at: DateTime<Utc>,
}

/// `ELIGIBILITY_COMPUTED`: the rules engine's decisions for some schemes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eligibility {
    /// When they were computed; they expire `eligibilityCacheTTL` later.
    pub computed_at: DateTime<Utc>,
    /// The rules that decided (optional, up to 64 characters).
    #[serde(default)]
    pub rules_version: Option<String>,
    /// One decision per scheme (1–500, each scheme once).
    pub results: Vec<SchemeResult>,
}

/// One scheme's decision.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemeResult {
    /// `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$`.
    pub scheme_id: String,
    /// Eligible or not.
    pub eligible: bool,
    /// Confidence 0–1 (optional).
    #[serde(default)]
    pub score: Option<f64>,
    /// Why, in words (up to 20, each up to 500 characters).
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// The envelope as it arrives.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    event_id: Uuid,
    event_type: String,
    occurred_at: DateTime<Utc>,
    user_id: Uuid,
    region: String,
    source: String,
    schema_version: u32,
    payload: serde_json::Value,
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Not JSON, or not an object of the envelope's shape.
    #[error("malformed event: {0}")]
    Malformed(String),
    /// An `event_type` this version does not know.
    #[error("unknown event_type {0:?}: expected one of METADATA_CREATED, METADATA_UPDATED, RISK_SCORES_COMPUTED, ELIGIBILITY_COMPUTED")]
    UnknownType(String),
    /// Well-formed but not valid (a range, a region, a date, a missing field).
    #[error("invalid event: {0}")]
    Invalid(String),
    /// Valid, but the store cannot apply it (an unknown or erased user, a region
    /// that is not the user's).
    #[error("event cannot be applied: {0}")]
    Unappliable(String),
}

impl Rejection {
    /// A short, stable code for the dead-letter header and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "malformed",
            Rejection::UnknownType(_) => "unknown_type",
            Rejection::Invalid(_) => "invalid",
            Rejection::Unappliable(_) => "unappliable",
        }
    }
}

/// The event's id, if the bytes carry a readable one (for reporting a rejection).
pub fn peek_event_id(bytes: &[u8]) -> Option<Uuid> {
    #[derive(Deserialize)]
    struct Id {
        event_id: Uuid,
    }
    serde_json::from_slice::<Id>(bytes)
        .ok()
        .map(|id| id.event_id)
}

/// Parses and validates one event, as of `now`.
pub fn parse(bytes: &[u8], now: DateTime<Utc>) -> Result<Event, Rejection> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Rejection::Malformed(format!("not JSON: {e}")))?;
    from_value(value, now)
}

/// [`parse`] for an already decoded JSON value (one element of an HTTP batch).
pub fn from_value(value: serde_json::Value, now: DateTime<Utc>) -> Result<Event, Rejection> {
    if !value.is_object() {
        return Err(Rejection::Malformed(
            "an event is a JSON object with event_id, event_type, occurred_at, user_id, region, \
             source, schema_version and payload"
                .into(),
        ));
    }
    let env: Envelope = typed(value, "").map_err(Rejection::Malformed)?;
    let event_type = match env.event_type.as_str() {
        "METADATA_CREATED" => EventType::MetadataCreated,
        "METADATA_UPDATED" => EventType::MetadataUpdated,
        "RISK_SCORES_COMPUTED" => EventType::RiskScoresComputed,
        "ELIGIBILITY_COMPUTED" => EventType::EligibilityComputed,
        other => return Err(Rejection::UnknownType(other.chars().take(64).collect())),
    };
    let invalid = |m: String| Rejection::Invalid(m);
    if env.schema_version != SCHEMA_VERSION {
        return Err(invalid(format!(
            "schema_version {} is not supported: this data plane reads version {SCHEMA_VERSION}",
            env.schema_version
        )));
    }
    let region = umstore_migrations::regions::region(&env.region)
        .map(|r| r.code)
        .ok_or_else(|| {
            invalid(format!(
                "region {:?} is not one of the 36 region codes (two capital letters, e.g. KA, UP)",
                env.region.chars().take(8).collect::<String>()
            ))
        })?;
    if env.occurred_at > now + MAX_CLOCK_SKEW {
        return Err(invalid(format!(
            "occurred_at {} is more than {} minutes in the future; check the producer's clock",
            env.occurred_at.to_rfc3339(),
            MAX_CLOCK_SKEW.num_minutes()
        )));
    }
    check_token("source", &env.source, 64)?;
    if env.user_id.is_nil() || env.event_id.is_nil() {
        return Err(invalid(
            "event_id and user_id must not be the nil UUID".into(),
        ));
    }
    let payload = env.payload;
    if !payload.is_object() {
        return Err(Rejection::Malformed("payload must be a JSON object".into()));
    }
    let body = match event_type {
        EventType::MetadataCreated => {
            let fields: MetadataFields = typed(payload, "payload").map_err(invalid)?;
            let patch = MetadataPatch::from(fields);
            check_patch(&patch, now)?;
            Body::MetadataCreated(patch)
        }
        EventType::MetadataUpdated => {
            let patch: MetadataPatch = typed(payload, "payload").map_err(invalid)?;
            check_required_not_cleared(&patch)?;
            check_patch(&patch, now)?;
            if !patch_has_any(&patch) {
                return Err(invalid(
                    "payload names no field: METADATA_UPDATED carries the fields that changed"
                        .into(),
                ));
            }
            Body::MetadataUpdated(patch)
        }
        EventType::RiskScoresComputed => {
            let mut r: RiskScores = typed(payload, "payload").map_err(invalid)?;
            r.computed_at = r.computed_at.trunc_subsecs(6);
            for (name, v) in [
                ("financial_risk", r.financial_risk),
                ("deadline_risk", r.deadline_risk),
                ("benefit_loss_risk", r.benefit_loss_risk),
                ("overall_risk", r.overall_risk),
            ] {
                check_unit(&format!("payload.{name}"), v)?;
            }
            check_token("payload.model_version", &r.model_version, 64)?;
            check_not_future("payload.computed_at", r.computed_at, now)?;
            Body::RiskScores(r)
        }
        EventType::EligibilityComputed => {
            let mut e: Eligibility = typed(payload, "payload").map_err(invalid)?;
            e.computed_at = e.computed_at.trunc_subsecs(6);
            check_not_future("payload.computed_at", e.computed_at, now)?;
            if let Some(v) = &e.rules_version {
                check_token("payload.rules_version", v, 64)?;
            }
            if e.results.is_empty() || e.results.len() > 500 {
                return Err(invalid(format!(
                    "payload.results has {} entries: send 1 to 500 per event",
                    e.results.len()
                )));
            }
            let mut seen = std::collections::HashSet::new();
            for (i, r) in e.results.iter().enumerate() {
                let at = format!("payload.results[{i}]");
                if !scheme_id_ok(&r.scheme_id) {
                    return Err(invalid(format!(
                        "{at}.scheme_id must match ^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,127}}$"
                    )));
                }
                if !seen.insert(r.scheme_id.as_str()) {
                    return Err(invalid(format!(
                        "{at}.scheme_id {:?} appears twice; send each scheme once",
                        r.scheme_id
                    )));
                }
                if let Some(s) = r.score {
                    check_unit(&format!("{at}.score"), s)?;
                }
                if r.reasons.len() > 20 || r.reasons.iter().any(|s| s.chars().count() > 500) {
                    return Err(invalid(format!(
                        "{at}.reasons: at most 20 reasons of at most 500 characters each"
                    )));
                }
            }
            Body::Eligibility(e)
        }
    };
    Ok(Event {
        event_id: env.event_id,
        // Kept to the microsecond, as PostgreSQL stores it: ordering is decided on
        // what is stored.
        occurred_at: env.occurred_at.trunc_subsecs(6),
        user_id: env.user_id,
        region,
        source: env.source,
        body,
    })
}

/// Deserializes `value` into `T`, naming the JSON path of what failed; a
/// personal-data field's value is never repeated.
fn typed<T: DeserializeOwned>(value: serde_json::Value, prefix: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = match (prefix, path.as_str()) {
            ("", p) => p.to_owned(),
            (pre, ".") => pre.to_owned(),
            (pre, p) => format!("{pre}.{p}"),
        };
        let leaf = path.rsplit('.').next().unwrap_or("");
        let inner = e.into_inner().to_string();
        // serde_json appends " at line L column C", meaningless for a value.
        let inner = inner.split(" at line ").next().unwrap_or(&inner).to_owned();
        if PII_FIELDS.contains(&leaf) {
            format!(
                "{path}: not a valid value (personal data, not shown): expected {}",
                pii_expectation(leaf)
            )
        } else if inner.starts_with("missing field") || inner.starts_with("unknown field") {
            if path == "." || path.is_empty() || path == prefix {
                inner
            } else {
                format!("{path}: {inner}")
            }
        } else {
            format!("{path}: {inner}")
        }
    })
}

fn pii_expectation(field: &str) -> &'static str {
    match field {
        "date_of_birth" => "a date YYYY-MM-DD",
        "annual_income" => "a whole number of rupees",
        _ => "a string",
    }
}

fn check_token(path: &str, value: &str, max: usize) -> Result<(), Rejection> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
    if ok {
        Ok(())
    } else {
        Err(Rejection::Invalid(format!(
            "{path} must be 1 to {max} characters of letters, digits, '-', '_', '.', ':' or '/'"
        )))
    }
}

fn check_unit(path: &str, v: f64) -> Result<(), Rejection> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(Rejection::Invalid(format!(
            "{path} is {v}: scores are between 0 and 1"
        )))
    }
}

fn check_not_future(path: &str, at: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), Rejection> {
    if at > now + MAX_CLOCK_SKEW {
        return Err(Rejection::Invalid(format!(
            "{path} {} is in the future; check the producer's clock",
            at.to_rfc3339()
        )));
    }
    Ok(())
}

fn scheme_id_ok(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
}

fn check_required_not_cleared(p: &MetadataPatch) -> Result<(), Rejection> {
    let cleared = [
        ("full_name", matches!(p.full_name, Change::Clear)),
        ("date_of_birth", matches!(p.date_of_birth, Change::Clear)),
        ("gender", matches!(p.gender, Change::Clear)),
        ("annual_income", matches!(p.annual_income, Change::Clear)),
        ("household_size", matches!(p.household_size, Change::Clear)),
        (
            "employment_type",
            matches!(p.employment_type, Change::Clear),
        ),
        ("ration_card", matches!(p.ration_card, Change::Clear)),
        ("disability", matches!(p.disability, Change::Clear)),
    ];
    match cleared.iter().find(|(_, c)| *c) {
        Some((name, _)) => Err(Rejection::Invalid(format!(
            "payload.{name} cannot be null: it is required; send a value or leave it out"
        ))),
        None => Ok(()),
    }
}

fn patch_has_any(p: &MetadataPatch) -> bool {
    let MetadataPatch {
        full_name,
        date_of_birth,
        gender,
        annual_income,
        household_size,
        employment_type,
        ration_card,
        marital_status,
        district,
        pincode,
        area_type,
        social_category,
        disability,
        phone,
        identity_token,
        occupation,
        land_holding_acres,
        has_bank_account,
        dependents,
        children,
        senior_members,
        head_of_household,
    } = p;
    [
        full_name.is_present(),
        date_of_birth.is_present(),
        gender.is_present(),
        annual_income.is_present(),
        household_size.is_present(),
        employment_type.is_present(),
        ration_card.is_present(),
        marital_status.is_present(),
        district.is_present(),
        pincode.is_present(),
        area_type.is_present(),
        social_category.is_present(),
        disability.is_present(),
        phone.is_present(),
        identity_token.is_present(),
        occupation.is_present(),
        land_holding_acres.is_present(),
        has_bank_account.is_present(),
        dependents.is_present(),
        children.is_present(),
        senior_members.is_present(),
        head_of_household.is_present(),
    ]
    .into_iter()
    .any(|b| b)
}

/// Ranges and formats of the fields a patch sets.
fn check_patch(p: &MetadataPatch, now: DateTime<Utc>) -> Result<(), Rejection> {
    let bad = |m: String| Err(Rejection::Invalid(m));
    let range = |name: &str, c: &Change<i16>, lo: i16, hi: i16| match c {
        Change::Set(v) if !(lo..=hi).contains(v) => {
            bad(format!("payload.{name} is {v}: expected {lo} to {hi}"))
        }
        _ => Ok(()),
    };
    range("household_size", &p.household_size, 1, 50)?;
    range("dependents", &p.dependents, 0, 50)?;
    range("children", &p.children, 0, 30)?;
    range("senior_members", &p.senior_members, 0, 30)?;
    if let Change::Set(d) = p.date_of_birth {
        let earliest = NaiveDate::from_ymd_opt(1900, 1, 1).unwrap_or_default();
        if d < earliest || d > now.date_naive() {
            return bad(
                "payload.date_of_birth (not shown) must lie between 1900-01-01 and today".into(),
            );
        }
    }
    if let Change::Set(income) = p.annual_income {
        if !(0..=1_000_000_000_000).contains(&income) {
            return bad(
                "payload.annual_income (not shown) must be 0 to 1,000,000,000,000 rupees".into(),
            );
        }
    }
    if let Change::Set(acres) = p.land_holding_acres {
        if !acres.is_finite() || !(0.0..=100_000.0).contains(&acres) {
            return bad(format!(
                "payload.land_holding_acres is {acres}: expected 0 to 100000"
            ));
        }
    }
    if let Change::Set(o) = &p.occupation {
        if o.trim().is_empty() || o.chars().count() > 100 {
            return bad("payload.occupation must be 1 to 100 characters".into());
        }
    }
    let text = |name: &str, c: &Change<PiiText>, check: fn(&str) -> bool, what: &str| {
        match c {
        Change::Set(PiiText(v)) if !is_transit_ciphertext(v) && !check(v) => bad(format!(
            "payload.{name} (not shown) must be {what}, or Vault transit ciphertext (vault:v<N>:...)"
        )),
        _ => Ok(()),
    }
    };
    text(
        "full_name",
        &p.full_name,
        |v| !v.trim().is_empty() && v.chars().count() <= 200,
        "1 to 200 characters",
    )?;
    text(
        "district",
        &p.district,
        |v| !v.trim().is_empty() && v.chars().count() <= 100,
        "1 to 100 characters",
    )?;
    text(
        "pincode",
        &p.pincode,
        |v| v.len() == 6 && v.bytes().all(|b| b.is_ascii_digit()) && !v.starts_with('0'),
        "six digits, not starting with 0",
    )?;
    text(
        "phone",
        &p.phone,
        |v| {
            let digits = v.strip_prefix("+91").unwrap_or(v);
            digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit())
        },
        "ten digits, optionally after +91",
    )?;
    text(
        "identity_token",
        &p.identity_token,
        |v| (8..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()),
        "8 to 128 printable ASCII characters",
    )?;
    Ok(())
}

/// Whether `v` is Vault transit ciphertext (`vault:v<N>:<base64>`).
pub fn is_transit_ciphertext(v: &str) -> bool {
    // `vault:v<N>:<standard base64>`, as the schemas' `transit_ciphertext` says:
    // a plaintext that merely starts `vault:v1` stays plaintext and is checked as such.
    let Some(rest) = v.strip_prefix("vault:v") else {
        return false;
    };
    let Some((version, body)) = rest.split_once(':') else {
        return false;
    };
    let digits = !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit());
    let data = body.trim_end_matches('=');
    digits
        && !data.is_empty()
        && body.len() - data.len() <= 2
        && data
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}
