//! `GET /api/v1/user-metadata/{user_id}[/derived|/risk-scores|/eligibility|/history]`:
//! one user, read as the caller's purpose (its database login), PII decrypted
//! only for the purposes that may see it.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use umstore_migrations::roles::Purpose;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::auth::Caller;
use super::bodies::{
    Attributes, DerivedBody, EligibilityBody, ErrorBody, HistoryBody, RiskScoresBody, UserMetadata,
};
use super::error::{schema_version, ApiError};
use super::pools::{Lsn, MinLsn, Served, MIN_LSN_HEADER, SERVED_BY_HEADER};
use super::AppState;
use crate::crypto::{FieldAad, Keyring, UserKey};
use crate::read_cache::{Entry, Verify};
use crate::store::reader::{Hinted, ReadTx};
use crate::store::reads::{self, Cursor, Found};
use crate::store::users::{self, AsOf, ReadError, UserRecord};

use Purpose::{Admin, Ai, Dashboard, JsonGenerator, Rules};

/// Who may read one user's metadata, derived attributes, risk scores and
/// eligibility.
pub const USER_READERS: &[Purpose] = &[Ai, Rules, JsonGenerator, Dashboard, Admin];
/// Who may read a user's change history.
pub const HISTORY_READERS: &[Purpose] = &[Ai, JsonGenerator, Dashboard, Admin];

/// The errors every per-user read may answer with (its OpenAPI responses).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum UserReadErrors {
    /// A malformed id, parameter or header
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No token, or an unknown one
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token's purpose may not use this endpoint
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such user
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The user was erased (crypto-shredded)
    #[response(status = 410)]
    Gone(ErrorBody),
    /// Not ready, or no database login for the purpose
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// Whether `purpose` sees PII in clear (the rest get every other attribute).
pub fn sees_pii(purpose: Purpose) -> bool {
    matches!(purpose, Ai | JsonGenerator | Dashboard | Admin)
}

/// The default and largest history page.
pub const HISTORY_PAGE: u32 = 50;
/// The largest history page one request may ask for.
pub const HISTORY_PAGE_MAX: u32 = 500;

fn user_id(raw: &str) -> Result<Uuid, ApiError> {
    // Only the hyphenated form: one spelling per user in URLs and logs.
    if raw.len() != 36 {
        return Err(invalid_id(raw));
    }
    raw.parse().map_err(|_| invalid_id(raw))
}

fn invalid_id(raw: &str) -> ApiError {
    let shown: String = raw.chars().take(64).collect();
    ApiError::bad(
        "invalid_user_id",
        format!(
            "{shown:?} is not a user id: send a UUID such as \
             3f2b8c1e-9d4a-4e6b-8a1f-2c3d4e5f6a7b"
        ),
    )
}

/// Refuses parameters other than `allowed`, naming the ones that are valid.
pub fn only(params: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    let mut unknown: Vec<&str> = params
        .keys()
        .map(String::as_str)
        .filter(|k| !allowed.contains(k))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort_unstable();
    let valid = if allowed.is_empty() {
        "this endpoint takes none".to_owned()
    } else {
        format!("valid: {}", allowed.join(", "))
    };
    Err(ApiError::bad(
        "unknown_parameter",
        format!("unknown query parameter(s) {}; {valid}", unknown.join(", ")),
    ))
}

/// A 200 answer: `body` with the schema version, and which server answered.
pub fn respond(served: Served, body: impl serde::Serialize) -> Response {
    let mut response = Json(body).into_response();
    response
        .headers_mut()
        .insert(SERVED_BY_HEADER, HeaderValue::from_static(served.as_str()));
    response
}

fn read_failed(e: ReadError) -> ApiError {
    // ReadError names the user and the failing step; never a value.
    ApiError::internal("a read failed", &e)
}

fn unknown(user_id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no user {user_id} in this store"))
}

