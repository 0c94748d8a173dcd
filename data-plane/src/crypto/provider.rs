//! The key providers behind one type: Vault transit, or the local key file.

use std::path::PathBuf;

use tracing::info;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::{
    BlindIndexKey, CryptoError, DataKey, KekVersions, LocalKeyProvider, VaultConfig,
    VaultKeyProvider, WrappedKey,
};

/// Which provider to build.
#[derive(Debug, Clone)]
pub enum KeyProviderConfig {
    /// Vault/OpenBao transit.
    Vault(VaultConfig),
    /// The local key file in this directory (local runs only).
    Local {
        /// Directory of `local-keys.bin`.
        dir: PathBuf,
        /// `--require-vault`: refuse the local provider.
        require_vault: bool,
    },
}

/// Wraps and unwraps data keys.
#[derive(Debug)]
pub enum KeyProvider {
    /// Vault/OpenBao transit.
    Vault(Box<VaultKeyProvider>),
    /// The local key file (boxed: the expanded AES key schedule is large).
    Local(Box<LocalKeyProvider>),
}

/// Whether this process runs in a Kubernetes pod.
pub fn in_kubernetes() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

impl KeyProvider {
    /// Builds the configured provider. The local one is refused with
    /// `require_vault` and inside Kubernetes.
    pub async fn open(config: KeyProviderConfig) -> Result<Self, CryptoError> {
        match config {
            KeyProviderConfig::Vault(config) => {
                let provider = VaultKeyProvider::connect(config).await?;
                info!(
                    address = provider.address(),
                    key = provider.key_name(),
                    "using Vault transit for data keys"
                );
                Ok(Self::Vault(Box::new(provider)))
            }
            KeyProviderConfig::Local {
                require_vault: true,
                ..
            } => Err(CryptoError::LocalRefused("--require-vault is set")),
            KeyProviderConfig::Local { .. } if in_kubernetes() => {
                Err(CryptoError::LocalRefused("running inside Kubernetes"))
            }
            KeyProviderConfig::Local { dir, .. } => Ok(Self::Local(Box::new(
                LocalKeyProvider::open_or_create(&dir)?,
            ))),
        }
    }

    /// Name of the KEK, recorded with each wrapped key.
    pub fn kek_name(&self) -> &str {
        match self {
            Self::Vault(v) => v.key_name(),
            Self::Local(_) => LocalKeyProvider::KEK_NAME,
        }
    }

    /// Wraps a key belonging to `user_id` in `region`.
    pub async fn wrap(
        &self,
        user_id: Uuid,
        region: &str,
        key: &DataKey,
    ) -> Result<WrappedKey, CryptoError> {
        match self {
            Self::Vault(v) => v.wrap(key).await,
            Self::Local(l) => Ok(l.wrap(user_id, region, key)),
        }
    }

    /// Wraps many keys; one Vault call.
    pub async fn wrap_batch(
        &self,
        keys: &[(Uuid, &str, &DataKey)],
    ) -> Result<Vec<WrappedKey>, CryptoError> {
        match self {
            Self::Vault(v) => {
                v.wrap_batch(&keys.iter().map(|(_, _, k)| *k).collect::<Vec<_>>())
                    .await
            }
            Self::Local(l) => Ok(keys.iter().map(|(u, r, k)| l.wrap(*u, r, k)).collect()),
        }
    }

    /// Unwraps `user_id`'s key.
    pub async fn unwrap(
        &self,
        user_id: Uuid,
        region: &str,
        wrapped: &WrappedKey,
    ) -> Result<DataKey, CryptoError> {
        match self {
            Self::Vault(v) => v.unwrap_key(user_id, wrapped).await,
            Self::Local(l) => l.unwrap_key(user_id, region, wrapped),
        }
    }

    /// Rewraps under the latest KEK version (Vault only).
    pub async fn rewrap_batch(
        &self,
        wrapped: &[WrappedKey],
    ) -> Result<Vec<WrappedKey>, CryptoError> {
        match self {
            Self::Vault(v) => v.rewrap_batch(wrapped).await,
            Self::Local(_) => Err(CryptoError::NeedsVault("rewrapping data keys")),
        }
    }

    /// Rotates the KEK (Vault only); returns the new version.
    pub async fn rotate(&self) -> Result<i32, CryptoError> {
        match self {
            Self::Vault(v) => v.rotate().await,
            Self::Local(_) => Err(CryptoError::NeedsVault("key rotation")),
        }
    }

    /// The KEK's versions.
    pub async fn versions(&self) -> Result<KekVersions, CryptoError> {
        match self {
            Self::Vault(v) => v.versions().await,
            Self::Local(_) => Ok(KekVersions {
                latest: 1,
                min_decryption: 1,
                latest_created: None,
            }),
        }
    }

    /// Retires KEK versions below `version` (Vault only).
    pub async fn set_min_decryption_version(&self, version: i32) -> Result<(), CryptoError> {
        match self {
            Self::Vault(v) => v.set_min_decryption_version(version).await,
            Self::Local(_) => Err(CryptoError::NeedsVault("retiring key versions")),
        }
    }

    /// Decrypts inbound `vault:vN:` PII (Vault only).
    pub async fn decrypt_inbound(
        &self,
        ciphertext: &str,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        match self {
            Self::Vault(v) => v.decrypt(ciphertext).await,
            Self::Local(_) => Err(CryptoError::NeedsVault("decrypting vault: ciphertexts")),
        }
    }

    /// Whether the provider can serve unwraps now.
    pub async fn health(&self) -> Result<(), CryptoError> {
        match self {
            Self::Vault(v) => v.health().await,
            Self::Local(_) => Ok(()),
        }
    }

    /// A fresh blind-index key (wrapped and stored by the keyring).
    pub fn new_blind_index_key() -> (BlindIndexKey, Zeroizing<[u8; 32]>) {
        let raw = DataKey::generate();
        let bytes = Zeroizing::new(*raw.expose());
        (BlindIndexKey::from_bytes(*bytes), bytes)
    }
}
