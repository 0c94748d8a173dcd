//! Database connections: parsing the URL, connecting with retries, over TLS when
//! the URL's `sslmode` asks for it (see [`ssl_options`] and [`tls`]).

pub mod ssl_options;
pub mod tls;

use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;
use tokio_postgres::{Client, Config, NoTls};
use tracing::{debug, warn};

use self::tls::PgTls;
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
    /// The URL's TLS settings are incomplete, or its root certificate unusable.
    #[error("database URL: {0}")]
    Tls(String),
    /// The server could not be reached or refused the login.
    #[error("cannot connect to {target}: {}", with_causes(source))]
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
    /// `None`: plaintext (`sslmode` disable, allow, prefer or absent).
    tls: Option<PgTls>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Database {
    /// Parses a `postgres://` URL or a key=value conninfo string. `sslmode`
    /// `require`, `verify-ca` and `verify-full` connect over TLS, checking the
    /// server against the CA file `sslrootcert` as libpq does (`require` without
    /// it checks nothing); `disable`, `allow` and `prefer` connect in plaintext.
    /// The root certificate is read here, once.
    pub fn parse(url: &str) -> Result<Self, DbError> {
        let (url, ssl) = ssl_options::split(url).map_err(DbError::Tls)?;
        let mut config = Config::from_str(&url).map_err(DbError::InvalidUrl)?;
        if config.get_application_name().is_none() {
            config.application_name("umstore-data-plane");
        }
        config.connect_timeout(Duration::from_secs(5));
        let (mode, tls) = ssl.resolve().map_err(DbError::Tls)?;
        config.ssl_mode(mode);
        Ok(Self { config, tls })
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

    /// The parsed connection settings.
    pub fn pg_config(&self) -> &Config {
        &self.config
    }

    /// The connection settings, to change (a login user, an application name);
    /// the TLS settings stay.
    pub fn pg_config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// The TLS connections are made with; `None` for plaintext.
    pub fn tls(&self) -> Option<&PgTls> {
        self.tls.as_ref()
    }

    /// A connection pool manager for these settings and this TLS.
    pub fn pool_manager(
        &self,
        manager: deadpool_postgres::ManagerConfig,
    ) -> deadpool_postgres::Manager {
        let config = self.config.clone();
        match &self.tls {
            Some(tls) => deadpool_postgres::Manager::from_config(config, tls.clone(), manager),
            None => deadpool_postgres::Manager::from_config(config, NoTls, manager),
        }
    }

    /// The same login (user, password, TLS settings, options) on another
    /// server: `host` and `port`, and `dbname` when given (else this one's).
    /// What a store with several clusters does with each per-purpose URL.
    pub fn at(&self, host: &str, port: u16, dbname: Option<&str>) -> Self {
        let old = &self.config;
        let mut config = Config::new();
        if let Some(user) = old.get_user() {
            config.user(user);
        }
        if let Some(password) = old.get_password() {
            config.password(password);
        }
        if let Some(db) = dbname.or(old.get_dbname()) {
            config.dbname(db);
        }
        if let Some(options) = old.get_options() {
            config.options(options);
        }
        if let Some(name) = old.get_application_name() {
            config.application_name(name);
        }
        if let Some(timeout) = old.get_connect_timeout() {
            config.connect_timeout(*timeout);
        }
        if let Some(timeout) = old.get_tcp_user_timeout() {
            config.tcp_user_timeout(*timeout);
        }
        config
            .ssl_mode(old.get_ssl_mode())
            .ssl_negotiation(old.get_ssl_negotiation())
            .keepalives(old.get_keepalives())
            .keepalives_idle(old.get_keepalives_idle())
            .target_session_attrs(old.get_target_session_attrs())
            .channel_binding(old.get_channel_binding())
            .host(host)
            .port(port);
        if let Some(interval) = old.get_keepalives_interval() {
            config.keepalives_interval(interval);
        }
        if let Some(retries) = old.get_keepalives_retries() {
            config.keepalives_retries(retries);
        }
        Self {
            config,
            tls: self.tls.clone(),
        }
    }

    /// Connects once; the connection runs on a spawned task.
    pub async fn connect(&self) -> Result<Client, DbError> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()).await.map(|(client, c)| {
                tokio::spawn(drive(c));
                client
            }),
            None => self.config.connect(NoTls).await.map(|(client, c)| {
                tokio::spawn(drive(c));
                client
            }),
        };
        connected.map_err(|source| DbError::Connect {
            target: self.describe(),
            source,
        })
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

/// `error` followed by each of its sources, `: `-separated: tokio-postgres's
/// message names only the kind of failure, its source the server's message or
/// the TLS verification failure.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

/// Runs a connection until it closes.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        debug!(error = %e, "database connection closed");
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
    fn sslmode_picks_the_tls_and_the_drivers_mode() {
        use tokio_postgres::config::SslMode;
        let db = Database::parse("postgres://w@h/db?sslmode=require").expect("parses");
        assert_eq!(db.pg_config().get_ssl_mode(), SslMode::Require);
        assert_eq!(db.tls().map(|t| t.verify()), Some(tls::Verify::Nothing));
        let db = Database::parse("host=h user=w dbname=db").expect("parses");
        assert_eq!(db.pg_config().get_ssl_mode(), SslMode::Prefer);
        assert!(db.tls().is_none(), "no TLS unless asked for");
        let err = Database::parse("postgres://w@h/db?sslmode=verify-ca")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("sslmode=verify-ca needs sslrootcert"), "{err}");
    }

    #[test]
    fn another_server_keeps_the_login_and_its_tls() {
        let db = Database::parse(
            "postgres://ai:s3cret@users-pgbouncer:6432/umstore?sslmode=require&application_name=x",
        )
        .expect("parses");
        let south = db.at("users-south-coordinator", 5432, None);
        let c = south.pg_config();
        assert_eq!(south.describe(), "ai@users-south-coordinator:5432/umstore");
        assert_eq!(c.get_hosts().len(), 1);
        assert_eq!(c.get_ports(), &[5432]);
        assert_eq!(c.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(c.get_application_name(), Some("x"));
        assert_eq!(c.get_ssl_mode(), db.pg_config().get_ssl_mode());
        assert!(south.tls().is_some());
        let other = db.at("h", 1, Some("other"));
        assert_eq!(other.describe(), "ai@h:1/other");
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
