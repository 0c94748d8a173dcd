//! Moving one region from one cluster of a store to another (tier 4), online:
//! copy, catch up, a short write fence for that region only, switch, clean
//! up. docs/data-model.md, "Moving a region between clusters".
//!
//! The mechanism is a copy made by the mover itself over two ordinary
//! connections (binary `COPY` out of the source's rows of the region, `COPY`
//! into the target), with the changes made meanwhile found through
//! migration 0013's `umstore.region_move_log`: while a region is `copying` on
//! its source, every write transaction of that region logs its user there
//! (`umstore.region_write()`, in the same transaction), and the catch-up copies
//! those users again. The last catch-up runs behind the fence (`fenced`: writes
//! of the region are refused with SQLSTATE `UMF01`, which the data plane
//! retries), so the target then holds exactly the source's rows; the switch is
//! one UPDATE of `umstore.region_placement` in the home cluster.
//!
//! Every phase is recorded in home's `umstore.region_moves` before the next
//! begins, and each phase can be run again: a mover that stops anywhere (a
//! crash, a lost connection, the operator restarted) is resumed by running
//! the same move again. Before the switch the region is served by its source
//! only (the target's copy is `incoming`, refused to writers and never in the
//! placement); after it, by the target only (the source is `moved`). A region
//! is therefore never served by two clusters, nor by none.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::{pin_mut, SinkExt};
use thiserror::Error;
use tokio_postgres::{Client, IsolationLevel};
use tracing::info;

use crate::regions::REGIONS;

/// The advisory-lock class of region states (migration 0013).
const REGION_LOCK_CLASS: i32 = 1_970_106_998;

/// The tables holding a region's rows, parents before children (the order
/// rows are copied in; deletes go the other way). The outbox is not moved: its
/// rows are published by the source's relay. `user_routes` is home's index of
/// user → region, which a move does not change.
pub const MOVED_TABLES: [&str; 9] = [
    "user_directory",
    "user_metadata",
    "user_derived_attributes",
    "user_risk_scores",
    "user_eligibility_cache",
    "user_metadata_history",
    "user_data_keys",
    "processed_events",
    "erasure_audit",
];

/// The moved tables whose key includes an identity column: the target's
/// sequence is raised past the copied ids before the region opens there.
const IDENTITY_TABLES: [&str; 2] = ["user_metadata_history", "erasure_audit"];

/// Where a move is. Recorded in `umstore.region_moves.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// The target is emptied of the region and the snapshot copied into it.
    Copying,
    /// Users written since the snapshot are copied again, round after round.
    CatchingUp,
    /// Writes of the region are refused; the last changes are copied.
    Fenced,
    /// The placement names the target; the source's rows wait for the grace.
    Switched,
    /// The source's rows are gone.
    Done,
}

