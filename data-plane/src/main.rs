//! `umstore-data-plane`: migrate, seed and serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};
use umstore_data_plane::api::{self, AppState, DbSlot, KeysSlot};
use umstore_data_plane::crypto::rotation::{rotate_and_rewrap, RotationOptions};
use umstore_data_plane::crypto::{
    DataKeyCache, KeyProvider, KeyProviderConfig, Keyring, VaultAuth, VaultConfig,
};
use umstore_data_plane::db::Database;
use umstore_data_plane::embedded::{default_data_dir, Embedded};
use umstore_data_plane::metrics::Metrics;
use umstore_data_plane::seed;
use umstore_migrations::{MigrationState, Runner};

/// umstore data plane: the encrypted, region-sharded user-metadata store.
#[derive(Debug, Parser)]
#[command(name = "umstore-data-plane", version)]
struct Cli {
    /// PostgreSQL URL (postgres://user:pass@host:port/db) or key=value conninfo.
    /// Without it, a private PostgreSQL cluster under --data-dir is used (local runs only).
    #[arg(
        long,
        env = "UMSTORE_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    database_url: Option<String>,

    /// Directory for the embedded PostgreSQL cluster and the local key file
    /// [default: /var/lib/umstore as root, else ~/.local/share/umstore].
    #[arg(long, env = "UMSTORE_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,

    #[command(flatten)]
    keys: KeyArgs,

    #[command(subcommand)]
    command: Command,
}

