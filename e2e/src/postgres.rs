//! A PostgreSQL primary with streaming hot-standby replicas.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, NoTls};
use umstore_localpg::{ClusterOptions, LocalCluster, PgBinaries};

use crate::{free_port, keeper, HarnessError, TestCa, TestDir};

/// How many replicas [`Postgres::start`] clones on first use.
pub const DEFAULT_REPLICAS: usize = 2;

/// How long [`Postgres::wait_for_replay`] waits.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);

/// Options every harness cluster shares: fast, throwaway, dies with the test process.
pub(crate) fn cluster_options(port: u16, socket_dir: &Path) -> ClusterOptions {
    ClusterOptions {
        port,
        listen_tcp: true,
        socket_dir: Some(socket_dir.to_path_buf()),
        durable: false,
        start_timeout: Duration::from_secs(60),
        stop_timeout: Duration::from_secs(10),
        death_signal: Some(libc::SIGQUIT),
        spawner: Some(keeper::spawner()),
        ..ClusterOptions::default()
    }
}

/// A PostgreSQL primary (unix socket in its directory and a loopback TCP port; fsync
/// off) and, once asked for, its streaming hot-standby replicas. Stops everything and
/// removes its directory on drop.
#[derive(Debug)]
pub struct Postgres {
    replicas: OnceLock<Result<Vec<LocalCluster>, String>>,
    replica_count: usize,
    stop_replicas_at_exit: bool,
    primary: LocalCluster,
    /// The CA of the primary's certificate, when it serves TLS.
    tls: Option<TestCa>,
    dir: TestDir,
}

/// The names the shared primary's certificate holds: every Service of the
/// operator's scenarios (namespace `umstore`), and loopback.
pub const SHARED_TLS_NAMES: &[&str] = &["DNS:*.umstore.svc", "DNS:localhost", "IP:127.0.0.1"];

/// How a primary is started.
#[derive(Default)]
struct Start<'a> {
    replica_count: usize,
    crash_safe: bool,
    /// Serve TLS with a certificate for these names, signed by a new CA.
    tls_names: Option<&'a [&'a str]>,
    settings: Vec<(String, String)>,
}

