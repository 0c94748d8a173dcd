//! The moves step of a tier-4 store with several clusters: a region whose
//! cluster the spec changed (promotion 3 → 4, or any later edit of
//! `spec.clusters`) is moved there online, one region per reconcile, with
//! [`umstore_migrations::moves`] (copy, catch up, a short write fence for that
//! region only, switch, clean up). docs/data-model.md, "Moving a region between
//! clusters"; docs/operator.md, "Tier 4".
//!
//! Where each region is comes from the home cluster's `umstore.region_placement`
//! (seeded with what each cluster held before the first move), not from the
//! spec: `status.clusters[].regions` is that placement, and the data plane's
//! layout follows it. A move that stopped (the operator restarted, a
//! connection lost) is resumed from its journal by the next reconcile.

use std::collections::BTreeMap;

use kube::runtime::events::EventType;
use tokio_postgres::Client;
use tracing::{info, warn};
use umstore_crds::{ClusterStatus, RegionMoveStatus};
use umstore_migrations::moves::{self, Clusters, MoveOptions};

use super::{Journal, Reason};
use crate::builders::credentials::{Credentials, Role};
use crate::builders::postgres::PgRole;
use crate::db::Connector;
use crate::error::Error;
use crate::meta::{DATABASE, PG_PORT};
use crate::validated::{Cluster, Validated};

/// Finished moves kept in status.
const RECENT: i64 = 5;

/// What the step did.
#[derive(Debug, Default)]
pub struct Moved {
    /// Regions still to move after this reconcile.
    pub pending: usize,
    /// Why a move could not be made or stopped (it is tried again).
    pub failed: Option<String>,
    /// The journal for status; `None` when it could not be read.
    pub journal: Option<Vec<RegionMoveStatus>>,
}

async fn connect(
    v: &Validated,
    connector: &Connector,
    credentials: &Credentials,
    cluster: &Cluster,
) -> Result<Client, Error> {
    let host = v
        .owner
        .service_host(&PgRole::Coordinator.name(&v.for_cluster(cluster)));
    connector
        .connect(
            &host,
            u16::try_from(PG_PORT).unwrap_or(5432),
            DATABASE,
            Role::Admin.user(),
            credentials.password(Role::Admin),
        )
        .await
}

/// Runs the step: records where each region is in `statuses`, and moves the
/// next region whose placement differs from the spec once both its clusters
/// are ready.
pub async fn run(
    v: &Validated,
    connector: &Connector,
    credentials: &Credentials,
    statuses: &mut [ClusterStatus],
    journal: &mut Journal,
) -> Result<Moved, Error> {
    if v.clusters.len() < 2 {
        return Ok(Moved::default());
    }
    let Some(home_cluster) = v.clusters.first() else {
        return Ok(Moved::default());
    };
    let home = match connect(v, connector, credentials, home_cluster).await {
        Ok(c) => c,
        Err(e) => {
            return Ok(Moved {
                failed: Some(format!("the home cluster's placement cannot be read: {e}")),
                ..Moved::default()
            })
        }
    };
    match step(v, connector, credentials, &home, statuses, journal).await {
        Ok(moved) => Ok(moved),
        Err(e) => {
            warn!(error = %e, "region moves");
            Ok(Moved {
                failed: Some(e.to_string()),
                journal: read_journal(&home).await.ok(),
                ..Moved::default()
            })
        }
    }
}

async fn read_journal(home: &Client) -> Result<Vec<RegionMoveStatus>, moves::MoveError> {
    Ok(moves::journal(home, RECENT)
        .await?
        .into_iter()
        .map(|m| RegionMoveStatus {
            region: m.region,
            from: m.from,
            to: m.to,
            phase: m.phase.as_str().to_owned(),
            fence_ms: m.fence_ms.map(|f| (f * 10.0).round() / 10.0),
            rows_copied: m.rows_copied,
            started_at: m.started_at,
            finished_at: m.finished_at,
        })
        .collect())
}