/// Where data keys are wrapped: Vault transit, or (local runs only) a key file.
#[derive(Debug, clap::Args)]
struct KeyArgs {
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
    fn provider_config(&self, data_dir: &std::path::Path) -> Result<KeyProviderConfig> {
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
async fn open_keyring(
    config: KeyProviderConfig,
    client: &tokio_postgres::Client,
) -> Result<Keyring> {
    let provider = KeyProvider::open(config).await?;
    let cache = DataKeyCache::new(100_000, Duration::from_secs(300));
    Ok(Keyring::open(provider, cache, client).await?)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Schema migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Load deterministic synthetic users (COPY on two connections, committed together).
    Seed {
        /// How many users.
        #[arg(long, default_value_t = 10_000)]
        users: u64,
        /// Seed of the generator: the same seed gives the same users.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write the COPY text to one file per table in this directory instead
        /// of loading it (a baseline for `psql \copy`).
        #[arg(long)]
        write_copy_files: Option<PathBuf>,
    },
    /// Data keys: rotation and crypto-shredding.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Serve /healthz, /readyz and /metrics.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "UMSTORE_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Seed 10,000 demo users on first start (when the store is empty).
        #[arg(long)]
        demo: bool,
        /// Do not apply pending migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Rotate the transit key, rewrap every data key in batches (resumable),
    /// then retire the old key versions. Reads and writes go on meanwhile.
    Rotate {
        /// Keys per Vault call and per transaction.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
    },
    /// Destroy a user's data key: their PII, history included, becomes unreadable.
    ForgetUser {
        /// The user.
        user_id: uuid::Uuid,
        /// Who asks (recorded in the audit row).
        #[arg(long)]
        actor: String,
        /// Why (recorded in the audit row; no PII).
        #[arg(long)]
        reason: Option<String>,
    },
    /// The key's versions and how many data keys each wraps.
    Status,
}

#[derive(Debug, Subcommand)]
enum MigrateAction {
    /// Apply pending migrations.
    Up {
        /// Print the SQL of pending migrations instead of applying them.
        #[arg(long)]
        dry_run: bool,
    },
    /// List applied and pending migrations.
    Status,
    /// Fail unless every migration is applied with unchanged text.
    Verify,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> Result<()> {
    init_tracing();
    let cli = Cli::parse();
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);

    let (database, embedded) = match &cli.database_url {
        Some(url) => (Database::parse(url)?, None),
        None => {
            let embedded = Embedded::start(&data_dir)
                .await
                .context("starting the embedded PostgreSQL (or pass --database-url)")?;
            info!(conninfo = %embedded.conninfo(), "using the embedded PostgreSQL; connect with psql \"<conninfo>\"");
            (embedded.database().clone(), Some(embedded))
        }
    };
    let result = run(cli.command, &database, &data_dir, &cli.keys).await;
    if let Some(embedded) = embedded {
        embedded.stop();
    }
    result
}

async fn run(
    command: Command,
    database: &Database,
    data_dir: &std::path::Path,
    key_args: &KeyArgs,
) -> Result<()> {
    let runner = Runner::default();
    match command {
        Command::Migrate { action } => {
            let mut client = database.connect().await?;
            match action {
                MigrateAction::Up { dry_run: true } => {
                    let pending = runner.pending(&client).await?;
                    if pending.is_empty() {
                        println!(
                            "-- nothing to apply: the schema is at version {}",
                            runner.latest_version()
                        );
                    }
                    for m in pending {
                        println!(
                            "-- migration {:04}_{} (sha256 {})\n{}",
                            m.version,
                            m.name,
                            m.checksum(),
                            m.sql
                        );
                    }
                }
                MigrateAction::Up { dry_run: false } => {
                    let report = runner.up(&mut client).await?;
                    for (version, name, took) in &report.applied {
                        println!("applied {version:04}_{name} in {} ms", took.as_millis());
                    }
                    println!(
                        "schema at version {} ({} applied now, {} already applied)",
                        runner.latest_version(),
                        report.applied.len(),
                        report.already_applied
                    );
                }
                MigrateAction::Status => {
                    for s in runner.status(&client).await? {
                        let state = match &s.state {
                            MigrationState::Applied(a) => {
                                format!("applied {} ({} ms)", a.applied_at, a.duration_ms)
                            }
                            MigrationState::Changed {
                                applied,
                                embedded_checksum,
                            } => format!(
                                "CHANGED after it was applied (recorded {}, embedded {})",
                                applied.checksum, embedded_checksum
                            ),
                            MigrationState::Pending => "pending".to_owned(),
                            MigrationState::Unknown(a) => {
                                format!("applied {} by a newer umstore", a.applied_at)
                            }
                        };
                        println!("{:04}_{:<32} {state}", s.version, s.name);
                    }
                }
                MigrateAction::Verify => {
                    runner.verify(&client).await?;
                    println!("schema is current at version {}", runner.latest_version());
                }
            }
        }
        Command::Seed {
            users,
            seed,
            write_copy_files,
        } => {
            let mut client = database.connect().await?;
            runner
                .verify(&client)
                .await
                .context("the schema must be current before seeding: run `migrate up`")?;
            let keyring = open_keyring(key_args.provider_config(data_dir)?, &client).await?;
            if let Some(dir) = write_copy_files {
                seed::write_copy_files(&dir, users, seed, &keyring).await?;
                println!("wrote COPY files and load.psql to {}", dir.display());
                return Ok(());
            }
            // A second connection loads half of the tables in parallel.
            let mut second = database.connect().await?;
            let report =
                seed::seed_with(&mut client, Some(&mut second), users, seed, &keyring).await?;
            println!(
                "seeded {} users in {:.2} s ({:.0} users/s)",
                report.users,
                report.elapsed.as_secs_f64(),
                report.users_per_second()
            );
        }
        Command::Keys { action } => {
            let mut client = database.connect().await?;
            runner
                .verify(&client)
                .await
                .context("the schema must be current: run `migrate up`")?;
            let keyring = open_keyring(key_args.provider_config(data_dir)?, &client).await?;
            keys_command(action, &mut client, &keyring).await?;
        }
        Command::Serve {
            listen,
            demo,
            no_migrate,
        } => {
            serve(
                database, data_dir, &runner, listen, demo, no_migrate, key_args,
            )
            .await?
        }
    }
    Ok(())
}

async fn keys_command(
    action: KeysAction,
    client: &mut tokio_postgres::Client,
    keyring: &Keyring,
) -> Result<()> {
    match action {
        KeysAction::Rotate { batch_size } => {
            let opts = RotationOptions {
                batch_size,
                stop_after_batches: None,
            };
            let started = std::time::Instant::now();
            let report = rotate_and_rewrap(client, keyring.provider(), opts, |_| {}).await?;
            println!(
                "rotation {} done: every data key wrapped under version {} ({} rewrapped by this run{}) in {:.1} s; older versions retired",
                report.rotation_id,
                report.version,
                report.rewrapped_now,
                if report.resumed { ", resumed" } else { "" },
                started.elapsed().as_secs_f64()
            );
        }
        KeysAction::ForgetUser {
            user_id,
            actor,
            reason,
        } => {
            let report = keyring
                .forget_user(client, user_id, &actor, reason.as_deref())
                .await?;
            if report.destroyed_now {
                println!(
                    "user {user_id} ({}) erased: data key destroyed, PII unreadable",
                    report.region
                );
            } else {
                println!(
                    "user {user_id} ({}) was already erased; nothing changed",
                    report.region
                );
            }
        }
        KeysAction::Status => {
            let versions = keyring.provider().versions().await?;
            println!(
                "key {}: latest version {}, min decryption version {}",
                keyring.provider().kek_name(),
                versions.latest,
                versions.min_decryption
            );
            let rows = client
                .query(
                    "SELECT kek_name, kek_version, count(*) FILTER (WHERE wrapped_key IS NOT NULL),
                            count(*) FILTER (WHERE wrapped_key IS NULL)
                     FROM umstore.user_data_keys GROUP BY 1, 2 ORDER BY 1, 2",
                    &[],
                )
                .await?;
            for r in rows {
                println!(
                    "  {} v{}: {} data keys, {} destroyed",
                    r.get::<_, String>(0),
                    r.get::<_, i32>(1),
                    r.get::<_, i64>(2),
                    r.get::<_, i64>(3)
                );
            }
        }
    }
    Ok(())
}

async fn serve(
    database: &Database,
    data_dir: &std::path::Path,
    runner: &Runner,
    listen: SocketAddr,
    demo: bool,
    no_migrate: bool,
    key_args: &KeyArgs,
) -> Result<()> {
    // Refuse a forbidden local provider before anything starts.
    let provider_config = key_args.provider_config(data_dir)?;
    if let KeyProviderConfig::Local {
        require_vault: true,
        ..
    } = provider_config
    {
        bail!("--require-vault is set but no --vault-addr was given");
    }
    let metrics = Arc::new(Metrics::new());
    let slot = DbSlot::empty("connecting to the database");
    let keys = KeysSlot::empty("opening the key provider");
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}: pass --listen with a free address"))?;
    info!(%listen, "serving /healthz, /readyz, /metrics");
    let supervisor = tokio::spawn(api::supervise_database(
        database.clone(),
        slot.clone(),
        metrics.clone(),
    ));
    let prepare = {
        let (database, runner, keys) = (database.clone(), runner.clone(), keys.clone());
        tokio::spawn(async move {
            if let Err(e) =
                prepare(&database, &runner, provider_config, &keys, demo, no_migrate).await
            {
                let message = format!("{e:#}");
                error!(error = %message, "preparing the store failed");
                keys.set(Err(message)).await;
            }
        })
    };
    let state = AppState {
        db: slot,
        keys,
        runner: Arc::new(runner.clone()),
        no_migrate,
        metrics,
    };
    let served = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    supervisor.abort();
    prepare.abort();
    served.context("HTTP server failed")?;
    info!("stopped");
    Ok(())
}

/// Applies migrations (unless told not to) and seeds demo data, retrying
/// until the database is reachable; /readyz reports progress meanwhile.
async fn prepare(
    database: &Database,
    runner: &Runner,
    provider_config: KeyProviderConfig,
    keys: &KeysSlot,
    demo: bool,
    no_migrate: bool,
) -> Result<()> {
    let mut client = loop {
        match database.connect_with_retry(Duration::from_secs(3600)).await {
            Ok(c) => break c,
            Err(e) => warn!(error = %e, "still waiting for the database"),
        }
    };
    if no_migrate {
        wait_for_schema(&client, runner, keys).await;
    } else {
        let report = runner.up(&mut client).await?;
        info!(
            applied = report.applied.len(),
            version = runner.latest_version(),
            "schema migrated"
        );
    }
    let keyring = Arc::new(open_keyring(provider_config, &client).await?);
    keys.set(Ok(keyring.clone())).await;
    if demo {
        let empty: bool = client
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM umstore.user_directory)",
                &[],
            )
            .await?
            .get(0);
        if empty {
            let report = seed::seed(&mut client, 10_000, 1, &keyring).await?;
            info!(
                users = report.users,
                secs = report.elapsed.as_secs_f64(),
                "demo users seeded"
            );
        } else {
            info!("store already has users; --demo seeds only an empty store");
        }
    }
    Ok(())
}

/// With `--no-migrate` someone else (the operator's migrate step) applies the
/// schema: wait until it is the one this binary was built for, saying so on /readyz.
async fn wait_for_schema(client: &tokio_postgres::Client, runner: &Runner, keys: &KeysSlot) {
    let version = runner.latest_version();
    let mut backoff = umstore_data_plane::backoff::Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(10),
    );
    loop {
        let reason = match runner.verify(client).await {
            Ok(()) => return,
            Err(e) => format!(
                "waiting for schema version {version} (--no-migrate: the operator's migrate \
                 step applies it): {e}"
            ),
        };
        warn!(%reason, "schema not ready");
        keys.set(Err(reason)).await;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    info!("shutting down");
}
