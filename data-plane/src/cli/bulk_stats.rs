//! `bulk stats`: the stats endpoint's grouped counts and averages over whole
//! regions, on the bulk engine.

use anyhow::{bail, Result};
use umstore_data_plane::bulk::EngineChoice;
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::db::Database;

/// The arguments of `bulk stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Which engine computes the aggregates.
    #[arg(long, default_value = "auto", value_parser = super::bulk::parse_engine)]
    engine: EngineChoice,
}

/// Runs `bulk stats`.
pub async fn run(args: StatsArgs, _database: &Database, _layout: Option<&Layout>) -> Result<()> {
    bail!("bulk stats --engine {} is not built yet", args.engine)
}
