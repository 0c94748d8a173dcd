//! `stats refresh`: refreshes the materialized stats views (a CronJob's
//! command, and the step after a bulk import).

use anyhow::{Context, Result};
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::db::Database;
use umstore_data_plane::stats::views;
use umstore_migrations::Runner;

/// What `stats` does.
#[derive(Debug, clap::Subcommand)]
pub enum StatsAction {
    /// Refresh every stats view concurrently (reads go on meanwhile), as a
    /// login that may (the writer, or an administrator). Waits for a refresh
    /// under way elsewhere, then refreshes, so what was committed before the
    /// command started is in the views when it returns.
    Refresh {
        /// Do not wait: exit at once when another session is refreshing.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Runs a `stats` command: on every cluster of a store with several, each
/// line prefixed with the cluster's name.
pub async fn run(action: StatsAction, database: &Database, layout: Option<&Layout>) -> Result<()> {
    let StatsAction::Refresh { no_wait } = action;
    let targets: Vec<(Option<String>, Database)> = match layout {
        None => vec![(None, database.clone())],
        Some(layout) => layout
            .clusters()
            .iter()
            .zip(layout.writers(database))
            .map(|(c, db)| (Some(c.name.clone()), db))
            .collect(),
    };
    for (name, database) in targets {
        let client = database
            .connect()
            .await
            .with_context(|| format!("cluster {}", name.as_deref().unwrap_or("-")))?;
        Runner::default()
            .verify(&client)
            .await
            .context("the schema must be current to refresh the stats views: run `migrate up`")?;
        for line in refresh(&client, !no_wait).await? {
            match &name {
                Some(name) => println!("{name}: {line}"),
                None => println!("{line}"),
            }
        }
    }
    Ok(())
}

/// Refreshes the views and says what happened, one line per view.
pub async fn refresh(client: &tokio_postgres::Client, wait: bool) -> Result<Vec<String>> {
    let done = views::refresh(client, wait).await?;
    Ok(done
        .into_iter()
        .map(|r| match (r.refreshed, r.groups, r.duration_ms) {
            (true, Some(groups), Some(ms)) => {
                format!("refreshed {}: {groups} groups in {ms} ms", r.view)
            }
            (true, _, _) => format!("refreshed {}", r.view),
            (false, _, _) => format!(
                "skipped {}: another session is refreshing it (run without --no-wait to wait)",
                r.view
            ),
        })
        .collect())
}
