//! Reading a user's metadata, now or as it was at any time, decrypting their
//! PII.

use base64::Engine as _;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use std::sync::Arc;

use super::reader::Reader;
use serde::Serialize;
use serde_json::{Map, Value};
use thiserror::Error;
use uuid::Uuid;

use crate::crypto::{CryptoError, DataKey, FieldAad, Keyring, KeyringError, UserKey};

/// Current metadata of one user, the user found by `user_id` alone: the
/// directory gives the region, and only that region's partition is read.
const SELECT_USER: &str = "SELECT region::text, full_name_enc, date_of_birth_enc, district_enc, pincode_enc,
        phone_enc, identity_token_enc, annual_income_enc, birth_year, gender, marital_status, area_type,
        social_category, disability, income_lakh, occupation, employment_type, land_holding_acres::float8,
        has_bank_account, ration_card, household_size, dependents, children, senior_members,
        head_of_household, version, updated_at::text, erased_at::text
     FROM umstore.user_metadata
     WHERE region = $2 AND user_id = $1";

/// The changes after a time, newest first (what "as of" undoes).
const SELECT_CHANGES_AFTER: &str = "SELECT change_type, old_values, version
     FROM umstore.user_metadata_history
     WHERE region = $1 AND user_id = $2 AND changed_at > $3
     ORDER BY changed_at DESC, id DESC";

/// The last change at or before a time.
const SELECT_CHANGE_AT: &str = "SELECT changed_at::text
     FROM umstore.user_metadata_history
     WHERE region = $1 AND user_id = $2 AND changed_at <= $3
     ORDER BY changed_at DESC, id DESC LIMIT 1";

/// The PII fields: their name in the API and in history, and the column that
/// holds their ciphertext (bound into the ciphertext's associated data).
pub const PII: [(&str, &str); 7] = [
    ("full_name", "full_name_enc"),
    ("date_of_birth", "date_of_birth_enc"),
    ("district", "district_enc"),
    ("pincode", "pincode_enc"),
    ("phone", "phone_enc"),
    ("identity_token", "identity_token_enc"),
    ("annual_income", "annual_income_enc"),
];

/// A user's PII, decrypted.
#[derive(Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Pii {
    /// Full name.
    pub full_name: Option<String>,
    /// Date of birth (ISO 8601).
    pub date_of_birth: Option<String>,
    /// District.
    pub district: Option<String>,
    /// Postal code.
    pub pincode: Option<String>,
    /// Mobile number.
    pub phone: Option<String>,
    /// Identity token.
    pub identity_token: Option<String>,
    /// Annual income, INR.
    pub annual_income: Option<i64>,
}

impl std::fmt::Debug for Pii {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pii(<redacted>)")
    }
}

/// A user's current metadata.
#[derive(Debug, Clone, Serialize)]
pub struct UserRecord {
    /// The user.
    pub user_id: Uuid,
    /// Region code.
    pub region: String,
    /// Decrypted PII; `None` when the user was erased.
    pub pii: Option<Pii>,
    /// Set when the user was crypto-shredded.
    pub erased_at: Option<String>,
    /// Non-PII attributes, as stored.
    pub attributes: serde_json::Value,
    /// Row version.
    pub version: i64,
    /// Last change.
    pub updated_at: String,
}

/// Why a read failed.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The query failed.
    #[error("reading user {user_id}: {source}")]
    Database {
        /// The user.
        user_id: Uuid,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A history row does not have the shape the write path gives it.
    #[error("user {user_id}'s history is not readable: {detail}")]
    History {
        /// The user.
        user_id: Uuid,
        /// What is wrong.
        detail: String,
    },
    /// The user's key could not be loaded or a field did not decrypt.
    #[error("decrypting user {user_id}: {source}")]
    Keys {
        /// The user.
        user_id: Uuid,
        /// What failed.
        #[source]
        source: KeyringError,
    },
}

/// A user's row as stored: PII still sealed.
struct Stored {
    region: String,
    /// Ciphertext per [`PII`] field, in its order.
    sealed: [Option<Vec<u8>>; 7],
    attributes: Map<String, Value>,
    version: i64,
    updated_at: String,
    erased_at: Option<String>,
}

