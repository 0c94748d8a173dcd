//! Which cluster holds each region now: the layout's answer overridden by the
//! home cluster's `umstore.region_placement` (migration 0013), where a move of
//! a region between clusters is switched by one UPDATE (its epoch raised).
//!
//! One [`Placement`] per process, shared by the write path and the read API;
//! [`Placement::run`] reads the table at start and then every
//! `--placement-refresh`, and at once when a write was refused because its
//! cluster no longer (or not yet) serves the region
//! ([`Placement::refresh_now`]). docs/data-model.md, "Several clusters".

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{info, warn};

use super::Layout;
use crate::backoff::Backoff;
use crate::db::Database;
use crate::metrics::Metrics;

/// Every placed region: its cluster's name and the placement's epoch. One
/// round trip, no named statement (fine through PgBouncer).
pub const SELECT_PLACEMENT: &str =
    "SELECT region::text, cluster, epoch FROM umstore.region_placement";

/// One row of `umstore.region_placement`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementRow {
    /// The region code.
    pub region: String,
    /// The name of the cluster holding it.
    pub cluster: String,
    /// Raised by each switch of a move.
    pub epoch: i64,
}

/// A change of a region's cluster, as [`Placement::apply`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The region.
    pub region: String,
    /// The cluster index that held it (`None`: none did).
    pub from: Option<usize>,
    /// The cluster index that holds it now.
    pub to: Option<usize>,
    /// The placement row's epoch (0: back to the layout's answer).
    pub epoch: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Snapshot {
    /// Region → cluster index.
    by_region: BTreeMap<String, usize>,
    /// Region → the epoch of the placement row that decided it (absent: the
    /// layout decided).
    epochs: BTreeMap<String, i64>,
}

impl Snapshot {
    fn highest_epoch(&self) -> i64 {
        self.epochs.values().copied().max().unwrap_or(0)
    }
}

/// Region → cluster index, as the layout alone says.
fn layout_regions(layout: &Layout) -> BTreeMap<String, usize> {
    layout
        .clusters()
        .iter()
        .enumerate()
        .flat_map(|(i, c)| c.regions.iter().map(move |r| (r.clone(), i)))
        .collect()
}

/// The placement of every region, shared by reads and writes.
#[derive(Debug)]
pub struct Placement {
    layout: Arc<Layout>,
    current: RwLock<Snapshot>,
    loaded: AtomicBool,
    loaded_signal: Notify,
    wake: Notify,
    /// Rows already warned about (a cluster not in the layout), so that the
    /// warning is logged once, not on every refresh.
    warned: Mutex<BTreeSet<(String, String)>>,
    metrics: Option<Arc<Metrics>>,
}

impl Placement {
    /// The layout's placement, until the first [`Self::load`].
    pub fn new(layout: Arc<Layout>) -> Self {
        Self {
            current: RwLock::new(Snapshot {
                by_region: layout_regions(&layout),
                epochs: BTreeMap::new(),
            }),
            layout,
            loaded: AtomicBool::new(false),
            loaded_signal: Notify::new(),
            wake: Notify::new(),
            warned: Mutex::new(BTreeSet::new()),
            metrics: None,
        }
    }

    /// Exports the highest epoch seen in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The layout the placement starts from.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn snapshot(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        // A panic while the lock was held cannot leave a half-written
        // snapshot (it is replaced whole), so a poisoned lock is still good.
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The index of the cluster holding `region` now.
    pub fn cluster_of(&self, region: &str) -> Option<usize> {
        self.snapshot().by_region.get(region).copied()
    }

