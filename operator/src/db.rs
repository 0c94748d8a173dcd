//! How the operator reaches a store's PostgreSQL: as the superuser, over the
//! coordinator's Service, for the bootstrap, migrate, distribute and keys steps.
//!
//! In a cluster the address is the Service's DNS name. Tests (and an operator run
//! outside the cluster) map Service hosts to reachable addresses with
//! [`Connector::with_address`]. With a store's TLS ([`Connector::with_tls`], the
//! CA of `spec.postgres.tls.secretName`) every connection is TLS, and the server's
//! certificate must chain to that CA and name the Service host asked for, also when
//! the address map dials somewhere else.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};
use tracing::warn;
pub use umstore_data_plane::db::tls::{PgTls, Verify};

use crate::error::Error;

/// How long a connection attempt may take before the step reports the database
/// unreachable and requeues.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens superuser connections to a store's databases.
#[derive(Clone, Debug, Default)]
pub struct Connector {
    /// `host:port` as the operator computes it → the address to dial instead.
    overrides: HashMap<(String, u16), (String, u16)>,
    /// The store's CA; `None`: plaintext.
    tls: Option<PgTls>,
}

impl Connector {
    /// Dials Services by their in-cluster DNS names.
    pub fn in_cluster() -> Self {
        Self::default()
    }

    /// Dials `to` whenever `host:port` is asked for (a port-forward, a test server).
    pub fn with_address(mut self, host: &str, port: u16, to: (String, u16)) -> Self {
        self.overrides.insert((host.to_string(), port), to);
        self
    }

    /// The same connector, speaking TLS checked against `tls` (a store's CA) when
    /// given, plaintext otherwise.
    pub fn with_tls(mut self, tls: Option<PgTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The TLS connections are made with, if any.
    pub fn tls(&self) -> Option<&PgTls> {
        self.tls.as_ref()
    }

    /// Where `host:port` is dialled.
    pub fn address(&self, host: &str, port: u16) -> (String, u16) {
        self.overrides
            .get(&(host.to_string(), port))
            .cloned()
            .unwrap_or_else(|| (host.to_string(), port))
    }

    /// Connects to `dbname` at `host:port` as `user`; the connection task runs in the
    /// background and ends when the client is dropped. With TLS the certificate must
    /// name `host`, wherever [`Self::with_address`] sends the connection.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        dbname: &str,
        user: &str,
        password: &str,
    ) -> Result<Client, Error> {
        let failed = |source| Error::Database {
            action: format!("connecting to database {dbname} at {host}:{port} as {user}"),
            source,
        };
        let (dial_host, dial_port) = self.address(host, port);
        let mut config = tokio_postgres::Config::new();
        config
            .port(dial_port)
            .dbname(dbname)
            .user(user)
            .password(password)
            .application_name(crate::meta::MANAGER)
            .connect_timeout(CONNECT_TIMEOUT);
        if dial_host == host {
            config.host(host);
        } else {
            // TLS checks the name in `host`; `hostaddr` is where to dial.
            match dial_address(&dial_host, dial_port).await {
                Some(address) => config.host(host).hostaddr(address),
                // Unresolvable: the driver looks it up again and says so.
                None => config.host(&dial_host),
            };
        }
        let client = match &self.tls {
            Some(tls) => {
                config.ssl_mode(SslMode::Require);
                let (client, connection) = config.connect(tls.clone()).await.map_err(failed)?;
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        warn!(%error, "database connection ended with an error");
                    }
                });
                client
            }
            None => {
                let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        warn!(%error, "database connection ended with an error");
                    }
                });
                client
            }
        };
        Ok(client)
    }
}

/// The IP address `host` stands for (the first one it resolves to).
async fn dial_address(host: &str, port: u16) -> Option<IpAddr> {
    if let Ok(ip) = host.parse() {
        return Some(ip);
    }
    tokio::net::lookup_host((host, port))
        .await
        .ok()?
        .next()
        .map(|a| a.ip())
}
