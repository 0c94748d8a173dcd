//! `bulk import <file>`: backfills of many users from a file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use umstore_data_plane::bulk::EngineChoice;
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::db::Database;

use super::KeyArgs;

/// The arguments of `bulk import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The file: JSON Lines (`.jsonl`, `.ndjson`) or CSV (`.csv`).
    file: PathBuf,
    /// Which engine seals the personal data.
    #[arg(long, default_value = "auto", value_parser = super::bulk::parse_engine)]
    engine: EngineChoice,
}

/// Runs `bulk import`.
pub async fn run(
    args: ImportArgs,
    _database: &Database,
    _layout: Option<&Layout>,
    _data_dir: &Path,
    _key_args: &KeyArgs,
) -> Result<()> {
    bail!("bulk import {} is not built yet", args.file.display())
}
