//! The backup rig: a harness PostgreSQL archiving WAL through the operator's
//! rendered `archive_command` into a volume repository, the `pgbackrest server`
//! of a database pod with the TLS material the operator generates, the backup
//! Job's configuration and script, and the rendered restore. Shared by
//! `tests/backup.rs` and `benches/backup.rs`.
//!
//! Included by path (`#[path = "support/backup_rig.rs"] mod backup_rig;`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use umstore_crds::{BackupRepository, BackupRetention, StorageSpec};
use umstore_data_plane::crypto::{DataKeyCache, KeyProvider, Keyring, LocalKeyProvider};
use umstore_e2e::localpg::{chown_to_postgres_if_root, ChildSetup, LocalCluster, PgBinaries};
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_e2e::{PgBackRest, PgBackRestServer, Postgres, TestDir};
use umstore_operator::builders::backup::{self, env, Layout};

/// The repository passphrase of the rig's store.
pub const PASSPHRASE: &str = "correct-horse-battery-staple-0123456789abcdef";

/// A primary archiving into a volume repository through the rendered
/// configuration, and its `pgbackrest server`.
pub struct Rig {
    pub pg: Postgres,
    pub tool: PgBackRest,
    pub dir: TestDir,
    pub layout: Layout,
    pub repo: PathBuf,
    /// The environment of a backup Job.
    pub job_env: Vec<(String, String)>,
    _server: PgBackRestServer,
    pub db: String,
}

/// `(key, value)` pairs borrowed, as the harness takes an environment.
pub fn pairs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Writes a rendered file (owned by `postgres` when we are root).
pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    chown_to_postgres_if_root(path).expect("chown");
}

/// The rig's repository: a volume (a local directory here).
pub fn volume_repository() -> BackupRepository {
    BackupRepository {
        s3: None,
        volume: Some(StorageSpec::default()),
    }
}

impl Rig {
    /// Starts the rig with the harness's PostgreSQL settings (fsync off); `None`
    /// (after `skip_or_fail`) when pgBackRest is missing.
    pub async fn start() -> Option<Rig> {
        Self::start_with(Vec::new()).await
    }

    /// Like [`Rig::start`], with `settings` written after the archiving ones (a
    /// benchmark's `fsync = on`, say).
    pub async fn start_with(settings: Vec<(String, String)>) -> Option<Rig> {
        let tool = match PgBackRest::find() {
            Ok(t) => t,
            Err(e) => {
                skip_or_fail(Component::PgBackRest, e);
                return None;
            }
        };
        let dir = TestDir::new("backup").expect("test dir");
        let conf = dir.path().join("conf");
        let tls = dir.path().join("tls");
        let repo = dir.path().join("repo");
        let work = dir.path().join("work");
        for d in [&conf, &tls, &repo, &work] {
            std::fs::create_dir_all(d).expect("mkdir");
            chown_to_postgres_if_root(d).expect("chown");
        }
        let material = backup::generate_tls("test").expect("TLS material");
        for (name, text) in material.files() {
            let path = tls.join(name);
            write(&path, text);
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod");
        }
        let port = umstore_e2e::free_port().expect("port");
        let server_conf = conf.join(backup::SERVER_CONF);
        let job_conf = conf.join(backup::JOB_CONF);
        let server_env = vec![
            (env::CONFIG.to_string(), server_conf.display().to_string()),
            (env::STANZA.to_string(), "coordinator".to_string()),
            (env::CIPHER_PASS.to_string(), PASSPHRASE.to_string()),
        ];
        // PostgreSQL runs archive_command with the environment the pod gives it.
        let archive_command = format!(
            "{} {}",
            server_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            backup::ARCHIVE_COMMAND
        );
        let mut pg_settings = vec![
            ("archive_mode".into(), "on".into()),
            ("archive_command".into(), archive_command),
            ("full_page_writes".into(), "on".into()),
        ];
        pg_settings.extend(settings);
        let pg = Postgres::start_with_settings(pg_settings).expect("postgres");
        let primary = pg.primary();
        let layout = Layout {
            pgdata: primary.data_dir().display().to_string(),
            socket_dir: primary.socket_dir().display().to_string(),
            pg_port: i32::from(primary.port()),
            pg_user: primary.superuser().to_string(),
            tls_dir: tls.display().to_string(),
            server_address: "localhost".into(),
            server_port: i32::from(port),
            work_dir: work.display().to_string(),
            config_dir: conf.display().to_string(),
        };
        let repository = volume_repository();
        let path = repo.display().to_string();
        write(
            &server_conf,
            &backup::server_conf(&repository, &path, &["coordinator".into()], &layout),
        );
        write(
            &job_conf,
            &backup::job_conf(
                &repository,
                &path,
                &BackupRetention::default(),
                &[("coordinator".into(), "localhost".into())],
                &layout,
            ),
        );
        let server = tool
            .serve(&pairs(&server_env), port, &dir.path().join("server.log"))
            .expect("pgbackrest server");
        let job_env = vec![
            (env::CONFIG.to_string(), job_conf.display().to_string()),
            (env::CIPHER_PASS.to_string(), PASSPHRASE.to_string()),
        ];
        let (db, _) = pg.fresh_database().await.expect("database");
        Some(Rig {
            pg,
            tool,
            dir,
            layout,
            repo,
            job_env,
            _server: server,
            db,
        })
    }

