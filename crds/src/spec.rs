//! `spec`: what the store should be (SPEC §3). Every field carries a doc comment,
//! which becomes its `kubectl explain` text, and a default where one is sensible.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use umstore_migrations::regions::REGIONS;

use crate::backup::{BackupSpec, BootstrapSpec};
use crate::rules;
use crate::status::UserMetadataStoreStatus;

/// A Processed User Metadata Store: PostgreSQL/Citus sharded by region, PgBouncer,
/// read-replica pools and the umstore data plane, at one of four scale tiers.
// clippy reads repeated `type_ = ...` inside the printcolumn entries as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "umstore.io",
    version = "v1alpha1",
    kind = "UserMetadataStore",
    plural = "usermetadatastores",
    shortname = "ums",
    category = "umstore",
    namespaced,
    status = "UserMetadataStoreStatus",
    derive = "PartialEq",
    doc = "A Processed User Metadata Store: region-sharded PostgreSQL/Citus, PgBouncer, replica pools and the data plane",
    printcolumn(
        name = "Tier",
        type_ = "integer",
        json_path = ".status.tier",
        description = "current tier"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Schema",
        type_ = "integer",
        json_path = ".status.schemaVersion",
        description = "applied schema version"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = rules::worker_groups_from_tier_3(),
    validation = rules::region_in_one_worker_group(),
    validation = rules::worker_regions_served(),
    validation = rules::every_region_placed(),
    validation = rules::bootstrap_immutable(),
    validation = rules::recovery_below_tier_3(),
    validation = rules::memory_only_cache_needs_events(),
    validation = rules::clusters_from_tier_4(),
    validation = rules::clusters_hold_the_worker_groups(),
    validation = rules::region_in_one_cluster(),
    validation = rules::every_region_in_a_cluster(),
    validation = rules::cluster_regions_served(),
    validation = rules::home_cluster_stays()
)]
#[serde(rename_all = "camelCase")]
pub struct UserMetadataStoreSpec {
    /// Scale tier floor, 1 to 4 (SPEC §2): 1 one PostgreSQL; 2 adds PgBouncer and the
    /// `ai` and `analytics` replica pools; 3 Citus with regional worker groups; 4 several
    /// regional Citus clusters. The tier can be raised, never lowered.
    #[serde(default = "default_tier")]
    #[x_kube(validation = rules::tier_range(), validation = rules::tier_never_decreases())]
    pub tier: i32,

    /// Automatic promotion: when on, the operator measures the user count and raises the
    /// tier when a threshold (10K, 1M, 10M users) is crossed.
    #[serde(default)]
    pub auto_promotion: AutoPromotionSpec,

    /// PostgreSQL/Citus image, exporter image, TLS, and resources and storage of the
    /// coordinator, the workers and the replicas.
    #[serde(default)]
    pub postgres: PostgresSpec,

    /// The regions (two-letter codes of Indian states and union territories) this store
    /// serves. Defaults to all 36.
    #[serde(default = "all_regions")]
    #[schemars(length(max = 36), inner(length(min = 2, max = 2)))]
    #[x_kube(validation = rules::regions_known(), merge_strategy = ListMerge::Set)]
    pub regions: Vec<String>,

    /// Citus worker groups (tier 3 and up): each holds the shards of the regions it lists.
    /// A region belongs to exactly one group. Removing a group deletes its StatefulSet only
    /// after its regions have been moved off it.
    #[serde(default)]
    #[schemars(length(max = 12))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub worker_groups: Vec<WorkerGroupSpec>,

    /// Several Citus clusters (tier 4): each its own coordinator, worker groups,
    /// replica pools and placement, together holding every region of `spec.regions`
    /// exactly once (data residency: a cluster's pods land only where its placement
    /// allows). The first cluster is the home cluster: it keeps the objects a
    /// tier-3 store runs (`<store>-coordinator`, `<store>-worker-<group>`) and the
    /// global user routes; the others are named `<store>-<cluster>-...`. With
    /// clusters, `spec.workerGroups` stays empty. Empty: one cluster, as at tier 3.
    /// Listing a region under another cluster moves its rows there online, one
    /// region at a time (`status.regionMoves`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 6))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub clusters: Vec<ClusterSpec>,

    /// Read-replica pools (tier 2 and up), one per purpose, streaming from the primary.
    /// Defaults to an `ai` pool and an `analytics` pool with one replica each.
    #[serde(default = "default_replica_pools")]
    #[schemars(length(max = 2))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["purpose".into()]))]
    pub replica_pools: Vec<ReplicaPoolSpec>,

