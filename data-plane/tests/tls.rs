//! The data plane's connections over TLS, against a real PostgreSQL set up as a
//! TLS store's coordinator (`ssl = on` with a throwaway certificate for
//! `pilot-coordinator.umstore.svc` and 127.0.0.1, made with the `openssl` CLI; the
//! operator's pg_hba rules: plaintext SCRAM only from 127.0.0.1, TLS required from
//! anywhere else), listening on 127.0.0.1 and 127.0.0.2. The URLs are the ones the
//! operator writes into the connection Secrets (`sslmode=verify-full` and
//! `sslrootcert=<the mounted ca.crt>`), with `hostaddr` standing in for the
//! Service's DNS record: the name checked is the Service's. The client is a
//! non-local one: Linux gives loopback connections the source 127.0.0.1, so the
//! data plane reaches the server through a forwarder that connects from 127.0.0.2.
//! The data plane logs in as the production login users.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime};
use umstore_data_plane::api::pools::Logins;
use umstore_data_plane::api::ReadPools;
use umstore_data_plane::db::Database;
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_e2e::{forward_from, HarnessError, Postgres, TestCa, TestDir};
use umstore_migrations::roles::Purpose;

const HOST: &str = "pilot-coordinator.umstore.svc";

/// pg_hba.conf as the operator renders it for a store with TLS.
const HBA: &str = "local all all trust\n\
                   host all all 127.0.0.1/32 scram-sha-256\n\
                   hostssl all all 0.0.0.0/0 scram-sha-256\n\
                   hostnossl all all 0.0.0.0/0 reject\n";

struct Server {
    pg: Postgres,
    ca: TestCa,
    dir: TestDir,
    /// Forwards to the server from 127.0.0.2.
    remote: SocketAddr,
}

impl Server {
    /// `purpose`'s login to `host` (reached from 127.0.0.2) with `ssl` parameters.
    fn url(&self, purpose: Purpose, host: &str, ssl: &str) -> String {
        format!(
            "postgresql://{}:{}@{host}:{}/postgres?hostaddr={}&{ssl}",
            purpose.login().expect("a login"),
            support::password(purpose),
            self.remote.port(),
            self.remote.ip(),
        )
    }

    /// The parameters the operator's connection Secrets carry, with our CA file.
    fn verify_full(&self) -> String {
        format!(
            "sslmode=verify-full&sslrootcert={}",
            self.ca.cert().display()
        )
    }
}

/// The server, with the production login users; `None` after a skip.
async fn server() -> Option<Server> {
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
    let cert = ca
        .issue("tls", &[&format!("DNS:{HOST}"), "IP:127.0.0.1"])
        .expect("server certificate");
    let hba = dir.path().join("pg_hba.conf");
    std::fs::write(&hba, HBA).expect("pg_hba.conf");
    let setting = |k: &str, v: String| (k.to_string(), v);
    let pg = Postgres::start_with_settings(vec![
        setting("ssl", "on".into()),
        setting("ssl_cert_file", cert.cert.display().to_string()),
        setting("ssl_key_file", cert.key.display().to_string()),
        setting("ssl_min_protocol_version", "TLSv1.2".into()),
        setting("hba_file", hba.display().to_string()),
        setting("listen_addresses", "127.0.0.1,127.0.0.2".into()),
    ])
    .expect("PostgreSQL serving TLS");
    let superuser = support::connect(&pg.conninfo("postgres")).await;
    support::make_production_logins(&superuser).await;
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

async fn ssl_of(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

#[tokio::test]
async fn the_writer_and_its_pool_connect_with_verify_full() {
    let Some(server) = server().await else {
        return;
    };
    let url = server.url(Purpose::Writer, HOST, &server.verify_full());
    let database = Database::parse(&url).expect("the operator's URL parses");
    let client = database.connect().await.expect("verify-full");
    assert!(ssl_of(&client).await, "the writer's session is encrypted");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("user")
        .get(0);
    assert_eq!(user, "umstore_writer_login");

    // The ingest workers' pool is built the same way.
    let pool = Pool::builder(database.pool_manager(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    }))
    .max_size(2)
    .runtime(Runtime::Tokio1)
    .build()
    .expect("pool");
    let pooled = pool.get().await.expect("a pooled connection");
    assert!(ssl_of(&pooled).await, "pooled sessions are encrypted");

    // And the read API's pools, from the purposes' URLs.
    let ai =
        Database::parse(&server.url(Purpose::Ai, HOST, &server.verify_full())).expect("AI login");
    let logins = Logins {
        primary: [(Purpose::Ai, ai)].into(),
        replica: Default::default(),
    };
    let reads = ReadPools::new(&logins, 2, Duration::from_millis(100)).expect("read pools");
    let (read, _) = reads
        .get(Purpose::Ai, None)
        .await
        .expect("a read connection");
    assert!(ssl_of(&read).await, "reads are encrypted");
}

#[tokio::test]
async fn verify_full_refuses_another_ca_or_name_and_verify_ca_checks_the_chain_only() {
    let Some(server) = server().await else {
        return;
    };
    let refused = |url: String| async move {
        let err = Database::parse(&url)
            .expect("parses")
            .connect()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("invalid peer certificate"), "{url}: {err}");
        err
    };
    let other = TestCa::new(server.dir.path(), "other").expect("another CA");
    let err = refused(server.url(
        Purpose::Writer,
        HOST,
        &format!("sslmode=verify-full&sslrootcert={}", other.cert().display()),
    ))
    .await;
    assert!(err.contains("UnknownIssuer"), "{err}");
    let elsewhere = "elsewhere.umstore.svc";
    let err = refused(server.url(Purpose::Writer, elsewhere, &server.verify_full())).await;
    assert!(err.contains(elsewhere), "{err}");

    // verify-ca: the chain, not the name.
    let chain_only = format!(
        "sslmode=verify-ca&sslrootcert={}",
        server.ca.cert().display()
    );
    let client = Database::parse(&server.url(Purpose::Writer, elsewhere, &chain_only))
        .expect("parses")
        .connect()
        .await
        .expect("verify-ca ignores the name");
    assert!(ssl_of(&client).await);
    // require without a root certificate: encrypted, nothing checked (libpq's rule).
    let client = Database::parse(&server.url(Purpose::Writer, elsewhere, "sslmode=require"))
        .expect("parses")
        .connect()
        .await
        .expect("require");
    assert!(ssl_of(&client).await);
    // verify-full without a root certificate is refused before connecting.
    let err = Database::parse(&server.url(Purpose::Writer, HOST, "sslmode=verify-full"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("needs sslrootcert"), "{err}");
}

#[tokio::test]
async fn plaintext_from_a_non_local_address_is_refused() {
    let Some(server) = server().await else {
        return;
    };
    for ssl in ["sslmode=disable", "sslmode=prefer"] {
        let err = Database::parse(&server.url(Purpose::Writer, HOST, ssl))
            .expect("parses")
            .connect()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("no encryption"), "{ssl}: {err}");
    }
    // From 127.0.0.1, the pod's own address, plaintext SCRAM is allowed.
    let local = format!(
        "host=127.0.0.1 port={} user=umstore_writer_login password={} dbname=postgres \
         sslmode=disable",
        server.pg.port(),
        support::password(Purpose::Writer)
    );
    let client = Database::parse(&local)
        .expect("parses")
        .connect()
        .await
        .expect("in-pod plaintext");
    assert!(!ssl_of(&client).await);
}