async fn fetch(client: &impl Reader, user_id: Uuid) -> Result<Option<Stored>, ReadError> {
    let Some(region) = super::reads::region_of(client, user_id).await? else {
        return Ok(None);
    };
    let Some(row) = client
        .query_opt(SELECT_USER, &[&user_id, &region])
        .await
        .map_err(|source| ReadError::Database { user_id, source })?
    else {
        return Ok(None);
    };
    let attributes = match serde_json::json!({
        "birth_year": row.get::<_, Option<i16>>(8),
        "gender": row.get::<_, Option<String>>(9),
        "marital_status": row.get::<_, Option<String>>(10),
        "area_type": row.get::<_, Option<String>>(11),
        "social_category": row.get::<_, Option<String>>(12),
        "disability": row.get::<_, bool>(13),
        "income_lakh": row.get::<_, Option<i16>>(14),
        "occupation": row.get::<_, Option<String>>(15),
        "employment_type": row.get::<_, Option<String>>(16),
        "land_holding_acres": row.get::<_, Option<f64>>(17),
        "has_bank_account": row.get::<_, Option<bool>>(18),
        "ration_card": row.get::<_, Option<String>>(19),
        "household_size": row.get::<_, Option<i16>>(20),
        "dependents": row.get::<_, Option<i16>>(21),
        "children": row.get::<_, Option<i16>>(22),
        "senior_members": row.get::<_, Option<i16>>(23),
        "head_of_household": row.get::<_, Option<bool>>(24),
    }) {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    Ok(Some(Stored {
        region: row.get(0),
        sealed: std::array::from_fn(|i| row.get::<_, Option<Vec<u8>>>(1 + i)),
        attributes,
        version: row.get(25),
        updated_at: row.get(26),
        erased_at: row.get(27),
    }))
}

/// The user's data key, or when it was destroyed.
async fn key(
    client: &impl Reader,
    keyring: &Keyring,
    user_id: Uuid,
    region: &str,
) -> Result<Result<Arc<DataKey>, String>, ReadError> {
    match keyring
        .user_key(client, user_id, region)
        .await
        .map_err(|source| ReadError::Keys { user_id, source })?
    {
        UserKey::Active(key) => Ok(Ok(key)),
        UserKey::Erased(at) => Ok(Err(at)),
    }
}

fn open_all(
    key: &DataKey,
    user_id: Uuid,
    region: &str,
    sealed: &[Option<Vec<u8>>; 7],
) -> Result<[Option<String>; 7], ReadError> {
    let mut out: [Option<String>; 7] = Default::default();
    for (i, ((_, column), sealed)) in PII.iter().zip(sealed).enumerate() {
        let Some(sealed) = sealed else { continue };
        let plain = key
            .open(
                &FieldAad {
                    user_id,
                    region,
                    column,
                },
                sealed,
            )
            .map_err(|e: CryptoError| ReadError::Keys {
                user_id,
                source: KeyringError::Crypto(e),
            })?;
        out[i] = Some(String::from_utf8_lossy(&plain).into_owned());
    }
    Ok(out)
}

fn pii_of(open: [Option<String>; 7]) -> Pii {
    let [full_name, date_of_birth, district, pincode, phone, identity_token, annual_income] = open;
    Pii {
        full_name,
        date_of_birth,
        district,
        pincode,
        phone,
        identity_token,
        annual_income: annual_income.and_then(|s| s.parse().ok()),
    }
}

/// Reads `user_id`'s current metadata; `None` when there is no such user. PII
/// is decrypted when `decrypt` is set (the caller's purpose allows it) and
/// the user was not erased.
pub async fn read_user(
    client: &impl Reader,
    keyring: &Keyring,
    user_id: Uuid,
    decrypt: bool,
) -> Result<Option<UserRecord>, ReadError> {
    let Some(stored) = fetch(client, user_id).await? else {
        return Ok(None);
    };
    let mut erased_at = stored.erased_at;
    let mut pii = None;
    if decrypt && erased_at.is_none() {
        match key(client, keyring, user_id, &stored.region).await? {
            Err(at) => erased_at = Some(at),
            Ok(key) => {
                pii = Some(pii_of(open_all(
                    &key,
                    user_id,
                    &stored.region,
                    &stored.sealed,
                )?))
            }
        }
    }
    Ok(Some(UserRecord {
        user_id,
        region: stored.region,
        pii,
        erased_at,
        attributes: Value::Object(stored.attributes),
        version: stored.version,
        updated_at: stored.updated_at,
    }))
}

/// What a user looked like at a time.
#[derive(Debug)]
pub enum AsOf {
    /// Their record as of then (`updated_at` is the time of the last change
    /// at or before it).
    Found(Box<UserRecord>),
    /// The user exists now but did not exist yet.
    NotYet,
    /// No such user.
    Unknown,
}

/// `user_id`'s metadata as it was at `at`: the current row with the old
/// values of every later change put back, newest first (docs/data-model.md,
/// "History and as of"). Fields derived from PII (`birth_year`,
/// `income_lakh`) are recomputed from the PII of then, which is decrypted for
/// that even when `decrypt` is not set (and then not returned). An erased
/// user is returned with `erased_at` set and no PII.
pub async fn read_user_as_of(
    client: &impl Reader,
    keyring: &Keyring,
    user_id: Uuid,
    at: DateTime<Utc>,
    decrypt: bool,
) -> Result<AsOf, ReadError> {
    let Some(mut stored) = fetch(client, user_id).await? else {
        return Ok(AsOf::Unknown);
    };
    let history = |e: String| ReadError::History { user_id, detail: e };
    let db = |source| ReadError::Database { user_id, source };
    let region = stored.region.clone();
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[&region, &user_id, &at];
    let (changes, last) = tokio::try_join!(
        client.query(SELECT_CHANGES_AFTER, params),
        client.query_opt(SELECT_CHANGE_AT, params),
    )
    .map_err(db)?;
    let Some(last) = last else {
        return Ok(AsOf::NotYet);
    };
    let mut pii_changed = false;
    for change in &changes {
        let change_type: String = change.get(0);
        let Value::Object(old) = change.get::<_, Value>(1) else {
            return Err(history("old_values is not an object".into()));
        };
        let version: i64 = change.get(2);
        if change_type == "created" {
            // A created row after an earlier change: not what the write path writes.
            return Err(history(format!("created at version {version} after {at}")));
        }
        for (field, value) in old {
            if let Some(i) = PII.iter().position(|(name, _)| *name == field) {
                stored.sealed[i] = match value {
                    Value::Null => None,
                    Value::String(b64) => Some(
                        base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .map_err(|e| history(format!("{field}: {e}")))?,
                    ),
                    other => return Err(history(format!("{field}: {other} is not base64"))),
                };
                pii_changed = true;
            } else if stored.attributes.contains_key(&field) {
                stored.attributes.insert(field, value);
            } else {
                return Err(history(format!("unknown field {field}")));
            }
        }
        stored.version = version - 1;
    }
    stored.updated_at = last.get(0);
    let mut pii = None;
    let mut erased_at = stored.erased_at.clone();
    if erased_at.is_none() && (decrypt || pii_changed) {
        match key(client, keyring, user_id, &region).await? {
            Err(when) => erased_at = Some(when),
            Ok(key) => {
                let open = open_all(&key, user_id, &region, &stored.sealed)?;
                if pii_changed {
                    let birth_year = open[1]
                        .as_deref()
                        .and_then(|d| d.parse::<NaiveDate>().ok())
                        .map(|d| d.year());
                    let income_lakh = open[6]
                        .as_deref()
                        .and_then(|i| i.parse::<i64>().ok())
                        .map(|i| (i.max(0) / 100_000).min(i64::from(i16::MAX)));
                    stored
                        .attributes
                        .insert("birth_year".into(), serde_json::json!(birth_year));
                    stored
                        .attributes
                        .insert("income_lakh".into(), serde_json::json!(income_lakh));
                }
                if decrypt {
                    pii = Some(pii_of(open));
                }
            }
        }
    }
    Ok(AsOf::Found(Box::new(UserRecord {
        user_id,
        region,
        pii,
        erased_at,
        attributes: Value::Object(stored.attributes),
        version: stored.version,
        updated_at: stored.updated_at,
    })))
}
