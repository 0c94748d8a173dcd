//! The reconcile steps (SPEC §3), each its own module. A step takes what the
//! earlier steps produced as typed values and returns what the next one needs:
//!
//! | step | takes | returns |
//! |---|---|---|
//! | [`validate`] | the store | [`Validated`](crate::validated::Validated) |
//! | [`credentials`] | `&Validated`, the observed objects | [`Credentials`](crate::builders::credentials::Credentials) |
//! | [`topology`] | `&Validated`, the desired objects | [`topology::Applied`] |
//! | [`bootstrap`] | `&Validated`, `&Credentials`, `&Applied` (the store's CA through [`tls`]) | [`bootstrap::Bootstrapped`] (the admin connection, and the connector with the store's TLS) |
//! | [`lag`] (a probe) | `&mut Bootstrapped`'s connection, the pods | the replica pool members' lag |
//! | [`migrate`] | `&Validated`, `Bootstrapped` | [`migrate::SchemaCurrent`] |
//! | [`distribute`] (tier ≥ 3) | `&Validated`, `&SchemaCurrent`'s connection | [`distribute::Report`] (the placement observed) |
//! | [`status`] | the [`Progress`] the pipeline reached | whether it wrote |
//!
//! so an impossible order does not compile. A step that cannot finish yet returns
//! [`Outcome::Waiting`] with a [`Reason`]; the pipeline stops there. What a step
//! did (objects applied, Events to publish) goes to the reconcile's [`Journal`].

pub mod backup;
pub mod bootstrap;
pub mod clusters;
pub mod credentials;
pub mod distribute;
pub mod keys;
pub mod lag;
pub mod migrate;
pub mod moves;
pub mod promote;
pub mod rollout;
pub mod status;
pub mod switchover;
pub mod tls;
pub mod topology;
pub mod validate;
pub mod views;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use kube::runtime::events::EventType;
use umstore_crds::{ComponentStatus, Endpoints, GroupStatus, ReplicaLag};

/// The steps that report a condition of their own, in pipeline order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// validate, credentials and topology: `Provisioned`.
    Provision,
    /// bootstrap: `Bootstrapped`.
    Bootstrap,
    /// migrate: `SchemaReady`.
    Migrate,
    /// distribute (tier 3 and up): `Distributed`.
    Distribute,
    /// keys: `KeysReady`.
    Keys,
    /// backup (with `spec.backup`): `BackupReady`.
    Backup,
}

impl Step {
    /// The condition type this step reports.
    pub fn condition(self) -> &'static str {
        match self {
            Step::Provision => umstore_crds::condition::PROVISIONED,
            Step::Bootstrap => umstore_crds::condition::BOOTSTRAPPED,
            Step::Migrate => umstore_crds::condition::SCHEMA_READY,
            Step::Distribute => umstore_crds::condition::DISTRIBUTED,
            Step::Keys => umstore_crds::condition::KEYS_READY,
            Step::Backup => umstore_crds::condition::BACKUP_READY,
        }
    }
}

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $variant:ident,)*) => {
        /// A condition's or an Event's reason (the PascalCase word `kubectl` shows).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Reason {
            /// Every reason.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The reason as written to the condition or Event.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => stringify!($variant),)*
                }
            }
        }
    };
}

