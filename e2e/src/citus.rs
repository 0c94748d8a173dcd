//! A Citus coordinator with two workers, where Citus is installed.

use umstore_localpg::{LocalCluster, PgBinaries};

use crate::postgres::cluster_options;
use crate::skip::{skip_or_fail, Component};
use crate::{free_port, keeper, HarnessError, TestDir};

/// Why [`Citus::start`] gave no cluster.
#[derive(Debug, thiserror::Error)]
pub enum CitusUnavailable {
    /// Citus is not installed here: tests skip with the reason (see
    /// [`Citus::start_or_skip`]); Citus is exempt from `UMSTORE_REQUIRE_COMPONENTS`.
    #[error("Citus is not available here: {0}")]
    Skip(String),
    /// Citus is installed but the cluster failed to start.
    #[error(transparent)]
    Failed(#[from] HarnessError),
}

/// A Citus coordinator and two workers on loopback ports, registered with
/// `citus_set_coordinator_host` and `citus_add_node`. Stopped on drop.
#[derive(Debug)]
pub struct Citus {
    workers: Vec<LocalCluster>,
    coordinator: LocalCluster,
    dir: TestDir,
}

impl Citus {
    /// Starts the cluster, or says why it cannot run here.
    pub fn start() -> Result<Self, CitusUnavailable> {
        let bins = PgBinaries::discover().map_err(HarnessError::from)?;
        if !bins.has_citus() {
            let dir = bins
                .pkglibdir()
                .map_or("pg_config --pkglibdir (not found)".to_owned(), |d| {
                    d.display().to_string()
                });
            return Err(CitusUnavailable::Skip(format!(
                "citus.so not found in {dir}: build Citus from source to run these tests"
            )));
        }
        let dir = TestDir::new("citus")?;
        let mut nodes = Vec::new();
        for name in ["coordinator", "worker0", "worker1"] {
            let mut opts =
                cluster_options(free_port().map_err(CitusUnavailable::from)?, dir.path());
            opts.citus = true;
            // Shard moves and splits copy with logical replication.
            opts.settings.extend(
                [("wal_level", "logical"), ("max_replication_slots", "32")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned())),
            );
            let mut node = LocalCluster::init_or_reuse(&bins, &dir.path().join(name), opts)
                .map_err(HarnessError::from)?;
            node.start().map_err(HarnessError::from)?;
            node.psql("postgres", "CREATE EXTENSION IF NOT EXISTS citus")
                .map_err(HarnessError::from)?;
            trust_citus_output_plugin(&node)?;
            nodes.push(node);
        }
        let coordinator = nodes.remove(0);
        let sql = |q: &str| coordinator.psql("postgres", q).map_err(HarnessError::from);
        // Ports are integers we chose: no quoting concerns.
        sql(&format!(
            "SELECT citus_set_coordinator_host('127.0.0.1', {})",
            coordinator.port()
        ))?;
        for worker in &nodes {
            sql(&format!(
                "SELECT citus_add_node('127.0.0.1', {})",
                worker.port()
            ))?;
        }
        Ok(Self {
            workers: nodes,
            coordinator,
            dir,
        })
    }

    /// [`Self::start`] for a test: `None` after [`skip_or_fail`] (Citus is exempt: a
    /// skip, also in CI) when Citus is not installed; panics when it is installed but
    /// the cluster does not start.
    #[track_caller]
    pub fn start_or_skip() -> Option<Self> {
        match Self::start() {
            Ok(citus) => Some(citus),
            Err(CitusUnavailable::Skip(reason)) => {
                skip_or_fail(Component::Citus, reason);
                None
            }
            Err(e) => panic!("Citus is installed but did not start: {e}"),
        }
    }

    pub(crate) fn stop_at_exit(mut self) -> Self {
        for node in std::iter::once(&self.coordinator).chain(&self.workers) {
            if let Some(pid) = node.pid() {
                keeper::stop_at_exit(pid, libc::SIGQUIT);
            }
        }
        self.dir.remove_at_exit();
        self
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &LocalCluster {
        &self.coordinator
    }

    /// The workers.
    pub fn workers(&self) -> &[LocalCluster] {
        &self.workers
    }

    /// Connection string for `dbname` on the coordinator (unix socket).
    pub fn conninfo(&self, dbname: &str) -> String {
        self.coordinator.conninfo(dbname)
    }
}

/// Some PostgreSQL builds (this machine's among them) accept a logical-decoding
/// output plugin only when `output_plugin_libraries` names it; Citus's shard moves and
/// splits decode with `pgoutput` and its own `citus` plugin. Where the server has no
/// such setting (upstream PostgreSQL, the Citus images) nothing is changed.
fn trust_citus_output_plugin(node: &LocalCluster) -> Result<(), HarnessError> {
    let known = node
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_settings WHERE name = 'output_plugin_libraries'",
        )
        .map_err(HarnessError::from)?;
    if known.trim() == "1" {
        for sql in [
            "ALTER SYSTEM SET output_plugin_libraries = pgoutput, test_decoding, citus",
            "SELECT pg_reload_conf()",
        ] {
            node.psql("postgres", sql).map_err(HarnessError::from)?;
        }
    }
    Ok(())
}

impl Drop for Citus {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            worker.stop();
        }
        self.coordinator.stop();
    }
}
