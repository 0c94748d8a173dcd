//! Field sealing with a user's data key, and the blind index.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::CryptoError;

/// Format byte of a sealed field: `[format][nonce: 12][ciphertext + tag: 16]`.
pub const FIELD_FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + NONCE_LEN;

/// A user's AES-256-GCM data key, in memory only, with its expanded cipher
/// (built once, not per field). The key bytes are zeroized on drop, and so are
/// the cipher's round keys and GHASH key (the `zeroize` features of `aes`,
/// `ghash` and `polyval`); `Debug` output hides the key.
#[derive(Clone)]
pub struct DataKey {
    key: [u8; 32],
    cipher: Aes256Gcm,
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl ZeroizeOnDrop for DataKey {}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// What a sealed field is bound to: opening it under any other user, region
/// or column fails.
#[derive(Debug, Clone, Copy)]
pub struct FieldAad<'a> {
    /// Owner.
    pub user_id: Uuid,
    /// Owner's region.
    pub region: &'a str,
    /// Column name, e.g. `date_of_birth_enc`.
    pub column: &'static str,
}

impl FieldAad<'_> {
    fn bytes(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(16 + 3 + self.column.len() + 1);
        self.append_to(&mut aad);
        aad
    }

    /// Appends the associated data to `out`: `format ‖ user_id ‖ region ‖ 0 ‖
    /// column`. The bulk engine lays many fields' AAD out in one buffer with it.
    pub(crate) fn append_to(&self, out: &mut Vec<u8>) {
        out.push(FIELD_FORMAT_V1);
        out.extend_from_slice(self.user_id.as_bytes());
        out.extend_from_slice(self.region.as_bytes());
        out.push(0);
        out.extend_from_slice(self.column.as_bytes());
    }
}

/// A sealed field as stored in a `*_enc` column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedField(pub Vec<u8>);

impl DataKey {
    /// A fresh random key from the OS RNG.
    pub fn generate() -> Self {
        let mut key = Aes256Gcm::generate_key(OsRng);
        let bytes: [u8; 32] = key.into();
        key.zeroize();
        Self::from_bytes(bytes)
    }

    /// Wraps raw key bytes (from an unwrap).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes));
        Self { key: bytes, cipher }
    }

    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.key
    }

    fn cipher(&self) -> &Aes256Gcm {
        &self.cipher
    }

    /// Seals a field's plaintext with a random 96-bit nonce.
    pub fn seal(&self, aad: &FieldAad<'_>, plaintext: &[u8]) -> SealedField {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = aad.bytes();
        // Encryption with a valid key and nonce only fails past 64 GiB of input.
        let ct = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
        out.push(FIELD_FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        SealedField(out)
    }

    /// Opens a sealed field, checking it belongs to `aad`.
    pub fn open(&self, aad: &FieldAad<'_>, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let min = HEADER_LEN + TAG_LEN;
        if sealed.len() < min {
            return Err(CryptoError::Truncated {
                len: sealed.len(),
                min,
            });
        }
        if sealed[0] != FIELD_FORMAT_V1 {
            return Err(CryptoError::UnknownFormat(sealed[0]));
        }
        let nonce = Nonce::from_slice(&sealed[1..HEADER_LEN]);
        let aad_bytes = aad.bytes();
        self.cipher()
            .decrypt(
                nonce,
                Payload {
                    msg: &sealed[HEADER_LEN..],
                    aad: &aad_bytes,
                },
            )
            .map_err(|_| CryptoError::Authentication {
                user_id: aad.user_id,
                column: aad.column,
            })
    }
}

/// Key of the blind index, separate from every data key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct BlindIndexKey([u8; 32]);

impl std::fmt::Debug for BlindIndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlindIndexKey(<redacted>)")
    }
}

impl BlindIndexKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// HMAC-SHA256 of `value` under this key, domain-separated by column, so
    /// equal values in different columns do not match.
    pub fn index(&self, column: &str, value: &[u8]) -> Vec<u8> {
        // HMAC accepts keys of any length; this cannot fail.
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.0) else {
            return Vec::new();
        };
        mac.update(column.as_bytes());
        mac.update(&[0]);
        mac.update(value);
        mac.finalize().into_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aad(user: Uuid, column: &'static str) -> FieldAad<'static> {
        FieldAad {
            user_id: user,
            region: "KA",
            column,
        }
    }

    #[test]
    fn sealed_field_round_trips_and_hides_plaintext() {
        let key = DataKey::generate();
        let user = Uuid::new_v4();
        let sealed = key.seal(&aad(user, "pincode_enc"), b"560001");
        assert!(!sealed.0.windows(6).any(|w| w == b"560001"));
        assert_eq!(
            key.open(&aad(user, "pincode_enc"), &sealed.0).ok(),
            Some(b"560001".to_vec())
        );
    }

    #[test]
    fn ciphertext_moved_to_another_user_or_column_fails() {
        let key = DataKey::generate();
        let user = Uuid::new_v4();
        let sealed = key.seal(&aad(user, "pincode_enc"), b"560001");
        let other_user = key.open(&aad(Uuid::new_v4(), "pincode_enc"), &sealed.0);
        assert!(matches!(
            other_user,
            Err(CryptoError::Authentication { .. })
        ));
        let other_column = key.open(&aad(user, "district_enc"), &sealed.0);
        assert!(matches!(
            other_column,
            Err(CryptoError::Authentication {
                column: "district_enc",
                ..
            })
        ));
        let other_region = key.open(
            &FieldAad {
                user_id: user,
                region: "TN",
                column: "pincode_enc",
            },
            &sealed.0,
        );
        assert!(other_region.is_err());
    }

    #[test]
    fn truncated_and_unknown_format_are_clear_errors() {
        let key = DataKey::generate();
        let user = Uuid::new_v4();
        let sealed = key.seal(&aad(user, "pincode_enc"), b"560001");
        let truncated = key.open(&aad(user, "pincode_enc"), &sealed.0[..10]);
        assert!(matches!(
            truncated,
            Err(CryptoError::Truncated { len: 10, .. })
        ));
        let mut v9 = sealed.0.clone();
        v9[0] = 9;
        let err = key
            .open(&aad(user, "pincode_enc"), &v9)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown ciphertext format version 9; this build reads version 1")
        );
    }

    #[test]
    fn blind_index_is_deterministic_keyed_and_column_separated() {
        let k1 = BlindIndexKey::from_bytes([1; 32]);
        let k2 = BlindIndexKey::from_bytes([2; 32]);
        assert_eq!(
            k1.index("identity_token", b"t1"),
            k1.index("identity_token", b"t1")
        );
        assert_ne!(
            k1.index("identity_token", b"t1"),
            k1.index("identity_token", b"t2")
        );
        assert_ne!(
            k1.index("identity_token", b"t1"),
            k2.index("identity_token", b"t1")
        );
        assert_ne!(k1.index("identity_token", b"t1"), k1.index("phone", b"t1"));
    }

    #[test]
    fn debug_output_hides_keys() {
        let key = DataKey::from_bytes([0xab; 32]);
        assert_eq!(format!("{key:?}"), "DataKey(<redacted>)");
        assert!(!format!("{:?}", BlindIndexKey::from_bytes([0xab; 32])).contains("ab"));
    }
}
