//! `status`: what the store is (SPEC §3). Written only by the operator, through the
//! status subresource.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types, in pipeline order (SPEC §3).
pub mod condition {
    /// Every step is done and every component is ready.
    pub const READY: &str = "Ready";
    /// Every owned object is applied (validate, credentials, topology done).
    pub const PROVISIONED: &str = "Provisioned";
    /// Databases, roles, extensions and worker registration are done.
    pub const BOOTSTRAPPED: &str = "Bootstrapped";
    /// The schema is at the latest migration.
    pub const SCHEMA_READY: &str = "SchemaReady";
    /// Tables are distributed over the worker groups (tier 3 and up).
    pub const DISTRIBUTED: &str = "Distributed";
    /// Encryption keys exist and are rotated on schedule.
    pub const KEYS_READY: &str = "KeysReady";
    /// A tier promotion is under way.
    pub const PROMOTING: &str = "Promoting";
    /// WAL is archived and a backup has completed (only with `spec.backup`).
    pub const BACKUP_READY: &str = "BackupReady";
    /// Something needs attention; the message says what.
    pub const DEGRADED: &str = "Degraded";
}

/// The store's observed state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UserMetadataStoreStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The tier the running topology implements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<i32>,
    /// One-word summary: Pending, Provisioning, Ready, Degraded, Invalid, Deleting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Ready, Provisioned, Bootstrapped, SchemaReady, Distributed, KeysReady, Promoting,
    /// Degraded. `lastTransitionTime` changes only when a condition's status changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The applied schema migration version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i32>,
    /// The transit key version that wraps the data keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<i32>,
    /// When the transit key was last rotated (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_key_rotation: Option<String>,
    /// Readiness of each component (StatefulSets and Deployments), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub components: Vec<ComponentStatus>,
    /// How far each streaming member of a replica pool is behind the primary, as the
    /// primary's `pg_stat_replication` showed it at the last reconcile that reached
    /// the primary. A member that is not streaming, or has not reported its replay
    /// position yet (the first seconds after it connects), is absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["pod".into()]))]
    pub replica_lag: Vec<ReplicaLag>,
    /// Where clients connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    /// The last `umstore.io/switchover-to` value the operator acted on (cleared when
    /// the annotation is removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<String>,
    /// Each Patroni cluster (the coordinator's, one per worker group): its leader
    /// and members, as Patroni reports them on the pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub groups: Vec<GroupStatus>,
    /// The regions each worker group holds shards of, as last distributed. A removed
    /// worker group is deleted only once it holds none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub placement: BTreeMap<String, Vec<String>>,
    /// Where each region's shards are, as the coordinator's `pg_dist_placement`
    /// showed it at the last distribute step: region → worker group (tier 3 and up).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, String>,
    /// Worker groups that left the spec and still hold shard placements, with how many
    /// are left to move off; their pods are deleted once none are left.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub draining: BTreeMap<String, i64>,
    /// The Citus group id (`pg_dist_node.groupid`, Patroni's `citus.group`) of each
    /// worker group, assigned once and kept while the group exists, so removing a
    /// group never renumbers the others.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub worker_group_ids: BTreeMap<String, i32>,
    /// The transit key and its rotation (the keys step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeysStatus>,
    /// Automatic promotion: the user count measured and the tier it calls for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<PromotionStatus>,
    /// Schema migrations: what is pending and what was approved (`Manual` policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrations: Option<MigrationsStatus>,
    /// Backups and WAL archiving (with `spec.backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatus>,
    /// The stats views (tier 4, or with `spec.statsViews`): when each was last
    /// refreshed, from the store's refresh log. Absent while no refresh is scheduled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stats_views: Vec<StatsViewStatus>,
    /// The Citus clusters of a tier-4 store with `spec.clusters`, home first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
    /// Regions moved between clusters (tier 4): the move under way, if any,
    /// then the last ones finished, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub region_moves: Vec<RegionMoveStatus>,
}

/// One move of a region from one cluster to another, from the home cluster's
/// journal (`umstore.region_moves`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionMoveStatus {
    /// The region.
    pub region: String,
    /// The cluster it leaves.
    pub from: String,
    /// The cluster it goes to.
    pub to: String,
    /// `copying`, `catching_up`, `fenced`, `switched` or `done`.
    pub phase: String,
    /// How long the region's writes were held back, in milliseconds (from the
    /// fence to the switch), once switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_ms: Option<f64>,
    /// Rows copied by the snapshot.
    #[serde(default)]
    pub rows_copied: i64,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it finished, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// One Citus cluster of a tier-4 store, as the operator last saw it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// The cluster (`spec.clusters[].name`).
    pub name: String,
    /// Whether this is the home cluster (the first; it holds the global user routes).
    #[serde(default)]
    pub home: bool,
    /// Whether every database workload of the cluster is ready.
    pub ready: bool,
    /// Why it is not ready (the first workload that is not, with its cause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The regions whose rows the cluster holds: recorded once the cluster's
    /// databases serve them (a region is in exactly one cluster's list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// The cluster's read-write endpoint (its coordinator, or the pooler's
    /// database for it) as `host:port/dbname`.
    pub read_write: String,
    /// Its replica pools' endpoints, by purpose.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replica_pools: BTreeMap<String, String>,
    /// The schema version applied on the cluster's coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i32>,
    /// The largest replay lag of its replica pool members, in bytes, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_bytes: Option<i64>,
}

