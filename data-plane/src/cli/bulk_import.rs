//! `bulk import <file>`: backfills of many users from a file (docs/bulk.md,
//! "Bulk import").

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::info;
use umstore_data_plane::bulk::import::{self, ImportOptions, Progress, Share};
use umstore_data_plane::bulk::{self, EngineChoice};
use umstore_data_plane::clusters::placement::Placement;
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

/// Runs `bulk import`: into one database, or cluster by cluster into a
/// store of several (`--clusters`).
pub async fn run(
    args: ImportArgs,
    database: &Database,
    layout: Option<&Layout>,
    data_dir: &Path,
    key_args: &KeyArgs,
) -> Result<()> {
    if args.batch_users == 0 {
        bail!("--batch-users must be at least 1");
    }
    let layout = layout.filter(|l| l.is_multi());
    let targets = match layout {
        None => vec![(None, database.clone())],
        Some(layout) => layout
            .clusters()
            .iter()
            .zip(layout.writers(database))
            .map(|(c, w)| (Some(c.name.clone()), w))
            .collect(),
    };
    let mut clients = Vec::with_capacity(targets.len());
    for (name, target) in &targets {
        let client = target
            .connect()
            .await
            .with_context(|| format!("connecting to {}", cluster_name(name)))?;
        Runner::default().verify(&client).await.with_context(|| {
            format!(
                "the schema of {} must be current before importing: run `migrate up`",
                cluster_name(name)
            )
        })?;
        clients.push(client);
    }
    // The keys are the home cluster's, as the write path's.
    let keyring = open_keyring(key_args.provider_config(data_dir)?, &clients[0]).await?;
    let selected = bulk::select(args.engine, args.batch_users * 7)?;
    info!(engine = %selected.engine.info(), reason = %selected.reason, "bulk engine");
    let mut options = ImportOptions::for_file(&args.file);
    options.batch_users = args.batch_users;
    options.source = args.source.clone();
    options.takeover_after = args.takeover_after;
    if let Some(rejects) = &args.rejects {
        options.rejects = rejects.clone();
    }
    let Some(layout) = layout else {
        let report = import_one(&args, database, &keyring, &selected.engine, &options).await?;
        print_report(&args, &report, None);
        return refresh(&args, &clients[0]).await;
    };
    // Where each region is now: the home cluster's placement over the
    // layout. Each cluster's run is its own import (id: the file, the
    // cluster and the placement's epoch), so a region that moves between
    // two runs is judged again where it lives now.
    let placement = Placement::new(Arc::new(layout.clone()));
    placement
        .load(&clients[0])
        .await
        .context("reading the region placement from the home cluster")?;
    let placed: BTreeSet<String> = (0..targets.len())
        .flat_map(|i| placement.regions_of(i))
        .collect();
    let (mut imported, mut refused) = (0, 0);
    for (index, (name, target)) in targets.iter().enumerate() {
        let name = name.clone().unwrap_or_default();
        let mut options = options.clone();
        options.scope = Some(format!("{name}@{}", placement.epoch()));
        options.rejects = cluster_rejects(&options.rejects, &name);
        options.share = Some(Share {
            regions: placement.regions_of(index).into_iter().collect(),
            placed: placed.clone(),
            refuse_the_rest: index == 0,
            home: targets[0].1.clone(),
            others: targets
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index)
                .map(|(_, (_, w))| w.clone())
                .collect(),
        });
        info!(cluster = %name, regions = ?placement.regions_of(index), "importing into a cluster");
        let report = import_one(&args, target, &keyring, &selected.engine, &options).await?;
        print_report(&args, &report, Some(&name));
        imported += report.progress.imported;
        refused += report.progress.rejected;
        refresh(&args, &clients[index]).await?;
    }
    println!("all clusters: {imported} users imported, {refused} records refused");
    Ok(())
}

fn cluster_name(name: &Option<String>) -> String {
    match name {
        Some(name) => format!("cluster {name:?}"),
        None => "the database".to_owned(),
    }
}

/// A cluster's reject file: `<file>.<cluster>.rejects.jsonl` by default,
/// else `--rejects` with `.<cluster>` before its extension.
fn cluster_rejects(rejects: &Path, cluster: &str) -> PathBuf {
    let stem = rejects
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let named = match stem.strip_suffix(".rejects.jsonl") {
        Some(base) => format!("{base}.{cluster}.rejects.jsonl"),
        None => match stem.rsplit_once('.') {
            Some((base, ext)) => format!("{base}.{cluster}.{ext}"),
            None => format!("{stem}.{cluster}"),
        },
    };
    rejects.with_file_name(named)
}

async fn import_one(
    args: &ImportArgs,
    database: &Database,
    keyring: &umstore_data_plane::crypto::Keyring,
    engine: &Arc<dyn bulk::BulkEngine>,
    options: &ImportOptions,
) -> Result<import::ImportReport> {
    let mut shown = Shown::new(std::io::stderr().is_terminal());
    let report = import::import(
        database,
        keyring,
        Arc::clone(engine),
        &args.file,
        options,
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
    Ok(report)
}

fn print_report(args: &ImportArgs, report: &import::ImportReport, cluster: Option<&str>) {
    let p = report.progress;
    let into = cluster.map_or_else(String::new, |c| format!(" into cluster {c}"));
    if report.already_done {
        println!(
            "{} was imported{into} before (import {}): {} users, {} refused; nothing to do",
            args.file.display(),
            short(&report.import_id),
            p.imported,
            p.rejected
        );
        return;
    }
    println!(
        "imported {} users from {}{into} in {:.1} s ({:.0} users/s; {} engine: {} fields sealed in {:.2} s; \
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
        "in all{into}: {} users imported, {} records refused{} (import {})",
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
}

/// Refreshes the stats views of the database `client` is connected to,
/// unless `--no-refresh-stats`.
async fn refresh(args: &ImportArgs, client: &tokio_postgres::Client) -> Result<()> {
    if !args.no_refresh_stats {
        for line in super::stats::refresh(client, true)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cluster_has_its_own_reject_file_beside_the_default_or_the_given_one() {
        let default = ImportOptions::for_file(Path::new("/data/users.jsonl")).rejects;
        assert_eq!(
            cluster_rejects(&default, "south"),
            PathBuf::from("/data/users.jsonl.south.rejects.jsonl")
        );
        assert_eq!(
            cluster_rejects(Path::new("/tmp/bad.json"), "home"),
            PathBuf::from("/tmp/bad.home.json")
        );
        assert_eq!(
            cluster_rejects(Path::new("refused"), "home"),
            PathBuf::from("refused.home")
        );
    }
}
