//! Services of the PostgreSQL workloads: a headless Service per StatefulSet (stable pod
//! DNS names) and a client Service that follows Patroni's role label.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::patroni;
use super::postgres::PgRole;
use crate::meta::{EXPORTER_PORT, PG_PORT};
use crate::validated::Validated;

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        ..ServicePort::default()
    }
}

/// A ClusterIP Service `<store>-<child>` selecting a component's pods on one
/// named port (the pooler, the data-plane API).
pub(super) fn component_service(
    v: &Validated,
    child: &str,
    component: &str,
    port_name: &str,
    number: i32,
) -> Service {
    let owner = &v.owner;
    let labels = owner.component_labels(component);
    Service {
        metadata: owner.object_meta(&owner.child(child), labels.clone()),
        spec: Some(ServiceSpec {
            selector: Some(labels),
            ports: Some(vec![port(port_name, number)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The headless Service giving each pod a stable DNS name.
pub fn headless_service(v: &Validated, role: &PgRole<'_>) -> Service {
    let labels = role.labels(v);
    Service {
        metadata: v.owner.object_meta(&role.headless_name(v), labels),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(role.selector(v)),
            ports: Some(vec![port("postgres", PG_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The client Service, by the role label Patroni keeps on each pod: for the
/// coordinator and each worker group, the current leader of its Patroni cluster
/// (after a failover the Service follows the new one); for a replica pool, the
/// pool's members while they are replicas (an `ai` member promoted by a failover
/// leaves its pool's Service).
pub fn client_service(v: &Validated, role: &PgRole<'_>) -> Service {
    let name = role.name(v);
    let labels = role.labels(v);
    let mut selector = match role {
        // The leader may be a coordinator pod or, after a failover, an `ai` pool
        // member: select the cluster, not the StatefulSet.
        PgRole::Coordinator => patroni::group_labels(v, role),
        PgRole::Worker { .. } | PgRole::Replica { .. } => role.selector(v),
    };
    let wanted = match role {
        PgRole::Replica { .. } => patroni::REPLICA,
        PgRole::Coordinator | PgRole::Worker { .. } => patroni::PRIMARY,
    };
    selector.insert(patroni::ROLE_LABEL.into(), wanted.into());
    Service {
        metadata: v.owner.object_meta(&name, labels),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector),
            ports: Some(vec![
                port("postgres", PG_PORT),
                port("metrics", EXPORTER_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}
