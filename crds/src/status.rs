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
