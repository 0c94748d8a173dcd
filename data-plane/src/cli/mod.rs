//! One module per command of the `umstore-data-plane` binary. Each parses its own
//! arguments (a clap `Args` or `Subcommand` type) and has a `run` function; `main`
//! parses the global arguments, opens the database and dispatches. Errors are
//! `anyhow` here, at the binary's edge; the library's modules return typed errors.

pub mod bulk;
pub mod bulk_import;
pub mod bulk_stats;
pub mod keys;
pub mod migrate;
pub mod regions;
pub mod seed;
pub mod serve;
pub mod stats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use umstore_data_plane::crypto::{
    DataKeyCache, KeyProvider, KeyProviderConfig, Keyring, VaultAuth, VaultConfig,
};

/// Where data keys are wrapped: Vault transit, or (local runs only) a key file.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    /// Vault/OpenBao address; without it the local key file under --data-dir is used.
    #[arg(long, env = "UMSTORE_VAULT_ADDR", global = true)]
    vault_addr: Option<String>,
    /// Vault token (or use --vault-k8s-role).
    #[arg(long, env = "VAULT_TOKEN", global = true, hide_env_values = true)]
    vault_token: Option<String>,
    /// Log in with the pod's Kubernetes service account under this Vault role.
    #[arg(long, env = "UMSTORE_VAULT_K8S_ROLE", global = true)]
    vault_k8s_role: Option<String>,
    /// Service-account token file for --vault-k8s-role.
    #[arg(
        long,
        global = true,
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    vault_k8s_token_path: PathBuf,
    /// Mount of Vault's kubernetes auth method.
    #[arg(long, global = true, default_value = "kubernetes")]
    vault_k8s_mount: String,
    /// PEM CA certificate that signed Vault's TLS certificate.
    #[arg(long, env = "UMSTORE_VAULT_CACERT", global = true)]
    vault_ca_cert: Option<PathBuf>,
    /// Transit mount.
    #[arg(
        long,
        env = "UMSTORE_TRANSIT_MOUNT",
        global = true,
        default_value = "transit"
    )]
    transit_mount: String,
    /// Transit key that wraps the data keys.
    #[arg(
        long,
        env = "UMSTORE_TRANSIT_KEY",
        global = true,
        default_value = "umstore-pii"
    )]
    transit_key: String,
    /// Refuse to start without Vault (no local key file).
    #[arg(long, env = "UMSTORE_REQUIRE_VAULT", global = true)]
    require_vault: bool,
}

impl KeyArgs {
    /// The key provider these arguments name: Vault when `--vault-addr` is given
    /// (with a token or Kubernetes auth), else the local key file under `data_dir`.
    pub fn provider_config(&self, data_dir: &Path) -> Result<KeyProviderConfig> {
        let Some(address) = &self.vault_addr else {
            return Ok(KeyProviderConfig::Local {
                dir: data_dir.to_path_buf(),
                require_vault: self.require_vault,
            });
        };
        let auth = match (&self.vault_token, &self.vault_k8s_role) {
            (_, Some(role)) => VaultAuth::Kubernetes {
                role: role.clone(),
                token_path: self.vault_k8s_token_path.clone(),
                mount: self.vault_k8s_mount.clone(),
            },
            (Some(token), None) => VaultAuth::Token(token.clone()),
            (None, None) => {
                bail!("--vault-addr needs --vault-token (VAULT_TOKEN) or --vault-k8s-role")
            }
        };
        let mut config = VaultConfig::with_token(address.clone(), String::new());
        config.auth = auth;
        config.ca_cert = self.vault_ca_cert.clone();
        config.transit_mount = self.transit_mount.clone();
        config.key_name = self.transit_key.clone();
        Ok(KeyProviderConfig::Vault(config))
    }
}

/// Opens the provider and the keyring, with the data-key cache every command
/// uses (100,000 keys for 5 minutes).
pub async fn open_keyring(
    config: KeyProviderConfig,
    client: &tokio_postgres::Client,
) -> Result<Keyring> {
    let provider = KeyProvider::open(config).await?;
    let cache = DataKeyCache::new(100_000, Duration::from_secs(300));
    Ok(Keyring::open(provider, cache, client).await?)
}
