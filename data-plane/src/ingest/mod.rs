//! The write path: events in (NATS JetStream and HTTP), applied exactly once, and
//! events out (the outbox relay). See docs/events.md.

pub mod apply;
pub mod bus;
pub mod event;
pub mod outbox;
pub mod routes;

pub use apply::{apply, ApplyConfig, ApplyError, Outcome};
pub use event::{parse, Event, EventType, Rejection};

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::Utc;

use crate::clusters::fence::{Refusal, RegionCheck};
use crate::clusters::placement::Placement;
use crate::crypto::Keyring;
use crate::db::Database;
use crate::metrics::{IngestLabels, Metrics};

/// Parses and applies events on a pool of writer connections. Shared by the
/// JetStream workers and the HTTP endpoint.
#[derive(Clone)]
pub struct Ingest {
    /// The only cluster's writer pool, or the home cluster's.
    pool: deadpool_postgres::Pool,
    /// A store with several clusters: each cluster's writer pool.
    clusters: Option<Arc<routes::WriteClusters>>,
    keyring: Arc<Keyring>,
    config: ApplyConfig,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("pool", &self.pool.status())
            .field("config", &self.config)
            .finish()
    }
}

/// Why an [`Ingest`] could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the ingest connection pool: {0}")]
pub struct PoolError(String);

impl Ingest {
    /// A pool of up to `connections` connections to `database` (the writer
    /// login), statements prepared once per connection.
    pub fn new(
        database: &Database,
        connections: usize,
        keyring: Arc<Keyring>,
        config: ApplyConfig,
    ) -> Result<Self, PoolError> {
        Ok(Self {
            pool: writer_pool(database, connections)?,
            clusters: None,
            keyring,
            config,
            metrics: None,
        })
    }

    /// Writes each event on the cluster holding its region now (`placement`
    /// over a layout of two or more clusters; `writers`: the writer's login on
    /// each, in the layout's order), `connections` per cluster, each write
    /// checked by the region's write check.
    pub fn with_clusters(
        mut self,
        placement: Arc<Placement>,
        writers: &[Database],
        connections: usize,
    ) -> Result<Self, PoolError> {
        let pools = writers
            .iter()
            .map(|w| writer_pool(w, connections))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(home) = pools.first() {
            self.pool = home.clone();
        }
        self.clusters = Some(Arc::new(routes::WriteClusters::new(placement, pools)));
        Ok(self)
    }

    /// The index of the cluster an event for `region` is written to (0 with
    /// one cluster); `None`: no cluster holds the region.
    pub fn cluster_of(&self, region: &str) -> Option<usize> {
        match &self.clusters {
            None => Some(0),
            Some(c) => c.placement().cluster_of(region),
        }
    }

