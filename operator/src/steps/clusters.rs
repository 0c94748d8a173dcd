//! The database steps on the clusters other than home (tier 4 with
//! `spec.clusters`): bootstrap (roles and database), migrate and distribute, each
//! as it runs on the home cluster, with the cluster's own coordinator and worker
//! groups. A cluster that is not there yet does not hold the others back: its
//! status says where it stopped, and the store is not Ready until every cluster is.

use umstore_crds::{ClusterStatus, StatsViewStatus};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::{bootstrap, distribute, lag, migrate, topology::Provisioned, views, Journal, Outcome};
use crate::apply::Observed;
use crate::builders::credentials::Credentials;
use crate::builders::postgres::PgRole;
use crate::context::Context;
use crate::error::Error;
use crate::meta::CLUSTER_LABEL;
use crate::validated::Validated;

/// What a cluster other than home says while its workloads are ready and its
/// database steps have not run (they run after the home cluster's).
pub const PENDING: &str =
    "its workloads are ready; its database steps run once the home cluster's have";

/// Runs the steps on every cluster but home whose workloads are ready
/// (`workloads_ready`, by position in `statuses`, from
/// [`super::status::clusters`]) and records in `statuses` each cluster's schema
/// version, the largest replay lag of its replica pool members among `pods`,
/// and whether it is ready or where it stopped. Returns the other clusters'
/// stats views (each named by its cluster).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &Context,
    v: &Validated,
    credentials: &Credentials,
    observed: &Observed,
    pods: &[Pod],
    approval: Option<&str>,
    workloads_ready: &[bool],
    statuses: &mut [ClusterStatus],
    journal: &mut Journal,
) -> Result<Vec<StatsViewStatus>, Error> {
    let mut stats_views = Vec::new();
    for cluster in v.clusters.iter().filter(|c| !c.home) {
        let Some(i) = statuses.iter().position(|s| s.name == cluster.name) else {
            continue;
        };
        if !workloads_ready.get(i).copied().unwrap_or(false) {
            continue;
        }
        let status = &mut statuses[i];
        status.message = None;
        let view = v.for_cluster(cluster);
        let coordinator = PgRole::Coordinator.name(&view);
        let provisioned = Provisioned {
            objects: 0,
            coordinator_ready: true,
            coordinator,
        };
        let not_done = |status: &mut ClusterStatus, step: &str, message: String| {
            status.ready = false;
            if status.message.is_none() {
                status.message = Some(format!("{step}: {message}"));
            }
        };
        let bootstrapped =
            match bootstrap::run(ctx, &view, credentials, &provisioned, journal).await? {
                Outcome::Done(b) => b,
                Outcome::Waiting(w) => {
                    not_done(status, "bootstrap", w.message);
                    continue;
                }
            };
        let migrated = migrate::run(&view, bootstrapped, approval, journal).await?;
        let schema = match migrated.outcome {
            Ok(current) => current,
            Err(held) => {
                status.schema_version = held.applied_version;
                not_done(status, "migrate", held.waiting.message);
                continue;
            }
        };
        status.schema_version = Some(schema.version);
        // The replica lag of this cluster's pool members, from its own primary.
        let mine: Vec<Pod> = pods
            .iter()
            .filter(|p| p.labels().get(CLUSTER_LABEL) == Some(&cluster.name))
            .cloned()
            .collect();
        let mut schema = schema;
        if let Some(lag) = lag::measure(&mut schema.admin, &mine, lag::TIMEOUT).await {
            status.max_lag_bytes = lag.iter().map(|l| l.lag_bytes).max();
        }
        // Its stats views' refresh log, named by cluster in status.statsViews.
        if let Some(views) = views::measure(&view, &mut schema.admin).await {
            stats_views.extend(views.into_iter().map(|mut s| {
                s.cluster = Some(cluster.name.clone());
                s
            }));
        }
        if view.citus() {
            let report = distribute::run(&view, &schema.admin, observed, journal).await?;
            if let Outcome::Waiting(w) = report.outcome {
                not_done(status, "distribute", w.message);
                continue;
            }
        }
        status.ready = true;
    }
    Ok(stats_views)
}
