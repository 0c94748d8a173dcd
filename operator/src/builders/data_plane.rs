//! The data plane: Deployment (with GPU scheduling from the spec), its Service and
//! ServiceAccount (the identity Vault's Kubernetes auth checks).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SecretKeySelector, SecurityContext, Service, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use umstore_crds::{DataPlaneSpec, EncryptionSpec, GpuSpec, VaultAuthSpec};

use super::credentials::Role;
use crate::meta::API_PORT;
use crate::validated::Validated;

const COMPONENT: &str = "data-plane";

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn uri_from(name: &str, secret: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret,
                key: "uri".into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    }
}

/// Environment of the data plane, in the names its CLI reads (`umstore-data-plane
/// serve`): the write URI from the writer's connection Secret (never in the pod
/// spec), Vault with Kubernetes auth, and Vault required (no local key file in a
/// cluster). The read-pool URIs, tier, regions and eligibility TTL are there for the
/// read routing of SPEC §7.
fn environment(v: &Validated) -> Vec<EnvVar> {
    let owner = &v.owner;
    let EncryptionSpec {
        vault_address,
        auth,
        transit_mount,
        key_name,
        rotation_interval: _,
    } = &v.spec.encryption;
    let VaultAuthSpec {
        mount_path: _,
        role,
    } = auth;
    let mut vars = vec![
        uri_from(
            "UMSTORE_DATABASE_URL",
            Role::Writer.connection_secret_name(owner),
        ),
        uri_from(
            "UMSTORE_READ_AI_DATABASE_URL",
            Role::Ai.connection_secret_name(owner),
        ),
        uri_from(
            "UMSTORE_READ_ANALYTICS_DATABASE_URL",
            Role::Analytics.connection_secret_name(owner),
        ),
        env("UMSTORE_DATA_DIR", DATA_DIR),
        env("UMSTORE_REQUIRE_VAULT", "true"),
        env("UMSTORE_TRANSIT_MOUNT", transit_mount.clone()),
        env("UMSTORE_TRANSIT_KEY", key_name.clone()),
        env("UMSTORE_VAULT_K8S_ROLE", role.clone()),
        env("UMSTORE_TIER", v.tier.to_string()),
        env("UMSTORE_REGIONS", v.spec.regions.join(",")),
        env(
            "UMSTORE_ELIGIBILITY_CACHE_TTL",
            v.spec.eligibility_cache_ttl.clone(),
        ),
    ];
    if let Some(addr) = vault_address {
        vars.push(env("UMSTORE_VAULT_ADDR", addr.clone()));
    }
    vars
}

/// Writable scratch directory of the data plane (the root filesystem is read-only).
const DATA_DIR: &str = "/var/lib/umstore";

/// The Deployment `<store>-data-plane`.
pub fn deployment(v: &Validated) -> Deployment {
    let owner = &v.owner;
    let labels = owner.component_labels(COMPONENT);
    let DataPlaneSpec {
        image,
        replicas,
        resources,
        gpu,
    } = &v.spec.data_plane;
    let mut resources = resources.clone().unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("250m".into())),
            ("memory".to_string(), Quantity("256Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("1Gi".into()),
        )])),
        ..ResourceRequirements::default()
    });
    let mut node_selector = None;
    let mut tolerations = None;
    let mut runtime_class_name = None;
    if let Some(GpuSpec {
        count,
        resource_name,
        node_selector: ns,
        tolerations: t,
        runtime_class_name: rc,
    }) = gpu
    {
        if *count > 0 {
            resources
                .limits
                .get_or_insert_with(BTreeMap::new)
                .insert(resource_name.clone(), Quantity(count.to_string()));
        }
        node_selector = (!ns.is_empty()).then(|| ns.clone());
        tolerations = (!t.is_empty()).then(|| t.clone());
        runtime_class_name = rc.clone();
    }
    let container = Container {
        name: "data-plane".into(),
        image: Some(image.clone()),
        args: Some(vec![
            "serve".into(),
            "--listen".into(),
            format!("0.0.0.0:{API_PORT}"),
            // The operator's migrate step applies migrations as the admin role; the
            // data plane waits for the schema it was built for.
            "--no-migrate".into(),
        ]),
        env: Some(environment(v)),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: API_PORT,
            ..ContainerPort::default()
        }]),
        resources: Some(resources),
        readiness_probe: Some(http_probe("/readyz", 5)),
        liveness_probe: Some(http_probe("/healthz", 15)),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        }]),
        security_context: Some(SecurityContext {
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Deployment {
        metadata: owner.object_meta(&owner.child("data-plane"), labels.clone()),
        spec: DeploymentSpec {
            replicas: Some(*replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(owner.child("data-plane")),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "data".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    }]),
                    node_selector,
                    tolerations,
                    runtime_class_name,
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

/// The Service `<store>-api`: the data plane's HTTP API.
pub fn service(v: &Validated) -> Service {
    super::services::component_service(v, "api", COMPONENT, "http", API_PORT)
}

/// The ServiceAccount `<store>-data-plane`.
pub fn service_account(v: &Validated) -> ServiceAccount {
    let owner = &v.owner;
    ServiceAccount {
        metadata: owner.object_meta(
            &owner.child("data-plane"),
            owner.component_labels(COMPONENT),
        ),
        ..ServiceAccount::default()
    }
}
