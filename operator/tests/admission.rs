//! Admission on a real kube-apiserver: for every CEL rule of the generated CRD, a
//! spec that breaks it is refused when applied, with the rule's message and the
//! field it is about, so a user learns at `kubectl apply` what a pod, a
//! PersistentVolumeClaim or the data plane would otherwise fail on much later.
//! A test also checks that the table has a case for every rule in the CRD.
//! Skips with the reason where kube-apiserver or etcd is missing (fails instead
//! under `UMSTORE_REQUIRE_COMPONENTS=1`).

#[path = "support/kubeapi.rs"]
mod kubeapi;

use std::collections::BTreeSet;

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, CustomResourceExt};
use serde_json::{json, Value};
use umstore_crds::UserMetadataStore;

use kubeapi::{admin_client, example, fresh_namespace, install_crd, server_or_skip, TEST_MANAGER};

/// One invalid spec: how to break a valid store, where, and what the API server says.
struct Case {
    /// What is wrong, as a user would put it.
    what: &'static str,
    /// The store to start from: `1` the tier-1 example, `3` a small tier-3 store.
    base: u8,
    /// Breaks the spec.
    edit: fn(&mut Value),
    /// The field path in the API server's answer.
    field: &'static str,
    /// The rule's message, or the part of it that says what is wrong.
    message: &'static str,
}

const QUANTITY: &str = "storage.size must be a Kubernetes quantity above zero such as 20Gi";
const RESOURCES: &str =
    "resources requests and limits must be non-negative Kubernetes quantities such as 500m, 2 or 8Gi";
const VAULT_URL: &str = "encryption.vaultAddress must be an http:// or https:// URL with a host";
const GPU_NAME: &str = "gpu.resourceName must be an extended resource name such as nvidia.com/gpu";
const REGION: &str = "unknown region code";
const DURATION: &str = "must be a positive duration such as 24h, 90m or 1h30m";
const AT_LEAST_ONE: &str = "must be at least 1";
const NATS_URL: &str =
    "events.natsUrl must be a nats:// or tls:// URL with a host and no credentials";
const WORKERS: &str = "events.workers must be between 1 and 64";

/// `events` with a valid URL and `field` set to `value`.
fn events_with(field: &str, value: Value) -> Value {
    let mut events = json!({"natsUrl": "nats://nats.messaging.svc:4222"});
    events[field] = value;
    events
}

