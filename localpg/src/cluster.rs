//! Creating a cluster's data directory and its settings.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{quote_conninfo_value, render_settings};
use crate::{chown_to_postgres_if_root, run_as_postgres_if_root, LocalPgError, PgBinaries};

/// The file (inside the data directory) our settings are written to on every start;
/// `postgresql.conf` includes it.
const SETTINGS_FILE: &str = "umstore.conf";

/// Spawns a prepared server command. The default is `Command::spawn` on the calling
/// thread; the test harness passes one that spawns from a long-lived thread so that a
/// parent-death signal is tied to the process, not to a short-lived test thread.
pub type Spawner = Arc<dyn Fn(Command) -> std::io::Result<Child> + Send + Sync>;

/// How a [`LocalCluster`] is configured.
#[derive(Clone)]
pub struct ClusterOptions {
    /// Port number: the TCP port when `listen_tcp` is set, and the unix socket's name
    /// (`.s.PGSQL.<port>`) always.
    pub port: u16,
    /// Listen on 127.0.0.1 (`listen_addresses`); otherwise only the unix socket.
    pub listen_tcp: bool,
    /// Directory of the unix socket; the data directory when `None`. Keep the path short
    /// (unix socket paths are limited to 107 bytes).
    pub socket_dir: Option<PathBuf>,
    /// The bootstrap superuser created by initdb (trust authentication).
    pub superuser: String,
    /// Load Citus (`shared_preload_libraries` gets `citus` first).
    pub citus: bool,
    /// Libraries preloaded after `citus` and `pg_stat_statements`.
    pub shared_preload_libraries: Vec<String>,
    /// When false, `fsync`, `synchronous_commit` and `full_page_writes` are off and
    /// initdb skips syncing: fast, for tests and throwaway clusters only.
    pub durable: bool,
    /// `max_wal_senders`, for streaming replicas and base backups.
    pub max_wal_senders: u32,
    /// Extra `postgresql.conf` settings, written after (so overriding) ours.
    pub settings: Vec<(String, String)>,
    /// Server log file; `<data_dir>.log` when `None`.
    pub log_path: Option<PathBuf>,
    /// How long `start` waits for the server to accept connections.
    pub start_timeout: Duration,
    /// How long `stop` waits after a fast shutdown request before an immediate one.
    pub stop_timeout: Duration,
    /// Signal the server gets when the thread that spawned it exits (see
    /// [`crate::ChildSetup::death_signal`]); `SIGQUIT` is PostgreSQL's immediate shutdown.
    pub death_signal: Option<libc::c_int>,
    /// Spawns the server process; `Command::spawn` when `None`.
    pub spawner: Option<Spawner>,
    /// Environment variables the server (and so its `archive_command` and
    /// `restore_command`) gets besides ours.
    pub env: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            port: 5432,
            listen_tcp: false,
            socket_dir: None,
            superuser: "umstore".to_owned(),
            citus: false,
            shared_preload_libraries: Vec::new(),
            durable: true,
            max_wal_senders: 10,
            settings: Vec::new(),
            log_path: None,
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(30),
            death_signal: None,
            spawner: None,
            env: Vec::new(),
        }
    }
}

impl std::fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("port", &self.port)
            .field("listen_tcp", &self.listen_tcp)
            .field("socket_dir", &self.socket_dir)
            .field("superuser", &self.superuser)
            .field("citus", &self.citus)
            .field("shared_preload_libraries", &self.shared_preload_libraries)
            .field("durable", &self.durable)
            .field("max_wal_senders", &self.max_wal_senders)
            .field("settings", &self.settings)
            .field("log_path", &self.log_path)
            .field("start_timeout", &self.start_timeout)
            .field("stop_timeout", &self.stop_timeout)
            .field("death_signal", &self.death_signal)
            .field("spawner", &self.spawner.as_ref().map(|_| "custom"))
            .finish()
    }
}

