//! The one error type of this crate.

use std::path::PathBuf;

/// What went wrong while finding, initialising, starting or stopping a local cluster.
/// Each message says what failed and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    /// No usable PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL 15+ server binaries not found (looked in {looked_in}): install the \
         `postgresql-15` package (apt-get install postgresql-15), set UMSTORE_PG_BINDIR to \
         the directory holding `postgres` and `initdb`, or pass --database-url"
    )]
    BinariesNotFound {
        /// The places searched, comma separated.
        looked_in: String,
    },
    /// `UMSTORE_PG_BINDIR` is set but does not hold the server binaries.
    #[error(
        "UMSTORE_PG_BINDIR={dir} does not contain `postgres` and `initdb`: point it at the \
         PostgreSQL 15+ bin directory (e.g. /usr/lib/postgresql/15/bin) or unset it"
    )]
    BadBinDirEnv {
        /// The directory named by the variable.
        dir: PathBuf,
    },
    /// The process runs as root but has no `postgres` user to drop privileges to.
    #[error(
        "running as root, but there is no `postgres` user to run PostgreSQL as (PostgreSQL \
         refuses to run as root): install the postgresql package (it creates the user) or \
         run as an unprivileged user"
    )]
    NoPostgresUser,
    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "could not create data directory".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A helper program could not be started at all.
    #[error("could not run {program}: {source}")]
    Spawn {
        /// The program path.
        program: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A helper program (initdb, pg_basebackup, psql ...) exited unsuccessfully.
    #[error("{program} failed ({status}): {output}")]
    CommandFailed {
        /// The program path.
        program: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The tail of its stdout and stderr.
        output: String,
    },
    /// The server exited while starting.
    #[error(
        "PostgreSQL in {data_dir} exited during startup ({status}); last lines of {log}:\n{log_tail}"
    )]
    ExitedDuringStartup {
        /// The data directory.
        data_dir: PathBuf,
        /// The exit status.
        status: std::process::ExitStatus,
        /// The server log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },
    /// The server did not accept connections in time.
    #[error(
        "PostgreSQL in {data_dir} did not accept connections within {seconds}s; last lines of {log}:\n{log_tail}"
    )]
    StartTimeout {
        /// The data directory.
        data_dir: PathBuf,
        /// The timeout that passed.
        seconds: u64,
        /// The server log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },
    /// A setting name or value cannot be written to postgresql.conf safely.
    #[error("invalid PostgreSQL setting {name:?}: {reason}")]
    InvalidSetting {
        /// The setting name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
}

impl LocalPgError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
