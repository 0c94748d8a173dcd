//! Backups as a store runs them, with real pgBackRest and PostgreSQL 15 on
//! loopback: the operator's rendered `pgbackrest.conf` of the database pods (a
//! `pgbackrest server` with the TLS material the operator generates, and the
//! `archive_command` PostgreSQL runs), the backup Job's configuration and script,
//! and the restore script Patroni runs for `spec.bootstrap.recovery`. A seeded
//! store is archived and backed up, written to, restored to a time between the
//! writes into a fresh data directory, and read back with the store's keys.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use umstore_crds::{BackupRepository, BackupRetention, StorageSpec};
use umstore_data_plane::crypto::{
    DataKeyCache, FieldAad, KeyProvider, Keyring, LocalKeyProvider, UserKey,
};
use umstore_data_plane::seed::{self, Generator};
use umstore_e2e::localpg::{chown_to_postgres_if_root, ChildSetup, LocalCluster, PgBinaries};
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_e2e::{PgBackRest, PgBackRestServer, Postgres, TestDir};
use umstore_operator::builders::backup::{self, env, Layout};

const PASSPHRASE: &str = "correct-horse-battery-staple-0123456789abcdef";

/// A primary archiving into a volume repository through the rendered
/// configuration, and its `pgbackrest server`.
struct Rig {
    pg: Postgres,
    tool: PgBackRest,
    dir: TestDir,
    layout: Layout,
    repo: PathBuf,
    /// The environment of a backup Job.
    job_env: Vec<(String, String)>,
    _server: PgBackRestServer,
    db: String,
}

fn pairs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    chown_to_postgres_if_root(path).expect("chown");
}

fn volume_repository() -> BackupRepository {
    BackupRepository {
        s3: None,
        volume: Some(StorageSpec::default()),
    }
}