fn gone_or<T>(user_id: Uuid, found: Option<Found<T>>) -> Result<Found<T>, ApiError> {
    let found = found.ok_or_else(|| unknown(user_id))?;
    match found.erased_at {
        Some(erased_at) => Err(ApiError::Gone { user_id, erased_at }),
        None => Ok(found),
    }
}

/// The caller's read-your-writes position (`X-Min-Lsn`), if sent: one WAL
/// position, or (a store with several clusters) one per cluster.
fn min_lsn(state: &AppState, headers: &HeaderMap) -> Result<Option<MinLsn>, ApiError> {
    let Some(v) = headers.get(MIN_LSN_HEADER) else {
        return Ok(None);
    };
    let text = v.to_str().ok();
    let parsed = match &state.routing {
        // One cluster: exactly one position, as always.
        None => text.and_then(|v| v.parse::<Lsn>().ok()).map(MinLsn::Any),
        Some(_) => text.and_then(|v| v.parse::<MinLsn>().ok()),
    };
    parsed.map(Some).ok_or_else(|| {
        ApiError::bad(
            "invalid_header",
            "X-Min-Lsn is a WAL position such as 0/16B3740 (with several clusters, \
             cluster:position pairs such as home:0/16B3740,south:0/3000060): send the `lsn` \
             a write returned",
        )
    })
}

/// A connection for `purpose`, honouring the caller's read-your-writes
/// position; with several clusters, on the home cluster.
pub async fn connection(
    state: &AppState,
    purpose: Purpose,
    headers: &HeaderMap,
) -> Result<(deadpool_postgres::Object, Served), ApiError> {
    cluster_connection(state, purpose, headers, 0).await
}

/// [`connection`] on cluster `index` of a store with several clusters (the
/// only one otherwise).
pub async fn cluster_connection(
    state: &AppState,
    purpose: Purpose,
    headers: &HeaderMap,
    index: usize,
) -> Result<(deadpool_postgres::Object, Served), ApiError> {
    let min = min_lsn(state, headers)?;
    match &state.routing {
        None => {
            let lsn = match min {
                Some(MinLsn::Any(lsn)) => Some(lsn),
                _ => None,
            };
            state.reads.get(purpose, lsn).await
        }
        Some(routing) => {
            routing.count(index);
            let lsn = min.and_then(|m| m.for_cluster(routing.name(index)));
            routing.pools(index).get(purpose, lsn).await
        }
    }
}

/// A connection for reading one user: with several clusters, on the user's
/// cluster, found through the routing index.
pub struct UserConnection {
    /// The connection.
    pub client: deadpool_postgres::Object,
    /// Which server it reaches.
    pub served: Served,
    /// With several clusters: the cluster's name and the user's region.
    pub routed: Option<(String, String)>,
}

impl UserConnection {
    /// The user's region when the routing index gave it.
    pub fn region(&self) -> Option<String> {
        self.routed.as_ref().map(|(_, r)| r.clone())
    }

    /// Adds `X-Cluster` (several clusters only).
    pub fn tag(&self, response: &mut Response) {
        if let Some((cluster, _)) = &self.routed {
            tag_cluster(response, cluster);
        }
    }
}

/// The response header naming the cluster that answered a one-user read
/// (a store with several clusters only).
pub const CLUSTER_HEADER: &str = "x-cluster";

fn tag_cluster(response: &mut Response, cluster: &str) {
    if let Ok(v) = HeaderValue::from_str(cluster) {
        response.headers_mut().insert(CLUSTER_HEADER, v);
    }
}

/// The connection for a read of `user_id`; a 404 when no cluster holds them.
pub async fn user_connection(
    state: &AppState,
    purpose: Purpose,
    headers: &HeaderMap,
    user_id: Uuid,
) -> Result<UserConnection, ApiError> {
    let Some(routing) = &state.routing else {
        let (client, served) = connection(state, purpose, headers).await?;
        return Ok(UserConnection {
            client,
            served,
            routed: None,
        });
    };
    let min = min_lsn(state, headers)?;
    let found = routing
        .locate(purpose, user_id)
        .await?
        .ok_or_else(|| unknown(user_id))?;
    let name = routing.name(found.cluster).to_owned();
    routing.count(found.cluster);
    let lsn = min.and_then(|m| m.for_cluster(&name));
    let (client, served) = routing.pools(found.cluster).get(purpose, lsn).await?;
    Ok(UserConnection {
        client,
        served,
        routed: Some((name, found.region)),
    })
}

