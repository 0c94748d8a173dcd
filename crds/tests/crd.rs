//! The generated CRD: committed YAML up to date, structural schema, CEL rules cheap
//! enough for the API server, and each rule accepting valid and rejecting invalid
//! objects (client-side, with kube's `cel` feature), and the examples valid.

use kube::core::cel::{validate_cel, validate_cel_update, ValidationErrors};
use kube::CustomResourceExt;
use serde_json::{json, Value};
use umstore_crds::{UserMetadataStore, UserMetadataStoreSpec, CRD_FILE};

fn crd_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_crd_matches_the_types() {
    let generated = umstore_crds::crd_yaml().expect("CRD renders");
    let path = crd_dir().join(CRD_FILE);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &generated).expect("write CRD");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is out of date: run `cargo run -p umstore-crds --bin crdgen -- --write` \
         (or UPDATE_GOLDEN=1 cargo test -p umstore-crds) and review the diff",
        path.display()
    );
}

fn schema() -> Value {
    let crd = UserMetadataStore::crd();
    let schema = crd.spec.versions[0].schema.clone().expect("schema");
    serde_json::to_value(schema.open_api_v3_schema.expect("openAPIV3Schema")).expect("json")
}

/// Walks a schema node, collecting what makes a schema non-structural
/// (Kubernetes "Specifying a structural schema").
fn structural_problems(node: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        out.push(format!("{path}: schema is not an object"));
        return;
    };
    if obj.contains_key("$ref") {
        out.push(format!("{path}: $ref"));
    }
    for key in ["anyOf", "oneOf", "allOf", "not"] {
        if let Some(branches) = obj.get(key) {
            // Only value validations are allowed inside: no type, properties, items, default.
            for b in branches.as_array().into_iter().flatten() {
                for banned in [
                    "type",
                    "properties",
                    "items",
                    "default",
                    "additionalProperties",
                ] {
                    if b.get(banned).is_some() {
                        out.push(format!("{path}: {key} branch sets {banned}"));
                    }
                }
            }
        }
    }
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&json!(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if !obj.contains_key("type") && !int_or_string && !preserve {
        out.push(format!("{path}: no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        out.push(format!("{path}: both properties and additionalProperties"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            structural_problems(sub, &format!("{path}.{name}"), out);
        }
    }
    if let Some(items) = obj.get("items") {
        structural_problems(items, &format!("{path}[]"), out);
    }
    if let Some(ap) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        structural_problems(ap, &format!("{path}{{}}"), out);
    }
}

#[test]
fn schema_is_structural() {
    let mut problems = vec![];
    structural_problems(&schema(), "", &mut problems);
    assert!(problems.is_empty(), "non-structural schema: {problems:#?}");
}

#[test]
fn crd_names_columns_and_subresources() {
    let crd = UserMetadataStore::crd();
    assert_eq!(crd.spec.group, "umstore.io");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["ums".to_string()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version
        .subresources
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some());
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Tier", "Phase", "Schema", "Ready", "Age"]);
}

/// Every x-kubernetes-validations rule in the schema, with the node it sits on.
fn rules_with_nodes(node: &Value, out: &mut Vec<(String, Value)>) {
    if let Some(rules) = node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for r in rules {
            out.push((
                r["rule"].as_str().unwrap_or_default().to_string(),
                node.clone(),
            ));
        }
    }
    for key in ["properties", "additionalProperties"] {
        if let Some(props) = node.get(key).and_then(Value::as_object) {
            for sub in props.values() {
                rules_with_nodes(sub, out);
            }
        }
    }
    if let Some(items) = node.get("items") {
        rules_with_nodes(items, out);
    }
}

/// kube-cel's estimate is looser than the API server's: it passed rules a real
/// kube-apiserver refused (3x and 4.6x over budget before the schema bounded the
/// strings). `operator/tests/apiserver.rs` installs the CRD into a real one, which is
/// the authority; this test catches rules that do not compile without one.
#[test]
fn every_rule_compiles_and_fits_the_cost_budget() {
    use kube::core::cel::{compile_schema, estimate_rule_cost};
    let compiled = compile_schema(&schema());
    assert!(
        !compiled.has_errors(),
        "rules that do not compile: {:?}",
        compiled.compilation_errors()
    );
    let mut rules = vec![];
    rules_with_nodes(&schema(), &mut rules);
    assert!(
        rules.len() >= 12,
        "expected the CEL rules in the schema, found {}",
        rules.len()
    );
    for (rule, node) in rules {
        let warnings = estimate_rule_cost(&rule, &compile_schema(&node));
        assert!(warnings.is_empty(), "rule `{rule}`: {warnings:?}");
    }
}