/// A PostgreSQL cluster in a local data directory, run as a child of this process.
/// Dropping it stops the server.
pub struct LocalCluster {
    pub(super) bins: PgBinaries,
    pub(super) data_dir: PathBuf,
    pub(super) socket_dir: PathBuf,
    pub(super) log_path: PathBuf,
    pub(super) opts: ClusterOptions,
    pub(super) child: Option<Child>,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("data_dir", &self.data_dir)
            .field("port", &self.opts.port)
            .field("pid", &self.pid())
            .finish()
    }
}

impl LocalCluster {
    /// Opens the cluster in `data_dir`, running `initdb` first when the directory has no
    /// `PG_VERSION`, and (re)writes our settings. Does not start the server.
    pub fn init_or_reuse(
        bins: &PgBinaries,
        data_dir: &Path,
        opts: ClusterOptions,
    ) -> Result<Self, LocalPgError> {
        let cluster = Self::prepare(bins, data_dir, opts)?;
        if !cluster.data_dir.join("PG_VERSION").is_file() {
            cluster.initdb()?;
        }
        cluster.write_settings()?;
        Ok(cluster)
    }

    /// Opens a streaming hot-standby replica in `data_dir`, cloning it from the server
    /// at `primary_conninfo` with `pg_basebackup -R -X stream -c fast` when the directory
    /// has no `PG_VERSION`. Does not start the server.
    pub fn init_replica(
        bins: &PgBinaries,
        primary_conninfo: &str,
        data_dir: &Path,
        opts: ClusterOptions,
    ) -> Result<Self, LocalPgError> {
        let cluster = Self::prepare(bins, data_dir, opts)?;
        if !cluster.data_dir.join("PG_VERSION").is_file() {
            let mut cmd = Command::new(bins.program("pg_basebackup"));
            cmd.arg("-D")
                .arg(&cluster.data_dir)
                .args(["-R", "-X", "stream", "-c", "fast", "-d"])
                .arg(primary_conninfo);
            if !cluster.opts.durable {
                cmd.arg("--no-sync");
            }
            run_to_completion(cmd)?;
        }
        cluster.write_settings()?;
        Ok(cluster)
    }

