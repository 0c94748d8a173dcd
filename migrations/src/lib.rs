//! Versioned SQL migrations for umstore and the runner that applies them.
//!
//! The migrations are embedded in every binary that links this crate (the
//! operator's migrate step and the data plane's `migrate` command use the same
//! [`Runner`]). Each migration runs in its own transaction and is recorded in
//! `umstore.schema_migrations` with its SHA-256 checksum; a PostgreSQL advisory
//! lock keeps two runners from racing, and a migration whose text changed after
//! it was applied is refused.
//!
//! Citus-only statements (reference tables, distribution, shard placement) are not
//! migrations: [`citus`] holds them, and the operator's distribute step runs them
//! once Citus is detected.

pub mod citus;
mod error;
pub mod moves;
pub mod regions;
pub mod roles;
mod runner;

pub use error::MigrateError;

/// PII columns of `umstore.user_metadata`: stored only as ciphertext (and the
/// identity token's blind index); migration 0006 grants the analytics role
/// every column but these.
pub const PII_COLUMNS: [&str; 8] = [
    "full_name_enc",
    "date_of_birth_enc",
    "district_enc",
    "pincode_enc",
    "phone_enc",
    "identity_token_enc",
    "identity_token_bidx",
    "annual_income_enc",
];
pub use runner::{
    checksum, embedded, AppliedMigration, Migration, MigrationState, MigrationStatus, Runner,
    UpReport, ADVISORY_LOCK_KEY, MIGRATIONS_TABLE,
};
