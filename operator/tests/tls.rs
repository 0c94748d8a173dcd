//! TLS between the operator and a store's PostgreSQL, against a real server set up
//! as a TLS store's coordinator: the TLS lines of the operator's own
//! `postgresql.conf` (the Secret's mount path pointing at a throwaway certificate
//! for the Service name and 127.0.0.1, made with the `openssl` CLI) and its
//! `pg_hba.conf`, listening on 127.0.0.1 and 127.0.0.2. The rendered rules keep
//! plaintext SCRAM for 127.0.0.1 (the pod's own sidecars) and require TLS from
//! anywhere else, so a client at 127.0.0.2 stands for a remote one: Linux gives
//! loopback connections the source 127.0.0.1, so the operator reaches the server
//! through a forwarder that connects from 127.0.0.2. The operator logs in as
//! the image's `postgres` superuser with a password (scram-sha-256), as it does in
//! a cluster. Skips without the server binaries or `openssl`, or fails under
//! `UMSTORE_REQUIRE_COMPONENTS=1`.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use serde_json::json;
use support::{paths, FakeApi};
use umstore_crds::UserMetadataStore;
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_e2e::{forward_from, HarnessError, Postgres, TestCa, TestDir};
use umstore_operator::builders::credentials::{generate_password, Credentials, Role};
use umstore_operator::builders::{pgconfig, Env};
use umstore_operator::db::{Connector, PgTls, Verify};
use umstore_operator::leader::Leadership;
use umstore_operator::metrics::Metrics;
use umstore_operator::steps::bootstrap::{self, scram_verifier, Bootstrapped};
use umstore_operator::steps::topology::Provisioned;
use umstore_operator::steps::{Journal, Outcome, Reason};
use umstore_operator::validated::{validate, Validated};
use umstore_operator::{Context, Error};

/// The coordinator Service of the store below, as the operator computes it.
const HOST: &str = "pilot-coordinator.umstore.svc";
const NS: &str = "umstore";

/// A tier-1 store whose PostgreSQL uses the TLS Secret `pilot-tls`.
fn store() -> UserMetadataStore {
    serde_json::from_value(json!({
        "apiVersion": "umstore.io/v1alpha1",
        "kind": "UserMetadataStore",
        "metadata": {"name": "pilot", "namespace": NS, "uid": "uid-tls", "generation": 1},
        "spec": {"tier": 1, "postgres": {"tls": {"secretName": "pilot-tls"}}},
    }))
    .expect("store")
}

/// A coordinator serving TLS, and the CA its certificate chains to.
struct Server {
    pg: Postgres,
    ca: TestCa,
    /// The certificates and the rendered pg_hba.conf.
    dir: TestDir,
    /// Forwards to the server from 127.0.0.2.
    remote: SocketAddr,
}

impl Server {
    /// The store's CA, as the operator reads it from the Secret's `ca.crt`.
    fn tls(&self) -> PgTls {
        let pem = self.ca.cert_pem().expect("CA certificate");
        PgTls::from_ca_pem(pem.as_bytes(), Verify::Full, "ca.crt").expect("CA")
    }

    /// Reaches the server from 127.0.0.2 (a "remote" client) for `host`.
    fn connector(&self, host: &str) -> Connector {
        let to = (self.remote.ip().to_string(), self.remote.port());
        Connector::in_cluster().with_address(host, 5432, to)
    }
}

