//! `regions move|status`: moving a region between the clusters of a store
//! with several (docs/data-model.md, "Moving a region between clusters").
//! The operator runs the same move as a reconcile step; this is the command a
//! person (or a test) runs by hand, as an administrator of every cluster.

use anyhow::{bail, Context, Result};
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::db::Database;
use umstore_data_plane::ingest::parse_duration;
use umstore_data_plane::stats::views;
use umstore_migrations::moves::{self, Clusters, MoveError, MoveOptions, Phase};
use umstore_migrations::Runner;

/// What `regions` does.
#[derive(Debug, clap::Subcommand)]
pub enum RegionsAction {
    /// Move one region to another cluster, online: copy, catch up, a short
    /// write fence for that region only, switch, clean up. Run it again after
    /// a crash or an interruption: it resumes the unfinished move.
    Move {
        /// The region (two-letter code).
        #[arg(long)]
        region: String,
        /// The cluster it goes to (a name in --clusters).
        #[arg(long)]
        to: String,
        /// How long the source keeps the region's rows after the switch:
        /// longer than the data plane's --placement-refresh.
        #[arg(long, default_value = "10s")]
        grace: String,
        /// Stop after this phase is recorded and wait to be killed (tests of
        /// a mover crashing at each phase).
        #[arg(long, hide = true, value_parser = ["copying", "catching_up", "fenced", "switched"])]
        hold_after: Option<String>,
    },
    /// Which cluster holds each region, and the moves under way and recent.
    Status,
}

fn phase(name: &str) -> Option<Phase> {
    [
        Phase::Copying,
        Phase::CatchingUp,
        Phase::Fenced,
        Phase::Switched,
    ]
    .into_iter()
    .find(|p| p.as_str() == name)
}

/// Runs `regions <action>` as `database`'s login (an administrator) on every
/// cluster of `layout`.
pub async fn run(
    action: RegionsAction,
    database: &Database,
    layout: Option<&Layout>,
) -> Result<()> {
    let Some(layout) = layout else {
        bail!(
            "regions: the store has one cluster; give --clusters (UMSTORE_CLUSTERS) with at \
             least two to move a region between them"
        );
    };
    let dbs = layout.writers(database);
    let connect = |i: usize| {
        let name = layout.clusters()[i].name.clone();
        let db = dbs[i].clone();
        async move {
            db.connect()
                .await
                .with_context(|| format!("connecting to cluster {name}"))
        }
    };
    let home = connect(0).await?;
    let seed: Vec<(String, String)> = layout
        .clusters()
        .iter()
        .flat_map(|c| c.regions.iter().map(|r| (r.clone(), c.name.clone())))
        .collect();
    match action {
        RegionsAction::Status => {
            let placed = moves::placement(&home).await?;
            if placed.is_empty() {
                println!("placement: none recorded yet; the layout says:");
                for (region, cluster) in &seed {
                    println!("  {region} → {cluster}");
                }
            } else {
                println!("placement:");
                for (region, cluster) in &placed {
                    println!("  {region} → {cluster}");
                }
            }
            for m in moves::journal(&home, 10).await? {
                println!(
                    "move {} of {}: {} → {}, {}{}{}",
                    m.id,
                    m.region,
                    m.from,
                    m.to,
                    m.phase,
                    m.fence_ms
                        .map(|f| format!(", fence {f:.0} ms"))
                        .unwrap_or_default(),
                    m.finished_at
                        .map(|f| format!(", finished {f}"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        RegionsAction::Move {
            region,
            to,
            grace,
            hold_after,
        } => {
            let Some(target_index) = layout.index_of(&to) else {
                bail!(
                    "--to {to:?} is none of the clusters in --clusters ({})",
                    layout
                        .clusters()
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            let seeded = moves::seed_placement(&home, &seed).await?;
            if seeded > 0 {
                println!("placement: recorded {seeded} regions as the layout has them");
            }
            let placed = moves::placement(&home).await?;
            let unfinished = moves::journal(&home, 0)
                .await?
                .into_iter()
                .find(|m| m.region == region && m.finished_at.is_none());
            let from = match (&unfinished, placed.iter().find(|(r, _)| *r == region)) {
                (Some(m), _) => m.from.clone(),
                (None, Some((_, c))) => c.clone(),
                (None, None) => bail!(
                    "region {region:?} is in no cluster of the placement: name a region the \
                     store serves"
                ),
            };
            let Some(source_index) = layout.index_of(&from) else {
                bail!(
                    "region {region} is placed in cluster {from}, which --clusters does not name"
                );
            };
            let options = MoveOptions {
                grace: parse_duration(&grace).map_err(|e| anyhow::anyhow!("--grace: {e}"))?,
                pause_after: hold_after.as_deref().and_then(phase),
                ..MoveOptions::default()
            };
            let mut source = connect(source_index).await?;
            let mut target = connect(target_index).await?;
            for (name, client) in [(&from, &source), (&to, &target)] {
                Runner::default().verify(client).await.with_context(|| {
                    format!("the schema of cluster {name} must be current: run `migrate up` there")
                })?;
            }
            let result = moves::move_region(
                Clusters {
                    home: &home,
                    source: &mut source,
                    target: &mut target,
                },
                &region,
                &from,
                &to,
                &options,
            )
            .await;
            let report = match result {
                Ok(report) => report,
                Err(MoveError::Paused(phase)) => {
                    println!("holding after phase {phase}");
                    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                    bail!("held after phase {phase} for an hour; nobody stopped it");
                }
                Err(e) => return Err(e).context(format!("moving region {region} to {to}")),
            };
            if report.attempts == 0 {
                println!("region {region} is in cluster {to} already: nothing to move");
                return Ok(());
            }
            // The views of both clusters: the region's groups leave one and join the other.
            for (name, client) in [(&to, &target), (&from, &source)] {
                if let Err(e) = views::refresh(client, true).await {
                    tracing::warn!(cluster = %name, error = %e, "refreshing the stats views after the move");
                }
            }
            println!(
                "moved region {} from {} to {}: {} rows copied, {} users caught up in {} \
                 rounds, fence {} ms, {:.1} s{}",
                report.region,
                report.from,
                report.to,
                report.rows_copied,
                report.users_caught_up,
                report.catch_up_rounds,
                report
                    .fence_ms
                    .map(|f| format!("{f:.0}"))
                    .unwrap_or_else(|| "-".into()),
                report.took.as_secs_f64(),
                if report.attempts > 1 {
                    format!(" (resumed; run {})", report.attempts)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
    }
}