fn cases() -> Vec<Case> {
    vec![
        // Promotion thresholds that do not increase.
        Case {
            what: "a tier-3 threshold below the tier-2 one",
            base: 1,
            edit: |s| {
                s["autoPromotion"] = json!({"thresholds":
                    {"tier2Users": 5000, "tier3Users": 4000, "tier4Users": 10000000}})
            },
            field: "spec.autoPromotion.thresholds",
            message: "autoPromotion.thresholds must increase",
        },
        // Quantities a PersistentVolumeClaim or a pod would be refused for.
        Case {
            what: "a storage size that is not a quantity",
            base: 1,
            edit: |s| s["postgres"]["coordinator"]["storage"]["size"] = json!("lots"),
            field: "spec.postgres.coordinator.storage.size",
            message: QUANTITY,
        },
        Case {
            what: "an empty worker storage size",
            base: 3,
            edit: |s| s["postgres"]["workers"]["storage"]["size"] = json!(""),
            field: "spec.postgres.workers.storage.size",
            message: QUANTITY,
        },
        Case {
            what: "a zero replica storage size",
            base: 1,
            edit: |s| s["postgres"]["replicas"]["storage"]["size"] = json!("0Gi"),
            field: "spec.postgres.replicas.storage.size",
            message: QUANTITY,
        },
        Case {
            what: "a CPU request that is not a quantity",
            base: 1,
            edit: |s| {
                s["postgres"]["coordinator"]["resources"]["requests"]["cpu"] = json!("two cores")
            },
            field: "spec.postgres.coordinator.resources",
            message: RESOURCES,
        },
        Case {
            what: "a negative memory limit on the workers",
            base: 3,
            edit: |s| s["postgres"]["workers"]["resources"] = json!({"limits": {"memory": "-1Gi"}}),
            field: "spec.postgres.workers.resources",
            message: RESOURCES,
        },
        Case {
            what: "a replica memory request that is not a quantity",
            base: 1,
            edit: |s| {
                s["postgres"]["replicas"]["resources"] = json!({"requests": {"memory": "8 GB"}})
            },
            field: "spec.postgres.replicas.resources",
            message: RESOURCES,
        },
        Case {
            what: "a data-plane CPU limit that is not a quantity",
            base: 1,
            edit: |s| s["dataPlane"]["resources"] = json!({"limits": {"cpu": "fast"}}),
            field: "spec.dataPlane.resources",
            message: RESOURCES,
        },
        // The GPU the scheduler would look for.
        Case {
            what: "an empty GPU resource name",
            base: 1,
            edit: |s| s["dataPlane"]["gpu"] = json!({"count": 1, "resourceName": ""}),
            field: "spec.dataPlane.gpu.resourceName",
            message: GPU_NAME,
        },
        Case {
            what: "a GPU resource name without a domain",
            base: 1,
            edit: |s| s["dataPlane"]["gpu"] = json!({"count": 1, "resourceName": "gpu"}),
            field: "spec.dataPlane.gpu.resourceName",
            message: GPU_NAME,
        },
        // Several clusters (tier 4).
        Case {
            what: "clusters below tier 4",
            base: 4,
            edit: |s| s["tier"] = json!(3),
            field: "spec.clusters",
            message: "spec.clusters needs tier 4",
        },
        Case {
            what: "worker groups beside clusters",
            base: 4,
            edit: |s| s["workerGroups"] = json!([{"name": "extra", "regions": ["KA"]}]),
            field: "spec.workerGroups",
            message: "with spec.clusters, list each worker group under its cluster",
        },
        Case {
            what: "a region in two clusters",
            base: 4,
            edit: |s| s["clusters"][1]["workerGroups"][0]["regions"] = json!(["TN", "KA"]),
            field: "spec.clusters",
            message: "a region is listed in two clusters",
        },
        Case {
            what: "a region in no cluster",
            base: 4,
            edit: |s| s["regions"] = json!(["KA", "TN", "DL"]),
            field: "spec.clusters",
            message: "every region in spec.regions must be held by a worker group of one of spec.clusters",
        },
        Case {
            what: "a cluster holding a region the store does not serve",
            base: 4,
            edit: |s| s["clusters"][1]["workerGroups"][0]["regions"] = json!(["TN", "DL"]),
            field: "spec.clusters",
            message: "a cluster's worker group lists a region that is not in spec.regions",
        },
        Case {
            what: "a cluster name that is not a DNS label",
            base: 4,
            edit: |s| s["clusters"][1]["name"] = json!("South_1"),
            field: "spec.clusters[1].name",
            message: "must be a lowercase DNS label",
        },
        // The stats views.
        Case {
            what: "stats views that may be read only younger than they are refreshed",
            base: 1,
            edit: |s| s["statsViews"] = json!({"refreshInterval": "30m", "maxAge": "10m"}),
            field: "spec.statsViews.maxAge",
            message: "statsViews.maxAge must be longer than statsViews.refreshInterval",
        },
        Case {
            what: "a stats refresh interval that is not a duration",
            base: 1,
            edit: |s| s["statsViews"] = json!({"refreshInterval": "hourly"}),
            field: "spec.statsViews.refreshInterval",
            message: DURATION,
        },
        // The read cache.
        Case {
            what: "a negative read-cache size",
            base: 1,
            edit: |s| s["dataPlane"]["readCache"] = json!({"entries": -1}),
            field: "spec.dataPlane.readCache.entries",
            message: "readCache.entries must be between 0 (no cache) and 10000000",
        },
        Case {
            what: "a memory-only read cache without the event bus",
            base: 1,
            edit: |s| s["dataPlane"]["readCache"] = json!({"verify": "None"}),
            field: "spec.dataPlane.readCache.verify",
            message:
                "dataPlane.readCache.verify None keeps the cache fresh by the outbound events only",
        },
        Case {
            what: "a read-cache TTL that is not a duration",
            base: 1,
            edit: |s| s["dataPlane"]["readCache"] = json!({"ttl": "soon"}),
            field: "spec.dataPlane.readCache.ttl",
            message: DURATION,
        },
        Case {
            what: "a negative GPU count",
            base: 1,
            edit: |s| s["dataPlane"]["gpu"] = json!({"count": -1}),
            field: "spec.dataPlane.gpu.count",
            message: "must be zero or more",
        },
        // The address the data plane's Vault client dials.
        Case {
            what: "a Vault address that is not a URL",
            base: 1,
            edit: |s| s["encryption"]["vaultAddress"] = json!("vault.vault.svc:8200"),
            field: "spec.encryption.vaultAddress",
            message: VAULT_URL,
        },
        Case {
            what: "a Vault address with another scheme",
            base: 1,
            edit: |s| s["encryption"]["vaultAddress"] = json!("ftp://vault.vault.svc"),
            field: "spec.encryption.vaultAddress",
            message: VAULT_URL,
        },
        // Tiers, regions and worker groups.
        Case {
            what: "tier 5",
            base: 1,
            edit: |s| s["tier"] = json!(5),
            field: "spec.tier",
            message: "tier must be 1, 2, 3 or 4",
        },
        Case {
            what: "an unknown region code",
            base: 1,
            edit: |s| s["regions"] = json!(["KA", "XX"]),
            field: "spec.regions",
            message: REGION,
        },
        Case {
            what: "an unknown region code in a worker group",
            base: 3,
            edit: |s| s["workerGroups"][0]["regions"] = json!(["KA", "ZZ"]),
            field: "spec.workerGroups[0].regions",
            message: REGION,
        },
        Case {
            what: "tier 3 without worker groups",
            base: 3,
            edit: |s| {
                s.as_object_mut().map(|o| o.remove("workerGroups"));
            },
            field: "spec.workerGroups",
            message: "tier 3 and 4 need spec.workerGroups",
        },
        Case {
            what: "a region in two worker groups",
            base: 3,
            edit: |s| s["workerGroups"][1]["regions"] = json!(["TN", "KA"]),
            field: "spec.workerGroups",
            message: "a region is listed in two worker groups",
        },
        Case {
            what: "a worker group holding a region the store does not serve",
            base: 3,
            edit: |s| s["workerGroups"][1]["regions"] = json!(["TN", "DL"]),
            field: "spec.workerGroups",
            message: "a worker group lists a region that is not in spec.regions",
        },
        Case {
            what: "a region no worker group holds",
            base: 3,
            edit: |s| s["regions"] = json!(["KA", "TN", "KL"]),
            field: "spec.workerGroups",
            message: "from tier 3 every region in spec.regions must be assigned to a worker group",
        },
        Case {
            what: "a worker group name that is not a DNS label",
            base: 3,
            edit: |s| s["workerGroups"][0]["name"] = json!("South_1"),
            field: "spec.workerGroups[0].name",
            message: "must be a lowercase DNS label",
        },
        Case {
            what: "a worker group without pods",
            base: 3,
            edit: |s| s["workerGroups"][0]["replicas"] = json!(0),
            field: "spec.workerGroups[0].replicas",
            message: AT_LEAST_ONE,
        },
        // Counts and durations.
        Case {
            what: "a replica pool without replicas",
            base: 1,
            edit: |s| s["replicaPools"] = json!([{"purpose": "ai", "replicas": 0}]),
            field: "spec.replicaPools[0].replicas",
            message: AT_LEAST_ONE,
        },
        Case {
            what: "no PgBouncer pods",
            base: 1,
            edit: |s| s["pgbouncer"] = json!({"replicas": 0}),
            field: "spec.pgbouncer.replicas",
            message: AT_LEAST_ONE,
        },
        Case {
            what: "a PgBouncer pool of zero",
            base: 1,
            edit: |s| s["pgbouncer"] = json!({"defaultPoolSize": 0}),
            field: "spec.pgbouncer.defaultPoolSize",
            message: AT_LEAST_ONE,
        },
        Case {
            what: "more than 500 PgBouncer client connections",
            base: 1,
            edit: |s| s["pgbouncer"] = json!({"maxClientConnections": 501}),
            field: "spec.pgbouncer.maxClientConnections",
            message: "must be between 1 and 500",
        },
        Case {
            what: "no data-plane pods",
            base: 1,
            edit: |s| s["dataPlane"]["replicas"] = json!(0),
            field: "spec.dataPlane.replicas",
            message: AT_LEAST_ONE,
        },
        Case {
            what: "an eligibility TTL in days",
            base: 1,
            edit: |s| s["eligibilityCacheTtl"] = json!("1d"),
            field: "spec.eligibilityCacheTtl",
            message: DURATION,
        },
        Case {
            what: "a rotation interval that is not a duration",
            base: 1,
            edit: |s| s["encryption"]["rotationInterval"] = json!("weekly"),
            field: "spec.encryption.rotationInterval",
            message: DURATION,
        },
        // The bus the data plane connects to (and the names it creates there).
        Case {
            what: "a NATS URL with an http scheme",
            base: 1,
            edit: |s| s["events"] = events_with("natsUrl", json!("http://nats.messaging.svc:4222")),
            field: "spec.events.natsUrl",
            message: NATS_URL,
        },
        Case {
            what: "a NATS URL with credentials in it",
            base: 1,
            edit: |s| s["events"] = events_with("natsUrl", json!("nats://u:secret@nats:4222")),
            field: "spec.events.natsUrl",
            message: NATS_URL,
        },
        Case {
            what: "a subject prefix with a wildcard",
            base: 1,
            edit: |s| s["events"] = events_with("subjectPrefix", json!("umstore.>")),
            field: "spec.events.subjectPrefix",
            message: "events.subjectPrefix must be NATS subject tokens",
        },
        Case {
            what: "a lowercase stream prefix",
            base: 1,
            edit: |s| s["events"] = events_with("streamPrefix", json!("umstore")),
            field: "spec.events.streamPrefix",
            message: "events.streamPrefix must be an uppercase letter",
        },
        Case {
            what: "a credentials Secret name that is not a Secret name",
            base: 1,
            edit: |s| s["events"] = events_with("credentialsSecret", json!("NATS_Creds")),
            field: "spec.events.credentialsSecret",
            message: "events.credentialsSecret must be a Secret name",
        },
        Case {
            what: "no ingest workers",
            base: 1,
            edit: |s| s["events"] = events_with("workers", json!(0)),
            field: "spec.events.workers",
            message: WORKERS,
        },
        Case {
            what: "65 ingest workers",
            base: 1,
            edit: |s| s["events"] = events_with("workers", json!(65)),
            field: "spec.events.workers",
            message: WORKERS,
        },
        Case {
            what: "an events max age in weeks",
            base: 1,
            edit: |s| s["events"] = events_with("maxAge", json!("1w")),
            field: "spec.events.maxAge",
            message: "must be a positive duration in days, hours, minutes or seconds",
        },
        // Backups and restores.
        Case {
            what: "a backup repository that is both a bucket and a volume",
            base: 1,
            edit: |s| {
                s["backup"] = json!({"repository": {"volume": {}, "s3": {
                    "bucket": "b", "endpoint": "s3.example.com", "credentialsSecret": "s3"}}})
            },
            field: "spec.backup.repository",
            message: REPOSITORY,
        },
        Case {
            what: "a backup repository that is neither",
            base: 1,
            edit: |s| s["backup"] = json!({"repository": {}}),
            field: "spec.backup.repository",
            message: REPOSITORY,
        },
        Case {
            what: "a backup schedule that is not cron",
            base: 1,
            edit: |s| {
                s["backup"] = json!({"repository": {"volume": {}}, "schedule": {"full": "daily"}})
            },
            field: "spec.backup.schedule.full",
            message: "must be a cron schedule of five fields",
        },
        Case {
            what: "no full backup kept",
            base: 1,
            edit: |s| s["backup"] = json!({"repository": {"volume": {}}, "retention": {"full": 0}}),
            field: "spec.backup.retention.full",
            message: "must keep between 1 and 100 backups",
        },
        Case {
            what: "S3 credentials that are not a Secret name",
            base: 1,
            edit: |s| {
                s["backup"] = json!({"repository": {"s3": {
                    "bucket": "b", "endpoint": "s3.example.com", "credentialsSecret": "S3_Keys"}}})
            },
            field: "spec.backup.repository.s3.credentialsSecret",
            message: "s3.credentialsSecret must be an object name",
        },
        Case {
            what: "a restore asked for after creation",
            base: 1,
            edit: |s| s["bootstrap"] = json!({"recovery": {"source": "old-store"}}),
            field: "spec",
            message: "spec.bootstrap cannot change once the store exists",
        },
        Case {
            what: "a restore into tier 3",
            base: 3,
            edit: |s| s["bootstrap"] = json!({"recovery": {"source": "old-store"}}),
            field: "spec",
            message: "spec.bootstrap.recovery restores a tier 1 or 2 store",
        },
        Case {
            what: "a restore target that is not a time",
            base: 1,
            edit: |s| {
                s["bootstrap"] = json!({"recovery": {"source": "old", "targetTime": "yesterday"}})
            },
            field: "spec.bootstrap.recovery.targetTime",
            message: "targetTime must be an RFC 3339 time",
        },
        Case {
            what: "a restore source that is not a name",
            base: 1,
            edit: |s| s["bootstrap"] = json!({"recovery": {"source": "Old Store"}}),
            field: "spec.bootstrap.recovery.source",
            message: "recovery.source must be an object name",
        },
    ]
}

