//! Fleet benchmark (BENCHMARKS.md, "Fleet scale"): N tier-1 stores on one
//! operator, on the control-plane test bed (kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok's fake nodes, so every store's pods are really scheduled
//! and become Ready).
//!
//! The operator runs as its own process (the `umstore-operator` binary, as the
//! chart's ServiceAccount under the chart's RBAC), so its resident memory is its
//! own. The bench creates N stores (`--in-flight` creates at a time, 16 by
//! default), then reports:
//!
//! - time from the first create until every store is `Provisioned`;
//! - the objects the stores own and the pods and claims the cluster made for them;
//! - P50/P95 reconcile duration from the operator's
//!   `umstore_operator_reconcile_duration_seconds` histogram;
//! - API requests per steady-state reconcile (`umstore_operator_api_requests_total`,
//!   watches excluded) over a window once everything is provisioned: no store's
//!   PostgreSQL answers here (kwok runs no container), so each store waits at the
//!   bootstrap step and is looked at again every few seconds, writing nothing;
//! - the operator's RSS before the first store and once the fleet is provisioned,
//!   and the difference per store.
//!
//! `--baseline` runs no operator: the bench makes each store's writes itself,
//! once, as the operator's first reconcile makes them, for the control plane's
//! floor beside the operator's time.
//!
//! ```sh
//! cargo bench -p umstore-operator --bench fleet -- --stores 1000
//! cargo bench -p umstore-operator --bench fleet -- --stores 1000 --baseline
//! ```

#[path = "../tests/support/kubeapi.rs"]
mod kubeapi;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{stream, StreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde_json::json;
use umstore_crds::{condition, UserMetadataStore};
use umstore_e2e::{ControlPlane, FakeNode};
use umstore_operator::apply;
use umstore_operator::builders::api_tokens::{tokens_secret, ApiTokens};
use umstore_operator::builders::credentials::{generate_password, role_secret, Credentials, Role};
use umstore_operator::builders::{owned_kinds, topology, Env, Object};
use umstore_operator::meta::{MANAGED_BY_LABEL, MANAGER};
use umstore_operator::validated::validate;

use kubeapi::{
    admin_client, ensure_namespace, example, install_chart_rbac, install_crd, service_account_token,
};

#[derive(Parser, Debug)]
struct Args {
    /// Stores created (one fresh control plane and operator per invocation).
    #[arg(long, default_value_t = 100)]
    stores: usize,
    /// Seconds of steady state over which API requests per reconcile are counted.
    #[arg(long, default_value_t = 30)]
    window: u64,
    /// Give up waiting for the fleet to be provisioned after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Stores per namespace (0: all in one namespace).
    #[arg(long, default_value_t = 10)]
    per_namespace: usize,
    /// The operator's `--concurrency` (its default when absent).
    #[arg(long)]
    concurrency: Option<String>,
    /// No operator: the bench itself makes each store's writes once, the
    /// operator's own way (its builders, its Secrets and server-side applies,
    /// one status write), `--in-flight` stores at a time: the floor of what the control
    /// plane takes for the same objects, beside which the operator's time is
    /// read.
    #[arg(long)]
    baseline: bool,
    /// Stores created (and, with `--baseline`, provisioned) at a time.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Accepted for `cargo bench`'s harness flag.
    #[arg(long, hide = true)]
    bench: bool,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The operator's `/metrics`, as `name{labels}` → value.
async fn scrape(port: u16) -> BTreeMap<String, f64> {
    let text = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(mut s) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let req = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            let _ = s.write_all(req.as_bytes()).await;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        }
        Err(_) => String::new(),
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sum_prefix(m: &BTreeMap<String, f64>, prefix: &str, exclude: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix) && !k.contains(exclude))
        .map(|(_, v)| v)
        .sum()
}

/// A quantile of the reconcile-duration histogram between two scrapes, linear
/// within a bucket (as Prometheus's `histogram_quantile`).
fn quantile(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, q: f64) -> f64 {
    let prefix = "umstore_operator_reconcile_duration_seconds_bucket{le=\"";
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(prefix)?.strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v - before.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let width = count - prev.1;
            let frac = if width > 0.0 {
                (rank - prev.1) / width
            } else {
                1.0
            };
            return prev.0 + (le - prev.0) * frac;
        }
        prev = (le, count);
    }
    prev.0
}

