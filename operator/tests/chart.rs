//! The Helm chart `charts/umstore-operator`: its CRD is the generated one, and it
//! renders (with `helm template`, default values and each `ci/*-values.yaml`) to
//! manifests that parse into k8s-openapi types, run the operator hardened, and grant
//! exactly the RBAC the operator uses. The rendering tests need a `helm` binary
//! (`$HELM` or on `PATH`; `scripts/install-deps.sh --test` builds one from its Go
//! module) and skip with a message without it, or fail under
//! `UMSTORE_REQUIRE_COMPONENTS=1`.

#[path = "support/helm.rs"]
mod chart_support;

use std::path::PathBuf;

use chart_support::{chart, helm, render, repo, typed, NO_HELM};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_yaml_ng::Value;
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_operator::builders::owned_kinds;
use umstore_operator::builders::patroni::pod_rules;

#[test]
fn chart_crd_is_the_generated_crd() {
    let generated = std::fs::read_to_string(repo().join("crds/umstore.io_usermetadatastores.yaml"))
        .expect("crd");
    let path = chart().join("crds/umstore.io_usermetadatastores.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &generated).expect("copy CRD into the chart");
    }
    let in_chart = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        in_chart == generated,
        "{} is stale: rerun with UPDATE_GOLDEN=1",
        path.display()
    );
}

/// The ClusterRole the operator's ClusterRoleBinding grants (not the users' roles).
fn operator_cluster_role(docs: &[Value]) -> &Value {
    let binding: ClusterRoleBinding = typed(
        docs.iter()
            .find(|d| d["kind"] == "ClusterRoleBinding")
            .expect("ClusterRoleBinding"),
    );
    docs.iter()
        .find(|d| {
            d["kind"] == "ClusterRole" && d["metadata"]["name"] == binding.role_ref.name.as_str()
        })
        .expect("the ClusterRole of the operator's binding")
}

fn value_files() -> Vec<Option<PathBuf>> {
    let mut files: Vec<Option<PathBuf>> = vec![None];
    let mut ci: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .expect("ci dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    ci.sort();
    files.extend(ci.into_iter().map(Some));
    files
}

#[test]
fn chart_renders_to_valid_hardened_manifests() {
    let Some(helm) = helm() else {
        skip_or_fail(Component::Helm, NO_HELM);
        return;
    };
    for values in value_files() {
        let docs = render(&helm, values.as_deref());
        let label = values
            .as_ref()
            .map_or("defaults".to_string(), |p| p.display().to_string());
        let mut kinds = Vec::new();
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "CustomResourceDefinition" => {
                    let crd: CustomResourceDefinition = typed(doc);
                    assert_eq!(crd.spec.group, "umstore.io");
                }
                "ServiceAccount" => drop(typed::<ServiceAccount>(doc)),
                "ClusterRole" => drop(typed::<ClusterRole>(doc)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc)),
                "Role" => drop(typed::<Role>(doc)),
                "RoleBinding" => drop(typed::<RoleBinding>(doc)),
                "Service" => drop(typed::<Service>(doc)),
                // The monitoring objects (ci/monitoring-values.yaml): tests/monitoring.rs.
                "ConfigMap" => drop(typed::<ConfigMap>(doc)),
                "ServiceMonitor" | "PodMonitor" | "PrometheusRule" => {
                    assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1", "{label}");
                }
                "Deployment" => {
                    let d: Deployment = typed(doc);
                    let pod = d.spec.template.spec.expect("pod spec");
                    assert_eq!(
                        pod.security_context
                            .as_ref()
                            .and_then(|s| s.run_as_non_root),
                        Some(true),
                        "{label}"
                    );
                    let c = &pod.containers[0];
                    let sc = c
                        .security_context
                        .as_ref()
                        .expect("container securityContext");
                    assert_eq!(sc.read_only_root_filesystem, Some(true), "{label}");
                    assert_eq!(sc.allow_privilege_escalation, Some(false), "{label}");
                    assert!(
                        c.liveness_probe.is_some() && c.readiness_probe.is_some(),
                        "{label}"
                    );
                    assert!(
                        c.resources
                            .as_ref()
                            .and_then(|r| r.limits.as_ref())
                            .is_some(),
                        "{label}"
                    );
                    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
                    assert!(
                        env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"),
                        "{label}"
                    );
                }
                other => panic!("unexpected kind {other} in {label}"),
            }
            kinds.push(kind);
        }
        for required in [
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
        ] {
            assert!(
                kinds.iter().any(|k| k == required),
                "{label}: no {required}"
            );
        }
    }
}

