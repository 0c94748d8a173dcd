//! The data plane's HTTP surface: liveness, readiness, metrics and event ingest;
//! the user API mounts beside them.

pub mod events;
mod health;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use umstore_migrations::Runner;

pub use events::IngestToken;
pub use health::{supervise_database, DbSlot, KeysSlot, Slot};

use crate::ingest::Ingest;
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
    /// The write path, once the keys are open.
    pub ingest: Slot<Ingest>,
    /// The token `POST /api/v1/events` wants; `None` refuses every request.
    pub ingest_token: Option<IngestToken>,
    /// The event bus when one is configured: connected and its streams in place,
    /// or why not. `None`: no bus (HTTP ingest only).
    pub bus: Option<Slot<String>>,
}

/// The router: `/healthz`, `/readyz`, `/metrics`, `POST /api/v1/events`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route(
            "/api/v1/events",
            post(events::post_events).layer(DefaultBodyLimit::max(events::MAX_BODY)),
        )
        .with_state(state)
}