impl Phase {
    /// The name in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copying => "copying",
            Self::CatchingUp => "catching_up",
            Self::Fenced => "fenced",
            Self::Switched => "switched",
            Self::Done => "done",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Self::Copying,
            Self::CatchingUp,
            Self::Fenced,
            Self::Switched,
            Self::Done,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a move stopped. Every variant leaves the journal at a phase the same
/// move resumes from.
#[derive(Debug, Error)]
pub enum MoveError {
    /// A statement failed.
    #[error("{what}: {source}")]
    Db {
        /// What was being done.
        what: String,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Refused(String),
    /// The mover was asked to stop after a phase ([`MoveOptions::pause_after`]).
    #[error("paused after phase {0} as asked; run the same move again to resume")]
    Paused(Phase),
}

fn db(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> MoveError {
    let what = what.into();
    move |source| MoveError::Db { what, source }
}

/// How a move runs.
#[derive(Debug, Clone)]
pub struct MoveOptions {
    /// Users copied again per catch-up batch.
    pub batch_users: i64,
    /// The fence is raised once a catch-up round finds at most this many
    /// logged writes (so the fenced round is short), or once rounds stop
    /// shrinking (the writers log as fast as a round copies).
    pub fence_below: i64,
    /// Catch-up rounds before fencing anyway.
    pub max_rounds: u32,
    /// How long the source keeps the region's rows after the switch: longer
    /// than the data plane's placement refresh, so a reader that has not
    /// seen the switch yet still finds the rows where it looks.
    pub grace: Duration,
    /// How long a state change waits for the region's writes in flight
    /// before trying again (writers queue behind it meanwhile).
    pub lock_timeout: Duration,
    /// Stop with [`MoveError::Paused`] once this phase is recorded (tests of
    /// a mover killed at each phase).
    pub pause_after: Option<Phase>,
}

impl Default for MoveOptions {
    fn default() -> Self {
        Self {
            batch_users: 5_000,
            fence_below: 100,
            max_rounds: 30,
            grace: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(2),
            pause_after: None,
        }
    }
}

/// The three connections a move needs, each as a login that owns the schema
/// (the operator's superuser connection, or the admin login).
pub struct Clusters<'a> {
    /// The home cluster (placement and journal). May be the same database as
    /// the source or the target, but must be a connection of its own.
    pub home: &'a Client,
    /// The cluster the region leaves.
    pub source: &'a mut Client,
    /// The cluster the region goes to.
    pub target: &'a mut Client,
}

/// What a move did.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveReport {
    /// The journal row.
    pub id: i64,
    /// The region.
    pub region: String,
    /// Where it was.
    pub from: String,
    /// Where it is now.
    pub to: String,
    /// The phase reached ([`Phase::Done`] unless paused).
    pub phase: Phase,
    /// Rows copied by the snapshot.
    pub rows_copied: i64,
    /// Users copied again by the catch-up (with repeats).
    pub users_caught_up: i64,
    /// Catch-up rounds.
    pub catch_up_rounds: i32,
    /// How long writes of the region were refused: from the fence to the
    /// switch, as the home cluster's clock saw it.
    pub fence_ms: Option<f64>,
    /// How many runs it took (1 unless it was resumed).
    pub attempts: i32,
    /// This run's wall time.
    pub took: Duration,
}

/// A move in the journal.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    /// Its id.
    pub id: i64,
    /// The region.
    pub region: String,
    /// From.
    pub from: String,
    /// To.
    pub to: String,
    /// Its phase.
    pub phase: Phase,
    /// The fence length, once switched.
    pub fence_ms: Option<f64>,
    /// Rows copied by the snapshot.
    pub rows_copied: i64,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it finished (RFC 3339), if it did.
    pub finished_at: Option<String>,
}

fn check_region(region: &str) -> Result<&'static str, MoveError> {
    REGIONS
        .iter()
        .find(|r| r.code == region)
        .map(|r| r.code)
        .ok_or_else(|| {
            MoveError::Refused(format!(
                "{region:?} is not one of the store's region codes (two capital letters, e.g. KA)"
            ))
        })
}