    /// PgBouncer in front of the primary (tier 2 and up), transaction pooling.
    #[serde(default)]
    pub pgbouncer: PgBouncerSpec,

    /// The umstore data plane: write workers and read API.
    #[serde(default)]
    pub data_plane: DataPlaneSpec,

    /// Envelope encryption of PII: Vault (or OpenBao) transit key wrapping per-user data keys.
    #[serde(default)]
    pub encryption: EncryptionSpec,

    /// How schema migrations are applied.
    #[serde(default)]
    pub migrations: MigrationsSpec,

    /// The event bus the data plane consumes (SPEC §5): NATS JetStream. Without it the
    /// data plane ingests over HTTP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsSpec>,

    /// How long a cached eligibility result stays valid, as a duration (`24h`, `90m`).
    #[serde(default = "default_eligibility_ttl")]
    #[x_kube(validation = rules::duration_well_formed())]
    pub eligibility_cache_ttl: String,

    /// What happens to PersistentVolumeClaims and credential Secrets when the store is
    /// deleted: `Retain` (default) keeps them, `Delete` removes them.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,

    /// The materialized stats views the stats endpoint reads (docs/api.md, "Stats"):
    /// how often the data plane refreshes them and how old they may be when read.
    /// Unset: on from tier 4 with the defaults below; below tier 4 nothing refreshes
    /// them and stats are computed from the tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::stats_views_max_age_above_interval())]
    pub stats_views: Option<StatsViewsSpec>,

    /// Encrypted pgBackRest backups and WAL archiving (docs/backup.md). None when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// How the databases are created: empty (default) or restored from a store's
    /// backups (`recovery`). Cannot change after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,
}

fn default_tier() -> i32 {
    1
}

fn all_regions() -> Vec<String> {
    REGIONS.iter().map(|r| r.code.to_string()).collect()
}

fn default_replica_pools() -> Vec<ReplicaPoolSpec> {
    vec![
        ReplicaPoolSpec {
            purpose: ReplicaPurpose::Ai,
            replicas: 1,
        },
        ReplicaPoolSpec {
            purpose: ReplicaPurpose::Analytics,
            replicas: 1,
        },
    ]
}

fn default_eligibility_ttl() -> String {
    "24h".into()
}

fn default_true() -> bool {
    true
}

fn default_one() -> i32 {
    1
}

fn default_two() -> i32 {
    2
}

/// Automatic tier promotion.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoPromotionSpec {
    /// Promote automatically when the measured user count crosses a tier threshold.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The user counts at which each tier starts (SPEC §2: 10K, 1M, 10M).
    #[serde(default)]
    pub thresholds: PromotionThresholds,
}

impl Default for AutoPromotionSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            thresholds: PromotionThresholds::default(),
        }
    }
}

/// The user count from which each tier is used; each above the one before.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::thresholds_increase())]
pub struct PromotionThresholds {
    /// Users from which the store runs tier 2 (default 10,000).
    #[serde(default = "default_tier2_users")]
    #[schemars(range(min = 1))]
    pub tier2_users: i64,
    /// Users from which the store runs tier 3 (default 1,000,000); the spec must then
    /// name its worker groups.
    #[serde(default = "default_tier3_users")]
    #[schemars(range(min = 1))]
    pub tier3_users: i64,
    /// Users from which the store runs tier 4 (default 10,000,000).
    #[serde(default = "default_tier4_users")]
    #[schemars(range(min = 1))]
    pub tier4_users: i64,
}

fn default_tier2_users() -> i64 {
    10_000
}

fn default_tier3_users() -> i64 {
    1_000_000
}

fn default_tier4_users() -> i64 {
    10_000_000
}

impl Default for PromotionThresholds {
    fn default() -> Self {
        Self {
            tier2_users: default_tier2_users(),
            tier3_users: default_tier3_users(),
            tier4_users: default_tier4_users(),
        }
    }
}

impl PromotionThresholds {
    /// The tier a store of `users` users belongs to.
    pub fn tier_for(&self, users: i64) -> i32 {
        if users >= self.tier4_users {
            4
        } else if users >= self.tier3_users {
            3
        } else if users >= self.tier2_users {
            2
        } else {
            1
        }
    }

    /// The user count from which `tier` is used (tier 1: 0).
    pub fn users_for(&self, tier: i32) -> i64 {
        match tier {
            ..=1 => 0,
            2 => self.tier2_users,
            3 => self.tier3_users,
            _ => self.tier4_users,
        }
    }
}

