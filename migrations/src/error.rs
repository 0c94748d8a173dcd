use thiserror::Error;

/// Why a migration run or check failed.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// A statement failed; nothing of that migration was kept.
    #[error("migration {version} ({name}) failed and was rolled back: {source}")]
    Apply {
        /// Version of the failing migration.
        version: u32,
        /// Its name.
        name: &'static str,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// An applied migration's text differs from the one embedded in this binary.
    #[error(
        "migration {version} ({name}) was changed after it was applied: the database recorded \
         checksum {applied} but this binary has {embedded}; restore the original file and add \
         a new migration instead of editing an applied one"
    )]
    ChecksumMismatch {
        /// Version of the changed migration.
        version: u32,
        /// Its name.
        name: String,
        /// Checksum recorded when it was applied.
        applied: String,
        /// Checksum of the text embedded in this binary.
        embedded: String,
    },
    /// The database has a migration this binary does not know.
    #[error(
        "the database has migration {version} ({name}) which this binary does not know: \
         it was migrated by a newer umstore; run that version or a newer one"
    )]
    UnknownApplied {
        /// Version recorded in the database.
        version: u32,
        /// Name recorded in the database.
        name: String,
    },
    /// Migrations are pending (from `verify`).
    #[error("{count} migration(s) pending, first {first}: run `migrate up`")]
    Pending {
        /// How many are pending.
        count: usize,
        /// The first pending one, as `version_name`.
        first: String,
    },
    /// Talking to the database failed outside a migration.
    #[error("{what}: {source}")]
    Database {
        /// What the runner was doing.
        what: &'static str,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl MigrateError {
    /// A database error while doing `what`.
    pub fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Self {
        move |source| MigrateError::Database { what, source }
    }
}