impl Postgres {
    /// Starts a primary; [`DEFAULT_REPLICAS`] replicas are cloned on first use.
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with_replicas(DEFAULT_REPLICAS)
    }

    /// Starts a primary whose first replica use clones `replica_count` replicas.
    pub fn start_with_replicas(replica_count: usize) -> Result<Self, HarnessError> {
        Self::start_with(Start {
            replica_count,
            ..Start::default()
        })
    }

    /// Starts a primary (no replicas) with `settings` written after the harness's
    /// (so overriding them: `listen_addresses`, `ssl_cert_file`, ...).
    pub fn start_with_settings(settings: Vec<(String, String)>) -> Result<Self, HarnessError> {
        Self::start_with(Start {
            settings,
            ..Start::default()
        })
    }

    /// Starts a primary that also serves TLS (`ssl = on`) with a certificate for
    /// `subject_alt_names` (`DNS:...`, `IP:...`) signed by a CA of its own
    /// ([`Self::tls_ca`]); `replica_count` replicas are cloned on first use.
    pub fn start_serving_tls(
        replica_count: usize,
        subject_alt_names: &[&str],
    ) -> Result<Self, HarnessError> {
        Self::start_with(Start {
            replica_count,
            tls_names: Some(subject_alt_names),
            ..Start::default()
        })
    }

    /// Starts a primary (no replicas) whose acknowledged commits survive
    /// [`Self::crash_and_restart_primary`]: `synchronous_commit` is on, as in
    /// production. `fsync` stays off: when only the server's processes die, the
    /// kernel still holds every page they wrote; what a process crash loses is
    /// WAL that was never written, which is what `synchronous_commit = off` risks.
    pub fn start_crash_safe() -> Result<Self, HarnessError> {
        Self::start_with(Start {
            crash_safe: true,
            ..Start::default()
        })
    }

    fn start_with(start: Start<'_>) -> Result<Self, HarnessError> {
        let bins = PgBinaries::discover()?;
        let dir = TestDir::new("pg")?;
        let mut opts = cluster_options(free_port()?, dir.path());
        if start.crash_safe {
            opts.settings
                .push(("synchronous_commit".to_owned(), "on".to_owned()));
        }
        let tls = match start.tls_names {
            Some(names) => {
                let ca = TestCa::new(&dir.path().join("tls"), "postgres")?;
                let cert = ca.issue("server", names)?;
                opts.settings.extend([
                    ("ssl".to_owned(), "on".to_owned()),
                    ("ssl_cert_file".to_owned(), cert.cert.display().to_string()),
                    ("ssl_key_file".to_owned(), cert.key.display().to_string()),
                ]);
                Some(ca)
            }
            None => None,
        };
        opts.settings.extend(start.settings);
        let mut primary = LocalCluster::init_or_reuse(&bins, &dir.path().join("primary"), opts)?;
        primary.start()?;
        Ok(Self {
            replicas: OnceLock::new(),
            replica_count: start.replica_count,
            stop_replicas_at_exit: false,
            primary,
            tls,
            dir,
        })
    }

    /// The CA that signed the primary's certificate, when it serves TLS.
    pub fn tls_ca(&self) -> Option<&TestCa> {
        self.tls.as_ref()
    }

    /// Hands cleanup to the process-exit hook (for shared instances in statics).
    pub(crate) fn stop_at_exit(mut self) -> Self {
        if let Some(pid) = self.primary.pid() {
            keeper::stop_at_exit(pid, libc::SIGQUIT);
        }
        self.stop_replicas_at_exit = true;
        self.dir.remove_at_exit();
        self
    }

    /// The primary cluster.
    pub fn primary(&self) -> &LocalCluster {
        &self.primary
    }

    /// Crashes the primary (SIGKILL to the postmaster: no shutdown checkpoint, the
    /// backends die with it) and starts it again, which runs crash recovery.
    pub fn crash_and_restart_primary(&mut self) -> Result<(), HarnessError> {
        if let Some(pid) = self.primary.pid() {
            // SAFETY: signalling the server we started.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        self.primary.stop();
        self.primary.start().map_err(HarnessError::from)
    }

    /// Connection string for `dbname` on the primary's unix socket.
    pub fn conninfo(&self, dbname: &str) -> String {
        self.primary.conninfo(dbname)
    }

    /// Connection string for `dbname` on the primary's loopback TCP port.
    pub fn tcp_conninfo(&self, dbname: &str) -> String {
        self.primary.tcp_conninfo(dbname)
    }

    /// The primary's TCP port.
    pub fn port(&self) -> u16 {
        self.primary.port()
    }

    /// The directory holding every cluster, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The replicas, cloning and starting them (`pg_basebackup -R -X stream -c fast`)
    /// on the first call. Blocks while doing so.
    pub fn replicas(&self) -> Result<&[LocalCluster], HarnessError> {
        let started = self.replicas.get_or_init(|| {
            let mut replicas = Vec::new();
            for index in 0..self.replica_count {
                match self.start_replica(index) {
                    Ok(r) => replicas.push(r),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(replicas)
        });
        match started {
            Ok(replicas) => Ok(replicas),
            Err(message) => Err(HarnessError::Shared {
                server: "PostgreSQL replicas",
                message: message.clone(),
            }),
        }
    }

    fn start_replica(&self, index: usize) -> Result<LocalCluster, HarnessError> {
        let bins = self.primary.binaries();
        let opts = cluster_options(free_port()?, self.dir.path());
        let data = self.dir.path().join(format!("replica{index}"));
        let mut replica =
            LocalCluster::init_replica(bins, &self.primary.conninfo("postgres"), &data, opts)?;
        replica.start()?;
        if self.stop_replicas_at_exit {
            if let Some(pid) = replica.pid() {
                keeper::stop_at_exit(pid, libc::SIGQUIT);
            }
        }
        Ok(replica)
    }

    /// Stops replica `index` (a fast shutdown), as a failed standby would go
    /// away; [`Self::restart_replica`] brings it back.
    pub fn stop_replica(&mut self, index: usize) -> Result<(), HarnessError> {
        self.replica_mut(index)?.stop();
        Ok(())
    }

    /// Starts replica `index` again after [`Self::stop_replica`].
    pub fn restart_replica(&mut self, index: usize) -> Result<(), HarnessError> {
        self.replica_mut(index)?.start().map_err(HarnessError::from)
    }

    fn replica_mut(&mut self, index: usize) -> Result<&mut LocalCluster, HarnessError> {
        self.replicas()?;
        let count = self.replica_count;
        match self.replicas.get_mut() {
            Some(Ok(replicas)) => replicas
                .get_mut(index)
                .ok_or(HarnessError::NoSuchReplica { index, count }),
            _ => Err(HarnessError::NoSuchReplica { index, count }),
        }
    }

    /// One replica, starting the replicas if needed.
    pub fn replica(&self, index: usize) -> Result<&LocalCluster, HarnessError> {
        let replicas = self.replicas()?;
        replicas.get(index).ok_or(HarnessError::NoSuchReplica {
            index,
            count: replicas.len(),
        })
    }

    /// Connects to `dbname` on the primary (the connection runs on the current tokio
    /// runtime).
    pub async fn connect(&self, dbname: &str) -> Result<Client, HarnessError> {
        connect(&self.conninfo(dbname)).await
    }

    /// Creates a uniquely named database on the primary and returns its name and a
    /// connection string (unix socket) for it.
    pub async fn fresh_database(&self) -> Result<(String, String), HarnessError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let client = self.connect("postgres").await?;
        // An identifier we generated (not a value), quoted; CREATE DATABASE takes no
        // parameters.
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|e| HarnessError::sql(format!("CREATE DATABASE {name}"), e))?;
        let conninfo = self.conninfo(&name);
        Ok((name, conninfo))
    }

    /// The primary's `pg_current_wal_lsn()`.
    pub async fn current_wal_lsn(&self) -> Result<PgLsn, HarnessError> {
        let client = self.connect("postgres").await?;
        let row = client
            .query_one("SELECT pg_current_wal_lsn()", &[])
            .await
            .map_err(|e| HarnessError::sql("SELECT pg_current_wal_lsn()", e))?;
        Ok(row.get(0))
    }

    /// Waits (up to 30 s) until replica `replica_index` has replayed WAL up to `lsn`
    /// (`pg_last_wal_replay_lsn() >= lsn`).
    pub async fn wait_for_replay(
        &self,
        replica_index: usize,
        lsn: PgLsn,
    ) -> Result<(), HarnessError> {
        let replica = self.replica(replica_index)?;
        let client = connect(&replica.conninfo("postgres")).await?;
        let deadline = Instant::now() + REPLAY_TIMEOUT;
        loop {
            let row = client
                .query_one("SELECT pg_last_wal_replay_lsn()", &[])
                .await
                .map_err(|e| HarnessError::sql("SELECT pg_last_wal_replay_lsn()", e))?;
            let replayed: Option<PgLsn> = row.get(0);
            if replayed.is_some_and(|r| r >= lsn) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::ReplayTimeout {
                    replica: replica_index,
                    target: lsn.to_string(),
                    replayed: replayed.map_or("nothing".to_owned(), |r| r.to_string()),
                    seconds: REPLAY_TIMEOUT.as_secs(),
                    log: replica.log_path().to_path_buf(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every replica has replayed the primary's current WAL position;
    /// returns that position.
    pub async fn wait_for_replicas(&self) -> Result<PgLsn, HarnessError> {
        let count = self.replicas()?.len();
        let lsn = self.current_wal_lsn().await?;
        for index in 0..count {
            self.wait_for_replay(index, lsn).await?;
        }
        Ok(lsn)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(Ok(replicas)) = self.replicas.get_mut() {
            for replica in replicas.iter_mut() {
                replica.stop();
            }
        }
        self.primary.stop();
    }
}

/// Connects with `conninfo` (no TLS) and drives the connection on the current tokio
/// runtime.
pub async fn connect(conninfo: &str) -> Result<Client, HarnessError> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .map_err(|e| HarnessError::sql(format!("connect ({conninfo})"), e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("test connection ended: {e}");
        }
    });
    Ok(client)
}
