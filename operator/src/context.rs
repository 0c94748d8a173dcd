//! What every reconcile shares: the client, the event recorder, metrics, the
//! leadership flag, the builders' environment and the per-object failure counts
//! that drive the retry backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Reconciles in flight against the controller's concurrency.
    pub load: Load,
    /// Consecutive failures per object (`namespace/name`), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

/// How much longer a periodic recheck waits while every reconcile slot is
/// taken ([`Load::recheck_factor`]).
pub const SATURATED_RECHECK_FACTOR: u32 = 4;

/// How busy the controller is: the reconciles in flight and how many may be.
/// While every slot is taken the queue waits on the API server, and the
/// periodic rechecks of stores waiting on something not watched (a database
/// that does not answer yet, the resync of a healthy store) are what such a
/// queue can least afford: they are spread out, so that the work a change
/// brings (a new store's first reconcile, a pod becoming ready: watched, so
/// never delayed by this) gets the slots. At fleet scale this is most of the
/// reconciles while a fleet comes up (BENCHMARKS.md, "Fleet scale").
#[derive(Debug, Default)]
pub struct Load {
    in_flight: AtomicUsize,
    limit: AtomicUsize,
}

/// One reconcile in flight, until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Load);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Load {
    /// Sets how many reconciles may run at once (the controller's
    /// concurrency; 0: unbounded, never saturated).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Release);
    }

    /// Counts a reconcile as in flight until the guard is dropped.
    pub fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self)
    }

    /// What a periodic recheck's wait is multiplied by:
    /// [`SATURATED_RECHECK_FACTOR`] while every slot is taken (this
    /// reconcile's included), else 1.
    pub fn recheck_factor(&self) -> u32 {
        let limit = self.limit.load(Ordering::Acquire);
        let in_flight = self.in_flight.load(Ordering::Acquire);
        if limit > 1 && in_flight >= limit {
            SATURATED_RECHECK_FACTOR
        } else {
            1
        }
    }
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
            load: Load::default(),
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

#[cfg(test)]
mod load_tests {
    use super::*;

    #[test]
    fn rechecks_stretch_only_while_every_slot_is_taken() {
        let load = Load::default();
        load.set_limit(3);
        let a = load.enter();
        assert_eq!(load.recheck_factor(), 1, "free slots");
        let b = load.enter();
        let c = load.enter();
        assert_eq!(
            load.recheck_factor(),
            SATURATED_RECHECK_FACTOR,
            "all three taken"
        );
        drop(c);
        assert_eq!(load.recheck_factor(), 1, "a slot freed");
        drop((a, b));
        load.set_limit(1);
        let _only = load.enter();
        assert_eq!(load.recheck_factor(), 1, "one slot: never saturated");
        load.set_limit(0);
        assert_eq!(load.recheck_factor(), 1, "unbounded");
    }
}
