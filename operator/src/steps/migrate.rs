//! Step 5, migrate: the schema migrations embedded in this operator (the same
//! `umstore-migrations` the data plane is built with) applied to the store's
//! database as the superuser, under the runner's advisory lock.
//!
//! `spec.migrations.policy: Auto` applies what is pending; `Manual` applies what the
//! annotation `umstore.io/approve-migrations: "<version>"` approves (up to that
//! version, no further) and holds the pipeline with a condition naming what is still
//! pending; an approval naming no embedded migration is a condition too
//! (`MigrationApprovalUnknown`), never a retry loop. A database
//! ahead of this operator, or a migration changed after it was applied, stops the
//! pipeline with the runner's message instead of retrying in a loop: both need a
//! person.

use std::time::Duration;

use kube::runtime::events::EventType;
use tokio_postgres::Client;
use umstore_crds::annotations::approved_version;
use umstore_crds::refusals::approval_unknown;
use umstore_crds::{MigrationPolicy, MigrationsStatus};
use umstore_migrations::{MigrateError, Runner, MIGRATIONS_TABLE};

use super::bootstrap::Bootstrapped;
use super::{Journal, Reason, Waiting};
use crate::error::Error;
use crate::validated::Validated;

/// How often a store held by pending manual migrations or a refused schema is looked at.
pub const RECHECK: Duration = Duration::from_secs(60);

pub use umstore_crds::annotations::APPROVE_ANNOTATION;

/// What `umstore.io/approve-migrations` says, checked against the embedded migrations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Approval {
    /// No annotation.
    None,
    /// Migrations up to this version (one the operator embeds) may be applied.
    UpTo(u32),
    /// The value is not the version of an embedded migration.
    Unknown(String),
}

impl Approval {
    /// Reads the annotation's value.
    pub fn parse(value: Option<&str>, runner: &Runner) -> Self {
        let Some(value) = value else {
            return Self::None;
        };
        match approved_version(value, runner.migrations()) {
            Some(v) => Self::UpTo(v),
            None => Self::Unknown(value.to_string()),
        }
    }
}

/// What [`migrate`] found or did.
#[derive(Debug)]
pub enum Migrated {
    /// The schema is at the version this operator embeds; `applied` lists the
    /// migrations applied just now (`version (name)`).
    Current {
        /// Applied by this call.
        applied: Vec<String>,
        /// The schema version.
        version: u32,
    },
    /// `Manual` policy and migrations are pending (after applying those approved).
    Pending {
        /// Pending versions.
        versions: Vec<u32>,
        /// The highest applied version, if any.
        applied_version: Option<u32>,
        /// Applied by this call, as approved (`version (name)`).
        applied: Vec<String>,
    },
    /// `Manual` policy and the approval names no embedded migration: nothing applied.
    ApprovalUnknown {
        /// The annotation's value.
        value: String,
        /// Pending versions.
        versions: Vec<u32>,
        /// The highest applied version, if any.
        applied_version: Option<u32>,
    },
    /// The runner refused or a migration failed; needs a person.
    Refused(MigrateError),
}

fn describe(report: &umstore_migrations::UpReport) -> Vec<String> {
    report
        .applied
        .iter()
        .map(|(version, name, _)| format!("{version} ({name})"))
        .collect()
}

/// Brings the schema to the embedded version (`Auto`), or applies what `approval`
/// allows and reports what is still pending (`Manual`). Migration 0009 lets the
/// purpose roles read the migrations table.
pub async fn migrate(
    client: &mut Client,
    policy: MigrationPolicy,
    approval: &Approval,
) -> Result<Migrated, Error> {
    let runner = Runner::default();
    let latest = runner.latest_version();
    let checked = match policy {
        MigrationPolicy::Auto => runner.up(client).await.map(|report| describe(&report)),
        MigrationPolicy::Manual => match manual(client, &runner, approval).await {
            Ok(Some(held)) => return Ok(held),
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(e),
        },
    };
    match checked {
        Ok(applied) => Ok(Migrated::Current {
            applied,
            version: latest,
        }),
        Err(e) if is_refusal(&e) => Ok(Migrated::Refused(e)),
        Err(e) => Err(Error::Migrate(e)),
    }
}

/// The `Manual` policy: applies the approved migrations; `None` when nothing is
/// left pending (and nothing was approved just now).
async fn manual(
    client: &mut Client,
    runner: &Runner,
    approval: &Approval,
) -> Result<Option<Migrated>, MigrateError> {
    let versions = |pending: &[&umstore_migrations::Migration]| {
        pending.iter().map(|m| m.version).collect::<Vec<u32>>()
    };
    let pending = versions(&runner.pending(client).await?);
    if pending.is_empty() {
        return Ok(None);
    }
    let applied = match approval {
        Approval::Unknown(value) => {
            return Ok(Some(Migrated::ApprovalUnknown {
                value: value.clone(),
                versions: pending,
                applied_version: applied_version(client).await?,
            }))
        }
        Approval::UpTo(v) if pending.iter().any(|p| p <= v) => {
            describe(&runner.up_to(*v).up(client).await?)
        }
        _ => Vec::new(),
    };
    let pending = versions(&runner.pending(client).await?);
    if pending.is_empty() {
        return Ok(Some(Migrated::Current {
            applied,
            version: runner.latest_version(),
        }));
    }
    Ok(Some(Migrated::Pending {
        versions: pending,
        applied_version: applied_version(client).await?,
        applied,
    }))
}