struct Operator {
    child: Child,
    port: u16,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_operator(
    args: &Args,
    cp: &ControlPlane,
    admin: &Client,
    namespace: &str,
    service_account: &str,
) -> Operator {
    let token = service_account_token(admin, namespace, service_account).await;
    let dir = cp.dir().join("fleet-operator");
    std::fs::create_dir_all(&dir).expect("operator dir");
    let kubeconfig = dir.join("kubeconfig");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cp", "cluster": {
            "server": cp.api().url(),
            "certificate-authority": cp.api().ca_cert(),
        }}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "cp", "context": {"cluster": "cp", "user": "operator"}}],
        "current-context": "cp",
    });
    std::fs::write(&kubeconfig, config.to_string()).expect("write kubeconfig");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let log = std::fs::File::create(dir.join("operator.log")).expect("operator log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_umstore-operator"));
    if let Some(c) = &args.concurrency {
        command.args(["--concurrency", c]);
    }
    let child = command
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--namespace", namespace, "--identity", "fleet-bench"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start umstore-operator");
    let operator = Operator { child, port };
    let deadline = Instant::now() + Duration::from_secs(60);
    while scrape(port)
        .await
        .get("umstore_operator_leader")
        .is_none_or(|v| *v < 1.0)
    {
        assert!(
            Instant::now() < deadline,
            "the operator did not lead in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    operator
}

fn provisioned(store: &UserMetadataStore) -> bool {
    store.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == condition::PROVISIONED && c.status == "True")
    })
}

async fn owned_objects(admin: &Client, namespace: &str) -> usize {
    let params = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let mut n = 0;
    for ar in owned_kinds() {
        let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), namespace, &ar);
        n += api
            .list_metadata(&params)
            .await
            .map_or(0, |l| l.items.len());
    }
    n
}

/// The objects the stores own, and the pods and claims the cluster made,
/// over `namespaces`.
async fn counts(admin: &Client, namespaces: &[String]) -> (usize, usize, usize) {
    let (mut objects, mut pods, mut claims) = (0, 0, 0);
    for namespace in namespaces {
        objects += owned_objects(admin, namespace).await;
        pods += Api::<Pod>::namespaced(admin.clone(), namespace)
            .list_metadata(&ListParams::default())
            .await
            .map_or(0, |l| l.items.len());
        claims += Api::<PersistentVolumeClaim>::namespaced(admin.clone(), namespace)
            .list_metadata(&ListParams::default())
            .await
            .map_or(0, |l| l.items.len());
    }
    (objects, pods, claims)
}

