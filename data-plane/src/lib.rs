//! umstore data plane: keeps the encrypted, temporal record per user and
//! serves it. Modules are split by what they do: [`crypto`] (key providers,
//! envelope, blind index), [`seed`] (synthetic users), [`embedded`] (the
//! embedded PostgreSQL of local runs, on `umstore-localpg`), [`api`] (HTTP:
//! health, readiness, metrics, the read API), [`read_cache`] (the read API's
//! cache and its invalidation by the outbound events), [`stats`] (the
//! materialized stats views: partials, merge, refresh), [`db`] (connections),
//! [`clusters`] (the layout of a store with several clusters).

pub mod api;
pub mod backoff;
pub mod bulk;
pub mod clusters;
pub mod crypto;
pub mod db;
pub mod derive;
pub mod embedded;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod read_cache;
pub mod seed;
pub mod stats;
pub mod store;