    /// The regions cluster `index` holds now.
    pub fn regions_of(&self, index: usize) -> Vec<String> {
        self.snapshot()
            .by_region
            .iter()
            .filter(|(_, &i)| i == index)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// The highest placement epoch read (0: no region placed in the table).
    pub fn epoch(&self) -> i64 {
        self.snapshot().highest_epoch()
    }

    /// Whether the table was read once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Resolves once the table was read.
    pub async fn wait_loaded(&self) {
        loop {
            let signal = self.loaded_signal.notified();
            if self.is_loaded() {
                return;
            }
            signal.await;
        }
    }

    /// Asks [`Self::run`] to read the table now (a write was refused by a
    /// cluster that does not serve its region).
    pub fn refresh_now(&self) {
        self.wake.notify_one();
    }

    /// Replaces the placement by the layout overridden by `rows`, logging and
    /// returning each region whose cluster changed. A row naming a cluster not
    /// in the layout is warned about and the layout's answer kept; a row older
    /// than one already seen for its region (a read that raced a newer one)
    /// does not undo it.
    pub fn apply(&self, rows: &[PlacementRow]) -> Vec<Moved> {
        let mut next = Snapshot {
            by_region: layout_regions(&self.layout),
            epochs: BTreeMap::new(),
        };
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        for row in rows {
            let Some(index) = self.layout.index_of(&row.cluster) else {
                let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
                if warned.insert((row.region.clone(), row.cluster.clone())) {
                    warn!(
                        region = %row.region,
                        cluster = %row.cluster,
                        epoch = row.epoch,
                        kept = ?self.layout.cluster_of(&row.region).map(|i| self.name(i)),
                        "umstore.region_placement names a cluster that is not in --clusters \
                         (UMSTORE_CLUSTERS); the layout's cluster is kept for the region: \
                         add the cluster to the layout, or correct the row"
                    );
                }
                continue;
            };
            let seen = current.epochs.get(&row.region).copied().unwrap_or(0);
            if row.epoch < seen {
                // Keep what the newer read said.
                if let Some(&i) = current.by_region.get(&row.region) {
                    next.by_region.insert(row.region.clone(), i);
                }
                next.epochs.insert(row.region.clone(), seen);
                continue;
            }
            next.by_region.insert(row.region.clone(), index);
            next.epochs.insert(row.region.clone(), row.epoch);
        }
        let mut moved = Vec::new();
        let regions: BTreeSet<&String> = current
            .by_region
            .keys()
            .chain(next.by_region.keys())
            .collect();
        for region in regions {
            let (from, to) = (
                current.by_region.get(region).copied(),
                next.by_region.get(region).copied(),
            );
            if from != to {
                let epoch = next.epochs.get(region).copied().unwrap_or(0);
                info!(
                    region = %region,
                    from = from.map_or("-", |i| self.name(i)),
                    to = to.map_or("-", |i| self.name(i)),
                    epoch,
                    "region placement changed"
                );
                moved.push(Moved {
                    region: region.clone(),
                    from,
                    to,
                    epoch,
                });
            }
        }
        if let Some(m) = &self.metrics {
            m.region_placement_epoch.set(next.highest_epoch());
        }
        *current = next;
        moved
    }

    fn name(&self, index: usize) -> &str {
        self.layout
            .clusters()
            .get(index)
            .map_or("?", |c| c.name.as_str())
    }

    /// Reads home's `umstore.region_placement` on `client` and applies it.
    pub async fn load(&self, client: &tokio_postgres::Client) -> Result<(), PlacementError> {
        let rows = client
            .query_typed(SELECT_PLACEMENT, &[])
            .await
            .map_err(|e| PlacementError::Read(crate::db::with_causes(&e)))?;
        let rows: Vec<PlacementRow> = rows
            .iter()
            .map(|r| {
                Ok(PlacementRow {
                    region: r.try_get(0)?,
                    cluster: r.try_get(1)?,
                    epoch: r.try_get(2)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| PlacementError::Read(crate::db::with_causes(&e)))?;
        self.apply(&rows);
        if !self.loaded.swap(true, Ordering::AcqRel) {
            info!(
                placed = rows.len(),
                epoch = self.epoch(),
                "region placement read from the home cluster"
            );
            self.loaded_signal.notify_waiters();
        }
        Ok(())
    }

    /// Reads the placement through `logins` (on the home cluster's primary,
    /// in order of preference: the first that connects and reads is kept)
    /// until it succeeds once (with backoff, saying why it waits), then every
    /// `every` and whenever [`Self::refresh_now`] asks. Never returns.
    pub async fn run(self: Arc<Self>, logins: Vec<Database>, every: Duration) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut client: Option<tokio_postgres::Client> = None;
        loop {
            let result = match &client {
                Some(c) if !c.is_closed() => self.load(c).await,
                _ => match self.connect(&logins).await {
                    Ok(c) => {
                        client = Some(c);
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            let wait = match result {
                Ok(()) => {
                    backoff.reset();
                    every
                }
                Err(e) => {
                    client = None;
                    let delay = backoff.next_delay();
                    if self.is_loaded() {
                        warn!(
                            error = %e,
                            retry_in_ms = delay.as_millis() as u64,
                            "cannot refresh the region placement; the last one read is used"
                        );
                    } else {
                        warn!(
                            error = %e,
                            retry_in_ms = delay.as_millis() as u64,
                            "cannot read the region placement from the home cluster; events are \
                             not consumed and reads by user id answer 503 until it is read"
                        );
                    }
                    delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// The first of `logins` that connects and reads the placement, having
    /// read it; else the last error.
    async fn connect(&self, logins: &[Database]) -> Result<tokio_postgres::Client, PlacementError> {
        let mut failed = PlacementError::Connect("no login to read it with".into());
        for login in logins {
            let client = match login.connect().await {
                Ok(c) => c,
                Err(e) => {
                    failed = PlacementError::Connect(e.to_string());
                    continue;
                }
            };
            match self.load(&client).await {
                Ok(()) => return Ok(client),
                Err(e) => failed = e,
            }
        }
        Err(failed)
    }
}

/// Why the placement could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlacementError {
    /// No connection to the home cluster.
    #[error("connecting to the home cluster: {0}")]
    Connect(String),
    /// The query failed (the table comes with migration 0013; every purpose
    /// may select it).
    #[error("reading umstore.region_placement (migration 0013) in the home cluster: {0}")]
    Read(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"[
        {"name":"home","regions":["AP","TS"],"primary":{"host":"h","port":5432}},
        {"name":"south","regions":["KA","KL"],"primary":{"host":"s","port":5432}}]"#;

    fn placement() -> Placement {
        Placement::new(Arc::new(Layout::parse(TWO).expect("layout")))
    }

    fn row(region: &str, cluster: &str, epoch: i64) -> PlacementRow {
        PlacementRow {
            region: region.into(),
            cluster: cluster.into(),
            epoch,
        }
    }

    #[test]
    fn without_rows_the_layout_decides() {
        let p = placement();
        assert!(!p.is_loaded());
        assert_eq!(p.cluster_of("KA"), Some(1));
        assert!(p.apply(&[]).is_empty());
        assert_eq!(p.cluster_of("AP"), Some(0));
        assert_eq!(p.regions_of(1), ["KA", "KL"]);
        assert_eq!(p.epoch(), 0);
    }

    #[test]
    fn a_placement_row_overrides_the_layout_and_says_what_moved() {
        let p = placement();
        // A row agreeing with the layout moves nothing.
        assert!(p.apply(&[row("AP", "home", 1)]).is_empty());
        let moved = p.apply(&[row("AP", "home", 1), row("KA", "home", 2)]);
        assert_eq!(
            moved,
            [Moved {
                region: "KA".into(),
                from: Some(1),
                to: Some(0),
                epoch: 2
            }]
        );
        assert_eq!(p.cluster_of("KA"), Some(0));
        assert_eq!(p.regions_of(0), ["AP", "KA", "TS"]);
        assert_eq!(p.regions_of(1), ["KL"]);
        assert_eq!(p.epoch(), 2);
        // Moved back by a later switch.
        p.apply(&[row("KA", "south", 3)]);
        assert_eq!(p.cluster_of("KA"), Some(1));
        assert_eq!(p.epoch(), 3);
    }

    #[test]
    fn a_row_naming_an_unknown_cluster_keeps_the_layouts_answer() {
        let p = placement();
        assert!(p.apply(&[row("KA", "north", 5)]).is_empty());
        assert_eq!(p.cluster_of("KA"), Some(1));
        assert_eq!(p.epoch(), 0);
    }

    #[test]
    fn an_older_read_does_not_undo_a_newer_one() {
        let p = placement();
        p.apply(&[row("KA", "home", 4)]);
        // A read that started before the switch and finished after it.
        assert!(p.apply(&[row("KA", "south", 3)]).is_empty());
        assert_eq!(p.cluster_of("KA"), Some(0));
        assert_eq!(p.epoch(), 4);
    }

    #[test]
    fn the_highest_epoch_is_exported() {
        let metrics = Arc::new(Metrics::new());
        let p = placement().with_metrics(metrics.clone());
        p.apply(&[row("KA", "home", 7), row("TS", "home", 2)]);
        assert_eq!(metrics.region_placement_epoch.get(), 7);
    }
}
