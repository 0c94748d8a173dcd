use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_postgres::Client;
use tracing::{info, info_span, Instrument};

use crate::roles::{with_advisory_lock, AdvisoryLock};
use crate::MigrateError;

/// Table recording applied migrations.
pub const MIGRATIONS_TABLE: &str = "umstore.schema_migrations";

/// Key of the session-level advisory lock held while migrating
/// (`pg_advisory_lock`); the bytes spell "umstmigr".
pub const ADVISORY_LOCK_KEY: i64 = AdvisoryLock::Migrate.key();

/// One versioned migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// Version, strictly increasing.
    pub version: u32,
    /// Short name (the file name without version and extension).
    pub name: &'static str,
    /// The SQL, run as one transaction.
    pub sql: &'static str,
}

impl Migration {
    /// SHA-256 of the SQL text, hex encoded.
    pub fn checksum(&self) -> String {
        checksum(self.sql)
    }
}

/// SHA-256 of a migration's text, hex encoded.
pub fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

macro_rules! migration {
    ($version:literal, $prefix:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../sql/", $prefix, "_", $name, ".sql")),
        }
    };
}

/// The migrations embedded in this binary, in order.
pub fn embedded() -> Vec<Migration> {
    vec![
        migration!(1, "0001", "roles"),
        migration!(2, "0002", "regions_and_directory"),
        migration!(3, "0003", "user_metadata"),
        migration!(4, "0004", "user_derived_risk_eligibility"),
        migration!(5, "0005", "keys_events_outbox"),
        migration!(6, "0006", "access_control"),
        migration!(7, "0007", "pg_stat_statements"),
        migration!(8, "0008", "key_management"),
        migration!(9, "0009", "schema_version_reads"),
        migration!(10, "0010", "ingest"),
        migration!(11, "0011", "stats_views"),
        migration!(12, "0012", "user_routes"),
        migration!(13, "0013", "region_moves"),
        migration!(14, "0014", "bulk_imports"),
    ]
}

/// A migration as recorded in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Version.
    pub version: u32,
    /// Name at the time it was applied.
    pub name: String,
    /// Checksum at the time it was applied.
    pub checksum: String,
    /// When it was applied (RFC 3339).
    pub applied_at: String,
    /// How long it took, in milliseconds.
    pub duration_ms: i64,
}

/// The state of one migration against a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// Applied with the same text as embedded.
    Applied(AppliedMigration),
    /// Applied, but the embedded text differs.
    Changed {
        /// What the database recorded.
        applied: AppliedMigration,
        /// Checksum of the text embedded in this binary.
        embedded_checksum: String,
    },
    /// Not applied yet.
    Pending,
    /// Applied in the database, unknown to this binary.
    Unknown(AppliedMigration),
}

/// One line of `migrate status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Version.
    pub version: u32,
    /// Name.
    pub name: String,
    /// State against the database.
    pub state: MigrationState,
}

/// What `up` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UpReport {
    /// Migrations applied by this run, with how long each took.
    pub applied: Vec<(u32, &'static str, Duration)>,
    /// Migrations that were already applied.
    pub already_applied: usize,
}

/// Applies and checks migrations.
#[derive(Debug, Clone)]
pub struct Runner {
    migrations: Vec<Migration>,
}

impl Default for Runner {
    fn default() -> Self {
        Self::new(embedded())
    }
}

impl Runner {
    /// A runner over the given migrations (sorted by version).
    pub fn new(mut migrations: Vec<Migration>) -> Self {
        migrations.sort_by_key(|m| m.version);
        Self { migrations }
    }

    /// The migrations this runner knows, in order.
    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// A runner over this one's migrations up to `version` included (an approval
    /// of migrations up to that version).
    pub fn up_to(&self, version: u32) -> Self {
        Self::new(
            self.migrations
                .iter()
                .filter(|m| m.version <= version)
                .cloned()
                .collect(),
        )
    }

