//! What every reconcile shares: the client, the event recorder, metrics, the
//! leadership flag, the builders' environment and the per-object failure counts
//! that drive the retry backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use kube::Client;

use crate::builders::Env;
use crate::db::Connector;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::steps::keys::{Rotations, VaultAccess};

/// Shared state of the controller.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Whether this replica holds the Lease; no writes without it.
    pub leader: Leadership,
    /// The builders' environment.
    pub env: Env,
    /// How the bootstrap and migrate steps reach a store's PostgreSQL.
    pub connector: Connector,
    /// How the keys step reaches Vault.
    pub vault: VaultAccess,
    /// The key rotations running in this process.
    pub rotations: Rotations,
    /// Consecutive failures per object (`namespace/name`), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context publishing events as `umstore-operator` (`instance` names this replica).
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        leader: Leadership,
        env: Env,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: crate::meta::MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            leader,
            env,
            connector: Connector::in_cluster(),
            vault: VaultAccess::default(),
            rotations: Rotations::default(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The same context, reaching PostgreSQL through `connector`.
    pub fn with_connector(mut self, connector: Connector) -> Self {
        self.connector = connector;
        self
    }

    /// The same context, reaching Vault with `vault`.
    pub fn with_vault(mut self, vault: VaultAccess) -> Self {
        self.vault = vault;
        self
    }

    /// Records a failure of `key` and returns how long to wait before retrying:
    /// 5 s doubling per consecutive failure, at most 5 minutes.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let secs = 5u64.saturating_mul(1u64 << (*n - 1).min(6));
        Duration::from_secs(secs.min(300))
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(key);
    }
}
