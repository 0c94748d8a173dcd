//! Day-2 benchmark (BENCHMARKS.md):
//!
//! A. On the control-plane test bed (kube-apiserver, kube-controller-manager,
//!    kube-scheduler, kwok; the operator as the chart's ServiceAccount; a real
//!    PostgreSQL and OpenBao): time from applying a tier-1 store to `Ready`, and of
//!    an automatic promotion 1 → 2, each split by pipeline step from the
//!    operator's own `umstore_operator_step_duration_seconds` (the rest is waiting:
//!    for pods, for requeues).
//! B. The rewrap of every data key through the keys step (annotation, task in the
//!    operator) beside `umstore-data-plane keys rotate`'s code path
//!    (`rotate_and_rewrap` called directly) as the baseline, same store, same Vault.
//!
//! ```sh
//! cargo bench -p umstore-operator --bench day2 -- --runs 3 --keys 1000000
//! ```

#[path = "../tests/support/kubeapi.rs"]
mod kubeapi;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use umstore_crds::{MigrationPolicy, UserMetadataStore};
use umstore_data_plane::crypto::rotation::{rotate_and_rewrap, RotationOptions};
use umstore_data_plane::crypto::{
    DataKeyCache, KeyProvider, Keyring, VaultConfig, VaultKeyProvider,
};
use umstore_e2e::{shared, Postgres};
use umstore_operator::builders::credentials::{generate_password, Credentials, Role};
use umstore_operator::builders::Env;
use umstore_operator::db::Connector;
use umstore_operator::leader::{Leadership, LeaseLock};
use umstore_operator::metrics::Metrics;
use umstore_operator::steps::bootstrap::{bootstrap, ensure_database, scram_verifier};
use umstore_operator::steps::keys::{self, Rotations, VaultAccess, VaultLogin, ROTATE_ANNOTATION};
use umstore_operator::steps::migrate::{migrate, Approval};
use umstore_operator::validated::validate;
use umstore_operator::{controller, Context};

use kubeapi::{
    admin_client, ensure_namespace, example, helm_or_skip, install_chart_rbac, install_crd,
    service_account_client, TEST_MANAGER,
};

#[derive(Parser, Debug)]
struct Args {
    /// Stores walked on the control plane.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Data keys rewrapped (part B).
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Skip part A or B.
    #[arg(long)]
    only: Option<char>,
    // cargo bench passes --bench.
    #[arg(long, hide = true)]
    bench: bool,
}

const OPERATOR_NS: &str = "umstore-system";
const STEPS: [&str; 10] = [
    "observe",
    "credentials",
    "provision",
    "bootstrap",
    "lag",
    "migrate",
    "distribute",
    "promote",
    "keys",
    "status",
];

fn token_with(name: &str, policy: &str) -> String {
    shared()
        .openbao()
        .expect("OpenBao")
        .token_with_policy(name, policy)
        .expect("token")
}

fn operator_policy(key: &str) -> String {
    keys::operator_policy("transit", key)
}

fn data_plane_policy(key: &str) -> String {
    keys::data_plane_policy("transit", key)
}

/// Seconds spent in each step so far, from the operator's metrics.
fn step_seconds(metrics: &Metrics) -> BTreeMap<String, f64> {
    let text = metrics.encode();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("umstore_operator_step_duration_seconds_sum{step=\"")
        else {
            continue;
        };
        let Some((step, value)) = rest.split_once("\"} ") else {
            continue;
        };
        out.insert(step.to_string(), value.trim().parse().unwrap_or(0.0));
    }
    out
}