/// The server of a TLS store whose `postgres` superuser has `admin_password`;
/// `None` after a skip.
async fn server(v: &Validated, admin_password: &str) -> Option<Server> {
    let dir = TestDir::new("tls").expect("directory");
    let ca = match TestCa::new(dir.path(), "store") {
        Ok(ca) => ca,
        Err(HarnessError::ProgramNotFound { .. }) => {
            skip_or_fail(
                Component::OpenSsl,
                "no openssl CLI to make test certificates",
            );
            return None;
        }
        Err(e) => panic!("test CA: {e}"),
    };
    // tls.crt and tls.key, as the Secret's mount holds them.
    ca.issue("tls", &[&format!("DNS:{HOST}"), "IP:127.0.0.1"])
        .expect("server certificate");
    let mount = dir.path().display().to_string();
    let mut settings: Vec<(String, String)> = pgconfig::postgresql_conf(v)
        .lines()
        .filter(|l| l.starts_with("ssl"))
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, value)| {
            let value = value.trim_matches('\'').replace(pgconfig::TLS_DIR, &mount);
            (k.to_string(), value)
        })
        .collect();
    assert!(
        settings.iter().any(|(k, v)| k == "ssl" && v == "on"),
        "the rendered configuration turns TLS on: {settings:?}"
    );
    let hba = dir.path().join("pg_hba.conf");
    std::fs::write(&hba, pgconfig::pg_hba_conf(v)).expect("pg_hba.conf");
    settings.extend([
        ("hba_file".into(), hba.display().to_string()),
        ("listen_addresses".into(), "127.0.0.1,127.0.0.2".into()),
    ]);
    let pg = Postgres::start_with_settings(settings)
        .unwrap_or_else(|e| panic!("PostgreSQL with the rendered TLS configuration: {e}"));
    // The image's superuser, with the password of the admin role Secret.
    let local = pg.connect("postgres").await.expect("unix socket");
    let sql: String = local
        .query_one(
            "SELECT format('CREATE ROLE postgres SUPERUSER LOGIN PASSWORD %L', $1::text)",
            &[&scram_verifier(admin_password)],
        )
        .await
        .expect("quote")
        .get(0);
    local.batch_execute(&sql).await.expect("create postgres");
    let remote = forward_from(
        Ipv4Addr::new(127, 0, 0, 2).into(),
        (Ipv4Addr::new(127, 0, 0, 2), pg.port()).into(),
    )
    .await
    .expect("forwarder from 127.0.0.2");
    Some(Server {
        pg,
        ca,
        dir,
        remote,
    })
}

/// The server's own words for a refused connection.
fn refusal(e: &Error) -> String {
    match e {
        Error::Database { source, .. } => source
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string()),
        other => other.to_string(),
    }
}

