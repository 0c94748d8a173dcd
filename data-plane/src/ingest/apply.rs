//! Applying one event in one transaction, exactly once.
//!
//! Every event takes the user's transaction-scoped advisory lock first, so events
//! for one user apply one at a time whatever worker or process holds them, then
//! records its id in `processed_events` (a redelivery finds it there and changes
//! nothing). A metadata event then upserts the row (PII sealed under the user's
//! data key), recomputes the derived attributes, appends a history row (PII as
//! ciphertext), drops the user's cached eligibility and queues `METADATA_STORED`
//! and `ELIGIBILITY_CACHE_INVALIDATED` in the outbox. An event that occurred
//! before the user's current values were set is recorded as stale and changes
//! nothing else.
//!
//! With several clusters the region's write check
//! ([`crate::clusters::fence`]) runs right after the user's lock: a region
//! fenced for a move, or no longer (not yet) served by this cluster, refuses
//! the transaction before it writes anything ([`ApplyError::RegionMoving`]).

use base64::Engine as _;
use chrono::{DateTime, Datelike, Utc};
use deadpool_postgres::Transaction;
use serde_json::{json, Map, Value};
use tokio_postgres::error::SqlState;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::event::{
    is_transit_ciphertext, Body, Change, Eligibility, Event, MetadataPatch, PiiText, Rejection,
    RiskScores,
};
use crate::clusters::fence::{Refusal, RegionCheck, REGION_WRITE};
use crate::crypto::{DataKey, FieldAad, Keyring, KeyringError, UserKey};
use crate::derive::{derive_from, Inputs};

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; for a metadata event, the user's new version (`None` when the
    /// event changed no value).
    Applied {
        /// The user's version after the event.
        version: Option<i64>,
    },
    /// Applied before (a redelivery): nothing changed.
    Duplicate,
    /// Older than what the store holds: recorded, nothing else changed.
    Stale,
}

impl Outcome {
    /// `applied`, `duplicate` or `stale`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
        }
    }
}

/// Why an event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The event can never apply (dead-letter it; do not retry).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The database or the key provider failed; the event may apply on a retry.
    #[error("{0}")]
    Transient(String),
    /// Transient too, and short: the region's write check refused the write
    /// while the region moves between clusters (several clusters only). The
    /// event is retried within a second; nothing was written.
    #[error("{message}")]
    RegionMoving {
        /// Fenced (same cluster, soon) or moved (another cluster).
        refusal: Refusal,
        /// What the database said.
        message: String,
    },
}

/// What applying needs besides the event.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    /// Outbound subjects are `<subject_prefix>.out.<EVENT_TYPE>`.
    pub subject_prefix: String,
    /// How long an eligibility result stays valid (`eligibilityCacheTTL`).
    pub eligibility_ttl: chrono::Duration,
}

impl ApplyConfig {
    /// The subject an outbound event of `event_type` is published on.
    pub fn outbound_subject(&self, event_type: &str) -> String {
        format!("{}.out.{event_type}", self.subject_prefix)
    }
}

/// Classifies a database error: constraint and data errors are the event's fault
/// (rejected), anything else (connection lost, serialization, deadlock, a server
/// shutting down) may pass on a retry.
fn db_error(what: &'static str) -> impl Fn(tokio_postgres::Error) -> ApplyError {
    move |e| match e.code() {
        Some(code)
            if code.code().starts_with("22")
                || (code.code().starts_with("23") && *code != SqlState::UNIQUE_VIOLATION) =>
        {
            ApplyError::Rejected(Rejection::Invalid(format!(
                "{what}: the database refused a value ({})",
                code.code()
            )))
        }
        _ => ApplyError::Transient(format!("{what}: {e}")),
    }
}

fn keys_error(e: KeyringError) -> ApplyError {
    ApplyError::Transient(format!("the key provider: {e}"))
}