fn store(spec: Value) -> UserMetadataStore {
    serde_json::from_value(json!({
        "apiVersion": "umstore.io/v1alpha1",
        "kind": "UserMetadataStore",
        "metadata": {"name": "s", "namespace": "ns"},
        "spec": spec,
    }))
    .expect("valid Rust value")
}

fn messages(result: Result<(), ValidationErrors>) -> Vec<String> {
    match result {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

fn assert_rejected(spec: Value, needle: &str) {
    let errors = messages(validate_cel(&store(spec.clone())));
    assert!(
        errors.iter().any(|e| e.contains(needle)),
        "spec {spec} should be rejected with `{needle}`, got {errors:?}"
    );
}

fn assert_accepted(spec: Value) {
    let errors = messages(validate_cel(&store(spec.clone())));
    assert!(
        errors.is_empty(),
        "spec {spec} should be accepted, got {errors:?}"
    );
}

fn tier3(groups: Value) -> Value {
    json!({"tier": 3, "regions": ["KA", "TN", "DL"], "workerGroups": groups})
}

#[test]
fn default_spec_is_accepted() {
    assert_accepted(json!({}));
    let spec: UserMetadataStoreSpec = serde_json::from_value(json!({})).expect("defaults");
    assert_eq!(spec.tier, 1);
    assert_eq!(spec.regions.len(), 36);
    assert_eq!(spec.eligibility_cache_ttl, "24h");
    assert_eq!(spec.pgbouncer.max_client_connections, 500);
}

#[test]
fn unknown_region_code_is_rejected() {
    assert_accepted(json!({"regions": ["KA", "TN"]}));
    assert_rejected(json!({"regions": ["KA", "XX"]}), "unknown region code");
    assert_rejected(json!({"regions": ["ka"]}), "unknown region code");
    assert_rejected(
        tier3(json!([{"name": "a", "regions": ["KA", "TN", "DL", "ZZ"]}])),
        "unknown region code",
    );
}

#[test]
fn tier_outside_one_to_four_is_rejected() {
    for tier in 1..=4 {
        let spec = if tier >= 3 {
            json!({"tier": tier, "regions": ["KA"], "workerGroups": [{"name": "a", "regions": ["KA"]}]})
        } else {
            json!({"tier": tier})
        };
        assert_accepted(spec);
    }
    assert_rejected(json!({"tier": 0}), "tier must be 1, 2, 3 or 4");
    assert_rejected(json!({"tier": 5}), "tier must be 1, 2, 3 or 4");
}

#[test]
fn tier_decrease_is_rejected_on_update() {
    let old = store(json!({"tier": 2}));
    let lower = store(json!({"tier": 1}));
    let same = store(json!({"tier": 2}));
    let higher = store(
        json!({"tier": 3, "regions": ["KA"], "workerGroups": [{"name": "a", "regions": ["KA"]}]}),
    );
    let errors = messages(validate_cel_update(&lower, &old));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("tier cannot be decreased")),
        "{errors:?}"
    );
    assert!(messages(validate_cel_update(&same, &old)).is_empty());
    assert!(messages(validate_cel_update(&higher, &old)).is_empty());
    // On create the transition rule does not apply.
    assert!(messages(validate_cel(&lower)).is_empty());
}

#[test]
fn worker_groups_are_required_from_tier_3() {
    assert_rejected(json!({"tier": 3}), "need spec.workerGroups");
    assert_rejected(
        json!({"tier": 4, "workerGroups": []}),
        "need spec.workerGroups",
    );
    assert_accepted(tier3(json!([{"name": "a", "regions": ["KA", "TN", "DL"]}])));
}

#[test]
fn region_in_two_worker_groups_is_rejected() {
    assert_rejected(
        tier3(json!([
            {"name": "a", "regions": ["KA", "TN"]},
            {"name": "b", "regions": ["TN", "DL"]},
        ])),
        "a region is listed in two worker groups",
    );
    assert_accepted(tier3(json!([
        {"name": "a", "regions": ["KA", "TN"]},
        {"name": "b", "regions": ["DL"]},
    ])));
}

