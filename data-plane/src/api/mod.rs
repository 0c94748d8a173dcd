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
pub mod routing;
pub mod users;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
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
    /// Stats are read from the materialized views while they are at most
    /// this old; zero: always from the tables.
    pub stats_max_age: std::time::Duration,
    /// Stats read from the tables over at least this many rows are grouped
    /// on the bulk engine instead of by a `GROUP BY` (`--stats-engine-rows`);
    /// `None`: never.
    pub stats_engine: Option<StatsEngine>,
    /// The event bus when one is configured: connected and its streams in place,
    /// or why not. `None`: no bus (HTTP ingest only).
    pub bus: Option<Slot<String>>,
    /// The cache of one-user answers (`--read-cache-entries` above 0).
    pub read_cache: Option<crate::read_cache::ReadCache>,
    /// A store with several clusters (`--clusters` with two or more): each
    /// cluster's read pools and the route lookups. `None`: one cluster, read
    /// through [`Self::reads`].
    pub routing: Option<routing::Routing>,
}

/// Large stats scans grouped on the bulk engine (`serve --stats-engine-rows`,
/// docs/bulk.md): the rows copied out of the replica, grouped in this process.
#[derive(Clone)]
pub struct StatsEngine {
    /// The engine's aggregator.
    pub aggregator: Arc<dyn crate::bulk::aggregate::Aggregator>,
    /// Scans of at least this many rows, by the planner's estimate, use it.
    pub min_rows: u64,
}

/// Every API answer names the schema version it was read with.
async fn with_schema_version(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(SCHEMA_VERSION_HEADER, HeaderValue::from(schema_version()));
    response
}

/// Times each read API request into `umstore_read_duration_seconds{route}`, by
/// route template (a bounded set of labels).
async fn timed_read(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    if let Some(route) = route {
        metrics.read_answered(&route, started.elapsed());
    }
    response
}

/// The read API's routes, each request timed.
fn read_routes(metrics: Arc<Metrics>) -> Router<AppState> {
    Router::new()
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
        .route_layer(axum::middleware::from_fn_with_state(metrics, timed_read))
}

/// The router: `/healthz`, `/readyz`, `/metrics`, `POST /api/v1/events` and
/// the read API.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/api/v1/events",
            post(events::post_events).layer(DefaultBodyLimit::max(events::MAX_BODY)),
        )
        .merge(read_routes(state.metrics.clone()))
        .layer(axum::middleware::map_response(with_schema_version));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::serve))
        .merge(api)
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_read_is_timed_under_its_route_template() {
        let metrics = Arc::new(Metrics::new());
        let app: Router = Router::new()
            .route("/api/v1/user-metadata/{user_id}", get(|| async { "ok" }))
            .route_layer(axum::middleware::from_fn_with_state(
                metrics.clone(),
                timed_read,
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        for user in ["u1", "u2"] {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let request = format!(
                "GET /api/v1/user-metadata/{user} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut response = String::new();
            stream.read_to_string(&mut response).await.expect("read");
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        }
        let body = metrics.encode();
        let line =
            "umstore_read_duration_seconds_count{route=\"/api/v1/user-metadata/{user_id}\"} 2";
        assert!(body.contains(line), "missing `{line}` in {body}");
    }
}
