//! `bulk import|stats`: backfills and whole-region aggregations on the bulk
//! engine (`--engine auto|cpu|gpu`, docs/bulk.md).

use std::path::Path;

use anyhow::Result;
use umstore_data_plane::bulk::EngineChoice;
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::db::Database;

use super::{bulk_import, bulk_stats, KeyArgs};

/// Parses `--engine`.
pub fn parse_engine(s: &str) -> Result<EngineChoice, String> {
    s.parse()
}

/// What `bulk` does.
#[derive(Debug, clap::Subcommand)]
pub enum BulkAction {
    /// Import users from a JSON Lines or CSV file of `METADATA_CREATED`
    /// payloads: validated, sealed on the bulk engine, loaded with COPY.
    /// Resumable: run the same command again after a crash.
    Import(Box<bulk_import::ImportArgs>),
    /// The stats endpoint's grouped counts and averages over whole regions,
    /// computed on the bulk engine from a replica.
    Stats(bulk_stats::StatsArgs),
}

/// Runs `bulk <action>`.
pub async fn run(
    action: BulkAction,
    database: &Database,
    layout: Option<&Layout>,
    data_dir: &Path,
    key_args: &KeyArgs,
) -> Result<()> {
    match action {
        BulkAction::Import(args) => {
            bulk_import::run(*args, database, layout, data_dir, key_args).await
        }
        BulkAction::Stats(args) => bulk_stats::run(args, database, layout).await,
    }
}