#[test]
fn every_region_must_be_placed_from_tier_3() {
    assert_rejected(
        tier3(json!([{"name": "a", "regions": ["KA", "TN"]}])),
        "every region in spec.regions must be assigned",
    );
    assert_rejected(
        json!({"tier": 3, "regions": ["KA"], "workerGroups": [{"name": "a", "regions": ["KA", "TN"]}]}),
        "not in spec.regions",
    );
}

#[test]
fn worker_group_name_must_be_a_dns_label() {
    assert_rejected(
        json!({"tier": 3, "regions": ["KA"], "workerGroups": [{"name": "North_1", "regions": ["KA"]}]}),
        "lowercase DNS label",
    );
}

#[test]
fn gpu_count_below_zero_is_rejected() {
    assert_accepted(json!({"dataPlane": {"gpu": {"count": 0}}}));
    assert_accepted(json!({"dataPlane": {"gpu": {"count": 2}}}));
    assert_rejected(
        json!({"dataPlane": {"gpu": {"count": -1}}}),
        "must be zero or more",
    );
}

#[test]
fn malformed_durations_are_rejected() {
    assert_accepted(json!({"eligibilityCacheTtl": "1h30m"}));
    assert_accepted(json!({"encryption": {"rotationInterval": "720h"}}));
    for bad in ["24", "1d", "-5m", "0s", "soon"] {
        assert_rejected(json!({"eligibilityCacheTtl": bad}), "positive duration");
    }
    assert_rejected(
        json!({"encryption": {"rotationInterval": "weekly"}}),
        "positive duration",
    );
}

#[test]
fn replica_counts_and_pooler_limits_are_bounded() {
    assert_rejected(json!({"dataPlane": {"replicas": 0}}), "at least 1");
    assert_rejected(
        json!({"pgbouncer": {"maxClientConnections": 501}}),
        "between 1 and 500",
    );
    assert_rejected(
        json!({"replicaPools": [{"purpose": "ai", "replicas": 0}]}),
        "at least 1",
    );
}