#[test]
fn cluster_role_grants_exactly_what_the_operator_uses() {
    let Some(helm) = helm() else {
        skip_or_fail(Component::Helm, NO_HELM);
        return;
    };
    let docs = render(&helm, None);
    let role: ClusterRole = typed(operator_cluster_role(&docs));
    let rules = role.rules.unwrap_or_default();
    let verbs_for = |group: &str, resource: &str| -> Vec<String> {
        rules
            .iter()
            .filter(|r| r.api_groups.iter().flatten().any(|g| g == group))
            .filter(|r| r.resources.iter().flatten().any(|x| x == resource))
            .flat_map(|r| r.verbs.clone())
            .collect()
    };
    for rule in &rules {
        assert!(!rule.verbs.iter().any(|v| v == "*"), "no wildcard verbs");
        assert!(
            !rule.resources.iter().flatten().any(|r| r == "*"),
            "no wildcard resources"
        );
    }
    for ar in owned_kinds() {
        let verbs = verbs_for(&ar.group, &ar.plural);
        for v in ["list", "watch", "create", "patch", "delete"] {
            assert!(
                verbs.iter().any(|x| x == v),
                "{} lacks {v}: {verbs:?}",
                ar.plural
            );
        }
        let granted_onward = pod_rules()
            .iter()
            .any(|r| r.resources.iter().flatten().any(|x| *x == ar.plural));
        assert!(
            granted_onward || !verbs.iter().any(|x| x == "update"),
            "{}: SSA needs no update",
            ar.plural
        );
    }
    // Kubernetes lets the operator grant the database pods' Role only verbs it
    // holds itself.
    for rule in pod_rules() {
        for resource in rule.resources.iter().flatten() {
            let verbs = verbs_for("", resource);
            for v in &rule.verbs {
                assert!(
                    verbs.contains(v),
                    "the operator grants Patroni {v} on {resource} but lacks it: {verbs:?}"
                );
            }
        }
    }
    assert_eq!(
        verbs_for("umstore.io", "usermetadatastores"),
        ["get", "list", "watch", "patch"]
    );
    assert_eq!(
        verbs_for("umstore.io", "usermetadatastores/status"),
        ["patch"]
    );
    assert_eq!(verbs_for("events.k8s.io", "events"), ["create", "patch"]);
    assert!(
        verbs_for("", "secrets").iter().any(|v| v == "get"),
        "the bootstrap step reads the TLS Secret's ca.crt"
    );
    let lease: Role = typed(docs.iter().find(|d| d["kind"] == "Role").expect("Role"));
    assert_eq!(
        lease.rules.unwrap_or_default()[0].verbs,
        ["get", "create", "update"]
    );
}

#[test]
fn user_roles_aggregate_into_view_and_edit_and_never_grant_status() {
    let Some(helm) = helm() else {
        skip_or_fail(Component::Helm, NO_HELM);
        return;
    };
    let docs = render(&helm, None);
    let role = |name: &str| -> ClusterRole {
        typed(
            docs.iter()
                .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("ClusterRole {name}")),
        )
    };
    let aggregated = |role: &ClusterRole| -> Vec<String> {
        let mut to: Vec<String> = role
            .metadata
            .labels
            .iter()
            .flatten()
            .filter(|(_, v)| v.as_str() == "true")
            .filter_map(|(k, _)| k.strip_prefix("rbac.authorization.k8s.io/aggregate-to-"))
            .map(str::to_owned)
            .collect();
        to.sort();
        to
    };
    for (name, verbs, into) in [
        (
            "umstore-view",
            &["get", "list", "watch"][..],
            &["admin", "edit", "view"][..],
        ),
        (
            "umstore-edit",
            &[
                "get", "list", "watch", "create", "update", "patch", "delete",
            ][..],
            &["admin", "edit"][..],
        ),
    ] {
        let role = role(name);
        assert_eq!(aggregated(&role), into, "{name}");
        let rules = role.rules.unwrap_or_default();
        assert_eq!(rules.len(), 1, "{name}");
        assert_eq!(
            rules[0].api_groups.as_deref(),
            Some(&["umstore.io".to_owned()][..])
        );
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["usermetadatastores".to_owned()][..]),
            "{name}: no status subresource, nothing else"
        );
        assert_eq!(rules[0].verbs, verbs, "{name}");
    }

    let off = chart().join("ci/no-user-roles-values.yaml");
    let docs = render(&helm, Some(&off));
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "umstore-view"
                || d["metadata"]["name"] == "umstore-edit"),
        "userRoles.enabled: false installs no user roles"
    );
}