async fn run(cp: &ControlPlane, admin: &Client, operator: &Operator, n: usize, args: &Args) {
    // Stores spread over namespaces of `--per-namespace` (a team's namespace each),
    // or all in one.
    let per = if args.per_namespace == 0 {
        n
    } else {
        args.per_namespace
    };
    let namespace_of = |i: usize| format!("fleet-{}", i / per);
    let namespaces: Vec<String> = (0..n.div_ceil(per)).map(|k| format!("fleet-{k}")).collect();
    for ns in &namespaces {
        ensure_namespace(admin, ns).await;
    }
    let stores: Api<UserMetadataStore> = Api::all(admin.clone());
    let before = scrape(operator.port).await;
    let rss_before = rss_kib(operator.child.id());
    let started = Instant::now();
    let created: Vec<_> = stream::iter(0..n)
        .map(|i| {
            let namespace = namespace_of(i);
            let stores: Api<UserMetadataStore> = Api::namespaced(admin.clone(), &namespace);
            let mut store = example(1, &namespace);
            store["metadata"]["name"] = json!(format!("s{i:04}"));
            async move {
                let store: UserMetadataStore =
                    serde_json::from_value(store).expect("the example is a store");
                stores.create(&PostParams::default(), &store).await
            }
        })
        .buffer_unordered(args.in_flight.max(1))
        .collect()
        .await;
    let failed = created.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        failed,
        0,
        "creates failed: {:?}",
        created.iter().find(|r| r.is_err())
    );
    let created_in = started.elapsed();
    let mut rss_peak = rss_kib(operator.child.id());
    // A watch, not repeated LISTs of every store: the bench must not be what loads
    // the API server.
    let mut done: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut events = Box::pin(
        kube::runtime::watcher(stores.clone(), kube::runtime::watcher::Config::default())
            .applied_objects(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut sample = tokio::time::interval(Duration::from_millis(500));
    let provisioned_in = loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(store)) if provisioned(&store) => {
                    done.insert(store.metadata.name.clone().unwrap_or_default());
                    if done.len() == n {
                        break started.elapsed();
                    }
                }
                Some(_) => {}
                None => panic!("the watch of the stores ended"),
            },
            _ = sample.tick() => {
                rss_peak = rss_peak.max(rss_kib(operator.child.id()));
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} of {n} stores provisioned after {} s",
                    done.len(),
                    args.timeout
                );
            }
        }
    };
    drop(events);
    let at_provisioned = scrape(operator.port).await;
    let rss_provisioned = rss_kib(operator.child.id());
    // Let the cluster catch up (pods scheduled and Ready, claims bound), then count
    // the requests of a steady-state window.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let window_start = scrape(operator.port).await;
    tokio::time::sleep(Duration::from_secs(args.window)).await;
    let window_end = scrape(operator.port).await;
    let rss_settled = rss_kib(operator.child.id());
    let requests = sum_prefix(&window_end, "umstore_operator_api_requests_total", "watch")
        - sum_prefix(
            &window_start,
            "umstore_operator_api_requests_total",
            "watch",
        );
    let reconciles = window_end
        .get("umstore_operator_reconciles_total")
        .copied()
        .unwrap_or(0.0)
        - window_start
            .get("umstore_operator_reconciles_total")
            .copied()
            .unwrap_or(0.0);
    let (objects, pods, claims) = counts(admin, &namespaces).await;
    let p50 = quantile(&before, &at_provisioned, 0.5);
    let p95 = quantile(&before, &at_provisioned, 0.95);
    let sp50 = quantile(&window_start, &window_end, 0.5);
    let sp95 = quantile(&window_start, &window_end, 0.95);
    let failures = sum_prefix(
        &window_end,
        "umstore_operator_reconcile_failures_total",
        "\u{0}",
    ) - sum_prefix(
        &before,
        "umstore_operator_reconcile_failures_total",
        "\u{0}",
    );
    let _ = cp;
    let step_means = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
        let mut out = Vec::new();
        for (k, v) in b {
            let Some(step) = k
                .strip_prefix("umstore_operator_step_duration_seconds_sum{step=\"")
                .and_then(|s| s.strip_suffix("\"}"))
            else {
                continue;
            };
            let count_key =
                format!("umstore_operator_step_duration_seconds_count{{step=\"{step}\"}}");
            let sum = v - a.get(k).copied().unwrap_or(0.0);
            let count = b.get(&count_key).copied().unwrap_or(0.0)
                - a.get(&count_key).copied().unwrap_or(0.0);
            if count > 0.0 {
                out.push(format!("{step} {:.0} ms", sum / count * 1000.0));
            }
        }
        out.join(", ")
    };
    let total_reconciles = |m: &BTreeMap<String, f64>| {
        m.get("umstore_operator_reconciles_total")
            .copied()
            .unwrap_or(0.0)
    };
    let verbs = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
        b.iter()
            .filter_map(|(k, v)| {
                let verb = k
                    .strip_prefix("umstore_operator_api_requests_total{verb=\"")?
                    .strip_suffix("\"}")?;
                Some(format!(
                    "{verb} {:.0}",
                    v - a.get(k).copied().unwrap_or(0.0)
                ))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "API requests until provisioned: {}; in the steady window: {}",
        verbs(&before, &at_provisioned),
        verbs(&window_start, &window_end)
    );
    eprintln!(
        "reconciles until provisioned: {:.0} ({:.1} per store); step means until provisioned: {}; in the steady window: {}",
        total_reconciles(&at_provisioned) - total_reconciles(&before),
        (total_reconciles(&at_provisioned) - total_reconciles(&before)) / n as f64,
        step_means(&before, &at_provisioned),
        step_means(&window_start, &window_end),
    );
    println!(
        "| {n} ({} ns) | {objects} | {pods} / {claims} | {:.1} s | {:.1} s | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.1} ({requests:.0} / {reconciles:.0}) | {:.1} / {:.1} / {:.1} / {:.1} MiB | {:.1} KiB | {failures:.0} |",
        namespaces.len(),
        created_in.as_secs_f64(),
        provisioned_in.as_secs_f64(),
        p50 * 1000.0,
        p95 * 1000.0,
        sp50 * 1000.0,
        sp95 * 1000.0,
        requests / reconciles.max(1.0),
        rss_before as f64 / 1024.0,
        rss_peak as f64 / 1024.0,
        rss_provisioned as f64 / 1024.0,
        rss_settled as f64 / 1024.0,
        (rss_settled.saturating_sub(rss_before)) as f64 / n as f64,
    );
}

