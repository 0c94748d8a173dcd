//! Backup and restore benchmark (BENCHMARKS.md, "Backup and restore"):
//!
//! A store of N users, seeded with the data plane's keys into a harness
//! PostgreSQL 15 that archives WAL through the operator's `archive_command`
//! (fsync and synchronous_commit on, as in production), then on loopback:
//!
//! 1. a full backup with the backup Job's script through the `pgbackrest server`
//!    of the database pod (TLS, the operator's certificates; zstd, AES-256),
//!    beside `pg_basebackup -D <dir> -X stream -c fast` (plain format, synced
//!    like pgBackRest's files) of the same data as the baseline;
//! 2. a restore with the rendered restore script into a fresh directory and the
//!    server started until recovery has ended (to the end of the archive), beside
//!    copying the `pg_basebackup` directory into place (synced) and starting it
//!    (or, with `--start-in-place`, `pg_basebackup` and starting its directory);
//! 3. the latency of single-user UPDATEs at a fixed rate on a connection of their
//!    own with nothing running, during the pgBackRest backup and during
//!    `pg_basebackup`.
//!
//! ```sh
//! cargo bench -p umstore-operator --bench backup -- --users 1000000
//! ```

#[path = "../tests/support/backup_rig.rs"]
mod backup_rig;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use umstore_data_plane::seed;
use umstore_e2e::localpg::{ChildSetup, PgBinaries};
use umstore_operator::builders::backup;

use backup_rig::{files_under, keyring, start_restored, users, Rig, PASSPHRASE};

#[derive(Parser, Debug)]
struct Args {
    /// Users seeded.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// The writer's UPDATEs per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// How long the writer runs with nothing else running (the baseline).
    #[arg(long, default_value_t = 30)]
    baseline_seconds: u64,
    /// The longest the writer runs beside a backup (it stops with the backup).
    #[arg(long, default_value_t = 900)]
    max_writer_seconds: u64,
    /// Start the pg_basebackup directory where it was written instead of a
    /// synced copy of it (less disk: the restore baseline is then
    /// pg_basebackup + start).
    #[arg(long)]
    start_in_place: bool,
    // cargo bench passes --bench.
    #[arg(long, hide = true)]
    bench: bool,
}

const MB: f64 = 1_000_000.0;

/// What one writer run saw.
struct Writes {
    latencies: Vec<Duration>,
    /// Ticks skipped because the previous UPDATE was still running.
    late: u64,
    took: Duration,
}

impl Writes {
    /// Nearest-rank percentile, in milliseconds.
    fn ms(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return f64::NAN;
        }
        let rank = (p * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
    }

    fn max_ms(&self) -> f64 {
        self.latencies
            .iter()
            .max()
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    }
}

/// UPDATEs of seeded users (a random sample, in turn) at `rate` per second on
/// `client` until `stop` is set or `limit` has passed.
async fn writer(
    client: &tokio_postgres::Client,
    sample: &[(String, uuid::Uuid)],
    rate: u32,
    limit: Duration,
    stop: &AtomicBool,
) -> Writes {
    let update = client
        .prepare(
            "UPDATE umstore.user_metadata SET version = version + 1, updated_at = now()
             WHERE region = $1 AND user_id = $2",
        )
        .await
        .expect("prepare the writer's UPDATE");
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let mut latencies = Vec::new();
    for (region, user) in sample.iter().cycle() {
        tick.tick().await;
        if stop.load(Ordering::Relaxed) || started.elapsed() >= limit {
            break;
        }
        let t = Instant::now();
        let n = client
            .execute(&update, &[region, user])
            .await
            .expect("the writer's UPDATE");
        latencies.push(t.elapsed());
        assert_eq!(n, 1, "the user {user} exists");
    }
    let took = started.elapsed();
    // Skipped ticks: the UPDATEs a slow one kept from starting on time.
    let due = (took.as_secs_f64() / period.as_secs_f64()) as u64;
    Writes {
        late: due.saturating_sub(latencies.len() as u64),
        latencies,
        took,
    }
}

