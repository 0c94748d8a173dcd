//! The reconcile pipeline of SPEC §3, top to bottom:
//! validate → credentials → topology → bootstrap → migrate → distribute (tier ≥ 3)
//! → status.
//!
//! Each step takes what the earlier ones returned and hands its own result on
//! (see [`crate::steps`]); the pipeline stops at the first step that is not done
//! and the status step always records where it stopped.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::Resource;
use tracing::{debug, warn};
use umstore_crds::{ReplicaPurpose, UserMetadataStore};

use crate::apply;
use crate::builders;
use crate::builders::credentials::Role;
use crate::builders::postgres::PgRole;
use crate::context::Context;
use crate::error::Error;
use crate::meta::PG_PORT;
use crate::steps::{
    backup, bootstrap, clusters, credentials, distribute, keys, lag, migrate, moves, promote,
    rollout, status, switchover, topology, validate, views, Journal, Outcome, Progress, Reached,
    Reason, Step,
};
use crate::validated::Validated;

/// How often a healthy store is looked at again even without a change.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How often a store whose components are not all ready is looked at again.
pub const NOT_READY_RECHECK: Duration = Duration::from_secs(30);

/// What one reconcile did, for tests and the benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// How far the pipeline got.
    pub progress: Progress,
    /// The writes made and Events published.
    pub journal: Journal,
    /// Whether the status was written.
    pub status_written: bool,
    /// When to reconcile again.
    pub action: Action,
}

/// Runs the pipeline for `store`, writes its status and publishes its Events.
pub async fn run(ctx: &Context, store: &UserMetadataStore) -> Result<Report, Error> {
    let mut journal = Journal::default();
    let progress = steps(ctx, store, &mut journal).await?;
    debug!(
        waiting = ?progress.waiting().map(|w| w.reason),
        applied = journal.applied.len(),
        deleted = journal.deleted.len(),
        "pipeline finished"
    );
    let started = std::time::Instant::now();
    let status_written = status::run(ctx, store, &progress, &mut journal).await?;
    ctx.metrics.step_finished("status", started);
    publish_events(ctx, store, &journal).await;
    ctx.metrics
        .objects_applied(journal.applied.len() + journal.created.len());
    let sooner = match &progress {
        Progress::Reached(r) => r.requeue,
        Progress::Invalid(_) => None,
    };
    let within = |d: Duration| sooner.map_or(d, |s| s.min(d));
    // Periodic rechecks are spread out while the controller is saturated
    // (every reconcile slot taken); watched changes still wake a store at once.
    let stretch = ctx.load.recheck_factor();
    let action = match progress.waiting() {
        Some(w) => w
            .requeue_after
            .map_or_else(Action::await_change, |d| Action::requeue(d * stretch)),
        // A step's own deadline (a scheduled backup, a rotation) is kept.
        None if progress.all_ready() => Action::requeue(within(RESYNC * stretch)),
        None => Action::requeue(within(NOT_READY_RECHECK * stretch)),
    };
    Ok(Report {
        progress,
        journal,
        status_written,
        action,
    })
}