/// Every read runs in a read-only transaction: one server connection for all
/// its statements, also through PgBouncer in transaction mode.
pub async fn read_only(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, ApiError> {
    client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(|e| ApiError::internal("starting a read", &e))
}

/// Ends a read.
pub async fn finish(tx: deadpool_postgres::Transaction<'_>) -> Result<(), ApiError> {
    tx.commit()
        .await
        .map_err(|e| ApiError::internal("ending a read", &e))
}

async fn keyring(state: &AppState) -> Result<std::sync::Arc<Keyring>, ApiError> {
    state.keys.get().await.map_err(ApiError::Unavailable)
}

fn record_body(
    record: UserRecord,
    with_pii: bool,
    as_of: Option<DateTime<Utc>>,
) -> Result<UserMetadata, ApiError> {
    let attributes: Attributes = serde_json::from_value(record.attributes)
        .map_err(|e| ApiError::internal("a stored row has an unexpected shape", &e))?;
    Ok(UserMetadata {
        schema_version: schema_version(),
        user_id: record.user_id,
        region: record.region,
        version: record.version,
        updated_at: record.updated_at,
        as_of: as_of.map(|t| t.to_rfc3339()),
        pii_included: with_pii,
        pii: if with_pii { record.pii } else { None },
        attributes,
    })
}

/// `GET /api/v1/user-metadata/{user_id}[?as_of=<RFC 3339>]`.
#[utoipa::path(
    get,
    path = "/api/v1/user-metadata/{user_id}",
    tag = "users",
    security(("bearer" = [])),
    params(
        ("user_id" = Uuid, Path, description = "The user's id (a UUID, hyphenated)"),
        ("X-Min-Lsn" = Option<String>, Header, description = "Read at least this WAL position (the `lsn` a write returned; with several clusters, cluster:position pairs)"),
        ("as_of" = Option<String>, Query, description = "An RFC 3339 time: the user as they were then"),
    ),
    responses(
        (status = 200, description = "The user now, or as of a time", body = UserMetadata,
         headers(("X-Served-By" = String, description = "primary, replica, or cache (the process's read cache)"),
                 ("X-Cluster" = String, description = "With several clusters: the cluster that holds the user"),
                 ("X-Read-Cache" = String, description = "With the read cache on: hit, miss or bypass"),
                 ("X-Schema-Version" = u32, description = "The schema version"))),
        UserReadErrors,
    )
)]
pub async fn metadata(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let purpose = caller.require(USER_READERS)?;
    let user_id = user_id(&raw)?;
    only(&params, &["as_of"])?;
    let as_of = params
        .get("as_of")
        .map(|t| {
            DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    ApiError::bad(
                        "invalid_parameter",
                        format!(
                            "as_of {t:?} is not an RFC 3339 time ({e}); send e.g. \
                             2026-01-31T12:00:00Z"
                        ),
                    )
                })
        })
        .transpose()?;
    // The cache answers "now" only, and never a read-your-writes request: its
    // entry may predate the caller's write (docs/api.md, "Read cache").
    let cache = match &state.read_cache {
        Some(cache) if as_of.is_none() && !headers.contains_key(MIN_LSN_HEADER) => {
            if cache.is_live() {
                Some(cache)
            } else {
                cache.count_bypass();
                None
            }
        }
        Some(cache) => {
            cache.count_bypass();
            None
        }
        None => None,
    };
    let mut held = None;
    let mut ticket = None;
    if let Some(cache) = cache {
        if let Some(entry) = cache.lookup(purpose, user_id).await {
            match cache.config().verify {
                Verify::None => {
                    cache.count_hit(&entry);
                    return cached_tagged(&state, &entry);
                }
                Verify::Version => {
                    // The entry names the region: its cluster needs no route lookup.
                    let index = match &state.routing {
                        Some(routing) => routing.cluster_of(&entry.region)?,
                        None => 0,
                    };
                    let (client, served) =
                        cluster_connection(&state, purpose, &headers, index).await?;
                    let current = current_version(&client, served, user_id, &entry.region).await?;
                    if current == Some(entry.version) {
                        cache.count_hit(&entry);
                        return cached_tagged(&state, &entry);
                    }
                    // Changed or erased since: read it as a miss would.
                    cache.invalidate_one(purpose, user_id).await;
                    held = Some(UserConnection {
                        client,
                        served,
                        routed: state
                            .routing
                            .as_ref()
                            .map(|r| (r.name(index).to_owned(), entry.region.clone())),
                    });
                }
            }
        }
        cache.count_miss();
        ticket = Some(cache.ticket());
    }
    let keyring = keyring(&state).await?;
    let mut conn = match held {
        Some(held) => held,
        None => user_connection(&state, purpose, &headers, user_id).await?,
    };
    let served = conn.served;
    let region = conn.region();
    let tx = read_only(&mut conn.client).await?;
    let reader = Hinted::new(ReadTx::new(&tx, served.keeps_sessions()), user_id, region);
    let decrypt = sees_pii(purpose);
    let record = match as_of {
        None => users::read_user(&reader, &keyring, user_id, decrypt)
            .await
            .map_err(read_failed)?
            .ok_or_else(|| unknown(user_id))?,
        Some(at) => match users::read_user_as_of(&reader, &keyring, user_id, at, decrypt)
            .await
            .map_err(read_failed)?
        {
            AsOf::Found(record) => *record,
            AsOf::Unknown => return Err(unknown(user_id)),
            AsOf::NotYet => {
                return Err(ApiError::NotFound(format!(
                    "user {user_id} did not exist yet at {}",
                    at.to_rfc3339()
                )))
            }
        },
    };
    if let Some(erased_at) = record.erased_at.clone() {
        return Err(ApiError::Gone { user_id, erased_at });
    }
    let (region, version) = (record.region.clone(), record.version);
    let body = record_body(record, decrypt, as_of)?;
    finish(tx).await?;
    let (Some(cache), Some(ticket)) = (cache, ticket) else {
        let mut response = respond(served, body);
        if state.read_cache.is_some() {
            response
                .headers_mut()
                .insert(READ_CACHE_HEADER, HeaderValue::from_static("bypass"));
        }
        conn.tag(&mut response);
        return Ok(response);
    };
    let json = serde_json::to_vec(&body)
        .map_err(|e| ApiError::internal("rendering an answer failed", &e))?;
    drop(body);
    let mut response = json_response(
        bytes::Bytes::copy_from_slice(&json),
        served.as_str(),
        Some("miss"),
    );
    conn.tag(&mut response);
    let entry = Entry {
        region,
        version,
        pii_included: decrypt,
        body: Zeroizing::new(json),
        filled_at: std::time::Instant::now(),
    };
    cache.fill(ticket, purpose, user_id, entry).await;
    Ok(response)
}