/// PostgreSQL and Citus. Every PostgreSQL pod runs Patroni: the coordinator (with
/// the replica pools) and each worker group are Patroni clusters that fail over on
/// their own.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSpec {
    /// Image for every PostgreSQL pod: PostgreSQL 15 with Citus (used as plain
    /// PostgreSQL below tier 3), Patroni and pgBackRest (`images/postgres/Dockerfile`).
    #[serde(default = "default_postgres_image")]
    pub image: String,
    /// Image of the `postgres_exporter` sidecar in each PostgreSQL pod.
    #[serde(default = "default_exporter_image")]
    pub exporter_image: String,
    /// The primary (tiers 1–2) or Citus coordinator (tiers 3–4).
    #[serde(default)]
    pub coordinator: InstanceSpec,
    /// Each Citus worker pod (tier 3 and up).
    #[serde(default)]
    pub workers: InstanceSpec,
    /// Each read-replica pod.
    #[serde(default)]
    pub replicas: InstanceSpec,
    /// TLS for client connections. Without it, connections are not encrypted in transit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Members of the coordinator's Patroni cluster that may become its primary (the
    /// primary and its failover standbys; replica pools come on top). Default: 1 at
    /// tier 1, 2 from tier 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rules::at_least_one())]
    pub instances: Option<i32>,
    /// Durability: `Off` (asynchronous replication: a failover can lose the last
    /// transactions the old primary acknowledged) or `On` (Patroni's synchronous mode
    /// with one synchronous standby: an acknowledged commit is on two members, and
    /// only the synchronous standby may be promoted; with no healthy standby, writes
    /// go on asynchronously).
    #[serde(default)]
    pub synchronous: SynchronousMode,
}

/// Replication durability, see [`PostgresSpec::synchronous`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SynchronousMode {
    /// Asynchronous replication.
    #[default]
    Off,
    /// One synchronous standby (Patroni `synchronous_mode: true`).
    On,
}

fn default_postgres_image() -> String {
    "ghcr.io/umstore/postgres:15-citus13.0.3-patroni4.1.5".into()
}

fn default_exporter_image() -> String {
    "quay.io/prometheuscommunity/postgres-exporter:v0.17.1".into()
}

impl Default for PostgresSpec {
    fn default() -> Self {
        Self {
            image: default_postgres_image(),
            exporter_image: default_exporter_image(),
            coordinator: InstanceSpec::default(),
            workers: InstanceSpec::default(),
            replicas: InstanceSpec::default(),
            tls: None,
            instances: None,
            synchronous: SynchronousMode::Off,
        }
    }
}

/// Resources and storage of one kind of PostgreSQL pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// CPU and memory requests and limits of the PostgreSQL container, as Kubernetes
    /// quantities (`500m`, `8Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_resources")]
    #[x_kube(validation = rules::resource_quantities())]
    pub resources: Option<ResourceRequirements>,
    /// The data volume of each pod.
    #[serde(default)]
    pub storage: StorageSpec,
}

/// Largest number of entries in `resources.requests` and `resources.limits`.
pub const MAX_RESOURCE_ENTRIES: u32 = 16;
/// Longest quantity string in `resources.requests` and `resources.limits`.
pub const MAX_QUANTITY_LENGTH: u32 = 64;

/// The schema of an optional ResourceRequirements with its maps bounded, so the API
/// server can bound the cost of [`rules::resource_quantities`] (it refuses a rule over
/// maps and strings of unknown size).
fn bounded_resources(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Option<ResourceRequirements>>();
    if let Some(properties) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        for map in ["requests", "limits"] {
            if let Some(map) = properties.get_mut(map).and_then(|m| m.as_object_mut()) {
                map.insert("maxProperties".into(), MAX_RESOURCE_ENTRIES.into());
                if let Some(value) = map
                    .get_mut("additionalProperties")
                    .and_then(|v| v.as_object_mut())
                {
                    value.insert("maxLength".into(), MAX_QUANTITY_LENGTH.into());
                }
            }
        }
    }
    schema
}

/// A PersistentVolumeClaim template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Requested size, a Kubernetes quantity (`10Gi`).
    #[serde(default = "default_storage_size")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = rules::storage_quantity())]
    pub size: String,
    /// StorageClass; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_storage_size() -> String {
    "10Gi".into()
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// Server TLS.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A Secret in the store's namespace with `tls.crt` and `tls.key` (the servers'
    /// certificate) and `ca.crt` (the CA the operator and the data plane check it
    /// against), as a cert-manager Certificate writes it. With it, pg_hba.conf
    /// accepts remote connections only over TLS and clients verify the server.
    pub secret_name: String,
}