/// The advisory-lock key of a user: the first eight bytes of the id.
pub fn user_lock_key(user_id: Uuid) -> i64 {
    let b = user_id.as_bytes();
    i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

// The `pub` statements below are those a METADATA_UPDATED of a known user runs
// (in the order `apply` and `apply_metadata` give them). They are public only so
// that the write-path benchmark (benches/ingest.rs) can run the very same text
// under pgbench as its baseline; nothing else should use them.

/// The user's transaction-scoped advisory lock (`$1`: [`user_lock_key`]).
pub const LOCK_USER: &str = "SELECT pg_advisory_xact_lock($1)";
/// Records the event id; 0 rows means a redelivery.
pub const RECORD_EVENT: &str =
    "INSERT INTO umstore.processed_events (event_id, region, event_type, user_id)
     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";
const MARK_STALE: &str =
    "UPDATE umstore.processed_events SET outcome = 'stale' WHERE region = $1 AND event_id = $2";
/// The region the directory lists the user in.
pub const USER_REGION: &str = "SELECT region::text FROM umstore.user_directory WHERE user_id = $1";
const ADD_TO_DIRECTORY: &str =
    "INSERT INTO umstore.user_directory (user_id, region) VALUES ($1, $2) ON CONFLICT DO NOTHING";
/// The user's current row (PII as ciphertext).
pub const CURRENT: &str = "SELECT version, last_event_at, erased_at IS NOT NULL,
        full_name_enc, date_of_birth_enc, district_enc, pincode_enc, phone_enc,
        identity_token_enc, identity_token_bidx, annual_income_enc,
        gender, marital_status, area_type, social_category, disability, occupation,
        employment_type, land_holding_acres::float8, has_bank_account, ration_card,
        household_size, dependents, children, senior_members, head_of_household
     FROM umstore.user_metadata WHERE region = $1 AND user_id = $2";
/// Writes the user's row.
pub const UPSERT_METADATA: &str = "INSERT INTO umstore.user_metadata (user_id, region,
        full_name_enc, date_of_birth_enc, birth_year, gender, marital_status, district_enc,
        pincode_enc, area_type, social_category, disability, phone_enc, identity_token_enc,
        identity_token_bidx, annual_income_enc, income_lakh, occupation, employment_type,
        land_holding_acres, has_bank_account, ration_card, household_size, dependents, children,
        senior_members, head_of_household, version, last_event_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
        $20::float8::numeric(8, 2), $21, $22, $23, $24, $25, $26, $27, $28, $29, now())
     ON CONFLICT (region, user_id) DO UPDATE SET
        full_name_enc = EXCLUDED.full_name_enc, date_of_birth_enc = EXCLUDED.date_of_birth_enc,
        birth_year = EXCLUDED.birth_year, gender = EXCLUDED.gender,
        marital_status = EXCLUDED.marital_status, district_enc = EXCLUDED.district_enc,
        pincode_enc = EXCLUDED.pincode_enc, area_type = EXCLUDED.area_type,
        social_category = EXCLUDED.social_category, disability = EXCLUDED.disability,
        phone_enc = EXCLUDED.phone_enc, identity_token_enc = EXCLUDED.identity_token_enc,
        identity_token_bidx = EXCLUDED.identity_token_bidx,
        annual_income_enc = EXCLUDED.annual_income_enc, income_lakh = EXCLUDED.income_lakh,
        occupation = EXCLUDED.occupation, employment_type = EXCLUDED.employment_type,
        land_holding_acres = EXCLUDED.land_holding_acres,
        has_bank_account = EXCLUDED.has_bank_account, ration_card = EXCLUDED.ration_card,
        household_size = EXCLUDED.household_size, dependents = EXCLUDED.dependents,
        children = EXCLUDED.children, senior_members = EXCLUDED.senior_members,
        head_of_household = EXCLUDED.head_of_household, version = EXCLUDED.version,
        last_event_at = EXCLUDED.last_event_at, updated_at = EXCLUDED.updated_at";
const TOUCH_METADATA: &str =
    "UPDATE umstore.user_metadata SET last_event_at = $3 WHERE region = $1 AND user_id = $2";
/// Writes the user's derived attributes.
pub const UPSERT_DERIVED: &str = "INSERT INTO umstore.user_derived_attributes (user_id, region,
        age_group, income_bracket, life_stage, employment_category, bpl_status, tax_bracket,
        is_senior_citizen, is_farmer, per_capita_income_lakh, computed_at, source_version)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::float8::numeric(8, 2), now(), $12)
     ON CONFLICT (region, user_id) DO UPDATE SET
        age_group = EXCLUDED.age_group, income_bracket = EXCLUDED.income_bracket,
        life_stage = EXCLUDED.life_stage, employment_category = EXCLUDED.employment_category,
        bpl_status = EXCLUDED.bpl_status, tax_bracket = EXCLUDED.tax_bracket,
        is_senior_citizen = EXCLUDED.is_senior_citizen, is_farmer = EXCLUDED.is_farmer,
        per_capita_income_lakh = EXCLUDED.per_capita_income_lakh,
        computed_at = EXCLUDED.computed_at, source_version = EXCLUDED.source_version";
/// Appends a history row.
pub const APPEND_HISTORY: &str = "INSERT INTO umstore.user_metadata_history (user_id, region,
        change_type, changed_fields, old_values, new_values, changed_by, event_id, version,
        changed_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
