//! Envelope encryption of PII.
//!
//! Each user has a random AES-256 data key, stored only wrapped by a
//! key-encryption key (KEK). PII fields are sealed under the user's data key
//! with associated data binding (user, region, column), so a ciphertext moved
//! to another user or column fails to open. Equality lookups use a keyed blind
//! index (HMAC-SHA256) under a key separate from the data keys.

mod cache;
mod envelope;
mod keyring;
mod local;
mod pii;
mod provider;
pub mod rotation;
mod vault;

pub use cache::DataKeyCache;
pub use envelope::{BlindIndexKey, DataKey, FieldAad, SealedField, FIELD_FORMAT_V1};
pub use keyring::{ForgetReport, Keyring, KeyringError, UserKey};
pub use local::{LocalKeyProvider, WrappedKey};
pub use pii::{seal_pii, SealedPii, PII_COLUMNS};
pub use provider::{KeyProvider, KeyProviderConfig};
pub use vault::{
    ciphertext_version, KekVersions, VaultAuth, VaultConfig, VaultKeyProvider, MAX_BATCH,
};

use thiserror::Error;

/// Why a cryptographic operation failed. Messages never carry key material or
/// plaintext.
#[derive(Debug, Error)]
pub enum CryptoError {
    /// The ciphertext is shorter than its header or tag.
    #[error("ciphertext is truncated ({len} bytes, at least {min} expected)")]
    Truncated {
        /// Length found.
        len: usize,
        /// Minimum length of a valid ciphertext.
        min: usize,
    },
    /// The format byte is not one this build reads.
    #[error("unknown ciphertext format version {0}; this build reads version {FIELD_FORMAT_V1}")]
    UnknownFormat(u8),
    /// Authentication failed: wrong key, or the ciphertext belongs to another
    /// user, region or column, or it was altered.
    #[error(
        "ciphertext does not authenticate for user {user_id}, column {column}: it was altered, \
         belongs to another user or column, or was sealed under another key"
    )]
    Authentication {
        /// User the caller expected.
        user_id: uuid::Uuid,
        /// Column the caller expected.
        column: &'static str,
    },
    /// The wrapped data key does not unwrap under this KEK.
    #[error(
        "wrapped data key for user {user_id} does not unwrap under key {kek_name} v{kek_version}"
    )]
    Unwrap {
        /// Owner of the data key.
        user_id: uuid::Uuid,
        /// KEK name.
        kek_name: String,
        /// KEK version recorded with the wrapped key.
        kek_version: i32,
    },
    /// A call to Vault failed (after retries where retrying made sense).
    #[error("Vault at {address}: {what} failed: {detail}")]
    Vault {
        /// What the provider was doing.
        what: &'static str,
        /// Vault's address.
        address: String,
        /// Vault's answer or the transport error.
        detail: String,
    },
    /// The wrapped key's KEK version was retired (below min_decryption_version).
    #[error(
        "the data key of user {user_id} is wrapped under retired key version {kek_version}: \
         finish the key rotation (`keys rotate`) before raising min_decryption_version"
    )]
    RetiredKeyVersion {
        /// Owner of the data key.
        user_id: uuid::Uuid,
        /// Its KEK version.
        kek_version: i32,
    },
    /// The operation needs Vault transit.
    #[error("{0} needs the Vault transit key provider; the local key provider cannot do it")]
    NeedsVault(&'static str),
    /// The local provider was refused.
    #[error("the local key provider is refused here ({0}): configure Vault with --vault-addr and a token or Kubernetes role")]
    LocalRefused(&'static str),
    /// Reading or creating the local key file failed.
    #[error("local key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The local key file exists but does not hold a key.
    #[error("local key file {path} is malformed ({len} bytes, {expected} expected): restore it from backup; without it the stored PII cannot be read")]
    MalformedKeyFile {
        /// The file.
        path: std::path::PathBuf,
        /// Its length.
        len: usize,
        /// Expected length.
        expected: usize,
    },
}

impl CryptoError {
    /// Whether Vault refused the request itself (HTTP 400: a ciphertext that
    /// is not one, or not of this key), as opposed to being unreachable,
    /// failing, or refusing the token: the input is what is wrong.
    pub fn is_vault_bad_request(&self) -> bool {
        matches!(self, CryptoError::Vault { detail, .. } if detail.starts_with("status 400:"))
    }
}
