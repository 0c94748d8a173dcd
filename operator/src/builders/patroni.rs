//! Patroni in every PostgreSQL pod: its configuration (`patroni.yml`, one key per
//! workload in the ConfigMap `<store>-patroni`) and the identity the database pods
//! run as (ServiceAccount `<store>-postgres` with a Role allowing exactly what
//! Patroni's Kubernetes DCS does).
//!
//! Groups: the coordinator's StatefulSet and the replica pools form one group
//! (`<store>-coordinator`); each worker group is a group of its own
//! (`<store>-worker-<name>`); every pod carries its group in [`GROUP_LABEL`].
//! Below tier 3 each group is a Patroni cluster whose scope is the group's name.
//! From tier 3 the groups are the Citus groups of one Patroni cluster (scope
//! `<store>-citus`, `citus.group` 0 for the coordinator, 1, 2, … for the worker
//! groups): Patroni's Citus integration needs one scope to find the coordinator
//! from a worker group and every group's primary from the coordinator, and tells
//! the groups apart by its own `citus-group` label. Patroni keeps the leader locks
//! and the cluster state in ConfigMaps named after the scope (and group), and
//! labels each pod with its role ([`ROLE_LABEL`]: `primary` or `replica`), which
//! the read-write Services select together with the group. Analytics pool members
//! are tagged `nofailover` (never promoted), every pool member `noloadbalance`.
//!
//! PostgreSQL's own configuration stays in `<store>-postgres` (`postgresql.conf`
//! as Patroni's `custom_conf`, `pg_hba.conf` as `hba_file`), so the files that the
//! config tests load into a real server are the ones the pods use. Passwords come
//! from the role Secrets through environment variables Patroni reads
//! (`PATRONI_SUPERUSER_PASSWORD`, `PATRONI_REPLICATION_PASSWORD`); Patroni creates
//! the superuser and replication users at bootstrap.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role as RbacRole, RoleBinding, RoleRef, Subject};
use serde_json::{json, Value};
use umstore_crds::{ReplicaPurpose, SynchronousMode};
use umstore_migrations::roles::{DATABASE, REPLICATOR, SUPERUSER};

use super::pgconfig::CONFIG_DIR;
use super::postgres::PgRole;
use crate::meta::{hash_of, PG_PORT};
use crate::validated::Validated;

/// The label Patroni's Citus integration selects a Citus group's pods by (and
/// puts on the group's ConfigMaps); from tier 3 every database pod carries it.
pub const CITUS_GROUP_LABEL: &str = "citus-group";
/// Pod label naming the group (coordinator, or a worker group) a pod belongs to.
pub const GROUP_LABEL: &str = "umstore.io/patroni-group";
/// Pod label naming the Patroni cluster (scope) a pod belongs to.
pub const SCOPE_LABEL: &str = "umstore.io/patroni-cluster";
/// Pod label Patroni keeps on each member: [`PRIMARY`] or [`REPLICA`].
pub const ROLE_LABEL: &str = "umstore.io/role";
/// [`ROLE_LABEL`] value of the leader.
pub const PRIMARY: &str = "primary";
/// [`ROLE_LABEL`] value of the other members.
pub const REPLICA: &str = "replica";
/// Patroni's REST API port.
pub const RESTAPI_PORT: i32 = 8008;
/// Where the pods mount the ConfigMap `<store>-patroni`.
pub const PATRONI_DIR: &str = "/etc/patroni";
/// The data directory inside the data volume.
pub const PGDATA: &str = "/var/lib/postgresql/data/pgdata";

/// Leader-lock TTL, loop period and DCS retry timeout (seconds). Patroni requires
/// `loop_wait + 2 * retry_timeout <= ttl` and raises any `ttl` below 20 to 20 (its
/// floor; it logs "can't be smaller than 20"). A leader that dies without releasing
/// its lock is replaced once a standby has seen the lock unrenewed for `ttl`: about
/// `ttl ± loop_wait` after the crash (measured in BENCHMARKS.md beside Patroni's
/// defaults, 30/10/10). A shorter `loop_wait` would narrow that window at the cost
/// of one lock renewal on the API server per group every `loop_wait`; 5 s is 0.2
/// writes a second per group. `retry_timeout` 7 s: a leader that cannot reach the
/// API server for that long demotes itself.
pub const TTL: u32 = 20;
/// See [`TTL`].
pub const LOOP_WAIT: u32 = 5;
/// See [`TTL`].
pub const RETRY_TIMEOUT: u32 = 7;
/// A standby further behind than this (bytes of WAL) is not promoted.
pub const MAXIMUM_LAG_ON_FAILOVER: u64 = 16 * 1024 * 1024;

