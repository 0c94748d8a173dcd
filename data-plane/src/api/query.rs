//! `GET /api/v1/user-metadata/query` (users by attributes, administrators
//! only) and `GET /api/v1/user-metadata/stats` (counts and averages, small
//! groups suppressed).

use std::collections::HashMap;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

use super::auth::Caller;
use super::bodies::{ErrorBody, QueryBody, StatsBody};
use super::error::{schema_version, ApiError};
use super::pools::Served;
use super::users::{cluster_connection, connection, finish, only, read_only, respond};
use super::AppState;
use crate::stats::{self, scan, views, Partial};
use crate::store::query::{self, Filter, Group, DIMENSIONS};

/// The filters query and stats share, as the OpenAPI document lists them
/// (parsed and validated by [`Filter::parse`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct Filters {
    /// Region code, e.g. KA.
    region: Option<String>,
    /// State or union territory name, any case.
    state: Option<String>,
    /// At least this old (0 to 130, by birth year).
    age_min: Option<u32>,
    /// At most this old (0 to 130, by birth year).
    age_max: Option<u32>,
    /// female, male, transgender or undisclosed.
    gender: Option<String>,
    /// BPL, LIG, MIG or HIG.
    income_bracket: Option<String>,
    /// childhood, student, early_career, family_building, established,
    /// pre_retirement or retired.
    life_stage: Option<String>,
    /// Below the poverty line.
    bpl_status: Option<bool>,
    /// A scheme id with an unexpired eligible result.
    eligible_for: Option<String>,
    /// Overall risk above (0 to 1).
    risk_above: Option<f64>,
}

/// The errors query and stats may answer with (their OpenAPI responses).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum QueryErrors {
    /// An unknown or invalid parameter
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No token, or an unknown one
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token's purpose may not use this endpoint
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// Not ready, or no database login for the purpose
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// Who may list users by attributes.
pub const QUERY_READERS: &[Purpose] = &[Purpose::Admin];
/// Who may read anonymized stats.
pub const STATS_READERS: &[Purpose] = &[Purpose::Analytics, Purpose::Dashboard, Purpose::Admin];

/// The default query page.
pub const QUERY_PAGE: u32 = 50;
/// The largest query page.
pub const QUERY_PAGE_MAX: u32 = 500;
/// The most dimensions one stats request may group by.
pub const MAX_DIMENSIONS: usize = 3;

/// The filters among `params` (every other name must be one of `extra`).
fn filters(
    params: &HashMap<String, String>,
    extra: &[&str],
    identity_token: bool,
) -> Result<Vec<(String, String)>, ApiError> {
    let mut valid: Vec<&str> = Filter::NAMES
        .iter()
        .copied()
        .filter(|n| identity_token || *n != "identity_token")
        .collect();
    valid.extend_from_slice(extra);
    only(params, &valid)?;
    let mut found: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| Filter::NAMES.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    found.sort();
    Ok(found)
}

fn parse_filters(raw: &[(String, String)]) -> Result<Vec<Filter>, ApiError> {
    raw.iter()
        .filter(|(k, _)| k != "identity_token")
        .map(|(k, v)| Filter::parse(k, v).map_err(|e| ApiError::bad("invalid_filter", e)))
        .collect()
}

fn page_limit(params: &HashMap<String, String>) -> Result<u32, ApiError> {
    match params.get("limit") {
        None => Ok(QUERY_PAGE),
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=QUERY_PAGE_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::bad(
                    "invalid_parameter",
                    format!("limit is a whole number from 1 to {QUERY_PAGE_MAX}"),
                )
            }),
    }
}

fn parse_cursor(c: &str) -> Option<(String, Uuid)> {
    let (region, user) = c.split_once('.')?;
    let ok = region.len() == 2 && region.bytes().all(|b| b.is_ascii_uppercase());
    ok.then_some(())?;
    Some((region.to_owned(), user.parse().ok()?))
}

