//! Step 6 (tier 3 and up), distribute: the schema on Citus and each region's shards
//! on the worker group the spec assigns it to, through
//! [`umstore_migrations::citus`] on the migrate step's admin connection to the
//! coordinator.
//!
//! In order, each a stop when it is not so:
//!
//! 1. the coordinator has the citus extension (else `CitusMissing`, saying what to
//!    change);
//! 2. every worker group of the spec has an active primary in `pg_dist_node` under
//!    its Citus group id: Patroni's Citus integration registers it (and follows
//!    failovers), so the step waits for it (`WorkersNotRegistered`); a group id in
//!    `pg_dist_node` that belongs to no group is reported (`WorkerGroupMismatch`, a
//!    Warning Event) and otherwise left alone;
//! 3. no shard operation of an interrupted reconcile is still running on the
//!    coordinator (`ShardOperationInProgress`); then what an interrupted one left
//!    behind is cleaned up (`citus_cleanup_orphaned_resources`);
//! 4. every table is distributed: a populated one (a tier-2 store being promoted)
//!    without blocking writes (`Distributing`, and `Promoting` says so);
//! 5. every region has a shard of its own on its group's node; one split or move per
//!    reconcile, each an Event, requeued at once (`PlacingRegions`); a group that left
//!    the spec is drained the same way, and removed from `pg_dist_node` once its pods
//!    are gone.
//!
//! `status.regions` is the placement as `pg_dist_placement` shows it after the step,
//! not the spec; `status.draining` counts what a removed group still holds, and its
//! pods are kept until that is zero.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::runtime::events::EventType;
use kube::ResourceExt;
use tokio_postgres::Client;
use umstore_migrations::citus::{self, CitusError, Registration, WorkerGroup};

use super::{Journal, Outcome, Reason, Waiting};
use crate::apply::Observed;
use crate::error::Error;
use crate::meta::WORKER_GROUP_LABEL;
use crate::validated::Validated;

/// How often to look again while Citus is missing.
pub const MISSING_RECHECK: Duration = Duration::from_secs(60);
/// How often to look again while waiting for Patroni or another session.
pub const RECHECK: Duration = Duration::from_secs(10);
/// How soon to go on after one split or move.
pub const NEXT_ACTION: Duration = Duration::from_secs(1);

/// The placement as observed after the step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    /// Region → worker group name, from `pg_dist_placement`.
    pub regions: BTreeMap<String, String>,
    /// Worker group name → the regions it holds.
    pub by_group: BTreeMap<String, Vec<String>>,
    /// Groups that left the spec → shard placements they still hold.
    pub draining: BTreeMap<String, i64>,
    /// The Citus group ids still in use (spec groups, and removed ones not yet gone).
    pub worker_group_ids: BTreeMap<String, i32>,
}

/// What the step found and did.
#[derive(Debug)]
pub struct Report {
    /// Where the regions are, when the step got as far as looking.
    pub placement: Option<Placement>,
    /// Done (with the condition message) or why not yet.
    pub outcome: Outcome<String>,
    /// Whether tables holding rows were distributed or are still to be (a tier-2
    /// store promoted to tier 3): the stage for the `Promoting` condition.
    pub converting: bool,
}

impl Report {
    fn waiting(reason: Reason, message: impl Into<String>, after: Duration) -> Self {
        Self {
            placement: None,
            outcome: Outcome::Waiting(Waiting::new(reason, message, Some(after))),
            converting: false,
        }
    }
}

fn db(e: CitusError) -> Error {
    match e {
        CitusError::Db { what, source } => Error::db(what)(source),
    }
}

