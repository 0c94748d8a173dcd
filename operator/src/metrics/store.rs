//! Per-store gauges, `umstore_operator_store_*{namespace, store}`: what each store's
//! status says (tier, readiness, key version and rotation, replica lag, the last
//! backup), set every
//! time the status step computes it, so alerts and dashboards read the operator's
//! view of every store from one target. A deleted store's series are removed, and
//! a replica that loses the leader Lease drops them all (the new leader sets them).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};

use k8s_openapi::jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use umstore_crds::{condition, UserMetadataStoreStatus};

/// Labels of a per-store gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// The store's namespace.
    pub namespace: String,
    /// The store's name.
    pub store: String,
}

/// Labels of a replica pool member's lag.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    /// The store's namespace.
    pub namespace: String,
    /// The store's name.
    pub store: String,
    /// The replica pool's purpose (`ai`, `analytics`).
    pub pool: String,
    /// The member's pod.
    pub pod: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The per-store gauge families.
pub(super) struct StoreGauges {
    tier: Family<StoreLabels, Gauge>,
    ready: Family<StoreLabels, Gauge>,
    key_version: Family<StoreLabels, Gauge>,
    rotation_running: Family<StoreLabels, Gauge>,
    rotation_failed: Family<StoreLabels, Gauge>,
    rotation_rewrapped: Family<StoreLabels, Gauge>,
    lag_seconds: Family<ReplicaLabels, FloatGauge>,
    lag_bytes: Family<ReplicaLabels, Gauge>,
    last_backup: Family<StoreLabels, FloatGauge>,
    stats_views_refreshed: Family<StoreLabels, FloatGauge>,
    /// The replica series set for each store, to remove those of members that left.
    members: Mutex<HashMap<StoreLabels, Vec<ReplicaLabels>>>,
}

impl StoreGauges {
    /// Registers the families in `registry` (prefixed `umstore_operator`).
    pub(super) fn register(registry: &mut Registry) -> Self {
        let gauges = Self {
            tier: Family::default(),
            ready: Family::default(),
            key_version: Family::default(),
            rotation_running: Family::default(),
            rotation_failed: Family::default(),
            rotation_rewrapped: Family::default(),
            lag_seconds: Family::default(),
            lag_bytes: Family::default(),
            last_backup: Family::default(),
            stats_views_refreshed: Family::default(),
            members: Mutex::new(HashMap::new()),
        };
        registry.register(
            "store_tier",
            "The tier the store's running topology implements (status.tier)",
            gauges.tier.clone(),
        );
        registry.register(
            "store_ready",
            "1 while the store's Ready condition is True, else 0",
            gauges.ready.clone(),
        );
        registry.register(
            "store_key_version",
            "The transit key version new data keys are wrapped under (status.keyVersion)",
            gauges.key_version.clone(),
        );
        registry.register(
            "store_key_rotation_running",
            "1 while a key rotation is rewrapping the store's data keys",
            gauges.rotation_running.clone(),
        );
        registry.register(
            "store_key_rotation_failed",
            "1 while the store's last key rotation attempt failed (it is retried with backoff)",
            gauges.rotation_failed.clone(),
        );
        registry.register(
            "store_key_rotation_rewrapped",
            "Data keys the running or last key rotation has rewrapped",
            gauges.rotation_rewrapped.clone(),
        );
        registry.register(
            "store_replica_lag_seconds",
            "How far a replica pool member is behind the primary (status.replicaLag, \
             from pg_stat_replication at the last reconcile)",
            gauges.lag_seconds.clone(),
        );
        registry.register(
            "store_replica_lag_bytes",
            "WAL bytes a replica pool member has not replayed (status.replicaLag)",
            gauges.lag_bytes.clone(),
        );
        registry.register(
            "store_last_backup_timestamp_seconds",
            "When the store's last backup completed, Unix seconds \
             (status.backup.lastBackup.completedAt)",
            gauges.last_backup.clone(),
        );
        registry.register(
            "store_stats_views_refreshed_timestamp_seconds",
            "When the store's least recently refreshed stats view was last refreshed, \
             Unix seconds (status.statsViews; only where refreshes are scheduled)",
            gauges.stats_views_refreshed.clone(),
        );
        gauges
    }