/// The steps before status, in order; returns how far they got.
async fn steps(
    ctx: &Context,
    store: &UserMetadataStore,
    journal: &mut Journal,
) -> Result<Progress, Error> {
    let m = &ctx.metrics;
    let t = std::time::Instant::now();
    let mut valid = match validate::run(store, journal) {
        Outcome::Done(v) => v,
        Outcome::Waiting(w) => return Ok(Progress::Invalid(w)),
    };
    let owner = valid.owner.clone();
    let backups =
        valid.spec.backup.is_some() || store.status.as_ref().is_some_and(|s| s.backup.is_some());
    let observed = apply::observe(
        &ctx.client,
        &owner.namespace,
        &owner.selector_string(),
        backups,
    )
    .await?;
    let all_pods = apply::observe_pods(&ctx.client, &owner.namespace, &owner.name).await?;
    let pods = apply::database_pods(&all_pods);
    valid.endpoint_tier = endpoint_tier(store, &valid, &observed);
    let t = m.step_finished("observe", t);
    let credentials = credentials::run(ctx, &valid, &observed, journal).await?;
    let t = m.step_finished("credentials", t);
    let desired = builders::topology(&valid, &credentials, &ctx.env);
    // How the backup Jobs' pods ended, before the pods go to the diagnosis.
    let backup_jobs = backup::ended_jobs(&all_pods);
    let mut reached = Reached {
        tier: valid.tier,
        demotion_refused: valid.demotion_refused.clone(),
        vault_configured: valid.spec.encryption.vault_address.is_some(),
        components: status::diagnose(
            ctx,
            store,
            status::components(&desired, &observed),
            all_pods,
            journal,
        )
        .await,
        groups: status::groups::groups(&pods),
        switchover: store.status.as_ref().and_then(|s| s.switchover.clone()),
        endpoints: status::endpoints(&valid),
        steps: Vec::new(),
        waiting: None,
        schema_version: None,
        replica_lag: None,
        stats_views: None,
        clusters: Vec::new(),
        region_moves: None,
        worker_group_ids: valid.citus_groups.clone(),
        placement: None,
        converting: false,
        migrations: None,
        promotion: None,
        keys: None,
        requeue: None,
        degraded: Vec::new(),
        backup: None,
    };
    reached.clusters = status::clusters(&valid, &reached.components);
    // The other clusters are ready once their own database steps ran too.
    let workloads_ready: Vec<bool> = reached.clusters.iter().map(|c| c.ready).collect();
    for c in reached.clusters.iter_mut().filter(|c| !c.home && c.ready) {
        c.ready = false;
        c.message = Some(clusters::PENDING.into());
    }
    // What each worker group still holds, as the last distribute step saw it: a
    // removed group's pods stay until it holds nothing.
    let placement = store
        .status
        .as_ref()
        .map(|s| {
            let mut held = s.placement.clone();
            for (group, shards) in &s.draining {
                held.entry(group.clone())
                    .or_default()
                    .push(format!("{shards} shard placements"));
            }
            held
        })
        .unwrap_or_default();

    let provisioned =
        match topology::run(ctx, &valid, &desired, &observed, &placement, journal).await? {
            Outcome::Done(p) => p,
            Outcome::Waiting(w) => {
                m.step_finished("provision", t);
                return Ok(reached.stopped(Step::Provision, w));
            }
        };
    reached.done(
        Step::Provision,
        Reason::Applied,
        format!(
            "{} objects of tier {} are applied",
            provisioned.objects, valid.tier
        ),
    );

    // Day-2 through Patroni: a switchover asked for by annotation.
    reached.switchover = switchover::run(ctx, store, &reached.groups, journal).await?;
    // Rolling changes: replicas first, then a switchover, then the old leader.
    let cannot_lead: Vec<String> = valid
        .spec
        .replica_pools
        .iter()
        .filter(|p| p.purpose == ReplicaPurpose::Analytics)
        .map(|p| {
            PgRole::Replica {
                purpose: p.purpose,
                replicas: p.replicas,
            }
            .name(&valid)
        })
        .collect();
    let clusters = rollout::clusters(&pods, &observed, &cannot_lead);
    rollout::run(ctx, &owner.namespace, &clusters, journal).await?;

    let t = m.step_finished("provision", t);
    let bootstrapped = bootstrap::run(ctx, &valid, &credentials, &provisioned, journal).await?;
    let t = m.step_finished("bootstrap", t);
    let mut bootstrapped = match bootstrapped {
        Outcome::Done(b) => b,
        Outcome::Waiting(mut w) => {
            // Waiting for the coordinator: say why it is not ready, when the cluster does.
            if w.reason == Reason::CoordinatorUnreachable {
                let since = store
                    .status
                    .as_ref()
                    .and_then(|s| {
                        s.conditions.iter().find(|c| {
                            c.type_ == umstore_crds::condition::BOOTSTRAPPED
                                && c.status == "False"
                                && c.reason == Reason::CoordinatorUnreachable.as_str()
                        })
                    })
                    .map(|c| c.last_transition_time.0);
                w.requeue_after = Some(bootstrap::unreachable_backoff(since, Timestamp::now()));
            }
            if w.reason == Reason::CoordinatorNotReady {
                let cause = reached
                    .components
                    .iter()
                    .find(|c| c.name == provisioned.coordinator)
                    .and_then(|c| c.message.as_deref());
                if let Some(cause) = cause {
                    w.message = format!("{}: {cause}", w.message);
                }
            }
            return Ok(reached.stopped(Step::Bootstrap, w));
        }
    };
    reached.done(
        Step::Bootstrap,
        Reason::Bootstrapped,
        bootstrapped.message.clone(),
    );
    // Measured before migrate, so a store held by pending migrations still reports it.
    reached.replica_lag = lag::measure(&mut bootstrapped.admin, &pods, lag::TIMEOUT).await;
    if let (Some(home), Some(lag)) = (reached.clusters.first_mut(), &reached.replica_lag) {
        home.max_lag_bytes = lag.iter().map(|l| l.lag_bytes).max();
    }
    let t = m.step_finished("lag", t);

    let approval = store
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(migrate::APPROVE_ANNOTATION))
        .map(String::as_str);
    // The store's TLS, as bootstrap connected, for the keys step's own connection.
    let connector = bootstrapped.connector.clone();
    let migrated = migrate::run(&valid, bootstrapped, approval, journal).await?;
    let t = m.step_finished("migrate", t);
    reached.migrations = Some(migrated.migrations);
    let mut schema = match migrated.outcome {
        Ok(current) => current,
        Err(held) => {
            reached.schema_version = held.applied_version;
            return Ok(reached.stopped(Step::Migrate, held.waiting));
        }
    };
    reached.schema_version = Some(schema.version);
    reached.done(
        Step::Migrate,
        Reason::Migrated,
        format!("schema at version {}", schema.version),
    );
    let t = if valid.citus() {
        let report = distribute::run(&valid, &schema.admin, &observed, journal).await?;
        let t = m.step_finished("distribute", t);
        reached.converting = report.converting;
        if let Some(p) = report.placement {
            reached.worker_group_ids = p.worker_group_ids.clone();
            reached.placement = Some(p);
        }
        match report.outcome {
            Outcome::Done(message) => {
                reached.done(Step::Distribute, Reason::RegionsPlaced, message)
            }
            Outcome::Waiting(w) => return Ok(reached.stopped(Step::Distribute, w)),
        }
        t
    } else {
        t
    };
    // The other clusters of a tier-4 store: the same steps on each.
    if let Some(home) = reached.clusters.first_mut() {
        home.schema_version = Some(schema.version);
    }
    let other_views = clusters::run(
        ctx,
        &valid,
        &credentials,
        &observed,
        &pods,
        approval,
        &workloads_ready,
        &mut reached.clusters,
        journal,
    )
    .await?;
    // Regions whose cluster the spec changed move there, one per reconcile.
    let moved = moves::run(
        &valid,
        &connector,
        &credentials,
        &mut reached.clusters,
        journal,
    )
    .await?;
    if moved.pending > 0 {
        reached.requeue_within(Duration::from_secs(2));
    }
    if let Some(failed) = moved.failed {
        reached.degraded.push((Reason::RegionMoveFailed, failed));
    }
    reached.region_moves = moved.journal;
    reached.stats_views = views::measure(&valid, &mut schema.admin)
        .await
        .map(|mut home| {
            home.extend(other_views);
            home
        });
    if valid.spec.auto_promotion.enabled && valid.tier < 4 {
        match promote::measure(&schema.admin).await {
            Ok(users) => {
                let decision = promote::decide(store, &valid, users, Timestamp::now());
                if decision.raised {
                    journal.event(
                        EventType::Normal,
                        Reason::TierRaised,
                        decision.status.message.clone(),
                    );
                    reached.requeue_within(Duration::from_secs(1));
                } else if !decision.status.message.is_empty() {
                    reached
                        .degraded
                        .push((Reason::PromotionBlocked, decision.status.message.clone()));
                }
                reached.promotion = Some(decision.status);
            }
            Err(error) => warn!(%error, "could not measure the user count for auto-promotion"),
        }
    }

    let t = m.step_finished("promote", t);
    let database = keys::Database {
        connector,
        host: owner.service_host(&provisioned.coordinator),
        port: u16::try_from(PG_PORT).unwrap_or(5432),
        dbname: umstore_migrations::roles::DATABASE.to_string(),
        user: Role::Admin.user().to_string(),
        password: credentials.password(Role::Admin).to_string(),
    };
    let report = keys::run(
        &ctx.vault,
        &ctx.rotations,
        store,
        &valid,
        &schema.admin,
        database,
    )
    .await?;
    m.step_finished("keys", t);
    reached.noted(
        Step::Keys,
        report.ready,
        report.reason,
        report.message.clone(),
    );
    if let Some(d) = report.degraded.clone() {
        reached.degraded.push(d);
    }
    if let Some(after) = report.requeue {
        reached.requeue_within(after);
    }
    reached.keys = Some(report);
    let t = std::time::Instant::now();
    let old_backup = store.status.as_ref().and_then(|s| s.backup.as_ref());
    if let Some(report) = backup::run(
        ctx,
        &valid,
        &backup_jobs,
        &schema.admin,
        old_backup,
        journal,
    )
    .await?
    {
        reached.noted(
            Step::Backup,
            report.ready,
            report.reason,
            report.message.clone(),
        );
        if report.degraded {
            reached
                .degraded
                .push((report.reason, report.message.clone()));
        }
        reached.backup = Some(report.status);
    }
    m.step_finished("backup", t);
    // The connection is not kept between reconciles.
    drop(schema);
    Ok(Progress::Reached(Box::new(reached)))
}