async fn step(
    v: &Validated,
    connector: &Connector,
    credentials: &Credentials,
    home: &Client,
    statuses: &mut [ClusterStatus],
    journal: &mut Journal,
) -> Result<Moved, String> {
    // What each cluster holds now (as status recorded it) seeds the placement
    // the first time; after that the table is the record.
    let held: Vec<(String, String)> = v
        .clusters
        .iter()
        .flat_map(|c| c.holds.iter().map(|r| (r.clone(), c.name.clone())))
        .collect();
    let read = || async {
        moves::placement(home)
            .await
            .map(|rows| rows.into_iter().collect::<BTreeMap<String, String>>())
            .map_err(|e| e.to_string())
    };
    let mut placed = read().await?;
    // Written only when a region has no row yet (the first time, or a region
    // the store has just begun to serve), not on every reconcile.
    if held.iter().any(|(r, _)| !placed.contains_key(r)) {
        moves::seed_placement(home, &held)
            .await
            .map_err(|e| e.to_string())?;
        placed = read().await?;
    }
    let wanted: BTreeMap<&str, &Cluster> = v
        .clusters
        .iter()
        .flat_map(|c| c.regions.iter().map(move |r| (r.as_str(), c)))
        .collect();
    let unfinished = moves::journal(home, 0)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|m| m.finished_at.is_none());
    let next = match unfinished {
        Some(m) => Some((m.region, m.from, m.to)),
        None => wanted.iter().find_map(|(r, c)| {
            let now = placed.get(*r)?;
            (now != &c.name).then(|| (r.to_string(), now.clone(), c.name.clone()))
        }),
    };
    let mut failed = None;
    if let Some((region, from, to)) = next {
        let cluster = |name: &str| v.clusters.iter().find(|c| c.name == name);
        let ready = |name: &str| statuses.iter().any(|s| s.name == name && s.ready);
        match (cluster(&from), cluster(&to)) {
            (Some(f), Some(t)) if ready(&from) && ready(&to) => {
                journal.event(
                    EventType::Normal,
                    Reason::RegionMoving,
                    format!("moving region {region} from cluster {from} to cluster {to}"),
                );
                match move_one(v, connector, credentials, home, f, t, &region).await {
                    Ok(message) => {
                        info!(%region, %from, %to, "{message}");
                        journal.event(EventType::Normal, Reason::RegionMoved, message);
                        placed.insert(region, to);
                    }
                    Err(e) => {
                        let message = format!(
                            "moving region {region} from cluster {from} to cluster {to} stopped: \
                             {e}; it resumes where it stopped"
                        );
                        journal.event(EventType::Warning, Reason::RegionMoveFailed, &message);
                        failed = Some(message);
                    }
                }
            }
            (Some(_), Some(_)) => {
                info!(%region, %from, %to, "a region move waits for both clusters to be ready");
            }
            _ => {
                failed = Some(format!(
                    "region {region} is placed in cluster {from} and the spec wants it in \
                     {to}, but one of them is not in spec.clusters"
                ));
            }
        }
    }
    for status in statuses.iter_mut() {
        status.regions = placed
            .iter()
            .filter(|(r, c)| **c == status.name && wanted.contains_key(r.as_str()))
            .map(|(r, _)| r.clone())
            .collect();
    }
    let pending = wanted
        .iter()
        .filter(|(r, c)| placed.get(**r).is_some_and(|now| *now != c.name))
        .count();
    Ok(Moved {
        pending,
        failed,
        journal: Some(read_journal(home).await.map_err(|e| e.to_string())?),
    })
}

/// Moves (or resumes moving) `region` from `from` to `to`.
async fn move_one(
    v: &Validated,
    connector: &Connector,
    credentials: &Credentials,
    home: &Client,
    from: &Cluster,
    to: &Cluster,
    region: &str,
) -> Result<String, String> {
    let mut source = connect(v, connector, credentials, from)
        .await
        .map_err(|e| e.to_string())?;
    let mut target = connect(v, connector, credentials, to)
        .await
        .map_err(|e| e.to_string())?;
    let report = moves::move_region(
        Clusters {
            home,
            source: &mut source,
            target: &mut target,
        },
        region,
        &from.name,
        &to.name,
        &MoveOptions::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    // The region's groups leave one cluster's views and join the other's.
    for (name, client) in [(&to.name, &target), (&from.name, &source)] {
        if let Err(e) = umstore_data_plane::stats::views::refresh(client, true).await {
            warn!(cluster = %name, error = %e, "refreshing the stats views after a region move");
        }
    }
    Ok(format!(
        "region {region} moved from cluster {} to cluster {}: {} rows copied, {} users caught \
         up, writes of {region} held back {} ms",
        from.name,
        to.name,
        report.rows_copied,
        report.users_caught_up,
        report
            .fence_ms
            .map_or_else(|| "-".to_owned(), |f| format!("{f:.0}"))
    ))
}
