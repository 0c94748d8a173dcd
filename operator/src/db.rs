//! How the operator reaches a store's PostgreSQL: as the superuser, over the
//! coordinator's Service, for the bootstrap and migrate steps.
//!
//! In a cluster the address is the Service's DNS name. Tests (and an operator run
//! outside the cluster) map Service hosts to reachable addresses with
//! [`Connector::with_address`].

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use tracing::warn;

use crate::error::Error;

/// How long a connection attempt may take before the step reports the database
/// unreachable and requeues.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens superuser connections to a store's databases.
#[derive(Clone, Debug, Default)]
pub struct Connector {
    /// `host:port` as the operator computes it → the address to dial instead.
    overrides: HashMap<(String, u16), (String, u16)>,
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

    /// Where `host:port` is dialled.
    pub fn address(&self, host: &str, port: u16) -> (String, u16) {
        self.overrides
            .get(&(host.to_string(), port))
            .cloned()
            .unwrap_or_else(|| (host.to_string(), port))
    }

    /// Connects to `dbname` at `host:port` as `user`; the connection task runs in the
    /// background and ends when the client is dropped.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        dbname: &str,
        user: &str,
        password: &str,
    ) -> Result<Client, Error> {
        let (dial_host, dial_port) = self.address(host, port);
        let mut config = tokio_postgres::Config::new();
        config
            .host(&dial_host)
            .port(dial_port)
            .dbname(dbname)
            .user(user)
            .password(password)
            .application_name(crate::meta::MANAGER)
            .connect_timeout(CONNECT_TIMEOUT);
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| Error::Database {
                    action: format!("connecting to database {dbname} at {host}:{port} as {user}"),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                warn!(%error, "database connection ended with an error");
            }
        });
        Ok(client)
    }
}
