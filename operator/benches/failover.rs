//! Failover and switchover of a Patroni group as the operator configures it, timed
//! through the read-write path, with Patroni's default timings as the baseline.
//!
//! `cargo bench -p umstore-operator --bench failover` (`-- --trials N`, default 10).
//! Each trial starts a fresh three-member coordinator group of the tier-2 example
//! (real PostgreSQL 15 under Patroni, the real kube-apiserver as the DCS, the
//! operator's Role), commits numbered rows in a loop through the read-write path,
//! SIGKILLs the leader's Patroni and PostgreSQL, and measures:
//!
//! * failover: kill → the first write acknowledged through the read-write path;
//! * elected: kill → a member answers `GET /primary` with 200;
//! * lost: acknowledged writes missing on the new leader;
//! * switchover pause: then a switchover to the remaining standby, and the longest
//!   gap between two acknowledged writes around it.
//!
//! Runs: the operator's timings in synchronous and asynchronous mode, and Patroni's
//! defaults (ttl 30, loop_wait 10, retry_timeout 10) in synchronous mode. Prints
//! P50/P95 (nearest rank) per run and the ratio to the baseline; asserts nothing.
//! Traffic goes to loopback only.

#[path = "../tests/support/patroni.rs"]
mod fixture;

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use fixture::{members, operator_rules, tier2, RenderedConf};
use umstore_crds::SynchronousMode;
use umstore_e2e::patroni::writer::{self, Writer};
use umstore_e2e::{KubeApiServer, PatroniCluster, PatroniUnavailable};
use umstore_operator::builders::patroni;
use umstore_operator::builders::postgres::PgRole;

const BOOTSTRAP: Duration = Duration::from_secs(120);
const FAILOVER: Duration = Duration::from_secs(120);
const WRITES: usize = 30;

/// Leader-lock ttl, loop_wait and retry_timeout, in seconds.
#[derive(Debug, Clone, Copy)]
struct Timings {
    name: &'static str,
    ttl: u32,
    loop_wait: u32,
    retry_timeout: u32,
}

const OPERATOR: Timings = Timings {
    name: "operator",
    ttl: patroni::TTL,
    loop_wait: patroni::LOOP_WAIT,
    retry_timeout: patroni::RETRY_TIMEOUT,
};
const PATRONI_DEFAULTS: Timings = Timings {
    name: "Patroni defaults",
    ttl: 30,
    loop_wait: 10,
    retry_timeout: 10,
};

#[derive(Debug)]
struct Trial {
    failover: Duration,
    elected: Duration,
    lost: usize,
    acknowledged: usize,
    switchover_pause: Duration,
}

fn main() -> anyhow::Result<()> {
    let trials = parse_trials()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("runtime")?;
    let kube = KubeApiServer::start().map_err(|e| anyhow!("kube-apiserver: {e}"))?;
    let runs = [
        (OPERATOR, SynchronousMode::On),
        (OPERATOR, SynchronousMode::Off),
        (PATRONI_DEFAULTS, SynchronousMode::On),
    ];
    let mut results = Vec::new();
    for (timings, mode) in runs {
        let mut samples = Vec::new();
        for i in 1..=trials {
            let trial = runtime
                .block_on(trial(&kube, timings, mode))
                .with_context(|| format!("{} {mode:?} trial {i}", timings.name))?;
            eprintln!(
                "{} synchronous={mode:?} trial {i}: failover {:.2}s, elected {:.2}s, \
                 lost {}/{}, switchover pause {:.2}s",
                timings.name,
                trial.failover.as_secs_f64(),
                trial.elected.as_secs_f64(),
                trial.lost,
                trial.acknowledged,
                trial.switchover_pause.as_secs_f64()
            );
            samples.push(trial);
        }
        results.push((timings, mode, samples));
    }
    report(&results);
    Ok(())
}

fn parse_trials() -> anyhow::Result<usize> {
    let mut args = std::env::args().skip(1);
    let mut trials = 10;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--trials" => {
                let n = args.next().context("--trials needs a number")?;
                trials = n.parse().with_context(|| format!("--trials {n}"))?;
            }
            // cargo bench passes --bench.
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}; use --trials N"),
        }
    }
    Ok(trials)
}

