//! The rendered `postgresql.conf`, `pg_hba.conf` and `pgbouncer.ini` are loaded into a
//! real PostgreSQL and PgBouncer, and clients connect through them. Only what a pod's
//! volume mounts and Service DNS would provide is substituted: file paths of the
//! mounts, the primary's host and port, and the listen port (`-c port=` on the
//! command line, as PostgreSQL allows). Skips with a message when the server
//! binaries are not installed, or fails under `UMSTORE_REQUIRE_COMPONENTS=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use umstore_crds::{TlsSpec, UserMetadataStore};
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_operator::builders::credentials::{Credentials, Role};
use umstore_operator::builders::{pgbouncer, pgconfig};
use umstore_operator::steps::bootstrap::{bootstrap as operator_bootstrap, ensure_database};
use umstore_operator::validated::{validate, Validated};

fn find(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        dirs.extend(entries.filter_map(|e| e.ok()).map(|e| e.path().join("bin")));
    }
    dirs.push("/usr/sbin".into());
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// A command run as the `postgres` user when we are root (PostgreSQL and PgBouncer
/// refuse to run as root). The user is switched in the child itself (no `runuser`
/// in between), so killing the child stops the server, and the server gets SIGKILL
/// if this test process dies first.
fn command(program: &Path) -> Command {
    let mut c = Command::new(program);
    umstore_e2e::localpg::ChildSetup::postgres()
        .death_signal(libc::SIGKILL)
        .apply(&mut c)
        .expect("run as postgres");
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A non-loopback IPv4 address of this machine, if it has one (no packet is sent:
/// connecting a UDP socket only picks the route's source address).
fn non_loopback_ipv4() -> Option<std::net::Ipv4Addr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("10.255.255.255:1").ok()?;
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

/// The local PgBouncer's version, `(major, minor)`.
fn pgbouncer_version(bin: &Path) -> (u32, u32) {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let text = out.unwrap_or_default();
    let version = text.split_whitespace().nth(1).unwrap_or("0.0");
    let mut parts = version.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SIGTERM-free stop: kill only the processes this test started, by pid.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn example(tier: i32) -> UserMetadataStore {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/tier{tier}.yaml"));
    let mut store: UserMetadataStore =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("example")).expect("yaml");
    store.metadata.uid = Some("uid".into());
    store
}

struct Server {
    dir: tempfile::TempDir,
    port: u16,
    /// A non-loopback address it also listens on, if the machine has one.
    remote: Option<std::net::Ipv4Addr>,
    _process: Killed,
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// initdb, then PostgreSQL started with the rendered configuration of `v`.
fn start_postgres(v: &Validated) -> Option<Server> {
    let (Some(initdb), Some(postgres)) = (find("initdb"), find("postgres")) else {
        skip_or_fail(
            Component::Postgres,
            "PostgreSQL server binaries (initdb, postgres) are not installed: \
             scripts/install-deps.sh",
        );
        return None;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let tls_dir = root.join("tls");
    std::fs::create_dir_all(&tls_dir).expect("mkdir");
    if v.spec.postgres.tls.is_some() {
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ])
            .arg("-keyout")
            .arg(tls_dir.join("tls.key"))
            .arg("-out")
            .arg(tls_dir.join("tls.crt"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match ok {
            Err(_) => {
                skip_or_fail(
                    Component::OpenSsl,
                    "no openssl binary to make a test certificate",
                );
                return None;
            }
            Ok(status) => assert!(
                status.success(),
                "openssl could not make a test certificate"
            ),
        }
    }
    // The rendered files, with the Secret's mount path pointing at our certificate.
    let conf =
        pgconfig::postgresql_conf(v).replace(pgconfig::TLS_DIR, &tls_dir.display().to_string());
    std::fs::write(root.join("postgresql.conf"), conf).expect("write conf");
    std::fs::write(root.join("pg_hba.conf"), pgconfig::pg_hba_conf(v)).expect("write hba");
    if is_root() {
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(root)
            .status();
        let _ = Command::new("chmod")
            .arg("600")
            .arg(tls_dir.join("tls.key"))
            .status();
    }
    let data = root.join("data");
    let out = command(&initdb)
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
        ])
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let remote = non_loopback_ipv4();
    let listen = match remote {
        Some(ip) => format!("listen_addresses=127.0.0.1,{ip}"),
        None => "listen_addresses=127.0.0.1".to_string(),
    };
    let log = root.join("postgres.log");
    let log_file = std::fs::File::create(&log).expect("log");
    let child = command(&postgres)
        .arg("-D")
        .arg(&data)
        .arg("-c")
        .arg(format!(
            "config_file={}",
            root.join("postgresql.conf").display()
        ))
        .arg("-c")
        .arg(format!("hba_file={}", root.join("pg_hba.conf").display()))
        .args(["-c", &format!("port={port}"), "-c", &listen])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", root.display()))
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start postgres");
    let process = Killed(child);
    wait_for_port(port, "PostgreSQL", &log);
    Some(Server {
        dir,
        port,
        remote,
        _process: process,
    })
}

async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// As the superuser over the unix socket (`local all all trust`): the bootstrap
/// step's database, roles and passwords.
async fn bootstrap(server: &Server, creds: &Credentials) {
    // The port opens before startup finishes ("the database system is starting up").
    let socket = format!(
        "host={} port={} user=postgres dbname=postgres",
        server.dir.path().display(),
        server.port
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let admin = loop {
        match connect(&socket).await {
            Ok(client) => break client,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for PostgreSQL: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("superuser over the unix socket: {e}"),
        }
    };
    ensure_database(&admin).await.expect("create db");
    let store_db = socket.replace("dbname=postgres", "dbname=umstore");
    let mut admin = connect(&store_db).await.expect("connect to umstore");
    // The operator's own bootstrap: login users with their Secrets' passwords
    // (pg_stat_statements comes with it).
    let report = operator_bootstrap(&mut admin, creds, 2)
        .await
        .expect("bootstrap");
    assert!(report
        .extensions
        .contains(&"pg_stat_statements".to_string()));
    let rows = admin
        .query("SELECT count(*) FROM pg_stat_statements", &[])
        .await
        .expect("pg_stat_statements works");
    assert_eq!(rows.len(), 1);
}

fn credentials() -> Credentials {
    let mut creds = Credentials::fixed_for_tests();
    creds
        .passwords
        .insert(Role::Writer, "0123456789abcdef0123456789abcdef".into());
    creds
}

#[tokio::test]
async fn rendered_postgres_and_pgbouncer_configs_accept_scram_clients() {
    let mut store = example(2);
    store.spec.postgres.tls = None;
    let v = validate(&store).expect("valid");
    let Some(server) = start_postgres(&v) else {
        return;
    };
    let creds = credentials();
    bootstrap(&server, &creds).await;
    let password = creds.password(Role::Writer);

    // Directly over TCP: SCRAM with the right password works, a wrong one does not.
    let direct = format!(
        "host=127.0.0.1 port={} user=umstore_writer_login dbname=umstore",
        server.port
    );
    let client = connect(&format!("{direct} password={password}"))
        .await
        .expect("scram login");
    let rows = client
        .query("SHOW password_encryption", &[])
        .await
        .expect("show");
    assert_eq!(rows[0].get::<_, String>(0), "scram-sha-256");
    assert!(connect(&format!("{direct} password=wrong")).await.is_err());

    // Through PgBouncer with the rendered pgbouncer.ini and userlist.txt.
    let Some(pgbouncer_bin) = find("pgbouncer") else {
        skip_or_fail(
            Component::PgBouncer,
            "pgbouncer is not installed (the PgBouncer half of the test): \
             scripts/install-deps.sh --test",
        );
        return;
    };
    let root = server.dir.path();
    let listen = free_port();
    let primary = v.owner.service_host(&v.owner.child("coordinator"));
    // Debian's PgBouncer may predate `max_prepared_statements` (1.21); the image the
    // operator deploys (1.24) has it. Only then is that one line left out here.
    let mut ini = pgbouncer::pgbouncer_ini(&v);
    if pgbouncer_version(&pgbouncer_bin) < (1, 21) {
        eprintln!("local PgBouncer is older than 1.21: loading pgbouncer.ini without max_prepared_statements");
        ini = ini
            .lines()
            .filter(|l| !l.starts_with("max_prepared_statements"))
            .map(|l| format!("{l}\n"))
            .collect();
    }
    let ini = ini
        .replace(
            &format!("host={primary} port=5432"),
            &format!("host=127.0.0.1 port={}", server.port),
        )
        .replace("listen_addr = 0.0.0.0", "listen_addr = 127.0.0.1")
        .replace("listen_port = 6432", &format!("listen_port = {listen}"))
        .replace(
            "/etc/pgbouncer-auth/userlist.txt",
            &root.join("userlist.txt").display().to_string(),
        );
    std::fs::write(root.join("pgbouncer.ini"), ini).expect("ini");
    std::fs::write(root.join("userlist.txt"), pgbouncer::userlist(&creds)).expect("userlist");
    if is_root() {
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(root.join("pgbouncer.ini"))
            .arg(root.join("userlist.txt"))
            .status();
    }
    let log = root.join("pgbouncer.log");
    let child = command(&pgbouncer_bin)
        .arg(root.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start pgbouncer");
    let _pgbouncer = Killed(child);
    wait_for_port(listen, "PgBouncer", &log);
    let pooled = format!("host=127.0.0.1 port={listen} user=umstore_writer_login dbname=umstore");
    let client = connect(&format!("{pooled} password={password}"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "through PgBouncer: {e}; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    let rows = client
        .query("SELECT current_user::text", &[])
        .await
        .expect("query through the pooler");
    assert_eq!(rows[0].get::<_, String>(0), Role::Writer.user());
    assert!(
        connect(&format!("{pooled} password=wrong")).await.is_err(),
        "PgBouncer checks the password"
    );
}

#[tokio::test]
async fn with_a_tls_secret_remote_clients_must_use_tls() {
    let mut store = example(1);
    store.spec.postgres.tls = Some(TlsSpec {
        secret_name: "pilot-tls".into(),
    });
    let v = validate(&store).expect("valid");
    let Some(server) = start_postgres(&v) else {
        return;
    };
    let creds = credentials();
    bootstrap(&server, &creds).await;
    let admin = connect(&format!(
        "host={} port={} user=postgres dbname=postgres",
        server.dir.path().display(),
        server.port
    ))
    .await
    .expect("admin");
    let ssl: String = admin
        .query_one("SHOW ssl", &[])
        .await
        .expect("show ssl")
        .get(0);
    assert_eq!(
        ssl, "on",
        "the certificate from the mounted Secret is loaded"
    );
    // PostgreSQL parsed every rule, and remote ones are TLS-only.
    let rules = admin
        .query(
            "SELECT type, coalesce(address, ''), auth_method, error FROM pg_hba_file_rules",
            &[],
        )
        .await
        .expect("pg_hba_file_rules");
    for row in &rules {
        assert!(
            row.get::<_, Option<String>>(3).is_none(),
            "pg_hba.conf line rejected: {:?}",
            row.get::<_, Option<String>>(3)
        );
    }
    let remote_rules: Vec<(String, String)> = rules
        .iter()
        .filter(|r| matches!(r.get::<_, String>(1).as_str(), "0.0.0.0" | "::"))
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(2)))
        .collect();
    assert!(
        remote_rules
            .iter()
            .all(|(t, m)| t == "hostssl" || (t == "hostnossl" && m == "reject")),
        "{remote_rules:?}"
    );
    // In the pod, 127.0.0.1 is the exporter sidecar: plaintext with SCRAM is allowed there.
    let password = creds.password(Role::Writer);
    connect(&format!("host=127.0.0.1 port={} user=umstore_writer_login dbname=umstore password={password} sslmode=disable", server.port))
        .await
        .expect("in-pod plaintext");
    // From any other address, plaintext is refused.
    let Some(ip) = server.remote else {
        eprintln!("no non-loopback address here: the remote plaintext refusal is checked through pg_hba_file_rules only");
        return;
    };
    let plain = format!(
        "host={ip} port={} user=umstore_writer_login dbname=umstore password={password} sslmode=disable",
        server.port
    );
    let err = connect(&plain)
        .await
        .expect_err("plaintext TCP from a remote address is refused");
    let db = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_else(|| err.to_string());
    assert!(
        db.contains("no encryption") || db.contains("rejects connection"),
        "{db}"
    );
}