/// `GET /api/v1/user-metadata/query?<filters>&limit=&cursor=`: users in
/// (region, id) order with their non-PII attributes; `GET` one for the rest.
#[utoipa::path(
    get,
    path = "/api/v1/user-metadata/query",
    tag = "users",
    security(("bearer" = [])),
    params(
        Filters,
        ("identity_token" = Option<String>, Query, description = "An identity token (matched through its blind index)"),
        ("limit" = Option<u32>, Query, description = "Users per page, 1 to 500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "A previous page's next_cursor"),
        ("X-Min-Lsn" = Option<String>, Header, description = "Read at least this WAL position"),
    ),
    responses(
        (status = 200, description = "A page of matching users", body = QueryBody,
         headers(("X-Served-By" = String, description = "primary or replica"))),
        QueryErrors,
    )
)]
pub async fn find(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let purpose = caller.require(QUERY_READERS)?;
    let raw = filters(&params, &["limit", "cursor"], true)?;
    let mut parsed = parse_filters(&raw)?;
    if let Some(token) = params.get("identity_token") {
        if token.is_empty() || token.len() > 256 {
            return Err(ApiError::bad(
                "invalid_filter",
                "identity_token is 1 to 256 characters",
            ));
        }
        let keyring = state.keys.get().await.map_err(ApiError::Unavailable)?;
        parsed.push(Filter::IdentityTokenIndex(
            keyring
                .blind_index()
                .index("identity_token", token.as_bytes()),
        ));
    }
    if parsed.is_empty() {
        return Err(ApiError::bad(
            "no_filter",
            format!("give at least one filter: {}", Filter::NAMES.join(", ")),
        ));
    }
    let limit = page_limit(&params)?;
    let after = params
        .get("cursor")
        .map(|c| {
            parse_cursor(c).ok_or_else(|| {
                ApiError::bad(
                    "invalid_parameter",
                    "cursor is not one this API gave out: pass a page's next_cursor unchanged",
                )
            })
        })
        .transpose()?;
    let (users, more, served) = if state.routing.is_some() {
        find_in_clusters(&state, purpose, &headers, &parsed, after, limit).await?
    } else {
        let (mut client, served) = connection(&state, purpose, &headers).await?;
        let tx = read_only(&mut client).await?;
        let (users, more) = query::find(&*tx, &parsed, after, limit)
            .await
            .map_err(|e| ApiError::internal("a query failed", &e))?;
        finish(tx).await?;
        (users, more, served)
    };
    let next = more
        .then(|| users.last().map(|u| format!("{}.{}", u.region, u.user_id)))
        .flatten();
    let body = QueryBody {
        schema_version: schema_version(),
        users,
        next_cursor: next,
    };
    Ok(respond(served, body))
}

/// The clusters a request with `filters` reads: the region's alone when one is
/// named, else every cluster that holds a region now (a store with several).
fn clusters_for(state: &AppState, filters: &[Filter]) -> Result<Vec<usize>, ApiError> {
    let Some(routing) = &state.routing else {
        return Ok(vec![0]);
    };
    for f in filters {
        if let Filter::Region(region) = f {
            return Ok(vec![routing.cluster_of(region)?]);
        }
    }
    routing.require_placement()?;
    Ok((0..routing.layout().clusters().len())
        .filter(|&i| !routing.regions_of(i).is_empty())
        .collect())
}

/// `filters` limited to the regions cluster `index` holds now (a store with
/// several clusters): during a move the region's new cluster holds a copy
/// before the switch, and the old one keeps it a while after; each region is
/// read from the cluster the placement gives it, once.
fn in_cluster(state: &AppState, filters: &[Filter], index: usize) -> Vec<Filter> {
    let mut filters = filters.to_vec();
    if let Some(routing) = &state.routing {
        filters.push(Filter::InRegions(routing.regions_of(index)));
    }
    filters
}

/// A page of [`query::find`] over several clusters: each cluster's first
/// `limit` + 1 after the cursor, merged in (region, user id) order.
async fn find_in_clusters(
    state: &AppState,
    purpose: Purpose,
    headers: &HeaderMap,
    filters: &[Filter],
    after: Option<(String, Uuid)>,
    limit: u32,
) -> Result<(Vec<query::Match>, bool, Served), ApiError> {
    let mut all = Vec::new();
    let mut more = false;
    let mut served = Served::Replica;
    for index in clusters_for(state, filters)? {
        let (mut client, answered) = cluster_connection(state, purpose, headers, index).await?;
        if answered == Served::Primary {
            served = Served::Primary;
        }
        let tx = read_only(&mut client).await?;
        let filters = in_cluster(state, filters, index);
        let (users, cluster_more) = query::find(&*tx, &filters, after.clone(), limit)
            .await
            .map_err(|e| ApiError::internal("a query failed", &e))?;
        finish(tx).await?;
        more |= cluster_more;
        all.extend(users);
    }
    all.sort_by(|a, b| (&a.region, a.user_id).cmp(&(&b.region, b.user_id)));
    if all.len() > limit as usize {
        more = true;
        all.truncate(limit as usize);
    }
    Ok((all, more, served))
}

