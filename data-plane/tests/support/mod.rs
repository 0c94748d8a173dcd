//! Helpers shared by the data plane's integration tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use umstore_migrations::roles::Purpose;
use umstore_migrations::Runner;

pub const BIN: &str = env!("CARGO_BIN_EXE_umstore-data-plane");

pub async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// A fresh database on the shared harness primary: its conninfo.
pub async fn fresh_db() -> String {
    umstore_e2e::shared()
        .await
        .primary()
        .fresh_database()
        .await
        .expect("fresh database")
        .1
}

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

    /// A fresh database with the production logins and no schema.
    pub async fn unmigrated() -> Self {
        let servers = umstore_e2e::shared();
        let (name, superuser) = servers
            .primary()
            .fresh_database()
            .await
            .expect("fresh database");
        let admin = connect(&superuser).await;
        make_production_logins(&admin).await;
        require_passwords(&admin).await;
        Self {
            name,
            superuser,
            port: servers.primary().port(),
        }
    }

    /// Connection string of `purpose`'s login user (TCP, with its password).
    pub fn url(&self, purpose: Purpose) -> String {
        let login = purpose.login().expect("a client purpose has a login");
        format!(
            "host=127.0.0.1 port={} user={login} password={} dbname={}",
            self.port,
            password(purpose),
            self.name
        )
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
    static DONE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    static VERIFIED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if VERIFIED.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    let hba: String = superuser
        .query_one(
            "SELECT setting FROM pg_settings WHERE name = 'hba_file'",
            &[],
        )
        .await
        .expect("hba_file")
        .get(0);
    {
        let mut done = DONE.lock().expect("hba lock");
        if !*done {
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
            *done = true;
        }
    }
    superuser
        .execute("SELECT pg_reload_conf()", &[])
        .await
        .expect("reload");
    let port: u16 = umstore_e2e::shared().primary().port();
    let wrong = format!(
        "host=127.0.0.1 port={port} user={} password=wrong dbname=postgres",
        Purpose::Analytics.login().expect("login")
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio_postgres::connect(&wrong, NoTls).await.is_ok() {
        assert!(Instant::now() < deadline, "pg_hba.conf was not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    VERIFIED.store(true, std::sync::atomic::Ordering::Release);
}

/// Runs the CLI to completion.
pub fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run umstore-data-plane")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    // The harness's: it never hands out the same port twice in a process.
    umstore_e2e::free_port().expect("free port")
}

/// `GET path` on 127.0.0.1:port: (status, body), or None when nothing listens.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body))
}

/// Polls `GET path` until `done` accepts the answer or `timeout` passes.
pub fn wait_for(
    port: u16,
    path: &str,
    timeout: Duration,
    done: impl Fn(u16, &str) -> bool,
) -> Option<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some((status, body)) = http_get(port, path) {
            if done(status, &body) {
                return Some((status, body));
            }
            last = Some((status, body));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}

/// A `serve` process, killed (SIGTERM, then SIGKILL) on drop.
pub struct Served(pub Child);

impl Served {
    pub fn start(args: &[&str]) -> Self {
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        Served(child)
    }

    /// Stops with SIGTERM and returns the exit status and stderr.
    pub fn stop(mut self) -> (Option<i32>, String) {
        terminate(&mut self.0);
        let status = self.0.wait().ok().and_then(|s| s.code());
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status, err)
    }
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) with a pid we own.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            terminate(&mut self.0);
            let _ = self.0.wait();
        }
    }
}