/// One Citus worker group (tier 3 and up).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerGroupSpec {
    /// Name of the group, a DNS label; part of its StatefulSet's name.
    #[schemars(length(min = 1, max = 30))]
    #[x_kube(validation = rules::dns_label())]
    pub name: String,
    /// Regions whose shards this group holds.
    #[schemars(length(max = 36), inner(length(min = 2, max = 2)))]
    #[x_kube(validation = rules::regions_known(), merge_strategy = ListMerge::Set)]
    pub regions: Vec<String>,
    /// Pods in the group: one primary and `replicas - 1` hot standbys.
    #[serde(default = "default_one")]
    #[x_kube(validation = rules::at_least_one())]
    pub replicas: i32,
}

/// One Citus cluster of a tier-4 store.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// Name of the cluster, a DNS label of at most 12 characters; part of its
    /// objects' names (except the home cluster's) and of the `umstore.io/cluster`
    /// label on its pods.
    #[schemars(length(min = 1, max = 12))]
    #[x_kube(validation = rules::dns_label())]
    pub name: String,
    /// The cluster's Citus worker groups; the cluster holds the regions they list.
    /// Group names are unique across the store.
    #[schemars(length(min = 1, max = 12))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub worker_groups: Vec<WorkerGroupSpec>,
    /// Where the cluster's database pods may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSpec>,
}

/// Where a cluster's database pods may run (its coordinator, workers and replicas).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Topology zones (`topology.kubernetes.io/zone`) the pods must run in: a
    /// required node affinity. Empty: any zone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub zones: Vec<String>,
    /// Tolerations for the nodes set aside for the cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

/// One read-replica pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPoolSpec {
    /// Who reads from this pool: `ai` (AI core, rules engine, JSON generator) or `analytics`.
    pub purpose: ReplicaPurpose,
    /// Hot-standby replicas in the pool.
    #[serde(default = "default_one")]
    #[x_kube(validation = rules::at_least_one())]
    pub replicas: i32,
}

/// The purpose of a replica pool.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaPurpose {
    /// AI core, eligibility rules engine, JSON profile generator.
    Ai,
    /// Analytics and dashboards (no PII columns).
    Analytics,
}

impl ReplicaPurpose {
    /// The lowercase name used in object names and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ai => "ai",
            Self::Analytics => "analytics",
        }
    }
}

/// PgBouncer (tier 2 and up).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PgBouncerSpec {
    /// PgBouncer image; it must have `pgbouncer` on its PATH.
    #[serde(default = "default_pgbouncer_image")]
    pub image: String,
    /// PgBouncer pods.
    #[serde(default = "default_two")]
    #[x_kube(validation = rules::at_least_one())]
    pub replicas: i32,
    /// Client connections each PgBouncer accepts, at most 500.
    #[serde(default = "default_max_client_connections")]
    #[x_kube(validation = rules::max_client_connections())]
    pub max_client_connections: i32,
    /// Server connections per (database, user) pool.
    #[serde(default = "default_pool_size")]
    #[x_kube(validation = rules::at_least_one())]
    pub default_pool_size: i32,
}

fn default_pgbouncer_image() -> String {
    "ghcr.io/cloudnative-pg/pgbouncer:1.24.1".into()
}

fn default_max_client_connections() -> i32 {
    500
}

fn default_pool_size() -> i32 {
    20
}

impl Default for PgBouncerSpec {
    fn default() -> Self {
        Self {
            image: default_pgbouncer_image(),
            replicas: default_two(),
            max_client_connections: default_max_client_connections(),
            default_pool_size: default_pool_size(),
        }
    }
}

/// The data plane.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataPlaneSpec {
    /// Data-plane image.
    #[serde(default = "default_data_plane_image")]
    pub image: String,
    /// Data-plane pods.
    #[serde(default = "default_two")]
    #[x_kube(validation = rules::at_least_one())]
    pub replicas: i32,
    /// CPU and memory requests and limits, as Kubernetes quantities (GPUs are set
    /// under `gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_resources")]
    #[x_kube(validation = rules::resource_quantities())]
    pub resources: Option<ResourceRequirements>,
    /// GPU scheduling for the bulk path; none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,
    /// The cache of `GET /api/v1/user-metadata/{id}` answers in every data-plane pod
    /// (docs/api.md). Unset: on from tier 4 with the defaults below, off below tier 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_cache: Option<ReadCacheSpec>,
}