/// One store's writes made directly, as the operator's first reconcile makes
/// them: the role and token Secrets created, every object of its tier
/// server-side applied, and `Provisioned` in its status.
async fn provision_directly(admin: &Client, store: &UserMetadataStore) {
    let v = validate(store).expect("the example is valid");
    let namespace = v.owner.namespace.clone();
    let mut creds = Credentials::default();
    for role in Role::ALL {
        let password = generate_password().expect("entropy");
        let secret = Object::Secret(role_secret(&v.owner, role, &password));
        apply::create_if_absent(admin, &namespace, &secret)
            .await
            .expect("create a role Secret");
        creds.passwords.insert(role, password);
    }
    creds.api_tokens = ApiTokens::generate().expect("entropy");
    let tokens = Object::Secret(tokens_secret(&v.owner, &creds.api_tokens));
    apply::create_if_absent(admin, &namespace, &tokens)
        .await
        .expect("create the tokens Secret");
    let env = Env {
        operator_namespace: "umstore-system".into(),
    };
    let nothing = apply::Observed::default();
    for object in topology(&v, &creds, &env) {
        apply::apply(admin, &namespace, &object, &nothing)
            .await
            .expect("apply an object");
    }
    let stores: Api<UserMetadataStore> = Api::namespaced(admin.clone(), &namespace);
    let status = json!({"status": {"phase": "Provisioning", "conditions": [{
        "type": condition::PROVISIONED, "status": "True", "reason": "Applied",
        "message": "applied by the fleet bench's baseline",
        "lastTransitionTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    }]}});
    stores
        .patch_status(
            &v.owner.name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .expect("write the status");
}

/// `--baseline`: N stores created and provisioned by the bench itself
/// (`--in-flight` at a time), no operator; the same table's columns where
/// they apply.
async fn run_baseline(admin: &Client, n: usize, args: &Args) {
    let per = if args.per_namespace == 0 {
        n
    } else {
        args.per_namespace
    };
    let namespaces: Vec<String> = (0..n.div_ceil(per)).map(|k| format!("fleet-{k}")).collect();
    for ns in &namespaces {
        ensure_namespace(admin, ns).await;
    }
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let namespace = format!("fleet-{}", i / per);
            let admin = admin.clone();
            async move {
                let stores: Api<UserMetadataStore> = Api::namespaced(admin.clone(), &namespace);
                let mut store = example(1, &namespace);
                store["metadata"]["name"] = json!(format!("s{i:04}"));
                let store: UserMetadataStore =
                    serde_json::from_value(store).expect("the example is a store");
                let created = stores
                    .create(&PostParams::default(), &store)
                    .await
                    .expect("create a store");
                provision_directly(&admin, &created).await;
            }
        })
        .buffer_unordered(args.in_flight.max(1))
        .collect::<Vec<()>>()
        .await;
    let provisioned_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (objects, pods, claims) = counts(admin, &namespaces).await;
    println!(
        "| {n} ({} ns), baseline: no operator, {} in flight | {objects} | {pods} / {claims} | — | {:.1} s | — | — | — | — | — | — |",
        namespaces.len(),
        args.in_flight,
        provisioned_in.as_secs_f64(),
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let Some(helm) = kubeapi::helm_or_skip() else {
        return;
    };
    let cp = match ControlPlane::start() {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("fleet bench needs the control plane: {e}");
            std::process::exit(1);
        }
    };
    // Room for every store's pods: the default nodes hold 110 pods each.
    for i in 0..3 {
        cp.add_node(FakeNode::cpu(format!("kwok-fleet-{i}")).with_capacity(4000, "16Ti", 3000))
            .expect("add a fleet node");
    }
    let admin = admin_client(cp.api()).await;
    install_crd(&admin).await;
    if args.baseline {
        println!("| stores | owned objects | pods / claims | all created | all Provisioned | | | | | | |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        run_baseline(&admin, args.stores, &args).await;
        return;
    }
    let rbac = install_chart_rbac(&admin, &helm, "umstore-system").await;
    let operator = start_operator(&args, &cp, &admin, &rbac.namespace, &rbac.service_account).await;
    println!(
        "| stores | owned objects | pods / claims | all created | all Provisioned | reconcile P50 / P95 (to provisioned) | steady P50 / P95 | API requests per steady reconcile | RSS start / peak / provisioned / settled | RSS per store | failed reconciles |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    run(&cp, &admin, &operator, args.stores, &args).await;
}
