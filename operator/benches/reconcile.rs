//! Reconcile latency for a tier-3 store with 36 regions in 6 worker groups, against
//! the in-memory mocked API (`tests/support`), and the resident memory of the
//! controller's caches for 1,000 stores.
//!
//! `cargo bench -p umstore-operator --bench reconcile` (`-- --iterations N` to change
//! the sample size). Baseline, in the same process: the pure builders alone
//! (validate + topology + hashing every object), i.e. the part of a reconcile that is
//! not API round trips. Prints P50/P95 and ratios; nothing is asserted.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::{reflector, watcher};
use serde_json::{json, Value};
use support::{paths, FakeApi};
use umstore_crds::UserMetadataStore;
use umstore_operator::apply::with_hash;
use umstore_operator::builders::credentials::Credentials;
use umstore_operator::builders::{topology, Env};
use umstore_operator::controller::{reconcile, Guarded};
use umstore_operator::leader::Leadership;
use umstore_operator::metrics::Metrics;
use umstore_operator::validated::validate;
use umstore_operator::Context;

const NS: &str = "bench";

/// Tier 3, all 36 regions, 6 worker groups of 3, both replica pools.
fn tier3_store(name: &str) -> Value {
    json!({
        "apiVersion": "umstore.io/v1alpha1",
        "kind": "UserMetadataStore",
        "metadata": {"name": name, "namespace": NS, "finalizers": ["umstore.io/cleanup"]},
        "spec": {
            "tier": 3,
            "workerGroups": [
                {"name": "north-1", "replicas": 3, "regions": ["UP"]},
                {"name": "north-2", "replicas": 3, "regions": ["CH", "DL", "HP", "HR", "JK", "LA", "PB", "UK"]},
                {"name": "west", "replicas": 3, "regions": ["DD", "GA", "GJ", "MH", "RJ"]},
                {"name": "south", "replicas": 3, "regions": ["AN", "AP", "KA", "KL", "LD", "PY", "TN", "TS"]},
                {"name": "east", "replicas": 3, "regions": ["AR", "AS", "BR", "JH", "ML", "MN", "MZ", "NL", "OD", "SK", "TR", "WB"]},
                {"name": "central", "replicas": 3, "regions": ["CG", "MP"]}
            ],
            "replicaPools": [{"purpose": "ai", "replicas": 3}, {"purpose": "analytics", "replicas": 2}],
            "encryption": {"vaultAddress": "https://vault:8200"}
        }
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn summary(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p95) = (percentile(&samples, 0.50), percentile(&samples, 0.95));
    println!(
        "{name:<44} n={:<5} p50={:>9.3} ms  p95={:>9.3} ms",
        samples.len(),
        ms(p50),
        ms(p95)
    );
    (p50, p95)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn context(client: kube::Client) -> Arc<Context> {
    Arc::new(Context::new(
        client,
        Arc::new(Metrics::new()),
        Leadership::new(true),
        Env {
            operator_namespace: "umstore-system".into(),
        },
        Some("bench".into()),
    ))
}

fn guard(api: &FakeApi, name: &str) -> Arc<Guarded> {
    let value = api.get(&paths::stores(NS), name).unwrap_or(Value::Null);
    Arc::new(serde_json::from_value(value).unwrap_or_else(|e| panic!("store {name}: {e}")))
}

fn applies(api: &FakeApi) -> usize {
    api.writes()
        .iter()
        .filter(|w| {
            w.content_type.starts_with("application/apply-patch") && !w.path.ends_with("/status")
        })
        .count()
}

fn rss_kib() -> u64 {
    // /proc/self/statm: size resident ... in pages.
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4
}

async fn latency(iterations: usize) {
    // Baseline: the pure part of a reconcile.
    let store: UserMetadataStore = {
        let mut v = tier3_store("s");
        v["metadata"]["uid"] = json!("u");
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    };
    let env = Env {
        operator_namespace: "umstore-system".into(),
    };
    let creds = Credentials::fixed_for_tests();
    let mut pure = Vec::with_capacity(iterations);
    let mut objects = 0;
    for _ in 0..iterations {
        let t = Instant::now();
        let v = validate(&store).unwrap_or_else(|e| panic!("{e}"));
        let desired = topology(&v, &creds, &env);
        for o in &desired {
            std::hint::black_box(with_hash(o).map(|(_, h)| h).unwrap_or_default());
        }
        objects = desired.len();
        pure.push(t.elapsed());
    }

    // First reconcile: every object applied (fresh API each time).
    let mut first = Vec::with_capacity(iterations);
    let mut applied_first = 0;
    for i in 0..iterations {
        let (client, api) = FakeApi::start();
        let name = format!("s{i}");
        api.insert(&paths::stores(NS), tier3_store(&name));
        let ctx = context(client);
        let g = guard(&api, &name);
        let t = Instant::now();
        reconcile(g, ctx).await.unwrap_or_else(|e| panic!("{e}"));
        first.push(t.elapsed());
        applied_first = applies(&api);
    }

    // Steady state: nothing changed; and one spec change (data-plane replicas).
    let (client, api) = FakeApi::start();
    api.insert(&paths::stores(NS), tier3_store("steady"));
    let ctx = context(client);
    reconcile(guard(&api, "steady"), ctx.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    api.mark_workloads_ready();
    reconcile(guard(&api, "steady"), ctx.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut steady = Vec::with_capacity(iterations);
    api.clear_log();
    for _ in 0..iterations {
        let g = guard(&api, "steady");
        let t = Instant::now();
        reconcile(g, ctx.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        steady.push(t.elapsed());
    }
    let steady_writes = api.writes().len();
    let steady_requests = api.log().len() as f64 / iterations as f64;
    // Drift: a hand edit of one StatefulSet before each reconcile, put back by it.
    let mut drift = Vec::with_capacity(iterations);
    api.clear_log();
    for i in 0..iterations {
        let mut sts = api
            .get(&paths::statefulsets(NS), "steady-worker-east")
            .unwrap_or(Value::Null);
        sts["spec"]["replicas"] = json!(10 + i);
        api.put_raw(&paths::statefulsets(NS), sts);
        let g = guard(&api, "steady");
        let t = Instant::now();
        reconcile(g, ctx.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        drift.push(t.elapsed());
    }
    let drift_applies = applies(&api) as f64 / iterations as f64;
    let mut change = Vec::with_capacity(iterations);
    api.clear_log();
    for i in 0..iterations {
        let mut s = api.get(&paths::stores(NS), "steady").unwrap_or(Value::Null);
        s["spec"]["dataPlane"]["replicas"] = json!(2 + (i % 2));
        s["metadata"]["generation"] = json!(2 + i);
        api.put_raw(&paths::stores(NS), s);
        let g = guard(&api, "steady");
        let t = Instant::now();
        reconcile(g, ctx.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        change.push(t.elapsed());
    }
    let change_applies = applies(&api) as f64 / iterations as f64;

    println!("tier-3 store: 36 regions, 6 worker groups x 3, pools ai x3 + analytics x2; {objects} desired objects");
    let (b50, b95) = summary("baseline: validate + build + hash (pure)", pure);
    let (f50, f95) = summary("first reconcile (mocked API)", first);
    let (s50, s95) = summary("steady-state reconcile, nothing changed", steady);
    let (c50, c95) = summary("reconcile after one spec change", change);
    let (d50, d95) = summary("reconcile after one hand edit (drift)", drift);
    println!("objects applied per reconcile: first {applied_first} (+8 role Secrets created, +status), steady {steady_writes} writes in {iterations} reconciles, one change {change_applies:.1}, one hand edit {drift_applies:.1}");
    println!("API requests per steady-state reconcile: {steady_requests:.1} (one LIST per owned kind and one of the database pods, no write)");
    println!(
        "ratio to baseline (p50/p95): first {:.1}x/{:.1}x, steady {:.1}x/{:.1}x, change {:.1}x/{:.1}x, drift {:.1}x/{:.1}x",
        ms(f50) / ms(b50),
        ms(f95) / ms(b95),
        ms(s50) / ms(b50),
        ms(s95) / ms(b95),
        ms(c50) / ms(b50),
        ms(c95) / ms(b95),
        ms(d50) / ms(b50),
        ms(d95) / ms(b95)
    );
}

/// The controller keeps every store in its reflector cache and, per owned object,
/// one predicate hash (the owned streams are metadata-only and not cached). This
/// fills those caches for 1,000 tier-3 stores and measures the resident memory.
fn memory(stores: usize) {
    let before = rss_kib();
    let (reader, mut writer) = reflector::store::<DeserializeGuard<UserMetadataStore>>();
    for i in 0..stores {
        let mut v = tier3_store(&format!("store-{i:04}"));
        v["metadata"]["uid"] = json!(format!("uid-{i}"));
        v["metadata"]["resourceVersion"] = json!(i.to_string());
        let obj: DeserializeGuard<UserMetadataStore> =
            serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        writer.apply_watcher_event(&watcher::Event::Apply(obj));
    }
    let after_stores = rss_kib();
    // ~60 owned objects per tier-3 store, metadata only (what owns_stream sees); an
    // upper bound, since the controller keeps only a hash per object, not the object.
    let mut owned_meta = Vec::new();
    for i in 0..stores {
        for j in 0..60 {
            owned_meta.push(PartialObjectMeta::<k8s_openapi::api::core::v1::ConfigMap> {
                types: None,
                metadata: ObjectMeta {
                    name: Some(format!("store-{i:04}-obj-{j}")),
                    namespace: Some(NS.into()),
                    uid: Some(format!("uid-{i}-{j}")),
                    resource_version: Some(j.to_string()),
                    ..ObjectMeta::default()
                },
                _phantom: Default::default(),
            });
        }
    }
    println!(
        "resident memory for {} cached stores: +{} KiB ({:.1} KiB/store); with {} owned-object metadata: +{} KiB total",
        reader.state().len(),
        after_stores.saturating_sub(before),
        after_stores.saturating_sub(before) as f64 / stores as f64,
        owned_meta.len(),
        rss_kib().saturating_sub(before)
    );
    println!("process RSS now {} KiB", rss_kib());
    std::hint::black_box(&owned_meta);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let iterations = std::env::args()
        .skip_while(|a| a != "--iterations")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    // Memory first, in a fresh process, so freed benchmark allocations are not reused.
    memory(1000);
    latency(iterations).await;
}