/// The data plane's read cache: answers kept per purpose and user, dropped when the
/// outbound events say the user changed or was erased, and after `ttl` at the latest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReadCacheSpec {
    /// Answers kept per pod (one per purpose and user; a few KiB each); 0 turns the
    /// cache off.
    #[serde(default = "default_read_cache_entries")]
    #[x_kube(validation = rules::read_cache_entries())]
    pub entries: i64,
    /// How long an answer may be served after it was read, the bound on staleness if
    /// an invalidation is lost (`30s`, `5m`).
    #[serde(default = "default_read_cache_ttl")]
    #[x_kube(validation = rules::duration_well_formed())]
    pub ttl: String,
    /// What a hit is checked against: `Version` (one single-row read: the user is
    /// unchanged and not erased; an erased user is never served) or `None` (memory
    /// only, kept fresh by the outbound events; needs `spec.events`).
    #[serde(default)]
    pub verify: ReadCacheVerify,
}

/// The refresh schedule of the materialized stats views.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatsViewsSpec {
    /// How often the views are refreshed (concurrently, by one data-plane pod at a
    /// time), e.g. `10m`.
    #[serde(default = "default_stats_refresh_interval")]
    #[x_kube(validation = rules::duration_well_formed())]
    pub refresh_interval: String,
    /// The oldest a view may be to answer the stats endpoint; an older one is
    /// bypassed (stats computed from the tables) and alerted on.
    #[serde(default = "default_stats_max_age")]
    #[x_kube(validation = rules::duration_well_formed())]
    pub max_age: String,
}

fn default_stats_refresh_interval() -> String {
    "10m".into()
}

fn default_stats_max_age() -> String {
    "30m".into()
}

impl Default for StatsViewsSpec {
    fn default() -> Self {
        Self {
            refresh_interval: default_stats_refresh_interval(),
            max_age: default_stats_max_age(),
        }
    }
}

/// Entries of the read cache when the spec sets none (tier 4).
pub const DEFAULT_READ_CACHE_ENTRIES: i64 = 20_000;

fn default_read_cache_entries() -> i64 {
    DEFAULT_READ_CACHE_ENTRIES
}

fn default_read_cache_ttl() -> String {
    "30s".into()
}

impl Default for ReadCacheSpec {
    fn default() -> Self {
        Self {
            entries: default_read_cache_entries(),
            ttl: default_read_cache_ttl(),
            verify: ReadCacheVerify::default(),
        }
    }
}

/// How a read-cache hit is checked.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReadCacheVerify {
    /// Against the user's version, one single-row read per hit.
    #[default]
    Version,
    /// Not at all: the outbound events keep the cache fresh.
    None,
}

impl ReadCacheVerify {
    /// The data plane's `--read-cache-verify` value.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Version => "version",
            Self::None => "none",
        }
    }
}

fn default_data_plane_image() -> String {
    "ghcr.io/umstore/data-plane:0.1.0".into()
}

impl Default for DataPlaneSpec {
    fn default() -> Self {
        Self {
            image: default_data_plane_image(),
            replicas: default_two(),
            resources: None,
            gpu: None,
            read_cache: None,
        }
    }
}

/// GPU scheduling of data-plane pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// GPUs per pod, set as the limit of `resourceName`; 0 schedules no GPU.
    #[serde(default = "default_one")]
    #[x_kube(validation = rules::non_negative())]
    pub count: i32,
    /// Extended resource name of the GPU (`nvidia.com/gpu`, `amd.com/gpu`).
    #[serde(default = "default_gpu_resource")]
    #[schemars(length(max = 317))]
    #[x_kube(validation = rules::extended_resource_name())]
    pub resource_name: String,
    /// Node labels the pods must match (GPU nodes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for tainted GPU nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// RuntimeClass of the pods (e.g. `nvidia`), if the cluster needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".into()
}

