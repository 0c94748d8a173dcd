//! `serve`: /healthz, /readyz and /metrics, with the store prepared (migrated,
//! keyring open, demo users seeded) in the background.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tracing::{error, info, warn};
use umstore_data_plane::api::{self, AppState, DbSlot, KeysSlot};
use umstore_data_plane::backoff::Backoff;
use umstore_data_plane::crypto::KeyProviderConfig;
use umstore_data_plane::db::Database;
use umstore_data_plane::metrics::Metrics;
use umstore_data_plane::seed;
use umstore_migrations::Runner;

use super::{open_keyring, KeyArgs};

/// The arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "UMSTORE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Seed 10,000 demo users on first start (when the store is empty).
    #[arg(long)]
    demo: bool,
    /// Do not apply pending migrations at start.
    #[arg(long)]
    no_migrate: bool,
}

/// Serves until SIGINT or SIGTERM. The listener is bound first; the database and the
/// key provider are reached in the background, and /readyz says what is missing.
pub async fn run(
    args: ServeArgs,
    database: &Database,
    data_dir: &Path,
    key_args: &KeyArgs,
) -> Result<()> {
    let ServeArgs {
        listen,
        demo,
        no_migrate,
    } = args;
    let runner = Runner::default();
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
        runner: Arc::new(runner),
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
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
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

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
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
    info!("shutting down");
}
