//! What the migrations crate's benchmarks share: their `--name number`
//! arguments, connections, and latency percentiles of a closed-loop writer.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// `--name number` pairs from the command line, in `names`' order (each
/// `default` unless given); anything else (cargo's `--bench`) is skipped.
pub fn numbers<const N: usize>(names: [&str; N], mut values: [u64; N]) -> [u64; N] {
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        match names.iter().position(|n| *n == argv[i]) {
            Some(k) => {
                values[k] = argv
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{} takes a number", argv[i]));
                i += 2;
            }
            None => i += 1,
        }
    }
    values
}

/// Connects, the connection driven in the background.
pub async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {conninfo}: {e}"));
    tokio::spawn(connection);
    client
}

/// One write: when it started, how long it took, whether it was acknowledged.
pub type Sample = (Instant, Duration, bool);

/// Latency percentiles of the samples started in `[from, to)`.
pub struct Stats {
    pub count: usize,
    pub errors: usize,
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub max: Duration,
}

pub fn stats(samples: &[Sample], from: Instant, to: Instant) -> Stats {
    let within: Vec<&Sample> = samples
        .iter()
        .filter(|(at, _, _)| *at >= from && *at < to)
        .collect();
    let mut took: Vec<Duration> = within.iter().map(|(_, d, _)| *d).collect();
    took.sort_unstable();
    let pick = |p: f64| -> Duration {
        if took.is_empty() {
            return Duration::ZERO;
        }
        // Nearest rank.
        let rank = ((p / 100.0) * took.len() as f64).ceil() as usize;
        took[rank.clamp(1, took.len()) - 1]
    };
    Stats {
        count: within.len(),
        errors: within.iter().filter(|(_, _, ok)| !ok).count(),
        p50: pick(50.0),
        p95: pick(95.0),
        p99: pick(99.0),
        max: took.last().copied().unwrap_or_default(),
    }
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}