    /// The newest version this runner knows (the schema version it expects).
    pub fn latest_version(&self) -> u32 {
        self.migrations.last().map_or(0, |m| m.version)
    }

    /// Applies every pending migration, each in its own transaction, holding
    /// the advisory lock. Refuses to apply anything when an applied migration
    /// changed or the database is ahead of this binary.
    pub async fn up(&self, client: &mut Client) -> Result<UpReport, MigrateError> {
        with_advisory_lock(
            client,
            AdvisoryLock::Migrate,
            |what, source| MigrateError::Database {
                what: if what == "taking" {
                    "taking the migration advisory lock"
                } else {
                    "releasing the migration advisory lock"
                },
                source,
            },
            async |client| self.up_locked(client).await,
        )
        .await
    }

    async fn up_locked(&self, client: &mut Client) -> Result<UpReport, MigrateError> {
        client
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS umstore;
                 CREATE TABLE IF NOT EXISTS umstore.schema_migrations (
                     version      integer PRIMARY KEY,
                     name         text NOT NULL,
                     checksum     text NOT NULL,
                     applied_at   timestamptz NOT NULL DEFAULT now(),
                     duration_ms  bigint NOT NULL,
                     applied_by   text NOT NULL DEFAULT current_user
                 );",
            )
            .await
            .map_err(MigrateError::db("creating umstore.schema_migrations"))?;
        let statuses = self.status(client).await?;
        check_consistent(&statuses)?;

        let mut report = UpReport::default();
        for (migration, status) in self.migrations.iter().zip(&statuses) {
            if status.state != MigrationState::Pending {
                report.already_applied += 1;
                continue;
            }
            let span = info_span!(
                "migration",
                version = migration.version,
                name = migration.name
            );
            let took = apply_one(client, migration).instrument(span).await?;
            report
                .applied
                .push((migration.version, migration.name, took));
        }
        Ok(report)
    }

    /// The state of every known migration, then any the database has that this
    /// binary does not know.
    pub async fn status(&self, client: &Client) -> Result<Vec<MigrationStatus>, MigrateError> {
        let applied = read_applied(client).await?;
        let mut out: Vec<MigrationStatus> = self
            .migrations
            .iter()
            .map(|m| {
                let state = match applied.iter().find(|a| a.version == m.version) {
                    None => MigrationState::Pending,
                    Some(a) if a.checksum == m.checksum() => MigrationState::Applied(a.clone()),
                    Some(a) => MigrationState::Changed {
                        applied: a.clone(),
                        embedded_checksum: m.checksum(),
                    },
                };
                MigrationStatus {
                    version: m.version,
                    name: m.name.to_owned(),
                    state,
                }
            })
            .collect();
        for a in applied {
            if !self.migrations.iter().any(|m| m.version == a.version) {
                out.push(MigrationStatus {
                    version: a.version,
                    name: a.name.clone(),
                    state: MigrationState::Unknown(a),
                });
            }
        }
        Ok(out)
    }

    /// Succeeds when every migration is applied with unchanged text.
    pub async fn verify(&self, client: &Client) -> Result<(), MigrateError> {
        let statuses = self.status(client).await?;
        check_consistent(&statuses)?;
        let pending: Vec<_> = statuses
            .iter()
            .filter(|s| s.state == MigrationState::Pending)
            .collect();
        match pending.first() {
            None => Ok(()),
            Some(first) => Err(MigrateError::Pending {
                count: pending.len(),
                first: format!("{:04}_{}", first.version, first.name),
            }),
        }
    }

    /// The migrations `up` would apply now, without applying them.
    pub async fn pending(&self, client: &Client) -> Result<Vec<&Migration>, MigrateError> {
        let statuses = self.status(client).await?;
        check_consistent(&statuses)?;
        Ok(self
            .migrations
            .iter()
            .zip(&statuses)
            .filter(|(_, s)| s.state == MigrationState::Pending)
            .map(|(m, _)| m)
            .collect())
    }
}

