//! The operator's error type: each variant says what failed and what to check.

use umstore_data_plane::db::with_causes;

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API call failed while {action}: {source}; check the API server and the operator's RBAC")]
    Kube {
        /// What the operator was doing.
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// An object could not be turned into JSON.
    #[error("serializing {what}: {source}")]
    Serialize {
        /// Which object.
        what: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The OS random source failed while generating a password.
    #[error("generating a password failed: {0}; the OS random source is unavailable")]
    Entropy(String),
    /// A role Secret exists but holds no usable password.
    #[error(
        "Secret {name} has no `password` key; restore it from backup (the database role still \
         uses the old password) or delete it to have a new one generated"
    )]
    CorruptSecret {
        /// The Secret's name.
        name: String,
    },
    /// The API tokens Secret exists but lacks a purpose's token.
    #[error(
        "Secret {name} has no usable `{key}` token; delete it to have new tokens generated for \
         every purpose (clients then read their new token from it)"
    )]
    CorruptApiTokens {
        /// The Secret's name.
        name: String,
        /// The purpose slug whose token is missing.
        key: &'static str,
    },
    /// The object lacks a name or namespace.
    #[error("the UserMetadataStore has no name or namespace")]
    MissingMetadata,
    /// A statement against the store's PostgreSQL failed (bootstrap, migrate).
    /// The driver's message names only the kind of failure; its causes (the
    /// server's message, a TLS verification failure) are written after it.
    #[error("PostgreSQL: {action}: {}", with_causes(source))]
    Database {
        /// What the operator was doing.
        action: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The migration runner lost its connection.
    #[error("schema migrations: {0}")]
    Migrate(#[source] umstore_migrations::MigrateError),
    /// The finalizer patch could not be built.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// Wraps a client error with what the operator was doing.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }

    /// Wraps a driver error with what the operator was doing.
    pub fn db(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let action = action.into();
        move |source| Error::Database { action, source }
    }

    /// The `error` label of the reconcile-failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube {
                source: kube::Error::Api(status),
                ..
            } if status.code == 409 => "conflict",
            Error::Kube {
                source: kube::Error::Api(status),
                ..
            } if status.code == 403 => "forbidden",
            Error::Kube { .. } => "kube",
            Error::Serialize { .. } => "serialize",
            Error::Entropy(_) => "entropy",
            Error::CorruptSecret { .. } | Error::CorruptApiTokens { .. } => "corrupt_secret",
            Error::MissingMetadata => "missing_metadata",
            Error::Database { .. } => "database",
            Error::Migrate(_) => "migrate",
            Error::Finalizer(_) => "finalizer",
        }
    }
}