impl Rig {
    async fn start() -> Option<Rig> {
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
        let pg = Postgres::start_with_settings(vec![
            ("archive_mode".into(), "on".into()),
            ("archive_command".into(), archive_command),
            ("full_page_writes".into(), "on".into()),
        ])
        .expect("postgres");
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

    async fn admin(&self) -> tokio_postgres::Client {
        self.pg.connect(&self.db).await.expect("connect")
    }

    /// The backup Job's script (its report to a file instead of the termination
    /// log), as the Job's pod runs it; returns the report.
    fn run_backup_job(&self, kind: &str) -> serde_json::Value {
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

    fn job_command(&self, script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(pairs(&self.job_env));
        ChildSetup::postgres().apply(&mut cmd).expect("as postgres");
        cmd
    }

    /// Switches WAL and waits until the segment is archived.
    async fn archive_now(&self) {
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
    fn restore(
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
async fn start_restored(pgdata: &Path) -> LocalCluster {
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

async fn keyring(client: &tokio_postgres::Client, dir: &Path) -> Keyring {
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

async fn users(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM umstore.user_directory", &[])
        .await
        .expect("count")
        .get(0)
}

async fn has_user(client: &tokio_postgres::Client, user: uuid::Uuid) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM umstore.user_directory WHERE user_id = $1)",
            &[&user],
        )
        .await
        .expect("exists")
        .get(0)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_to_a_point_in_time_with_pii_readable_and_nothing_plain_in_the_repository(
) {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let mut admin = rig.admin().await;
    umstore_migrations::Runner::default()
        .up(&mut admin)
        .await
        .expect("migrate");
    let keys_dir = rig.dir.path().join("keys");
    let keys = keyring(&admin, &keys_dir).await;
    seed::seed(&mut admin, 2_000, 1, &keys).await.expect("seed");

    let report = rig.run_backup_job("full");
    assert_eq!(report["backups"], 1, "{report}");
    assert_eq!(report["last"]["type"], "full", "{report}");
    assert!(
        report["last"]["size"].as_i64().unwrap_or(0) > 1_000_000,
        "{report}"
    );

    // Written after the backup and before the target: replayed from the archive.
    seed::seed(&mut admin, 500, 2, &keys)
        .await
        .expect("seed before the target");
    rig.archive_now().await;
    let target: String = admin
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .expect("now")
        .get(0);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Written after the target: not restored.
    seed::seed(&mut admin, 300, 3, &keys)
        .await
        .expect("seed after the target");
    rig.archive_now().await;
    assert_eq!(users(&admin).await, 2_800);

    let today = chrono::Utc::now().date_naive();
    let first = |s: u64| Generator::new(s, today).next_profile();

    // Nothing readable in the repository: no PII, no SQL, no names.
    let profile = first(1);
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("a full name", profile.full_name.clone().into_bytes()),
        (
            "a pincode",
            format!("\0{}", profile.pincode).into_bytes()[1..].to_vec(),
        ),
        ("the schema", b"user_metadata".to_vec()),
        ("SQL", b"CREATE TABLE".to_vec()),
        ("the database name", rig.db.clone().into_bytes()),
        ("a district", profile.district.clone().into_bytes()),
    ];
    let files = files_under(&rig.repo);
    assert!(files.len() > 10, "the repository holds the backup and WAL");
    for file in &files {
        let bytes = std::fs::read(file).expect("read");
        for (what, needle) in &needles {
            assert!(
                !contains(&bytes, needle),
                "{what} readable in {}",
                file.display()
            );
        }
    }

    // Without the passphrase, nothing restores.
    let wrong = rig.dir.path().join("wrong");
    let out = rig.restore(&wrong, Some(&target), "not-the-passphrase");
    assert!(
        !out.status.success(),
        "a restore with a wrong passphrase failed"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unable to load info file"),
        "pgBackRest cannot read the repository: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !wrong.join("PG_VERSION").exists(),
        "no data directory came out of it"
    );

    // To the target time: the rows before it, none after.
    let restored_dir = rig.dir.path().join("restored");
    let out = rig.restore(&restored_dir, Some(&target), PASSPHRASE);
    assert!(
        out.status.success(),
        "restore failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = start_restored(&restored_dir).await;
    let client = umstore_e2e::connect(&restored.conninfo(&rig.db))
        .await
        .expect("connect to the restored database");
    assert_eq!(
        users(&client).await,
        2_500,
        "the users written before the target"
    );
    assert!(
        has_user(&client, first(2).user_id).await,
        "written before the target"
    );
    assert!(
        !has_user(&client, first(3).user_id).await,
        "written after the target"
    );

    // PII opens with the store's keys.
    let keys = keyring(&client, &keys_dir).await;
    for s in [1, 2] {
        let p = first(s);
        let row = client
            .query_one(
                "SELECT full_name_enc FROM umstore.user_metadata WHERE user_id = $1",
                &[&p.user_id],
            )
            .await
            .expect("restored row");
        let UserKey::Active(key) = keys
            .user_key(&client, p.user_id, p.region)
            .await
            .expect("key")
        else {
            panic!("the restored user's key is active");
        };
        let name = key
            .open(
                &FieldAad {
                    user_id: p.user_id,
                    region: p.region,
                    column: "full_name_enc",
                },
                row.get::<_, &[u8]>(0),
            )
            .expect("the name opens");
        assert_eq!(name, p.full_name.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_midway_leaves_the_previous_backup_restorable() {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let mut admin = rig.admin().await;
    umstore_migrations::Runner::default()
        .up(&mut admin)
        .await
        .expect("migrate");
    let keys = keyring(&admin, &rig.dir.path().join("keys")).await;
    seed::seed(&mut admin, 1_000, 4, &keys).await.expect("seed");
    let first = rig.run_backup_job("full");
    let first_label = first["last"]["label"].as_str().expect("label").to_string();

    // Enough data that the next backup takes a while.
    admin
        .batch_execute(
            "CREATE TABLE public.ballast AS
             SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS pad
             FROM generate_series(1, 1500000) g",
        )
        .await
        .expect("ballast");
    rig.archive_now().await;

    let backups = rig.repo.join("backup").join("coordinator");
    let before: Vec<_> = std::fs::read_dir(&backups)
        .expect("backups")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let script = backup::job_script("full", &["coordinator".into()], "/dev/null");
    let mut job = rig
        .job_command(&script)
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the second backup");
    // Kill it once its backup directory has appeared (copying has begun).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now: Vec<_> = std::fs::read_dir(&backups)
            .expect("backups")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| !before.contains(n) && n.to_string_lossy().ends_with('F'))
            .collect();
        if !now.is_empty() {
            let dir = backups.join(&now[0]);
            if files_under(&dir).len() > 5 {
                break;
            }
        }
        assert!(
            job.try_wait().expect("wait").is_none(),
            "the second backup ended before it could be killed"
        );
        assert!(
            Instant::now() < deadline,
            "the second backup never started copying"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The whole Job: the shell and its pgbackrest processes (the pod's end).
    let group = i32::try_from(job.id()).expect("pid");
    // SAFETY: kill(2) with a negative pid signals that process group, the Job's.
    let killed = unsafe { libc::kill(-group, libc::SIGKILL) };
    assert_eq!(killed, 0, "kill the backup's process group");
    let status = job.wait().expect("wait");
    assert!(!status.success(), "the backup was killed");

    // The repository still lists the first backup, and it restores.
    let info = rig
        .tool
        .run(
            &pairs(&rig.job_env),
            &["--stanza=coordinator", "--output=json", "info"],
        )
        .expect("info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info JSON");
    let labels: Vec<&str> = info[0]["backup"]
        .as_array()
        .expect("backups")
        .iter()
        .filter_map(|b| b["label"].as_str())
        .collect();
    assert_eq!(
        labels,
        vec![first_label.as_str()],
        "only the complete backup is listed"
    );
    seed::seed(&mut admin, 200, 5, &keys)
        .await
        .expect("more writes");
    rig.archive_now().await;
    let dir = rig.dir.path().join("restored");
    let out = rig.restore(&dir, None, PASSPHRASE);
    assert!(
        out.status.success(),
        "restore failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = start_restored(&dir).await;
    let client = umstore_e2e::connect(&restored.conninfo(&rig.db))
        .await
        .expect("connect");
    assert_eq!(
        users(&client).await,
        1_200,
        "everything archived is restored"
    );

    // And the next backup succeeds (no lock or half backup left in the way).
    let next = rig.run_backup_job("full");
    assert_eq!(next["backups"], 2, "{next}");
}
