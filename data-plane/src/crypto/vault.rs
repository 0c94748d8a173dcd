//! The Vault/OpenBao transit key provider: data keys wrapped by a transit key
//! that never leaves Vault.

use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rustify_derive::Endpoint;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use vaultrs::api::transit::requests::{CreateKeyRequest, UpdateKeyConfigurationRequest};
use vaultrs::api::transit::KeyType;
use vaultrs::client::{Client as _, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

use super::{CryptoError, DataKey, WrappedKey};
use crate::backoff::Backoff;

/// How the provider authenticates to Vault.
#[derive(Clone)]
pub enum VaultAuth {
    /// A Vault token.
    Token(String),
    /// Kubernetes service-account login: the role, the JWT file and the auth mount.
    Kubernetes {
        /// Vault role bound to the service account.
        role: String,
        /// Path of the service-account token.
        token_path: PathBuf,
        /// Mount of the kubernetes auth method.
        mount: String,
    },
}

impl std::fmt::Debug for VaultAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token(_) => f.write_str("Token(<redacted>)"),
            Self::Kubernetes {
                role,
                token_path,
                mount,
            } => f
                .debug_struct("Kubernetes")
                .field("role", role)
                .field("token_path", token_path)
                .field("mount", mount)
                .finish(),
        }
    }
}

/// Where and how to reach Vault's transit engine.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// Address, e.g. `https://vault.vault.svc:8200`.
    pub address: String,
    /// Authentication.
    pub auth: VaultAuth,
    /// PEM CA certificate to verify Vault's TLS certificate.
    pub ca_cert: Option<PathBuf>,
    /// Transit mount (default `transit`).
    pub transit_mount: String,
    /// Transit key name (default `umstore-pii`).
    pub key_name: String,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Attempts per call on connection errors and 5xx answers (with backoff).
    pub attempts: u32,
}

impl VaultConfig {
    /// A config with token auth and the defaults.
    pub fn with_token(address: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            auth: VaultAuth::Token(token.into()),
            ca_cert: None,
            transit_mount: "transit".to_owned(),
            key_name: "umstore-pii".to_owned(),
            timeout: Duration::from_secs(5),
            attempts: 5,
        }
    }
}

/// What Vault/OpenBao answer when a ciphertext's key version is below the
/// key's `min_decryption_version` ("ciphertext or signature version is
/// disallowed by policy (too old)"). Other 400s (a malformed ciphertext) stay
/// Vault errors.
const RETIRED_VERSION_MESSAGE: &str = "disallowed by policy (too old)";

/// Items per `batch_input` call: OpenBao refuses JSON bodies with more than
/// about a thousand strings ("refused JSON input due to high complexity").
pub const MAX_BATCH: usize = 250;

/// The transit key's versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KekVersions {
    /// The version new wraps use.
    pub latest: i32,
    /// The oldest version still allowed to unwrap.
    pub min_decryption: i32,
    /// When the latest version was created (Unix seconds), where the provider knows.
    pub latest_created: Option<u64>,
}

/// Wraps data keys with a Vault transit key.
pub struct VaultKeyProvider {
    client: VaultClient,
    config: VaultConfig,
}

impl std::fmt::Debug for VaultKeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultKeyProvider")
            .field("config", &self.config)
            .finish()
    }
}

#[derive(Debug, Serialize)]
struct BatchItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ciphertext: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BatchResults {
    batch_results: Vec<BatchResult>,
}

#[derive(Debug, Deserialize)]
struct BatchResult {
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// `POST {mount}/rewrap/{name}` with `batch_input` (vaultrs has the single form only).
#[derive(Debug, Default, Endpoint)]
#[endpoint(
    path = "{self.mount}/rewrap/{self.name}",
    method = "POST",
    response = "BatchResults"
)]
struct BatchRewrapRequest {
    #[endpoint(skip)]
    mount: String,
    #[endpoint(skip)]
    name: String,
    batch_input: Vec<BatchItem>,
}

/// `POST {mount}/encrypt/{name}` with `batch_input`.
#[derive(Debug, Default, Endpoint)]
#[endpoint(
    path = "{self.mount}/encrypt/{self.name}",
    method = "POST",
    response = "BatchResults"
)]
struct BatchEncryptRequest {
    #[endpoint(skip)]
    mount: String,
    #[endpoint(skip)]
    name: String,
    batch_input: Vec<BatchItem>,
}

/// Vault's error with the messages it returned (vaultrs's Display shows the
/// status code only).
fn describe(e: &ClientError) -> String {
    match e {
        ClientError::APIError { code, errors } if !errors.is_empty() => {
            format!("status {code}: {}", errors.join("; "))
        }
        other => other.to_string(),
    }
}

fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::APIError { code, .. } => *code >= 500,
        ClientError::RestClientError { .. } => true,
        _ => false,
    }
}

/// The key version of a `vault:vN:` ciphertext.
pub fn ciphertext_version(ciphertext: &str) -> Option<i32> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    rest.split(':').next()?.parse().ok()
}

impl VaultKeyProvider {
    /// Connects and authenticates; creates the transit key when absent
    /// (`aes256-gcm96`, not exportable, deletion not allowed).
    pub async fn connect(config: VaultConfig) -> Result<Self, CryptoError> {
        // reqwest's rustls needs a process-wide crypto provider; a second
        // install is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let vault_err = |what: &'static str| {
            let address = config.address.clone();
            move |e: ClientError| CryptoError::Vault {
                what,
                address: address.clone(),
                detail: describe(&e),
            }
        };
        let mut settings = VaultClientSettingsBuilder::default();
        settings
            .address(&config.address)
            .timeout(Some(config.timeout));
        if let Some(ca) = &config.ca_cert {
            settings.ca_certs(vec![ca.display().to_string()]);
        }
        if let VaultAuth::Token(token) = &config.auth {
            settings.token(token.clone());
        }
        let settings = settings.build().map_err(|e| CryptoError::Vault {
            what: "configuring the Vault client",
            address: config.address.clone(),
            detail: e.to_string(),
        })?;
        let mut client =
            VaultClient::new(settings).map_err(vault_err("creating the Vault client"))?;
        if let VaultAuth::Kubernetes {
            role,
            token_path,
            mount,
        } = &config.auth
        {
            let jwt = Zeroizing::new(std::fs::read_to_string(token_path).map_err(|source| {
                CryptoError::KeyFile {
                    path: token_path.clone(),
                    source,
                }
            })?);
            let auth = vaultrs::auth::kubernetes::login(&client, mount, role, jwt.trim())
                .await
                .map_err(vault_err("logging in with the Kubernetes service account"))?;
            client.set_token(&auth.client_token);
        }
        let provider = Self { client, config };
        provider.ensure_key().await?;
        Ok(provider)
    }

    /// The transit key name.
    pub fn key_name(&self) -> &str {
        &self.config.key_name
    }

    /// The configured address.
    pub fn address(&self) -> &str {
        &self.config.address
    }

    fn err(&self, what: &'static str) -> impl Fn(ClientError) -> CryptoError + '_ {
        move |e| CryptoError::Vault {
            what,
            address: self.config.address.clone(),
            detail: describe(&e),
        }
    }

    async fn retry<T, F, Fut>(&self, what: &'static str, mut call: F) -> Result<T, CryptoError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.config.attempts && retryable(&e) => {
                    let delay = backoff.next_delay();
                    warn!(what, attempt, error = %describe(&e), retry_in_ms = delay.as_millis() as u64, "Vault call failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(self.err(what)(e)),
            }
        }
    }

    async fn ensure_key(&self) -> Result<(), CryptoError> {
        let (mount, name) = (&self.config.transit_mount, &self.config.key_name);
        match vaultrs::transit::key::read(&self.client, mount, name).await {
            Ok(_) => return Ok(()),
            // A policy of encrypt/decrypt/rewrap only (the data plane's in a cluster,
            // where the operator creates and rotates the key): use it as it is.
            Err(ClientError::APIError { code: 403, .. }) => {
                info!(key = %name, "this token may not read the transit key; assuming it exists (the operator manages it)");
                return Ok(());
            }
            Err(ClientError::APIError { code: 404, .. }) => {}
            Err(e) => return Err(self.err("reading the transit key")(e)),
        }
        self.retry("creating the transit key", || async {
            vaultrs::transit::key::create(
                &self.client,
                mount,
                name,
                Some(
                    CreateKeyRequest::builder()
                        .key_type(KeyType::Aes256Gcm96)
                        .exportable(false),
                ),
            )
            .await
        })
        .await?;
        vaultrs::transit::key::update(
            &self.client,
            mount,
            name,
            Some(UpdateKeyConfigurationRequest::builder().deletion_allowed(false)),
        )
        .await
        .map_err(self.err("configuring the transit key"))?;
        info!(key = %name, "created transit key (aes256-gcm96, not exportable, deletion not allowed)");
        Ok(())
    }

    fn parse_wrapped(&self, ciphertext: String) -> Result<WrappedKey, CryptoError> {
        let version = ciphertext_version(&ciphertext).ok_or_else(|| CryptoError::Vault {
            what: "reading a wrapped key",
            address: self.config.address.clone(),
            detail: "Vault returned a ciphertext without a vault:vN: prefix".to_owned(),
        })?;
        Ok(WrappedKey {
            wrapped: ciphertext.into_bytes(),
            kek_name: self.config.key_name.clone(),
            kek_version: version,
        })
    }

    /// Wraps data keys, [`MAX_BATCH`] per call (`batch_input`).
    pub async fn wrap_batch(&self, keys: &[&DataKey]) -> Result<Vec<WrappedKey>, CryptoError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_BATCH) {
            out.extend(self.wrap_chunk(chunk).await?);
        }
        Ok(out)
    }

    async fn wrap_chunk(&self, keys: &[&DataKey]) -> Result<Vec<WrappedKey>, CryptoError> {
        let endpoint = || BatchEncryptRequest {
            mount: self.config.transit_mount.clone(),
            name: self.config.key_name.clone(),
            batch_input: keys
                .iter()
                .map(|k| BatchItem {
                    plaintext: Some(B64.encode(k.expose())),
                    ciphertext: None,
                })
                .collect(),
        };
        let results = self
            .retry("wrapping data keys", || async {
                vaultrs::api::exec_with_result(&self.client, endpoint()).await
            })
            .await?;
        self.collect_batch("wrapping data keys", results, keys.len())
    }

    fn collect_batch(
        &self,
        what: &'static str,
        results: BatchResults,
        expected: usize,
    ) -> Result<Vec<WrappedKey>, CryptoError> {
        if results.batch_results.len() != expected {
            return Err(CryptoError::Vault {
                what,
                address: self.config.address.clone(),
                detail: format!(
                    "asked for {expected} results, got {}",
                    results.batch_results.len()
                ),
            });
        }
        results
            .batch_results
            .into_iter()
            .map(|r| match (r.ciphertext, r.error) {
                (Some(ct), None) => self.parse_wrapped(ct),
                (_, error) => Err(CryptoError::Vault {
                    what,
                    address: self.config.address.clone(),
                    detail: error
                        .unwrap_or_else(|| "an item came back without a ciphertext".to_owned()),
                }),
            })
            .collect()
    }

    /// Wraps one data key.
    pub async fn wrap(&self, key: &DataKey) -> Result<WrappedKey, CryptoError> {
        let plaintext = Zeroizing::new(B64.encode(key.expose()));
        let response = self
            .retry("wrapping a data key", || async {
                vaultrs::transit::data::encrypt(
                    &self.client,
                    &self.config.transit_mount,
                    &self.config.key_name,
                    &plaintext,
                    None,
                )
                .await
            })
            .await?;
        self.parse_wrapped(response.ciphertext)
    }

    /// Unwraps a data key.
    pub async fn unwrap_key(
        &self,
        user_id: uuid::Uuid,
        wrapped: &WrappedKey,
    ) -> Result<DataKey, CryptoError> {
        let ciphertext =
            std::str::from_utf8(&wrapped.wrapped).map_err(|_| CryptoError::Unwrap {
                user_id,
                kek_name: wrapped.kek_name.clone(),
                kek_version: wrapped.kek_version,
            })?;
        let plain = self.decrypt(ciphertext).await.map_err(|e| match e {
            CryptoError::Vault { detail, .. } if detail.contains(RETIRED_VERSION_MESSAGE) => {
                CryptoError::RetiredKeyVersion {
                    user_id,
                    kek_version: wrapped.kek_version,
                }
            }
            other => other,
        })?;
        if plain.len() != 32 {
            return Err(CryptoError::Unwrap {
                user_id,
                kek_name: wrapped.kek_name.clone(),
                kek_version: wrapped.kek_version,
            });
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&plain);
        Ok(DataKey::from_bytes(bytes))
    }

    /// Decrypts a `vault:vN:` ciphertext under the transit key (inbound PII
    /// that the Metadata Engine encrypted).
    pub async fn decrypt(&self, ciphertext: &str) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let response = self
            .retry("decrypting with the transit key", || async {
                vaultrs::transit::data::decrypt(
                    &self.client,
                    &self.config.transit_mount,
                    &self.config.key_name,
                    ciphertext,
                    None,
                )
                .await
            })
            .await?;
        let plain = Zeroizing::new(response.plaintext);
        B64.decode(plain.as_bytes())
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Vault {
                what: "decrypting with the transit key",
                address: self.config.address.clone(),
                detail: "Vault returned plaintext that is not base64".to_owned(),
            })
    }

    /// Rewraps wrapped keys under the latest transit key version,
    /// [`MAX_BATCH`] per call. Vault never returns the plaintext keys.
    pub async fn rewrap_batch(
        &self,
        wrapped: &[WrappedKey],
    ) -> Result<Vec<WrappedKey>, CryptoError> {
        let mut out = Vec::with_capacity(wrapped.len());
        for chunk in wrapped.chunks(MAX_BATCH) {
            out.extend(self.rewrap_chunk(chunk).await?);
        }
        Ok(out)
    }

    async fn rewrap_chunk(&self, wrapped: &[WrappedKey]) -> Result<Vec<WrappedKey>, CryptoError> {
        let endpoint = || BatchRewrapRequest {
            mount: self.config.transit_mount.clone(),
            name: self.config.key_name.clone(),
            batch_input: wrapped
                .iter()
                .map(|w| BatchItem {
                    plaintext: None,
                    ciphertext: Some(String::from_utf8_lossy(&w.wrapped).into_owned()),
                })
                .collect(),
        };
        let results = self
            .retry("rewrapping data keys", || async {
                vaultrs::api::exec_with_result(&self.client, endpoint()).await
            })
            .await?;
        self.collect_batch("rewrapping data keys", results, wrapped.len())
    }

    /// Rewraps one wrapped key (the unbatched baseline of the benchmark).
    pub async fn rewrap_one(&self, wrapped: &WrappedKey) -> Result<WrappedKey, CryptoError> {
        let ciphertext = String::from_utf8_lossy(&wrapped.wrapped).into_owned();
        let response = self
            .retry("rewrapping a data key", || async {
                vaultrs::transit::data::rewrap(
                    &self.client,
                    &self.config.transit_mount,
                    &self.config.key_name,
                    &ciphertext,
                    None,
                )
                .await
            })
            .await?;
        self.parse_wrapped(response.ciphertext)
    }

    /// Rotates the transit key; returns the new latest version.
    pub async fn rotate(&self) -> Result<i32, CryptoError> {
        self.retry("rotating the transit key", || async {
            vaultrs::transit::key::rotate(
                &self.client,
                &self.config.transit_mount,
                &self.config.key_name,
            )
            .await
        })
        .await?;
        Ok(self.versions().await?.latest)
    }

    /// The key's latest and minimum decryption versions.
    pub async fn versions(&self) -> Result<KekVersions, CryptoError> {
        let key = self
            .retry("reading the transit key", || async {
                vaultrs::transit::key::read(
                    &self.client,
                    &self.config.transit_mount,
                    &self.config.key_name,
                )
                .await
            })
            .await?;
        let (latest, latest_created) = match &key.keys {
            vaultrs::api::transit::responses::ReadKeyData::Symmetric(versions) => versions
                .iter()
                .filter_map(|(v, created)| Some((v.parse::<i32>().ok()?, Some(*created))))
                .max()
                .unwrap_or((1, None)),
            vaultrs::api::transit::responses::ReadKeyData::Asymmetric(versions) => (
                versions
                    .keys()
                    .filter_map(|v| v.parse::<i32>().ok())
                    .max()
                    .unwrap_or(1),
                None,
            ),
        };
        Ok(KekVersions {
            latest,
            min_decryption: i32::try_from(key.min_decryption_version).unwrap_or(i32::MAX),
            latest_created,
        })
    }

    /// Retires every version below `version`: ciphertexts wrapped under them no
    /// longer unwrap.
    pub async fn set_min_decryption_version(&self, version: i32) -> Result<(), CryptoError> {
        let v = u64::try_from(version).unwrap_or(1);
        self.retry("raising min_decryption_version", || async {
            vaultrs::transit::key::update(
                &self.client,
                &self.config.transit_mount,
                &self.config.key_name,
                Some(UpdateKeyConfigurationRequest::builder().min_decryption_version(v)),
            )
            .await
        })
        .await
    }

    /// Whether Vault answers and is unsealed.
    pub async fn health(&self) -> Result<(), CryptoError> {
        vaultrs::sys::health(&self.client)
            .await
            .map(|_| ())
            .map_err(self.err("checking Vault's health"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_of_a_transit_ciphertext() {
        assert_eq!(ciphertext_version("vault:v3:abc"), Some(3));
        assert_eq!(ciphertext_version("vault:v12:"), Some(12));
        assert_eq!(ciphertext_version("vault:vx:abc"), None);
        assert_eq!(ciphertext_version("local:v1:abc"), None);
    }

    #[test]
    fn debug_hides_the_token() {
        let config = VaultConfig::with_token("http://127.0.0.1:8200", "s.supersecret");
        assert!(!format!("{config:?}").contains("supersecret"));
    }
}