/// What the migrate step leaves for the steps after it.
#[derive(Debug)]
pub struct SchemaCurrent {
    /// The superuser connection, handed on.
    pub admin: Client,
    /// The schema version (the one this operator embeds).
    pub version: i32,
}

/// Why the migrate step did not finish, with the version the database is at.
#[derive(Debug)]
pub struct SchemaHeld {
    /// Why, for the condition.
    pub waiting: Waiting,
    /// The highest applied version, if known.
    pub applied_version: Option<i32>,
}

/// What the step did, for the status: the schema, or why it is held, and what is
/// pending and approved.
#[derive(Debug)]
pub struct Report {
    /// The schema is current, or held.
    pub outcome: Result<SchemaCurrent, SchemaHeld>,
    /// Pending versions and the approval acted on (`Manual` policy only).
    pub migrations: Option<MigrationsStatus>,
}

fn as_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn joined(versions: &[u32]) -> String {
    versions
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the step on the connection the bootstrap step opened; `approval` is the
/// store's `umstore.io/approve-migrations` annotation.
pub async fn run(
    v: &Validated,
    bootstrapped: Bootstrapped,
    approval: Option<&str>,
    journal: &mut Journal,
) -> Result<Report, Error> {
    let mut client = bootstrapped.admin;
    let policy = v.spec.migrations.policy;
    let approval = Approval::parse(approval, &Runner::default());
    let approved = match (&approval, policy) {
        (Approval::UpTo(version), MigrationPolicy::Manual) => Some(as_i32(*version)),
        _ => None,
    };
    let status = |pending: &[u32]| {
        (policy == MigrationPolicy::Manual).then(|| MigrationsStatus {
            pending: pending.iter().copied().map(as_i32).collect(),
            approved,
            approved_generation: approved.and(v.generation),
        })
    };
    let applied_event = |journal: &mut Journal, applied: &[String], version: String| {
        if !applied.is_empty() {
            let how = match approved {
                Some(a) => format!(" as approved up to {a} by {APPROVE_ANNOTATION}"),
                None => String::new(),
            };
            journal.event(
                EventType::Normal,
                Reason::MigrationsApplied,
                format!("applied migrations {}{how} ({version})", applied.join(", ")),
            );
        }
    };
    Ok(match migrate(&mut client, policy, &approval).await? {
        Migrated::Current { applied, version } => {
            applied_event(journal, &applied, format!("schema version {version}"));
            Report {
                outcome: Ok(SchemaCurrent {
                    admin: client,
                    version: as_i32(version),
                }),
                migrations: status(&[]),
            }
        }
        Migrated::Pending {
            versions,
            applied_version,
            applied,
        } => {
            let at = applied_version.map_or("none".to_string(), |a| a.to_string());
            applied_event(journal, &applied, format!("schema version {at}"));
            let how = match approved {
                Some(a) if versions.iter().all(|p| as_i32(*p) > a) => format!(
                    "migrations up to {a} are applied as approved; approve the rest with \
                     the annotation {APPROVE_ANNOTATION}: \"{}\"",
                    versions.last().copied().unwrap_or_default()
                ),
                _ => format!(
                    "approve them with the annotation {APPROVE_ANNOTATION}: \"{}\" (or set \
                     the policy to Auto)",
                    versions.last().copied().unwrap_or_default()
                ),
            };
            Report {
                outcome: Err(SchemaHeld {
                    waiting: Waiting::new(
                        Reason::MigrationsPending,
                        format!(
                            "migrations {} are pending (schema at version {at}) and \
                             spec.migrations.policy is Manual: {how}",
                            joined(&versions)
                        ),
                        Some(RECHECK),
                    ),
                    applied_version: applied_version.map(as_i32),
                }),
                migrations: status(&versions),
            }
        }
        Migrated::ApprovalUnknown {
            value,
            versions,
            applied_version,
        } => Report {
            outcome: Err(SchemaHeld {
                waiting: Waiting::new(
                    Reason::MigrationApprovalUnknown,
                    approval_unknown(&value, Runner::default().latest_version(), &versions),
                    None,
                ),
                applied_version: applied_version.map(as_i32),
            }),
            migrations: status(&versions),
        },
        Migrated::Refused(e) => Report {
            outcome: Err(SchemaHeld {
                waiting: Waiting::new(
                    if matches!(e, MigrateError::Apply { .. }) {
                        Reason::MigrationFailed
                    } else {
                        Reason::MigrationRefused
                    },
                    e.to_string(),
                    Some(RECHECK),
                ),
                applied_version: None,
            }),
            migrations: None,
        },
    })
}

/// A refusal needs a person (a failed migration, changed or unknown applied
/// migrations); a lost connection is an error retried with backoff.
fn is_refusal(e: &MigrateError) -> bool {
    !matches!(e, MigrateError::Database { .. })
}

/// The highest applied version, if any.
async fn applied_version(client: &Client) -> Result<Option<u32>, MigrateError> {
    let sql = format!("SELECT max(version)::int4 FROM {MIGRATIONS_TABLE}");
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&MIGRATIONS_TABLE])
        .await
        .map_err(MigrateError::db("looking for the migrations table"))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let version: Option<i32> = client
        .query_one(&sql, &[])
        .await
        .map_err(MigrateError::db("reading the schema version"))?
        .get(0);
    Ok(version.and_then(|v| u32::try_from(v).ok()))
}
