//! The OpenAPI 3.1 document of the API, generated from the handlers and their
//! body types; served at `/openapi.json` and committed as docs/openapi.json (a
//! test fails when the two differ).

use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{events, query, users};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "umstore data plane",
        description = "One user's metadata (now or as of any time), derived attributes, risk \
                       scores, eligibility and history; users by attributes; anonymized stats; \
                       events in. Every call carries a bearer token that maps to a purpose \
                       (writer, ai, rules, json-generator, dashboard, analytics, admin); the \
                       purpose decides what may be called, the database login a read runs as, \
                       and whether PII is decrypted. See docs/api.md."
    ),
    paths(
        users::metadata,
        users::derived,
        users::risk_scores,
        users::eligibility,
        users::history,
        query::find,
        query::stats,
        events::post_events,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "users", description = "One user, or users by attributes"),
        (name = "stats", description = "Anonymized aggregates"),
        (name = "events", description = "Events in, for producers without the bus"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A purpose's token: docs/api.md says where each purpose's comes from",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// The document as pretty JSON, as committed in docs/openapi.json.
pub fn openapi_json() -> String {
    // Serializing a document of plain values cannot fail.
    let mut text = openapi().to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

/// `GET /openapi.json`.
pub async fn serve() -> Response {
    Json(openapi()).into_response()
}