#[test]
fn examples_are_valid() {
    let dir = crd_dir().join("../examples");
    let mut seen = 0;
    for tier in 1..=4 {
        let path = dir.join(format!("tier{tier}.yaml"));
        let text = std::fs::read_to_string(&path).expect("example exists");
        let store: UserMetadataStore = serde_yaml_ng::from_str(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        assert_eq!(store.spec.tier, tier, "{}", path.display());
        let errors = messages(validate_cel(&store));
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        seen += 1;
    }
    assert_eq!(seen, 4);
}

#[test]
fn storage_sizes_and_resources_must_be_quantities() {
    assert_accepted(json!({"postgres": {"coordinator": {"storage": {"size": "20Gi"}}}}));
    assert_accepted(json!({"postgres": {"workers": {"storage": {"size": "1.5Ti"}}}}));
    for bad in ["lots", "", "0", "-5Gi", "20 GiB"] {
        assert_rejected(
            json!({"postgres": {"coordinator": {"storage": {"size": bad}}}}),
            "storage.size must be a Kubernetes quantity",
        );
    }
    assert_accepted(json!({"postgres": {"coordinator": {"resources": {
        "requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}}}}));
    assert_accepted(json!({"dataPlane": {"resources": {"requests": {"cpu": 2}}}}));
    assert_rejected(
        json!({"postgres": {"replicas": {"resources": {"requests": {"cpu": "two"}}}}}),
        "must be non-negative Kubernetes quantities",
    );
    assert_rejected(
        json!({"dataPlane": {"resources": {"limits": {"memory": "-1Gi"}}}}),
        "must be non-negative Kubernetes quantities",
    );
}

#[test]
fn gpu_resource_name_must_be_an_extended_resource_name() {
    for good in ["nvidia.com/gpu", "amd.com/gpu", "gpu.intel.com/i915"] {
        assert_accepted(json!({"dataPlane": {"gpu": {"resourceName": good}}}));
    }
    for bad in [
        "",
        "gpu",
        "nvidia.com/",
        "/gpu",
        "Nvidia.com/gpu",
        "nvidia.com/g pu",
    ] {
        assert_rejected(
            json!({"dataPlane": {"gpu": {"resourceName": bad}}}),
            "gpu.resourceName must be an extended resource name",
        );
    }
}

#[test]
fn vault_address_must_be_an_http_url_with_a_host() {
    for good in [
        "https://vault.vault.svc:8200",
        "http://127.0.0.1:8200",
        "https://vault.example.org",
    ] {
        assert_accepted(json!({"encryption": {"vaultAddress": good}}));
    }
    for bad in [
        "vault.vault.svc:8200",
        "ftp://vault",
        "https://",
        "not a url",
        "",
    ] {
        assert_rejected(
            json!({"encryption": {"vaultAddress": bad}}),
            "encryption.vaultAddress must be an http:// or https:// URL",
        );
    }
}

fn events(fields: Value) -> Value {
    let mut events = json!({"natsUrl": "nats://nats.messaging.svc:4222"});
    if let (Some(base), Some(extra)) = (events.as_object_mut(), fields.as_object()) {
        base.extend(extra.clone());
    }
    json!({ "events": events })
}

#[test]
fn events_default_to_the_data_plane_contract() {
    assert_accepted(events(json!({})));
    let spec: UserMetadataStoreSpec = serde_json::from_value(events(json!({}))).expect("defaults");
    let events = spec.events.expect("events");
    assert_eq!(events.subject_prefix, "umstore.events");
    assert_eq!(events.stream_prefix, "UMSTORE");
    assert_eq!(events.workers, 4);
    assert_eq!(events.max_age, "7d");
    assert_eq!(events.credentials_secret, None);
    let spec: UserMetadataStoreSpec = serde_json::from_value(json!({})).expect("defaults");
    assert_eq!(spec.events, None, "no bus unless asked for");
}

#[test]
fn nats_url_must_be_a_nats_or_tls_url_with_a_host_and_no_credentials() {
    for good in [
        "nats://nats.messaging.svc:4222",
        "tls://nats.example.org:4222",
        "nats://10.0.0.7",
    ] {
        assert_accepted(events(json!({"natsUrl": good})));
    }
    for bad in [
        "nats.messaging.svc:4222",
        "http://nats.messaging.svc:4222",
        "nats://",
        "nats://user:secret@nats.messaging.svc:4222",
        "not a url",
        "",
    ] {
        assert_rejected(
            events(json!({"natsUrl": bad})),
            "events.natsUrl must be a nats:// or tls:// URL",
        );
    }
}

#[test]
fn subject_prefix_is_dot_separated_tokens_without_wildcards() {
    for good in ["umstore.events", "prod-1.umstore_events", "events"] {
        assert_accepted(events(json!({"subjectPrefix": good})));
    }
    for bad in [
        "umstore.*",
        "umstore.>",
        "umstore..events",
        ".umstore",
        "umstore.",
        "umstore events",
        "$JS.events",
    ] {
        assert_rejected(
            events(json!({"subjectPrefix": bad})),
            "events.subjectPrefix must be NATS subject tokens",
        );
    }
}

#[test]
fn stream_prefix_is_an_uppercase_jetstream_name() {
    for good in ["UMSTORE", "PROD_2", "A"] {
        assert_accepted(events(json!({"streamPrefix": good})));
    }
    for bad in ["umstore", "2UMSTORE", "UM-STORE", "UM.STORE", "_UMSTORE"] {
        assert_rejected(
            events(json!({"streamPrefix": bad})),
            "events.streamPrefix must be an uppercase letter",
        );
    }
}

#[test]
fn ingest_workers_are_between_1_and_64() {
    assert_accepted(events(json!({"workers": 1})));
    assert_accepted(events(json!({"workers": 64})));
    for bad in [0, 65, -1] {
        assert_rejected(
            events(json!({"workers": bad})),
            "events.workers must be between 1 and 64",
        );
    }
}

#[test]
fn events_max_age_is_a_positive_duration_with_days() {
    for good in ["7d", "72h", "1d12h", "90m", "45s"] {
        assert_accepted(events(json!({"maxAge": good})));
    }
    for bad in ["7", "0d", "0h0m", "1w", "-7d", "7 d", "1500ms", "week"] {
        assert_rejected(
            events(json!({"maxAge": bad})),
            "must be a positive duration in days, hours, minutes or seconds",
        );
    }
}

#[test]
fn credentials_secret_must_be_a_secret_name() {
    assert_accepted(events(json!({"credentialsSecret": "umstore-nats"})));
    for bad in ["Umstore-NATS", "umstore_nats", "-nats", "nats/creds"] {
        assert_rejected(
            events(json!({"credentialsSecret": bad})),
            "events.credentialsSecret must be a Secret name",
        );
    }
}