fn check_consistent(statuses: &[MigrationStatus]) -> Result<(), MigrateError> {
    for s in statuses {
        match &s.state {
            MigrationState::Changed {
                applied,
                embedded_checksum,
            } => {
                return Err(MigrateError::ChecksumMismatch {
                    version: s.version,
                    name: s.name.clone(),
                    applied: applied.checksum.clone(),
                    embedded: embedded_checksum.clone(),
                });
            }
            MigrationState::Unknown(a) => {
                return Err(MigrateError::UnknownApplied {
                    version: a.version,
                    name: a.name.clone(),
                });
            }
            MigrationState::Applied(_) | MigrationState::Pending => {}
        }
    }
    Ok(())
}

async fn read_applied(client: &Client) -> Result<Vec<AppliedMigration>, MigrateError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('umstore.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(MigrateError::db("looking for umstore.schema_migrations"))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT version, name, checksum,
                    to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                    duration_ms
             FROM umstore.schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(MigrateError::db("reading umstore.schema_migrations"))?;
    Ok(rows
        .iter()
        .map(|r| AppliedMigration {
            version: u32::try_from(r.get::<_, i32>(0)).unwrap_or_default(),
            name: r.get(1),
            checksum: r.get(2),
            applied_at: r.get(3),
            duration_ms: r.get(4),
        })
        .collect())
}

async fn apply_one(client: &mut Client, m: &Migration) -> Result<Duration, MigrateError> {
    let apply_err = |source| MigrateError::Apply {
        version: m.version,
        name: m.name,
        source,
    };
    let started = Instant::now();
    let tx = client.transaction().await.map_err(apply_err)?;
    tx.batch_execute(m.sql).await.map_err(apply_err)?;
    let took = started.elapsed();
    let version = i32::try_from(m.version).unwrap_or(i32::MAX);
    let duration_ms = i64::try_from(took.as_millis()).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO umstore.schema_migrations (version, name, checksum, duration_ms)
         VALUES ($1, $2, $3, $4)",
        &[&version, &m.name, &m.checksum(), &duration_ms],
    )
    .await
    .map_err(apply_err)?;
    tx.commit().await.map_err(apply_err)?;
    info!(took_ms = duration_ms, "applied migration");
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regions::REGIONS;

    #[test]
    fn embedded_versions_strictly_increase_from_one() {
        let migrations = embedded();
        for (i, m) in migrations.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{} is out of sequence", m.name);
            assert!(!m.sql.trim().is_empty(), "{} is empty", m.name);
        }
    }

    #[test]
    fn regions_migration_lists_exactly_the_36_regions() {
        let sql = embedded()
            .into_iter()
            .find(|m| m.version == 2)
            .map(|m| m.sql)
            .unwrap_or("");
        for r in REGIONS {
            let row = format!("('{}', '{}', ", r.code, r.name);
            assert!(
                sql.contains(&row),
                "region {} missing from migration 0002",
                r.code
            );
        }
        let rows: Vec<&str> = sql
            .lines()
            .filter(|l| l.trim_start().starts_with("('"))
            .collect();
        assert_eq!(rows.len(), 36);
        assert_eq!(
            rows.iter().filter(|l| l.contains("', 'state')")).count(),
            28
        );
        assert_eq!(
            rows.iter()
                .filter(|l| l.contains("', 'union_territory')"))
                .count(),
            8
        );
    }

    #[test]
    fn no_citus_statements_in_base_migrations() {
        for m in embedded() {
            for word in [
                "create_distributed_table",
                "create_reference_table",
                "citus",
            ] {
                assert!(!m.sql.contains(word), "{} mentions {word}", m.name);
            }
        }
    }

    #[test]
    fn checksum_changes_with_any_byte() {
        assert_ne!(checksum("SELECT 1;"), checksum("SELECT 1; "));
        assert_eq!(checksum("SELECT 1;").len(), 64);
    }
}
