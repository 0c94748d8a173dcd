//! PostgreSQL workloads: the coordinator, the Citus worker groups and the
//! read-replica pools, each a StatefulSet whose pods run Patroni (its configuration
//! and RBAC are in [`super::patroni`], its Services in [`super::services`]).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    KeyToPath, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SecretKeySelector, SecretVolumeSource, Volume, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use umstore_crds::{InstanceSpec, ReclaimPolicy, ReplicaPurpose, StorageSpec};

use super::backup;
use super::credentials::Role;
use super::patroni;
use super::pgconfig::{self, CONFIG_DIR, TLS_DIR};
use crate::meta::{
    hash_of, CLUSTER_LABEL, CONFIG_HASH, EXPORTER_PORT, PG_PORT, REPLICA_POOL_LABEL,
    WORKER_GROUP_LABEL,
};
use crate::validated::Validated;

/// The node label naming a node's topology zone (`spec.clusters[].placement.zones`).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Which PostgreSQL workload.
#[derive(Clone, Debug, PartialEq)]
pub enum PgRole<'a> {
    /// The primary (tiers 1–2) or Citus coordinator (3–4), with its failover
    /// standbys: `spec.postgres.instances` members of one Patroni cluster.
    Coordinator,
    /// A Citus worker group: a Patroni cluster of its own (a leader and standbys).
    Worker {
        /// Group name.
        group: &'a str,
        /// Pods in the group.
        replicas: i32,
    },
    /// A read-replica pool: members of the coordinator's Patroni cluster.
    Replica {
        /// Pool purpose.
        purpose: ReplicaPurpose,
        /// Pods in the pool.
        replicas: i32,
    },
}

impl PgRole<'_> {
    /// StatefulSet name (also the client Service name).
    pub fn name(&self, v: &Validated) -> String {
        let prefix = v.cluster_prefix();
        match self {
            PgRole::Coordinator => v.owner.child(&format!("{prefix}coordinator")),
            PgRole::Worker { group, .. } => v.owner.child(&format!("{prefix}worker-{group}")),
            PgRole::Replica { purpose, .. } => v
                .owner
                .child(&format!("{prefix}replica-{}", purpose.as_str())),
        }
    }

    /// Headless Service name.
    pub fn headless_name(&self, v: &Validated) -> String {
        format!("{}-hl", self.name(v))
    }

    fn component(&self) -> &'static str {
        match self {
            PgRole::Coordinator => "coordinator",
            PgRole::Worker { .. } => "worker",
            PgRole::Replica { .. } => "replica",
        }
    }

    /// Pods of the workload.
    pub fn replicas(&self, v: &Validated) -> i32 {
        match self {
            PgRole::Coordinator => v.coordinator_instances(),
            PgRole::Worker { replicas, .. } | PgRole::Replica { replicas, .. } => *replicas,
        }
    }

    /// Labels selecting this workload's pods.
    pub fn labels(&self, v: &Validated) -> BTreeMap<String, String> {
        let mut labels = v.owner.component_labels(self.component());
        match self {
            PgRole::Coordinator => {}
            PgRole::Worker { group, .. } => {
                labels.insert(WORKER_GROUP_LABEL.into(), group.to_string());
            }
            PgRole::Replica { purpose, .. } => {
                labels.insert(REPLICA_POOL_LABEL.into(), purpose.as_str().into());
            }
        }
        // The home cluster's pods keep the labels they had before the store had
        // clusters (no restart, and its StatefulSets' selectors cannot change).
        if let Some(c) = v.cluster.as_ref().and_then(|c| c.infix()) {
            labels.insert(CLUSTER_LABEL.into(), c.into());
        }
        labels
    }

    /// What the workload's Services and PodDisruptionBudget select: its labels, and
    /// with clusters also its Patroni group, which sets the home cluster's pods
    /// apart from the other clusters' (which carry [`CLUSTER_LABEL`]).
    pub fn selector(&self, v: &Validated) -> BTreeMap<String, String> {
        let mut labels = self.labels(v);
        if v.cluster.is_some() {
            labels.insert(patroni::GROUP_LABEL.into(), patroni::group(v, self));
        }
        labels
    }

    fn instance<'v>(&self, v: &'v Validated) -> &'v InstanceSpec {
        match self {
            PgRole::Coordinator => &v.spec.postgres.coordinator,
            PgRole::Worker { .. } => &v.spec.postgres.workers,
            PgRole::Replica { .. } => &v.spec.postgres.replicas,
        }
    }
}

