//! Which columns hold PII, and sealing a profile's PII for storage.

use super::{BlindIndexKey, DataKey, FieldAad};
use crate::model::Profile;

/// PII columns of `umstore.user_metadata` (defined with the schema).
pub use umstore_migrations::PII_COLUMNS;

/// A profile's PII, sealed under the user's data key.
#[derive(Debug, Clone)]
pub struct SealedPii {
    /// `full_name_enc`.
    pub full_name: Vec<u8>,
    /// `date_of_birth_enc` (ISO date).
    pub date_of_birth: Vec<u8>,
    /// `district_enc`.
    pub district: Vec<u8>,
    /// `pincode_enc`.
    pub pincode: Vec<u8>,
    /// `phone_enc`.
    pub phone: Vec<u8>,
    /// `identity_token_enc`.
    pub identity_token: Vec<u8>,
    /// `identity_token_bidx`: HMAC of the token under the blind-index key.
    pub identity_token_bidx: Vec<u8>,
    /// `annual_income_enc` (decimal INR).
    pub annual_income: Vec<u8>,
}

/// Seals the PII of `p` under `key`, each field bound to its user, region and column.
pub fn seal_pii(p: &Profile, key: &DataKey, bidx: &BlindIndexKey) -> SealedPii {
    let seal = |column: &'static str, value: &[u8]| {
        key.seal(
            &FieldAad {
                user_id: p.user_id,
                region: p.region,
                column,
            },
            value,
        )
        .0
    };
    SealedPii {
        full_name: seal("full_name_enc", p.full_name.as_bytes()),
        date_of_birth: seal("date_of_birth_enc", p.date_of_birth.to_string().as_bytes()),
        district: seal("district_enc", p.district.as_bytes()),
        pincode: seal("pincode_enc", p.pincode.as_bytes()),
        phone: seal("phone_enc", p.phone.as_bytes()),
        identity_token: seal("identity_token_enc", p.identity_token.as_bytes()),
        identity_token_bidx: bidx.index("identity_token", p.identity_token.as_bytes()),
        annual_income: seal("annual_income_enc", p.annual_income.to_string().as_bytes()),
    }
}