/// Runs the step on the admin connection.
pub async fn run(
    v: &Validated,
    client: &Client,
    observed: &Observed,
    journal: &mut Journal,
) -> Result<Report, Error> {
    if let Some(remedy) = citus::availability(client).await.map_err(db)?.remedy() {
        return Ok(Report::waiting(
            Reason::CitusMissing,
            remedy,
            MISSING_RECHECK,
        ));
    }

    let groups: Vec<WorkerGroup> = v
        .spec
        .worker_groups
        .iter()
        .filter_map(|g| {
            v.citus_groups.get(&g.name).map(|id| WorkerGroup {
                name: g.name.clone(),
                citus_group: *id,
                regions: g.regions.clone(),
            })
        })
        .collect();
    let nodes = citus::nodes(client).await.map_err(db)?;
    let registration = Registration::check(&groups, &nodes);
    if !registration.missing.is_empty() {
        return Ok(Report::waiting(
            Reason::WorkersNotRegistered,
            format!(
                "waiting for Patroni to register the primary of worker group {} in the \
                 coordinator's pg_dist_node; if it does not, check that group's pods and the \
                 coordinator's Patroni log",
                registration.missing.join(", ")
            ),
            RECHECK,
        ));
    }
    let name_of: BTreeMap<i32, &str> = v
        .citus_groups
        .iter()
        .map(|(name, id)| (*id, name.as_str()))
        .collect();
    let strangers: Vec<String> = registration
        .unknown
        .iter()
        .filter(|g| !name_of.contains_key(g))
        .map(i32::to_string)
        .collect();
    if !strangers.is_empty() {
        journal.event(
            EventType::Warning,
            Reason::WorkerGroupMismatch,
            format!(
                "pg_dist_node lists Citus group {} that no worker group of this store has \
                 (added by hand?); the operator leaves it alone: remove it with \
                 citus_remove_node once it holds no shards",
                strangers.join(", ")
            ),
        );
    }

    if let Some(running) = citus::in_progress(client).await.map_err(db)? {
        return Ok(Report::waiting(
            Reason::ShardOperationInProgress,
            format!(
                "a shard operation started earlier is still running on the coordinator \
                 ({running}); the step goes on when it ends"
            ),
            RECHECK,
        ));
    }
    citus::cleanup(client).await.map_err(db)?;

    // Also finishes what an interrupted run left (constraints not put back yet).
    let report = citus::distribute(client, |_, _, _| {}).await.map_err(db)?;
    let converting = !report.concurrently.is_empty();
    if !report.tables.is_empty() {
        let populated = converting;
        journal.event(
            EventType::Normal,
            Reason::Distributed,
            format!(
                "distributed {} tables{}",
                report.tables.len(),
                if populated {
                    format!(
                        "; {} holding rows were converted without blocking writes",
                        report.concurrently.join(", ")
                    )
                } else {
                    String::new()
                }
            ),
        );
    }

    let desired: BTreeMap<String, i32> = groups
        .iter()
        .flat_map(|g| g.regions.iter().map(|r| (r.clone(), g.citus_group)))
        .collect();
    let actions = citus::plan(client, &desired).await.map_err(db)?;
    let mut outcome = None;
    if let Some(action) = actions.first() {
        let started = std::time::Instant::now();
        citus::apply(client, action).await.map_err(db)?;
        let took = started.elapsed();
        journal.event(
            EventType::Normal,
            Reason::PlacingRegions,
            format!("{action}: done in {:.1} s", took.as_secs_f64()),
        );
        outcome = Some(Waiting::new(
            Reason::PlacingRegions,
            format!(
                "{action} done; {} more shard operation(s) planned",
                actions.len() - 1
            ),
            Some(NEXT_ACTION),
        ));
    }

    // Groups that left the spec: removed from pg_dist_node once drained and their
    // pods are gone (Patroni would register a live one again).
    let wanted: BTreeSet<i32> = groups.iter().map(|g| g.citus_group).collect();
    let with_pods: BTreeSet<String> = observed
        .objects
        .iter()
        .filter(|((kind, _), _)| kind == "StatefulSet")
        .filter_map(|(_, o)| o.labels().get(WORKER_GROUP_LABEL).cloned())
        .collect();
    let gone: Vec<i32> = v
        .citus_groups
        .iter()
        .filter(|(name, id)| !wanted.contains(id) && !with_pods.contains(*name))
        .map(|(_, id)| *id)
        .collect();
    if outcome.is_none() && !gone.is_empty() {
        for group in citus::remove_drained(client, &gone).await.map_err(db)? {
            journal.event(
                EventType::Normal,
                Reason::PlacingRegions,
                format!(
                    "removed Citus group {group} ({}) from pg_dist_node: it holds no shards and \
                     its pods are gone",
                    name_of.get(&group).copied().unwrap_or("unknown")
                ),
            );
        }
    }

    let placement = observe(v, client, &name_of, &wanted).await?;
    let outcome = match outcome {
        Some(w) => Outcome::Waiting(w),
        None => Outcome::Done(format!(
            "tables distributed; {} regions each in a shard of their own on their worker group",
            placement.regions.len()
        )),
    };
    Ok(Report {
        placement: Some(placement),
        outcome,
        converting,
    })
}

async fn observe(
    v: &Validated,
    client: &Client,
    name_of: &BTreeMap<i32, &str>,
    wanted: &BTreeSet<i32>,
) -> Result<Placement, Error> {
    let group_name = |id: i32| {
        name_of
            .get(&id)
            .map_or_else(|| format!("citus-group-{id}"), |n| (*n).to_string())
    };
    let observed = citus::observed_placement(client, &v.spec.regions)
        .await
        .map_err(db)?;
    let mut placement = Placement::default();
    for (region, group) in observed {
        let name = group_name(group);
        placement
            .by_group
            .entry(name.clone())
            .or_default()
            .push(region.clone());
        placement.regions.insert(region, name);
    }
    let nodes = citus::nodes(client).await.map_err(db)?;
    for (group, count) in citus::placement_counts(client).await.map_err(db)? {
        if group != citus::COORDINATOR_GROUP && !wanted.contains(&group) && count > 0 {
            placement.draining.insert(group_name(group), count);
        }
    }
    placement.worker_group_ids = v
        .citus_groups
        .iter()
        .filter(|(name, id)| {
            wanted.contains(id)
                || nodes.contains_key(id)
                || placement.draining.contains_key(name.as_str())
        })
        .map(|(name, id)| (name.clone(), *id))
        .collect();
    Ok(placement)
}