/// Runs `cmd` to completion beside the writer; returns its output, its wall
/// time and what the writer saw while it ran.
async fn beside_writer(
    cmd: Command,
    client: &tokio_postgres::Client,
    sample: &[(String, uuid::Uuid)],
    args: &Args,
) -> (Output, Duration, Writes) {
    let stop = AtomicBool::new(false);
    let run = async {
        let t = Instant::now();
        let out = tokio::process::Command::from(cmd)
            .output()
            .await
            .expect("run the backup");
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        (out, took)
    };
    let limit = Duration::from_secs(args.max_writer_seconds);
    let ((out, took), writes) = tokio::join!(run, writer(client, sample, args.rate, limit, &stop));
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, took, writes)
}

/// Bytes in the files under `dir`, not following links (the repository's
/// `latest` links to a backup).
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| {
            let path = e.expect("entry").path();
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => bytes_under(&path),
                Ok(m) if m.is_file() => m.len(),
                _ => 0,
            }
        })
        .sum()
}

/// `cp -a` as `postgres`, then every file fsynced (pgBackRest's restore and
/// `pg_basebackup` sync what they write).
fn copy_synced(from: &Path, to: &Path) {
    let mut cmd = Command::new("cp");
    cmd.arg("-a").arg(from).arg(to);
    ChildSetup::postgres().apply(&mut cmd).expect("as postgres");
    let out = cmd.output().expect("cp");
    assert!(
        out.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in files_under(to) {
        std::fs::File::open(&file)
            .and_then(|f| f.sync_all())
            .unwrap_or_else(|e| panic!("fsync {}: {e}", file.display()));
    }
}

/// What the restored store holds: users and the sum of every row's version
/// (which each of the writer's UPDATEs raises by one).
async fn fingerprint(client: &tokio_postgres::Client) -> (i64, i64) {
    let versions: i64 = client
        .query_one(
            "SELECT sum(version)::bigint FROM umstore.user_metadata",
            &[],
        )
        .await
        .expect("versions")
        .get(0);
    (users(client).await, versions)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn rate_mb(bytes: u64, d: Duration) -> String {
    format!("{:.1} MB/s", bytes as f64 / MB / d.as_secs_f64())
}

fn latency_row(name: &str, w: &Writes, base: &Writes) {
    println!(
        "| {name} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2}× / {:.2}× / {:.2}× |",
        secs(w.took),
        w.latencies.len(),
        w.late,
        w.ms(0.5),
        w.ms(0.95),
        w.ms(0.99),
        w.max_ms(),
        w.ms(0.5) / base.ms(0.5),
        w.ms(0.95) / base.ms(0.95),
        w.ms(0.99) / base.ms(0.99),
    );
}

async fn run(args: Args) {
    // Durable, as a store's primary runs (the harness turns both off).
    let settings = vec![
        ("fsync".to_string(), "on".to_string()),
        ("synchronous_commit".to_string(), "on".to_string()),
    ];
    let Some(rig) = Rig::start_with(settings).await else {
        println!("skipping: no pgBackRest");
        return;
    };
    // The first Job creates the stanza; here it exists before the seed, so the
    // seed's WAL is archived as it is written (a store that has been backing up).
    let out = rig
        .tool
        .run(
            &backup_rig::pairs(&rig.job_env),
            &["--stanza=coordinator", "stanza-create"],
        )
        .expect("stanza-create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut admin = rig.admin().await;
    umstore_migrations::Runner::default()
        .up(&mut admin)
        .await
        .expect("migrate");
    let keys = keyring(&admin, &rig.dir.path().join("keys")).await;
    let mut second = rig.admin().await;
    let t = Instant::now();
    seed::seed_with(&mut admin, Some(&mut second), args.users, 1, &keys)
        .await
        .expect("seed");
    let seeded_in = t.elapsed();
    let t = Instant::now();
    for sql in ["VACUUM ANALYZE", "CHECKPOINT"] {
        admin.batch_execute(sql).await.expect(sql);
    }
    rig.archive_now().await;
    let settled_in = t.elapsed();
    let db_size: i64 = admin
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .expect("size")
        .get(0);
    let db_size = db_size as u64;
    let archived_before = bytes_under(&rig.repo.join("archive"));
    println!(
        "seeded {} users in {} ({:.0} users/s), VACUUM ANALYZE + archive in {}; database {:.1} MB; \
         WAL archived so far {:.1} MB",
        args.users,
        secs(seeded_in),
        args.users as f64 / seeded_in.as_secs_f64(),
        secs(settled_in),
        db_size as f64 / MB,
        archived_before as f64 / MB
    );
    let sample: Vec<(String, uuid::Uuid)> = admin
        .query(
            "SELECT region::text, user_id FROM umstore.user_directory ORDER BY random() LIMIT 50000",
            &[],
        )
        .await
        .expect("sample")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let write_conn = rig.admin().await;

    // Writes with nothing else running.
    let never = AtomicBool::new(false);
    let base = writer(
        &write_conn,
        &sample,
        args.rate,
        Duration::from_secs(args.baseline_seconds),
        &never,
    )
    .await;
    println!(
        "writer alone: {} UPDATEs, P50 {:.2} ms",
        base.latencies.len(),
        base.ms(0.5)
    );

    // The full backup as the Job runs it, beside the writer.
    let report_path = rig.dir.path().join("report-full.json");
    let script = backup::job_script(
        "full",
        &["coordinator".into()],
        &report_path.display().to_string(),
    );
    let (_, backup_took, during_backup) =
        beside_writer(rig.job_command(&script), &write_conn, &sample, &args).await;
    let report: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&report_path)
            .expect("report")
            .trim(),
    )
    .expect("the report is JSON");
    let copied = report["last"]["size"].as_u64().expect("size");
    let repo_delta = report["last"]["repoSize"].as_u64().expect("repoSize");
    let pgbackrest_span = report["last"]["stop"].as_u64().unwrap_or(0)
        - report["last"]["start"].as_u64().unwrap_or(0);
    let backup_set = bytes_under(&rig.repo.join("backup"));
    println!(
        "pgBackRest full backup: {} (pgBackRest's own start→stop {pgbackrest_span} s), \
         {:.1} MB copied, {:.1} MB in the repository",
        secs(backup_took),
        copied as f64 / MB,
        repo_delta as f64 / MB
    );
    rig.archive_now().await;
    let source = fingerprint(&admin).await;

    // Restore into a fresh directory and start it to the end of the archive.
    let restored_dir = rig.dir.path().join("restored");
    let t = Instant::now();
    let out = rig.restore(&restored_dir, None, PASSPHRASE);
    let restore_files = t.elapsed();
    assert!(
        out.status.success(),
        "restore failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = start_restored(&restored_dir).await;
    let restore_took = t.elapsed();
    let client = umstore_e2e::connect(&restored.conninfo(&rig.db))
        .await
        .expect("connect to the restored database");
    assert_eq!(
        fingerprint(&client).await,
        source,
        "the restore holds every user and every write"
    );
    drop(client);
    drop(restored);
    std::fs::remove_dir_all(&restored_dir).expect("remove the restored directory");
    println!(
        "pgBackRest restore: {} (files {}, start and recovery {})",
        secs(restore_took),
        secs(restore_files),
        secs(restore_took - restore_files)
    );

    // The baseline: pg_basebackup of the same data over loopback TCP.
    let bins = PgBinaries::discover().expect("postgres binaries");
    let basebackup_dir = rig.dir.path().join("basebackup");
    let mut cmd = Command::new(bins.program("pg_basebackup"));
    cmd.arg("-D")
        .arg(&basebackup_dir)
        .args(["-X", "stream", "-c", "fast", "-d"])
        .arg(rig.pg.primary().tcp_conninfo("postgres"));
    ChildSetup::postgres().apply(&mut cmd).expect("as postgres");
    let (_, basebackup_took, during_basebackup) =
        beside_writer(cmd, &write_conn, &sample, &args).await;
    let basebackup_size = bytes_under(&basebackup_dir);
    println!(
        "pg_basebackup: {}, {:.1} MB",
        secs(basebackup_took),
        basebackup_size as f64 / MB
    );
    let source_after = fingerprint(&admin).await;

    // Its restore: the directory copied into place (synced) and started, or
    // (--start-in-place) started where pg_basebackup wrote it.
    let (start_dir, copy_took) = if args.start_in_place {
        (basebackup_dir.clone(), None)
    } else {
        let copy_dir = rig.dir.path().join("restored");
        let t = Instant::now();
        copy_synced(&basebackup_dir, &copy_dir);
        (copy_dir, Some(t.elapsed()))
    };
    let t = Instant::now();
    let restored = start_restored(&start_dir).await;
    let start_took = t.elapsed();
    let client = umstore_e2e::connect(&restored.conninfo(&rig.db))
        .await
        .expect("connect to the base backup's server");
    let copied_state = fingerprint(&client).await;
    assert_eq!(copied_state.0, source_after.0, "every user");
    assert!(
        copied_state.1 <= source_after.1 && copied_state.1 >= source.1,
        "the writes up to the end of pg_basebackup"
    );
    drop(client);
    drop(restored);
    if start_dir != basebackup_dir {
        std::fs::remove_dir_all(&start_dir).expect("remove the copy");
    }
    std::fs::remove_dir_all(&basebackup_dir).expect("remove the base backup");
    // The restore baseline: the copy and the start, or pg_basebackup and the start.
    let (baseline_restore, baseline_label, first_part) = match copy_took {
        Some(copy) => (
            copy + start_took,
            "baseline: copy the pg_basebackup directory (synced) + start",
            copy,
        ),
        None => (
            basebackup_took + start_took,
            "baseline: pg_basebackup into the new directory + start it there",
            basebackup_took,
        ),
    };

    println!();
    println!(
        "N = {} users; database {:.1} MB (pg_database_size); seeded in {}",
        args.users,
        db_size as f64 / MB,
        secs(seeded_in)
    );
    println!();
    println!("| | wall time | MB/s of the database | stored |");
    println!("|---|---|---|---|");
    println!(
        "| full backup: Job script through the TLS server (zstd, AES-256) | {} | {} | {:.1} MB in the repository ({:.1} MB copied) |",
        secs(backup_took),
        rate_mb(db_size, backup_took),
        repo_delta as f64 / MB,
        copied as f64 / MB
    );
    println!(
        "| baseline: `pg_basebackup -X stream -c fast` (plain, synced) | {} | {} | {:.1} MB |",
        secs(basebackup_took),
        rate_mb(db_size, basebackup_took),
        basebackup_size as f64 / MB
    );
    println!(
        "| ratio backup / baseline | **{:.2}×** | | {:.2}× |",
        backup_took.as_secs_f64() / basebackup_took.as_secs_f64(),
        repo_delta as f64 / basebackup_size as f64
    );
    println!(
        "| restore: restore.sh + start to the end of the archive | {} ({} + {}) | {} | |",
        secs(restore_took),
        secs(restore_files),
        secs(restore_took - restore_files),
        rate_mb(db_size, restore_took)
    );
    println!(
        "| {baseline_label} | {} ({} + {}) | {} | |",
        secs(baseline_restore),
        secs(first_part),
        secs(start_took),
        rate_mb(db_size, baseline_restore)
    );
    println!(
        "| ratio restore / baseline | **{:.2}×** | | |",
        restore_took.as_secs_f64() / baseline_restore.as_secs_f64()
    );
    println!();
    println!(
        "Writer: single-user UPDATEs at {}/s on a connection of its own (synchronous_commit on).",
        args.rate
    );
    println!();
    println!("| writes | took | UPDATEs | late ticks | P50 ms | P95 ms | P99 ms | max ms | vs none P50 / P95 / P99 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    latency_row("no backup (baseline)", &base, &base);
    latency_row("during the pgBackRest full backup", &during_backup, &base);
    latency_row("during pg_basebackup", &during_basebackup, &base);
    println!();
    println!(
        "WAL archived: {:.1} MB before the backup, {:.1} MB at the end",
        archived_before as f64 / MB,
        bytes_under(&rig.repo.join("archive")) as f64 / MB
    );
    println!("backup set on disk: {:.1} MB", backup_set as f64 / MB);
}

fn main() {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(args));
}
