//! The data plane's HTTP surface. This module holds liveness, readiness and
//! metrics; the user API mounts beside them.

mod health;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use umstore_migrations::Runner;

pub use health::{supervise_database, DbSlot, KeysSlot, Slot};

use crate::metrics::Metrics;

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// The current database connection, if any, and why not.
    pub db: DbSlot,
    /// The keyring once the key provider is up, or why not.
    pub keys: KeysSlot,
    /// The migrations this binary expects.
    pub runner: Arc<Runner>,
    /// Started with `--no-migrate`: someone else (the operator) applies the schema.
    pub no_migrate: bool,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
}

/// The router: `/healthz`, `/readyz`, `/metrics`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .with_state(state)
}