/// The `X-Read-Cache` response header: `hit`, `miss` or `bypass` (sent only
/// when the cache is on).
pub const READ_CACHE_HEADER: &str = "x-read-cache";

/// The user's row version, unless they were erased (or are unknown): one
/// indexed single-row read, what a cache hit is checked against.
const CURRENT_VERSION: &str = "SELECT version FROM umstore.user_metadata
     WHERE region = $1 AND user_id = $2 AND erased_at IS NULL";

async fn current_version(
    client: &deadpool_postgres::Object,
    served: Served,
    user_id: Uuid,
    region: &str,
) -> Result<Option<i64>, ApiError> {
    let failed = |e: tokio_postgres::Error| ApiError::internal("checking a cached answer", &e);
    let rows = if served.keeps_sessions() {
        let statement = client
            .prepare_cached(CURRENT_VERSION)
            .await
            .map_err(failed)?;
        client
            .query(&statement, &[&region, &user_id])
            .await
            .map_err(failed)?
    } else {
        // One round trip, no named statement: fine through PgBouncer too.
        use tokio_postgres::types::Type;
        client
            .query_typed(
                CURRENT_VERSION,
                &[(&region, Type::BPCHAR), (&user_id, Type::UUID)],
            )
            .await
            .map_err(failed)?
    };
    Ok(rows.first().map(|r| r.get(0)))
}