/// Drops the user's cached eligibility.
pub const INVALIDATE_ELIGIBILITY: &str =
    "DELETE FROM umstore.user_eligibility_cache WHERE region = $1 AND user_id = $2";
/// Queues `METADATA_STORED` and `ELIGIBILITY_CACHE_INVALIDATED`.
pub const QUEUE_OUTBOX: &str =
    "INSERT INTO umstore.outbox (region, user_id, subject, msg_id, payload)
     VALUES ($1, $2, $3, $4, $5), ($1, $2, $6, $7, $8)";
const USER_STATE: &str =
    "SELECT erased_at IS NOT NULL FROM umstore.user_metadata WHERE region = $1 AND user_id = $2";
const UPSERT_RISK: &str = "INSERT INTO umstore.user_risk_scores (user_id, region, financial_risk,
        deadline_risk, benefit_loss_risk, overall_risk, model_version, computed_at)
     VALUES ($1, $2, round($3::float8::numeric, 2), round($4::float8::numeric, 2),
        round($5::float8::numeric, 2), round($6::float8::numeric, 2), $7, $8)
     ON CONFLICT (region, user_id) DO UPDATE SET
        financial_risk = EXCLUDED.financial_risk, deadline_risk = EXCLUDED.deadline_risk,
        benefit_loss_risk = EXCLUDED.benefit_loss_risk, overall_risk = EXCLUDED.overall_risk,
        model_version = EXCLUDED.model_version, computed_at = EXCLUDED.computed_at
     WHERE umstore.user_risk_scores.computed_at <= EXCLUDED.computed_at";
const UPSERT_ELIGIBILITY: &str = "INSERT INTO umstore.user_eligibility_cache (user_id, region,
        scheme_id, eligible, score, reasons, rules_version, computed_at, expires_at)
     SELECT $1, $2, r.scheme_id, r.eligible, round(r.score::numeric, 2), r.reasons, $7, $8, $9
     FROM unnest($3::text[], $4::bool[], $5::float8[], $6::jsonb[])
        AS r (scheme_id, eligible, score, reasons)
     ON CONFLICT (region, user_id, scheme_id) DO UPDATE SET
        eligible = EXCLUDED.eligible, score = EXCLUDED.score, reasons = EXCLUDED.reasons,
        rules_version = EXCLUDED.rules_version, computed_at = EXCLUDED.computed_at,
        expires_at = EXCLUDED.expires_at
     WHERE umstore.user_eligibility_cache.computed_at <= EXCLUDED.computed_at";

/// The refusal of the region check as an [`ApplyError`], else as any other
/// database error.
fn region_check_error(e: tokio_postgres::Error) -> ApplyError {
    match Refusal::of(&e) {
        Some(refusal) => ApplyError::RegionMoving {
            refusal,
            message: match refusal {
                Refusal::Fenced => format!(
                    "the region is fenced for a moment while it moves between clusters; the \
                     event is retried shortly ({})",
                    crate::db::with_causes(&e)
                ),
                Refusal::Moved => format!(
                    "the cluster no longer (or not yet) serves the region; the event is retried \
                     on the region's cluster ({})",
                    crate::db::with_causes(&e)
                ),
            },
        },
        None => db_error("checking the region")(e),
    }
}

/// Applies `event` on `client` (a writer login) in one transaction; with
/// [`RegionCheck::On`] (several clusters) the region's write check runs right
/// after the user's lock.
pub async fn apply(
    client: &mut deadpool_postgres::Object,
    keyring: &Keyring,
    config: &ApplyConfig,
    event: &Event,
    check: RegionCheck,
) -> Result<Outcome, ApplyError> {
    let tx = client
        .build_transaction()
        .start()
        .await
        .map_err(db_error("starting a transaction"))?;
    let lock = tx
        .prepare_cached(LOCK_USER)
        .await
        .map_err(db_error("preparing"))?;
    tx.execute(&lock, &[&user_lock_key(event.user_id)])
        .await
        .map_err(db_error("locking the user"))?;
    if check == RegionCheck::On {
        let region_write = tx
            .prepare_cached(REGION_WRITE)
            .await
            .map_err(db_error("preparing"))?;
        tx.execute(&region_write, &[&event.region, &event.user_id])
            .await
            .map_err(region_check_error)?;
    }
    let record = tx
        .prepare_cached(RECORD_EVENT)
        .await
        .map_err(db_error("preparing"))?;
    let recorded = tx
        .execute(
            &record,
            &[
                &event.event_id,
                &event.region,
                &event.event_type().as_str(),
                &event.user_id,
            ],
        )
        .await
        .map_err(db_error("recording the event id"))?;
    if recorded == 0 {
        // Seen before; the transaction wrote nothing.
        return Ok(Outcome::Duplicate);
    }
    let outcome = match &event.body {
        Body::MetadataCreated(patch) => {
            apply_metadata(&tx, keyring, config, event, patch, true).await
        }
        Body::MetadataUpdated(patch) => {
            apply_metadata(&tx, keyring, config, event, patch, false).await
        }
        Body::RiskScores(r) => apply_risk(&tx, event, r).await,
        Body::Eligibility(e) => apply_eligibility(&tx, config, event, e).await,
    }?;
    if outcome == Outcome::Stale {
        let stale = tx
            .prepare_cached(MARK_STALE)
            .await
            .map_err(db_error("preparing"))?;
        tx.execute(&stale, &[&event.region, &event.event_id])
            .await
            .map_err(db_error("recording a stale event"))?;
    }
    tx.commit().await.map_err(db_error("committing"))?;
    Ok(outcome)
}

