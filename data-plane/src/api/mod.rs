//! The data plane's HTTP surface: liveness, readiness and metrics, event ingest,
//! and the read API (docs/api.md), behind bearer tokens that map to a purpose.

pub mod auth;
pub mod bodies;
pub mod error;
pub mod events;
mod health;
pub mod openapi;
pub mod pools;
pub mod query;
pub mod users;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderValue;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use umstore_migrations::Runner;

pub use auth::{ApiTokens, Caller};
pub use error::{schema_version, ApiError, SCHEMA_VERSION_HEADER};
pub use health::{supervise_database, DbSlot, KeysSlot, Slot};
pub use pools::ReadPools;

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
    /// The bearer tokens and their purposes.
    pub tokens: Arc<ApiTokens>,
    /// A connection pool per reading purpose.
    pub reads: ReadPools,
    /// Stats leave out groups with fewer users than this (k-anonymity).
    pub stats_min_group: i64,
    /// The event bus when one is configured: connected and its streams in place,
    /// or why not. `None`: no bus (HTTP ingest only).
    pub bus: Option<Slot<String>>,
}

/// Every API answer names the schema version it was read with.
async fn with_schema_version(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(SCHEMA_VERSION_HEADER, HeaderValue::from(schema_version()));
    response
}

/// The router: `/healthz`, `/readyz`, `/metrics`, `POST /api/v1/events` and
/// the read API.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/api/v1/events",
            post(events::post_events).layer(DefaultBodyLimit::max(events::MAX_BODY)),
        )
        .route("/api/v1/user-metadata/query", get(query::find))
        .route("/api/v1/user-metadata/stats", get(query::stats))
        .route("/api/v1/user-metadata/{user_id}", get(users::metadata))
        .route(
            "/api/v1/user-metadata/{user_id}/derived",
            get(users::derived),
        )
        .route(
            "/api/v1/user-metadata/{user_id}/risk-scores",
            get(users::risk_scores),
        )
        .route(
            "/api/v1/user-metadata/{user_id}/eligibility",
            get(users::eligibility),
        )
        .route(
            "/api/v1/user-metadata/{user_id}/history",
            get(users::history),
        )
        .layer(axum::middleware::map_response(with_schema_version));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::serve))
        .merge(api)
        .with_state(state)
}