/// The tier whose endpoints clients get: while a promotion into tier 2 waits for
/// PgBouncer and every replica pool to have a ready pod, still the running tier's
/// (the primary), so the Secrets and the data plane switch only to a pooler that
/// answers.
fn endpoint_tier(store: &UserMetadataStore, v: &Validated, observed: &apply::Observed) -> i32 {
    let running = store.status.as_ref().and_then(|s| s.tier);
    let Some(running) = running.filter(|r| *r < 2 && v.tier >= 2) else {
        return v.tier;
    };
    let pooler = topology::ready_replicas(observed, "Deployment", &v.owner.child("pgbouncer")) >= 1;
    let pools = v.spec.replica_pools.iter().all(|p| {
        let name = PgRole::Replica {
            purpose: p.purpose,
            replicas: p.replicas,
        }
        .name(v);
        topology::ready_replicas(observed, "StatefulSet", &name) >= 1
    });
    if pooler && pools {
        v.tier
    } else {
        running.max(1)
    }
}

/// Publishes the queued Events; a failure to publish is logged, never fatal.
async fn publish_events(ctx: &Context, store: &UserMetadataStore, journal: &Journal) {
    let reference = store.object_ref(&());
    for note in &journal.events {
        let event = kube::runtime::events::Event {
            type_: note.type_,
            reason: note.reason.as_str().to_string(),
            note: Some(note.note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            warn!(%error, reason = %note.reason, "could not publish an Event");
        }
    }
}