    fn prepare(
        bins: &PgBinaries,
        data_dir: &Path,
        opts: ClusterOptions,
    ) -> Result<Self, LocalPgError> {
        let data_dir = std::path::absolute(data_dir)
            .map_err(|e| LocalPgError::io("could not resolve data directory", data_dir, e))?;
        let socket_dir = opts.socket_dir.clone().unwrap_or_else(|| data_dir.clone());
        let log_path = opts.log_path.clone().unwrap_or_else(|| {
            let mut name = data_dir.file_name().unwrap_or_default().to_os_string();
            name.push(".log");
            data_dir.with_file_name(name)
        });
        for dir in [&data_dir, &socket_dir] {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| LocalPgError::io("could not create directory", dir, e))?;
                chown_to_postgres_if_root(dir)?;
            }
        }
        Ok(Self {
            bins: bins.clone(),
            data_dir,
            socket_dir,
            log_path,
            opts,
            child: None,
        })
    }

    fn initdb(&self) -> Result<(), LocalPgError> {
        let mut cmd = Command::new(self.bins.program("initdb"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("--auth=trust")
            .arg(format!("--username={}", self.opts.superuser))
            .args(["--encoding=UTF8", "--locale=C", "--no-instructions"]);
        if !self.opts.durable {
            cmd.arg("--no-sync");
        }
        run_to_completion(cmd)?;
        Ok(())
    }

    /// The settings this cluster runs with, in the order they are written.
    pub fn settings(&self) -> Vec<(String, String)> {
        let o = &self.opts;
        let mut preload = Vec::new();
        if o.citus {
            preload.push("citus".to_owned());
        }
        preload.push("pg_stat_statements".to_owned());
        preload.extend(o.shared_preload_libraries.iter().cloned());
        let listen = if o.listen_tcp { "127.0.0.1" } else { "" };
        let mut s: Vec<(String, String)> = [
            ("port", o.port.to_string()),
            ("listen_addresses", listen.to_owned()),
            (
                "unix_socket_directories",
                self.socket_dir.display().to_string(),
            ),
            ("unix_socket_permissions", "0700".to_owned()),
            ("shared_preload_libraries", preload.join(",")),
            ("wal_level", "replica".to_owned()),
            ("max_wal_senders", o.max_wal_senders.to_string()),
            ("wal_keep_size", "64MB".to_owned()),
            ("hot_standby", "on".to_owned()),
            ("logging_collector", "off".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if !o.durable {
            for name in ["fsync", "synchronous_commit", "full_page_writes"] {
                s.push((name.to_owned(), "off".to_owned()));
            }
        }
        s.extend(o.settings.iter().cloned());
        s
    }

    fn write_settings(&self) -> Result<(), LocalPgError> {
        let text = render_settings(&self.settings())?;
        let path = self.data_dir.join(SETTINGS_FILE);
        std::fs::write(&path, text)
            .map_err(|e| LocalPgError::io("could not write settings file", &path, e))?;
        chown_to_postgres_if_root(&path)?;

        let main_conf = self.data_dir.join("postgresql.conf");
        let current = std::fs::read_to_string(&main_conf)
            .map_err(|e| LocalPgError::io("could not read", &main_conf, e))?;
        let include = format!("include_if_exists = '{SETTINGS_FILE}'");
        if !current.lines().any(|l| l.trim() == include) {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&main_conf)
                .map_err(|e| LocalPgError::io("could not open", &main_conf, e))?;
            writeln!(file, "\n{include}")
                .map_err(|e| LocalPgError::io("could not append to", &main_conf, e))?;
        }
        Ok(())
    }

    /// A `key=value` connection string for `dbname` over the unix socket, usable by
    /// libpq and tokio-postgres.
    pub fn conninfo(&self, dbname: &str) -> String {
        self.conninfo_with_host(&self.socket_dir.display().to_string(), dbname)
    }

    /// A `key=value` connection string for `dbname` over TCP on 127.0.0.1 (needs
    /// `listen_tcp`).
    pub fn tcp_conninfo(&self, dbname: &str) -> String {
        self.conninfo_with_host("127.0.0.1", dbname)
    }

    fn conninfo_with_host(&self, host: &str, dbname: &str) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            quote_conninfo_value(host),
            self.opts.port,
            quote_conninfo_value(&self.opts.superuser),
            quote_conninfo_value(dbname)
        )
    }

    /// Runs `sql` with `psql` as the superuser and returns its unaligned, tuples-only
    /// output (trimmed). Stops at the first error.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, LocalPgError> {
        let mut cmd = Command::new(self.bins.program("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.opts.port.to_string())
            .arg("-U")
            .arg(&self.opts.superuser)
            .arg("-d")
            .arg(dbname)
            .arg("-c")
            .arg(sql);
        let out = output_of(cmd, false)?;
        Ok(out.trim().to_owned())
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The unix socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server log file (the server's stderr, appended across starts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.opts.port
    }

    /// The bootstrap superuser's name.
    pub fn superuser(&self) -> &str {
        &self.opts.superuser
    }

    /// The options this cluster was opened with.
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// The binaries this cluster runs.
    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }
}

/// Runs a PostgreSQL utility as `postgres` when root, failing with its output on a
/// non-zero exit.
fn run_to_completion(cmd: Command) -> Result<String, LocalPgError> {
    output_of(cmd, true)
}

fn output_of(mut cmd: Command, as_postgres: bool) -> Result<String, LocalPgError> {
    if as_postgres {
        run_as_postgres_if_root(&mut cmd)?;
    }
    cmd.stdin(Stdio::null());
    let program = PathBuf::from(cmd.get_program());
    let out = cmd.output().map_err(|source| LocalPgError::Spawn {
        program: program.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Err(LocalPgError::CommandFailed {
        program,
        status: out.status,
        output: crate::lifecycle::last_lines(&text, 20),
    })
}