/// Refuses an event for a user the store does not hold (or no longer does).
async fn require_live_user(tx: &Transaction<'_>, event: &Event) -> Result<(), ApplyError> {
    let st = tx
        .prepare_cached(USER_STATE)
        .await
        .map_err(db_error("preparing"))?;
    match tx
        .query_opt(&st, &[&event.region, &event.user_id])
        .await
        .map_err(db_error("looking the user up"))?
    {
        None => Err(Rejection::Unappliable(format!(
            "unknown user {} in region {}: its METADATA_CREATED must be applied first",
            event.user_id, event.region
        ))
        .into()),
        Some(row) if row.get::<_, bool>(0) => Err(Rejection::Unappliable(format!(
            "user {} was erased; nothing more is stored for them",
            event.user_id
        ))
        .into()),
        Some(_) => Ok(()),
    }
}

async fn apply_risk(
    tx: &Transaction<'_>,
    event: &Event,
    r: &RiskScores,
) -> Result<Outcome, ApplyError> {
    require_live_user(tx, event).await?;
    let st = tx
        .prepare_cached(UPSERT_RISK)
        .await
        .map_err(db_error("preparing"))?;
    let n = tx
        .execute(
            &st,
            &[
                &event.user_id,
                &event.region,
                &r.financial_risk,
                &r.deadline_risk,
                &r.benefit_loss_risk,
                &r.overall_risk,
                &r.model_version,
                &r.computed_at,
            ],
        )
        .await
        .map_err(db_error("storing risk scores"))?;
    Ok(if n == 0 {
        Outcome::Stale
    } else {
        Outcome::Applied { version: None }
    })
}

async fn apply_eligibility(
    tx: &Transaction<'_>,
    config: &ApplyConfig,
    event: &Event,
    e: &Eligibility,
) -> Result<Outcome, ApplyError> {
    require_live_user(tx, event).await?;
    let ids: Vec<&str> = e.results.iter().map(|r| r.scheme_id.as_str()).collect();
    let eligible: Vec<bool> = e.results.iter().map(|r| r.eligible).collect();
    let scores: Vec<Option<f64>> = e.results.iter().map(|r| r.score).collect();
    let reasons: Vec<Value> = e.results.iter().map(|r| json!(r.reasons)).collect();
    let expires_at = e.computed_at + config.eligibility_ttl;
    let st = tx
        .prepare_cached(UPSERT_ELIGIBILITY)
        .await
        .map_err(db_error("preparing"))?;
    let n = tx
        .execute(
            &st,
            &[
                &event.user_id,
                &event.region,
                &ids,
                &eligible,
                &scores,
                &reasons,
                &e.rules_version,
                &e.computed_at,
                &expires_at,
            ],
        )
        .await
        .map_err(db_error("storing eligibility"))?;
    Ok(if n == 0 {
        Outcome::Stale
    } else {
        Outcome::Applied { version: None }
    })
}

/// A user's row: PII as ciphertext, the rest as stored.
#[derive(Default)]
struct Row {
    full_name: Option<Vec<u8>>,
    date_of_birth: Option<Vec<u8>>,
    district: Option<Vec<u8>>,
    pincode: Option<Vec<u8>>,
    phone: Option<Vec<u8>>,
    identity_token: Option<Vec<u8>>,
    identity_token_bidx: Option<Vec<u8>>,
    annual_income: Option<Vec<u8>>,
    gender: Option<String>,
    marital_status: Option<String>,
    area_type: Option<String>,
    social_category: Option<String>,
    disability: bool,
    occupation: Option<String>,
    employment_type: Option<String>,
    land_holding_acres: Option<f64>,
    has_bank_account: Option<bool>,
    ration_card: Option<String>,
    household_size: Option<i16>,
    dependents: Option<i16>,
    children: Option<i16>,
    senior_members: Option<i16>,
    head_of_household: Option<bool>,
}