reasons! {
    /// The spec fails validation (validate).
    InvalidSpec,
    /// The object does not deserialize at all.
    Malformed,
    /// A lower tier was asked for; the running tier is kept.
    DemotionRefused,
    /// No Vault address: the data plane will not start in Kubernetes.
    NoVault,
    /// Nothing needs attention (`Degraded` false).
    AsExpected,
    /// Role passwords were generated (credentials).
    CredentialsCreated,
    /// Objects were server-side applied (topology, `Provisioned` true).
    Applied,
    /// Owned objects drifted from the spec and were put back (topology).
    DriftCorrected,
    /// Objects no longer in the spec were deleted (topology).
    Deleted,
    /// The API server refused an object (topology).
    ApplyRejected,
    /// A removed worker group still holds regions (topology).
    WorkerGroupDraining,
    /// The coordinator has no ready replica yet (bootstrap).
    CoordinatorNotReady,
    /// The coordinator did not accept a connection (bootstrap).
    CoordinatorUnreachable,
    /// `spec.postgres.tls.secretName` names no Secret, or one without a usable
    /// `ca.crt` (bootstrap).
    TlsSecretMissing,
    /// Database, extensions and roles are in place (bootstrap).
    Bootstrapped,
    /// Migrations were applied or the schema is current (migrate).
    Migrated,
    /// Migrations were applied in this reconcile (Event).
    MigrationsApplied,
    /// `Manual` policy with pending migrations (migrate).
    MigrationsPending,
    /// `umstore.io/approve-migrations` names no embedded migration (migrate).
    MigrationApprovalUnknown,
    /// The coordinator's image has no Citus, or it is not created (distribute).
    CitusMissing,
    /// A worker group's primary is not in `pg_dist_node` yet (distribute).
    WorkersNotRegistered,
    /// `pg_dist_node` lists a Citus group no worker group has (distribute, Event).
    WorkerGroupMismatch,
    /// A shard operation of an earlier reconcile is still running (distribute).
    ShardOperationInProgress,
    /// Tables were distributed (distribute, Event).
    Distributed,
    /// Regions are being split off or moved to their worker groups (distribute).
    PlacingRegions,
    /// Every table is distributed and every region is on its group (distribute).
    RegionsPlaced,
    /// A migration failed and was rolled back (migrate).
    MigrationFailed,
    /// The runner refused the database's schema (migrate).
    MigrationRefused,
    /// Every workload is ready (`Ready` true).
    AllComponentsReady,
    /// Some workload is not ready yet.
    ComponentsNotReady,
    /// The tier was raised; the new components are not all ready.
    TierRaised,
    /// The raised tier runs.
    PromotionComplete,
    /// The store is being deleted (finalizer).
    Deleting,
    /// A Patroni cluster with standbys has none ready: nothing to fail over to.
    NoHealthyStandby,
    /// A Patroni cluster's leader moved (a failover or a switchover).
    LeaderChanged,
    /// A switchover asked for by annotation was done.
    Switchover,
    /// A pod was replaced, or a switchover made, to roll out a new template.
    RollingUpdate,
    /// A switchover asked for by annotation was refused.
    SwitchoverRefused,
    /// Vault refused or could not be reached (keys).
    VaultUnreachable,
    /// The transit key is rotating and data keys are being rewrapped (keys).
    RewrappingKeys,
    /// A rotation failed; it is retried with backoff (keys).
    KeyRotationFailed,
    /// A rotation is due but not started: a store with several clusters (keys).
    KeyRotationHeld,
    /// The transit key exists and is within its rotation interval (keys).
    KeysCurrent,
    /// The user count calls for a tier the spec cannot run (promotion).
    PromotionBlocked,
    /// A cluster of a tier-4 store other than home is not ready: its workloads, or
    /// its bootstrap, migrate or distribute step (clusters).
    ClusterNotReady,
    /// A region is moving to the cluster the spec gives it (moves, Normal Event).
    RegionMoving,
    /// A region moved between clusters (moves, Normal Event).
    RegionMoved,
    /// A region move stopped with an error; it resumes on the next reconcile
    /// (moves, Warning Event).
    RegionMoveFailed,
    /// A workload's volume claim is Pending (status, Warning Event).
    VolumeClaimPending,
    /// A workload's pod cannot be scheduled (status, Warning Event).
    Unschedulable,
    /// A container's image cannot be pulled (status, Warning Event).
    ImagePullFailed,
    /// A container keeps exiting and restarting (status, Warning Event).
    CrashLooping,
    /// A container runs but its readiness probe fails (status, Warning Event).
    ProbeFailing,
    /// A container cannot be created or started, or exited (status, Warning Event).
    ContainerFailing,
    /// No backup has completed yet; the first is running (backup).
    BackupPending,
    /// A backup completed and WAL is archived (backup).
    BackupCompleted,
    /// The newest backup Job failed (backup).
    BackupFailed,
    /// WAL archiving into the backup repository fails (backup).
    ArchiveFailing,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a step cannot finish yet.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    /// Condition reason.
    pub reason: Reason,
    /// What is missing and what to change, for the condition and the Event.
    pub message: String,
    /// When to look again; `None` waits for the object to change.
    pub requeue_after: Option<Duration>,
}

impl Waiting {
    /// Waiting for `reason`, looked at again after `requeue_after` (or on change).
    pub fn new(
        reason: Reason,
        message: impl Into<String>,
        requeue_after: Option<Duration>,
    ) -> Self {
        Self {
            reason,
            message: message.into(),
            requeue_after,
        }
    }
}

/// What a step achieved: its result for the next step, or why it stopped.
#[derive(Debug)]
#[must_use]
pub enum Outcome<T> {
    /// Finished; the pipeline goes on with `T`.
    Done(T),
    /// Cannot finish yet; the pipeline stops here.
    Waiting(Waiting),
}

/// One step's condition as the pipeline reached it.
#[derive(Clone, Debug, PartialEq)]
pub struct StepCondition {
    /// The step.
    pub step: Step,
    /// Whether it finished.
    pub done: bool,
    /// The condition's reason.
    pub reason: Reason,
    /// The condition's message.
    pub message: String,
}

/// How far the pipeline got: everything the status step needs, nothing it must
/// look up. Built by the pipeline as the steps return.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// The spec is invalid: nothing was applied.
    Invalid(Waiting),
    /// The spec is valid; the steps below ran.
    Reached(Box<Reached>),
}