    /// A superuser connection to the rig's database.
    pub async fn admin(&self) -> tokio_postgres::Client {
        self.pg.connect(&self.db).await.expect("connect")
    }

    /// The backup Job's script (its report to a file instead of the termination
    /// log), as the Job's pod runs it; returns the report.
    pub fn run_backup_job(&self, kind: &str) -> serde_json::Value {
        let report = self.dir.path().join(format!("report-{kind}.json"));
        let script =
            backup::job_script(kind, &["coordinator".into()], &report.display().to_string());
        let out = self
            .job_command(&script)
            .output()
            .expect("run the backup job");
        assert!(
            out.status.success(),
            "backup job failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&report).expect("report");
        serde_json::from_str(text.trim()).expect("the report is JSON")
    }

    /// `script` as a backup Job's pod runs it: `/bin/sh -c`, the Job's
    /// environment only, as `postgres` when we are root.
    pub fn job_command(&self, script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(pairs(&self.job_env));
        ChildSetup::postgres().apply(&mut cmd).expect("as postgres");
        cmd
    }

    /// Switches WAL and waits until the segment is archived.
    pub async fn archive_now(&self) {
        let c = self.admin().await;
        let wal: String = c
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .expect("switch")
            .get(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let row = c
                .query_one(
                    "SELECT coalesce(last_archived_wal, ''), coalesce(last_failed_wal, ''), failed_count
                     FROM pg_stat_archiver",
                    &[],
                )
                .await
                .expect("archiver");
            let archived: String = row.get(0);
            if archived.as_str() >= wal.as_str() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "WAL {wal} not archived in 60 s (last archived {archived:?}, last failed {:?}, {} failures); \
                 see the PostgreSQL log",
                row.get::<_, String>(1),
                row.get::<_, i64>(2)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Restores with the rendered restore script into `pgdata`, with `passphrase`
    /// as the source's; returns the script's output.
    pub fn restore(
        &self,
        pgdata: &Path,
        target: Option<&str>,
        passphrase: &str,
    ) -> std::process::Output {
        let layout = Layout {
            pgdata: pgdata.display().to_string(),
            config_dir: self.dir.path().join("restore").display().to_string(),
            ..self.layout.clone()
        };
        let conf_dir = PathBuf::from(&layout.config_dir);
        std::fs::create_dir_all(&conf_dir).expect("mkdir");
        chown_to_postgres_if_root(&conf_dir).expect("chown");
        write(
            &conf_dir.join(backup::RESTORE_CONF),
            &backup::restore_conf(
                &volume_repository(),
                &self.repo.display().to_string(),
                &layout,
            ),
        );
        write(
            &conf_dir.join(backup::RESTORE_SCRIPT),
            &backup::restore_script(&layout, target),
        );
        write(
            &conf_dir.join(backup::ARCHIVE_GET_SCRIPT),
            &backup::archive_get_script(&layout),
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.arg(conf_dir.join(backup::RESTORE_SCRIPT))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(env::RESTORE_CIPHER_PASS, passphrase);
        ChildSetup::postgres().apply(&mut cmd).expect("as postgres");
        cmd.output().expect("run restore.sh")
    }
}

/// Starts the restored data directory as a server of its own (with the restore
/// script's passphrase in its environment, as the pod has it) and waits until
/// recovery has ended.
pub async fn start_restored(pgdata: &Path) -> LocalCluster {
    let bins = PgBinaries::discover().expect("postgres binaries");
    let mut opts = umstore_e2e::localpg::ClusterOptions {
        port: umstore_e2e::free_port().expect("port"),
        listen_tcp: true,
        socket_dir: Some(pgdata.parent().expect("parent").join("restored-socket")),
        durable: false,
        start_timeout: Duration::from_secs(120),
        ..umstore_e2e::localpg::ClusterOptions::default()
    };
    // The restored server archives nowhere; it only fetches the source's WAL.
    opts.settings.push(("archive_mode".into(), "off".into()));
    opts.settings.push(("full_page_writes".into(), "on".into()));
    opts.env = vec![(env::RESTORE_CIPHER_PASS.to_string(), PASSPHRASE.to_string())];
    let mut cluster = LocalCluster::init_or_reuse(&bins, pgdata, opts).expect("restored cluster");
    cluster.start().expect("the restored server starts");
    let client = umstore_e2e::connect(&cluster.conninfo("postgres"))
        .await
        .expect("connect to the restored server");
    let deadline = Instant::now() + Duration::from_secs(120);
    while client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("recovery?")
        .get::<_, bool>(0)
    {
        assert!(Instant::now() < deadline, "still in recovery after 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster
}

/// The store's keyring with local keys kept in `dir`.
pub async fn keyring(client: &tokio_postgres::Client, dir: &Path) -> Keyring {
    let provider = KeyProvider::Local(Box::new(
        LocalKeyProvider::open_or_create(dir).expect("keys"),
    ));
    Keyring::open(
        provider,
        DataKeyCache::new(1_000, Duration::from_secs(60)),
        client,
    )
    .await
    .expect("keyring")
}

/// Rows in the user directory.
pub async fn users(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM umstore.user_directory", &[])
        .await
        .expect("count")
        .get(0)
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}
