//! Prometheus metrics of the data plane.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Why a region's write check refused a write (a region moving between
/// clusters).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `fenced` (the region's write fence is up: retried soon, same cluster)
    /// or `moved` (the cluster no longer, or not yet, serves the region:
    /// placement refreshed, retried on the new cluster).
    pub reason: &'static str,
}

/// Labels of an HTTP request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Route template, e.g. `/readyz`.
    pub route: String,
    /// Status code.
    pub status: u16,
}

/// Labels of an ingested event: what became of it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestLabels {
    /// `applied`, `duplicate`, `stale`, `rejected`, `failed` or `deferred`
    /// (its region is moving between clusters: retried within a second).
    pub outcome: &'static str,
}

/// A cache lookup's result (the eligibility cache's and the read cache's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit` (an unexpired entry answered) or `miss`; the read cache also
    /// `bypass` (a request it may not answer).
    pub result: &'static str,
}

/// Why the read cache dropped entries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `metadata_stored`, `user_erased`, `verify` or `resubscribe`.
    pub reason: &'static str,
}

/// A read purpose (its replica's gauges).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PurposeLabels {
    /// The purpose's slug.
    pub purpose: &'static str,
}

/// A read API route (its template, e.g. `/api/v1/user-metadata/{user_id}`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route template.
    pub route: String,
}

/// Where a stats answer came from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatsSourceLabels {
    /// `view` (the materialized views), `live` (the tables) or `engine`
    /// (the tables' rows grouped on the bulk engine).
    pub source: &'static str,
}

/// A stats view.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViewLabels {
    /// The view's name in the refresh log (`stats_groups`).
    pub view: String,
}

/// A stats view refresh's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    /// The view.
    pub view: String,
    /// `refreshed`, `skipped` (another pod held the lock) or `failed`.
    pub result: &'static str,
}

/// A cluster of a store with several (its name in the layout).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// The cluster's name.
    pub cluster: String,
}

/// A read purpose's replica pool in one cluster of a store with several.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterReplicaLabels {
    /// The cluster's name.
    pub cluster: String,
    /// The purpose's slug.
    pub purpose: &'static str,
}

/// The bulk engine a process selected.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabels {
    /// `cpu` or `gpu`.
    pub engine: &'static str,
    /// What it runs on, in words (`x86_64, AES-NI + PCLMULQDQ`, a GPU's name).
    pub device: String,
}

/// Work done on a bulk engine.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineOpLabels {
    /// `cpu` or `gpu`.
    pub engine: &'static str,
    /// `seal`, `open` or `aggregate`.
    pub operation: &'static str,
}

