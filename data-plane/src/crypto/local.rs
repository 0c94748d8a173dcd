//! The local key provider: a key file under the data directory, for local runs
//! only. In a cluster the Vault transit provider wraps data keys instead.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use tracing::warn;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::{CryptoError, DataKey};

const KEY_FILE_LEN: usize = 32;
const NONCE_LEN: usize = 12;

/// A data key wrapped by a KEK, as stored in `umstore.user_data_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// Wrapped bytes.
    pub wrapped: Vec<u8>,
    /// Name of the KEK.
    pub kek_name: String,
    /// Version of the KEK that wrapped it.
    pub kek_version: i32,
}

/// Wraps data keys with a key-encryption key held in a local file (0600).
pub struct LocalKeyProvider {
    kek: Aes256Gcm,
}

impl std::fmt::Debug for LocalKeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalKeyProvider(<redacted>)")
    }
}

impl LocalKeyProvider {
    /// Name recorded as `kek_name` for keys this provider wraps.
    pub const KEK_NAME: &'static str = "local";

    /// Opens the key file in `dir`, creating it (mode 0600) on first use, and
    /// warns loudly that no Vault protects the keys.
    pub fn open_or_create(dir: &Path) -> Result<Self, CryptoError> {
        let path = dir.join("local-keys.bin");
        let io = |source| CryptoError::KeyFile {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let bytes = match fs::read(&path) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut fresh = Zeroizing::new(vec![0u8; KEY_FILE_LEN]);
                fresh.copy_from_slice(DataKey::generate().expose());
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io)?;
                file.write_all(&fresh).map_err(io)?;
                file.sync_all().map_err(io)?;
                fresh
            }
            Err(e) => return Err(io(e)),
        };
        if bytes.len() != KEY_FILE_LEN {
            return Err(CryptoError::MalformedKeyFile {
                path,
                len: bytes.len(),
                expected: KEY_FILE_LEN,
            });
        }
        warn!(
            key_file = %path.display(),
            "USING THE LOCAL KEY PROVIDER: data keys are wrapped by a key file on this disk, \
             not by Vault. For local runs only; configure Vault transit for anything real"
        );
        let kek = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes));
        Ok(Self { kek })
    }

    /// Path of the key file in `dir`.
    pub fn key_file(dir: &Path) -> PathBuf {
        dir.join("local-keys.bin")
    }

    fn aad(user_id: Uuid, region: &str) -> Vec<u8> {
        let mut aad = b"umstore-data-key\0".to_vec();
        aad.extend_from_slice(user_id.as_bytes());
        aad.extend_from_slice(region.as_bytes());
        aad
    }

    /// Wraps a user's data key.
    pub fn wrap(&self, user_id: Uuid, region: &str, key: &DataKey) -> WrappedKey {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = Self::aad(user_id, region);
        let ct = self
            .kek
            .encrypt(
                &nonce,
                Payload {
                    msg: key.expose(),
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&ct);
        WrappedKey {
            wrapped,
            kek_name: Self::KEK_NAME.to_owned(),
            kek_version: 1,
        }
    }

    /// Unwraps a user's data key.
    pub fn unwrap_key(
        &self,
        user_id: Uuid,
        region: &str,
        wrapped: &WrappedKey,
    ) -> Result<DataKey, CryptoError> {
        let fail = || CryptoError::Unwrap {
            user_id,
            kek_name: wrapped.kek_name.clone(),
            kek_version: wrapped.kek_version,
        };
        if wrapped.wrapped.len() != NONCE_LEN + 32 + 16 || wrapped.kek_name != Self::KEK_NAME {
            return Err(fail());
        }
        let nonce = Nonce::from_slice(&wrapped.wrapped[..NONCE_LEN]);
        let aad = Self::aad(user_id, region);
        let plain = Zeroizing::new(
            self.kek
                .decrypt(
                    nonce,
                    Payload {
                        msg: &wrapped.wrapped[NONCE_LEN..],
                        aad: &aad,
                    },
                )
                .map_err(|_| fail())?,
        );
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&plain);
        Ok(DataKey::from_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::crypto::FieldAad;

    #[test]
    fn key_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("tempdir") };
        let p1 = LocalKeyProvider::open_or_create(dir.path()).map_err(|e| e.to_string());
        let Ok(p1) = p1 else { panic!("{p1:?}") };
        let mode = fs::metadata(LocalKeyProvider::key_file(dir.path()))
            .map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o600));
        let user = Uuid::new_v4();
        let key = DataKey::generate();
        let wrapped = p1.wrap(user, "KA", &key);
        let sealed = key.seal(
            &FieldAad {
                user_id: user,
                region: "KA",
                column: "c",
            },
            b"x",
        );

        let Ok(p2) = LocalKeyProvider::open_or_create(dir.path()) else {
            panic!("reopen")
        };
        let Ok(again) = p2.unwrap_key(user, "KA", &wrapped) else {
            panic!("unwrap")
        };
        let opened = again.open(
            &FieldAad {
                user_id: user,
                region: "KA",
                column: "c",
            },
            &sealed.0,
        );
        assert_eq!(opened.ok(), Some(b"x".to_vec()));
        assert!(
            p2.unwrap_key(Uuid::new_v4(), "KA", &wrapped).is_err(),
            "wrapped key bound to its user"
        );
    }

    #[test]
    fn malformed_key_file_is_refused_with_its_path() {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("tempdir")
        };
        let _ = fs::write(LocalKeyProvider::key_file(dir.path()), b"short");
        let err = LocalKeyProvider::open_or_create(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("local-keys.bin is malformed (5 bytes, 32 expected)"),
            "{err}"
        );
    }
}