    /// Counts every settled event and times every apply in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, outcome: &'static str) {
        if let Some(m) = &self.metrics {
            m.ingest_events
                .get_or_create(&IngestLabels { outcome })
                .inc();
        }
    }

    /// Counts an event published to the dead-letter subject.
    pub fn dead_lettered(&self) {
        if let Some(m) = &self.metrics {
            m.ingest_dead_letters.inc();
        }
    }

    /// What applying uses besides the event.
    pub fn config(&self) -> &ApplyConfig {
        &self.config
    }

    /// Parses `bytes` and applies the event.
    pub async fn submit(&self, bytes: &[u8]) -> Result<(Event, Outcome), SubmitError> {
        let event = parse(bytes, Utc::now()).map_err(|r| {
            self.count("rejected");
            SubmitError::Rejected(r)
        })?;
        let outcome = self.apply(&event).await.map_err(|e| match e {
            ApplyError::Rejected(r) => SubmitError::Rejected(r),
            ApplyError::Transient(m) => SubmitError::Transient(m),
            ApplyError::RegionMoving { message, .. } => SubmitError::RegionMoving(message),
        })?;
        Ok((event, outcome))
    }

    /// Applies a parsed event on a pooled connection (of its region's
    /// cluster, where there are several, after its route is in place).
    pub async fn apply(&self, event: &Event) -> Result<Outcome, ApplyError> {
        let started = std::time::Instant::now();
        let (pool, check) = match &self.clusters {
            None => (Ok(&self.pool), RegionCheck::Off),
            Some(clusters) => (
                clusters.prepare(event, self.metrics.as_deref()).await,
                RegionCheck::On,
            ),
        };
        let result = match pool {
            Err(e) => Err(e),
            Ok(pool) => match pool.get().await {
                Ok(mut client) => {
                    apply(&mut client, &self.keyring, &self.config, event, check).await
                }
                Err(e) => Err(ApplyError::Transient(format!(
                    "no database connection: {e}"
                ))),
            },
        };
        if let Err(ApplyError::RegionMoving { refusal, .. }) = &result {
            if let Some(m) = &self.metrics {
                m.region_write_refused(refusal.as_str());
            }
            if let (Refusal::Moved, Some(clusters)) = (refusal, &self.clusters) {
                // The retry goes to the region's new cluster.
                clusters.placement().refresh_now();
            }
        }
        self.count(match &result {
            Ok(outcome) => outcome.as_str(),
            Err(ApplyError::Rejected(_)) => "rejected",
            Err(ApplyError::Transient(_)) => "failed",
            Err(ApplyError::RegionMoving { .. }) => "deferred",
        });
        if let (Some(m), Ok(Outcome::Applied { .. })) = (&self.metrics, &result) {
            m.ingest_apply_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// [`Self::apply`], trying again for up to `patience` while the event's
    /// region is moving between clusters (its fence is up for a moment, or the
    /// placement is read again): what an HTTP caller waits for rather than a
    /// 503. Other errors return at once.
    pub async fn apply_through_moves(
        &self,
        event: &Event,
        patience: std::time::Duration,
    ) -> Result<Outcome, ApplyError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut backoff = crate::backoff::Backoff::new(
            std::time::Duration::from_millis(20),
            std::time::Duration::from_millis(250),
        );
        loop {
            match self.apply(event).await {
                Err(ApplyError::RegionMoving { .. })
                    if tokio::time::Instant::now() + backoff.peek() < deadline =>
                {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                other => return other,
            }
        }
    }

    /// The primary's current WAL insert position (`X/Y`): past the commit
    /// record of every transaction committed before the call (also with
    /// `synchronous_commit = off`, where the write position may still be
    /// behind it). A replica that replayed it sees those commits.
    pub async fn wal_position(&self) -> Option<String> {
        wal_position(&self.pool).await
    }

    /// Where a read must be to see writes on the clusters `touched` (by
    /// [`Self::cluster_of`]): with one cluster its WAL position
    /// ([`Self::wal_position`]), with several `name:position` per cluster,
    /// comma-separated (positions of different clusters do not compare).
    pub async fn wal_token(&self, touched: &BTreeSet<usize>) -> Option<String> {
        let Some(clusters) = &self.clusters else {
            return self.wal_position().await;
        };
        let mut parts = Vec::new();
        for &index in touched {
            let (name, pool) = clusters.cluster(index)?;
            parts.push(format!("{name}:{}", wal_position(pool).await?));
        }
        (!parts.is_empty()).then(|| parts.join(","))
    }

    /// Records a rejection found before [`Self::apply`] (an HTTP batch item
    /// that did not parse).
    pub fn count_rejected(&self) {
        self.count("rejected");
    }
}

fn writer_pool(
    database: &Database,
    connections: usize,
) -> Result<deadpool_postgres::Pool, PoolError> {
    let manager = database.pool_manager(deadpool_postgres::ManagerConfig {
        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
    });
    deadpool_postgres::Pool::builder(manager)
        .max_size(connections.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| PoolError(e.to_string()))
}

/// The primary's current WAL insert position, on a connection of `pool`.
async fn wal_position(pool: &deadpool_postgres::Pool) -> Option<String> {
    {
        let client = pool.get().await.ok()?;
        // The simple protocol: safe through PgBouncer in transaction mode.
        let messages = client
            .simple_query("SELECT pg_current_wal_insert_lsn()::text")
            .await
            .ok()?;
        messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
    }
}

/// Why a submitted event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Never applicable: dead-letter it.
    #[error(transparent)]
    Rejected(Rejection),
    /// Retry later.
    #[error("{0}")]
    Transient(String),
    /// Retry within a second: the event's region is moving between clusters
    /// ([`ApplyError::RegionMoving`]).
    #[error("{0}")]
    RegionMoving(String),
}

/// Parses a duration written as whole numbers with units, largest first: `7d`,
/// `36h`, `1h30m`, `90m`, `45s` (what the operator passes from the resource's
/// `maxAge` and `eligibilityCacheTTL`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || {
        format!(
            "{text:?} is not a duration: write whole numbers with units d, h, m, s or ms, \
             e.g. 7d, 36h, 1h30m, 250ms"
        )
    };
    let mut total_ms: u64 = 0;
    let mut digits = String::new();
    let mut any = false;
    let mut chars = text.trim().chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            'd' => 86_400_000,
            'h' => 3_600_000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            'm' => 60_000,
            's' => 1_000,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total_ms = n
            .checked_mul(unit)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(bad)?;
        digits.clear();
        any = true;
    }
    if !any || !digits.is_empty() || total_ms == 0 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_as_the_operator_writes_them() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("36h"), Ok(Duration::from_secs(36 * 3_600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("24h0m0s"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(
            parse_duration("1m30s5ms"),
            Ok(Duration::from_millis(90_005))
        );
        for bad in ["", "7", "0s", "0ms", "1.5h", "7w", "h", "-1h", "5sm"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }
}