fn read_histogram() -> Histogram {
    // 0.1 ms to about 3 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

fn read_histogram_wide() -> Histogram {
    // 1 ms to about 2.3 hours (an entry lives at most its TTL).
    Histogram::new(exponential_buckets(0.001, 2.0, 24))
}

fn lag_seconds(up: bool, lag: std::time::Duration) -> f64 {
    if up && lag != std::time::Duration::MAX {
        lag.as_secs_f64()
    } else {
        f64::INFINITY
    }
}

/// Every metric the data plane exports.
#[derive(Debug)]
pub struct Metrics {
    /// 1 while the purpose's replica answers as a standby.
    pub replica_up: Family<PurposeLabels, Gauge>,
    /// The purpose's replica lag in seconds (0 once caught up; +Inf when down).
    pub replica_lag_seconds: Family<PurposeLabels, Gauge<f64, AtomicU64>>,
    /// The purpose's replica lag in WAL bytes.
    pub replica_lag_bytes: Family<PurposeLabels, Gauge>,
    /// Eligibility cache lookups through the read API, by result.
    pub eligibility_cache: Family<CacheLabels, Counter>,
    /// Hits over lookups since start (0 before the first lookup).
    pub eligibility_cache_hit_ratio: Gauge<f64, AtomicU64>,
    /// Events settled, by outcome.
    pub ingest_events: Family<IngestLabels, Counter>,
    /// Seconds from taking a connection to commit, per applied event.
    pub ingest_apply_seconds: Histogram,
    /// Events published to the dead-letter subject.
    pub ingest_dead_letters: Counter,
    /// Read cache lookups of `GET /api/v1/user-metadata/{user_id}`, by result
    /// (`hit`, `miss`, `bypass`).
    pub read_cache_lookups: Family<CacheLabels, Counter>,
    /// Read cache hits over hits and misses since start.
    pub read_cache_hit_ratio: Gauge<f64, AtomicU64>,
    /// Read cache invalidations, by reason.
    pub read_cache_invalidations: Family<ReasonLabels, Counter>,
    /// Entries the read cache holds (refreshed at scrape).
    pub read_cache_entries: Gauge,
    /// 1 while the read cache may serve hits (its event subscription is up,
    /// or every hit is verified).
    pub read_cache_live: Gauge,
    /// Age of each entry a hit served: how stale a hit can be.
    pub read_cache_hit_age_seconds: Histogram,
    /// From an event's arrival in the outbound stream to its invalidation here.
    pub read_cache_invalidation_lag_seconds: Histogram,
    /// Seconds to answer a read API request, by route.
    pub read_duration_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Stats answers by source (`view`, `live` or `engine`).
    pub stats_requests: Family<StatsSourceLabels, Counter>,
    /// Seconds since each stats view was last refreshed (from the refresh
    /// log at scrape; absent until its first refresh).
    pub stats_view_age_seconds: Family<ViewLabels, Gauge<f64, AtomicU64>>,
    /// Seconds each scheduled refresh took (this process's refreshes).
    pub stats_refresh_duration_seconds: Family<ViewLabels, Histogram, fn() -> Histogram>,
    /// Scheduled refreshes by view and result.
    pub stats_refreshes: Family<RefreshLabels, Counter>,
    /// Route lookups (user id to region) of a store with several clusters,
    /// by result: `hit` (this process's cache), `miss` (read from the home
    /// cluster's `user_routes`, or not there).
    pub route_cache_lookups: Family<CacheLabels, Counter>,
    /// Users looked for in every cluster's directory (no route), by result
    /// (`hit`: found and the route written back, `miss`: no such user).
    pub route_fallbacks: Family<CacheLabels, Counter>,
    /// Queries sent to each cluster by reads and writes.
    pub cluster_queries: Family<ClusterLabels, Counter>,
    /// [`Self::replica_up`] per cluster of a store with several.
    pub cluster_replica_up: Family<ClusterReplicaLabels, Gauge>,
    /// [`Self::replica_lag_seconds`] per cluster of a store with several.
    pub cluster_replica_lag_seconds: Family<ClusterReplicaLabels, Gauge<f64, AtomicU64>>,
    /// [`Self::replica_lag_bytes`] per cluster of a store with several.
    pub cluster_replica_lag_bytes: Family<ClusterReplicaLabels, Gauge>,
    /// The highest epoch of the region placement (home's
    /// `umstore.region_placement`) this process has read; 0 before any
    /// region was placed there (several clusters).
    pub region_placement_epoch: Gauge,
    /// Writes refused by a region's write check (several clusters), by
    /// reason (`fenced`, `moved`); each is retried.
    pub region_write_refusals: Family<RefusalLabels, Counter>,
    /// 1 for the bulk engine this process selected at start
    /// (`--engine`), labelled with its name and device.
    pub bulk_engine_info: Family<EngineLabels, Gauge>,
    /// Fields (values) processed on the bulk engine, by engine and operation.
    pub bulk_engine_fields: Family<EngineOpLabels, Counter>,
    /// Bytes processed on the bulk engine, by engine and operation.
    pub bulk_engine_bytes: Family<EngineOpLabels, Counter>,
    /// Seconds spent on the bulk engine, by engine and operation.
    pub bulk_engine_seconds: Family<EngineOpLabels, Counter<f64, AtomicU64>>,
    registry: Registry,
    /// 1 while a database connection is up.
    pub db_connected: Gauge,
    /// Connection attempts that failed.
    pub db_connect_failures: Counter,
    /// Schema version the database is at (0 when unknown).
    pub schema_version: Gauge,
    /// HTTP requests by route and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// 1 while a KEK rotation is unfinished (read from `umstore.key_rotations` at scrape).
    pub key_rotation_in_progress: Gauge,
    /// Data keys rewrapped by the newest rotation so far.
    pub key_rotation_rewrapped: Gauge,
    /// The KEK version the newest rotation rewraps to.
    pub key_rotation_target_version: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `umstore` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("umstore");
        let db_connected = Gauge::default();
        registry.register(
            "db_connected",
            "1 while the data plane holds a database connection",
            db_connected.clone(),
        );
        let db_connect_failures = Counter::default();
        registry.register(
            "db_connect_failures",
            "Failed attempts to connect to the database",
            db_connect_failures.clone(),
        );
        let schema_version = Gauge::default();
        registry.register(
            "schema_version",
            "Applied schema migration version",
            schema_version.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests served",
            http_requests.clone(),
        );
        let ingest_events = Family::<IngestLabels, Counter>::default();
        registry.register(
            "ingest_events",
            "Events settled by the write path, by outcome",
            ingest_events.clone(),
        );
        // 0.25 ms to about 4 s.
        let ingest_apply_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 15));
        registry.register(
            "ingest_apply_seconds",
            "Time to apply one event (connection, transaction, commit)",
            ingest_apply_seconds.clone(),
        );
        let ingest_dead_letters = Counter::default();
        registry.register(
            "ingest_dead_letters",
            "Events the bus consumer published to the dead-letter subject (never applicable)",
            ingest_dead_letters.clone(),
        );
        let read_duration_seconds =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                read_histogram,
            );
        registry.register(
            "read_duration_seconds",
            "Time to answer a read API request, by route",
            read_duration_seconds.clone(),
        );
        let key_rotation_in_progress = Gauge::default();
        registry.register(
            "key_rotation_in_progress",
            "1 while a key-encryption-key rotation is rewrapping data keys",
            key_rotation_in_progress.clone(),
        );
        let key_rotation_rewrapped = Gauge::default();
        registry.register(
            "key_rotation_rewrapped",
            "Data keys rewrapped by the newest key rotation so far",
            key_rotation_rewrapped.clone(),
        );
        let key_rotation_target_version = Gauge::default();
        registry.register(
            "key_rotation_target_version",
            "Key-encryption-key version the newest rotation rewraps to",
            key_rotation_target_version.clone(),
        );
        let eligibility_cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "eligibility_cache_lookups",
            "Eligibility cache lookups by the read API, by result (hit: an unexpired entry)",
            eligibility_cache.clone(),
        );
        let eligibility_cache_hit_ratio = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "eligibility_cache_hit_ratio",
            "Eligibility cache hits over lookups since the process started",
            eligibility_cache_hit_ratio.clone(),
        );
        let read_cache_lookups = Family::<CacheLabels, Counter>::default();
        registry.register(
            "read_cache_lookups",
            "Read cache lookups of one user's metadata, by result (hit, miss, bypass)",
            read_cache_lookups.clone(),
        );
        let read_cache_hit_ratio = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "read_cache_hit_ratio",
            "Read cache hits over hits and misses since the process started",
            read_cache_hit_ratio.clone(),
        );
        let read_cache_invalidations = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "read_cache_invalidations",
            "Read cache invalidations, by reason (metadata_stored, user_erased, verify, resubscribe)",
            read_cache_invalidations.clone(),
        );
        let read_cache_entries = Gauge::default();
        registry.register(
            "read_cache_entries",
            "Entries the read cache holds",
            read_cache_entries.clone(),
        );
        let read_cache_live = Gauge::default();
        registry.register(
            "read_cache_live",
            "1 while the read cache may serve hits (its event subscription is up, or hits are verified)",
            read_cache_live.clone(),
        );
        let read_cache_hit_age_seconds = read_histogram_wide();
        registry.register(
            "read_cache_hit_age_seconds",
            "Age of the entry each read cache hit served",
            read_cache_hit_age_seconds.clone(),
        );
        let read_cache_invalidation_lag_seconds = read_histogram();
        registry.register(
            "read_cache_invalidation_lag_seconds",
            "From an event's arrival in the outbound stream to the read cache's invalidation",
            read_cache_invalidation_lag_seconds.clone(),
        );
        let replica_up = Family::<PurposeLabels, Gauge>::default();
        registry.register(
            "replica_up",
            "1 while the purpose's read replica answers as a standby",
            replica_up.clone(),
        );
        let replica_lag_seconds = Family::<PurposeLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "replica_lag_seconds",
            "How far the purpose's read replica is behind the primary (0 once caught up)",
            replica_lag_seconds.clone(),
        );
        let replica_lag_bytes = Family::<PurposeLabels, Gauge>::default();
        registry.register(
            "replica_lag_bytes",
            "WAL bytes the purpose's read replica has not replayed yet",
            replica_lag_bytes.clone(),
        );
        let stats_requests = Family::<StatsSourceLabels, Counter>::default();
        registry.register(
            "stats_requests",
            "Stats answers by source (view: the materialized views; live: the tables; engine: the tables grouped on the bulk engine)",
            stats_requests.clone(),
        );
        let stats_view_age_seconds = Family::<ViewLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "stats_view_age_seconds",
            "Seconds since the stats view was last refreshed (read from umstore.stats_refreshes)",
            stats_view_age_seconds.clone(),
        );
        let stats_refresh_duration_seconds =
            Family::<ViewLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                read_histogram_wide,
            );
        registry.register(
            "stats_refresh_duration_seconds",
            "Time one scheduled refresh of the stats views took in this process",
            stats_refresh_duration_seconds.clone(),
        );
        let stats_refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "stats_refreshes",
            "Scheduled refreshes of the stats views, by result (refreshed, skipped, failed)",
            stats_refreshes.clone(),
        );
        let route_cache_lookups = Family::<CacheLabels, Counter>::default();
        registry.register(
            "route_cache_lookups",
            "Route lookups of a store with several clusters, by result (hit: this process's cache)",
            route_cache_lookups.clone(),
        );
        let route_fallbacks = Family::<CacheLabels, Counter>::default();
        registry.register(
            "route_fallbacks",
            "Users without a route looked for in every cluster's directory, by result",
            route_fallbacks.clone(),
        );
        let cluster_queries = Family::<ClusterLabels, Counter>::default();
        registry.register(
            "cluster_queries",
            "Requests sent to each cluster of a store with several clusters",
            cluster_queries.clone(),
        );
        let cluster_replica_up = Family::<ClusterReplicaLabels, Gauge>::default();
        registry.register(
            "cluster_replica_up",
            "1 while the purpose's read replica in the cluster answers as a standby (several clusters)",
            cluster_replica_up.clone(),
        );
        let cluster_replica_lag_seconds =
            Family::<ClusterReplicaLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "cluster_replica_lag_seconds",
            "How far the purpose's read replica in the cluster is behind its primary (several clusters)",
            cluster_replica_lag_seconds.clone(),
        );
        let cluster_replica_lag_bytes = Family::<ClusterReplicaLabels, Gauge>::default();
        registry.register(
            "cluster_replica_lag_bytes",
            "WAL bytes the purpose's read replica in the cluster has not replayed (several clusters)",
            cluster_replica_lag_bytes.clone(),
        );
        let region_placement_epoch = Gauge::default();
        registry.register(
            "region_placement_epoch",
            "The highest epoch of the region placement read from the home cluster (several clusters)",
            region_placement_epoch.clone(),
        );
        let region_write_refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "region_write_refusals",
            "Writes refused by a region's write check while it moves between clusters, by reason \
             (fenced, moved); each is retried",
            region_write_refusals.clone(),
        );
        let bulk_engine_info = Family::<EngineLabels, Gauge>::default();
        registry.register(
            "bulk_engine_info",
            "1 for the bulk engine selected at start (--engine), by engine and device",
            bulk_engine_info.clone(),
        );
        let bulk_engine_fields = Family::<EngineOpLabels, Counter>::default();
        registry.register(
            "bulk_engine_fields",
            "Fields processed on the bulk engine, by engine and operation",
            bulk_engine_fields.clone(),
        );
        let bulk_engine_bytes = Family::<EngineOpLabels, Counter>::default();
        registry.register(
            "bulk_engine_bytes",
            "Bytes processed on the bulk engine, by engine and operation",
            bulk_engine_bytes.clone(),
        );
        let bulk_engine_seconds = Family::<EngineOpLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "bulk_engine_seconds",
            "Seconds spent on the bulk engine, by engine and operation",
            bulk_engine_seconds.clone(),
        );
        Self {
            bulk_engine_info,
            bulk_engine_fields,
            bulk_engine_bytes,
            bulk_engine_seconds,
            region_placement_epoch,
            region_write_refusals,
            cluster_replica_up,
            cluster_replica_lag_seconds,
            cluster_replica_lag_bytes,
            route_cache_lookups,
            route_fallbacks,
            cluster_queries,
            stats_requests,
            stats_view_age_seconds,
            stats_refresh_duration_seconds,
            stats_refreshes,
            replica_up,
            replica_lag_seconds,
            replica_lag_bytes,
            eligibility_cache,
            eligibility_cache_hit_ratio,
            ingest_events,
            ingest_apply_seconds,
            ingest_dead_letters,
            read_cache_lookups,
            read_cache_hit_ratio,
            read_cache_invalidations,
            read_cache_entries,
            read_cache_live,
            read_cache_hit_age_seconds,
            read_cache_invalidation_lag_seconds,
            read_duration_seconds,
            registry,
            db_connected,
            db_connect_failures,
            schema_version,
            http_requests,
            key_rotation_in_progress,
            key_rotation_rewrapped,
            key_rotation_target_version,
        }
    }

    /// Counts a write refused by a region's write check (`fenced` or `moved`).
    pub fn region_write_refused(&self, reason: &'static str) {
        self.region_write_refusals
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    /// Counts a request sent to `cluster`.
    pub fn cluster_query(&self, cluster: &str) {
        self.cluster_queries
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_owned(),
            })
            .inc();
    }

    /// Records a probe of `purpose`'s replica.
    pub fn replica(
        &self,
        purpose: &'static str,
        up: bool,
        lag: std::time::Duration,
        lag_bytes: u64,
    ) {
        let labels = PurposeLabels { purpose };
        self.replica_up.get_or_create(&labels).set(i64::from(up));
        self.replica_lag_seconds
            .get_or_create(&labels)
            .set(lag_seconds(up, lag));
        if up {
            self.replica_lag_bytes
                .get_or_create(&labels)
                .set(i64::try_from(lag_bytes).unwrap_or(i64::MAX));
        }
    }

    /// Records a probe of `purpose`'s replica in `cluster` (several clusters).
    pub fn cluster_replica(
        &self,
        cluster: &str,
        purpose: &'static str,
        up: bool,
        lag: std::time::Duration,
        lag_bytes: u64,
    ) {
        let labels = ClusterReplicaLabels {
            cluster: cluster.to_owned(),
            purpose,
        };
        self.cluster_replica_up
            .get_or_create(&labels)
            .set(i64::from(up));
        self.cluster_replica_lag_seconds
            .get_or_create(&labels)
            .set(lag_seconds(up, lag));
        if up {
            self.cluster_replica_lag_bytes
                .get_or_create(&labels)
                .set(i64::try_from(lag_bytes).unwrap_or(i64::MAX));
        }
    }

    /// Counts one eligibility cache lookup and updates the hit ratio.
    pub fn eligibility_lookup(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.eligibility_cache
            .get_or_create(&CacheLabels { result })
            .inc();
        let hits = self
            .eligibility_cache
            .get_or_create(&CacheLabels { result: "hit" })
            .get();
        let misses = self
            .eligibility_cache
            .get_or_create(&CacheLabels { result: "miss" })
            .get();
        self.eligibility_cache_hit_ratio
            .set(hits as f64 / (hits + misses).max(1) as f64);
    }

    /// Counts one read cache lookup (`hit`, `miss` or `bypass`) and updates
    /// the hit ratio.
    pub fn read_cache_lookup(&self, result: &'static str) {
        self.read_cache_lookups
            .get_or_create(&CacheLabels { result })
            .inc();
        let hits = self
            .read_cache_lookups
            .get_or_create(&CacheLabels { result: "hit" })
            .get();
        let misses = self
            .read_cache_lookups
            .get_or_create(&CacheLabels { result: "miss" })
            .get();
        self.read_cache_hit_ratio
            .set(hits as f64 / (hits + misses).max(1) as f64);
    }

    /// Counts one read cache invalidation.
    pub fn read_cache_invalidated(&self, reason: &'static str) {
        self.read_cache_invalidations
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Records how long a read API request on `route` took.
    pub fn read_answered(&self, route: &str, took: std::time::Duration) {
        self.read_duration_seconds
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts one stats answer from `source` (`view` or `live`).
    pub fn stats_answered(&self, source: &'static str) {
        self.stats_requests
            .get_or_create(&StatsSourceLabels { source })
            .inc();
    }

    /// Sets a stats view's age.
    pub fn stats_view_age(&self, view: &str, seconds: f64) {
        self.stats_view_age_seconds
            .get_or_create(&ViewLabels {
                view: view.to_owned(),
            })
            .set(seconds);
    }

    /// Counts one scheduled refresh of `view` and, when it ran, its duration.
    pub fn stats_refreshed(
        &self,
        view: &str,
        result: &'static str,
        took: Option<std::time::Duration>,
    ) {
        self.stats_refreshes
            .get_or_create(&RefreshLabels {
                view: view.to_owned(),
                result,
            })
            .inc();
        if let Some(took) = took {
            self.stats_refresh_duration_seconds
                .get_or_create(&ViewLabels {
                    view: view.to_owned(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// Records the bulk engine selected at start: its info gauge is 1.
    pub fn bulk_engine_selected(&self, engine: &'static str, device: &str) {
        self.bulk_engine_info
            .get_or_create(&EngineLabels {
                engine,
                device: device.to_owned(),
            })
            .set(1);
    }

    /// Counts one call on the bulk engine: `fields` values and `bytes`
    /// bytes of `operation` (`seal`, `open`, `aggregate`) in `took`.
    pub fn bulk_engine_ran(
        &self,
        engine: &'static str,
        operation: &'static str,
        fields: u64,
        bytes: u64,
        took: std::time::Duration,
    ) {
        let labels = EngineOpLabels { engine, operation };
        self.bulk_engine_fields
            .get_or_create(&labels)
            .inc_by(fields);
        self.bulk_engine_bytes.get_or_create(&labels).inc_by(bytes);
        self.bulk_engine_seconds
            .get_or_create(&labels)
            .inc_by(took.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selected_engine_and_its_throughput_are_exported() {
        let m = Metrics::new();
        m.bulk_engine_selected("cpu", "x86_64, AES-NI + PCLMULQDQ");
        m.bulk_engine_ran(
            "cpu",
            "aggregate",
            1_000,
            4_000,
            std::time::Duration::from_millis(250),
        );
        let text = m.encode();
        assert!(
            text.contains(
                "umstore_bulk_engine_info{engine=\"cpu\",device=\"x86_64, AES-NI + PCLMULQDQ\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "umstore_bulk_engine_fields_total{engine=\"cpu\",operation=\"aggregate\"} 1000"
            ),
            "{text}"
        );
        assert!(text.contains(
            "umstore_bulk_engine_bytes_total{engine=\"cpu\",operation=\"aggregate\"} 4000"
        ));
        assert!(text.contains(
            "umstore_bulk_engine_seconds_total{engine=\"cpu\",operation=\"aggregate\"} 0.25"
        ));
    }
}
