//! `bulk import <file>`: creating many users from a file (docs/bulk.md,
//! "Bulk import").
//!
//! A reader thread parses and validates the file's records (the write path's
//! own parser) into batches; each batch drops the users already stored or
//! repeated, draws a data key per user and wraps them in one provider call
//! (Vault's batch encryption), seals the personal data on the bulk engine,
//! derives the attributes and loads the directory, key, metadata, derived and
//! history rows with COPY, in one transaction that also records how far into
//! the file it got (`umstore.bulk_imports`). Refused records go to the reject
//! file, each with its line and reason, before that commit; nothing else stops
//! the import. Run again after a crash, the import resumes after the last
//! committed batch: no user is written twice and none is skipped.
//!
//! A store of several clusters is imported cluster by cluster, each run
//! given its [`Share`]: the regions the placement gives its cluster, the
//! users' routes put in the home cluster before their rows, and the region
//! check of a moving region in each batch's transaction.

mod input;
mod render;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio_postgres::Client;
use tracing::{debug, info};
use uuid::Uuid;

pub use input::{to_user, Format, NewUser, Record, Refused, PAYLOAD_FIELDS};
pub use render::TABLES;

use super::{BulkEngine, BulkError};
use crate::clusters::fence::{Refusal, REGION_WRITE_MANY};
use crate::crypto::{CryptoError, Keyring};
use crate::ingest::event::{is_transit_ciphertext, Change, PiiText};

/// Users per batch (one transaction, one engine call, one key-wrap call).
pub const DEFAULT_BATCH_USERS: usize = 5_000;

/// How long a run may go without a heartbeat before another run of the
/// same import may take it over (`--takeover-after`).
pub const DEFAULT_TAKEOVER_AFTER: Duration = Duration::from_secs(30);