/// Home's placement: region → cluster, for every region that has a row.
pub async fn placement(home: &Client) -> Result<Vec<(String, String)>, MoveError> {
    let rows = home
        .query(
            "SELECT region::text, cluster FROM umstore.region_placement ORDER BY region",
            &[],
        )
        .await
        .map_err(db("reading umstore.region_placement in the home cluster"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Writes the placement of every region in `layout` that has no row yet
/// (never changes a row): what the clusters hold before any move.
pub async fn seed_placement(home: &Client, layout: &[(String, String)]) -> Result<u64, MoveError> {
    let (regions, clusters): (Vec<&str>, Vec<&str>) =
        layout.iter().map(|(r, c)| (r.as_str(), c.as_str())).unzip();
    home.execute(
        "INSERT INTO umstore.region_placement (region, cluster)
         SELECT r, c FROM unnest($1::text[], $2::text[]) AS p (r, c)
         ON CONFLICT (region) DO NOTHING",
        &[&regions, &clusters],
    )
    .await
    .map_err(db("seeding umstore.region_placement in the home cluster"))
}

/// The unfinished moves and the last `recent` finished ones, newest first.
pub async fn journal(home: &Client, recent: i64) -> Result<Vec<JournalEntry>, MoveError> {
    let rows = home
        .query(
            "(SELECT id, region::text, from_cluster, to_cluster, phase, fence_ms, rows_copied,
                     to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                     to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
              FROM umstore.region_moves WHERE finished_at IS NULL)
             UNION ALL
             (SELECT id, region::text, from_cluster, to_cluster, phase, fence_ms, rows_copied,
                     to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                     to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
              FROM umstore.region_moves WHERE finished_at IS NOT NULL
              ORDER BY id DESC LIMIT $1)
             ORDER BY 1 DESC",
            &[&recent],
        )
        .await
        .map_err(db("reading umstore.region_moves in the home cluster"))?;
    Ok(rows
        .iter()
        .map(|r| JournalEntry {
            id: r.get(0),
            region: r.get(1),
            from: r.get(2),
            to: r.get(3),
            phase: Phase::parse(r.get(4)).unwrap_or(Phase::Copying),
            fence_ms: r.get(5),
            rows_copied: r.get(6),
            started_at: r.get(7),
            finished_at: r.get(8),
        })
        .collect())
}

/// Moves `region` from cluster `from` to cluster `to`, or resumes the
/// unfinished move of that region. Returns at once when home's placement
/// already names `to` and no move is unfinished.
pub async fn move_region(
    clusters: Clusters<'_>,
    region: &str,
    from: &str,
    to: &str,
    options: &MoveOptions,
) -> Result<MoveReport, MoveError> {
    let region = check_region(region)?;
    if from == to {
        return Err(MoveError::Refused(format!(
            "region {region} would move from cluster {from} to itself: name another cluster"
        )));
    }
    let started = Instant::now();
    let Clusters {
        home,
        source,
        target,
    } = clusters;
    let via_stage = !bypasses_rls(target).await?;
    let mut mover = Mover {
        home,
        source,
        target,
        region,
        options,
        id: 0,
        via_stage,
        columns: BTreeMap::new(),
    };
    let Some((id, mut phase)) = mover.begin(from, to).await? else {
        return Ok(MoveReport {
            id: 0,
            region: region.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            phase: Phase::Done,
            rows_copied: 0,
            users_caught_up: 0,
            catch_up_rounds: 0,
            fence_ms: None,
            attempts: 0,
            took: started.elapsed(),
        });
    };
    mover.id = id;
    if options.pause_after == Some(phase) {
        return Err(MoveError::Paused(phase));
    }
    loop {
        info!(region, from, to, phase = %phase, move_id = id, "region move");
        let next = match phase {
            Phase::Copying => {
                mover.copy(from, to).await?;
                Phase::CatchingUp
            }
            Phase::CatchingUp => {
                mover.catch_up().await?;
                mover.fence(to).await?;
                Phase::Fenced
            }
            Phase::Fenced => {
                mover.finish_behind_fence(from, to).await?;
                Phase::Switched
            }
            Phase::Switched => {
                mover.clean_up(to).await?;
                Phase::Done
            }
            Phase::Done => break,
        };
        mover.record(next).await?;
        phase = next;
        if options.pause_after == Some(phase) && phase != Phase::Done {
            return Err(MoveError::Paused(phase));
        }
    }
    let row = home
        .query_one(
            "SELECT rows_copied, users_caught_up, catch_up_rounds, fence_ms, attempts
             FROM umstore.region_moves WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(db("reading the move's journal row"))?;
    let report = MoveReport {
        id,
        region: region.to_owned(),
        from: from.to_owned(),
        to: to.to_owned(),
        phase,
        rows_copied: row.get(0),
        users_caught_up: row.get(1),
        catch_up_rounds: row.get(2),
        fence_ms: row.get(3),
        attempts: row.get(4),
        took: started.elapsed(),
    };
    info!(
        region,
        from,
        to,
        rows = report.rows_copied,
        fence_ms = report.fence_ms,
        took_ms = report.took.as_millis() as u64,
        "region moved"
    );
    Ok(report)
}

struct Mover<'a> {
    home: &'a Client,
    source: &'a mut Client,
    target: &'a mut Client,
    region: &'static str,
    options: &'a MoveOptions,
    id: i64,
    /// The target's login is under row-level security: copy through a
    /// temporary table (see `copy_table`).
    via_stage: bool,
    /// Each moved table's columns, as read once from the target.
    columns: BTreeMap<String, String>,
}

impl Mover<'_> {
    /// The journal row to work on and its phase, after checking the request
    /// against the placement; `None`: the region is at `to` already.
    async fn begin(&mut self, from: &str, to: &str) -> Result<Option<(i64, Phase)>, MoveError> {
        let region = self.region;
        let unfinished = self
            .home
            .query_opt(
                "UPDATE umstore.region_moves SET attempts = attempts + 1
                 WHERE region = $1 AND finished_at IS NULL
                 RETURNING id, from_cluster, to_cluster, phase",
                &[&region],
            )
            .await
            .map_err(db("reading umstore.region_moves in the home cluster"))?;
        if let Some(row) = unfinished {
            let (id, f, t, p): (i64, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            if f != from || t != to {
                return Err(MoveError::Refused(format!(
                    "region {region} has an unfinished move from cluster {f} to cluster {t}: \
                     it must finish first (run that move again to resume it)"
                )));
            }
            let phase = Phase::parse(&p).ok_or_else(|| {
                MoveError::Refused(format!("move {id} has an unknown phase {p:?}"))
            })?;
            info!(region, from, to, phase = %phase, move_id = id, "resuming a region move");
            return Ok(Some((id, phase)));
        }
        let placed: Option<String> = self
            .home
            .query_opt(
                "SELECT cluster FROM umstore.region_placement WHERE region = $1",
                &[&region],
            )
            .await
            .map_err(db("reading umstore.region_placement in the home cluster"))?
            .map(|r| r.get(0));
        match placed.as_deref() {
            Some(c) if c == to => return Ok(None),
            Some(c) if c == from => {}
            Some(c) => {
                return Err(MoveError::Refused(format!(
                    "region {region} is in cluster {c}, not {from}: move it from {c}"
                )))
            }
            None => {
                return Err(MoveError::Refused(format!(
                    "region {region} has no row in umstore.region_placement of the home cluster: \
                     seed the placement first (what each cluster holds now)"
                )))
            }
        }
        let (s, t) = (
            schema_version(self.source)
                .await
                .map_err(db("reading the source's schema version"))?,
            schema_version(self.target)
                .await
                .map_err(db("reading the target's schema version"))?,
        );
        if s != t {
            return Err(MoveError::Refused(format!(
                "the source cluster {from} is at schema version {s} and the target {to} at {t}: \
                 migrate both to the same version first"
            )));
        }
        // The target refuses the region's writes from before the journal has
        // the move until the switch.
        set_state(self.target, region, "incoming", from, self.options).await?;
        let row = self
            .home
            .query_one(
                "INSERT INTO umstore.region_moves (region, from_cluster, to_cluster, phase)
                 VALUES ($1, $2, $3, 'copying') RETURNING id",
                &[&region, &from, &to],
            )
            .await
            .map_err(db("recording the move in umstore.region_moves"))?;
        Ok(Some((row.get(0), Phase::Copying)))
    }

    async fn record(&self, phase: Phase) -> Result<(), MoveError> {
        self.home
            .execute(
                "UPDATE umstore.region_moves SET phase = $2, phase_at = now(),
                        finished_at = CASE WHEN $2 = 'done' THEN now() END
                 WHERE id = $1",
                &[&self.id, &phase.as_str()],
            )
            .await
            .map_err(db("recording the move's phase"))?;
        Ok(())
    }

    /// Empties the target of the region (rows of an earlier attempt), marks
    /// it `incoming` there and `copying` on the source, then copies the
    /// source's snapshot of the region into the target.
    async fn copy(&mut self, from: &str, to: &str) -> Result<(), MoveError> {
        let region = self.region;
        let via_stage = self.via_stage;
        set_state(self.target, region, "incoming", from, self.options).await?;
        same_blind_index_key(self.source, self.target, from, to).await?;
        {
            let tx = self
                .target
                .transaction()
                .await
                .map_err(db("starting the target's transaction"))?;
            delete_region_rows(&tx, region, None).await?;
            tx.commit()
                .await
                .map_err(db("emptying the target of the region"))?;
        }
        // Writes from here on are logged; those before are in the snapshot
        // (the state change waited for the ones in flight).
        self.source
            .execute(
                "DELETE FROM umstore.region_move_log WHERE region = $1",
                &[&region],
            )
            .await
            .map_err(db("clearing the source's move log of the region"))?;
        set_state(self.source, region, "copying", to, self.options).await?;
        let src = self
            .source
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db("starting the source's snapshot"))?;
        let dst = self
            .target
            .transaction()
            .await
            .map_err(db("starting the target's transaction"))?;
        let mut rows = 0u64;
        for table in MOVED_TABLES {
            rows += copy_table(
                &src,
                &dst,
                table,
                region,
                false,
                via_stage,
                &mut self.columns,
            )
            .await?;
        }
        dst.commit()
            .await
            .map_err(db("committing the copy into the target"))?;
        src.commit()
            .await
            .map_err(db("ending the source's snapshot"))?;
        let rows = i64::try_from(rows).unwrap_or(i64::MAX);
        self.home
            .execute(
                "UPDATE umstore.region_moves SET rows_copied = $2 WHERE id = $1",
                &[&self.id, &rows],
            )
            .await
            .map_err(db("recording the rows copied"))?;
        info!(region, rows, "region copied; catching up");
        Ok(())
    }

    /// Copies again the users written since the snapshot, round after round,
    /// until a round finds few enough to fence.
    async fn catch_up(&mut self) -> Result<(), MoveError> {
        let mut last = i64::MAX;
        for round in 0..self.options.max_rounds {
            let copied = self.catch_up_round(false).await?;
            let converged = round >= 3 && copied.saturating_mul(5) > last.saturating_mul(4);
            if copied <= self.options.fence_below || converged {
                break;
            }
            last = copied;
        }
        Ok(())
    }

    /// One round: every logged write seen now, in batches; returns how many
    /// log rows it consumed. `drain`: until the log is empty (behind the fence).
    async fn catch_up_round(&mut self, drain: bool) -> Result<i64, MoveError> {
        let region = self.region;
        let mut consumed = 0i64;
        let mut users_total = 0i64;
        loop {
            let rows = self
                .source
                .query(
                    "SELECT seq, user_id::text FROM umstore.region_move_log
                     WHERE region = $1 ORDER BY seq LIMIT $2",
                    &[&region, &self.options.batch_users],
                )
                .await
                .map_err(db("reading the source's move log"))?;
            if rows.is_empty() {
                break;
            }
            let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            let users: Vec<String> = rows
                .iter()
                .map(|r| r.get::<_, String>(1))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            self.recopy_users(&users).await?;
            self.source
                .execute(
                    "DELETE FROM umstore.region_move_log WHERE seq = ANY($1)",
                    &[&seqs],
                )
                .await
                .map_err(db("consuming the source's move log"))?;
            consumed += seqs.len() as i64;
            users_total += users.len() as i64;
            if !drain && (seqs.len() as i64) < self.options.batch_users {
                break;
            }
        }
        self.home
            .execute(
                "UPDATE umstore.region_moves SET catch_up_rounds = catch_up_rounds + 1,
                        users_caught_up = users_caught_up + $2 WHERE id = $1",
                &[&self.id, &users_total],
            )
            .await
            .map_err(db("recording the catch-up"))?;
        Ok(consumed)
    }

    /// Replaces `users`' rows of the region in the target with the source's.
    async fn recopy_users(&mut self, users: &[String]) -> Result<(), MoveError> {
        let region = self.region;
        let via_stage = self.via_stage;
        // Not read-only: the batch's users are staged in a temporary table.
        let src = self
            .source
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(db("starting the source's snapshot"))?;
        stage_users(&src, users).await?;
        let dst = self
            .target
            .transaction()
            .await
            .map_err(db("starting the target's transaction"))?;
        delete_region_rows(&dst, region, Some(users)).await?;
        for table in MOVED_TABLES {
            copy_table(
                &src,
                &dst,
                table,
                region,
                true,
                via_stage,
                &mut self.columns,
            )
            .await?;
        }
        dst.commit()
            .await
            .map_err(db("committing the catch-up into the target"))?;
        src.commit()
            .await
            .map_err(db("ending the source's snapshot"))?;
        Ok(())
    }

    /// Raises the fence on the source and records when.
    async fn fence(&mut self, to: &str) -> Result<(), MoveError> {
        set_state(self.source, self.region, "fenced", to, self.options).await?;
        self.home
            .execute(
                "UPDATE umstore.region_moves SET fence_started_at = clock_timestamp() WHERE id = $1",
                &[&self.id],
            )
            .await
            .map_err(db("recording the fence"))?;
        Ok(())
    }

    /// Behind the fence: the last changes, the target's sequences, the target
    /// opened, then the switch (home's placement and the journal, one
    /// transaction), then the source marked `moved`.
    async fn finish_behind_fence(&mut self, from: &str, to: &str) -> Result<(), MoveError> {
        let region = self.region;
        // Resumed here: the fence may not have been raised yet.
        set_state(self.source, region, "fenced", to, self.options).await?;
        self.catch_up_round(true).await?;
        for table in IDENTITY_TABLES {
            raise_identity(self.target, table, region).await?;
        }
        set_state(self.target, region, "open", from, self.options).await?;
        let switched = self
            .home
            .execute(
                "WITH moved AS (
                     UPDATE umstore.region_moves
                     SET fence_ms = extract(epoch FROM clock_timestamp()
                                     - coalesce(fence_started_at, clock_timestamp())) * 1000
                     WHERE id = $1 AND fence_ms IS NULL
                 )
                 UPDATE umstore.region_placement
                 SET cluster = $3, epoch = epoch + 1, placed_at = now()
                 WHERE region = $2 AND cluster = $4",
                &[&self.id, &region, &to, &from],
            )
            .await
            .map_err(db("switching the region's placement in the home cluster"))?;
        if switched == 0 {
            info!(region, to, "placement already names the target");
        }
        set_state(self.source, region, "moved", to, self.options).await?;
        Ok(())
    }

    /// After the grace, deletes the source's rows of the region.
    async fn clean_up(&mut self, to: &str) -> Result<(), MoveError> {
        let region = self.region;
        // Resumed here: the source may still be fenced.
        set_state(self.source, region, "moved", to, self.options).await?;
        let since: f64 = self
            .home
            .query_one(
                "SELECT extract(epoch FROM now() - phase_at)::float8
                 FROM umstore.region_moves WHERE id = $1",
                &[&self.id],
            )
            .await
            .map_err(db("reading the move's journal row"))?
            .get(0);
        let waited = Duration::from_secs_f64(since.max(0.0));
        if let Some(left) = self.options.grace.checked_sub(waited) {
            info!(
                region,
                grace_ms = left.as_millis() as u64,
                "waiting before the source's rows go"
            );
            tokio::time::sleep(left).await;
        }
        let tx = self
            .source
            .transaction()
            .await
            .map_err(db("starting the source's transaction"))?;
        delete_region_rows(&tx, region, None).await?;
        tx.execute(
            "DELETE FROM umstore.region_move_log WHERE region = $1",
            &[&region],
        )
        .await
        .map_err(db("clearing the source's move log"))?;
        tx.commit()
            .await
            .map_err(db("deleting the region's rows from the source"))?;
        Ok(())
    }
}

