//! Liveness, readiness and the metrics endpoint, and the task that keeps a
//! database connection up.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::sync::RwLock;
use tokio_postgres::Client;
use tracing::{info, warn};

use super::AppState;
use crate::crypto::Keyring;
use crate::db::{db_backoff, Database};
use crate::metrics::{HttpLabels, Metrics};

/// A value shared with the handlers once it exists (a database connection,
/// the keyring), or the reason it does not exist yet.
pub struct Slot<T>(Arc<RwLock<Result<Arc<T>, String>>>);

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Slot<T> {
    /// An empty slot, with the reason it is empty.
    pub fn empty(reason: &str) -> Self {
        Self(Arc::new(RwLock::new(Err(reason.to_owned()))))
    }

    /// The value, or why there is none.
    pub async fn get(&self) -> Result<Arc<T>, String> {
        self.0.read().await.clone()
    }

    /// Replaces the value (or the reason there is none).
    pub async fn set(&self, v: Result<Arc<T>, String>) {
        *self.0.write().await = v;
    }
}

/// The connection the handlers use, or the reason there is none.
pub type DbSlot = Slot<Client>;

/// The keyring, once the key provider answered, or the reason there is none.
pub type KeysSlot = Slot<Keyring>;

/// Keeps a connection in `slot`: connects with exponential backoff (100 ms to
/// 5 s), and reconnects when the connection drops. Runs until cancelled.
pub async fn supervise_database(database: Database, slot: DbSlot, metrics: Arc<Metrics>) {
    let mut backoff = db_backoff();
    loop {
        match database.connect().await {
            Ok(client) => {
                info!(database = %database.describe(), "database connected");
                backoff.reset();
                let client = Arc::new(client);
                slot.set(Ok(client.clone())).await;
                metrics.db_connected.set(1);
                while !client.is_closed() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                metrics.db_connected.set(0);
                warn!(database = %database.describe(), "database connection lost; reconnecting");
                slot.set(Err("database connection lost; reconnecting".to_owned()))
                    .await;
            }
            Err(e) => {
                metrics.db_connect_failures.inc();
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database not reachable");
                slot.set(Err(format!("{e}; retrying in {} ms", delay.as_millis())))
                    .await;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn count(metrics: &Metrics, route: &str, status: StatusCode) {
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route: route.to_owned(),
            status: status.as_u16(),
        })
        .inc();
}

/// `GET /healthz`: the process is up.
pub async fn healthz(State(state): State<AppState>) -> Response {
    count(&state.metrics, "/healthz", StatusCode::OK);
    Json(json!({ "status": "ok" })).into_response()
}

/// `GET /readyz`: the database answers, its schema is current and the keys are open.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let expected = state.runner.latest_version();
    let verdict = match state.db.get().await {
        Err(reason) => Err(reason),
        Ok(client) => {
            match tokio::time::timeout(Duration::from_secs(2), state.runner.verify(&client)).await {
                Err(_) => Err("database did not answer within 2 s".to_owned()),
                Ok(Err(e)) if state.no_migrate => Err(format!(
                    "{e} (this data plane runs with --no-migrate and waits for the operator's \
                     migrate step to apply them)"
                )),
                Ok(Err(e)) => Err(e.to_string()),
                // The schema is current; the keys must be open too before we
                // serve, and the bus reached when one is configured.
                Ok(Ok(())) => match state.keys.get().await {
                    Err(reason) => Err(reason),
                    Ok(_) => match &state.bus {
                        None => Ok(()),
                        Some(bus) => bus.get().await.map(|_| ()),
                    }
                    .and_then(|()| placement_read(&state)),
                },
            }
        }
    };
    let (status, body) = match verdict {
        Ok(()) => {
            state.metrics.schema_version.set(i64::from(expected));
            (
                StatusCode::OK,
                json!({ "status": "ready", "schema_version": expected }),
            )
        }
        Err(detail) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "not_ready", "detail": detail, "schema_version": expected }),
        ),
    };
    count(&state.metrics, "/readyz", status);
    (status, Json(body)).into_response()
}

/// With several clusters: whether the region placement was read from the
/// home cluster (nothing is routed before it is).
fn placement_read(state: &AppState) -> Result<(), String> {
    match &state.routing {
        Some(routing) if !routing.placement().is_loaded() => Err(
            "reading the region placement (umstore.region_placement) from the home cluster"
                .to_owned(),
        ),
        _ => Ok(()),
    }
}

/// Rotation progress from `umstore.key_rotations` (one indexed row), so a
/// rotation run by any process shows on every data plane's /metrics.
async fn refresh_rotation_gauges(state: &AppState) {
    let Ok(client) = state.db.get().await else {
        return;
    };
    let query = client.query_opt(crate::store::keys::SELECT_LATEST_ROTATION, &[]);
    if let Ok(Ok(Some(row))) = tokio::time::timeout(Duration::from_secs(1), query).await {
        state
            .metrics
            .key_rotation_target_version
            .set(i64::from(row.get::<_, i32>(0)));
        state
            .metrics
            .key_rotation_rewrapped
            .set(row.get::<_, i64>(1));
        state
            .metrics
            .key_rotation_in_progress
            .set(i64::from(row.get::<_, bool>(2)));
    }
}

/// Each stats view's age from `umstore.stats_refreshes` (a few rows), so a
/// refresh by any process or CronJob shows on every data plane's /metrics.
async fn refresh_stats_view_gauges(state: &AppState) {
    let Ok(client) = state.db.get().await else {
        return;
    };
    let query = client.query(crate::stats::views::SELECT_AGES, &[]);
    if let Ok(Ok(rows)) = tokio::time::timeout(Duration::from_secs(1), query).await {
        for row in rows {
            let view: String = row.get(0);
            state.metrics.stats_view_age(&view, row.get::<_, f64>(1));
        }
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    count(&state.metrics, "/metrics", StatusCode::OK);
    refresh_rotation_gauges(&state).await;
    refresh_stats_view_gauges(&state).await;
    if let Some(cache) = &state.read_cache {
        cache.export_size();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
