//! `serve --stats-refresh-interval`: refreshes the stats views on a schedule.
//! Every data-plane pod may run it; the refresh function's advisory lock lets
//! one refresh at a time, and a pod that finds one under way skips its turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::views::{self, STATS_GROUPS};
use crate::db::Database;
use crate::metrics::Metrics;

/// Refreshes every `interval` (the first one `interval` after start) on a
/// connection of its own, as the login `database` names (the writer's, which
/// may run `umstore.refresh_stats_views`). Runs until cancelled.
pub async fn run(database: Database, interval: Duration, metrics: Arc<Metrics>) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match database.connect().await {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!(error = %e, "stats refresh: cannot connect; trying at the next tick");
                    metrics.stats_refreshed(STATS_GROUPS, "failed", None);
                    continue;
                }
            };
        }
        let Some(c) = client.as_ref() else {
            continue;
        };
        let started = Instant::now();
        match views::refresh(c, false).await {
            Ok(done) => {
                for r in done {
                    if r.refreshed {
                        info!(
                            view = %r.view,
                            groups = r.groups,
                            duration_ms = r.duration_ms,
                            "stats view refreshed"
                        );
                        metrics.stats_refreshed(&r.view, "refreshed", Some(started.elapsed()));
                        metrics.stats_view_age(&r.view, 0.0);
                    } else {
                        debug!(view = %r.view, "stats view: another session is refreshing it");
                        metrics.stats_refreshed(&r.view, "skipped", None);
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "stats refresh failed; trying at the next tick");
                metrics.stats_refreshed(STATS_GROUPS, "failed", None);
            }
        }
    }
}