/// The group a workload's pods belong to: the coordinator's (with the replica
/// pools) or their worker group's. Below tier 3 it is also the Patroni scope.
pub fn group(v: &Validated, role: &PgRole<'_>) -> String {
    match role {
        PgRole::Coordinator | PgRole::Replica { .. } => PgRole::Coordinator.name(v),
        PgRole::Worker { .. } => role.name(v),
    }
}

/// The Patroni cluster (scope) a workload's pods belong to: its group's own
/// below tier 3, one for the whole store from tier 3 (the Citus groups share it).
pub fn scope(v: &Validated, role: &PgRole<'_>) -> String {
    if v.citus() {
        v.owner.child(&format!("{}citus", v.cluster_prefix()))
    } else {
        group(v, role)
    }
}

/// The key of a workload's `patroni.yml` in the ConfigMap.
pub fn config_key(v: &Validated, role: &PgRole<'_>) -> String {
    format!("{}.yml", role.name(v))
}

/// The Citus group of a workload from tier 3: 0 for the coordinator (and its
/// replica pools), the worker group's id ([`Validated::citus_groups`]) otherwise.
pub fn citus_group(v: &Validated, role: &PgRole<'_>) -> Option<i32> {
    if !v.citus() {
        return None;
    }
    match role {
        PgRole::Coordinator | PgRole::Replica { .. } => Some(0),
        PgRole::Worker { group, .. } => v.citus_groups.get(*group).copied(),
    }
}

/// The labels Patroni puts on its ConfigMaps and looks its members up by (every
/// group's members, from tier 3: the group label is not among them).
pub fn cluster_labels(v: &Validated, role: &PgRole<'_>) -> BTreeMap<String, String> {
    let mut labels = v.owner.selector();
    labels.insert(SCOPE_LABEL.into(), scope(v, role));
    labels
}

/// The labels of a group's pods: Patroni's, the group's, and from tier 3 the
/// Citus group Patroni looks the group's members up by.
pub fn group_labels(v: &Validated, role: &PgRole<'_>) -> BTreeMap<String, String> {
    let mut labels = cluster_labels(v, role);
    labels.insert(GROUP_LABEL.into(), group(v, role));
    if let Some(g) = citus_group(v, role) {
        labels.insert(CITUS_GROUP_LABEL.into(), g.to_string());
    }
    labels
}

/// `patroni.yml` of one workload, as JSON (YAML is a superset). Per-pod values
/// (name, addresses, namespace) come from environment variables the StatefulSet
/// sets (`PATRONI_NAME`, `PATRONI_KUBERNETES_POD_IP`, ...).
pub fn config(v: &Validated, role: &PgRole<'_>) -> Value {
    let synchronous = v.spec.postgres.synchronous == SynchronousMode::On;
    let mut tags = serde_json::Map::new();
    if let PgRole::Replica { purpose, .. } = role {
        // Pool members serve reads; the read-write path never balances onto them.
        tags.insert("noloadbalance".into(), json!(true));
        if *purpose == ReplicaPurpose::Analytics {
            tags.insert("nofailover".into(), json!(true));
            tags.insert("nosync".into(), json!(true));
        }
    }
    let labels: serde_json::Map<String, Value> = cluster_labels(v, role)
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let mut config = json!({
        "scope": scope(v, role),
        "kubernetes": {
            "labels": labels,
            "scope_label": SCOPE_LABEL,
            "role_label": ROLE_LABEL,
            "leader_label_value": PRIMARY,
            "follower_label_value": REPLICA,
            "standby_leader_label_value": PRIMARY,
            "tmp_role_label": "umstore.io/patroni-tmp-role",
            "use_endpoints": false,
        },
        "restapi": {
            "listen": format!("0.0.0.0:{RESTAPI_PORT}"),
        },
        "bootstrap": {
            "dcs": {
                "ttl": TTL,
                "loop_wait": LOOP_WAIT,
                "retry_timeout": RETRY_TIMEOUT,
                "maximum_lag_on_failover": MAXIMUM_LAG_ON_FAILOVER,
                "synchronous_mode": synchronous,
                "synchronous_node_count": 1,
                "postgresql": {
                    "use_pg_rewind": true,
                    "use_slots": true,
                },
            },
            "initdb": [
                {"auth-host": "scram-sha-256"},
                {"auth-local": "peer"},
                {"encoding": "UTF8"},
                "data-checksums",
            ],
        },
        "postgresql": {
            "listen": format!("0.0.0.0:{PG_PORT}"),
            "data_dir": PGDATA,
            "custom_conf": format!("{CONFIG_DIR}/postgresql.conf"),
            "parameters": {
                "hba_file": format!("{CONFIG_DIR}/pg_hba.conf"),
            },
            "authentication": {
                "superuser": {"username": SUPERUSER},
                "replication": {"username": REPLICATOR},
                "rewind": {"username": SUPERUSER},
            },
            "use_unix_socket": true,
            // A new or rebuilt member's pg_basebackup asks the leader for an immediate
            // checkpoint instead of waiting out a spread one (minutes after a busy
            // spell: CREATE EXTENSION citus alone dirties enough to take two).
            "basebackup": [{"checkpoint": "fast"}],
        },
        "tags": tags,
    });
    if let Some(group) = citus_group(v, role) {
        config["citus"] = json!({"group": group, "database": DATABASE});
    }
    if super::backup::recovery_repository(v).is_some() {
        // The first member restores the source's backup instead of running initdb
        // (builders/backup.rs, restore.sh); the others clone from it as usual.
        config["bootstrap"]["method"] = json!("pgbackrest");
        config["bootstrap"]["pgbackrest"] = json!({
            "command": format!(
                "/bin/sh {}/{}",
                super::backup::CONFIG_DIR,
                super::backup::RESTORE_SCRIPT
            ),
            // Patroni appends --scope and --datadir, which restore.sh reads.
            "keep_existing_recovery_conf": true,
        });
    }
    config
}

