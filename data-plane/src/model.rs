//! A user's metadata in plaintext, as the data plane holds it in memory
//! between decrypting and encrypting. Never logged: `Debug` is not derived.

use chrono::NaiveDate;
use uuid::Uuid;

/// One user's current metadata (primary, economic and family attributes).
#[derive(Clone, PartialEq)]
pub struct Profile {
    /// The user.
    pub user_id: Uuid,
    /// Two-letter region code (the shard key).
    pub region: &'static str,
    /// Full name (PII).
    pub full_name: String,
    /// Date of birth (PII).
    pub date_of_birth: NaiveDate,
    /// `female`, `male`, `transgender` or `undisclosed`.
    pub gender: &'static str,
    /// `single`, `married`, `widowed`, `divorced` or `separated`.
    pub marital_status: &'static str,
    /// District (PII).
    pub district: String,
    /// Six-digit postal code (PII).
    pub pincode: String,
    /// `rural` or `urban`.
    pub area_type: &'static str,
    /// `general`, `obc`, `sc` or `st`.
    pub social_category: &'static str,
    /// Whether the user has a registered disability.
    pub disability: bool,
    /// Mobile number (PII).
    pub phone: String,
    /// Tokenised national identity number (PII; blind-indexed).
    pub identity_token: String,
    /// Annual income in INR (PII).
    pub annual_income: i64,
    /// Occupation, free text.
    pub occupation: &'static str,
    /// Employment type (see the schema's check).
    pub employment_type: &'static str,
    /// Land holding in hundredths of an acre.
    pub land_holding_centiacres: i64,
    /// Whether the user has a bank account.
    pub has_bank_account: bool,
    /// `none`, `apl`, `bpl` or `aay`.
    pub ration_card: &'static str,
    /// People in the household, the user included.
    pub household_size: i16,
    /// Dependents.
    pub dependents: i16,
    /// Children in the household.
    pub children: i16,
    /// Members aged 60 or more.
    pub senior_members: i16,
    /// Whether the user heads the household.
    pub head_of_household: bool,
}

impl Profile {
    /// Annual income rounded down to whole lakhs (the indexable `income_lakh`).
    pub fn income_lakh(&self) -> i16 {
        i16::try_from(self.annual_income.max(0) / 100_000).unwrap_or(i16::MAX)
    }
}

/// Completed years between `born` and `on`.
pub fn age_on(born: NaiveDate, on: NaiveDate) -> i32 {
    use chrono::Datelike;
    let mut age = on.year() - born.year();
    if (on.month(), on.day()) < (born.month(), born.day()) {
        age -= 1;
    }
    age.max(0)
}
