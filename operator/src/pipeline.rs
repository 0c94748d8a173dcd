//! The reconcile pipeline of SPEC §3, top to bottom. Each step is idempotent; the
//! pipeline stops at the first step that is not done, and the status step always
//! records where it stopped.

use std::time::Duration;

use kube::runtime::controller::Action;
use kube::Resource;
use tracing::{debug, warn};
use umstore_crds::UserMetadataStore;

use crate::context::Context;
use crate::error::Error;
use crate::steps::{
    bootstrap, credentials, migrate, status, topology, validate, Reconciliation, Step, StepOutcome,
};

/// How often a healthy store is looked at again even without a change.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How often a store whose components are not all ready is looked at again.
pub const NOT_READY_RECHECK: Duration = Duration::from_secs(30);

/// What one reconcile did, for tests and the benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Where the pipeline stopped (`Done` when it ran through).
    pub outcome: StepOutcome,
    /// Objects server-side applied.
    pub applied: Vec<String>,
    /// Objects created once.
    pub created: Vec<String>,
    /// Objects deleted.
    pub deleted: Vec<String>,
    /// Whether the status was written.
    pub status_written: bool,
    /// When to reconcile again.
    pub action: Action,
}

/// Runs the pipeline for `store` and publishes its Events.
pub async fn run(ctx: &Context, store: &UserMetadataStore) -> Result<Report, Error> {
    let mut r = Reconciliation::new(store);
    // TODO(issue: distribute, keys): the last steps of SPEC §3 (distribute (tier ≥ 3)
    // → encryption keys) go after migrate, in that order, each as its own module
    // under `steps/`, reusing `r.admin_db`.
    let outcome = 'pipeline: {
        let o = validate::run(ctx, &mut r).await?;
        if !o.is_done() {
            break 'pipeline o;
        }
        let o = credentials::run(ctx, &mut r).await?;
        if !o.is_done() {
            break 'pipeline o;
        }
        let o = topology::run(ctx, &mut r).await?;
        if !o.is_done() {
            break 'pipeline o;
        }
        r.passed(Step::Provision, "");
        let o = bootstrap::run(ctx, &mut r).await?;
        if !o.is_done() {
            break 'pipeline o;
        }
        migrate::run(ctx, &mut r).await?
    };
    // The connection is not kept between reconciles.
    r.admin_db = None;
    debug!(
        ?outcome,
        applied = r.applied.len(),
        deleted = r.deleted.len(),
        "pipeline finished"
    );
    let status_written = status::run(ctx, &mut r, &outcome).await?;
    publish_events(ctx, store, &r).await;
    ctx.metrics
        .objects_applied(r.applied.len() + r.created.len());

    let all_ready = r
        .store
        .status
        .as_ref()
        .is_some_and(|s| !s.components.is_empty())
        && status::components(&r).iter().all(|c| c.ready);
    let action = match &outcome {
        StepOutcome::Waiting {
            requeue_after: Some(d),
            ..
        } => Action::requeue(*d),
        StepOutcome::Waiting {
            requeue_after: None,
            ..
        } => Action::await_change(),
        StepOutcome::Done if all_ready => Action::requeue(RESYNC),
        StepOutcome::Done => Action::requeue(NOT_READY_RECHECK),
    };
    Ok(Report {
        outcome,
        applied: r.applied,
        created: r.created,
        deleted: r.deleted,
        status_written,
        action,
    })
}

/// Publishes the queued Events; a failure to publish is logged, never fatal.
async fn publish_events(ctx: &Context, store: &UserMetadataStore, r: &Reconciliation<'_>) {
    let reference = store.object_ref(&());
    for note in &r.events {
        let event = kube::runtime::events::Event {
            type_: note.type_,
            reason: note.reason.clone(),
            note: Some(note.note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            warn!(%error, reason = %note.reason, "could not publish an Event");
        }
    }
}