/// `GET /api/v1/user-metadata/stats?group_by=<d1,d2>&<filters>`.
#[utoipa::path(
    get,
    path = "/api/v1/user-metadata/stats",
    tag = "stats",
    security(("bearer" = [])),
    params(
        ("group_by" = Option<String>, Query, description = "Up to 3 of region, gender, area_type, social_category, age_group, income_bracket, life_stage, employment_category, bpl_status, comma-separated"),
        Filters,
        ("X-Min-Lsn" = Option<String>, Header, description = "Read at least this WAL position"),
    ),
    responses(
        (status = 200, description = "Counts and averages; groups under the threshold (by their totals) left out", body = StatsBody,
         headers(
             ("X-Served-By" = String, description = "primary or replica"),
             ("X-Stats-Source" = String, description = "view (the materialized views), live (the tables) or engine (the tables' rows grouped on the bulk engine)"),
             ("X-Stats-Age" = String, description = "With view: seconds since the views were refreshed"),
         )),
        QueryErrors,
    )
)]
pub async fn stats(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let purpose = caller.require(STATS_READERS)?;
    // No identity token: a filter that singles out one person has no place in
    // anonymized stats.
    let raw = filters(&params, &["group_by"], false)?;
    let parsed = parse_filters(&raw)?;
    let dimensions: Vec<String> = match params.get("group_by") {
        None => Vec::new(),
        Some(g) => g.split(',').map(|d| d.trim().to_owned()).collect(),
    };
    for d in &dimensions {
        if !DIMENSIONS.contains(&d.as_str()) {
            return Err(ApiError::bad(
                "invalid_parameter",
                format!(
                    "cannot group by {d:?}; group_by takes up to {MAX_DIMENSIONS} of {}",
                    DIMENSIONS.join(", ")
                ),
            ));
        }
    }
    let mut unique = dimensions.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != dimensions.len() || dimensions.len() > MAX_DIMENSIONS {
        return Err(ApiError::bad(
            "invalid_parameter",
            format!("group_by takes up to {MAX_DIMENSIONS} different dimensions"),
        ));
    }
    let (groups, source, served) = if state.routing.is_some() {
        stats_in_clusters(&state, purpose, &headers, &parsed, &dimensions).await?
    } else {
        let (mut client, served) = connection(&state, purpose, &headers).await?;
        let tx = read_only(&mut client).await?;
        let (groups, source) = read_stats(&state, &tx, &parsed, &dimensions).await?;
        finish(tx).await?;
        (groups, source, served)
    };
    let body = StatsBody {
        schema_version: schema_version(),
        group_by: dimensions,
        min_group_size: state.stats_min_group,
        groups,
    };
    state.metrics.stats_answered(source.label());
    let mut response = respond(served, body);
    source.describe(response.headers_mut());
    Ok(response)
}

/// Where a stats answer came from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    /// The materialized views, refreshed this long ago.
    View(Duration),
    /// The tables, grouped by the database.
    Live,
    /// The tables, their rows grouped on the bulk engine (a large scan).
    Engine,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::View(_) => "view",
            Source::Live => "live",
            Source::Engine => "engine",
        }
    }

    /// `X-Stats-Source`, and for a view's answer `X-Stats-Age` (seconds).
    fn describe(self, headers: &mut HeaderMap) {
        headers.insert(STATS_SOURCE_HEADER, HeaderValue::from_static(self.label()));
        if let Source::View(age) = self {
            if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", age.as_secs_f64())) {
                headers.insert(STATS_AGE_HEADER, v);
            }
        }
    }
}

/// Says where a stats answer came from: `view`, `live` or `engine`.
pub const STATS_SOURCE_HEADER: &str = "x-stats-source";
/// Seconds since the views a stats answer came from were refreshed.
pub const STATS_AGE_HEADER: &str = "x-stats-age";

