//! The write path: events in (NATS JetStream and HTTP), applied exactly once, and
//! events out (the outbox relay). See docs/events.md.

pub mod apply;
pub mod event;

pub use apply::{apply, ApplyConfig, ApplyError, Outcome};
pub use event::{parse, Event, EventType, Rejection};

use std::sync::Arc;

use chrono::Utc;

use crate::crypto::Keyring;
use crate::db::Database;

/// Parses and applies events on a pool of writer connections. Shared by the
/// JetStream workers and the HTTP endpoint.
#[derive(Clone)]
pub struct Ingest {
    pool: deadpool_postgres::Pool,
    keyring: Arc<Keyring>,
    config: ApplyConfig,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("pool", &self.pool.status())
            .field("config", &self.config)
            .finish()
    }
}

/// Why an [`Ingest`] could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the ingest connection pool: {0}")]
pub struct PoolError(String);

impl Ingest {
    /// A pool of up to `connections` connections to `database` (the writer
    /// login), statements prepared once per connection.
    pub fn new(
        database: &Database,
        connections: usize,
        keyring: Arc<Keyring>,
        config: ApplyConfig,
    ) -> Result<Self, PoolError> {
        let manager = deadpool_postgres::Manager::from_config(
            database.pg_config().clone(),
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(connections.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| PoolError(e.to_string()))?;
        Ok(Self {
            pool,
            keyring,
            config,
        })
    }

    /// What applying uses besides the event.
    pub fn config(&self) -> &ApplyConfig {
        &self.config
    }

    /// Parses `bytes` and applies the event.
    pub async fn submit(&self, bytes: &[u8]) -> Result<(Event, Outcome), SubmitError> {
        let event = parse(bytes, Utc::now()).map_err(SubmitError::Rejected)?;
        let outcome = self.apply(&event).await.map_err(|e| match e {
            ApplyError::Rejected(r) => SubmitError::Rejected(r),
            ApplyError::Transient(m) => SubmitError::Transient(m),
        })?;
        Ok((event, outcome))
    }

    /// Applies a parsed event on a pooled connection.
    pub async fn apply(&self, event: &Event) -> Result<Outcome, ApplyError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| ApplyError::Transient(format!("no database connection: {e}")))?;
        apply(&mut client, &self.keyring, &self.config, event).await
    }
}

/// Why a submitted event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Never applicable: dead-letter it.
    #[error(transparent)]
    Rejected(Rejection),
    /// Retry later.
    #[error("{0}")]
    Transient(String),
}