/// The fields an event changed, with their old and new values (PII as base64
/// ciphertext).
#[derive(Default)]
struct Diff {
    fields: Vec<&'static str>,
    old: Map<String, Value>,
    new: Map<String, Value>,
}

impl Diff {
    fn plain<T: PartialEq + Clone + serde::Serialize>(
        &mut self,
        name: &'static str,
        slot: &mut T,
        value: T,
    ) {
        if *slot != value {
            self.fields.push(name);
            self.old.insert(name.into(), json!(slot));
            self.new.insert(name.into(), json!(value));
            *slot = value;
        }
    }
}

fn sealed_json(v: &Option<Vec<u8>>) -> Value {
    v.as_ref().map_or(Value::Null, |b| {
        Value::String(base64::engine::general_purpose::STANDARD.encode(b))
    })
}

/// Seals, compares and records one PII field; returns its plaintext when the
/// event set it.
struct PiiWriter<'a> {
    keyring: &'a Keyring,
    key: &'a DataKey,
    user_id: Uuid,
    region: &'a str,
}

impl PiiWriter<'_> {
    fn aad(&self, column: &'static str) -> FieldAad<'_> {
        FieldAad {
            user_id: self.user_id,
            region: self.region,
            column,
        }
    }

    /// The plaintext of what is stored in `column`, if anything.
    fn open(
        &self,
        column: &'static str,
        sealed: &Option<Vec<u8>>,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, ApplyError> {
        sealed
            .as_ref()
            .map(|s| {
                self.key
                    .open(&self.aad(column), s)
                    .map(Zeroizing::new)
                    .map_err(|e| {
                        ApplyError::Transient(format!("decrypting the stored {column}: {e}"))
                    })
            })
            .transpose()
    }

    /// The plaintext an inbound value stands for (decrypted through Vault when it
    /// came as transit ciphertext).
    async fn inbound(&self, value: &str) -> Result<Zeroizing<Vec<u8>>, ApplyError> {
        if is_transit_ciphertext(value) {
            return self
                .keyring
                .provider()
                .decrypt_inbound(value)
                .await
                .map_err(|e| match e {
                    crate::crypto::CryptoError::Vault { .. } => {
                        ApplyError::Transient(format!("decrypting a transit value: {e}"))
                    }
                    other => ApplyError::Rejected(Rejection::Invalid(format!(
                        "a transit-encrypted value could not be decrypted: {other}"
                    ))),
                });
        }
        Ok(Zeroizing::new(value.as_bytes().to_vec()))
    }

    /// Applies `change` to `slot` (sealed under `column`).
    async fn apply(
        &self,
        diff: &mut Diff,
        name: &'static str,
        column: &'static str,
        slot: &mut Option<Vec<u8>>,
        change: Change<Zeroizing<Vec<u8>>>,
    ) -> Result<(), ApplyError> {
        match change {
            Change::Absent => Ok(()),
            Change::Clear => {
                if slot.is_some() {
                    diff.fields.push(name);
                    diff.old.insert(name.into(), sealed_json(slot));
                    diff.new.insert(name.into(), Value::Null);
                    *slot = None;
                }
                Ok(())
            }
            Change::Set(plain) => {
                if self.open(column, slot)?.as_deref().map(Vec::as_slice) == Some(plain.as_slice())
                {
                    return Ok(());
                }
                let sealed = self.key.seal(&self.aad(column), &plain).0;
                diff.fields.push(name);
                diff.old.insert(name.into(), sealed_json(slot));
                let new = Some(sealed);
                diff.new.insert(name.into(), sealed_json(&new));
                *slot = new;
                Ok(())
            }
        }
    }

    /// The inbound text of a PII change, decrypted.
    async fn text(
        &self,
        change: &Change<PiiText>,
    ) -> Result<Change<Zeroizing<Vec<u8>>>, ApplyError> {
        Ok(match change {
            Change::Absent => Change::Absent,
            Change::Clear => Change::Clear,
            Change::Set(PiiText(v)) => Change::Set(self.inbound(v).await?),
        })
    }
}

fn map_change<T, U>(c: &Change<T>, f: impl Fn(&T) -> U) -> Change<U> {
    match c {
        Change::Absent => Change::Absent,
        Change::Clear => Change::Clear,
        Change::Set(v) => Change::Set(f(v)),
    }
}

/// Applies `change` to an optional plain column, recording it in `diff`.
fn set<T: PartialEq + Clone + serde::Serialize>(
    diff: &mut Diff,
    name: &'static str,
    slot: &mut Option<T>,
    change: Change<T>,
) {
    let new = match change {
        Change::Absent => return,
        Change::Clear => None,
        Change::Set(v) => Some(v),
    };
    diff.plain(name, slot, new);
}

async fn apply_metadata(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    config: &ApplyConfig,
    event: &Event,
    patch: &MetadataPatch,
    create: bool,
) -> Result<Outcome, ApplyError> {
    let (user_id, region) = (event.user_id, event.region);
    let st = tx
        .prepare_cached(USER_REGION)
        .await
        .map_err(db_error("preparing"))?;
    let listed: Option<String> = tx
        .query_opt(&st, &[&user_id])
        .await
        .map_err(db_error("looking the user up"))?
        .map(|r| r.get(0));
    match listed.as_deref() {
        Some(r) if r != region => {
            return Err(Rejection::Unappliable(format!(
                "user {user_id} lives in region {r}, the event says {region}: moving a user \
                 between regions is not an event; send it for {r}"
            ))
            .into())
        }
        None if !create => {
            return Err(Rejection::Unappliable(format!(
                "unknown user {user_id}: METADATA_UPDATED needs the user's METADATA_CREATED \
                 applied first"
            ))
            .into())
        }
        None => {
            let st = tx
                .prepare_cached(ADD_TO_DIRECTORY)
                .await
                .map_err(db_error("preparing"))?;
            tx.execute(&st, &[&user_id, &region])
                .await
                .map_err(db_error("adding the user to the directory"))?;
        }
        Some(_) => {}
    }

    let st = tx
        .prepare_cached(CURRENT)
        .await
        .map_err(db_error("preparing"))?;
    let current = tx
        .query_opt(&st, &[&region, &user_id])
        .await
        .map_err(db_error("reading the user"))?;
    let (mut row, old_version, is_new) = match &current {
        None if !create => {
            return Err(Rejection::Unappliable(format!(
                "unknown user {user_id}: METADATA_UPDATED needs the user's METADATA_CREATED \
                 applied first"
            ))
            .into())
        }
        None => (Row::default(), 0i64, true),
        Some(r) => {
            if r.get::<_, bool>(2) {
                return Err(Rejection::Unappliable(format!(
                    "user {user_id} was erased; nothing more is stored for them"
                ))
                .into());
            }
            let last: Option<DateTime<Utc>> = r.get(1);
            if last.is_some_and(|last| event.occurred_at < last) {
                return Ok(Outcome::Stale);
            }
            let row = Row {
                full_name: r.get(3),
                date_of_birth: r.get(4),
                district: r.get(5),
                pincode: r.get(6),
                phone: r.get(7),
                identity_token: r.get(8),
                identity_token_bidx: r.get(9),
                annual_income: r.get(10),
                gender: r.get(11),
                marital_status: r.get(12),
                area_type: r.get(13),
                social_category: r.get(14),
                disability: r.get(15),
                occupation: r.get(16),
                employment_type: r.get(17),
                land_holding_acres: r.get(18),
                has_bank_account: r.get(19),
                ration_card: r.get(20),
                household_size: r.get(21),
                dependents: r.get(22),
                children: r.get(23),
                senior_members: r.get(24),
                head_of_household: r.get(25),
            };
            (row, r.get::<_, i64>(0), false)
        }
    };

    let key = match if is_new {
        keyring.create_user_key(&**tx, user_id, region).await
    } else {
        keyring.user_key(&**tx, user_id, region).await
    }
    .map_err(keys_error)?
    {
        UserKey::Active(key) => key,
        UserKey::Erased(_) => {
            return Err(Rejection::Unappliable(format!(
                "user {user_id} was erased; nothing more is stored for them"
            ))
            .into())
        }
    };
    let pii = PiiWriter {
        keyring,
        key: &key,
        user_id,
        region,
    };
    let mut diff = Diff::default();

    // Personal data: sealed under the user's key; compared as plaintext.
    let full_name = pii.text(&patch.full_name).await?;
    pii.apply(
        &mut diff,
        "full_name",
        "full_name_enc",
        &mut row.full_name,
        full_name,
    )
    .await?;
    let dob = map_change(&patch.date_of_birth, |d| {
        Zeroizing::new(d.to_string().into_bytes())
    });
    pii.apply(
        &mut diff,
        "date_of_birth",
        "date_of_birth_enc",
        &mut row.date_of_birth,
        dob,
    )
    .await?;
    let district = pii.text(&patch.district).await?;
    pii.apply(
        &mut diff,
        "district",
        "district_enc",
        &mut row.district,
        district,
    )
    .await?;
    let pincode = pii.text(&patch.pincode).await?;
    pii.apply(
        &mut diff,
        "pincode",
        "pincode_enc",
        &mut row.pincode,
        pincode,
    )
    .await?;
    let phone = pii.text(&patch.phone).await?;
    pii.apply(&mut diff, "phone", "phone_enc", &mut row.phone, phone)
        .await?;
    let token = pii.text(&patch.identity_token).await?;
    if let Change::Set(plain) = &token {
        row.identity_token_bidx = Some(keyring.blind_index().index("identity_token", plain));
    } else if matches!(token, Change::Clear) {
        row.identity_token_bidx = None;
    }
    pii.apply(
        &mut diff,
        "identity_token",
        "identity_token_enc",
        &mut row.identity_token,
        token,
    )
    .await?;
    let income = map_change(&patch.annual_income, |i| {
        Zeroizing::new(i.to_string().into_bytes())
    });
    pii.apply(
        &mut diff,
        "annual_income",
        "annual_income_enc",
        &mut row.annual_income,
        income,
    )
    .await?;

    // The rest as stored.
    set(
        &mut diff,
        "gender",
        &mut row.gender,
        map_change(&patch.gender, |v| v.as_str().to_owned()),
    );
    set(
        &mut diff,
        "marital_status",
        &mut row.marital_status,
        map_change(&patch.marital_status, |v| v.as_str().to_owned()),
    );
    set(
        &mut diff,
        "area_type",
        &mut row.area_type,
        map_change(&patch.area_type, |v| v.as_str().to_owned()),
    );
    set(
        &mut diff,
        "social_category",
        &mut row.social_category,
        map_change(&patch.social_category, |v| v.as_str().to_owned()),
    );
    if let Change::Set(d) = patch.disability {
        diff.plain("disability", &mut row.disability, d);
    }
    set(
        &mut diff,
        "occupation",
        &mut row.occupation,
        patch.occupation.clone(),
    );
    set(
        &mut diff,
        "employment_type",
        &mut row.employment_type,
        map_change(&patch.employment_type, |v| v.as_str().to_owned()),
    );
    let acres = map_change(&patch.land_holding_acres, |a| (a * 100.0).round() / 100.0);
    set(
        &mut diff,
        "land_holding_acres",
        &mut row.land_holding_acres,
        acres,
    );
    set(
        &mut diff,
        "has_bank_account",
        &mut row.has_bank_account,
        patch.has_bank_account.clone(),
    );
    set(
        &mut diff,
        "ration_card",
        &mut row.ration_card,
        map_change(&patch.ration_card, |v| v.as_str().to_owned()),
    );
    set(
        &mut diff,
        "household_size",
        &mut row.household_size,
        patch.household_size.clone(),
    );
    set(
        &mut diff,
        "dependents",
        &mut row.dependents,
        patch.dependents.clone(),
    );
    set(
        &mut diff,
        "children",
        &mut row.children,
        patch.children.clone(),
    );
    set(
        &mut diff,
        "senior_members",
        &mut row.senior_members,
        patch.senior_members.clone(),
    );
    set(
        &mut diff,
        "head_of_household",
        &mut row.head_of_household,
        patch.head_of_household.clone(),
    );

    if diff.fields.is_empty() {
        // Nothing changed; later events are still compared with this one.
        let st = tx
            .prepare_cached(TOUCH_METADATA)
            .await
            .map_err(db_error("preparing"))?;
        tx.execute(&st, &[&region, &user_id, &event.occurred_at])
            .await
            .map_err(db_error("recording the event time"))?;
        return Ok(Outcome::Applied { version: None });
    }

    // What the derived attributes are computed from (required fields: always set).
    let dob = pii
        .open("date_of_birth_enc", &row.date_of_birth)?
        .and_then(|p| {
            std::str::from_utf8(&p)
                .ok()?
                .parse::<chrono::NaiveDate>()
                .ok()
        });
    let income = pii
        .open("annual_income_enc", &row.annual_income)?
        .and_then(|p| std::str::from_utf8(&p).ok()?.parse::<i64>().ok());
    let (Some(date_of_birth), Some(annual_income)) = (dob, income) else {
        return Err(ApplyError::Transient(format!(
            "user {user_id}'s stored date of birth or income could not be read back"
        )));
    };
    let inputs = Inputs {
        date_of_birth,
        household_size: row.household_size.unwrap_or(1),
        annual_income,
        ration_card: row.ration_card.as_deref().unwrap_or("none"),
        children: row.children.unwrap_or(0),
        employment_type: row.employment_type.as_deref().unwrap_or("unemployed"),
        land_holding_centiacres: row
            .land_holding_acres
            .map_or(0, |a| (a * 100.0).round() as i64),
    };
    let derived = derive_from(&inputs, Utc::now().date_naive());
    let version = old_version + 1;
    let birth_year = i16::try_from(date_of_birth.year()).unwrap_or_default();
    let income_lakh = i16::try_from(annual_income.max(0) / 100_000).unwrap_or(i16::MAX);
    let change_type = if is_new { "created" } else { "updated" };

    let upsert = tx
        .prepare_cached(UPSERT_METADATA)
        .await
        .map_err(db_error("preparing"))?;
    let derive_st = tx
        .prepare_cached(UPSERT_DERIVED)
        .await
        .map_err(db_error("preparing"))?;
    let history = tx
        .prepare_cached(APPEND_HISTORY)
        .await
        .map_err(db_error("preparing"))?;
    let invalidate = tx
        .prepare_cached(INVALIDATE_ELIGIBILITY)
        .await
        .map_err(db_error("preparing"))?;
    let outbox = tx
        .prepare_cached(QUEUE_OUTBOX)
        .await
        .map_err(db_error("preparing"))?;

    let write_row_params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &user_id,
        &region,
        &row.full_name,
        &row.date_of_birth,
        &birth_year,
        &row.gender,
        &row.marital_status,
        &row.district,
        &row.pincode,
        &row.area_type,
        &row.social_category,
        &row.disability,
        &row.phone,
        &row.identity_token,
        &row.identity_token_bidx,
        &row.annual_income,
        &income_lakh,
        &row.occupation,
        &row.employment_type,
        &row.land_holding_acres,
        &row.has_bank_account,
        &row.ration_card,
        &row.household_size,
        &row.dependents,
        &row.children,
        &row.senior_members,
        &row.head_of_household,
        &version,
        &event.occurred_at,
    ];
    let write_row = tx.execute(&upsert, write_row_params);
    let write_derived_params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &user_id,
        &region,
        &derived.age_group,
        &derived.income_bracket,
        &derived.life_stage,
        &derived.employment_category,
        &derived.bpl_status,
        &derived.tax_bracket,
        &derived.is_senior_citizen,
        &derived.is_farmer,
        &derived.per_capita_income_lakh,
        &version,
    ];
    let write_derived = tx.execute(&derive_st, write_derived_params);
    let fields: Vec<&str> = diff.fields.clone();
    let old = Value::Object(diff.old);
    let new = Value::Object(diff.new);
    let write_history_params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &user_id,
        &region,
        &change_type,
        &fields,
        &old,
        &new,
        &event.source,
        &event.event_id,
        &version,
        &event.occurred_at,
    ];
    let write_history = tx.execute(&history, write_history_params);
    let drop_params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[&region, &user_id];
    let drop_eligibility = tx.execute(&invalidate, drop_params);
    // The statements go out pipelined, in this order (the row before the rows
    // that reference it).
    let (_, _, _, invalidated) =
        tokio::try_join!(write_row, write_derived, write_history, drop_eligibility)
            .map_err(db_error("writing the user"))?;

    let stored_subject = config.outbound_subject("METADATA_STORED");
    let invalidated_subject = config.outbound_subject("ELIGIBILITY_CACHE_INVALIDATED");
    let stored_id = format!("{}:METADATA_STORED", event.event_id);
    let invalidated_id = format!("{}:ELIGIBILITY_CACHE_INVALIDATED", event.event_id);
    let stored = json!({
        "event_type": "METADATA_STORED",
        "source_event_id": event.event_id,
        "user_id": user_id,
        "region": region,
        "version": version,
        "change_type": change_type,
        "changed_fields": fields,
        "occurred_at": event.occurred_at,
    });
    let invalidated = json!({
        "event_type": "ELIGIBILITY_CACHE_INVALIDATED",
        "source_event_id": event.event_id,
        "user_id": user_id,
        "region": region,
        "version": version,
        "entries_removed": invalidated,
    });
    tx.execute(
        &outbox,
        &[
            &region,
            &user_id,
            &stored_subject,
            &stored_id,
            &stored,
            &invalidated_subject,
            &invalidated_id,
            &invalidated,
        ],
    )
    .await
    .map_err(db_error("queueing outbound events"))?;
    Ok(Outcome::Applied {
        version: Some(version),
    })
}
