//! The reconcile steps (SPEC §3). Each is its own module with one entry point,
//! `async fn run(ctx: &Context, r: &mut Reconciliation<'_>) -> Result<StepOutcome, Error>`;
//! [`Reconciliation`] carries what earlier steps learned (the validated spec, the
//! credentials, the observed objects) so later steps never recompute or re-read it.

pub mod bootstrap;
pub mod credentials;
pub mod migrate;
pub mod status;
pub mod topology;
pub mod validate;

use std::collections::BTreeMap;
use std::time::Duration;

use kube::runtime::events::EventType;
use umstore_crds::UserMetadataStore;

use crate::apply::{self, Observed};
use crate::builders::credentials::Credentials;
use crate::builders::Object;
use crate::context::Context;
use crate::error::Error;
use crate::validated::Validated;

/// The steps that report a condition of their own, in pipeline order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// validate, credentials and topology: `Provisioned`.
    Provision,
    /// bootstrap: `Bootstrapped`.
    Bootstrap,
    /// migrate: `SchemaReady`.
    Migrate,
}

impl Step {
    /// The condition type this step reports.
    pub fn condition(self) -> &'static str {
        match self {
            Step::Provision => umstore_crds::condition::PROVISIONED,
            Step::Bootstrap => umstore_crds::condition::BOOTSTRAPPED,
            Step::Migrate => umstore_crds::condition::SCHEMA_READY,
        }
    }
}

/// What a step achieved.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutcome {
    /// Finished; the pipeline goes on.
    Done,
    /// Cannot finish yet; the pipeline stops here and records why.
    Waiting {
        /// Condition reason (`InvalidSpec`, `WorkerGroupDraining`, ...).
        reason: &'static str,
        /// What is missing and what to change, for the condition and the Event.
        message: String,
        /// When to look again; `None` waits for the object to change.
        requeue_after: Option<Duration>,
    },
}

impl StepOutcome {
    /// Whether the step finished.
    pub fn is_done(&self) -> bool {
        matches!(self, StepOutcome::Done)
    }
}

/// A Kubernetes Event to publish about the store at the end of the reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    /// Normal or Warning.
    pub type_: EventType,
    /// Short PascalCase reason.
    pub reason: String,
    /// Human-readable detail.
    pub note: String,
}

/// The state of one reconcile, filled in step by step.
pub struct Reconciliation<'a> {
    /// The store being reconciled.
    pub store: &'a UserMetadataStore,
    /// Set by the validate step.
    pub validated: Option<Validated>,
    /// Set by the credentials step.
    pub credentials: Credentials,
    /// What the store owned at the start of the reconcile (read once, lazily).
    observed: Option<Observed>,
    /// The desired objects, set by the topology step.
    pub desired: Vec<Object>,
    /// Objects server-side applied in this reconcile.
    pub applied: Vec<String>,
    /// Objects created once in this reconcile (credential Secrets).
    pub created: Vec<String>,
    /// Objects deleted in this reconcile.
    pub deleted: Vec<String>,
    /// Removed worker groups kept because they still hold regions.
    pub draining: BTreeMap<String, Vec<String>>,
    /// Events to publish.
    pub events: Vec<Note>,
    /// Steps that finished, with the message of their condition.
    pub passed: Vec<(Step, String)>,
    /// The superuser connection opened by the bootstrap step, reused by the later ones.
    pub admin_db: Option<tokio_postgres::Client>,
    /// The schema version the migrate step found or left.
    pub schema_version: Option<i32>,
}

impl<'a> Reconciliation<'a> {
    /// A fresh reconcile of `store`.
    pub fn new(store: &'a UserMetadataStore) -> Self {
        Self {
            store,
            validated: None,
            credentials: Credentials::default(),
            observed: None,
            desired: Vec::new(),
            applied: Vec::new(),
            created: Vec::new(),
            deleted: Vec::new(),
            draining: BTreeMap::new(),
            events: Vec::new(),
            passed: Vec::new(),
            admin_db: None,
            schema_version: None,
        }
    }

    /// Records that `step` finished; its condition becomes true with `message`.
    pub fn passed(&mut self, step: Step, message: impl Into<String>) {
        self.passed.push((step, message.into()));
    }

    /// The objects the store owns, listed on first use.
    pub async fn observed(&mut self, ctx: &Context) -> Result<&Observed, Error> {
        if self.observed.is_none() {
            let v = self.validated.as_ref().ok_or(Error::MissingMetadata)?;
            let observed =
                apply::observe(&ctx.client, &v.owner.namespace, &v.owner.selector_string()).await?;
            self.observed = Some(observed);
        }
        self.observed.as_ref().ok_or(Error::MissingMetadata)
    }

    /// The observed objects if they were listed.
    pub fn observed_if_listed(&self) -> Option<&Observed> {
        self.observed.as_ref()
    }

    /// Queues an Event.
    pub fn event(&mut self, type_: EventType, reason: &str, note: impl Into<String>) {
        self.events.push(Note {
            type_,
            reason: reason.to_string(),
            note: note.into(),
        });
    }
}