async fn schema_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM umstore.schema_migrations",
            &[],
        )
        .await
        .map(|r| r.get(0))
}

/// Changes `region`'s state on one cluster under the region's exclusive
/// advisory lock: it waits for the region's write transactions in flight
/// (each holds the lock shared), and every later one reads the new state.
/// A wait longer than the lock timeout is tried again (writers queue behind
/// it meanwhile, so it is not starved).
async fn set_state(
    client: &mut Client,
    region: &str,
    state: &str,
    peer: &str,
    options: &MoveOptions,
) -> Result<(), MoveError> {
    let timeout = format!("{}ms", options.lock_timeout.as_millis().max(1));
    let mut tries = 0u32;
    loop {
        tries += 1;
        let tx = client
            .transaction()
            .await
            .map_err(db("starting a state change"))?;
        tx.execute("SELECT set_config('lock_timeout', $1, true)", &[&timeout])
            .await
            .map_err(db("setting the lock timeout"))?;
        let locked = tx
            .execute(
                "SELECT pg_advisory_xact_lock($1, umstore.region_lock_key($2::text::bpchar))",
                &[&REGION_LOCK_CLASS, &region],
            )
            .await;
        match locked {
            Ok(_) => {}
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                drop(tx);
                if tries >= 30 {
                    return Err(MoveError::Db {
                        what: format!(
                            "waiting for region {region}'s writes in flight to set it {state}"
                        ),
                        source: e,
                    });
                }
                continue;
            }
            Err(e) => return Err(db(format!("locking region {region}"))(e)),
        }
        tx.execute(
            "UPDATE umstore.region_state SET state = $2, peer = $3, changed_at = now()
             WHERE region = $1::text::bpchar",
            &[&region, &state, &peer],
        )
        .await
        .map_err(db(format!("setting region {region} {state}")))?;
        tx.commit()
            .await
            .map_err(db(format!("setting region {region} {state}")))?;
        return Ok(());
    }
}