/// Backups and WAL archiving as the operator last saw them: the backup Jobs'
/// reports and the primary's `pg_stat_archiver`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// The newest backup that completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupRecord>,
    /// Backups in the repository (after retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<i32>,
    /// The earliest time the store can be restored to: the end of the oldest backup kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earliest_recoverable_time: Option<String>,
    /// The latest time the store can be restored to: when the primary last archived
    /// a WAL segment (`pg_stat_archiver.last_archived_time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_recoverable_time: Option<String>,
    /// The Citus restore point (tier 3 and up) the newest backup ended with: restore
    /// the coordinator and every worker group to it (`--type=name`) for a cluster
    /// consistent across nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_point: Option<String>,
    /// The last WAL segment archiving failed for, while archiving fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_failing: Option<String>,
}

/// One completed backup, as pgBackRest reported it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    /// pgBackRest's label (`20261201-010000F`).
    pub label: String,
    /// `full`, `diff` or `incr`.
    #[serde(rename = "type")]
    pub type_: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it completed (RFC 3339).
    pub completed_at: String,
    /// The database size it covers, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// What it takes in the repository (compressed, encrypted), bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_size_bytes: Option<i64>,
}

/// The transit key that wraps the data keys, as the keys step last saw it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeysStatus {
    /// `<transit mount>/<key name>`.
    pub key: String,
    /// The version new data keys are wrapped under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
    /// The oldest version that still unwraps (older ones are retired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_decryption_version: Option<i32>,
    /// When the current version was created (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<String>,
    /// When the next scheduled rotation is due (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation: Option<String>,
    /// The last `umstore.io/rotate-keys` value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_request: Option<String>,
    /// The running or last rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationStatus>,
}

/// One rotation of the transit key and the rewrap of every data key.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    /// `Running`, `Succeeded` or `Failed`.
    pub state: String,
    /// Why it ran: `Schedule`, `Annotation` or `Resumed`.
    pub trigger: String,
    /// The version every data key is rewrapped to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<i32>,
    /// Data keys rewrapped so far.
    pub rewrapped: i64,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it finished or failed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Attempts so far (a failed one is retried with backoff).
    pub attempts: i32,
    /// What happened: the error of a failed attempt, or the summary.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Automatic promotion's measurement.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromotionStatus {
    /// Users as the statistics estimate them (`pg_stat_user_tables.n_live_tup` of the
    /// user directory): cheap, never a full count.
    pub measured_users: i64,
    /// When the count was measured at this value (RFC 3339): an unchanged count keeps
    /// its time, so a steady store's status is not rewritten.
    pub measured_at: String,
    /// The tier the count calls for, once the spec allows it; a floor like `spec.tier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_tier: Option<i32>,
    /// Why a tier the count calls for is not taken, if one is not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Schema migrations under the `Manual` policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationsStatus {
    /// Versions embedded in the operator and not applied yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<i32>,
    /// The version `umstore.io/approve-migrations` approved up to, once acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<i32>,
    /// The store's `metadata.generation` when the approval was acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_generation: Option<i64>,
}

/// One-word state of the store.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Accepted, nothing applied yet.
    Pending,
    /// Objects applied, components not all ready.
    Provisioning,
    /// Everything ready.
    Ready,
    /// Running, but a condition needs attention.
    Degraded,
    /// The spec cannot be realised; the `Ready` condition's message says what to change.
    Invalid,
    /// Being deleted.
    Deleting,
}

/// One Patroni cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// The cluster's scope (`<store>-coordinator`, `<store>-worker-<group>`).
    pub name: String,
    /// The pod that leads it, if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Its members, by pod name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
}

/// One member of a Patroni cluster, from the state Patroni publishes on its pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Pod name.
    pub name: String,
    /// `primary` or `replica` (Patroni's role label), empty before Patroni set it.
    pub role: String,
    /// Patroni's state of PostgreSQL (`running`, `starting`, `stopped`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The timeline the member is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<i64>,
    /// How far behind the leader's WAL position it is, in bytes (replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    /// Whether the pod is Ready.
    pub ready: bool,
}

/// One materialized stats view of the store (docs/api.md, "Stats").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsViewStatus {
    /// The view (`stats_groups`).
    pub name: String,
    /// The cluster whose view it is, on a store with several (absent: home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// When its last refresh began to read the tables (RFC 3339): its data is at
    /// least this fresh.
    pub refreshed_at: String,
    /// How long that refresh took, in milliseconds.
    pub duration_ms: i64,
    /// Groups (rows) it holds.
    pub groups: i64,
}

/// Replication lag of one replica pool member.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaLag {
    /// The pool's purpose (`ai`, `analytics`).
    pub pool: String,
    /// The member's pod.
    pub pod: String,
    /// WAL bytes the primary has written that the member has not replayed yet.
    pub lag_bytes: i64,
    /// How long ago the primary wrote the WAL the member last replayed, in seconds
    /// (PostgreSQL's `replay_lag`, millisecond precision; 0 for a member that has
    /// replayed everything). Absent while PostgreSQL has no measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
}

/// Readiness of one workload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// Workload name.
    pub name: String,
    /// `StatefulSet` or `Deployment`.
    pub kind: String,
    /// Desired pods.
    pub replicas: i32,
    /// Ready pods.
    pub ready_replicas: i32,
    /// All desired pods are ready.
    pub ready: bool,
    /// Why the workload is not ready, from what the cluster reports on its pods and
    /// volume claims (a claim pending, a pod unschedulable, an image that cannot be
    /// pulled, a container crash-looping, a readiness probe failing). Absent when
    /// ready, or when the cluster reports nothing yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Client endpoints (`host:port`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// Read-write: PgBouncer from tier 2, the primary below.
    pub read_write: String,
    /// Read-only endpoint of each replica pool, by purpose.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replica_pools: BTreeMap<String, String>,
    /// The data plane's HTTP API.
    pub api: String,
    /// Connection Secret of each purpose (keys uri, host, port, dbname, user, password).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
}
