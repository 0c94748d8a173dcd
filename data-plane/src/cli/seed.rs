//! `seed`: deterministic synthetic users.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use umstore_data_plane::db::Database;
use umstore_data_plane::seed;
use umstore_migrations::Runner;

use super::{open_keyring, KeyArgs};

/// The arguments of `seed`.
#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// How many users.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Seed of the generator: the same seed gives the same users.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the COPY text to one file per table in this directory instead
    /// of loading it (a baseline for `psql \copy`).
    #[arg(long)]
    write_copy_files: Option<PathBuf>,
    /// Write the users to this JSON Lines file for `bulk import` instead of
    /// loading them (plaintext synthetic personal data; nothing is stored).
    #[arg(long, conflicts_with = "write_copy_files")]
    write_import_file: Option<PathBuf>,
}

/// Loads (or writes the COPY files of) `args.users` users into a current schema.
pub async fn run(
    args: SeedArgs,
    database: &Database,
    data_dir: &Path,
    key_args: &KeyArgs,
) -> Result<()> {
    let SeedArgs {
        users,
        seed,
        write_copy_files,
        write_import_file,
    } = args;
    if let Some(path) = write_import_file {
        seed::write_import_file(&path, users, seed)?;
        println!("wrote {users} users to {}", path.display());
        return Ok(());
    }
    let mut client = database.connect().await?;
    Runner::default()
        .verify(&client)
        .await
        .context("the schema must be current before seeding: run `migrate up`")?;
    let keyring = open_keyring(key_args.provider_config(data_dir)?, &client).await?;
    if let Some(dir) = write_copy_files {
        seed::write_copy_files(&dir, users, seed, &keyring).await?;
        println!("wrote COPY files and load.psql to {}", dir.display());
        return Ok(());
    }
    // A second connection loads half of the tables in parallel.
    let mut second = database.connect().await?;
    let report = seed::seed_with(&mut client, Some(&mut second), users, seed, &keyring).await?;
    println!(
        "seeded {} users in {:.2} s ({:.0} users/s)",
        report.users,
        report.elapsed.as_secs_f64(),
        report.users_per_second()
    );
    // A bulk import: the stats views should show it (docs/api.md, "Stats").
    for line in super::stats::refresh(&client, true)
        .await
        .context("the users are loaded, but refreshing the stats views failed")?
    {
        println!("{line}");
    }
    Ok(())
}
