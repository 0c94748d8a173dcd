//! A private PostgreSQL cluster owned by this process.
//!
//! The data plane's embedded default mode runs its own PostgreSQL (15 or newer) with this
//! crate, and the end-to-end harness (`umstore-e2e`) builds its servers on it. Everything
//! here is synchronous `std::process`: `initdb` once, then `postgres -D <dir>` as a direct
//! child whose lifetime the caller owns (stopped on [`LocalCluster::stop`] and on drop).
//!
//! PostgreSQL refuses to run as root, so when this process runs as root every server
//! binary is started as the unprivileged `postgres` user ([`run_as_postgres_if_root`]) and
//! the data directories are handed to that user ([`chown_to_postgres_if_root`]).

mod binaries;
mod cluster;
mod config;
mod error;
mod lifecycle;
mod privileges;

pub use binaries::PgBinaries;
pub use cluster::{ClusterOptions, LocalCluster, Spawner};
pub use config::quote_conninfo_value;
pub use error::LocalPgError;
pub use privileges::{chown_to_postgres_if_root, is_root, run_as_postgres_if_root, ChildSetup};

#[cfg(test)]
mod tests;
