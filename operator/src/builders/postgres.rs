//! PostgreSQL workloads: the primary/coordinator, the Citus worker groups and the
//! read-replica pools, each a StatefulSet (its Services are in [`super::services`]).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction,
    KeyToPath, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecretKeySelector,
    SecretVolumeSource, Volume, VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use umstore_crds::{InstanceSpec, ReclaimPolicy, ReplicaPurpose, StorageSpec};

use super::credentials::Role;
use super::pgconfig::{self, CONFIG_DIR, TLS_DIR};
use crate::meta::{CONFIG_HASH, EXPORTER_PORT, PG_PORT, WORKER_GROUP_LABEL};
use crate::validated::Validated;

/// Which PostgreSQL workload.
#[derive(Clone, Debug, PartialEq)]
pub enum PgRole<'a> {
    /// The primary (tiers 1–2) or Citus coordinator (3–4).
    Coordinator,
    /// A Citus worker group: pod 0 is its primary, the others hot standbys.
    Worker {
        /// Group name.
        group: &'a str,
        /// Pods in the group.
        replicas: i32,
    },
    /// A read-replica pool: every pod a hot standby of the coordinator.
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
        match self {
            PgRole::Coordinator => v.owner.child("coordinator"),
            PgRole::Worker { group, .. } => v.owner.child(&format!("worker-{group}")),
            PgRole::Replica { purpose, .. } => {
                v.owner.child(&format!("replica-{}", purpose.as_str()))
            }
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

    fn replicas(&self) -> i32 {
        match self {
            PgRole::Coordinator => 1,
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
                labels.insert("umstore.io/replica-pool".into(), purpose.as_str().into());
            }
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

    /// The primary a standby of this workload clones from, if it has standbys.
    fn primary_host(&self, v: &Validated) -> Option<String> {
        let ns = &v.owner.namespace;
        match self {
            PgRole::Coordinator => None,
            PgRole::Worker { .. } => Some(format!(
                "{}-0.{}.{ns}.svc",
                self.name(v),
                self.headless_name(v)
            )),
            PgRole::Replica { .. } => {
                let c = PgRole::Coordinator;
                Some(format!("{}-0.{}.{ns}.svc", c.name(v), c.headless_name(v)))
            }
        }
    }
}

fn secret_env(name: &str, secret: String, key: &str) -> EnvVar {
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

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn pg_isready_probe(period: i32, failures: i32) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(
                [
                    "pg_isready",
                    "-U",
                    "postgres",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    "5432",
                ]
                .map(String::from)
                .to_vec(),
            ),
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Probe::default()
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

/// The StatefulSet of one PostgreSQL workload.
pub fn statefulset(v: &Validated, role: &PgRole<'_>) -> StatefulSet {
    let owner = &v.owner;
    let name = role.name(v);
    let labels = role.labels(v);
    let InstanceSpec { resources, storage } = role.instance(v);
    let admin_secret = Role::Admin.secret_name(owner);
    let replicator_secret = Role::Replicator.secret_name(owner);

    let mut env_vars = vec![
        env("PGDATA", "/var/lib/postgresql/data/pgdata"),
        env("POSTGRES_USER", "postgres"),
        env("POSTGRES_DB", "postgres"),
        env(
            "POSTGRES_INITDB_ARGS",
            "--auth-host=scram-sha-256 --data-checksums",
        ),
        secret_env("POSTGRES_PASSWORD", admin_secret.clone(), "password"),
        secret_env("REPLICATION_PASSWORD", replicator_secret, "password"),
    ];
    let mut mounts = vec![
        mount("data", "/var/lib/postgresql/data"),
        mount("config", CONFIG_DIR),
        VolumeMount {
            name: "scripts".into(),
            mount_path: "/docker-entrypoint-initdb.d/00-create-replicator.sh".into(),
            sub_path: Some("00-create-replicator.sh".into()),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        config_volume("config", owner.child("postgres"), None),
        config_volume("scripts", owner.child("postgres-scripts"), Some(0o555)),
    ];
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

    let mut init_containers = vec![];
    if let Some(primary) = role.primary_host(v) {
        let mut init_env = env_vars.clone();
        init_env.push(env("PRIMARY_HOST", primary));
        if matches!(role, PgRole::Replica { .. }) {
            init_env.push(env("STANDBY_ALWAYS", "1"));
        }
        env_vars.push(env("UMSTORE_STANDBY", "1"));
        init_containers.push(Container {
            name: "standby-init".into(),
            image: Some(v.spec.postgres.image.clone()),
            command: Some(vec!["/bin/sh".into(), "/scripts/standby-init.sh".into()]),
            env: Some(init_env),
            volume_mounts: Some(vec![
                mount("data", "/var/lib/postgresql/data"),
                mount("scripts", "/scripts"),
            ]),
            ..Container::default()
        });
    }

    let postgres = Container {
        name: "postgres".into(),
        image: Some(v.spec.postgres.image.clone()),
        args: Some(vec![
            "postgres".into(),
            "-c".into(),
            format!("config_file={CONFIG_DIR}/postgresql.conf"),
            "-c".into(),
            format!("hba_file={CONFIG_DIR}/pg_hba.conf"),
        ]),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("postgres".into()),
            container_port: PG_PORT,
            ..ContainerPort::default()
        }]),
        resources: resources.clone(),
        startup_probe: Some(pg_isready_probe(5, 120)),
        readiness_probe: Some(pg_isready_probe(5, 3)),
        liveness_probe: Some(pg_isready_probe(15, 4)),
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

    let anti_affinity = Affinity {
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
            replicas: Some(role.replicas()),
            service_name: Some(role.headless_name(v)),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            pod_management_policy: Some("OrderedReady".into()),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(retention.into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([
                        (CONFIG_HASH.to_string(), pgconfig::config_hash(v)),
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        ("prometheus.io/port".to_string(), EXPORTER_PORT.to_string()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    affinity: Some(anti_affinity),
                    security_context: Some(PodSecurityContext {
                        run_as_user: Some(999),
                        run_as_group: Some(999),
                        fs_group: Some(999),
                        run_as_non_root: Some(true),
                        ..PodSecurityContext::default()
                    }),
                    termination_grace_period_seconds: Some(60),
                    init_containers: (!init_containers.is_empty()).then_some(init_containers),
                    containers: vec![postgres, exporter],
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