#[tokio::test]
async fn the_operator_connects_over_tls_to_the_service_name_mapped_to_loopback() {
    let v = validate(&store()).expect("valid");
    let password = generate_password().expect("password");
    let Some(server) = server(&v, &password).await else {
        return;
    };
    let connector = server.connector(HOST).with_tls(Some(server.tls()));
    let client = connector
        .connect(HOST, 5432, "postgres", "postgres", &password)
        .await
        .expect("TLS to the Service name, from 127.0.0.2");
    let row = client
        .query_one(
            "SELECT ssl, host(inet_client_addr()) FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    assert!(row.get::<_, bool>(0), "the session is encrypted");
    assert_eq!(row.get::<_, String>(1), "127.0.0.2", "a non-local client");
}

#[tokio::test]
async fn a_certificate_of_another_ca_or_for_another_name_is_refused() {
    let v = validate(&store()).expect("valid");
    let password = generate_password().expect("password");
    let Some(server) = server(&v, &password).await else {
        return;
    };
    // Another CA: the chain does not verify.
    let other = TestCa::new(server.dir.path(), "other").expect("other CA");
    let other_tls = PgTls::from_ca_pem(
        other.cert_pem().expect("pem").as_bytes(),
        Verify::Full,
        "ca.crt",
    )
    .expect("other CA");
    let err = server
        .connector(HOST)
        .with_tls(Some(other_tls))
        .connect(HOST, 5432, "postgres", "postgres", &password)
        .await
        .expect_err("a server whose certificate another CA signed is refused");
    let message = err.to_string();
    assert!(
        message.contains("invalid peer certificate") && message.contains("UnknownIssuer"),
        "{message}"
    );

    // The right CA, but a Service name the certificate does not hold.
    let elsewhere = "elsewhere-coordinator.umstore.svc";
    let err = server
        .connector(elsewhere)
        .with_tls(Some(server.tls()))
        .connect(elsewhere, 5432, "postgres", "postgres", &password)
        .await
        .expect_err("a certificate for another name is refused");
    let message = err.to_string();
    assert!(
        message.contains("invalid peer certificate") && message.contains(elsewhere),
        "{message}"
    );
    // Checking the chain only (libpq's verify-ca) accepts it.
    let pem = server.ca.cert_pem().expect("pem");
    let chain_only = PgTls::from_ca_pem(pem.as_bytes(), Verify::Chain, "ca.crt").expect("CA");
    server
        .connector(elsewhere)
        .with_tls(Some(chain_only))
        .connect(elsewhere, 5432, "postgres", "postgres", &password)
        .await
        .expect("verify-ca ignores the name");
}

#[tokio::test]
async fn plaintext_from_a_non_local_address_is_refused_by_hostnossl_reject() {
    let v = validate(&store()).expect("valid");
    let password = generate_password().expect("password");
    let Some(server) = server(&v, &password).await else {
        return;
    };
    let err = server
        .connector(HOST)
        .connect(HOST, 5432, "postgres", "postgres", &password)
        .await
        .expect_err("plaintext from 127.0.0.2 is refused");
    let message = refusal(&err);
    assert!(
        message.contains("rejects connection") && message.contains("no encryption"),
        "{message}"
    );
    // 127.0.0.1 is the pod's own address: plaintext SCRAM stays allowed there.
    Connector::in_cluster()
        .with_address(HOST, 5432, ("127.0.0.1".into(), server.pg.port()))
        .connect(HOST, 5432, "postgres", "postgres", &password)
        .await
        .expect("in-pod plaintext");
}

/// One run of the bootstrap step.
async fn step(
    ctx: &Context,
    v: &Validated,
    credentials: &Credentials,
    provisioned: &Provisioned,
) -> Outcome<Bootstrapped> {
    let mut journal = Journal::default();
    bootstrap::run(ctx, v, credentials, provisioned, &mut journal)
        .await
        .expect("the step runs")
}

#[tokio::test]
async fn a_tls_stores_bootstrap_step_waits_for_its_secret_then_bootstraps_over_tls() {
    let store = store();
    let v = validate(&store).expect("valid");
    let credentials = Credentials {
        passwords: Role::ALL
            .iter()
            .map(|r| (*r, generate_password().expect("password")))
            .collect(),
        ..Credentials::default()
    };
    let Some(server) = server(&v, credentials.password(Role::Admin)).await else {
        return;
    };
    let (client, api) = FakeApi::start();
    let ctx = Context::new(
        client,
        Arc::new(Metrics::new()),
        Leadership::new(true),
        Env {
            operator_namespace: "umstore-system".into(),
        },
        None,
    )
    .with_connector(server.connector(HOST));
    let provisioned = Provisioned {
        objects: 0,
        coordinator: "pilot-coordinator".into(),
        coordinator_ready: true,
    };
    let run = || step(&ctx, &v, &credentials, &provisioned);

    // No Secret yet: a condition naming it, not an error.
    let Outcome::Waiting(w) = run().await else {
        panic!("bootstrapped without the TLS Secret");
    };
    assert_eq!(w.reason, Reason::TlsSecretMissing);
    assert!(
        w.message.contains("pilot-tls") && w.message.contains("does not exist"),
        "{}",
        w.message
    );
    assert!(w.requeue_after.is_some(), "looked at again");

    // A Secret without ca.crt.
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let secret = |data: serde_json::Value| {
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "pilot-tls", "namespace": NS},
            "data": data,
        })
    };
    let tls_crt = std::fs::read_to_string(server.dir.path().join("tls.crt")).expect("tls.crt");
    api.insert(
        &paths::secrets(NS),
        secret(json!({"tls.crt": b64(&tls_crt), "tls.key": b64("key")})),
    );
    let Outcome::Waiting(w) = run().await else {
        panic!("bootstrapped without ca.crt");
    };
    assert_eq!(w.reason, Reason::TlsSecretMissing);
    assert!(
        w.message.contains("pilot-tls") && w.message.contains("no ca.crt key"),
        "{}",
        w.message
    );

    // cert-manager's layout: the step connects over TLS and bootstraps.
    let ca = server.ca.cert_pem().expect("CA");
    api.insert(
        &paths::secrets(NS),
        secret(json!({"tls.crt": b64(&tls_crt), "tls.key": b64("key"), "ca.crt": b64(&ca)})),
    );
    let Outcome::Done(bootstrapped) = run().await else {
        panic!("not bootstrapped with the TLS Secret in place");
    };
    assert!(bootstrapped.connector.tls().is_some());
    let row = bootstrapped
        .admin
        .query_one(
            "SELECT ssl, current_database()::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    assert!(row.get::<_, bool>(0), "the admin connection is encrypted");
    assert_eq!(row.get::<_, String>(1), "umstore");
    // The keys step's own connections go the same way.
    let again = bootstrapped
        .connector
        .connect(
            HOST,
            5432,
            "umstore",
            "postgres",
            credentials.password(Role::Admin),
        )
        .await
        .expect("the handed-on connector");
    let ssl: bool = again
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl);
}