    /// Sets every gauge of `namespace/store` from `status`; a field the status
    /// lacks removes its series.
    pub(super) fn observe(&self, namespace: &str, store: &str, status: &UserMetadataStoreStatus) {
        let labels = StoreLabels {
            namespace: namespace.to_owned(),
            store: store.to_owned(),
        };
        set_or_remove(&self.tier, &labels, status.tier.map(i64::from));
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == condition::READY && c.status == "True");
        self.ready.get_or_create(&labels).set(i64::from(ready));
        let keys = status.keys.as_ref();
        let version = status.key_version.or(keys.and_then(|k| k.version));
        set_or_remove(&self.key_version, &labels, version.map(i64::from));
        let rotation = keys.and_then(|k| k.rotation.as_ref());
        let state = rotation.map(|r| r.state.as_str());
        self.rotation_running
            .get_or_create(&labels)
            .set(i64::from(state == Some("Running")));
        self.rotation_failed
            .get_or_create(&labels)
            .set(i64::from(state == Some("Failed")));
        set_or_remove(
            &self.rotation_rewrapped,
            &labels,
            rotation.map(|r| r.rewrapped),
        );
        let completed = status
            .backup
            .as_ref()
            .and_then(|b| b.last_backup.as_ref())
            .and_then(|r| r.completed_at.parse::<Timestamp>().ok())
            .map(|t| t.as_millisecond() as f64 / 1000.0);
        set_or_remove(&self.last_backup, &labels, completed);
        let oldest_view = status
            .stats_views
            .iter()
            .filter_map(|v| v.refreshed_at.parse::<Timestamp>().ok())
            .min()
            .map(|t| t.as_millisecond() as f64 / 1000.0);
        set_or_remove(&self.stats_views_refreshed, &labels, oldest_view);

