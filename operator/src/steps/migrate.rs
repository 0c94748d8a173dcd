//! Step 5, migrate: the schema migrations embedded in this operator (the same
//! `umstore-migrations` the data plane is built with) applied to the store's
//! database as the superuser, under the runner's advisory lock.
//!
//! `spec.migrations.policy: Auto` applies what is pending; `Manual` applies nothing
//! and holds the pipeline with a condition naming the pending versions. A database
//! ahead of this operator, or a migration changed after it was applied, stops the
//! pipeline with the runner's message instead of retrying in a loop: both need a
//! person.

use std::time::Duration;

use kube::runtime::events::EventType;
use tokio_postgres::Client;
use umstore_crds::MigrationPolicy;
use umstore_migrations::{MigrateError, Runner, MIGRATIONS_TABLE};

use super::bootstrap::Bootstrapped;
use super::{Journal, Reason, Waiting};
use crate::error::Error;
use crate::validated::Validated;

/// How often a store held by pending manual migrations or a refused schema is looked at.
pub const RECHECK: Duration = Duration::from_secs(60);

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
    /// `Manual` policy and migrations are pending: nothing was applied.
    Pending {
        /// Pending versions.
        versions: Vec<u32>,
        /// The highest applied version, if any.
        applied_version: Option<u32>,
    },
    /// The runner refused or a migration failed; needs a person.
    Refused(MigrateError),
}

/// Brings the schema to the embedded version (`Auto`) or reports what is pending
/// (`Manual`). Migration 0009 lets the purpose roles read the migrations table.
pub async fn migrate(client: &mut Client, policy: MigrationPolicy) -> Result<Migrated, Error> {
    let runner = Runner::default();
    let latest = runner.latest_version();
    let checked = match policy {
        MigrationPolicy::Auto => runner.up(client).await.map(|report| {
            report
                .applied
                .iter()
                .map(|(version, name, _)| format!("{version} ({name})"))
                .collect::<Vec<_>>()
        }),
        MigrationPolicy::Manual => match runner.pending(client).await {
            Ok(pending) if pending.is_empty() => Ok(Vec::new()),
            Ok(pending) => {
                let versions = pending.iter().map(|m| m.version).collect();
                return Ok(Migrated::Pending {
                    versions,
                    applied_version: applied_version(client).await?,
                });
            }
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

/// Runs the step on the connection the bootstrap step opened.
pub async fn run(
    v: &Validated,
    bootstrapped: Bootstrapped,
    journal: &mut Journal,
) -> Result<Result<SchemaCurrent, SchemaHeld>, Error> {
    let mut client = bootstrapped.admin;
    let as_i32 = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    Ok(
        match migrate(&mut client, v.spec.migrations.policy).await? {
            Migrated::Current { applied, version } => {
                if !applied.is_empty() {
                    journal.event(
                        EventType::Normal,
                        Reason::MigrationsApplied,
                        format!(
                            "applied migrations {} (schema version {version})",
                            applied.join(", ")
                        ),
                    );
                }
                Ok(SchemaCurrent {
                    admin: client,
                    version: as_i32(version),
                })
            }
            Migrated::Pending {
                versions,
                applied_version,
            } => {
                let versions: Vec<String> = versions.iter().map(u32::to_string).collect();
                Err(SchemaHeld {
                    waiting: Waiting::new(
                        Reason::MigrationsPending,
                        format!(
                        "migrations {} are pending and spec.migrations.policy is Manual: set it \
                         to Auto, or run `umstore-data-plane migrate up` against the \
                         coordinator as the admin role",
                        versions.join(", ")
                    ),
                        Some(RECHECK),
                    ),
                    applied_version: applied_version.map(as_i32),
                })
            }
            Migrated::Refused(e) => Err(SchemaHeld {
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
        },
    )
}

/// A refusal needs a person (a failed migration, changed or unknown applied
/// migrations); a lost connection is an error retried with backoff.
fn is_refusal(e: &MigrateError) -> bool {
    !matches!(e, MigrateError::Database { .. })
}

/// The highest applied version, if any.
async fn applied_version(client: &Client) -> Result<Option<u32>, Error> {
    let sql = format!("SELECT max(version)::int4 FROM {MIGRATIONS_TABLE}");
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&MIGRATIONS_TABLE])
        .await
        .map_err(Error::db("looking for the migrations table"))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let version: Option<i32> = client
        .query_one(&sql, &[])
        .await
        .map_err(Error::db("reading the schema version"))?
        .get(0);
    Ok(version.and_then(|v| u32::try_from(v).ok()))
}
