//! The harness's error type.

use std::path::PathBuf;

use umstore_localpg::LocalPgError;

/// Why a test server could not be started or used. Messages say what failed and where
/// its log is.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Starting or driving a local PostgreSQL cluster failed.
    #[error(transparent)]
    LocalPg(#[from] LocalPgError),
    /// A server program is not installed.
    #[error("{program} not found ({looked_in}): {install}")]
    ProgramNotFound {
        /// The program name.
        program: &'static str,
        /// Where it was looked for.
        looked_in: String,
        /// How to install it.
        install: &'static str,
    },
    /// A file system or process operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A server exited or did not become ready.
    #[error("{server} {problem}; last lines of {}:\n{log_tail}", log.display())]
    NotReady {
        /// Which server.
        server: &'static str,
        /// What happened ("exited with ...", "not ready within 30s").
        problem: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },
    /// A helper command (e.g. the `bao` CLI) failed.
    #[error("`{command}` failed: {output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its output.
        output: String,
    },
    /// A SQL statement or connection failed.
    #[error("PostgreSQL {action}: {source}")]
    Sql {
        /// What was being done.
        action: String,
        /// The client error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A replica did not replay the primary's WAL in time.
    #[error(
        "replica {replica} did not replay up to {target} within {seconds}s (replayed: {replayed}); \
         check its log {}", log.display()
    )]
    ReplayTimeout {
        /// The replica index.
        replica: usize,
        /// The LSN waited for.
        target: String,
        /// The last replayed LSN seen.
        replayed: String,
        /// The timeout.
        seconds: u64,
        /// The replica's server log.
        log: PathBuf,
    },
    /// A replica index past the replicas started.
    #[error("no replica {index}: {count} replicas are running")]
    NoSuchReplica {
        /// The index asked for.
        index: usize,
        /// How many exist.
        count: usize,
    },
    /// A shared server failed to start earlier in this process; the message is that
    /// failure's.
    #[error("shared {server} failed to start: {message}")]
    Shared {
        /// Which server.
        server: &'static str,
        /// The original error.
        message: String,
    },
}

impl HarnessError {
    pub(crate) fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            action: action.into(),
            source,
        }
    }

    pub(crate) fn sql(action: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Self::Sql {
            action: action.into(),
            source,
        }
    }
}
