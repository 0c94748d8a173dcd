//! Database connections: parsing the URL, connecting with retries.

use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;
use tokio_postgres::{Client, Config, NoTls};
use tracing::{debug, warn};

use crate::backoff::Backoff;

/// The backoff between database connection attempts: 100 ms doubling to 5 s.
pub fn db_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

/// Why connecting failed.
#[derive(Debug, Error)]
pub enum DbError {
    /// The URL or conninfo string does not parse.
    #[error(
        "invalid database URL: {0} (expected postgres://user@host:port/db or key=value pairs)"
    )]
    InvalidUrl(#[source] tokio_postgres::Error),
    /// The server could not be reached or refused the login.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// Host/port/db, without the password.
        target: String,
        /// Database error.
        #[source]
        source: tokio_postgres::Error,
    },
}

/// A parsed database target.
#[derive(Clone)]
pub struct Database {
    config: Config,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Database {
    /// Parses a `postgres://` URL or a key=value conninfo string.
    pub fn parse(url: &str) -> Result<Self, DbError> {
        let mut config = Config::from_str(url).map_err(DbError::InvalidUrl)?;
        if config.get_application_name().is_none() {
            config.application_name("umstore-data-plane");
        }
        config.connect_timeout(Duration::from_secs(5));
        Ok(Self { config })
    }

    /// Host, port, user and database, never the password: safe to log.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(s) => s.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        format!(
            "{}@{}:{}/{}",
            self.config.get_user().unwrap_or("?"),
            hosts.join(","),
            self.config.get_ports().first().copied().unwrap_or(5432),
            self.config.get_dbname().unwrap_or("?"),
        )
    }

    /// The parsed connection settings (for a connection pool).
    pub fn pg_config(&self) -> &Config {
        &self.config
    }

    /// Connects once; the connection runs on a spawned task.
    pub async fn connect(&self) -> Result<Client, DbError> {
        let (client, connection) =
            self.config
                .connect(NoTls)
                .await
                .map_err(|source| DbError::Connect {
                    target: self.describe(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "database connection closed");
            }
        });
        Ok(client)
    }

    /// Connects, retrying with exponential backoff (100 ms doubling to 5 s)
    /// for at most `patience`.
    pub async fn connect_with_retry(&self, patience: Duration) -> Result<Client, DbError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut backoff = db_backoff();
        loop {
            match self.connect().await {
                Ok(client) => return Ok(client),
                Err(e) if tokio::time::Instant::now() + backoff.peek() < deadline => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database not reachable yet");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_never_shows_the_password() {
        let db = Database::parse("postgres://writer:s3cret@db.example:6432/umstore")
            .map_err(|e| e.to_string());
        let text = db
            .map(|d| format!("{} {:?}", d.describe(), d))
            .unwrap_or_default();
        assert!(text.contains("writer@db.example:6432/umstore"), "{text}");
        assert!(!text.contains("s3cret"));
    }

    #[test]
    fn garbage_url_is_a_clear_error() {
        let err = Database::parse("postgres://a:b@host:notaport/db")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("invalid database URL"), "{err}");
    }
}