        let mut now = Vec::with_capacity(status.replica_lag.len());
        for lag in &status.replica_lag {
            let member = ReplicaLabels {
                namespace: labels.namespace.clone(),
                store: labels.store.clone(),
                pool: lag.pool.clone(),
                pod: lag.pod.clone(),
            };
            self.lag_bytes.get_or_create(&member).set(lag.lag_bytes);
            set_or_remove(&self.lag_seconds, &member, lag.lag_seconds);
            now.push(member);
        }
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        for gone in members
            .get(&labels)
            .into_iter()
            .flatten()
            .filter(|m| !now.contains(m))
        {
            self.lag_bytes.remove(gone);
            self.lag_seconds.remove(gone);
        }
        if now.is_empty() {
            members.remove(&labels);
        } else {
            members.insert(labels, now);
        }
    }

    /// Removes every series of `namespace/store`.
    pub(super) fn forget(&self, namespace: &str, store: &str) {
        let labels = StoreLabels {
            namespace: namespace.to_owned(),
            store: store.to_owned(),
        };
        for family in [
            &self.tier,
            &self.ready,
            &self.key_version,
            &self.rotation_running,
            &self.rotation_failed,
            &self.rotation_rewrapped,
        ] {
            family.remove(&labels);
        }
        self.last_backup.remove(&labels);
        self.stats_views_refreshed.remove(&labels);
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        for member in members.remove(&labels).into_iter().flatten() {
            self.lag_bytes.remove(&member);
            self.lag_seconds.remove(&member);
        }
    }

    /// Removes every store's series.
    pub(super) fn clear(&self) {
        for family in [
            &self.tier,
            &self.ready,
            &self.key_version,
            &self.rotation_running,
            &self.rotation_failed,
            &self.rotation_rewrapped,
        ] {
            family.clear();
        }
        self.last_backup.clear();
        self.lag_bytes.clear();
        self.lag_seconds.clear();
        self.members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// Sets the series to `value`, or removes it when there is none.
fn set_or_remove<L, N, A>(family: &Family<L, Gauge<N, A>>, labels: &L, value: Option<N>)
where
    L: Clone + std::hash::Hash + Eq,
    A: prometheus_client::metrics::gauge::Atomic<N> + Default,
{
    match value {
        Some(v) => {
            family.get_or_create(labels).set(v);
        }
        None => {
            family.remove(labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use umstore_crds::UserMetadataStore;

    use crate::metrics::Metrics;

    fn store(namespace: &str, name: &str) -> UserMetadataStore {
        serde_json::from_value(json!({
            "apiVersion": "umstore.io/v1alpha1", "kind": "UserMetadataStore",
            "metadata": {"name": name, "namespace": namespace, "uid": "u1"},
            "spec": {"tier": 2, "regions": ["KA"], "encryption": {}},
        }))
        .expect("store")
    }

    fn status(value: serde_json::Value) -> umstore_crds::UserMetadataStoreStatus {
        serde_json::from_value(value).expect("status")
    }

    fn rotating(members: &[(&str, i64)]) -> umstore_crds::UserMetadataStoreStatus {
        let lag: Vec<_> = members
            .iter()
            .map(|(pod, bytes)| json!({"pool": "ai", "pod": pod, "lagBytes": bytes, "lagSeconds": 0.25}))
            .collect();
        status(json!({
            "tier": 2,
            "phase": "Provisioning",
            "conditions": [{"type": "Ready", "status": "False", "reason": "RewrappingKeys",
                            "message": "", "lastTransitionTime": "2026-03-01T00:00:00Z"}],
            "keyVersion": 3,
            "keys": {"key": "transit/umstore-pii", "version": 3, "rotation": {
                "state": "Running", "trigger": "Schedule", "rewrapped": 42,
                "startedAt": "2026-03-01T00:00:00Z", "attempts": 1}},
            "replicaLag": lag,
            "backup": {"lastBackup": {"label": "20260301-010000F", "type": "full",
                "startedAt": "2026-03-01T01:00:00Z", "completedAt": "2026-03-01T01:02:03.5Z"}},
        }))
    }

    fn lines(metrics: &Metrics, store: &str) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("umstore_operator_store_"))
            .filter(|l| l.contains(&format!("store=\"{store}\"")))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_store_status_becomes_its_gauges() {
        let metrics = Metrics::new();
        metrics.observe_store(
            &store("umstore", "pilot"),
            &rotating(&[("pilot-replica-ai-0", 4096)]),
        );
        let body = metrics.encode();
        for line in [
            "umstore_operator_store_tier{namespace=\"umstore\",store=\"pilot\"} 2",
            "umstore_operator_store_ready{namespace=\"umstore\",store=\"pilot\"} 0",
            "umstore_operator_store_key_version{namespace=\"umstore\",store=\"pilot\"} 3",
            "umstore_operator_store_key_rotation_running{namespace=\"umstore\",store=\"pilot\"} 1",
            "umstore_operator_store_key_rotation_failed{namespace=\"umstore\",store=\"pilot\"} 0",
            "umstore_operator_store_key_rotation_rewrapped{namespace=\"umstore\",store=\"pilot\"} 42",
            "umstore_operator_store_replica_lag_seconds{namespace=\"umstore\",store=\"pilot\",pool=\"ai\",pod=\"pilot-replica-ai-0\"} 0.25",
            "umstore_operator_store_replica_lag_bytes{namespace=\"umstore\",store=\"pilot\",pool=\"ai\",pod=\"pilot-replica-ai-0\"} 4096",
            // 2026-03-01T01:02:03.5Z
            "umstore_operator_store_last_backup_timestamp_seconds{namespace=\"umstore\",store=\"pilot\"} 1772326923.5",
        ] {
            assert!(body.contains(line), "missing `{line}` in {body}");
        }

        // Ready, the rotation finished: the gauges follow the next status.
        let mut done = rotating(&[]);
        done.conditions[0].status = "True".into();
        if let Some(r) = done.keys.as_mut().and_then(|k| k.rotation.as_mut()) {
            r.state = "Succeeded".into();
        }
        metrics.observe_store(&store("umstore", "pilot"), &done);
        let body = metrics.encode();
        for line in [
            "umstore_operator_store_ready{namespace=\"umstore\",store=\"pilot\"} 1",
            "umstore_operator_store_key_rotation_running{namespace=\"umstore\",store=\"pilot\"} 0",
        ] {
            assert!(body.contains(line), "missing `{line}` in {body}");
        }
        assert!(
            !body.contains("pilot-replica-ai-0"),
            "a member no longer in status.replicaLag has no series: {body}"
        );
    }

    #[test]
    fn a_deleted_store_leaves_no_series_and_others_stay() {
        let metrics = Metrics::new();
        let members = [("a-replica-ai-0", 1), ("a-replica-ai-1", 2)];
        metrics.observe_store(&store("ns1", "a"), &rotating(&members));
        metrics.observe_store(&store("ns2", "b"), &rotating(&[("b-replica-ai-0", 3)]));
        assert_eq!(lines(&metrics, "a").len(), 11, "{}", metrics.encode());

        metrics.forget_store("ns1", "a");
        assert_eq!(lines(&metrics, "a"), Vec::<String>::new());
        assert_eq!(lines(&metrics, "b").len(), 9, "{}", metrics.encode());
    }

    #[test]
    fn a_replica_without_the_lease_exports_no_store_gauges() {
        let metrics = Metrics::new();
        metrics.set_leader(true);
        metrics.observe_store(&store("ns", "a"), &rotating(&[("a-replica-ai-0", 1)]));
        assert!(!lines(&metrics, "a").is_empty());
        metrics.set_leader(false);
        assert_eq!(lines(&metrics, "a"), Vec::<String>::new());
    }

    #[test]
    fn a_status_without_tier_or_keys_exports_no_such_series() {
        let metrics = Metrics::new();
        metrics.observe_store(&store("ns", "fresh"), &status(json!({"phase": "Pending"})));
        let names: Vec<String> = lines(&metrics, "fresh")
            .iter()
            .filter_map(|l| l.split('{').next().map(str::to_owned))
            .collect();
        assert_eq!(
            names,
            [
                "umstore_operator_store_ready",
                "umstore_operator_store_key_rotation_running",
                "umstore_operator_store_key_rotation_failed",
            ]
        );
    }
}
