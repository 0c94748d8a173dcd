//! umstore's end-to-end test harness.
//!
//! Starts real servers on free loopback ports, in temporary directories, and stops them
//! when their handle drops (also when a test panics):
//!
//! * [`Postgres`]: a PostgreSQL 15+ primary (unix socket and TCP, fsync off) with two
//!   streaming hot-standby replicas, cloned on first use;
//! * [`PgBouncer`] in transaction pooling mode in front of a primary;
//! * [`Nats`]: `nats-server` with JetStream;
//! * [`OpenBao`]: `bao server -dev` with the transit engine enabled;
//! * [`Citus`]: a coordinator and two workers, where `citus.so` is installed (otherwise
//!   [`Citus::start`] returns [`CitusUnavailable::Skip`] with the reason);
//! * [`KubeApiServer`]: a real kube-apiserver (HTTPS, bearer tokens, RBAC, service
//!   accounts) on its own etcd, with a kubeconfig, where both binaries are built
//!   (`scripts/install-deps.sh --test` builds them into `.bin/`; otherwise
//!   [`KubeApiServer::start`] returns [`KubeApiUnavailable::Skip`] with the reason);
//! * [`ControlPlane`]: a [`KubeApiServer`] with kube-controller-manager, kube-scheduler
//!   and kwok, whose fake nodes run pods (StatefulSets reach their ready replicas,
//!   claims bind, deletions cascade), where those binaries are built too;
//! * [`PatroniCluster`]: PostgreSQL servers each run by Patroni (from the venv
//!   `scripts/install-deps.sh --test` makes), with a [`KubeApiServer`] as the DCS;
//! * [`TestCa`]: a throwaway CA and server certificates it signs (the `openssl`
//!   CLI), for PostgreSQL with TLS ([`Postgres::start_serving_tls`]; the shared
//!   primary serves TLS too), and [`forward_from`], which makes a loopback client
//!   look remote (its connections come from 127.0.0.2).
//!
//! A test whose component is missing calls [`skip::skip_or_fail`] and returns: it
//! skips on a developer's machine and fails in CI (`UMSTORE_REQUIRE_COMPONENTS=1`),
//! except for Citus and a real cluster. [`KubeApiServer::start_or_skip`],
//! [`ControlPlane::start_or_skip`] and [`Citus::start_or_skip`] do that for their
//! servers.
//!
//! Starting servers costs seconds, so each test binary normally shares one lazily started
//! set through [`shared()`] and isolates itself with [`Servers::fresh_database`]. Shared
//! servers live in statics that are never dropped; they die with the test process
//! regardless (see [`keeper`] for how).
//!
//! A failing test keeps its directory (server logs included) and prints its path; set
//! `UMSTORE_KEEP_TEST_DIRS=1` to keep every directory.

mod citus;
pub mod controlplane;
mod error;
mod forward;
mod http;
pub mod keeper;
mod kubeapi;
mod nats;
mod openbao;
pub mod patroni;
pub mod pgbackrest;
mod pgbouncer;
mod ports;
mod postgres;
mod process;
mod shared;
pub mod skip;
mod testdir;
mod tls;

pub use citus::{Citus, CitusUnavailable};
pub use controlplane::{ControlPlane, ControlPlaneUnavailable, FakeNode};
pub use error::HarnessError;
pub use forward::forward_from;
pub use kubeapi::{KubeApiServer, KubeApiUnavailable, ADMIN_USER, PLAIN_USER};
pub use nats::Nats;
pub use openbao::OpenBao;
pub use patroni::{MemberSpec, PatroniCluster, PatroniUnavailable};
pub use pgbackrest::{PgBackRest, PgBackRestServer};
pub use pgbouncer::PgBouncer;
pub use ports::free_port;
pub use postgres::{connect, Postgres, DEFAULT_REPLICAS, SHARED_TLS_NAMES};
pub use shared::{shared, Servers};
pub use testdir::TestDir;
pub use tls::{ServerCert, TestCa};
pub use tokio_postgres::types::PgLsn;
pub use umstore_localpg as localpg;
