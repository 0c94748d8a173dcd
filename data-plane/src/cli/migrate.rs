//! `migrate up|status|verify`: the schema migrations.

use anyhow::Result;
use clap::Subcommand;
use umstore_data_plane::db::Database;
use umstore_migrations::{MigrationState, Runner};

/// What `migrate` does.
#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Apply pending migrations.
    Up {
        /// Print the SQL of pending migrations instead of applying them.
        #[arg(long)]
        dry_run: bool,
    },
    /// List applied and pending migrations.
    Status,
    /// Fail unless every migration is applied with unchanged text.
    Verify,
}

/// Runs `migrate <action>` against `database`.
pub async fn run(action: MigrateAction, database: &Database) -> Result<()> {
    let runner = Runner::default();
    let mut client = database.connect().await?;
    match action {
        MigrateAction::Up { dry_run: true } => {
            let pending = runner.pending(&client).await?;
            if pending.is_empty() {
                println!(
                    "-- nothing to apply: the schema is at version {}",
                    runner.latest_version()
                );
            }
            for m in pending {
                println!(
                    "-- migration {:04}_{} (sha256 {})\n{}",
                    m.version,
                    m.name,
                    m.checksum(),
                    m.sql
                );
            }
        }
        MigrateAction::Up { dry_run: false } => {
            let report = runner.up(&mut client).await?;
            for (version, name, took) in &report.applied {
                println!("applied {version:04}_{name} in {} ms", took.as_millis());
            }
            println!(
                "schema at version {} ({} applied now, {} already applied)",
                runner.latest_version(),
                report.applied.len(),
                report.already_applied
            );
        }
        MigrateAction::Status => {
            for s in runner.status(&client).await? {
                println!("{:04}_{:<32} {}", s.version, s.name, describe(&s.state));
            }
        }
        MigrateAction::Verify => {
            runner.verify(&client).await?;
            println!("schema is current at version {}", runner.latest_version());
        }
    }
    Ok(())
}

/// One migration's state as `migrate status` prints it.
fn describe(state: &MigrationState) -> String {
    match state {
        MigrationState::Applied(a) => format!("applied {} ({} ms)", a.applied_at, a.duration_ms),
        MigrationState::Changed {
            applied,
            embedded_checksum,
        } => format!(
            "CHANGED after it was applied (recorded {}, embedded {})",
            applied.checksum, embedded_checksum
        ),
        MigrationState::Pending => "pending".to_owned(),
        MigrationState::Unknown(a) => format!("applied {} by a newer umstore", a.applied_at),
    }
}
