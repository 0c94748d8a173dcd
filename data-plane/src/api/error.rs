//! The API's one error shape: `{"error": <code>, "detail": <what to do>,
//! "schema_version": <n>}`, with the status that says who must act.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

/// The response header naming the schema version this server reads.
pub const SCHEMA_VERSION_HEADER: &str = "x-schema-version";

/// The schema version this binary reads and writes (its newest migration; a
/// server answers only once the database is at it).
pub fn schema_version() -> u32 {
    static VERSION: OnceLock<u32> = OnceLock::new();
    *VERSION.get_or_init(|| umstore_migrations::Runner::default().latest_version())
}

/// Why a request was not answered.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No bearer token, or one this server does not know.
    #[error("send a token as `Authorization: Bearer <token>`; this one is missing or unknown")]
    Unauthorized,
    /// The token's purpose may not use this endpoint.
    #[error("{}", forbidden_detail(*.purpose, .allowed))]
    Forbidden {
        /// The caller's purpose.
        purpose: Purpose,
        /// The purposes the endpoint serves.
        allowed: Vec<Purpose>,
    },
    /// A parameter is wrong; the detail names it and what is expected.
    #[error("{detail}")]
    BadRequest {
        /// A stable code (`invalid_user_id`, `invalid_parameter`, ...).
        code: &'static str,
        /// What is wrong and what to send instead.
        detail: String,
    },
    /// No such user (or none at that time).
    #[error("{0}")]
    NotFound(String),
    /// The user was erased (crypto-shredded): nothing of them can be read.
    #[error("user {user_id} was erased at {erased_at}; their data is gone for good")]
    Gone {
        /// The user.
        user_id: Uuid,
        /// When.
        erased_at: String,
    },
    /// The server cannot answer now (database or keys not ready, a purpose
    /// without a database login); the detail says what is missing.
    #[error("{0}")]
    Unavailable(String),
    /// Something failed inside; logged with its cause, never with PII.
    #[error("the store failed to answer; the data plane's log has the cause (request at {0})")]
    Internal(String),
}

fn forbidden_detail(purpose: Purpose, allowed: &[Purpose]) -> String {
    let names: Vec<&str> = allowed.iter().map(|p| p.slug()).collect();
    format!(
        "this endpoint serves the purposes {}; the token is for {}",
        names.join(", "),
        purpose.slug()
    )
}

impl ApiError {
    /// An invalid parameter.
    pub fn bad(code: &'static str, detail: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            detail: detail.into(),
        }
    }

    /// A failure inside: logs `cause` (which must hold no PII) and answers 500.
    pub fn internal(what: &str, cause: &(dyn std::error::Error + 'static)) -> Self {
        // The whole chain: a database error says what it is only in its source.
        let mut chain = cause.to_string();
        let mut next = cause.source();
        while let Some(e) = next {
            chain.push_str(": ");
            chain.push_str(&e.to_string());
            next = e.source();
        }
        tracing::error!(error = %chain, "{what}");
        Self::Internal(chrono::Utc::now().to_rfc3339())
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            Self::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Gone { .. } => (StatusCode::GONE, "erased"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = json!({
            "error": code,
            "detail": self.to_string(),
            "schema_version": schema_version(),
        });
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