const REPOSITORY: &str = "backup.repository needs exactly one of s3";

/// The rule a transition (update) breaks, checked apart from the table.
const TIER_DECREASE: &str = "tier cannot be decreased";

/// The rule renaming the home cluster breaks, checked apart from the table.
const HOME_CLUSTER: &str = "the first cluster of spec.clusters is the home cluster";

/// A small valid tier-4 store: KA in cluster `north`, TN in cluster `south`.
fn tier4(namespace: &str) -> Value {
    let mut store = example(1, namespace);
    store["spec"]["tier"] = json!(4);
    store["spec"]["regions"] = json!(["KA", "TN"]);
    store["spec"]["clusters"] = json!([
        {"name": "north", "workerGroups": [{"name": "north-1", "regions": ["KA"]}],
         "placement": {"zones": ["zone-a"]}},
        {"name": "south", "workerGroups": [{"name": "south-1", "regions": ["TN"]}],
         "placement": {"zones": ["zone-b"], "nodeSelector": {"umstore.io/residency": "south"}}},
    ]);
    store
}

/// A small valid tier-3 store: regions KA, TN in two worker groups.
fn tier3(namespace: &str) -> Value {
    let mut store = example(1, namespace);
    store["spec"]["tier"] = json!(3);
    store["spec"]["regions"] = json!(["KA", "TN"]);
    store["spec"]["workerGroups"] = json!([
        {"name": "south-1", "regions": ["KA"]},
        {"name": "south-2", "regions": ["TN"]},
    ]);
    store
}

