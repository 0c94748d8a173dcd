//! `umstore-data-plane`: migrate, seed and serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};
use umstore_data_plane::api::{self, AppState, DbSlot};
use umstore_data_plane::crypto::LocalKeyProvider;
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

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Schema migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Load deterministic synthetic users (COPY, one transaction).
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

    if let Command::Seed {
        users,
        seed,
        write_copy_files: Some(dir),
    } = &cli.command
    {
        let keys = Arc::new(LocalKeyProvider::open_or_create(&data_dir)?);
        let dir = dir.clone();
        let (users, seed) = (*users, *seed);
        tokio::task::spawn_blocking(move || seed::write_copy_files(&dir, users, seed, keys))
            .await??;
        return Ok(());
    }

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
    let result = run(cli.command, &database, &data_dir).await;
    if let Some(embedded) = embedded {
        embedded.stop();
    }
    result
}

async fn run(command: Command, database: &Database, data_dir: &std::path::Path) -> Result<()> {
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
            write_copy_files: _,
        } => {
            let mut client = database.connect().await?;
            runner
                .verify(&client)
                .await
                .context("the schema must be current before seeding: run `migrate up`")?;
            let keys = Arc::new(LocalKeyProvider::open_or_create(data_dir)?);
            let report = seed::seed(&mut client, users, seed, keys).await?;
            println!(
                "seeded {} users in {:.2} s ({:.0} users/s)",
                report.users,
                report.elapsed.as_secs_f64(),
                report.users_per_second()
            );
        }
        Command::Serve {
            listen,
            demo,
            no_migrate,
        } => serve(database, data_dir, &runner, listen, demo, no_migrate).await?,
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
) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let slot = DbSlot::new();
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
        let (database, runner, data_dir) =
            (database.clone(), runner.clone(), data_dir.to_path_buf());
        tokio::spawn(async move {
            if let Err(e) = prepare(&database, &runner, &data_dir, demo, no_migrate).await {
                error!(
                    error = format!("{e:#}"),
                    "preparing the store failed; /readyz reports the schema state"
                );
            }
        })
    };
    let state = AppState {
        db: slot,
        runner: Arc::new(runner.clone()),
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
    data_dir: &std::path::Path,
    demo: bool,
    no_migrate: bool,
) -> Result<()> {
    let mut client = loop {
        match database.connect_with_retry(Duration::from_secs(3600)).await {
            Ok(c) => break c,
            Err(e) => warn!(error = %e, "still waiting for the database"),
        }
    };
    if !no_migrate {
        let report = runner.up(&mut client).await?;
        info!(
            applied = report.applied.len(),
            version = runner.latest_version(),
            "schema migrated"
        );
    }
    if demo {
        let empty: bool = client
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM umstore.user_directory)",
                &[],
            )
            .await?
            .get(0);
        if empty {
            let keys = Arc::new(LocalKeyProvider::open_or_create(data_dir)?);
            let report = seed::seed(&mut client, 10_000, 1, keys).await?;
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
