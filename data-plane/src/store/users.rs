//! Reading a user's current metadata, decrypting their PII.

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::crypto::{CryptoError, FieldAad, Keyring, KeyringError, UserKey};

/// Current metadata of one user, the user found by `user_id` alone: the
/// directory gives the region, and only that region's partition is read.
const SELECT_USER: &str = "SELECT region::text, full_name_enc, date_of_birth_enc, district_enc, pincode_enc,
        phone_enc, identity_token_enc, annual_income_enc, birth_year, gender, marital_status, area_type,
        social_category, disability, income_lakh, occupation, employment_type, land_holding_acres::float8,
        has_bank_account, ration_card, household_size, dependents, children, senior_members,
        head_of_household, version, updated_at::text, erased_at::text
     FROM umstore.user_metadata
     WHERE region = umstore.user_region($1) AND user_id = $1";

/// A user's PII, decrypted.
#[derive(Clone, Serialize, PartialEq, Eq)]
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

/// Reads `user_id`'s current metadata; `None` when there is no such user. PII
/// is decrypted when `decrypt` is set (the caller's purpose allows it) and
/// the user was not erased.
pub async fn read_user(
    client: &impl GenericClient,
    keyring: &Keyring,
    user_id: Uuid,
    decrypt: bool,
) -> Result<Option<UserRecord>, ReadError> {
    let Some(row) = client
        .query_opt(SELECT_USER, &[&user_id])
        .await
        .map_err(|source| ReadError::Database { user_id, source })?
    else {
        return Ok(None);
    };
    let region: String = row.get(0);
    let mut erased_at: Option<String> = row.get(27);
    let attributes = serde_json::json!({
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
    });
    let mut pii = None;
    if decrypt && erased_at.is_none() {
        let keys_err = |source| ReadError::Keys { user_id, source };
        match keyring
            .user_key(client, user_id, &region)
            .await
            .map_err(keys_err)?
        {
            UserKey::Erased(at) => erased_at = Some(at),
            UserKey::Active(key) => {
                let open =
                    |idx: usize, column: &'static str| -> Result<Option<String>, ReadError> {
                        let Some(sealed) = row.get::<_, Option<&[u8]>>(idx) else {
                            return Ok(None);
                        };
                        let plain = key
                            .open(
                                &FieldAad {
                                    user_id,
                                    region: &region,
                                    column,
                                },
                                sealed,
                            )
                            .map_err(|e: CryptoError| keys_err(KeyringError::Crypto(e)))?;
                        Ok(Some(String::from_utf8_lossy(&plain).into_owned()))
                    };
                pii = Some(Pii {
                    full_name: open(1, "full_name_enc")?,
                    date_of_birth: open(2, "date_of_birth_enc")?,
                    district: open(3, "district_enc")?,
                    pincode: open(4, "pincode_enc")?,
                    phone: open(5, "phone_enc")?,
                    identity_token: open(6, "identity_token_enc")?,
                    annual_income: open(7, "annual_income_enc")?.and_then(|s| s.parse().ok()),
                });
            }
        }
    }
    Ok(Some(UserRecord {
        user_id,
        region,
        pii,
        erased_at,
        attributes,
        version: row.get(25),
        updated_at: row.get(26),
    }))
}
