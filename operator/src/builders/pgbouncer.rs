//! PgBouncer (tier 2 and up): transaction pooling in front of the primary, at most
//! 500 client connections per pod, its `pgbouncer.ini` in a ConfigMap and its auth
//! file in a Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, Secret, SecretVolumeSource, SecurityContext, Service,
    TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use umstore_crds::PgBouncerSpec;

use super::credentials::{secret_data, Credentials, Role};
use super::pgconfig::TLS_DIR;
use super::postgres::PgRole;
use crate::meta::{hash_of, CONFIG_HASH, DATABASE, PGBOUNCER_PORT, PG_PORT};
use crate::validated::Validated;

const COMPONENT: &str = "pgbouncer";

/// `pgbouncer.ini`: one pool per (database, user) in transaction mode, prepared
/// statements tracked (the data plane prepares its queries once per connection).
pub fn pgbouncer_ini(v: &Validated) -> String {
    let PgBouncerSpec {
        image: _,
        replicas: _,
        max_client_connections,
        default_pool_size,
    } = &v.spec.pgbouncer;
    let primary = v.owner.service_host(&v.owner.child("coordinator"));
    let tls = v.spec.postgres.tls.is_some();
    let mut lines = vec![
        "; Rendered by umstore-operator; edits are overwritten.".to_string(),
        "[databases]".into(),
        format!("{DATABASE} = host={primary} port={PG_PORT} dbname={DATABASE}"),
    ];
    // One database per other cluster of a tier-4 store (docs/operator.md).
    for c in v.clusters.iter().filter(|c| !c.home) {
        let view = v.for_cluster(c);
        let host = v.owner.service_host(&PgRole::Coordinator.name(&view));
        if let Some(alias) = super::clusters::pooler_database(c) {
            lines.push(format!(
                "{alias} = host={host} port={PG_PORT} dbname={DATABASE}"
            ));
        }
    }
    lines.extend([
        String::new(),
        "[pgbouncer]".into(),
        "listen_addr = 0.0.0.0".into(),
        format!("listen_port = {PGBOUNCER_PORT}"),
        // No unix socket: the root filesystem is read-only.
        "unix_socket_dir =".into(),
        "auth_type = scram-sha-256".into(),
        "auth_file = /etc/pgbouncer-auth/userlist.txt".into(),
        "pool_mode = transaction".into(),
        format!("max_client_conn = {max_client_connections}"),
        format!("default_pool_size = {default_pool_size}"),
        "min_pool_size = 2".into(),
        "reserve_pool_size = 5".into(),
        "max_prepared_statements = 200".into(),
        "server_reset_query_always = 0".into(),
        "ignore_startup_parameters = extra_float_digits,options".into(),
        "stats_users = umstore_dashboard".into(),
        "log_connections = 0".into(),
        "log_disconnections = 0".into(),
    ]);
    if tls {
        // The primary's certificate is checked against the Secret's CA and must
        // name the coordinator's Service (the host above).
        lines.push("server_tls_sslmode = verify-full".into());
        lines.push(format!("server_tls_ca_file = {TLS_DIR}/ca.crt"));
        lines.push("client_tls_sslmode = require".into());
        lines.push(format!("client_tls_cert_file = {TLS_DIR}/tls.crt"));
        lines.push(format!("client_tls_key_file = {TLS_DIR}/tls.key"));
    } else {
        lines.push("server_tls_sslmode = prefer".into());
    }
    lines.join("\n") + "\n"
}

/// `userlist.txt`: the client roles and their passwords (PgBouncer needs them in
/// clear to log in to PostgreSQL with SCRAM on the client's behalf).
pub fn userlist(creds: &Credentials) -> String {
    Role::CLIENTS
        .iter()
        .map(|r| {
            format!(
                "\"{}\" \"{}\"\n",
                r.user(),
                creds.password(*r).replace('"', "\"\"")
            )
        })
        .collect()
}

/// The ConfigMap `<store>-pgbouncer`.
pub fn config_map(v: &Validated) -> ConfigMap {
    let owner = &v.owner;
    ConfigMap {
        metadata: owner.object_meta(&owner.child("pgbouncer"), owner.component_labels(COMPONENT)),
        data: Some(BTreeMap::from([(
            "pgbouncer.ini".to_string(),
            pgbouncer_ini(v),
        )])),
        ..ConfigMap::default()
    }
}

/// The Secret `<store>-pgbouncer-auth` with `userlist.txt`.
pub fn auth_secret(v: &Validated, creds: &Credentials) -> Secret {
    let owner = &v.owner;
    Secret {
        metadata: owner.object_meta(
            &owner.child("pgbouncer-auth"),
            owner.component_labels(COMPONENT),
        ),
        type_: Some("Opaque".into()),
        data: Some(secret_data([("userlist.txt".to_string(), userlist(creds))])),
        ..Secret::default()
    }
}

fn tcp_probe(period: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(PGBOUNCER_PORT),
            ..TCPSocketAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    }
}

/// The Deployment `<store>-pgbouncer`.
pub fn deployment(v: &Validated, creds: &Credentials) -> Deployment {
    let owner = &v.owner;
    let labels = owner.component_labels(COMPONENT);
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: "/etc/pgbouncer".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "auth".into(),
            mount_path: "/etc/pgbouncer-auth".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: owner.child("pgbouncer"),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "auth".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(owner.child("pgbouncer-auth")),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    if let Some(tls) = &v.spec.postgres.tls {
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.secret_name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let container = Container {
        name: "pgbouncer".into(),
        image: Some(v.spec.pgbouncer.image.clone()),
        command: Some(vec![
            "pgbouncer".into(),
            "/etc/pgbouncer/pgbouncer.ini".into(),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("pgbouncer".into()),
            container_port: PGBOUNCER_PORT,
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(tcp_probe(5)),
        liveness_probe: Some(tcp_probe(15)),
        security_context: Some(SecurityContext {
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    Deployment {
        metadata: owner.object_meta(&owner.child("pgbouncer"), labels.clone()),
        spec: DeploymentSpec {
            replicas: Some(v.spec.pgbouncer.replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH.to_string(),
                        hash_of(&(pgbouncer_ini(v), userlist(creds))),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(70),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

/// The Service `<store>-pgbouncer`: the read-write endpoint from tier 2.
pub fn service(v: &Validated) -> Service {
    super::services::component_service(v, "pgbouncer", COMPONENT, "pgbouncer", PGBOUNCER_PORT)
}