/// A 200 answer from bytes already rendered.
fn json_response(
    body: bytes::Bytes,
    served_by: &'static str,
    cache: Option<&'static str>,
) -> Response {
    let mut response = (
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(SERVED_BY_HEADER, HeaderValue::from_static(served_by));
    if let Some(cache) = cache {
        headers.insert(READ_CACHE_HEADER, HeaderValue::from_static(cache));
    }
    response
}

/// A hit: the cached body as the miss that filled it answered.
fn cached(entry: &Entry) -> Response {
    json_response(
        bytes::Bytes::copy_from_slice(&entry.body),
        "cache",
        Some("hit"),
    )
}

/// A hit, with `X-Cluster` where there are several clusters.
fn cached_tagged(state: &AppState, entry: &Entry) -> Result<Response, ApiError> {
    let mut response = cached(entry);
    if let Some(routing) = &state.routing {
        let index = routing.cluster_of(&entry.region)?;
        tag_cluster(&mut response, routing.name(index));
    }
    Ok(response)
}

/// `GET /api/v1/user-metadata/{user_id}/derived`.
#[utoipa::path(
    get,
    path = "/api/v1/user-metadata/{user_id}/derived",
    tag = "users",
    security(("bearer" = [])),
    params(
        ("user_id" = Uuid, Path, description = "The user's id (a UUID, hyphenated)"),
        ("X-Min-Lsn" = Option<String>, Header, description = "Read at least this WAL position (the `lsn` a write returned; with several clusters, cluster:position pairs)"),
    ),
    responses(
        (status = 200, description = "Derived attributes", body = DerivedBody,
         headers(("X-Served-By" = String, description = "primary or replica"),
                 ("X-Cluster" = String, description = "With several clusters: the cluster that holds the user"),
                 ("X-Schema-Version" = u32, description = "The schema version"))),
        UserReadErrors,
    )
)]
pub async fn derived(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let purpose = caller.require(USER_READERS)?;
    let user_id = user_id(&raw)?;
    only(&params, &[])?;
    let mut conn = user_connection(&state, purpose, &headers, user_id).await?;
    let served = conn.served;
    let region = conn.region();
    let tx = read_only(&mut conn.client).await?;
    let reader = Hinted::new(ReadTx::new(&tx, served.keeps_sessions()), user_id, region);
    let found = gone_or(
        user_id,
        reads::derived(&reader, user_id)
            .await
            .map_err(read_failed)?,
    )?;
    let body = DerivedBody {
        schema_version: schema_version(),
        user_id,
        region: found.region,
        derived: found.value,
    };
    finish(tx).await?;
    let mut response = respond(served, body);
    conn.tag(&mut response);
    Ok(response)
}

