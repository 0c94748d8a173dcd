//! `bulk import <file>`: backfills of many users from a file (docs/bulk.md,
//! "Bulk import").

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::info;
use umstore_data_plane::bulk::import::{self, ImportOptions, Progress};
use umstore_data_plane::bulk::{self, EngineChoice};
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::db::Database;
use umstore_migrations::Runner;

use super::{open_keyring, KeyArgs};

/// The arguments of `bulk import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The file: JSON Lines (`.jsonl`, `.ndjson`) or CSV with a header row
    /// (`.csv`), one user per record: a METADATA_CREATED event, or user_id,
    /// region and the payload's fields.
    file: PathBuf,
    /// Which engine seals the personal data.
    #[arg(long, env = "UMSTORE_ENGINE", default_value = "auto", value_parser = super::bulk::parse_engine)]
    engine: EngineChoice,
    /// Users per batch: one transaction, one key-wrapping call, one engine call.
    #[arg(long, default_value_t = import::DEFAULT_BATCH_USERS)]
    batch_users: usize,
    /// Where refused records go, one JSON object per line (line, user_id,
    /// reason) [default: <file>.rejects.jsonl].
    #[arg(long)]
    rejects: Option<PathBuf>,
    /// `source` recorded for records that name none.
    #[arg(long, default_value = "bulk-import")]
    source: String,
    /// Another run of the same import may take it over once this run has
    /// sent no heartbeat for this long (a run that died); a live run renews
    /// its heartbeat every quarter of it.
    #[arg(long, default_value = "30s", value_parser = parse_takeover)]
    takeover_after: Duration,
    /// Do not refresh the stats views at the end.
    #[arg(long)]
    no_refresh_stats: bool,
}

/// Runs `bulk import`.
pub async fn run(
    args: ImportArgs,
    database: &Database,
    layout: Option<&Layout>,
    data_dir: &Path,
    key_args: &KeyArgs,
) -> Result<()> {
    if layout.is_some() {
        bail!(
            "bulk import loads a store of one cluster; for a store of several, split the file by \
             region and import each part with --database-url of the cluster that holds its \
             regions (without --clusters)"
        );
    }
    if args.batch_users == 0 {
        bail!("--batch-users must be at least 1");
    }
    let client = database.connect().await?;
    Runner::default()
        .verify(&client)
        .await
        .context("the schema must be current before importing: run `migrate up`")?;
    let keyring = open_keyring(key_args.provider_config(data_dir)?, &client).await?;
    let selected = bulk::select(args.engine, args.batch_users * 7)?;
    info!(engine = %selected.engine.info(), reason = %selected.reason, "bulk engine");
    let mut options = ImportOptions::for_file(&args.file);
    options.batch_users = args.batch_users;
    options.source = args.source.clone();
    options.takeover_after = args.takeover_after;
    if let Some(rejects) = &args.rejects {
        options.rejects = rejects.clone();
    }
    let mut shown = Shown::new(std::io::stderr().is_terminal());
    let report = import::import(
        database,
        &keyring,
        selected.engine,
        &args.file,
        &options,
        |p| shown.update(p),
    )
    .await
    .with_context(|| {
        format!(
            "importing {} stopped; what was committed stays: run the same command again to resume",
            args.file.display()
        )
    })?;
    shown.finish();
    let p = report.progress;
    if report.already_done {
        println!(
            "{} was imported before (import {}): {} users, {} refused; nothing to do",
            args.file.display(),
            short(&report.import_id),
            p.imported,
            p.rejected
        );
        return Ok(());
    }
    println!(
        "imported {} users from {} in {:.1} s ({:.0} users/s; {} engine: {} fields sealed in {:.2} s; \
         loading and committing {:.1} s){}",
        report.imported_now,
        args.file.display(),
        report.elapsed.as_secs_f64(),
        report.users_per_second(),
        report.engine,
        report.fields_sealed,
        report.seal_time.as_secs_f64(),
        report.load_time.as_secs_f64(),
        if report.resumed { "; resumed an earlier run" } else { "" }
    );
    println!(
        "in all: {} users imported, {} records refused{} (import {})",
        p.imported,
        p.rejected,
        if p.rejected > 0 {
            format!(
                ", listed with line and reason in {}",
                report.rejects.display()
            )
        } else {
            String::new()
        },
        short(&report.import_id)
    );
    if !args.no_refresh_stats {
        for line in super::stats::refresh(&client, true)
            .await
            .context("the users are imported, but refreshing the stats views failed")?
        {
            println!("{line}");
        }
    }
    Ok(())
}

fn parse_takeover(s: &str) -> Result<Duration, String> {
    let d = umstore_data_plane::ingest::parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("--takeover-after must be at least 1s".into());
    }
    Ok(d)
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A progress bar on a terminal, else a log line every 10 seconds.
struct Shown {
    bar: Option<indicatif::ProgressBar>,
    last_log: Instant,
}

impl Shown {
    fn new(terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} ({eta} left) {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Shown {
            bar,
            last_log: Instant::now(),
        }
    }

    fn update(&mut self, p: &Progress) {
        let msg = format!("{} imported, {} refused", p.imported, p.rejected);
        match &self.bar {
            Some(bar) => {
                bar.set_length(p.bytes_total);
                bar.set_position(p.bytes_done);
                bar.set_message(msg);
            }
            None if self.last_log.elapsed() >= Duration::from_secs(10)
                || p.bytes_done >= p.bytes_total =>
            {
                self.last_log = Instant::now();
                let percent = 100.0 * p.bytes_done as f64 / (p.bytes_total.max(1)) as f64;
                info!(
                    percent = format!("{percent:.1}"),
                    lines = p.lines,
                    imported = p.imported,
                    refused = p.rejected,
                    "importing"
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