async fn trial(
    kube: &KubeApiServer,
    timings: Timings,
    mode: SynchronousMode,
) -> anyhow::Result<Trial> {
    let v = tier2(mode);
    let conf = RenderedConf::write(&v);
    let mut specs = members(&v, &conf, &PgRole::Coordinator, 0..3);
    for spec in &mut specs {
        let dcs = &mut spec.config["bootstrap"]["dcs"];
        dcs["ttl"] = timings.ttl.into();
        dcs["loop_wait"] = timings.loop_wait.into();
        dcs["retry_timeout"] = timings.retry_timeout.into();
    }
    let mut cluster = match PatroniCluster::start(kube, specs, &operator_rules()) {
        Ok(cluster) => cluster,
        Err(PatroniUnavailable::Skip(reason)) => anyhow::bail!("{reason}"),
        Err(e) => return Err(e.into()),
    };
    let sync_standbys = usize::from(mode == SynchronousMode::On);
    let leader = cluster.wait_for_leader(BOOTSTRAP)?;
    cluster.wait_for_replication(sync_standbys, BOOTSTRAP)?;
    Writer::create_table(&cluster).await?;

    let started = Instant::now();
    let writer = Writer::start(cluster.read_write_conninfo("postgres"))?;
    writer.wait_for_writes(started, WRITES, FAILOVER).await?;

    let killed_at = Instant::now();
    cluster.kill_member(&leader);
    let new_leader = cluster.wait_for_new_leader(Some(&leader), FAILOVER)?;
    let elected = killed_at.elapsed();
    writer.wait_for_writes(killed_at, WRITES, FAILOVER).await?;

    // The remaining standby: switch over to it (it is the synchronous one when
    // synchronous mode is on, once it has caught up).
    let standby = cluster
        .live_members()
        .into_iter()
        .find(|m| *m != new_leader)
        .context("a standby left")?;
    cluster.wait_for_replication(sync_standbys, FAILOVER)?;
    let asked_at = Instant::now();
    let (status, message) = cluster.switchover(&new_leader, &standby)?;
    anyhow::ensure!(status == 200, "switchover: {status} {message}");
    writer.wait_for_writes(asked_at, WRITES, FAILOVER).await?;
    let log = writer.finish();

    let failover = log
        .resumed_after(killed_at)
        .context("writes never failed after the kill")?;
    let (lost, _) = writer::missing_on(&cluster, &standby, &log).await?;
    let around_switchover = writer::WriteLog {
        acknowledged: log
            .acknowledged
            .iter()
            .filter(|(_, at)| *at >= asked_at - Duration::from_secs(1))
            .copied()
            .collect(),
        failed: Vec::new(),
    };
    Ok(Trial {
        failover,
        elected,
        lost: lost.len(),
        acknowledged: log.acknowledged.len(),
        switchover_pause: around_switchover.longest_pause(),
    })
}

/// Nearest-rank percentile of `samples` (sorted here).
fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let rank = (p * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn report(results: &[(Timings, SynchronousMode, Vec<Trial>)]) {
    let stats = |trials: &[Trial], f: fn(&Trial) -> Duration| {
        let mut d: Vec<Duration> = trials.iter().map(f).collect();
        (percentile(&mut d, 0.5), percentile(&mut d, 0.95))
    };
    let baseline = results
        .iter()
        .find(|(t, _, _)| t.name == PATRONI_DEFAULTS.name)
        .map(|(_, _, trials)| stats(trials, |t| t.failover));
    println!(
        "| timings (ttl/loop_wait/retry_timeout) | synchronous | trials | failover P50 | \
         failover P95 | vs baseline P50 / P95 | elected P50 | switchover pause P50 / P95 | \
         acknowledged writes lost |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (timings, mode, trials) in results {
        let (p50, p95) = stats(trials, |t| t.failover);
        let (e50, _) = stats(trials, |t| t.elected);
        let (s50, s95) = stats(trials, |t| t.switchover_pause);
        let ratio = baseline.map_or_else(
            || "-".to_owned(),
            |(b50, b95)| {
                format!(
                    "{:.2}× / {:.2}×",
                    p50.as_secs_f64() / b50.as_secs_f64(),
                    p95.as_secs_f64() / b95.as_secs_f64()
                )
            },
        );
        let lost: usize = trials.iter().map(|t| t.lost).sum();
        let acknowledged: usize = trials.iter().map(|t| t.acknowledged).sum();
        println!(
            "| {} ({}/{}/{}) | {mode:?} | {} | {:.1} s | {:.1} s | {ratio} | {:.1} s | \
             {:.2} s / {:.2} s | {lost} of {acknowledged} |",
            timings.name,
            timings.ttl,
            timings.loop_wait,
            timings.retry_timeout,
            trials.len(),
            p50.as_secs_f64(),
            p95.as_secs_f64(),
            e50.as_secs_f64(),
            s50.as_secs_f64(),
            s95.as_secs_f64(),
        );
    }
}