/// The stats from the views when they answer the request and are at most
/// `--stats-max-age` old, else from the tables: grouped on the bulk engine
/// when the scan is large ([`engine_partials`]), else by the database.
async fn read_stats(
    state: &AppState,
    client: &tokio_postgres::Transaction<'_>,
    filters: &[Filter],
    dimensions: &[String],
) -> Result<(Vec<Group>, Source), ApiError> {
    if !state.stats_max_age.is_zero() && views::answers(filters, dimensions) {
        let age = views::age(client)
            .await
            .map_err(|e| ApiError::internal("reading the stats views' age", &e))?;
        if let Some(age) = age.filter(|a| *a <= state.stats_max_age) {
            let partials = views::partials(client, filters, dimensions)
                .await
                .map_err(|e| ApiError::internal("reading the stats views", &e))?;
            // One cluster: a store with several merges one list per
            // cluster (stats_in_clusters), suppressing by the totals.
            let groups = stats::merge(&[partials], dimensions, state.stats_min_group);
            return Ok((groups, Source::View(age)));
        }
    }
    if let Some(partials) = engine_partials(state, client, filters, dimensions).await? {
        let groups = stats::merge(&[partials], dimensions, state.stats_min_group);
        return Ok((groups, Source::Engine));
    }
    let groups = query::stats(client, filters, dimensions, state.stats_min_group)
        .await
        .map_err(|e| ApiError::internal("stats failed", &e))?;
    Ok((groups, Source::Live))
}

/// A request's partials grouped on the bulk engine, when `serve` has one for
/// stats and the scan is large enough ([`scan::scan_if_large`]); `None`: let
/// the database group it. The rows are copied out in `tx` (the replica's
/// read) and grouped off the async threads; `/metrics` counts the work.
async fn engine_partials(
    state: &AppState,
    tx: &tokio_postgres::Transaction<'_>,
    filters: &[Filter],
    dimensions: &[String],
) -> Result<Option<Vec<Partial>>, ApiError> {
    let Some(engine) = &state.stats_engine else {
        return Ok(None);
    };
    let Some(columns) = scan::scan_if_large(tx, filters, dimensions, engine.min_rows as f64)
        .await
        .map_err(|e| ApiError::internal("copying the stats rows out", &e))?
    else {
        return Ok(None);
    };
    let (fields, bytes) = (columns.fields(), columns.bytes());
    let aggregator = Arc::clone(&engine.aggregator);
    let started = Instant::now();
    let partials = tokio::task::spawn_blocking(move || aggregator.aggregate(&columns))
        .await
        .map_err(|e| ApiError::internal("the stats aggregation stopped", &e))?
        .map_err(|e| ApiError::internal("grouping the stats rows", &e))?;
    state.metrics.bulk_engine_ran(
        engine.aggregator.name(),
        "aggregate",
        fields,
        bytes,
        started.elapsed(),
    );
    Ok(Some(partials))
}

/// The stats of a store with several clusters: each cluster's partials,
/// from its views when every cluster's views are fresh enough, else from
/// every cluster's tables, merged with small groups suppressed by their
/// totals across clusters. The age reported is the oldest cluster's.
async fn stats_in_clusters(
    state: &AppState,
    purpose: Purpose,
    headers: &HeaderMap,
    filters: &[Filter],
    dimensions: &[String],
) -> Result<(Vec<Group>, Source, Served), ApiError> {
    let mut served = Served::Replica;
    let mut reads = Vec::new();
    for index in clusters_for(state, filters)? {
        let (client, answered) = cluster_connection(state, purpose, headers, index).await?;
        if answered == Served::Primary {
            served = Served::Primary;
        }
        reads.push((client, in_cluster(state, filters, index)));
    }
    let mut oldest: Option<Duration> = None;
    let mut use_views = !state.stats_max_age.is_zero() && views::answers(filters, dimensions);
    if use_views {
        for (client, _) in &reads {
            let age = views::age(&***client)
                .await
                .map_err(|e| ApiError::internal("reading the stats views' age", &e))?;
            match age.filter(|a| *a <= state.stats_max_age) {
                Some(age) => oldest = Some(oldest.map_or(age, |o| o.max(age))),
                None => {
                    use_views = false;
                    break;
                }
            }
        }
    }
    let mut partials = Vec::with_capacity(reads.len());
    let mut on_engine = false;
    for (mut client, filters) in reads {
        let tx = read_only(&mut client).await?;
        let part = if use_views {
            views::partials(&*tx, &filters, dimensions)
                .await
                .map_err(|e| ApiError::internal("reading the stats views", &e))?
        } else if let Some(part) = engine_partials(state, &tx, &filters, dimensions).await? {
            on_engine = true;
            part
        } else {
            query::stats_partials(&*tx, &filters, dimensions)
                .await
                .map_err(|e| ApiError::internal("stats failed", &e))?
        };
        finish(tx).await?;
        partials.push(part);
    }
    let groups = stats::merge(&partials, dimensions, state.stats_min_group);
    let source = match (use_views, oldest) {
        (true, Some(age)) => Source::View(age),
        _ if on_engine => Source::Engine,
        _ => Source::Live,
    };
    Ok((groups, source, served))
}
