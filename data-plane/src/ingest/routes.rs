//! The write path of a store with several clusters: each event goes to the
//! cluster holding its region, and an event that may create a user puts the
//! user's route (user id → region) in the home cluster's `user_routes` first.
//!
//! Order: route (home, its own transaction), then the event's transaction on
//! the region's cluster. A crash between the two leaves a route to a region
//! that has no row for the user yet: reads answer 404 exactly as for an
//! unknown user, and the redelivered event (it was never acknowledged)
//! finds the route in place and completes the write. docs/data-model.md,
//! "Several clusters: where a user is found".

use std::sync::Arc;

use deadpool_postgres::Pool;
use uuid::Uuid;

use super::apply::ApplyError;
use super::event::{EventType, Rejection};
use super::Event;
use crate::clusters::placement::Placement;
use crate::clusters::Layout;
use crate::metrics::Metrics;

/// A new route; no row when the user has one already.
const INSERT_ROUTE: &str = "INSERT INTO umstore.user_routes (user_id, region)
     VALUES ($1, $2::text::bpchar) ON CONFLICT (user_id) DO NOTHING RETURNING region::text";
/// The route a user has.
const SELECT_ROUTE: &str = "SELECT region::text FROM umstore.user_routes WHERE user_id = $1";
/// Whether a cluster's directory lists the user, and in which region.
const SELECT_DIRECTORY: &str = "SELECT region::text FROM umstore.user_directory WHERE user_id = $1";

/// Each cluster's writer pool, home first, and where each region is now.
#[derive(Debug)]
pub struct WriteClusters {
    placement: Arc<Placement>,
    pools: Vec<Pool>,
}

fn transient(what: &str) -> impl Fn(tokio_postgres::Error) -> ApplyError + '_ {
    move |e| ApplyError::Transient(format!("{what}: {}", crate::db::with_causes(&e)))
}

impl WriteClusters {
    /// `pools`: the writer's pool on each cluster of the placement's layout,
    /// in its order.
    pub fn new(placement: Arc<Placement>, pools: Vec<Pool>) -> Self {
        Self { placement, pools }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        self.placement.layout()
    }

    /// Where each region is now.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Cluster `index`'s name and writer pool.
    pub fn cluster(&self, index: usize) -> Option<(&str, &Pool)> {
        let name = self.layout().clusters().get(index)?.name.as_str();
        Some((name, self.pools.get(index)?))
    }

    /// The pool `event` is applied on, once its route is in place (for a
    /// `METADATA_CREATED`, the only event that creates a user).
    pub async fn prepare(
        &self,
        event: &Event,
        metrics: Option<&Metrics>,
    ) -> Result<&Pool, ApplyError> {
        if !self.placement.is_loaded() {
            return Err(ApplyError::Transient(
                "the region placement was not read from the home cluster yet; the event is \
                 retried"
                    .into(),
            ));
        }
        let index = self.placement.cluster_of(event.region).ok_or_else(|| {
            ApplyError::Transient(format!(
                "region {} is in no cluster of --clusters (UMSTORE_CLUSTERS): add it to the \
                 cluster that holds its data; the event is retried",
                event.region
            ))
        })?;
        let (name, pool) = self
            .cluster(index)
            .ok_or_else(|| ApplyError::Transient("no writer pool for a cluster".into()))?;
        if let Some(m) = metrics {
            m.cluster_query(name);
        }
        if event.event_type() == EventType::MetadataCreated {
            self.route(event, index, metrics).await?;
        }
        Ok(pool)
    }

    /// Puts `event.user_id → event.region` in home's routes (idempotent). A
    /// user routed to another region is refused as the cluster's directory
    /// would refuse them. A user without a route is first looked for in the
    /// other clusters' directories (a user written before the store had
    /// clusters has none): found there, their route is written as it is and
    /// the event refused, so a user is never in two clusters' directories and
    /// no route ever names a wrong region.
    async fn route(
        &self,
        event: &Event,
        index: usize,
        metrics: Option<&Metrics>,
    ) -> Result<(), ApplyError> {
        let (user_id, region) = (event.user_id, event.region);
        let home = self.pools[0].get().await.map_err(|e| {
            ApplyError::Transient(format!("no connection to the home cluster: {e}"))
        })?;
        if let Some(m) = metrics {
            m.cluster_query(&self.layout().clusters()[0].name);
        }
        let routed: Option<String> = home
            .query_opt(SELECT_ROUTE, &[&user_id])
            .await
            .map_err(transient("reading the user's route"))?
            .map(|r| r.get(0));
        match routed {
            Some(r) if r == region => return Ok(()),
            Some(r) => return Err(lives_elsewhere(user_id, &r, region)),
            None => {}
        }
        let mut lives = region.to_owned();
        for (other, pool) in self.pools.iter().enumerate() {
            if other == index {
                continue;
            }
            let client = pool
                .get()
                .await
                .map_err(|e| ApplyError::Transient(format!("no connection to a cluster: {e}")))?;
            if let Some(m) = metrics {
                m.cluster_query(&self.layout().clusters()[other].name);
            }
            let listed: Option<String> = client
                .query_opt(SELECT_DIRECTORY, &[&user_id])
                .await
                .map_err(transient("looking the user up in another cluster"))?
                .map(|r| r.get(0));
            if let Some(r) = listed {
                lives = r;
                break;
            }
        }
        let inserted: Option<String> = home
            .query_opt(INSERT_ROUTE, &[&user_id, &lives])
            .await
            .map_err(transient("writing the user's route"))?
            .map(|r| r.get(0));
        // Written by a concurrent event for the same user: that route counts.
        let routed = match inserted {
            Some(r) => r,
            None => home
                .query_opt(SELECT_ROUTE, &[&user_id])
                .await
                .map_err(transient("reading the user's route"))?
                .map(|r| r.get(0))
                .unwrap_or_else(|| lives.clone()),
        };
        if routed != region {
            return Err(lives_elsewhere(user_id, &routed, region));
        }
        Ok(())
    }
}

fn lives_elsewhere(user_id: Uuid, lives: &str, says: &str) -> ApplyError {
    Rejection::Unappliable(format!(
        "user {user_id} lives in region {lives}, the event says {says}: moving a user between \
         regions is not an event; send it for {lives}"
    ))
    .into()
}
