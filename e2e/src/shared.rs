//! One lazily started set of servers per test process.

use std::sync::OnceLock;

use crate::skip::{skip_or_fail, Component};
use crate::{
    Citus, CitusUnavailable, ControlPlane, ControlPlaneUnavailable, HarnessError, KubeApiServer,
    KubeApiUnavailable, Nats, OpenBao, PgBouncer, Postgres, DEFAULT_REPLICAS,
};

/// The process-wide servers; each starts on first use and stops when the process exits
/// (see [`crate::keeper`]). Get it with [`shared()`].
#[derive(Debug, Default)]
pub struct Servers {
    postgres: OnceLock<Result<Postgres, String>>,
    pgbouncer: OnceLock<Result<PgBouncer, String>>,
    nats: OnceLock<Result<Nats, String>>,
    openbao: OnceLock<Result<OpenBao, String>>,
    citus: OnceLock<Result<Citus, (bool, String)>>,
    kube_api: OnceLock<Result<KubeApiServer, (bool, String)>>,
    control_plane: OnceLock<Result<ControlPlane, (bool, String)>>,
}

/// The shared servers of this test process. Cheap: servers start on first use of
/// their accessor. Both `shared().postgres()` and `shared().await.primary()` work (the
/// latter for async code; awaiting resolves at once).
pub fn shared() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(Servers::default)
}

impl std::future::IntoFuture for &'static Servers {
    type Output = &'static Servers;
    type IntoFuture = std::future::Ready<&'static Servers>;

    fn into_future(self) -> Self::IntoFuture {
        std::future::ready(self)
    }
}

fn get<'a, T>(
    cell: &'a OnceLock<Result<T, String>>,
    server: &'static str,
    start: impl FnOnce() -> Result<T, HarnessError>,
) -> Result<&'a T, HarnessError> {
    cell.get_or_init(|| start().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|message| HarnessError::Shared {
            server,
            message: message.clone(),
        })
}

impl Servers {
    /// The shared PostgreSQL primary (its two replicas start on first
    /// [`Postgres::replicas`] use). It also serves TLS, with a certificate for
    /// [`crate::SHARED_TLS_NAMES`] ([`Postgres::tls_ca`]), where the `openssl` CLI
    /// is installed. Blocks while starting.
    pub fn postgres(&self) -> Result<&Postgres, HarnessError> {
        get(&self.postgres, "PostgreSQL", || {
            let started =
                match Postgres::start_serving_tls(DEFAULT_REPLICAS, crate::SHARED_TLS_NAMES) {
                    Err(HarnessError::ProgramNotFound { .. }) => Postgres::start(),
                    started => started,
                };
            Ok(started?.stop_at_exit())
        })
    }

    /// The shared PostgreSQL primary, for tests: panics with the startup error (which
    /// names the log to read) when it cannot start. [`Servers::postgres`] returns it.
    pub fn primary(&self) -> &Postgres {
        match self.postgres() {
            Ok(postgres) => postgres,
            Err(e) => panic!("{e}"),
        }
    }

    /// The shared PgBouncer in front of the shared primary.
    pub fn pgbouncer(&self) -> Result<&PgBouncer, HarnessError> {
        let postgres = self.postgres()?;
        get(&self.pgbouncer, "PgBouncer", || {
            Ok(PgBouncer::start(postgres)?.stop_at_exit())
        })
    }

    /// The shared NATS JetStream server.
    pub fn nats(&self) -> Result<&Nats, HarnessError> {
        get(&self.nats, "nats-server", || {
            Ok(Nats::start()?.stop_at_exit())
        })
    }

    /// The shared OpenBao dev server (transit enabled).
    pub fn openbao(&self) -> Result<&OpenBao, HarnessError> {
        get(&self.openbao, "OpenBao", || {
            Ok(OpenBao::start()?.stop_at_exit())
        })
    }