/// `GET /api/v1/user-metadata/{user_id}/risk-scores`.
#[utoipa::path(
    get,
    path = "/api/v1/user-metadata/{user_id}/risk-scores",
    tag = "users",
    security(("bearer" = [])),
    params(
        ("user_id" = Uuid, Path, description = "The user's id (a UUID, hyphenated)"),
        ("X-Min-Lsn" = Option<String>, Header, description = "Read at least this WAL position (the `lsn` a write returned; with several clusters, cluster:position pairs)"),
    ),
    responses(
        (status = 200, description = "Risk scores", body = RiskScoresBody,
         headers(("X-Served-By" = String, description = "primary or replica"),
                 ("X-Cluster" = String, description = "With several clusters: the cluster that holds the user"),
                 ("X-Schema-Version" = u32, description = "The schema version"))),
        UserReadErrors,
    )
)]
pub async fn risk_scores(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let purpose = caller.require(USER_READERS)?;
    let user_id = user_id(&raw)?;
    only(&params, &[])?;
    let mut conn = user_connection(&state, purpose, &headers, user_id).await?;
    let served = conn.served;
    let region = conn.region();
    let tx = read_only(&mut conn.client).await?;
    let reader = Hinted::new(ReadTx::new(&tx, served.keeps_sessions()), user_id, region);
    let found = gone_or(
        user_id,
        reads::risk_scores(&reader, user_id)
            .await
            .map_err(read_failed)?,
    )?;
    let body = RiskScoresBody {
        schema_version: schema_version(),
        user_id,
        region: found.region,
        risk_scores: found.value,
    };
    finish(tx).await?;
    let mut response = respond(served, body);
    conn.tag(&mut response);
    Ok(response)
}

/// `GET /api/v1/user-metadata/{user_id}/eligibility[?scheme_id=]`: unexpired
/// entries only; an expired or absent one counts as a cache miss.
#[utoipa::path(
    get,
    path = "/api/v1/user-metadata/{user_id}/eligibility",
    tag = "users",
    security(("bearer" = [])),
    params(
        ("user_id" = Uuid, Path, description = "The user's id (a UUID, hyphenated)"),
        ("X-Min-Lsn" = Option<String>, Header, description = "Read at least this WAL position (the `lsn` a write returned; with several clusters, cluster:position pairs)"),
        ("scheme_id" = Option<String>, Query, description = "Only this scheme"),
    ),
    responses(
        (status = 200, description = "Unexpired eligibility results", body = EligibilityBody,
         headers(("X-Served-By" = String, description = "primary or replica"),
                 ("X-Cluster" = String, description = "With several clusters: the cluster that holds the user"),
                 ("X-Schema-Version" = u32, description = "The schema version"))),
        UserReadErrors,
    )
)]
pub async fn eligibility(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let purpose = caller.require(USER_READERS)?;
    let user_id = user_id(&raw)?;
    only(&params, &["scheme_id"])?;
    let scheme = params.get("scheme_id").map(String::as_str);
    if let Some(s) = scheme {
        let valid = !s.is_empty()
            && s.len() <= 128
            && s.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphanumeric() || (i > 0 && matches!(c, '_' | '.' | ':' | '-'))
            });
        if !valid {
            return Err(ApiError::bad(
                "invalid_parameter",
                "scheme_id is 1 to 128 of A-Z a-z 0-9 _ . : - (starting with a letter or digit)",
            ));
        }
    }
    let mut conn = user_connection(&state, purpose, &headers, user_id).await?;
    let served = conn.served;
    let region = conn.region();
    let tx = read_only(&mut conn.client).await?;
    let reader = Hinted::new(ReadTx::new(&tx, served.keeps_sessions()), user_id, region);
    let found = gone_or(
        user_id,
        reads::eligibility(&reader, user_id, scheme)
            .await
            .map_err(read_failed)?,
    )?;
    state.metrics.eligibility_lookup(!found.value.is_empty());
    let body = EligibilityBody {
        schema_version: schema_version(),
        user_id,
        region: found.region,
        eligibility: found.value,
    };
    finish(tx).await?;
    let mut response = respond(served, body);
    conn.tag(&mut response);
    Ok(response)
}

