//! The production identities: a store as the operator leaves it and the
//! login users its bootstrap step creates.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use umstore_migrations::roles::Purpose;
use umstore_migrations::Runner;

use super::connect;

/// A store as the operator leaves it: a fresh database on the shared harness
/// primary, migrated by the superuser, and the production login users that the
/// operator's bootstrap step creates (each a member of its purpose's group,
/// with a password that the server checks). The superuser is used for nothing
/// else: what the data plane does, the tests do as these logins.
pub struct Store {
    /// The database's name.
    pub name: String,
    superuser: String,
    port: u16,
}

impl Store {
    /// A fresh, migrated database with the production logins.
    pub async fn migrated() -> Self {
        let store = Self::unmigrated().await;
        let mut admin = connect(&store.superuser).await;
        Runner::default().up(&mut admin).await.expect("migrate");
        store
    }

    /// [`Self::migrated`] on a server of the test's own.
    pub async fn migrated_on(postgres: &umstore_e2e::Postgres) -> Self {
        let store = Self::unmigrated_on(postgres).await;
        let mut admin = connect(&store.superuser).await;
        Runner::default().up(&mut admin).await.expect("migrate");
        store
    }

    /// A fresh database with the production logins and no schema.
    pub async fn unmigrated() -> Self {
        Self::unmigrated_on(umstore_e2e::shared().primary()).await
    }

    async fn unmigrated_on(postgres: &umstore_e2e::Postgres) -> Self {
        let (name, superuser) = postgres.fresh_database().await.expect("fresh database");
        let admin = connect(&superuser).await;
        make_production_logins(&admin).await;
        require_passwords(&admin).await;
        Self {
            name,
            superuser,
            port: postgres.port(),
        }
    }

    /// Connection string of `purpose`'s login user (TCP, with its password).
    pub fn url(&self, purpose: Purpose) -> String {
        self.url_at(purpose, self.port)
    }

    /// [`Self::url`] on another server of the same cluster (a replica, or
    /// PgBouncer in front of the primary) listening on 127.0.0.1:`port`.
    pub fn url_at(&self, purpose: Purpose, port: u16) -> String {
        let login = purpose.login().expect("a client purpose has a login");
        format!(
            "host=127.0.0.1 port={port} user={login} password={} dbname={}",
            password(purpose),
            self.name
        )
    }

    /// Connection string of an administrator's login user: a member of
    /// `umstore_admin` (made here, as an operator would make one; the
    /// bootstrap step makes only the client purposes' logins).
    pub async fn admin_url(&self) -> String {
        let admin = connect(&self.superuser).await;
        create_role(
            &admin,
            "CREATE ROLE %I LOGIN PASSWORD %L IN ROLE %I",
            ADMIN_LOGIN,
            &[
                ADMIN_LOGIN,
                &password(Purpose::Admin),
                Purpose::Admin.group(),
            ],
        )
        .await;
        format!(
            "host=127.0.0.1 port={} user={ADMIN_LOGIN} password={} dbname={}",
            self.port,
            password(Purpose::Admin),
            self.name
        )
    }

    /// The port of the server the store's database is on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connects as `purpose`'s login user.
    pub async fn connect(&self, purpose: Purpose) -> Client {
        connect(&self.url(purpose)).await
    }

    /// The superuser's connection string: for creating, migrating and the
    /// tests' own observers only.
    pub fn superuser(&self) -> &str {
        &self.superuser
    }
}

/// The administrator login [`Store::admin_url`] makes.
pub const ADMIN_LOGIN: &str = "umstore_admin_login";

/// The password of `purpose`'s login in this test process.
pub fn password(purpose: Purpose) -> String {
    static SECRET: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string());
    format!("{}-{}", purpose.slug(), *SECRET)
}

/// Creates the roles as the operator's bootstrap step does, before any
/// migration: each purpose's NOLOGIN group, then each client purpose's login
/// user, `CREATE ROLE <login> LOGIN PASSWORD <password> IN ROLE <group>`, quoted
/// by the server (`format('%I')`/`%L`, the values bound as parameters). Roles
/// belong to the cluster, so the first test of the process creates them and
/// the others find them; a test racing it sees the duplicate and moves on.
pub async fn make_production_logins(superuser: &Client) {
    for purpose in Purpose::ALL {
        create_role(
            superuser,
            "CREATE ROLE %I NOLOGIN",
            purpose.group(),
            &[purpose.group()],
        )
        .await;
    }
    for purpose in Purpose::CLIENTS {
        let login = purpose.login().expect("a client purpose has a login");
        create_role(
            superuser,
            "CREATE ROLE %I LOGIN PASSWORD %L IN ROLE %I",
            login,
            &[login, &password(purpose), purpose.group()],
        )
        .await;
    }
}

async fn create_role(superuser: &Client, template: &str, name: &str, args: &[&str]) {
    let exists = superuser
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .expect("look for the role")
        .is_some();
    if exists {
        return;
    }
    let placeholders: Vec<String> = (1..=args.len()).map(|i| format!("${i}::text")).collect();
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
        .iter()
        .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let sql: String = superuser
        .query_one(
            &format!("SELECT format('{template}', {})", placeholders.join(", ")),
            &params,
        )
        .await
        .expect("quote CREATE ROLE")
        .get(0);
    match superuser.batch_execute(&sql).await {
        Ok(()) => {}
        Err(e)
            if e.code() == Some(&SqlState::DUPLICATE_OBJECT)
                || e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
        Err(e) => panic!("creating role {name}: {e:?}"),
    }
}

/// The harness's servers trust every local login; a cluster's do not. Puts
/// SCRAM authentication in front of the production logins (first in
/// `pg_hba.conf`, reloaded), so a wrong password is refused as in production,
/// and waits until the server applies it.
async fn require_passwords(superuser: &Client) {
    // Per server (a test may run its own beside the shared one): keyed by the
    // server's pg_hba.conf.
    static DONE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    static VERIFIED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let row = superuser
        .query_one(
            "SELECT (SELECT setting FROM pg_settings WHERE name = 'hba_file'), \
                    (SELECT setting::int FROM pg_settings WHERE name = 'port')",
            &[],
        )
        .await
        .expect("hba_file and port");
    let hba: String = row.get(0);
    let port = u16::try_from(row.get::<_, i32>(1)).expect("a port");
    if VERIFIED.lock().expect("hba lock").contains(&hba) {
        return;
    }
    {
        let mut done = DONE.lock().expect("hba lock");
        if !done.contains(&hba) {
            let logins = Purpose::CLIENTS
                .map(|p| p.login().expect("a client purpose has a login"))
                .join(",");
            let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
            let new = format!(
                "# umstore tests: the production logins authenticate with SCRAM\n\
                 local all {logins} scram-sha-256\n\
                 host all {logins} 127.0.0.1/32 scram-sha-256\n{old}"
            );
            std::fs::write(&hba, new).expect("write pg_hba.conf");
            done.push(hba.clone());
        }
    }
    superuser
        .execute("SELECT pg_reload_conf()", &[])
        .await
        .expect("reload");
    let wrong = format!(
        "host=127.0.0.1 port={port} user={} password=wrong dbname=postgres",
        Purpose::Analytics.login().expect("login")
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio_postgres::connect(&wrong, NoTls).await.is_ok() {
        assert!(Instant::now() < deadline, "pg_hba.conf was not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    VERIFIED.lock().expect("hba lock").push(hba);
}