fn diff(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

async fn wait_store(
    stores: &Api<UserMetadataStore>,
    name: &str,
    timeout: Duration,
    done: impl Fn(&UserMetadataStore) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = stores.get(name).await {
            if done(&s) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {name}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ready(s: &UserMetadataStore) -> bool {
    s.status.as_ref().is_some_and(|st| {
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

struct Walk {
    to_ready: f64,
    ready_steps: BTreeMap<String, f64>,
    promotion: f64,
    promotion_steps: BTreeMap<String, f64>,
}

async fn part_a(runs: usize) {
    let cp = shared()
        .control_plane()
        .expect("the control plane (scripts/install-deps.sh --test builds it)");
    let helm = helm_or_skip().expect("helm");
    let admin = admin_client(cp.api()).await;
    install_crd(&admin).await;
    let rbac = install_chart_rbac(&admin, &helm, OPERATOR_NS).await;
    let operator_client =
        service_account_client(cp.api(), &admin, &rbac.namespace, &rbac.service_account).await;
    let bao = shared().openbao().expect("OpenBao");
    let operator_token = token_with("bench-operator", &operator_policy("umstore-pii"));
    let dp_token = token_with("bench-data-plane", &data_plane_policy("umstore-pii"));

    let mut pgs = Vec::new();
    let mut connector = Connector::in_cluster();
    let suffix = std::process::id();
    let namespaces: Vec<String> = (0..runs).map(|i| format!("day2-{suffix}-{i}")).collect();
    for ns in &namespaces {
        let pg = Postgres::start_with_replicas(0).expect("PostgreSQL");
        pg.primary()
            .psql("postgres", "CREATE ROLE postgres SUPERUSER LOGIN")
            .expect("postgres role");
        connector = connector.with_address(
            &format!("pilot-coordinator.{ns}.svc"),
            5432,
            ("127.0.0.1".to_string(), pg.port()),
        );
        ensure_namespace(&admin, ns).await;
        pgs.push(pg);
    }
    let metrics = Arc::new(Metrics::new());
    let leadership = Leadership::new(false);
    tokio::spawn(
        LeaseLock::new(
            Api::<Lease>::namespaced(operator_client.clone(), OPERATOR_NS),
            "umstore-operator",
            "bench",
            Duration::from_secs(15),
        )
        .run(leadership.clone(), Duration::from_secs(1)),
    );
    let ctx = Arc::new(
        Context::new(
            operator_client,
            metrics.clone(),
            leadership,
            Env {
                operator_namespace: OPERATOR_NS.into(),
            },
            Some("bench".into()),
        )
        .with_connector(connector)
        .with_vault(VaultAccess {
            login: VaultLogin::Token(operator_token),
            ..VaultAccess::default()
        }),
    );
    tokio::spawn(controller::run(ctx, None, Arc::new(AtomicBool::new(false))));

    let mut walks = Vec::new();
    for (ns, pg) in namespaces.iter().zip(&pgs) {
        let stores: Api<UserMetadataStore> = Api::namespaced(admin.clone(), ns);
        let mut store = example(1, ns);
        store["spec"]["encryption"]["vaultAddress"] = json!(bao.address());
        store["spec"]["autoPromotion"] = json!({"thresholds":
            {"tier2Users": 40, "tier3Users": 1_000_000, "tier4Users": 10_000_000}});
        store["spec"]["replicaPools"] =
            json!([{"purpose": "ai", "replicas": 1}, {"purpose": "analytics", "replicas": 1}]);
        let before = step_seconds(&metrics);
        let t0 = Instant::now();
        stores
            .patch(
                "pilot",
                &PatchParams::apply(TEST_MANAGER),
                &Patch::Apply(&store),
            )
            .await
            .expect("apply");
        wait_store(&stores, "pilot", Duration::from_secs(180), ready).await;
        let to_ready = t0.elapsed().as_secs_f64();
        let at_ready = step_seconds(&metrics);

        let mut seeder = pg.connect("umstore").await.expect("connect");
        let mut dp = VaultConfig::with_token(bao.address(), dp_token.clone());
        dp.key_name = "umstore-pii".into();
        let keyring = Keyring::open(
            KeyProvider::Vault(Box::new(
                VaultKeyProvider::connect(dp).await.expect("vault"),
            )),
            DataKeyCache::new(16, Duration::from_secs(60)),
            &seeder,
        )
        .await
        .expect("keyring");
        umstore_data_plane::seed::seed(&mut seeder, 50, 3, &keyring)
            .await
            .expect("seed");
        seeder
            .batch_execute("ANALYZE umstore.user_directory")
            .await
            .expect("analyze");
        let t1 = Instant::now();
        stores
            .patch(
                "pilot",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"example.com/poke": "1"}}})),
            )
            .await
            .expect("poke");
        wait_store(&stores, "pilot", Duration::from_secs(180), |s| {
            s.status.as_ref().is_some_and(|st| st.tier == Some(2))
        })
        .await;
        let promotion = t1.elapsed().as_secs_f64();
        let after = step_seconds(&metrics);
        walks.push(Walk {
            to_ready,
            ready_steps: diff(&at_ready, &before),
            promotion,
            promotion_steps: diff(&after, &at_ready),
        });
        eprintln!("{ns}: Ready after {to_ready:.2} s, promotion 1 -> 2 took {promotion:.2} s");
    }
    let table = |title: &str, total: Vec<f64>, steps: Vec<&BTreeMap<String, f64>>| {
        println!(
            "\n{title}: median {:.2} s of {:?}",
            median(total.clone()),
            total
        );
        println!("| step | median seconds in the step |");
        println!("|---|---|");
        let mut in_steps = 0.0;
        for step in STEPS {
            let v = median(
                steps
                    .iter()
                    .map(|m| m.get(step).copied().unwrap_or(0.0))
                    .collect(),
            );
            in_steps += v;
            println!("| {step} | {v:.3} |");
        }
        println!(
            "| waiting (pods, requeues) | {:.3} |",
            (median(total) - in_steps).max(0.0)
        );
    };
    table(
        "A1. tier-1 store applied -> Ready",
        walks.iter().map(|w| w.to_ready).collect(),
        walks.iter().map(|w| &w.ready_steps).collect(),
    );
    table(
        "A2. promotion 1 -> 2 (from the reconcile the seeded users trigger to status.tier 2)",
        walks.iter().map(|w| w.promotion).collect(),
        walks.iter().map(|w| &w.promotion_steps).collect(),
    );
}

async fn part_b(keys_n: u64) {
    let bao = shared().openbao().expect("OpenBao");
    let key = format!("bench-{}", std::process::id());
    let operator_token = token_with(&format!("op-{key}"), &operator_policy(&key));
    let dp_token = token_with(&format!("dp-{key}"), &data_plane_policy(&key));
    let creds = Credentials {
        passwords: Role::ALL
            .iter()
            .map(|r| (*r, generate_password().expect("password")))
            .collect(),
        ..Credentials::default()
    };
    let password = creds.password(Role::Admin).to_string();
    let pg = Postgres::start().expect("PostgreSQL");
    let local = pg.connect("postgres").await.expect("socket");
    let sql: String = local
        .query_one(
            "SELECT format('CREATE ROLE postgres SUPERUSER LOGIN PASSWORD %L', $1::text)",
            &[&scram_verifier(&password)],
        )
        .await
        .expect("quote")
        .get(0);
    local.batch_execute(&sql).await.expect("postgres");
    let host = "pilot-coordinator.umstore.svc";
    let connector =
        Connector::in_cluster().with_address(host, 5432, ("127.0.0.1".to_string(), pg.port()));
    let maintenance = connector
        .connect(host, 5432, "postgres", "postgres", &password)
        .await
        .expect("connect");
    ensure_database(&maintenance).await.expect("database");
    let mut admin = connector
        .connect(host, 5432, "umstore", "postgres", &password)
        .await
        .expect("connect");
    bootstrap(&mut admin, &creds, 1).await.expect("bootstrap");
    migrate(&mut admin, MigrationPolicy::Auto, &Approval::None)
        .await
        .expect("migrate");

    // The operator creates the key; the data plane seeds under it.
    let access = VaultAccess {
        login: VaultLogin::Token(operator_token.clone()),
        ..VaultAccess::default()
    };
    let store = |rotate: Option<&str>, status: Option<umstore_crds::KeysStatus>| {
        let mut s: UserMetadataStore = serde_json::from_value(json!({
            "apiVersion": "umstore.io/v1alpha1", "kind": "UserMetadataStore",
            "metadata": {"name": "pilot", "namespace": "umstore", "uid": "bench", "generation": 1},
            "spec": {"tier": 1, "encryption": {"vaultAddress": bao.address(), "keyName": key}},
        }))
        .expect("store");
        if let Some(v) = rotate {
            s.metadata.annotations = Some([(ROTATE_ANNOTATION.to_string(), v.to_string())].into());
        }
        s.status = Some(umstore_crds::UserMetadataStoreStatus {
            keys: status,
            ..Default::default()
        });
        s
    };
    let database = keys::Database {
        connector: connector.clone(),
        host: host.into(),
        port: 5432,
        dbname: "umstore".into(),
        user: "postgres".into(),
        password: password.clone(),
    };
    let rotations = Rotations::default();
    let s = store(None, None);
    let first = keys::run(
        &access,
        &rotations,
        &s,
        &validate(&s).expect("valid"),
        &admin,
        database.clone(),
    )
    .await
    .expect("keys step");
    let mut dp = VaultConfig::with_token(bao.address(), dp_token);
    dp.key_name = key.clone();
    let keyring = Keyring::open(
        KeyProvider::Vault(Box::new(
            VaultKeyProvider::connect(dp).await.expect("vault"),
        )),
        DataKeyCache::new(16, Duration::from_secs(60)),
        &admin,
    )
    .await
    .expect("keyring");
    let t = Instant::now();
    let mut seeder = connector
        .connect(host, 5432, "umstore", "postgres", &password)
        .await
        .expect("connect");
    umstore_data_plane::seed::seed(&mut seeder, keys_n, 5, &keyring)
        .await
        .expect("seed");
    eprintln!(
        "seeded {keys_n} users in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Through the keys step, reconciled every 2 s as the operator requeues it.
    let t = Instant::now();
    let mut status = first.status;
    let step_rewrapped = loop {
        let s = store(Some("bench"), status.clone());
        let report = keys::run(
            &access,
            &rotations,
            &s,
            &validate(&s).expect("valid"),
            &admin,
            database.clone(),
        )
        .await
        .expect("keys step");
        status = report.status.clone().or(status);
        if report.reason != umstore_operator::steps::Reason::RewrappingKeys {
            let rotation = status
                .as_ref()
                .and_then(|k| k.rotation.clone())
                .expect("rotation");
            assert_eq!(rotation.state, "Succeeded", "{rotation:?}");
            break rotation.rewrapped;
        }
        tokio::time::sleep(keys::PROGRESS_INTERVAL).await;
    };
    let step_s = t.elapsed().as_secs_f64();

    // Baseline: what `umstore-data-plane keys rotate --batch-size 500` runs.
    let mut cli = VaultConfig::with_token(bao.address(), operator_token);
    cli.key_name = key.clone();
    let provider = KeyProvider::Vault(Box::new(
        VaultKeyProvider::connect(cli).await.expect("vault"),
    ));
    let t = Instant::now();
    let report = rotate_and_rewrap(
        &mut admin,
        &provider,
        RotationOptions { batch_size: 500 },
        |_| {},
    )
    .await
    .expect("rotate");
    let cli_s = t.elapsed().as_secs_f64();
    println!("\nB. rewrap of every data key ({keys_n} users)");
    println!("| path | keys | seconds | keys/s |");
    println!("|---|---|---|---|");
    println!(
        "| keys step (annotation, operator task, progress every 2 s) | {step_rewrapped} | {step_s:.1} | {:.0} |",
        step_rewrapped as f64 / step_s
    );
    println!(
        "| `keys rotate` code path (baseline) | {} | {cli_s:.1} | {:.0} |",
        report.rewrapped_total,
        report.rewrapped_total as f64 / cli_s
    );
    println!(
        "| ratio keys step / baseline (time) | | {:.2}× | |",
        step_s / cli_s
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let _ = &args.bench;
    if args.only != Some('b') {
        part_a(args.runs.max(1)).await;
    }
    if args.only != Some('a') {
        part_b(args.keys.max(1)).await;
    }
}