fn base(case_base: u8, namespace: &str) -> Value {
    match case_base {
        3 => tier3(namespace),
        4 => tier4(namespace),
        _ => example(1, namespace),
    }
}

async fn apply(stores: &Api<UserMetadataStore>, store: &Value) -> Result<(), String> {
    let name = store["metadata"]["name"].as_str().expect("name");
    stores
        .patch(
            name,
            &PatchParams::apply(TEST_MANAGER),
            &Patch::Apply(store),
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Every `message` of an `x-kubernetes-validations` rule in `node`.
fn rule_messages(node: &Value, out: &mut BTreeSet<String>) {
    match node {
        Value::Object(map) => {
            for rule in map
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                out.insert(rule["message"].as_str().unwrap_or_default().to_owned());
            }
            map.values().for_each(|v| rule_messages(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| rule_messages(v, out)),
        _ => {}
    }
}

#[test]
fn the_table_has_a_case_for_every_rule_of_the_crd() {
    let crd = serde_json::to_value(UserMetadataStore::crd()).expect("CRD as JSON");
    let mut messages = BTreeSet::new();
    rule_messages(&crd, &mut messages);
    let covered: Vec<&str> = cases()
        .iter()
        .map(|c| c.message)
        .chain([TIER_DECREASE, HOME_CLUSTER])
        .collect();
    let uncovered: Vec<&String> = messages
        .iter()
        .filter(|m| !covered.iter().any(|c| m.contains(c)))
        .collect();
    assert!(
        uncovered.is_empty(),
        "rules without an admission case: {uncovered:#?}"
    );
}

async fn setup() -> Option<(Client, String)> {
    let server = server_or_skip()?;
    let admin = admin_client(server).await;
    install_crd(&admin).await;
    let namespace = fresh_namespace(&admin, "admission").await;
    Some((admin, namespace))
}

#[tokio::test]
async fn the_api_server_refuses_a_spec_that_breaks_any_rule_with_its_message() {
    let Some((admin, ns)) = setup().await else {
        return;
    };
    let stores: Api<UserMetadataStore> = Api::namespaced(admin, &ns);
    for (i, case) in cases().iter().enumerate() {
        let mut store = base(case.base, &ns);
        store["metadata"]["name"] = json!(format!("case-{i}"));
        apply(&stores, &store)
            .await
            .unwrap_or_else(|e| panic!("the valid base of `{}` is refused: {e}", case.what));
        (case.edit)(&mut store["spec"]);
        let refused = match apply(&stores, &store).await {
            Ok(()) => panic!("{} is accepted at admission", case.what),
            Err(e) => e,
        };
        assert!(
            refused.contains(case.field) && refused.contains(case.message),
            "{}: expected `{}` at {}, got: {refused}",
            case.what,
            case.message,
            case.field
        );
    }
}

#[tokio::test]
async fn the_api_server_refuses_lowering_the_tier_and_allows_raising_it() {
    let Some((admin, ns)) = setup().await else {
        return;
    };
    let stores: Api<UserMetadataStore> = Api::namespaced(admin, &ns);
    let mut store = example(1, &ns);
    store["spec"]["tier"] = json!(2);
    apply(&stores, &store).await.expect("tier 2 is created");
    store["spec"]["tier"] = json!(1);
    let refused = apply(&stores, &store)
        .await
        .expect_err("lowering the tier is refused at admission");
    assert!(
        refused.contains("spec.tier") && refused.contains(TIER_DECREASE),
        "{refused}"
    );
    let raised = tier3(&ns);
    apply(&stores, &raised)
        .await
        .expect("raising the tier to 3 with worker groups is allowed");
}

#[tokio::test]
async fn the_api_server_keeps_the_home_cluster_first_and_lets_others_come_and_go() {
    let Some((admin, ns)) = setup().await else {
        return;
    };
    let stores: Api<UserMetadataStore> = Api::namespaced(admin, &ns);
    let mut store = tier4(&ns);
    apply(&stores, &store)
        .await
        .expect("a tier-4 store with two clusters is created");
    // Another cluster after home: allowed.
    store["spec"]["regions"] = json!(["KA", "TN", "DL"]);
    store["spec"]["clusters"]
        .as_array_mut()
        .expect("clusters")
        .push(json!({"name": "delhi", "workerGroups": [{"name": "dl-1", "regions": ["DL"]}]}));
    apply(&stores, &store)
        .await
        .expect("a third cluster is added");
    // Home renamed (or another cluster put first): refused.
    let mut swapped = store.clone();
    swapped["spec"]["clusters"]
        .as_array_mut()
        .expect("clusters")
        .swap(0, 1);
    let refused = apply(&stores, &swapped)
        .await
        .expect_err("putting another cluster first is refused");
    assert!(
        refused.contains("spec.clusters") && refused.contains(HOME_CLUSTER),
        "{refused}"
    );
    let mut gone = store.clone();
    gone["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("clusters");
    gone["spec"]["workerGroups"] = json!([{"name": "all", "regions": ["KA", "TN", "DL"]}]);
    let refused = apply(&stores, &gone)
        .await
        .expect_err("dropping the clusters is refused");
    assert!(refused.contains(HOME_CLUSTER), "{refused}");
}
