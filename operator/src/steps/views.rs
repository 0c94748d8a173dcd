//! The stats views' refreshes for the status: when each materialized stats view
//! was last refreshed, read from the store's refresh log (`umstore.stats_refreshes`,
//! migration 0011) on the connection migrate used. The data plane refreshes the
//! views (`serve --stats-refresh-interval`, one pod at a time); the operator only
//! reports them, and only for a store whose spec schedules refreshes.
//!
//! A probe like the replica lag: no condition, never stops the pipeline, bounded by
//! [`TIMEOUT`] (on the server by a transaction-local `statement_timeout`, and here
//! by a timer, so a probe cut short leaves the connection free for the steps
//! after it); a failed probe leaves the last reading in the status.

use std::time::Duration;

use tokio_postgres::Client;
use tracing::warn;
use umstore_crds::{StatsViewStatus, StatsViewsSpec};

use crate::error::Error;
use crate::validated::Validated;

/// How long the probe may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Each view's last refresh, oldest first (RFC 3339 in UTC, millisecond precision).
const REFRESHES: &str = "\
    SELECT view_name, \
           to_char(refreshed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
           duration_ms, groups \
      FROM umstore.stats_refreshes \
     ORDER BY refreshed_at, view_name";

/// Why the probe gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum ViewsError {
    /// The coordinator did not answer in time.
    #[error("reading umstore.stats_refreshes took longer than {0:?}; the coordinator is slow or overloaded")]
    Timeout(Duration),
    /// The query failed.
    #[error(transparent)]
    Database(#[from] Error),
}

/// The refresh schedule the data plane runs for this store: `spec.statsViews`, else
/// the defaults from tier 4; none below tier 4 unless the spec asks.
pub fn schedule(v: &Validated) -> Option<StatsViewsSpec> {
    match &v.spec.stats_views {
        Some(views) => Some(views.clone()),
        None if v.tier >= 4 => Some(StatsViewsSpec::default()),
        None => None,
    }
}

/// Reads every view's last refresh within `timeout`.
pub async fn refreshes(
    client: &mut Client,
    timeout: Duration,
) -> Result<Vec<StatsViewStatus>, ViewsError> {
    let millis = timeout
        .as_millis()
        .clamp(1, u128::from(u32::MAX))
        .to_string();
    let query = async {
        let db = |action: &str| Error::db(action.to_string());
        let tx = client
            .transaction()
            .await
            .map_err(db("starting the stats views probe"))?;
        tx.execute(
            "SELECT set_config('statement_timeout', $1, true)",
            &[&millis],
        )
        .await
        .map_err(db("bounding the stats views probe"))?;
        let rows = tx
            .query(REFRESHES, &[])
            .await
            .map_err(db("reading umstore.stats_refreshes"))?;
        tx.commit()
            .await
            .map_err(db("ending the stats views probe"))?;
        Ok::<_, Error>(rows)
    };
    let rows = tokio::time::timeout(timeout, query)
        .await
        .map_err(|_| ViewsError::Timeout(timeout))??;
    Ok(rows
        .iter()
        .map(|row| StatsViewStatus {
            name: row.get(0),
            cluster: None,
            refreshed_at: row.get(1),
            duration_ms: row.get(2),
            groups: row.get(3),
        })
        .collect())
}

/// The status's `statsViews`: empty when no refresh is scheduled, the refresh log
/// when one is, `None` (keep the last reading) when it could not be read (logged).
pub async fn measure(v: &Validated, client: &mut Client) -> Option<Vec<StatsViewStatus>> {
    if schedule(v).is_none() {
        return Some(Vec::new());
    }
    match refreshes(client, TIMEOUT).await {
        Ok(views) => Some(views),
        Err(error) => {
            warn!(%error, "stats views not read; the status keeps the last reading");
            None
        }
    }
}