/// Why an import stopped. What earlier batches committed stays, and running
/// the same command again resumes after it.
#[derive(Debug, Error)]
pub enum ImportError {
    /// The file's extension names no format this command reads.
    #[error("{}: cannot tell the format; name the file .jsonl (JSON Lines) or .csv", path.display())]
    Format {
        /// The file.
        path: PathBuf,
    },
    /// Reading the file failed.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The CSV header is not usable; nothing was imported.
    #[error("the CSV header: {0}")]
    Header(String),
    /// Writing the reject file failed.
    #[error("writing the reject file {}: {source}", path.display())]
    Rejects {
        /// The reject file.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the database failed.
    #[error("connecting to the database: {0}")]
    Connect(#[from] crate::db::DbError),
    /// Another import of the same file is running.
    #[error(
        "another import of this file ({import_id}) is running (its last heartbeat {age_s:.0} s \
         ago); wait for it, or, if it has died, run again once {takeover_s} s have passed since \
         its last heartbeat"
    )]
    Busy {
        /// The import's id.
        import_id: String,
        /// Seconds since the other run's last heartbeat.
        age_s: f64,
        /// `--takeover-after`, in seconds.
        takeover_s: u64,
    },
    /// Another run took the import over (this run's heartbeats stopped for
    /// longer than `--takeover-after`); the batch under way was rolled back.
    #[error("another run took this import ({import_id}) over; this run stopped, nothing of its last batch was written")]
    TakenOver {
        /// The import's id.
        import_id: String,
    },
    /// A database statement failed; the batch under way was rolled back.
    #[error("{what}: {source}")]
    Database {
        /// What was being done.
        what: String,
        /// Database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Wrapping the data keys (or decrypting a transit value) failed; the
    /// batch under way was rolled back.
    #[error("{what}: {source}")]
    Keys {
        /// What was being done.
        what: &'static str,
        /// Provider error.
        #[source]
        source: CryptoError,
    },
    /// The bulk engine failed on a whole batch.
    #[error("sealing a batch on the {engine} engine: {source}")]
    Engine {
        /// The engine.
        engine: &'static str,
        /// Why.
        #[source]
        source: BulkError,
    },
    /// A region of the batch is moving between clusters (fenced for a
    /// moment, moved away, or being copied in); the batch was rolled back.
    #[error("a region of this batch is moving between clusters ({refusal}): {detail}; what was committed stays: run the same command again once the move is done")]
    RegionMoving {
        /// `fenced` or `moved`.
        refusal: &'static str,
        /// The database's message, naming the region and the other cluster.
        detail: String,
    },
    /// The reader or sealing thread stopped unexpectedly.
    #[error("the {0} thread stopped unexpectedly")]
    Thread(&'static str),
}

fn db(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ImportError {
    let what = what.into();
    move |source| ImportError::Database { what, source }
}

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Users per batch.
    pub batch_users: usize,
    /// Where refused records go (JSON Lines: line, user_id, reason).
    pub rejects: PathBuf,
    /// `source` of records that name none.
    pub source: String,
    /// Added to the import's id: the cluster, for a store with several.
    pub scope: Option<String>,
    /// A store with several clusters: the part of the file this run
    /// imports, into the cluster it runs against.
    pub share: Option<Share>,
    /// How long a run may go without a heartbeat before another may take
    /// the import over.
    pub takeover_after: Duration,
}

impl ImportOptions {
    /// Defaults for `file`: batches of [`DEFAULT_BATCH_USERS`], rejects in
    /// `<file>.rejects.jsonl`, source `bulk-import`.
    pub fn for_file(file: &Path) -> Self {
        let mut rejects = file.as_os_str().to_owned();
        rejects.push(".rejects.jsonl");
        ImportOptions {
            batch_users: DEFAULT_BATCH_USERS,
            rejects: PathBuf::from(rejects),
            source: "bulk-import".into(),
            scope: None,
            share: None,
            takeover_after: DEFAULT_TAKEOVER_AFTER,
        }
    }
}

/// One cluster's part of an import into a store with several clusters
/// (docs/bulk.md, "Several clusters"): the file is imported cluster by
/// cluster, each run taking the records of the regions the placement gives
/// its cluster, putting each new user's route in the home cluster's
/// `user_routes` before the user's rows (as the write path does), and running
/// the region check of a moving region in each batch's transaction.
#[derive(Debug, Clone)]
pub struct Share {
    /// The regions this run imports; the records of the others are left to
    /// the other clusters' runs.
    pub regions: BTreeSet<String>,
    /// Every region some cluster holds.
    pub placed: BTreeSet<String>,
    /// This run refuses the records no cluster's run imports (unreadable
    /// ones, regions in no cluster): the home cluster's run.
    pub refuse_the_rest: bool,
    /// The writer's login on the home cluster (the routes).
    pub home: crate::db::Database,
    /// The writer's login on each other cluster (whether a user without a
    /// route is stored there already).
    pub others: Vec<crate::db::Database>,
}

/// The connections a [`Share`] needs, held for the run.
struct ShareClients {
    share: Share,
    home: Client,
    others: Vec<Client>,
}

impl ShareClients {
    async fn connect(share: &Share) -> Result<Self, ImportError> {
        let mut others = Vec::with_capacity(share.others.len());
        for other in &share.others {
            others.push(other.connect().await?);
        }
        Ok(ShareClients {
            share: share.clone(),
            home: share.home.connect().await?,
            others,
        })
    }
}

/// Where an import stands, after each committed batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Bytes of the file committed.
    pub bytes_done: u64,
    /// The file's size.
    pub bytes_total: u64,
    /// Lines read.
    pub lines: u64,
    /// Users imported (this run and earlier ones of the same file).
    pub imported: u64,
    /// Records refused (likewise).
    pub rejected: u64,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// SHA-256 of the file (and the scope): its row in `umstore.bulk_imports`.
    pub import_id: String,
    /// The file had been imported completely before: nothing was done.
    pub already_done: bool,
    /// Whether this run resumed an earlier one.
    pub resumed: bool,
    /// Where it ended.
    pub progress: Progress,
    /// Users imported by this run.
    pub imported_now: u64,
    /// The reject file.
    pub rejects: PathBuf,
    /// Wall time of this run.
    pub elapsed: Duration,
    /// The engine's name.
    pub engine: &'static str,
    /// Time in the engine's seal calls, and the fields sealed.
    pub seal_time: Duration,
    /// Fields sealed.
    pub fields_sealed: u64,
    /// Time in COPY and commit.
    pub load_time: Duration,
}

impl ImportReport {
    /// Users per second of this run.
    pub fn users_per_second(&self) -> f64 {
        self.imported_now as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// SHA-256 of the file, hex.
fn file_digest(path: &Path) -> Result<String, ImportError> {
    let io = |source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file =
        std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(io)?);
    let mut hasher = Sha256::new();
    loop {
        let buf = file.fill_buf().map_err(io)?;
        if buf.is_empty() {
            break;
        }
        hasher.update(buf);
        let n = buf.len();
        file.consume(n);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// One refused record, as a line of the reject file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Reject {
    /// Line of the file where the record starts.
    pub line: u64,
    /// Its user, when readable.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user_id: Option<Uuid>,
    /// What is wrong and what to do.
    pub reason: String,
}

/// The reject file: kept to the records before `lines_done` when resuming
/// (a batch that did not commit is read and judged again), then appended to.
struct Rejects {
    path: PathBuf,
    file: std::fs::File,
}

impl Rejects {
    fn open(path: &Path, lines_done: u64) -> Result<Self, ImportError> {
        let err = |source| ImportError::Rejects {
            path: path.to_path_buf(),
            source,
        };
        let kept: Vec<String> = if lines_done == 0 {
            Vec::new()
        } else {
            match std::fs::read_to_string(path) {
                Ok(text) => text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<Reject>(l).is_ok_and(|r| r.line <= lines_done)
                    })
                    .map(str::to_owned)
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(err(e)),
            }
        };
        let mut file = std::fs::File::create(path).map_err(err)?;
        for line in &kept {
            writeln!(file, "{line}").map_err(err)?;
        }
        file.sync_data().map_err(err)?;
        Ok(Rejects {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `rejects` and makes them durable (before the batch commits).
    fn append(&mut self, rejects: &[Reject]) -> Result<(), ImportError> {
        if rejects.is_empty() {
            return Ok(());
        }
        let err = |source| ImportError::Rejects {
            path: self.path.clone(),
            source,
        };
        let mut text = String::new();
        for r in rejects {
            // A Reject always serializes.
            text.push_str(&serde_json::to_string(r).unwrap_or_default());
            text.push('\n');
        }
        self.file.write_all(text.as_bytes()).map_err(err)?;
        self.file.sync_data().map_err(err)
    }
}

/// Batches of records from the reader thread.
struct Batch {
    records: Vec<Record>,
}

fn spawn_reader(
    path: PathBuf,
    format: Format,
    offset: u64,
    line: u64,
    now: DateTime<Utc>,
    source: String,
    batch_users: usize,
) -> tokio::sync::mpsc::Receiver<Result<Batch, ImportError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    std::thread::spawn(move || {
        let mut input = match input::Input::open(&path, format, offset, line, now, &source) {
            Ok(i) => i,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            let mut records = Vec::with_capacity(batch_users);
            while records.len() < batch_users {
                match input.next_record(&path) {
                    Ok(Some(r)) => records.push(r),
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            let last = records.len() < batch_users;
            if !records.is_empty() && tx.blocking_send(Ok(Batch { records })).is_err() {
                return;
            }
            if last {
                return;
            }
        }
    });
    rx
}

/// Imports `path` into `database` (as the writer login, or an
/// administrator), sealing on `engine`. Two connections: one loads a batch
/// while the other looks up the next. `progress` is called after each
/// committed batch.
pub async fn import(
    database: &crate::db::Database,
    keyring: &Keyring,
    engine: Arc<dyn BulkEngine>,
    path: &Path,
    options: &ImportOptions,
    mut progress: impl FnMut(&Progress),
) -> Result<ImportReport, ImportError> {
    let started = Instant::now();
    let format = Format::of(path)?;
    let bytes_total = std::fs::metadata(path)
        .map_err(|source| ImportError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let digest = {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || file_digest(&path))
            .await
            .map_err(|_| ImportError::Thread("digest"))??
    };
    let import_id = match &options.scope {
        Some(scope) => format!("{digest}:{scope}"),
        None => digest,
    };
    let lookup = database.connect().await?;
    let share = match &options.share {
        Some(share) => Some(ShareClients::connect(share).await?),
        None => None,
    };
    let runner = Uuid::new_v4();
    let result = run(
        database,
        &lookup,
        share.as_ref(),
        runner,
        keyring,
        engine,
        path,
        format,
        bytes_total,
        &import_id,
        options,
        started,
        &mut progress,
    )
    .await;
    if result.is_err() {
        // Let a rerun start at once rather than wait out the heartbeat.
        let _ = autocommit(
            &lookup,
            "UPDATE umstore.bulk_imports SET runner = NULL WHERE import_id = $1 AND runner = $2",
            &[&import_id, &runner],
        )
        .await;
    }
    result
}

/// One statement in its own transaction: through PgBouncer's transaction
/// pooling, a statement prepared outside a transaction may meet another
/// server connection when it runs.
async fn autocommit(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    match client.query(sql, params).await {
        Ok(rows) => {
            client.batch_execute("COMMIT").await?;
            Ok(rows)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Renews the run's heartbeat every quarter of `takeover_after` on its own
/// connection, until dropped; sets `lost` when the import is no longer this
/// run's.
struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
    lost: Arc<std::sync::atomic::AtomicBool>,
}

impl Heartbeat {
    async fn start(
        database: &crate::db::Database,
        import_id: &str,
        runner: Uuid,
        takeover_after: Duration,
    ) -> Result<Self, ImportError> {
        let client = database.connect().await?;
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&lost);
        let import_id = import_id.to_owned();
        let every = (takeover_after / 4).max(Duration::from_millis(200));
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match autocommit(
                    &client,
                    "UPDATE umstore.bulk_imports SET heartbeat_at = now()
                     WHERE import_id = $1 AND runner = $2 RETURNING 1",
                    &[&import_id, &runner],
                )
                .await
                {
                    Ok(rows) if rows.is_empty() => {
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => {}
                    // A missed beat; the batches' own checks stay exact.
                    Err(e) => debug!(error = %e, "renewing the import's heartbeat"),
                }
            }
        });
        Ok(Heartbeat { task, lost })
    }

    fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    database: &crate::db::Database,
    lookup: &Client,
    share: Option<&ShareClients>,
    runner: Uuid,
    keyring: &Keyring,
    engine: Arc<dyn BulkEngine>,
    path: &Path,
    format: Format,
    bytes_total: u64,
    import_id: &str,
    options: &ImportOptions,
    started: Instant,
    progress: &mut impl FnMut(&Progress),
) -> Result<ImportReport, ImportError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut client = database.connect().await?;
    let takeover_s = options.takeover_after.as_secs_f64();
    // Claims the import: new, finished (reported as such), or held by no
    // run, or by one silent for longer than --takeover-after.
    let claimed = {
        let tx = client
            .transaction()
            .await
            .map_err(db("starting a transaction"))?;
        let row = tx
            .query_opt(
                "INSERT INTO umstore.bulk_imports
                    (import_id, file_name, file_bytes, format, engine, runner, heartbeat_at)
                 VALUES ($1, $2, $3, $4, $5, $6, now())
                 ON CONFLICT (import_id) DO UPDATE SET
                    attempts = umstore.bulk_imports.attempts
                        + (umstore.bulk_imports.finished_at IS NULL)::int,
                    engine = EXCLUDED.engine,
                    runner = CASE WHEN umstore.bulk_imports.finished_at IS NULL
                                  THEN EXCLUDED.runner END,
                    heartbeat_at = now(),
                    updated_at = now()
                 WHERE umstore.bulk_imports.finished_at IS NOT NULL
                    OR umstore.bulk_imports.runner IS NULL
                    OR umstore.bulk_imports.heartbeat_at
                        < now() - make_interval(secs => $7)
                 RETURNING offset_done, lines_done, imported, rejected,
                    finished_at IS NOT NULL, attempts",
                &[
                    &import_id,
                    &file_name,
                    &(bytes_total as i64),
                    &format.as_str(),
                    &engine.name(),
                    &runner,
                    &takeover_s,
                ],
            )
            .await
            .map_err(db("recording the import in umstore.bulk_imports"))?;
        let age: Option<f64> = match &row {
            Some(_) => None,
            None => tx
                .query_one(
                    "SELECT extract(epoch FROM now() - heartbeat_at)::float8
                     FROM umstore.bulk_imports WHERE import_id = $1",
                    &[&import_id],
                )
                .await
                .map_err(db("reading the import's heartbeat"))?
                .get(0),
        };
        tx.commit()
            .await
            .map_err(db("recording the import in umstore.bulk_imports"))?;
        match row {
            Some(row) => row,
            None => {
                return Err(ImportError::Busy {
                    import_id: import_id.to_owned(),
                    age_s: age.unwrap_or(0.0),
                    takeover_s: options.takeover_after.as_secs(),
                })
            }
        }
    };
    let row = claimed;
    let (offset, lines, imported, rejected): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let finished: bool = row.get(4);
    let attempts: i32 = row.get(5);
    let mut state = Progress {
        bytes_done: offset as u64,
        bytes_total,
        lines: lines as u64,
        imported: imported as u64,
        rejected: rejected as u64,
    };
    let mut report = ImportReport {
        import_id: import_id.to_owned(),
        already_done: finished,
        resumed: attempts > 1,
        progress: state,
        imported_now: 0,
        rejects: options.rejects.clone(),
        elapsed: Duration::ZERO,
        engine: engine.name(),
        seal_time: Duration::ZERO,
        fields_sealed: 0,
        load_time: Duration::ZERO,
    };
    if finished {
        report.elapsed = started.elapsed();
        return Ok(report);
    }
    if report.resumed {
        info!(
            import_id,
            offset, lines, imported, rejected, "resuming the import after the last committed batch"
        );
    }
    let heartbeat = Heartbeat::start(database, import_id, runner, options.takeover_after).await?;
    let mut rejects = Rejects::open(&options.rejects, state.lines)?;
    let mut loader = render::Loader::prepare(&client).await?;
    let mut batches_loaded = 0u32;
    let now = Utc::now();
    let today = now.date_naive();
    let mut rx = spawn_reader(
        path.to_path_buf(),
        format,
        state.bytes_done,
        state.lines,
        now,
        options.source.clone(),
        options.batch_users.max(1),
    );
    progress(&state);
    // Two stages overlap: while batch N loads on `client`, batch N + 1 is
    // looked up on `lookup`, its keys wrapped and its fields sealed.
    let mut seen: HashMap<Uuid, u64> = HashMap::new();
    let mut pending: Option<Prepared> = None;
    let ctx = PrepareContext {
        lookup,
        share,
        keyring,
        engine: &engine,
        today,
    };
    loop {
        let next = match rx.recv().await {
            Some(batch) => Some(batch?),
            None => None,
        };
        let load = async {
            match pending.take() {
                Some(p) => {
                    let (end, line, rejected) = (p.end, p.last_line, p.refused.len() as u64);
                    let started = Instant::now();
                    if heartbeat.lost() {
                        return Err(ImportError::TakenOver {
                            import_id: import_id.to_owned(),
                        });
                    }
                    let check = share.is_some();
                    let written = load_batch(
                        &mut client,
                        &loader,
                        &mut rejects,
                        import_id,
                        runner,
                        check,
                        p,
                    )
                    .await?;
                    Ok::<_, ImportError>(Some((end, line, written, rejected, started.elapsed())))
                }
                None => Ok(None),
            }
        };
        let prepare = async {
            match next {
                Some(Batch { records }) => ctx.prepare(&mut seen, records).await.map(Some),
                None => Ok(None),
            }
        };
        let (loaded, prepared) = tokio::join!(load, prepare);
        if let Some((end, line, written, rejected, took)) = loaded? {
            report.load_time += took;
            report.imported_now += written;
            state.bytes_done = end;
            state.lines = line;
            state.imported += written;
            state.rejected += rejected;
            debug!(
                lines = state.lines,
                imported = state.imported,
                "committed a batch"
            );
            progress(&state);
            batches_loaded += 1;
            // A foreign-key check is planned once per connection and kept:
            // planned while a region's partition was nearly empty it stays a
            // sequential scan, and the load turns quadratic. A new loading
            // connection after 1, 2, 4 and 8 batches plans them against the
            // partitions as they have grown (an index lookup for good).
            if batches_loaded.is_power_of_two() && batches_loaded <= 8 {
                client = database.connect().await?;
                loader = render::Loader::prepare(&client).await?;
            }
        }
        match prepared? {
            Some(p) => {
                report.seal_time += p.seal_time;
                report.fields_sealed += p.fields;
                pending = Some(p);
            }
            None => break,
        }
    }
    drop(heartbeat);
    autocommit(
        &client,
        "UPDATE umstore.bulk_imports SET finished_at = now(), runner = NULL, updated_at = now()
         WHERE import_id = $1 AND runner = $2",
        &[&import_id, &runner],
    )
    .await
    .map_err(db("recording the import as finished"))?;
    report.progress = state;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// A batch ready to load: its rows, its refused records and where in the
/// file it ends.
struct Prepared {
    rendered: render::Rendered,
    /// Each user's region and id (the region check of several clusters).
    owners: (Vec<&'static str>, Vec<Uuid>),
    refused: Vec<Reject>,
    end: u64,
    last_line: u64,
    seal_time: Duration,
    fields: u64,
}

/// What preparing a batch needs.
struct PrepareContext<'a> {
    lookup: &'a Client,
    share: Option<&'a ShareClients>,
    keyring: &'a Keyring,
    engine: &'a Arc<dyn BulkEngine>,
    today: chrono::NaiveDate,
}

impl PrepareContext<'_> {
    /// Screens a batch of records, wraps its keys, seals and renders it.
    async fn prepare(
        &self,
        seen: &mut HashMap<Uuid, u64>,
        records: Vec<Record>,
    ) -> Result<Prepared, ImportError> {
        let (end, last_line) = records.last().map_or((0, 0), |r| (r.end, r.line));
        let (users, mut refused) =
            screen(self.lookup, self.share, self.keyring, seen, records).await?;
        refused.sort_by_key(|r| r.line);
        let owners = users
            .iter()
            .map(|u| (u.user.event.region, u.user.event.user_id))
            .unzip();
        let (rendered, seal_time, fields) =
            render::seal_and_render(self.keyring, Arc::clone(self.engine), users, self.today)
                .await?;
        Ok(Prepared {
            rendered,
            owners,
            refused,
            end,
            last_line,
            seal_time,
            fields,
        })
    }
}

/// Loads a prepared batch and records the import's progress in one
/// transaction; the batch's rejects are made durable just before the commit
/// (a crash between the two re-judges the batch on resume, after its rejects
/// are cut from the file). Returns the users written.
async fn load_batch(
    client: &mut Client,
    loader: &render::Loader,
    rejects: &mut Rejects,
    import_id: &str,
    runner: Uuid,
    check_regions: bool,
    p: Prepared,
) -> Result<u64, ImportError> {
    let tx = client
        .transaction()
        .await
        .map_err(db("starting a batch's transaction"))?;
    // First, and holding the row: the import is still this run's.
    let ours = tx
        .execute(
            "UPDATE umstore.bulk_imports SET offset_done = $2, lines_done = $3,
                imported = imported + $4, rejected = rejected + $5, heartbeat_at = now(),
                updated_at = now()
             WHERE import_id = $1 AND runner = $6",
            &[
                &import_id,
                &(p.end as i64),
                &(p.last_line as i64),
                &(p.rendered.users() as i64),
                &(p.refused.len() as i64),
                &runner,
            ],
        )
        .await
        .map_err(db("recording the import's progress"))?;
    if ours == 0 {
        return Err(ImportError::TakenOver {
            import_id: import_id.to_owned(),
        });
    }
    // Several clusters: each user's region check before any row, as every
    // write transaction makes it (a region being copied away logs the user
    // for the mover; a fenced or moved one refuses the batch).
    if check_regions {
        let (regions, users) = &p.owners;
        tx.execute(REGION_WRITE_MANY, &[regions, users])
            .await
            .map_err(|e| match Refusal::of(&e) {
                Some(refusal) => ImportError::RegionMoving {
                    refusal: refusal.as_str(),
                    detail: e
                        .as_db_error()
                        .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
                },
                None => ImportError::Database {
                    what: "checking the batch's regions".into(),
                    source: e,
                },
            })?;
    }
    let written = loader.load(&tx, p.rendered).await?;
    rejects.append(&p.refused)?;
    tx.commit()
        .await
        .map_err(db("committing a batch of users"))?;
    Ok(written)
}

/// A user to write: the user, and their personal data
/// in plaintext (transit values decrypted).
pub(crate) struct Screened {
    pub user: NewUser,
    pub pii: render::PiiPlain,
}

/// Splits a batch into users to write and refused records: invalid ones, a
/// user seen earlier in this run (`first_line`: each user's first line), a
/// user the store already has.
async fn screen(
    client: &Client,
    share: Option<&ShareClients>,
    keyring: &Keyring,
    first_line: &mut HashMap<Uuid, u64>,
    records: Vec<Record>,
) -> Result<(Vec<Screened>, Vec<Reject>), ImportError> {
    let mut refused = Vec::new();
    let mut valid = Vec::with_capacity(records.len());
    let refuse_the_rest = share.is_none_or(|s| s.share.refuse_the_rest);
    for r in records {
        match r.user {
            Err(Refused { user_id, reason }) => {
                if refuse_the_rest {
                    refused.push(Reject {
                        line: r.line,
                        user_id,
                        reason,
                    })
                }
            }
            Ok(user) => match share.map(|s| &s.share) {
                Some(s) if !s.regions.contains(user.event.region) => {
                    // Another cluster's record: only where its user first
                    // appears, so that a repeat in this cluster's regions is
                    // refused as in a store of one cluster.
                    first_line
                        .entry(user.event.user_id)
                        .and_modify(|first| *first = (*first).min(r.line))
                        .or_insert(r.line);
                    if refuse_the_rest && !s.placed.contains(user.event.region) {
                        refused.push(Reject {
                            line: r.line,
                            user_id: Some(user.event.user_id),
                            reason: format!(
                                "region {} is in no cluster of the store (--clusters, \
                                 UMSTORE_CLUSTERS): add it to the cluster that should hold it",
                                user.event.region
                            ),
                        });
                    }
                }
                _ => valid.push((r.line, user)),
            },
        }
    }
    let ids: Vec<Uuid> = valid.iter().map(|(_, u)| u.event.user_id).collect();
    let mut existing: HashMap<Uuid, String> = directory(client, &ids).await?;
    if let Some(share) = share {
        existing.extend(elsewhere(share, &valid, &existing).await?);
    }
    let mut users = Vec::with_capacity(valid.len());
    for (line, user) in valid {
        let id = user.event.user_id;
        if let Some(region) = existing.get(&id) {
            refused.push(already_exists(line, id, region));
            continue;
        }
        if let Some(first) = first_line.get(&id).filter(|first| **first < line) {
            refused.push(Reject {
                line,
                user_id: Some(id),
                reason: format!(
                    "user {id} appears again (first on line {first}): a file creates each user \
                     once; send later changes as METADATA_UPDATED events"
                ),
            });
            continue;
        }
        match plain_pii(keyring, &user).await {
            Ok(pii) => {
                first_line
                    .entry(id)
                    .and_modify(|first| *first = (*first).min(line))
                    .or_insert(line);
                users.push((line, Screened { user, pii }));
            }
            Err(PiiError::Refused(reason)) => refused.push(Reject {
                line,
                user_id: Some(id),
                reason,
            }),
            Err(PiiError::Provider(source)) => {
                return Err(ImportError::Keys {
                    what: "decrypting a transit-encrypted value",
                    source,
                })
            }
        }
    }
    if let Some(share) = share {
        // The routes first, as the write path puts them: a user another
        // writer routed to another region meanwhile is refused here.
        let taken = route(&share.home, &users).await?;
        users.retain(|(line, u)| {
            let id = u.user.event.user_id;
            match taken.get(&id) {
                Some(region) => {
                    refused.push(already_exists(*line, id, region));
                    false
                }
                None => true,
            }
        });
    }
    Ok((users.into_iter().map(|(_, u)| u).collect(), refused))
}

fn already_exists(line: u64, id: Uuid, region: &str) -> Reject {
    Reject {
        line,
        user_id: Some(id),
        reason: format!(
            "user {id} already exists (region {region}): bulk import only creates users; \
             send changes as METADATA_UPDATED events"
        ),
    }
}

/// The users among `ids` in `client`'s directory, with their regions.
async fn directory(client: &Client, ids: &[Uuid]) -> Result<HashMap<Uuid, String>, ImportError> {
    Ok(autocommit(
        client,
        "SELECT user_id, region::text FROM umstore.user_directory WHERE user_id = ANY($1)",
        &[&ids],
    )
    .await
    .map_err(db("looking up which users exist already"))?
    .into_iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect())
}

/// The users of `valid` (not in this cluster's directory, `here`) that
/// exist elsewhere in the store: routed to another region in home's
/// `user_routes`, or, without a route (written before the store had
/// clusters), in another cluster's directory. A route to the record's own
/// region is an earlier run's (routes go in before the rows): not a user
/// that exists.
async fn elsewhere(
    share: &ShareClients,
    valid: &[(u64, NewUser)],
    here: &HashMap<Uuid, String>,
) -> Result<HashMap<Uuid, String>, ImportError> {
    let ids: Vec<Uuid> = valid
        .iter()
        .map(|(_, u)| u.event.user_id)
        .filter(|id| !here.contains_key(id))
        .collect();
    let routes: HashMap<Uuid, String> = autocommit(
        &share.home,
        "SELECT user_id, region::text FROM umstore.user_routes WHERE user_id = ANY($1)",
        &[&ids],
    )
    .await
    .map_err(db("looking up the users' routes in the home cluster"))?
    .into_iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect();
    let mut found = HashMap::new();
    for (_, user) in valid {
        let id = user.event.user_id;
        if let Some(region) = routes.get(&id) {
            if region != user.event.region {
                found.insert(id, region.clone());
            }
        }
    }
    let unrouted: Vec<Uuid> = ids
        .into_iter()
        .filter(|id| !routes.contains_key(id))
        .collect();
    if !unrouted.is_empty() {
        for other in &share.others {
            found.extend(directory(other, &unrouted).await?);
        }
    }
    Ok(found)
}

/// Puts each user's route (user id → region) in home's `user_routes`, in
/// one transaction, and returns the users routed to another region (by
/// another writer since they were looked up), with that region.
async fn route(
    home: &Client,
    users: &[(u64, Screened)],
) -> Result<HashMap<Uuid, String>, ImportError> {
    if users.is_empty() {
        return Ok(HashMap::new());
    }
    let (ids, regions): (Vec<Uuid>, Vec<&str>) = users
        .iter()
        .map(|(_, u)| (u.user.event.user_id, u.user.event.region))
        .unzip();
    let err = db("putting the users' routes in the home cluster");
    home.batch_execute("BEGIN")
        .await
        .map_err(db("starting a transaction"))?;
    let result = async {
        home.execute(
            "INSERT INTO umstore.user_routes (user_id, region)
             SELECT u, r::bpchar FROM unnest($1::uuid[], $2::text[]) AS t(u, r)
             ON CONFLICT (user_id) DO NOTHING",
            &[&ids, &regions],
        )
        .await?;
        // A new statement: it sees routes committed by others meanwhile.
        let rows = home
            .query(
                "SELECT t.u, r.region::text FROM unnest($1::uuid[], $2::text[]) AS t(u, want)
                 JOIN umstore.user_routes r ON r.user_id = t.u
                 WHERE r.region::text <> t.want",
                &[&ids, &regions],
            )
            .await?;
        home.batch_execute("COMMIT").await?;
        Ok::<_, tokio_postgres::Error>(rows)
    }
    .await;
    match result {
        Ok(rows) => Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect()),
        Err(e) => {
            let _ = home.batch_execute("ROLLBACK").await;
            Err(err(e))
        }
    }
}

enum PiiError {
    Refused(String),
    Provider(CryptoError),
}

/// The user's personal data in plaintext (transit ciphertexts decrypted
/// through Vault, as the write path does).
async fn plain_pii(keyring: &Keyring, user: &NewUser) -> Result<render::PiiPlain, PiiError> {
    let Some(p) = user.patch() else {
        return Err(PiiError::Refused("not a METADATA_CREATED payload".into()));
    };
    async fn text(
        keyring: &Keyring,
        field: &'static str,
        change: &Change<PiiText>,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, PiiError> {
        let Change::Set(PiiText(v)) = change else {
            return Ok(None);
        };
        if !is_transit_ciphertext(v) {
            return Ok(Some(zeroize::Zeroizing::new(v.as_bytes().to_vec())));
        }
        match keyring.provider().decrypt_inbound(v).await {
            Ok(plain) => Ok(Some(plain)),
            // Vault refused this value (HTTP 400): that record alone; any
            // other Vault failure stops the import, which resumes later.
            Err(e) if e.is_vault_bad_request() => Err(PiiError::Refused(format!(
                "{field}: Vault could not decrypt the transit-encrypted value (encrypt it with \
                 the store's transit key, or send it in plaintext): {e}"
            ))),
            Err(e @ CryptoError::Vault { .. }) => Err(PiiError::Provider(e)),
            Err(e) => Err(PiiError::Refused(format!(
                "{field}: a transit-encrypted value could not be decrypted: {e}"
            ))),
        }
    }
    let Change::Set(dob) = &p.date_of_birth else {
        return Err(PiiError::Refused("date_of_birth is required".into()));
    };
    let Change::Set(income) = &p.annual_income else {
        return Err(PiiError::Refused("annual_income is required".into()));
    };
    Ok(render::PiiPlain {
        full_name: text(keyring, "full_name", &p.full_name).await?,
        date_of_birth: *dob,
        district: text(keyring, "district", &p.district).await?,
        pincode: text(keyring, "pincode", &p.pincode).await?,
        phone: text(keyring, "phone", &p.phone).await?,
        identity_token: text(keyring, "identity_token", &p.identity_token).await?,
        annual_income: *income,
    })
}

/// Sends one table's COPY text.
async fn copy_in(
    tx: &tokio_postgres::Transaction<'_>,
    statement: &str,
    text: Bytes,
    table: &str,
) -> Result<(), ImportError> {
    crate::seed::copy_rows(tx, statement, text)
        .await
        .map_err(db(format!("loading {table}")))
}
