//! `POST /api/v1/events`: one event (a JSON object) or a batch (an array of up to
//! [`MAX_BATCH`]), applied through the same pipeline as the bus. The answer lists,
//! per event, `applied`, `duplicate`, `stale`, `rejected` (with the reason; send
//! it again only once fixed) or `failed` (the store could not apply it now; send
//! it again later). For the `writer` purpose's token only.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde_json::{json, Value};

use super::bodies::{ErrorBody, EventsBody, Settled};
use super::{ApiError, AppState, Caller};
use crate::ingest::event;
use crate::ingest::{ApplyError, Outcome};
use umstore_migrations::roles::Purpose;

/// The most events one request may carry.
pub const MAX_BATCH: usize = 500;
/// The largest body accepted.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// How long an event whose region is moving between clusters is tried again
/// before the caller is told to send it later: a move's write fence lasts a
/// second or two, so the caller sees a slower answer, not a failure.
const MOVE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

fn problem(status: StatusCode, error: &str, detail: impl Into<String>) -> Response {
    (
        status,
        Json(json!({
            "error": error,
            "detail": detail.into(),
            "schema_version": super::schema_version(),
        })),
    )
        .into_response()
}

/// The handler.
#[utoipa::path(
    post,
    path = "/api/v1/events",
    tag = "events",
    security(("bearer" = [])),
    request_body(
        content = Object,
        description = "One event, or an array of 1 to 500 (docs/events.md; JSON Schemas in docs/events/schemas)",
        content_type = "application/json"
    ),
    responses(
        (status = 200, description = "Each event's result (a batch, or one event not refused)", body = EventsBody,
         headers(("X-Lsn" = String, description = "Send as X-Min-Lsn to read these writes"))),
        (status = 422, description = "One event (not an array), refused", body = EventsBody),
        (status = 503, description = "An event failed (send it again later), or not ready", body = EventsBody),
        (status = 400, description = "Not JSON, or an empty or oversized batch", body = ErrorBody),
        (status = 401, description = "No token, or an unknown one", body = ErrorBody),
        (status = 403, description = "Not the writer's token", body = ErrorBody),
        (status = 413, description = "The body is over 4 MiB", body = ErrorBody),
    )
)]
pub async fn post_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = match state.tokens.purpose_of(&headers) {
        Some(purpose) => Caller(purpose),
        None => return ApiError::Unauthorized.into_response(),
    };
    if let Err(refused) = caller.require(&[Purpose::Writer]) {
        return refused.into_response();
    }
    if body.len() > MAX_BODY {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a request carries at most {MAX_BODY} bytes; split the batch"),
        );
    }
    let ingest = match state.ingest.get().await {
        Ok(i) => i,
        Err(reason) => {
            return problem(StatusCode::SERVICE_UNAVAILABLE, "not_ready", reason);
        }
    };
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "malformed",
                format!("the body is not JSON: {e}"),
            )
        }
    };
    let (single, items) = match parsed {
        Value::Array(items) => (false, items),
        other => (true, vec![other]),
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_batch",
            format!("send one event or an array of 1 to {MAX_BATCH}"),
        );
    }
    let now = Utc::now();
    let mut results = Vec::with_capacity(items.len());
    // The clusters an applied event was written to (read-your-writes).
    let mut touched = std::collections::BTreeSet::new();
    for item in items {
        let id = item
            .get("event_id")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse().ok());
        let settled = match event::from_value(item, now) {
            Err(r) => {
                ingest.count_rejected();
                Settled {
                    event_id: id,
                    status: "rejected",
                    version: None,
                    reason: Some(r.to_string()),
                }
            }
            Ok(ev) => match ingest.apply_through_moves(&ev, MOVE_PATIENCE).await {
                Ok(outcome) => {
                    if matches!(outcome, Outcome::Applied { .. }) {
                        touched.extend(ingest.cluster_of(ev.region));
                    }
                    Settled {
                        event_id: Some(ev.event_id),
                        status: outcome.as_str(),
                        version: match outcome {
                            Outcome::Applied { version } => version,
                            _ => None,
                        },
                        reason: None,
                    }
                }
                Err(ApplyError::Rejected(r)) => Settled {
                    event_id: Some(ev.event_id),
                    status: "rejected",
                    version: None,
                    reason: Some(r.to_string()),
                },
                Err(ApplyError::Transient(m) | ApplyError::RegionMoving { message: m, .. }) => {
                    tracing::warn!(event_id = %ev.event_id, reason = %m, "event not applied");
                    Settled {
                        event_id: Some(ev.event_id),
                        status: "failed",
                        version: None,
                        reason: Some(
                            "the store could not apply it now; send it again later".into(),
                        ),
                    }
                }
            },
        };
        results.push(settled);
    }
    let failed = results.iter().any(|r| r.status == "failed");
    let status = if failed {
        StatusCode::SERVICE_UNAVAILABLE
    } else if single && results[0].status == "rejected" {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    // Where a read must be to see these writes (read-your-writes, X-Min-Lsn).
    let lsn = if touched.is_empty() {
        None
    } else {
        ingest.wal_token(&touched).await
    };
    let header = lsn
        .as_deref()
        .and_then(|l| axum::http::HeaderValue::from_str(l).ok());
    let mut response = (
        status,
        Json(EventsBody {
            results,
            lsn,
            schema_version: super::schema_version(),
        }),
    )
        .into_response();
    if let Some(value) = header {
        response.headers_mut().insert("x-lsn", value);
    }
    response
}
