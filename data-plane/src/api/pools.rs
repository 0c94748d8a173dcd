//! The database logins reads run as: one connection pool per purpose, so the
//! purpose's grants and row-level security decide what a caller can see.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{Config, NoTls};
use umstore_migrations::roles::Purpose;

use super::error::ApiError;

/// Which server answered a read (the `X-Served-By` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// The primary (or PgBouncer in front of it).
    Primary,
}

impl Served {
    /// The header's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Primary => "primary",
        }
    }
}

/// The response header that says which server answered.
pub const SERVED_BY_HEADER: &str = "x-served-by";

/// How long a read waits for a pooled connection, or for a new one.
const WAIT: Duration = Duration::from_secs(5);

/// One pool per purpose that has a database login configured.
#[derive(Clone, Default)]
pub struct ReadPools {
    primary: BTreeMap<Purpose, Pool>,
}

impl std::fmt::Debug for ReadPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let purposes: Vec<&str> = self.primary.keys().map(|p| p.slug()).collect();
        f.debug_struct("ReadPools")
            .field("purposes", &purposes)
            .finish()
    }
}

/// A pool could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the {purpose} read pool: {detail}")]
pub struct PoolError {
    purpose: &'static str,
    detail: String,
}

impl ReadPools {
    /// Pools of up to `size` connections, one per purpose in `logins`.
    pub fn new(logins: &BTreeMap<Purpose, Config>, size: usize) -> Result<Self, PoolError> {
        let mut primary = BTreeMap::new();
        for (purpose, config) in logins {
            let mut config = config.clone();
            config.application_name(format!("umstore-api-{}", purpose.slug()));
            config.connect_timeout(WAIT);
            let manager = Manager::from_config(
                config,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            let pool = Pool::builder(manager)
                .max_size(size.max(1))
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(WAIT))
                .create_timeout(Some(WAIT))
                .recycle_timeout(Some(WAIT))
                .build()
                .map_err(|e| PoolError {
                    purpose: purpose.slug(),
                    detail: e.to_string(),
                })?;
            primary.insert(*purpose, pool);
        }
        Ok(Self { primary })
    }

    /// The purposes that can read.
    pub fn purposes(&self) -> Vec<Purpose> {
        self.primary.keys().copied().collect()
    }

    /// A connection as `purpose`'s login, and which server it reaches.
    pub async fn get(&self, purpose: Purpose) -> Result<(Object, Served), ApiError> {
        let pool = self.primary.get(&purpose).ok_or_else(|| {
            ApiError::Unavailable(format!(
                "no database login is configured for the purpose {0}: give serve \
                 --{0}-database-url (or UMSTORE_{1}_DATABASE_URL)",
                purpose.slug(),
                purpose.slug().replace('-', "_").to_uppercase()
            ))
        })?;
        let client = pool.get().await.map_err(|e| {
            tracing::warn!(purpose = purpose.slug(), error = %e, "no read connection");
            ApiError::Unavailable(format!(
                "the database does not answer for the purpose {}; retry shortly",
                purpose.slug()
            ))
        })?;
        Ok((client, Served::Primary))
    }
}