/// What a reconcile of a valid spec found and did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reached {
    /// The tier the spec asks for (never below the running one).
    pub tier: i32,
    /// Why a lower tier was refused, if one was asked for.
    pub demotion_refused: Option<String>,
    /// Whether the spec names a Vault address.
    pub vault_configured: bool,
    /// Readiness of the desired workloads.
    pub components: Vec<ComponentStatus>,
    /// The Patroni clusters as their pods report them.
    pub groups: Vec<GroupStatus>,
    /// The switchover annotation value acted on (None without the annotation).
    pub switchover: Option<String>,
    /// The endpoints clients use.
    pub endpoints: Endpoints,
    /// The conditions of the steps reached, in order; the last is not done when
    /// the pipeline stopped.
    pub steps: Vec<StepCondition>,
    /// Where the pipeline stopped, if it did.
    pub waiting: Option<Waiting>,
    /// The schema version the migrate step found, if it ran.
    pub schema_version: Option<i32>,
    /// The replica pool members' lag, when the probe after bootstrap measured it.
    pub replica_lag: Option<Vec<ReplicaLag>>,
    /// The Citus group id of each worker group (tier 3 and up).
    pub worker_group_ids: BTreeMap<String, i32>,
    /// Where the regions are, when the distribute step looked.
    pub placement: Option<distribute::Placement>,
    /// Tables holding rows are being distributed (a promotion into Citus).
    pub converting: bool,
    /// What the migrate step found pending and approved, once it ran (`None` inside:
    /// nothing to show, the `Auto` policy).
    pub migrations: Option<Option<umstore_crds::MigrationsStatus>>,
    /// Automatic promotion's measurement, when it ran.
    pub promotion: Option<umstore_crds::PromotionStatus>,
    /// What the keys step found, when it ran.
    pub keys: Option<keys::Report>,
    /// Look again sooner than the default (a rotation's progress, a promotion).
    pub requeue: Option<Duration>,
    /// What later steps found that makes the store `Degraded` without stopping it.
    pub degraded: Vec<(Reason, String)>,
    /// Backups and WAL archiving, when the backup step ran.
    pub backup: Option<umstore_crds::BackupStatus>,
    /// The stats views' refreshes, when the probe after migrate read them (empty
    /// when no refresh is scheduled); `None` keeps the last ones.
    pub stats_views: Option<Vec<umstore_crds::StatsViewStatus>>,
    /// The clusters of a tier-4 store with `spec.clusters` (empty otherwise).
    pub clusters: Vec<umstore_crds::ClusterStatus>,
    /// The region moves, when the moves step read the journal; `None` keeps
    /// the last ones.
    pub region_moves: Option<Vec<umstore_crds::RegionMoveStatus>>,
}

impl Reached {
    /// Records that `step` finished.
    pub fn done(&mut self, step: Step, reason: Reason, message: impl Into<String>) {
        self.steps.push(StepCondition {
            step,
            done: true,
            reason,
            message: message.into(),
        });
    }

    /// Records `step`'s condition without stopping the pipeline (a step whose
    /// trouble makes the store `Degraded`, not unready).
    pub fn noted(&mut self, step: Step, ok: bool, reason: Reason, message: impl Into<String>) {
        self.steps.push(StepCondition {
            step,
            done: ok,
            reason,
            message: message.into(),
        });
    }

    /// Asks to be reconciled again within `after`.
    pub fn requeue_within(&mut self, after: Duration) {
        self.requeue = Some(self.requeue.map_or(after, |r| r.min(after)));
    }

    /// Records that the pipeline stopped at `step`, and returns the progress.
    pub fn stopped(mut self, step: Step, waiting: Waiting) -> Progress {
        self.steps.push(StepCondition {
            step,
            done: false,
            reason: waiting.reason,
            message: waiting.message.clone(),
        });
        self.waiting = Some(waiting);
        Progress::Reached(Box::new(self))
    }

    /// Whether `step` finished.
    pub fn passed(&self, step: Step) -> bool {
        self.steps.iter().any(|s| s.step == step && s.done)
    }
}

impl Progress {
    /// Where the pipeline stopped, if it did.
    pub fn waiting(&self) -> Option<&Waiting> {
        match self {
            Progress::Invalid(w) => Some(w),
            Progress::Reached(r) => r.waiting.as_ref(),
        }
    }

    /// Whether every desired workload is ready.
    pub fn all_ready(&self) -> bool {
        match self {
            Progress::Invalid(_) => false,
            Progress::Reached(r) => {
                !r.components.is_empty() && r.components.iter().all(|c| c.ready)
            }
        }
    }
}

/// A Kubernetes Event to publish about the store at the end of the reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    /// Normal or Warning.
    pub type_: EventType,
    /// The reason.
    pub reason: Reason,
    /// Human-readable detail.
    pub note: String,
}

/// What one reconcile did: the writes it made and the Events to publish. Steps
/// append to it; none reads another's entries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Journal {
    /// Objects server-side applied (`Kind/name`).
    pub applied: Vec<String>,
    /// Objects created once (credential Secrets).
    pub created: Vec<String>,
    /// Objects deleted.
    pub deleted: Vec<String>,
    /// Events to publish.
    pub events: Vec<Note>,
}

impl Journal {
    /// Queues an Event.
    pub fn event(&mut self, type_: EventType, reason: Reason, note: impl Into<String>) {
        self.events.push(Note {
            type_,
            reason,
            note: note.into(),
        });
    }
}
