//! `umstore-data-plane`: migrate, seed, keys, stats and serve. This file parses the
//! command line, opens the database (the embedded PostgreSQL when no
//! `--database-url` is given) and hands over to the command's module in [`cli`].

mod cli;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing::info;
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::db::Database;
use umstore_data_plane::embedded::{default_data_dir, Embedded};

use cli::{
    bulk::BulkAction, keys::KeysAction, migrate::MigrateAction, regions::RegionsAction,
    seed::SeedArgs, serve::ServeArgs, stats::StatsAction, KeyArgs,
};

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

    /// A store of several clusters (tier 4): a JSON array of
    /// {"name", "regions", "primary": {"host", "port", "dbname"?},
    /// "replicas": {"<purpose>": {"host", "port", "dbname"?}}}, the home cluster
    /// first (docs/api.md, "Several clusters"). Every database URL is moved onto
    /// each cluster's servers (same login, password and TLS). Unset or one
    /// cluster: the URLs as given.
    #[arg(long, env = "UMSTORE_CLUSTERS", global = true)]
    clusters: Option<String>,

    /// The regions the store serves, comma-separated (the operator sets
    /// UMSTORE_REGIONS): with --clusters, every one must be in exactly one
    /// cluster and no cluster may hold another.
    #[arg(
        long = "store-regions",
        env = "UMSTORE_REGIONS",
        global = true,
        value_delimiter = ','
    )]
    store_regions: Option<Vec<String>>,

    /// Directory for the embedded PostgreSQL cluster and the local key file
    /// [default: /var/lib/umstore as root, else ~/.local/share/umstore].
    #[arg(long, env = "UMSTORE_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,

    #[command(flatten)]
    keys: KeyArgs,

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
    /// Load deterministic synthetic users (COPY on two connections, committed together).
    Seed(SeedArgs),
    /// Data keys: rotation and crypto-shredding.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// The materialized stats views.
    Stats {
        #[command(subcommand)]
        action: StatsAction,
    },
    /// Moving regions between the clusters of a store with several.
    Regions {
        #[command(subcommand)]
        action: RegionsAction,
    },
    /// Backfills and whole-region aggregations on the bulk engine (CPU or GPU).
    Bulk {
        #[command(subcommand)]
        action: BulkAction,
    },
    /// Serve /healthz, /readyz and /metrics.
    Serve(Box<ServeArgs>),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // vaultrs and rustify log every Vault answer they find an error in (a 403
        // the provider expects, among them); the provider reports what matters with
        // its own context.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,vaultrs=off,rustify=off"));
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
    // Checked before anything connects: a bad layout is a startup error.
    let layout = cli
        .clusters
        .as_deref()
        .map(Layout::parse)
        .transpose()?
        .filter(Layout::is_multi)
        .map(Arc::new);
    if let Some(layout) = &layout {
        if let Some(regions) = &cli.store_regions {
            let regions: Vec<String> = regions
                .iter()
                .map(|r| r.trim().to_owned())
                .filter(|r| !r.is_empty())
                .collect();
            layout.require_regions(&regions)?;
        }
        if cli.database_url.is_none() {
            anyhow::bail!(
                "--clusters (UMSTORE_CLUSTERS) names several clusters: give --database-url \
                 (UMSTORE_DATABASE_URL) too; the embedded PostgreSQL is one cluster"
            );
        }
        info!(
            clusters = ?layout.clusters().iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            home = %layout.clusters()[0].name,
            "a store of several clusters"
        );
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
    let keys = &cli.keys;
    let result = match cli.command {
        Command::Migrate { action } => cli::migrate::run(action, &database).await,
        Command::Seed(args) => cli::seed::run(args, &database, &data_dir, keys).await,
        Command::Keys { action } => {
            cli::keys::run(action, &database, layout.as_deref(), &data_dir, keys).await
        }
        Command::Stats { action } => cli::stats::run(action, &database, layout.as_deref()).await,
        Command::Regions { action } => {
            cli::regions::run(action, &database, layout.as_deref()).await
        }
        Command::Bulk { action } => {
            cli::bulk::run(action, &database, layout.as_deref(), &data_dir, keys).await
        }
        Command::Serve(args) => {
            cli::serve::run(
                *args,
                &database,
                layout,
                &data_dir,
                keys,
                embedded.is_some(),
            )
            .await
        }
    };
    if let Some(embedded) = embedded {
        embedded.stop();
    }
    result
}