/// The target must seal blind indexes with the source's key, or a moved
/// user's identity token would not be found: copies it when the target has
/// none, refuses when they differ.
async fn same_blind_index_key(
    source: &Client,
    target: &Client,
    from: &str,
    to: &str,
) -> Result<(), MoveError> {
    const KEY: &str = "SELECT wrapped_key, kek_name, kek_version FROM umstore.key_material
                       WHERE name = 'blind_index'";
    let s = source
        .query_opt(KEY, &[])
        .await
        .map_err(db("reading the source's blind-index key"))?;
    let t = target
        .query_opt(KEY, &[])
        .await
        .map_err(db("reading the target's blind-index key"))?;
    match (s, t) {
        (Some(s), None) => {
            let (w, n, v): (Vec<u8>, String, i32) = (s.get(0), s.get(1), s.get(2));
            target
                .execute(
                    "INSERT INTO umstore.key_material (name, wrapped_key, kek_name, kek_version)
                     VALUES ('blind_index', $1, $2, $3) ON CONFLICT (name) DO NOTHING",
                    &[&w, &n, &v],
                )
                .await
                .map_err(db("copying the blind-index key to the target"))?;
            Ok(())
        }
        (Some(s), Some(t)) if s.get::<_, Vec<u8>>(0) != t.get::<_, Vec<u8>>(0) => {
            Err(MoveError::Refused(format!(
                "clusters {from} and {to} hold different blind-index keys \
                 (umstore.key_material): the region's identity-token index would not be found \
                 in {to}; give every cluster home's key first"
            )))
        }
        _ => Ok(()),
    }
}

