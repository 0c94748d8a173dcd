//! `umstore-operator`: runs the controller, leader election and the metrics/health
//! HTTP server.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tracing::{info, warn};
use umstore_operator::builders::Env;
use umstore_operator::leader::{Leadership, LeaseLock};
use umstore_operator::metrics::{router, Health, Metrics};
use umstore_operator::steps::keys::{VaultAccess, VaultLogin};
use umstore_operator::{controller, Context};

/// The umstore operator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "UMSTORE_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "UMSTORE_OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// The operator's own namespace: holds the Lease; allowed through NetworkPolicies.
    #[arg(long, env = "POD_NAMESPACE", default_value = "umstore-system")]
    namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "umstore-operator")]
    identity: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "umstore-operator")]
    lease_name: String,
    /// Lease duration in seconds; renewed every third of it.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Vault role the operator's ServiceAccount logs in as (Kubernetes auth, on each
    /// store's `spec.encryption.auth.mountPath`) to create and rotate transit keys.
    #[arg(
        long,
        env = "UMSTORE_OPERATOR_VAULT_ROLE",
        default_value = "umstore-operator"
    )]
    vault_role: String,
    /// A Vault token instead of Kubernetes auth (an operator run outside the cluster).
    #[arg(long, env = "UMSTORE_OPERATOR_VAULT_TOKEN", hide_env_values = true)]
    vault_token: Option<String>,
    /// CA certificate (PEM) that Vault's TLS certificate is verified against.
    #[arg(long, env = "UMSTORE_OPERATOR_VAULT_CA_CERT")]
    vault_ca_cert: Option<std::path::PathBuf>,
    /// Data keys per Vault `rewrap` call and per transaction during a rotation.
    #[arg(long, default_value_t = 500)]
    rewrap_batch_size: usize,
    /// Stores reconciled at once at most (bounds memory as the fleet grows).
    #[arg(long, env = "UMSTORE_OPERATOR_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Changes to one store within this many milliseconds make one reconcile.
    #[arg(long, default_value_t = 1000)]
    debounce_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,kube=warn,vaultrs=off,rustify=off")
            }),
        )
        .init();
    let args = Args::parse();
    let metrics = Arc::new(Metrics::new());
    let config = kube::Config::infer().await.context(
        "reading the Kubernetes API's address and credentials (in-cluster or KUBECONFIG)",
    )?;
    let client = kube::client::ClientBuilder::try_from(config)
        .context("building the Kubernetes API client")?
        .with_layer(&metrics.counting_layer())
        .build();
    let leadership = Leadership::new(false);
    let lock = LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        &args.lease_name,
        &args.identity,
        Duration::from_secs(args.lease_seconds),
    );
    let release = LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        &args.lease_name,
        &args.identity,
        Duration::from_secs(args.lease_seconds),
    );
    tokio::spawn(lock.run(
        leadership.clone(),
        Duration::from_secs((args.lease_seconds / 3).max(1)),
    ));
    {
        let (leadership, metrics) = (leadership.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                metrics.set_leader(leadership.is_leader());
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }

    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let app = router(Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!(%error, "metrics server stopped");
        }
    });
    info!(listen = %args.listen, identity = %args.identity, "umstore-operator starting");

    let env = Env {
        operator_namespace: args.namespace.clone(),
    };
    let login = match args.vault_token {
        Some(token) => VaultLogin::Token(token),
        None => VaultLogin::Kubernetes {
            role: args.vault_role.clone(),
            token_path: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
        },
    };
    let vault = VaultAccess {
        login,
        ca_cert: args.vault_ca_cert.clone(),
        batch_size: args.rewrap_batch_size.max(1),
    };
    let ctx = Arc::new(
        Context::new(
            client,
            metrics,
            leadership.clone(),
            env,
            Some(args.identity.clone()),
        )
        .with_vault(vault),
    );
    let settings = controller::Settings {
        concurrency: args.concurrency,
        debounce: Duration::from_millis(args.debounce_ms),
    };
    controller::run_with(ctx, args.watch_namespace, ready, settings).await;

    leadership.set(false);
    if let Err(error) = release.release().await {
        warn!(%error, "could not release the leader Lease; another replica takes over when it expires");
    }
    Ok(())
}
