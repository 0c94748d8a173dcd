//! The embedded default: a private PostgreSQL cluster under the data
//! directory, used when no `--database-url` is given (local runs only).

use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::info;
use umstore_localpg::{ClusterOptions, LocalCluster, LocalPgError, PgBinaries};
use umstore_migrations::roles::DATABASE;

use crate::db::{Database, DbError};

/// Why the embedded cluster could not start.
#[derive(Debug, Error)]
pub enum EmbeddedError {
    /// Finding, initialising or starting PostgreSQL failed.
    #[error(transparent)]
    LocalPg(#[from] LocalPgError),
    /// Creating the data directory failed.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to it failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Creating the database failed.
    #[error("creating database {DATABASE}: {0}")]
    CreateDatabase(#[source] tokio_postgres::Error),
}

/// The default data directory: `/var/lib/umstore` as root (the server runs
/// as `postgres`, which cannot enter root's home), else
/// `$XDG_DATA_HOME/umstore` or `~/.local/share/umstore`.
pub fn default_data_dir() -> PathBuf {
    if umstore_localpg::is_root() {
        return PathBuf::from("/var/lib/umstore");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("umstore");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".local/share/umstore"))
        .unwrap_or_else(|| PathBuf::from(".umstore"))
}

/// A running embedded cluster; stops on drop.
#[derive(Debug)]
pub struct Embedded {
    cluster: LocalCluster,
    database: Database,
}

impl Embedded {
    /// Creates (first run) or reuses the cluster in `<data_dir>/pg`, starts it
    /// listening only on a unix socket in `<data_dir>/run`, and creates the
    /// application database ([`DATABASE`]).
    pub async fn start(data_dir: &Path) -> Result<Self, EmbeddedError> {
        let bins = PgBinaries::discover()?;
        let run_dir = data_dir.join("run");
        for dir in [data_dir, run_dir.as_path()] {
            std::fs::create_dir_all(dir).map_err(|source| EmbeddedError::DataDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        umstore_localpg::chown_to_postgres_if_root(&run_dir)?;
        let opts = ClusterOptions {
            socket_dir: Some(run_dir),
            log_path: Some(data_dir.join("postgresql.log")),
            ..ClusterOptions::default()
        };
        let data = data_dir.join("pg");
        let cluster = tokio::task::block_in_place(|| -> Result<LocalCluster, LocalPgError> {
            let mut c = LocalCluster::init_or_reuse(&bins, &data, opts)?;
            c.start()?;
            Ok(c)
        })?;
        info!(data_dir = %data.display(), log = %cluster.log_path().display(), "embedded PostgreSQL started");
        let admin = Database::parse(&cluster.conninfo("postgres"))?;
        let client = admin
            .connect_with_retry(std::time::Duration::from_secs(10))
            .await?;
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
                &[&DATABASE],
            )
            .await
            .map_err(EmbeddedError::CreateDatabase)?
            .get(0);
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
                .await
                .map_err(EmbeddedError::CreateDatabase)?;
        }
        let database = Database::parse(&cluster.conninfo(DATABASE))?;
        Ok(Self { cluster, database })
    }

    /// The application database ([`DATABASE`]) on this cluster.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// A conninfo string for psql and other clients.
    pub fn conninfo(&self) -> String {
        self.cluster.conninfo(DATABASE)
    }

    /// Stops the server (fast shutdown).
    pub fn stop(mut self) {
        tokio::task::block_in_place(|| self.cluster.stop());
    }
}