/// The columns `COPY` may write of `table` (no generated ones), in order.
async fn columns(
    client: &impl tokio_postgres::GenericClient,
    table: &str,
) -> Result<String, MoveError> {
    let rows = client
        .query(
            "SELECT quote_ident(attname) FROM pg_attribute
             WHERE attrelid = ('umstore.' || quote_ident($1))::regclass
               AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
             ORDER BY attnum",
            &[&table],
        )
        .await
        .map_err(db(format!("reading the columns of {table}")))?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join(", "))
}

/// Fills the session's `pg_temp.move_users` with `users` (created on first use).
async fn stage_users(
    client: &tokio_postgres::Transaction<'_>,
    users: &[String],
) -> Result<(), MoveError> {
    client
        .batch_execute(
            "CREATE TEMP TABLE IF NOT EXISTS move_users (user_id uuid PRIMARY KEY)
                 ON COMMIT DELETE ROWS",
        )
        .await
        .map_err(db("creating the batch table"))?;
    client
        .execute(
            "INSERT INTO pg_temp.move_users SELECT DISTINCT u::uuid FROM unnest($1::text[]) u",
            &[&users],
        )
        .await
        .map_err(db("staging the batch's users"))?;
    Ok(())
}

/// Streams `table`'s rows of `region` (of the users staged in `src`'s
/// `pg_temp.move_users` only, when `staged`) from `src` into `dst` with
/// binary `COPY`; returns the rows copied.
async fn copy_table(
    src: &tokio_postgres::Transaction<'_>,
    dst: &tokio_postgres::Transaction<'_>,
    table: &str,
    region: &'static str,
    only_staged_users: bool,
    via_stage: bool,
    cache: &mut BTreeMap<String, String>,
) -> Result<u64, MoveError> {
    let cols = match cache.get(table) {
        Some(c) => c.clone(),
        None => {
            let c = columns(dst, table).await?;
            cache.insert(table.to_owned(), c.clone());
            c
        }
    };
    // `region` is one of the fixed region codes (check_region); user ids went
    // through a parameter into the temporary table.
    let users = if only_staged_users {
        " AND user_id IN (SELECT user_id FROM pg_temp.move_users)"
    } else {
        ""
    };
    let out = src
        .copy_out(
            format!(
                "COPY (SELECT {cols} FROM umstore.{table} WHERE region = '{region}'{users}) \
                 TO STDOUT (FORMAT binary)"
            )
            .as_str(),
        )
        .await
        .map_err(db(format!("copying {table} out of the source")))?;
    // COPY FROM is refused on a table with row-level security for a login
    // that does not bypass it (the administrator login): the rows go into a
    // temporary table first, then through INSERT, under the policies.
    let into = if via_stage {
        dst.batch_execute(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS move_stage_{table} (LIKE umstore.{table})
                 ON COMMIT DELETE ROWS;
             TRUNCATE pg_temp.move_stage_{table}"
        ))
        .await
        .map_err(db(format!("preparing the staging table of {table}")))?;
        format!("pg_temp.move_stage_{table}")
    } else {
        format!("umstore.{table}")
    };
    let sink = dst
        .copy_in::<_, bytes::Bytes>(
            format!("COPY {into} ({cols}) FROM STDIN (FORMAT binary)").as_str(),
        )
        .await
        .map_err(db(format!("copying {table} into the target")))?;
    pin_mut!(out);
    pin_mut!(sink);
    sink.send_all(&mut out)
        .await
        .map_err(db(format!("copying {table} between the clusters")))?;
    let rows = sink
        .as_mut()
        .finish()
        .await
        .map_err(db(format!("finishing the copy of {table} into the target")))?;
    if via_stage {
        dst.execute(
            format!(
                "INSERT INTO umstore.{table} ({cols}) OVERRIDING SYSTEM VALUE \
                 SELECT {cols} FROM pg_temp.move_stage_{table}"
            )
            .as_str(),
            &[],
        )
        .await
        .map_err(db(format!(
            "inserting the copied rows of {table} into the target"
        )))?;
    }
    Ok(rows)
}