/// The ConfigMap `<store>-patroni`: one `patroni.yml` per PostgreSQL workload.
pub fn config_map(v: &Validated, roles: &[(&Validated, PgRole<'_>)]) -> ConfigMap {
    let owner = &v.owner;
    ConfigMap {
        metadata: owner.object_meta(&owner.child("patroni"), owner.component_labels("postgres")),
        data: Some(
            roles
                .iter()
                .map(|(view, r)| {
                    // JSON is YAML: Patroni reads it as its configuration file.
                    let text = serde_json::to_string_pretty(&config(view, r)).unwrap_or_default();
                    (config_key(view, r), text)
                })
                .collect(),
        ),
        ..ConfigMap::default()
    }
}

/// Hash of a workload's Patroni configuration, for its pod-template annotation.
pub fn config_hash(v: &Validated, role: &PgRole<'_>) -> String {
    hash_of(&config(v, role))
}

/// The ServiceAccount the database pods run as.
pub fn service_account_name(v: &Validated) -> String {
    v.owner.child("postgres")
}

/// The database pods' ServiceAccount (no API token is mounted into other pods).
pub fn service_account(v: &Validated) -> ServiceAccount {
    let owner = &v.owner;
    ServiceAccount {
        metadata: owner.object_meta(&service_account_name(v), owner.component_labels("postgres")),
        ..ServiceAccount::default()
    }
}

fn rule(resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    }
}

/// What Patroni's Kubernetes DCS (ConfigMaps, no Endpoints) calls in the store's
/// namespace, and nothing more (Patroni 4.1's `kubernetes.py`): it lists and watches
/// its members' pods and patches its own pod's role label and member annotation; it
/// reads, lists, watches, creates and patches its leader, config, failover and sync
/// ConfigMaps. No update, no delete (`patronictl remove` would need deletecollection,
/// and is not something a pod does), no Secrets, no other kinds. The Patroni tests
/// take each verb away in turn and watch Patroni fail for want of it.
pub fn pod_rules() -> Vec<PolicyRule> {
    vec![
        rule(
            &["configmaps"],
            &["get", "list", "watch", "create", "patch"],
        ),
        rule(&["pods"], &["list", "watch", "patch"]),
    ]
}

/// The Role of the database pods.
pub fn role(v: &Validated) -> RbacRole {
    let owner = &v.owner;
    RbacRole {
        metadata: owner.object_meta(&service_account_name(v), owner.component_labels("postgres")),
        rules: Some(pod_rules()),
    }
}

/// Binds the Role to the database pods' ServiceAccount.
pub fn role_binding(v: &Validated) -> RoleBinding {
    let owner = &v.owner;
    let name = service_account_name(v);
    RoleBinding {
        metadata: owner.object_meta(&name, owner.component_labels("postgres")),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: Some(owner.namespace.clone()),
            ..Subject::default()
        }]),
    }
}