/// Envelope encryption of PII.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSpec {
    /// Vault or OpenBao address (`https://vault.vault:8200`). Needed in a cluster: the
    /// data plane refuses to start there without Vault (local keys are for development
    /// only); while unset the store reports `Degraded` (reason `NoVault`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = rules::vault_address_url())]
    pub vault_address: Option<String>,
    /// How the data plane logs in to Vault.
    #[serde(default)]
    pub auth: VaultAuthSpec,
    /// Mount path of the transit secrets engine.
    #[serde(default = "default_transit_mount")]
    pub transit_mount: String,
    /// Name of the transit key that wraps the per-user data keys.
    #[serde(default = "default_key_name")]
    pub key_name: String,
    /// How often the transit key is rotated, as a duration (`720h`).
    #[serde(default = "default_rotation_interval")]
    #[x_kube(validation = rules::duration_well_formed())]
    pub rotation_interval: String,
}

fn default_transit_mount() -> String {
    "transit".into()
}

fn default_key_name() -> String {
    "umstore-pii".into()
}

fn default_rotation_interval() -> String {
    "720h".into()
}

impl Default for EncryptionSpec {
    fn default() -> Self {
        Self {
            vault_address: None,
            auth: VaultAuthSpec::default(),
            transit_mount: default_transit_mount(),
            key_name: default_key_name(),
            rotation_interval: default_rotation_interval(),
        }
    }
}

/// Vault Kubernetes auth: the data plane's ServiceAccount token is exchanged for a token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultAuthSpec {
    /// Mount path of the Kubernetes auth method.
    #[serde(default = "default_auth_mount")]
    pub mount_path: String,
    /// Vault role bound to the data plane's ServiceAccount.
    #[serde(default = "default_auth_role")]
    pub role: String,
}

fn default_auth_mount() -> String {
    "kubernetes".into()
}

fn default_auth_role() -> String {
    "umstore".into()
}

impl Default for VaultAuthSpec {
    fn default() -> Self {
        Self {
            mount_path: default_auth_mount(),
            role: default_auth_role(),
        }
    }
}

/// The NATS JetStream bus the data plane consumes events from and publishes to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EventsSpec {
    /// NATS server URL, `nats://` or `tls://` with a host
    /// (`nats://nats.messaging.svc:4222`). No credentials in the URL: name a Secret in
    /// `credentialsSecret` instead.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = rules::nats_url())]
    pub nats_url: String,
    /// Prefix of the event subjects: inbound `<prefix>.in.<REGION>.<EVENT_TYPE>`, dead
    /// letters `<prefix>.dlq`, outbound `<prefix>.out.<EVENT_TYPE>`. NATS subject
    /// tokens (letters, digits, `_`, `-`) separated by dots, no wildcards.
    #[serde(default = "default_subject_prefix")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = rules::subject_prefix())]
    pub subject_prefix: String,
    /// Prefix of the JetStream names: streams `<prefix>_EVENTS_IN`, `<prefix>_EVENTS_OUT`
    /// and `<prefix>_EVENTS_DLQ`, durable consumer `<prefix>_INGEST`. An uppercase
    /// letter, then at most 31 uppercase letters, digits or `_`.
    #[serde(default = "default_stream_prefix")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = rules::stream_prefix())]
    pub stream_prefix: String,
    /// Secret in the store's namespace holding the NATS user in its keys `username` and
    /// `password`; the data plane reads them from it (they never appear in its pod
    /// spec). Unset: the data plane connects without credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::credentials_secret_name())]
    pub credentials_secret: Option<String>,
    /// Concurrent apply workers in each data-plane pod, 1 to 64.
    #[serde(default = "default_ingest_workers")]
    #[x_kube(validation = rules::ingest_workers())]
    pub workers: i32,
    /// How long the inbound stream keeps messages, as a duration of days, hours,
    /// minutes and seconds (`7d`, `72h`, `1d12h`).
    #[serde(default = "default_events_max_age")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = rules::retention_duration())]
    pub max_age: String,
}

fn default_subject_prefix() -> String {
    "umstore.events".into()
}

fn default_stream_prefix() -> String {
    "UMSTORE".into()
}

fn default_ingest_workers() -> i32 {
    4
}

fn default_events_max_age() -> String {
    "7d".into()
}

/// Schema migrations.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationsSpec {
    /// `Auto` applies pending migrations during reconcile; `Manual` only reports them.
    #[serde(default)]
    pub policy: MigrationPolicy,
}

/// When migrations run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MigrationPolicy {
    /// Apply pending migrations during reconcile.
    #[default]
    Auto,
    /// Report pending migrations in status; apply nothing.
    Manual,
}

/// What deleting the store does to its data.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReclaimPolicy {
    /// Keep PersistentVolumeClaims and credential Secrets.
    #[default]
    Retain,
    /// Delete them with the store.
    Delete,
}