    /// The shared Citus cluster, or why there is none.
    pub fn citus(&self) -> Result<&Citus, CitusUnavailable> {
        let started = self.citus.get_or_init(|| match Citus::start() {
            Ok(c) => Ok(c.stop_at_exit()),
            Err(CitusUnavailable::Skip(reason)) => Err((true, reason)),
            Err(CitusUnavailable::Failed(e)) => Err((false, e.to_string())),
        });
        match started {
            Ok(citus) => Ok(citus),
            Err((true, reason)) => Err(CitusUnavailable::Skip(reason.clone())),
            Err((false, message)) => Err(CitusUnavailable::Failed(HarnessError::Shared {
                server: "Citus",
                message: message.clone(),
            })),
        }
    }

    /// [`Self::citus`] for a test: `None` after a skip (Citus is exempt, see
    /// [`crate::skip`]); panics when Citus is installed but did not start.
    #[track_caller]
    pub fn citus_or_skip(&self) -> Option<&Citus> {
        match self.citus() {
            Ok(citus) => Some(citus),
            Err(CitusUnavailable::Skip(reason)) => {
                skip_or_fail(Component::Citus, reason);
                None
            }
            Err(e) => panic!("Citus is installed but did not start: {e}"),
        }
    }

    /// [`Self::kube_api`] for a test: `None` after [`skip_or_fail`] when the binaries
    /// are missing; panics when they are here but did not start.
    #[track_caller]
    pub fn kube_api_or_skip(&self) -> Option<&KubeApiServer> {
        match self.kube_api() {
            Ok(server) => Some(server),
            Err(KubeApiUnavailable::Skip(reason)) => {
                skip_or_fail(Component::KubeApiServer, reason);
                None
            }
            Err(e) => panic!("kube-apiserver failed to start: {e}"),
        }
    }

    /// The shared kube-apiserver (and its etcd), or why there is none. Tests sharing it
    /// should each work in their own namespace.
    pub fn kube_api(&self) -> Result<&KubeApiServer, KubeApiUnavailable> {
        let started = self.kube_api.get_or_init(|| match KubeApiServer::start() {
            Ok(server) => Ok(server.stop_at_exit()),
            Err(KubeApiUnavailable::Skip(reason)) => Err((true, reason)),
            Err(KubeApiUnavailable::Failed(e)) => Err((false, e.to_string())),
        });
        match started {
            Ok(server) => Ok(server),
            Err((true, reason)) => Err(KubeApiUnavailable::Skip(reason.clone())),
            Err((false, message)) => Err(KubeApiUnavailable::Failed(HarnessError::Shared {
                server: "kube-apiserver",
                message: message.clone(),
            })),
        }
    }

    /// [`Self::control_plane`] for a test: `None` after [`skip_or_fail`] when a binary
    /// is missing; panics when they are here but did not start.
    #[track_caller]
    pub fn control_plane_or_skip(&self) -> Option<&ControlPlane> {
        match self.control_plane() {
            Ok(control_plane) => Some(control_plane),
            Err(ControlPlaneUnavailable::Skip(reason)) => {
                skip_or_fail(Component::ControlPlane, reason);
                None
            }
            Err(e) => panic!("the kube control plane failed to start: {e}"),
        }
    }

    /// The shared control plane (its own kube-apiserver and etcd, not
    /// [`Self::kube_api`]'s), or why there is none. Tests sharing it should each work
    /// in their own namespace.
    pub fn control_plane(&self) -> Result<&ControlPlane, ControlPlaneUnavailable> {
        let started = self
            .control_plane
            .get_or_init(|| match ControlPlane::start() {
                Ok(control_plane) => Ok(control_plane.stop_at_exit()),
                Err(ControlPlaneUnavailable::Skip(reason)) => Err((true, reason)),
                Err(ControlPlaneUnavailable::Failed(e)) => Err((false, e.to_string())),
            });
        match started {
            Ok(control_plane) => Ok(control_plane),
            Err((true, reason)) => Err(ControlPlaneUnavailable::Skip(reason.clone())),
            Err((false, message)) => Err(ControlPlaneUnavailable::Failed(HarnessError::Shared {
                server: "kube control plane",
                message: message.clone(),
            })),
        }
    }

    /// Creates a uniquely named database on the shared primary; returns its name and a
    /// connection string for it.
    pub async fn fresh_database(&self) -> Result<(String, String), HarnessError> {
        self.postgres()?.fresh_database().await
    }
}