/// `name` from `key` of Secret `secret` (which must exist).
pub(super) fn secret_env(name: &str, secret: String, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret,
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// `name` set to `value`.
pub(super) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn pvc_template(storage: &StorageSpec) -> PersistentVolumeClaim {
    let StorageSpec {
        size,
        storage_class_name,
    } = storage;
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

fn config_volume(name: &str, config_map: String, mode: Option<i32>) -> Volume {
    Volume {
        name: name.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map,
            default_mode: mode,
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(name != "data"),
        ..VolumeMount::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn patroni_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(patroni::RESTAPI_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// What the pods of `role` read at start, hashed: a change rolls them. The
/// pgBackRest files count only for a store that has them, so stores without
/// backups keep the hash (and their pods) across operator upgrades.
fn pod_config_hash(v: &Validated, role: &PgRole<'_>) -> String {
    let (pg, patroni) = (pgconfig::config_hash(v), patroni::config_hash(v, role));
    match backup::config_map(v) {
        Some(_) => hash_of(&(pg, patroni, backup::config_hash(v))),
        None => hash_of(&(pg, patroni)),
    }
}

/// The StatefulSet of one PostgreSQL workload: Patroni as the container's process,
/// managing PostgreSQL in the same container.
pub fn statefulset(v: &Validated, role: &PgRole<'_>) -> StatefulSet {
    let owner = &v.owner;
    let name = role.name(v);
    let labels = role.labels(v);
    let mut pod_labels = labels.clone();
    pod_labels.extend(patroni::group_labels(v, role));
    let InstanceSpec { resources, storage } = role.instance(v);
    let admin_secret = Role::Admin.secret_name(owner);
    let replicator_secret = Role::Replicator.secret_name(owner);

    let env_vars = vec![
        field_env("PATRONI_NAME", "metadata.name"),
        field_env("PATRONI_KUBERNETES_NAMESPACE", "metadata.namespace"),
        field_env("PATRONI_KUBERNETES_POD_IP", "status.podIP"),
        env(
            "PATRONI_POSTGRESQL_CONNECT_ADDRESS",
            format!("$(PATRONI_KUBERNETES_POD_IP):{PG_PORT}"),
        ),
        env(
            "PATRONI_RESTAPI_CONNECT_ADDRESS",
            format!("$(PATRONI_KUBERNETES_POD_IP):{}", patroni::RESTAPI_PORT),
        ),
        env("PGDATA", patroni::PGDATA),
        secret_env(
            "PATRONI_SUPERUSER_PASSWORD",
            admin_secret.clone(),
            "password",
        ),
        secret_env(
            "PATRONI_REPLICATION_PASSWORD",
            replicator_secret,
            "password",
        ),
        secret_env("PATRONI_REWIND_PASSWORD", admin_secret.clone(), "password"),
    ];
    let mut env_vars = env_vars;
    env_vars.extend(backup::postgres_env(v, role));
    let mut mounts = vec![
        mount("data", "/var/lib/postgresql/data"),
        mount("config", CONFIG_DIR),
        mount("patroni", patroni::PATRONI_DIR),
    ];
    mounts.extend(backup::postgres_mounts(v));
    let mut volumes = vec![
        config_volume("config", owner.child("postgres"), None),
        config_volume("patroni", owner.child("patroni"), None),
    ];
    volumes.extend(backup::pod_volumes(v));
    if let Some(tls) = &v.spec.postgres.tls {
        mounts.push(mount("tls", TLS_DIR));
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.secret_name.clone()),
                // PostgreSQL accepts a root-owned key only with mode 0640.
                default_mode: Some(0o640),
                items: Some(vec![
                    KeyToPath {
                        key: "tls.crt".into(),
                        path: "tls.crt".into(),
                        ..KeyToPath::default()
                    },
                    KeyToPath {
                        key: "tls.key".into(),
                        path: "tls.key".into(),
                        ..KeyToPath::default()
                    },
                ]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }

    let postgres = Container {
        name: "postgres".into(),
        image: Some(v.spec.postgres.image.clone()),
        command: Some(vec![
            "patroni".into(),
            format!("{}/{}", patroni::PATRONI_DIR, patroni::config_key(v, role)),
        ]),
        env: Some(env_vars),
        ports: Some(vec![
            ContainerPort {
                name: Some("postgres".into()),
                container_port: PG_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("patroni".into()),
                container_port: patroni::RESTAPI_PORT,
                ..ContainerPort::default()
            },
        ]),
        resources: resources.clone(),
        // Patroni's REST API: /readiness is 200 once PostgreSQL runs and (on a
        // replica) streams; /liveness while Patroni's loop runs. A clone from the
        // leader can take long: the startup probe allows 10 minutes.
        startup_probe: Some(patroni_probe("/liveness", 5, 120)),
        readiness_probe: Some(patroni_probe("/readiness", 5, 3)),
        liveness_probe: Some(patroni_probe("/liveness", 15, 4)),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let exporter = Container {
        name: "exporter".into(),
        image: Some(v.spec.postgres.exporter_image.clone()),
        env: Some(vec![
            env("DATA_SOURCE_URI", "127.0.0.1:5432/postgres?sslmode=disable"),
            env("DATA_SOURCE_USER", "postgres"),
            secret_env("DATA_SOURCE_PASS", admin_secret, "password"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: EXPORTER_PORT,
            ..ContainerPort::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("32Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("128Mi".into()),
            )])),
            ..ResourceRequirements::default()
        }),
        ..Container::default()
    };

    let placement = v
        .cluster
        .as_ref()
        .map(|c| c.placement.clone())
        .unwrap_or_default();
    let node_affinity = (!placement.zones.is_empty()).then(|| NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: ZONE_LABEL.into(),
                    operator: "In".into(),
                    values: Some(placement.zones.clone()),
                }]),
                ..NodeSelectorTerm::default()
            }],
        }),
        ..NodeAffinity::default()
    });
    let anti_affinity = Affinity {
        node_affinity,
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(labels.clone()),
                            ..LabelSelector::default()
                        }),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    };
    let retention = match v.spec.reclaim_policy {
        ReclaimPolicy::Retain => "Retain",
        ReclaimPolicy::Delete => "Delete",
    };

    StatefulSet {
        metadata: owner.object_meta(&name, labels.clone()),
        spec: StatefulSetSpec {
            replicas: Some(role.replicas(v)),
            service_name: Some(role.headless_name(v)),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            pod_management_policy: Some("OrderedReady".into()),
            // The operator replaces the pods itself, replicas first and the leader
            // after a switchover (steps/rollout.rs).
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..StatefulSetUpdateStrategy::default()
            }),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(retention.into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        (CONFIG_HASH.to_string(), pod_config_hash(v, role)),
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        ("prometheus.io/port".to_string(), EXPORTER_PORT.to_string()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    affinity: Some(anti_affinity),
                    node_selector: (!placement.node_selector.is_empty())
                        .then(|| placement.node_selector.clone()),
                    tolerations: (!placement.tolerations.is_empty())
                        .then(|| placement.tolerations.clone()),
                    security_context: Some(PodSecurityContext {
                        run_as_user: Some(999),
                        run_as_group: Some(999),
                        fs_group: Some(999),
                        run_as_non_root: Some(true),
                        ..PodSecurityContext::default()
                    }),
                    termination_grace_period_seconds: Some(60),
                    service_account_name: Some(patroni::service_account_name(v)),
                    containers: [
                        Some(postgres),
                        Some(exporter),
                        backup::server_container(v, role),
                    ]
                    .into_iter()
                    .flatten()
                    .collect(),
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![pvc_template(storage)]),
            ..StatefulSetSpec::default()
        },
        status: None,
    }
}