/// Whether `client`'s login bypasses row-level security (a superuser, or
/// `BYPASSRLS`): it may then `COPY` straight into the tables.
async fn bypasses_rls(client: &Client) -> Result<bool, MoveError> {
    Ok(client
        .query_one(
            "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(db("reading the mover's login"))?
        .get(0))
}

/// Deletes the region's rows (of `users` only, when given) from every moved
/// table, children first. The history's append-only trigger lets these
/// through because the session names the region (migration 0013).
async fn delete_region_rows(
    tx: &tokio_postgres::Transaction<'_>,
    region: &'static str,
    users: Option<&[String]>,
) -> Result<(), MoveError> {
    // `region` is one of the fixed codes (check_region). Citus passes SET
    // LOCAL on to the workers (where the shards' triggers run) when told to.
    tx.batch_execute(&format!(
        "SET LOCAL citus.propagate_set_commands = 'local';
         SET LOCAL umstore.moving_region = '{region}'"
    ))
    .await
    .map_err(db("naming the moving region"))?;
    let filter = match users {
        Some(users) => {
            stage_users(tx, users).await?;
            "AND user_id IN (SELECT user_id FROM pg_temp.move_users)"
        }
        None => "",
    };
    for table in MOVED_TABLES.iter().rev() {
        tx.execute(
            &format!("DELETE FROM umstore.{table} WHERE region = $1::text::bpchar {filter}"),
            &[&region],
        )
        .await
        .map_err(db(format!("deleting region {region}'s rows of {table}")))?;
    }
    Ok(())
}

/// Raises `table`'s identity sequence in `client` past the region's ids, so
/// the target's next rows of the region do not take a copied id.
async fn raise_identity(client: &Client, table: &str, region: &str) -> Result<(), MoveError> {
    // Two statements: under Citus the first goes to the region's shard, the
    // second must run on the coordinator, whose sequence inserts draw from.
    let max: Option<i64> = client
        .query_one(
            &format!("SELECT max(id) FROM umstore.{table} WHERE region = $1::text::bpchar"),
            &[&region],
        )
        .await
        .map_err(db(format!(
            "reading the copied ids of {table} in the target"
        )))?
        .get(0);
    let Some(max) = max else {
        return Ok(());
    };
    client
        .execute(
            &format!(
                "SELECT setval(s, $1) FROM
                   (SELECT pg_get_serial_sequence('umstore.{table}', 'id')::regclass AS s) x
                 WHERE $1 > coalesce(pg_sequence_last_value(s), 0)"
            ),
            &[&max],
        )
        .await
        .map_err(db(format!(
            "raising the id sequence of {table} in the target"
        )))?;
    Ok(())
}
