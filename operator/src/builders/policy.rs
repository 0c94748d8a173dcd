//! PodDisruptionBudgets and NetworkPolicies.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::patroni;
use crate::meta::{COMPONENT_LABEL, EXPORTER_PORT, INSTANCE_LABEL, NAME_LABEL, PG_PORT};
use crate::validated::Validated;

/// A PodDisruptionBudget allowing one pod of the workload down at a time. Only built
/// for workloads of two or more pods: a budget of zero on a single pod would block
/// every node drain.
pub fn pdb(
    v: &Validated,
    name: &str,
    labels: BTreeMap<String, String>,
    selector: BTreeMap<String, String>,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: v.owner.object_meta(name, labels),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

fn in_components(v: &Validated, components: &[&str]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([
            (NAME_LABEL.to_string(), "umstore".to_string()),
            (INSTANCE_LABEL.to_string(), v.owner.name.clone()),
        ])),
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: COMPONENT_LABEL.into(),
            operator: "In".into(),
            values: Some(components.iter().map(|c| c.to_string()).collect()),
        }]),
    }
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

/// `<store>-postgres`: only the pooler, the replicas, the other Citus nodes, the data
/// plane and the operator reach the primary/coordinator and workers on 5432; only
/// the database pods and the operator reach Patroni's REST API; the exporter port
/// stays open for Prometheus. Replica pools are client endpoints and
/// are not restricted here.
pub fn postgres_network_policy(v: &Validated, operator_namespace: &str) -> NetworkPolicy {
    let owner = &v.owner;
    let store_peers = NetworkPolicyPeer {
        pod_selector: Some(in_components(
            v,
            &[
                "coordinator",
                "worker",
                "replica",
                "pgbouncer",
                "data-plane",
            ],
        )),
        ..NetworkPolicyPeer::default()
    };
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                operator_namespace.to_string(),
            )])),
            ..LabelSelector::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                NAME_LABEL.to_string(),
                "umstore-operator".to_string(),
            )])),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let database_pods = NetworkPolicyPeer {
        pod_selector: Some(in_components(v, &["coordinator", "worker", "replica"])),
        ..NetworkPolicyPeer::default()
    };
    let operator_peer = operator.clone();
    NetworkPolicy {
        metadata: owner.object_meta(&owner.child("postgres"), owner.component_labels("postgres")),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(in_components(v, &["coordinator", "worker"])),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![store_peers, operator]),
                    ports: Some(vec![tcp(PG_PORT)]),
                },
                // Patroni's REST API: members ask each other before taking the
                // leader lock, and the operator asks for switchovers.
                NetworkPolicyIngressRule {
                    from: Some(vec![database_pods, operator_peer]),
                    ports: Some(vec![tcp(patroni::RESTAPI_PORT)]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![tcp(EXPORTER_PORT)]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}
