//! Reads of a store with several clusters (`--clusters`): which cluster holds
//! a user, and the read pools of each cluster. docs/data-model.md, "Several
//! clusters: where a user is found".
//!
//! A lookup by user id costs, at most: this process's cache (user id →
//! region), else one single-row read of the home cluster's
//! `umstore.user_routes`; the region's cluster comes from the placement (the
//! layout overridden by home's `umstore.region_placement`). A user
//! without a route (written before the store had clusters) is looked for in
//! every cluster's `user_directory` at once, and their route written back.

use std::sync::Arc;

use tokio_postgres::types::Type;
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

use super::error::ApiError;
use super::pools::ReadPools;
use crate::clusters::placement::Placement;
use crate::clusters::Layout;
use crate::metrics::{CacheLabels, Metrics};

/// A user's route: home's `user_routes`, one row by primary key.
const SELECT_ROUTE: &str = "SELECT region::text FROM umstore.user_routes WHERE user_id = $1";
/// The fallback: a cluster's own directory.
const SELECT_DIRECTORY: &str = "SELECT region::text FROM umstore.user_directory WHERE user_id = $1";
/// The backfill of a route found through the fallback (never overwrites).
const INSERT_ROUTE: &str = "INSERT INTO umstore.user_routes (user_id, region)
     VALUES ($1, $2::text::bpchar) ON CONFLICT (user_id) DO NOTHING";

/// Where a user lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The index of their cluster in the layout.
    pub cluster: usize,
    /// Their region.
    pub region: String,
}

/// The clusters' read pools and the route cache.
#[derive(Clone)]
pub struct Routing {
    placement: Arc<Placement>,
    pools: Vec<ReadPools>,
    cache: moka::future::Cache<Uuid, Arc<str>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field(
                "clusters",
                &self
                    .layout()
                    .clusters()
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("cached_routes", &self.cache.entry_count())
            .finish()
    }
}

impl Routing {
    /// Routing over `pools` (one per cluster of the placement's layout, in its
    /// order), with a cache of up to `cache_entries` routes (0: none).
    pub fn new(
        placement: Arc<Placement>,
        pools: Vec<ReadPools>,
        cache_entries: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            placement,
            pools,
            cache: moka::future::Cache::new(cache_entries),
            metrics,
        }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        self.placement.layout()
    }

    /// Where each region is now.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The regions cluster `index` holds now: what its share of a query over
    /// every cluster is limited to, so that a region being copied into another
    /// cluster is counted once.
    pub fn regions_of(&self, index: usize) -> Vec<String> {
        self.placement.regions_of(index)
    }

    /// Cluster `index`'s read pools.
    pub fn pools(&self, index: usize) -> &ReadPools {
        &self.pools[index.min(self.pools.len() - 1)]
    }

    /// Every cluster's read pools, in the layout's order.
    pub fn all_pools(&self) -> &[ReadPools] {
        &self.pools
    }

    /// Cluster `index`'s name.
    pub fn name(&self, index: usize) -> &str {
        self.layout()
            .clusters()
            .get(index)
            .map_or("?", |c| c.name.as_str())
    }

    /// Counts a query sent to cluster `index`.
    pub fn count(&self, index: usize) {
        self.metrics.cluster_query(self.name(index));
    }

    /// A 503 until the region placement was read from the home cluster.
    pub fn require_placement(&self) -> Result<(), ApiError> {
        if self.placement.is_loaded() {
            return Ok(());
        }
        Err(ApiError::Unavailable(
            "the region placement was not read from the home cluster yet; retry shortly".into(),
        ))
    }

    /// The cluster holding `region` now, or a 503 naming the missing region
    /// (or saying that the placement was not read yet).
    pub fn cluster_of(&self, region: &str) -> Result<usize, ApiError> {
        self.require_placement()?;
        self.placement.cluster_of(region).ok_or_else(|| {
            ApiError::Unavailable(format!(
                "region {region} is in no cluster of --clusters (UMSTORE_CLUSTERS): add it to \
                 the cluster that holds its data"
            ))
        })
    }

    /// Drops `user_id`'s cached route.
    pub async fn forget(&self, user_id: Uuid) {
        self.cache.invalidate(&user_id).await;
    }

    /// Where `user_id` lives, as `purpose` may see it; `None`: no such user in
    /// any cluster.
    pub async fn locate(
        &self,
        purpose: Purpose,
        user_id: Uuid,
    ) -> Result<Option<Located>, ApiError> {
        let lookups = |result: &'static str| {
            self.metrics
                .route_cache_lookups
                .get_or_create(&CacheLabels { result })
                .inc();
        };
        if let Some(region) = self.cache.get(&user_id).await {
            lookups("hit");
            let cluster = self.cluster_of(&region)?;
            return Ok(Some(Located {
                cluster,
                region: region.to_string(),
            }));
        }
        lookups("miss");
        let home = self.pools[0].get_primary(purpose).await?;
        self.count(0);
        let failed = |e: tokio_postgres::Error| ApiError::internal("looking a route up", &e);
        // One round trip, no named statement: fine through PgBouncer too.
        let row = home
            .query_typed(SELECT_ROUTE, &[(&user_id, Type::UUID)])
            .await
            .map_err(failed)?;
        if let Some(row) = row.first() {
            let region: String = row.get(0);
            let cluster = self.cluster_of(&region)?;
            self.cache.insert(user_id, Arc::from(region.as_str())).await;
            return Ok(Some(Located { cluster, region }));
        }
        let found = self.fan_out(purpose, user_id).await?;
        let fallbacks = |result: &'static str| {
            self.metrics
                .route_fallbacks
                .get_or_create(&CacheLabels { result })
                .inc();
        };
        let Some((holder, region)) = found else {
            fallbacks("miss");
            return Ok(None);
        };
        fallbacks("hit");
        let cluster = self.placement.cluster_of(&region).unwrap_or(holder);
        if cluster != holder {
            tracing::warn!(
                %user_id,
                region = %region,
                found_in = self.name(holder),
                placement_says = self.name(cluster),
                "a user's directory row is not in the cluster the placement gives their region"
            );
        }
        // Self-healing: the next lookup reads the route.
        match home
            .execute_typed(
                INSERT_ROUTE,
                &[(&user_id, Type::UUID), (&region, Type::TEXT)],
            )
            .await
        {
            Ok(_) => tracing::debug!(%user_id, "route backfilled"),
            Err(e) => tracing::warn!(
                %user_id,
                error = %crate::db::with_causes(&e),
                "could not write a route back; the next lookup asks every cluster again"
            ),
        }
        self.cache.insert(user_id, Arc::from(region.as_str())).await;
        Ok(Some(Located { cluster, region }))
    }

    /// Asks every cluster's directory for `user_id` at once: the cluster
    /// that lists them, and their region.
    async fn fan_out(
        &self,
        purpose: Purpose,
        user_id: Uuid,
    ) -> Result<Option<(usize, String)>, ApiError> {
        let asks = self.pools.iter().enumerate().map(|(i, pools)| async move {
            let client = pools.get_primary(purpose).await?;
            self.count(i);
            let rows = client
                .query_typed(SELECT_DIRECTORY, &[(&user_id, Type::UUID)])
                .await
                .map_err(|e| ApiError::internal("looking a user up in a cluster", &e))?;
            Ok::<_, ApiError>(rows.first().map(|r| (i, r.get::<_, String>(0))))
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut found = None;
        for answer in answers {
            if let Some(hit) = answer? {
                found.get_or_insert(hit);
            }
        }
        Ok(found)
    }
}
