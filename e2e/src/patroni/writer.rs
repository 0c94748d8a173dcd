//! A client committing numbered rows in a loop through a cluster's read-write path
//! while members are killed or switched over, and the record of what it was told:
//! which rows were acknowledged, when, and when attempts failed. The Patroni tests
//! assert on it; the failover benchmark measures with it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::PatroniCluster;
use crate::{connect, HarnessError};

/// The table the writer fills (`id bigint PRIMARY KEY`), in database `postgres`.
pub const TABLE: &str = "acknowledged_writes";

/// Rows committed (acknowledged to the client) by a [`Writer`], with when, and the
/// times of failed attempts.
#[derive(Debug, Default)]
pub struct WriteLog {
    /// Row ids whose commit was acknowledged, with when.
    pub acknowledged: Vec<(i64, Instant)>,
    /// When an attempt (connect or commit) failed.
    pub failed: Vec<Instant>,
}

impl WriteLog {
    /// Acknowledgements after `since`.
    pub fn acknowledged_since(&self, since: Instant) -> usize {
        self.acknowledged
            .iter()
            .filter(|(_, at)| *at > since)
            .count()
    }

    /// From `since` to the first acknowledgement after the first failed attempt that
    /// followed it: how long writes were out (a commit in flight at `since` may still
    /// be acknowledged before the failures start).
    pub fn resumed_after(&self, since: Instant) -> Option<Duration> {
        let first_failure = self.failed.iter().find(|at| **at > since)?;
        self.acknowledged
            .iter()
            .find(|(_, at)| at > first_failure)
            .map(|(_, at)| *at - since)
    }

    /// The longest time between two acknowledgements.
    pub fn longest_pause(&self) -> Duration {
        self.acknowledged
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default()
    }
}

/// Commits `INSERT INTO acknowledged_writes VALUES (n)` for n = 1, 2, ... in a loop
/// on its own thread, reconnecting through `conninfo` after any error; each
/// statement and connection attempt is bounded (5 s) so a commit stuck on a dead
/// server counts as failed. Stops when dropped or [`Self::finish`]ed.
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<WriteLog>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Creates [`TABLE`] through the cluster's read-write path.
    pub async fn create_table(cluster: &PatroniCluster) -> Result<(), HarnessError> {
        let client = connect(&cluster.read_write_conninfo("postgres")).await?;
        client
            .batch_execute(&format!("CREATE TABLE {TABLE} (id bigint PRIMARY KEY)"))
            .await
            .map_err(|e| HarnessError::sql(format!("create {TABLE}"), e))
    }

    /// Starts writing through `conninfo`.
    pub fn start(conninfo: String) -> Result<Self, HarnessError> {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(WriteLog::default()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HarnessError::io("the writer's runtime", e))?;
        let (thread_stop, thread_log) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            runtime.block_on(write_loop(conninfo, thread_stop, thread_log));
        });
        Ok(Self {
            stop,
            log,
            thread: Some(thread),
        })
    }

    /// Acknowledgements after `since`, so far.
    pub fn acknowledged_since(&self, since: Instant) -> usize {
        self.lock().acknowledged_since(since)
    }

    /// Waits (polling) until `count` writes were acknowledged after `since`.
    pub async fn wait_for_writes(
        &self,
        since: Instant,
        count: usize,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.acknowledged_since(since);
            if done >= count {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::CommandFailed {
                    command: "the writer".into(),
                    output: format!(
                        "only {done} of {count} writes acknowledged within {}s",
                        timeout.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops writing; the whole log.
    pub fn finish(mut self) -> WriteLog {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // A writer thread that panicked has still logged what it was told.
            let _ = thread.join();
        }
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriteLog> {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn write_loop(conninfo: String, stop: Arc<AtomicBool>, log: Arc<Mutex<WriteLog>>) {
    const BOUND: Duration = Duration::from_secs(5);
    let record = |f: &dyn Fn(&mut WriteLog)| {
        let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut log);
    };
    let mut client = None;
    let mut next = 0i64;
    let insert = format!("INSERT INTO {TABLE} (id) VALUES ($1)");
    while !stop.load(Ordering::SeqCst) {
        let Some(c) = client.as_ref() else {
            match tokio::time::timeout(BOUND, connect(&conninfo)).await {
                Ok(Ok(c)) => client = Some(c),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            continue;
        };
        next += 1;
        let id = next;
        match tokio::time::timeout(BOUND, c.execute(insert.as_str(), &[&id])).await {
            Ok(Ok(_)) => {
                let at = Instant::now();
                record(&|log| log.acknowledged.push((id, at)));
            }
            _ => {
                let at = Instant::now();
                record(&|log| log.failed.push(at));
                client = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What member `name` holds of `log`: the acknowledged row ids it lacks (read over
/// its own port), and how many rows it has.
pub async fn missing_on(
    cluster: &PatroniCluster,
    name: &str,
    log: &WriteLog,
) -> Result<(Vec<i64>, usize), HarnessError> {
    missing_in(cluster, name, "postgres", log).await
}

/// [`missing_on`] for a table in database `dbname` (where a Citus coordinator reads a
/// distributed table across its workers).
pub async fn missing_in(
    cluster: &PatroniCluster,
    name: &str,
    dbname: &str,
    log: &WriteLog,
) -> Result<(Vec<i64>, usize), HarnessError> {
    let client = connect(&cluster.member_conninfo(name, dbname)).await?;
    let rows = client
        .query(&format!("SELECT id FROM {TABLE}"), &[])
        .await
        .map_err(|e| HarnessError::sql(format!("read {TABLE} on {name}"), e))?;
    let present: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let missing = log
        .acknowledged
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !present.contains(id))
        .collect();
    Ok((missing, present.len()))
}