/// `GET /api/v1/user-metadata/{user_id}/history[?limit=&cursor=]`: newest
/// first; `next_cursor` fetches the next page.
#[utoipa::path(
    get,
    path = "/api/v1/user-metadata/{user_id}/history",
    tag = "users",
    security(("bearer" = [])),
    params(
        ("user_id" = Uuid, Path, description = "The user's id (a UUID, hyphenated)"),
        ("X-Min-Lsn" = Option<String>, Header, description = "Read at least this WAL position (the `lsn` a write returned; with several clusters, cluster:position pairs)"),
        ("limit" = Option<u32>, Query, description = "Changes per page, 1 to 500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "A previous page's next_cursor"),
    ),
    responses(
        (status = 200, description = "A page of changes, newest first", body = HistoryBody,
         headers(("X-Served-By" = String, description = "primary or replica"),
                 ("X-Cluster" = String, description = "With several clusters: the cluster that holds the user"),
                 ("X-Schema-Version" = u32, description = "The schema version"))),
        UserReadErrors,
    )
)]
pub async fn history(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let purpose = caller.require(HISTORY_READERS)?;
    let user_id = user_id(&raw)?;
    only(&params, &["limit", "cursor"])?;
    let limit = match params.get("limit") {
        None => HISTORY_PAGE,
        Some(l) => match l.parse::<u32>() {
            Ok(n) if (1..=HISTORY_PAGE_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::bad(
                    "invalid_parameter",
                    format!("limit is a whole number from 1 to {HISTORY_PAGE_MAX}"),
                ))
            }
        },
    };
    let cursor = params
        .get("cursor")
        .map(|c| {
            c.parse::<Cursor>().map_err(|()| {
                ApiError::bad(
                    "invalid_parameter",
                    "cursor is not one this API gave out: pass a page's next_cursor unchanged",
                )
            })
        })
        .transpose()?;
    let keyring = keyring(&state).await?;
    let mut conn = user_connection(&state, purpose, &headers, user_id).await?;
    let served = conn.served;
    let region = conn.region();
    let tx = read_only(&mut conn.client).await?;
    let reader = Hinted::new(ReadTx::new(&tx, served.keeps_sessions()), user_id, region);
    let found = gone_or(
        user_id,
        reads::history(&reader, user_id, cursor, limit)
            .await
            .map_err(read_failed)?,
    )?;
    let (mut changes, more) = found.value;
    let decrypt = sees_pii(purpose);
    let key = if decrypt {
        match keyring
            .user_key(&reader, user_id, &found.region)
            .await
            .map_err(|e| ApiError::internal("loading a data key", &e))?
        {
            UserKey::Active(key) => Some(key),
            UserKey::Erased(erased_at) => return Err(ApiError::Gone { user_id, erased_at }),
        }
    } else {
        None
    };
    for change in &mut changes {
        for values in [&mut change.old_values, &mut change.new_values] {
            open_pii(values, key.as_deref(), user_id, &found.region)?;
        }
    }
    let next = more.then(|| changes.last().map(|c| c.cursor.to_string()));
    let body = HistoryBody {
        schema_version: schema_version(),
        user_id,
        region: found.region,
        pii_included: decrypt,
        changes,
        next_cursor: next.flatten(),
    };
    finish(tx).await?;
    let mut response = respond(served, body);
    conn.tag(&mut response);
    Ok(response)
}

/// Replaces each sealed PII value in a history map by its plaintext (with a
/// key), or removes it (without).
fn open_pii(
    values: &mut Map<String, Value>,
    key: Option<&crate::crypto::DataKey>,
    user_id: Uuid,
    region: &str,
) -> Result<(), ApiError> {
    use base64::Engine as _;
    for (field, column) in users::PII {
        let Some(value) = values.get_mut(field) else {
            continue;
        };
        let Some(key) = key else {
            values.remove(field);
            continue;
        };
        let Value::String(b64) = value else {
            continue; // null: the field was cleared
        };
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| ApiError::internal("a history value is not base64", &e))?;
        let plain = key
            .open(
                &FieldAad {
                    user_id,
                    region,
                    column,
                },
                &sealed,
            )
            .map_err(|e| ApiError::internal("a history value did not decrypt", &e))?;
        let text = String::from_utf8_lossy(&plain).into_owned();
        *value = match field {
            "annual_income" => text.parse::<i64>().map_or(json!(text), |n| json!(n)),
            _ => json!(text),
        };
    }
    Ok(())
}
