//! The write path under load: event → committed latency (P50/P95/P99) and
//! events/s at 1, 4 and 16 concurrent writers through NATS JetStream, beside
//! `pgbench` running the same SQL transaction at the same concurrency on the
//! same server (the baseline).
//!
//! `cargo bench -p umstore-data-plane --bench ingest [-- --seconds 10 --warmup 2 --users 2000 --writers 1,4,16]`
//! (nats-server and PostgreSQL 15 with pgbench, as the tests use).
//!
//! Setup: a migrated store on the harness's PostgreSQL (fsync and
//! synchronous_commit off, as for every test), the production writer login, the
//! local key provider with the production data-key cache (100,000 keys, 5 min),
//! a `nats-server -js`. `2 × users` users are created with `METADATA_CREATED`
//! through [`Ingest`] first, so their data keys are cached as in a steady state;
//! the first half is written by the product, the second half by pgbench (whose
//! rows carry another user's ciphertext and must never be read back by the
//! product).
//!
//! For each writer count N, three runs, each `warmup` seconds then `seconds`
//! measured (events that complete inside the window):
//! 1. **umstore through JetStream**: N closed-loop writers each publish a
//!    `METADATA_UPDATED` (phone, occupation, household size) for one of their
//!    own users (writer i owns the users ≡ i mod N, so no two events for a user
//!    are ever in flight and none is stale) to the inbound subject, await the
//!    PubAck, then wait for that event's `METADATA_STORED` on the outbound
//!    subject (a core subscription, demultiplexed by `source_event_id`). The
//!    outbox relay publishes only after the commit, so this is event →
//!    committed *and announced*. The product's consumer (`bus::consume`,
//!    workers = N, a pool of N + 4 writer connections as `serve` makes) and its
//!    relay (`outbox::relay`) run in this process, as in `serve`.
//! 2. **apply alone**: the same writers call `Ingest::submit` directly (no
//!    bus, no relay): what the Rust side of one transaction costs.
//! 3. **pgbench** `-M prepared -c N -j min(N,2)`, as the writer login over TCP,
//!    running the statements `apply()` runs for a `METADATA_UPDATED` of an
//!    existing user, their text taken from the product's constants, in the same
//!    order, the same four pipelined (`\startpipeline`), between BEGIN and
//!    COMMIT. Per-transaction values come from one `SELECT ... \gset` before
//!    BEGIN (user id, lock key, event id, outbox message ids, time): a round trip
//!    the product does not make, reported separately. The other values (sealed
//!    bytes, JSON payloads) are copied from the row, history row and outbox rows
//!    the product wrote last, so sizes match. Latencies from `--log`.
//!
//! The relay runs only during run 1; the outbox rows runs 2 and 3 queue are
//! then marked published by the superuser. Published rows stay (the relay
//! prunes after 24 hours), so the outbox grows through the levels as it would
//! in production; its size at the start of each JetStream run is printed.
//!
//! Alongside: stage times of the JetStream run (from the clocks of this process
//! and of PostgreSQL on the same machine), CPU per event by process (`/proc`;
//! "other" is whatever else ran on the machine, kernel softirq included: a
//! large figure means the run was disturbed), and server execution time per
//! event (`pg_stat_statements`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio_postgres::Client;
use umstore_data_plane::crypto::{DataKeyCache, KeyProvider, KeyProviderConfig, Keyring};
use umstore_data_plane::db::Database;
use umstore_data_plane::ingest::apply::{self as sql, user_lock_key};
use umstore_data_plane::ingest::bus::{self, BusConfig};
use umstore_data_plane::ingest::{outbox, ApplyConfig, Ingest, Outcome};
use umstore_data_plane::metrics::Metrics;
use umstore_e2e::Nats;
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

use support::Store;

const REGION: &str = "KA";
const SUBJECT_PREFIX: &str = "umstore.events";

struct Args {
    seconds: u64,
    warmup: u64,
    users: usize,
    writers: Vec<usize>,
}

impl Args {
    fn parse() -> Self {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let number = |name: &str, default: u64| {
            value(name)
                .map(|v| {
                    v.parse()
                        .unwrap_or_else(|_| panic!("{name} takes a number"))
                })
                .unwrap_or(default)
        };
        let writers: Vec<usize> = value("--writers")
            .map(|v| {
                v.split(',')
                    .map(|w| w.trim().parse().expect("--writers takes 1,4,16"))
                    .collect()
            })
            .unwrap_or_else(|| vec![1, 4, 16]);
        assert!(
            !writers.is_empty() && writers.iter().all(|&w| w > 0),
            "--writers takes positive counts"
        );
        // Each writer owns as many users as every other: round up to a multiple
        // of every writer count.
        let lcm = writers.iter().fold(1, |a, &b| a / gcd(a, b) * b);
        let users = (number("--users", 2000) as usize).div_ceil(lcm) * lcm;
        Self {
            seconds: number("--seconds", 10),
            warmup: number("--warmup", 2),
            users,
            writers,
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The bench's user ids: the first 16 bytes of SHA-256 of a name, so pgbench can
/// compute the same ids in SQL ([`USER_ID_SQL`]).
fn user_id(index: usize) -> Uuid {
    let digest = Sha256::digest(format!("umstore-bench-user-{index}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(bytes)
}

/// [`user_id`] in SQL, of the pgbench variable `:idx`.
const USER_ID_SQL: &str =
    "encode(substr(sha256(convert_to('umstore-bench-user-' || (:idx)::text, 'UTF8')), 1, 16), 'hex')::uuid";
/// [`user_lock_key`] in SQL, of the uuid `v.u`.
const LOCK_KEY_SQL: &str = "('x' || left(replace(v.u::text, '-', ''), 16))::bit(64)::bigint";

fn phone() -> String {
    format!("9{:09}", fastrand::u32(..1_000_000_000))
}

fn created(index: usize, at: DateTime<Utc>) -> Value {
    const NAMES: [&str; 5] = [
        "Asha Rao",
        "Ravi Kumar Shetty",
        "Lakshmi Narayanan",
        "Mohammed Irfan",
        "Saanvi Krishnamurthy Rao",
    ];
    support::ingest::envelope(
        "METADATA_CREATED",
        user_id(index),
        at,
        json!({
            "full_name": (NAMES[index % NAMES.len()]),
            "date_of_birth": format!("{}-{:02}-{:02}", 1950 + index % 50, 1 + index % 12, 1 + index % 28),
            "gender": (["female", "male"][index % 2]),
            "annual_income": 60_000 + (index % 40) * 15_000,
            "household_size": 1 + index % 6,
            "employment_type": (["agriculture", "salaried", "self_employed", "daily_wage"][index % 4]),
            "ration_card": (["bpl", "apl", "aay", "none"][index % 4]),
            "marital_status": "married",
            "district": "Mysuru",
            "pincode": format!("5700{:02}", index % 100),
            "phone": phone(),
            "identity_token": format!("tok-{index:08}-abcd"),
            "area_type": "rural",
            "social_category": "obc",
            "disability": false,
            "occupation": "farmer",
            "land_holding_acres": 1.5,
            "has_bank_account": true,
            "dependents": 2,
            "children": index % 3,
            "senior_members": index % 2,
            "head_of_household": true,
        }),
    )
}

/// A `METADATA_UPDATED` of `user` (one PII field, two plain ones): its id and bytes.
fn updated(user: Uuid) -> (Uuid, Vec<u8>) {
    const OCCUPATIONS: [&str; 6] = [
        "farmer",
        "tailor",
        "weaver",
        "driver",
        "teacher",
        "shopkeeper",
    ];
    let event = support::ingest::envelope(
        "METADATA_UPDATED",
        user,
        Utc::now(),
        json!({
            "phone": phone(),
            "occupation": (OCCUPATIONS[fastrand::usize(..OCCUPATIONS.len())]),
            "household_size": fastrand::i16(1..=8),
        }),
    );
    let id = event["event_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("an event id");
    (id, event.to_string().into_bytes())
}

/// The measured part of a run: what completes in `[from, to)` counts.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    to: Instant,
}

impl Window {
    fn after(warmup: u64, seconds: u64) -> Self {
        let from = Instant::now() + Duration::from_secs(warmup);
        Self {
            from,
            to: from + Duration::from_secs(seconds),
        }
    }

    fn holds(&self, at: Instant) -> bool {
        at >= self.from && at < self.to
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Latencies (sorted) and how many completed in how long.
#[derive(Default)]
struct Run {
    latencies: Vec<Duration>,
    seconds: f64,
    cpu: Option<CpuUse>,
    statements: Option<Vec<Statement>>,
}

impl Run {
    fn new(mut latencies: Vec<Duration>, seconds: f64) -> Self {
        latencies.sort_unstable();
        Self {
            latencies,
            seconds,
            ..Self::default()
        }
    }

    fn events(&self) -> usize {
        self.latencies.len()
    }

    fn pct(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        ms(self.latencies[i])
    }

    fn rate(&self) -> f64 {
        self.events() as f64 / self.seconds
    }

    fn pcts(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.2}",
            self.pct(0.5),
            self.pct(0.95),
            self.pct(0.99)
        )
    }

    /// Server execution time per event, ms (every statement of the writer login).
    fn server_ms(&self) -> Option<f64> {
        let s = self.statements.as_ref()?;
        Some(s.iter().map(|s| s.total_ms).sum::<f64>() / self.events() as f64)
    }
}

// ---------------------------------------------------------------------------
// CPU accounting from /proc.

/// A process's parent, its own CPU time and that of the children it reaped, in clock ticks.
fn proc_stat(pid: &str) -> Option<(u32, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // After the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14).
    Some((n(1)? as u32, n(11)? + n(12)?, n(13)? + n(14)?))
}

#[derive(Clone, Copy)]
struct CpuSnapshot {
    at: Instant,
    machine_busy: u64,
    this: u64,
    postgres: u64,
    nats: u64,
    children_us: u64,
}

/// Where the processes are.
struct Pids {
    postmaster: u32,
    nats: u32,
}

fn snapshot(pids: &Pids) -> CpuSnapshot {
    let machine_busy = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some(v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
        })
        .unwrap_or(0);
    // The postmaster's own time, what it collected from backends that ended,
    // and every live child's.
    let mut postgres = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Some((ppid, own, reaped)) = proc_stat(&name) {
                if name == pids.postmaster.to_string() {
                    postgres += own + reaped;
                } else if ppid == pids.postmaster {
                    postgres += own;
                }
            }
        }
    }
    let this = proc_stat("self").map_or(0, |(_, own, _)| own);
    let nats = proc_stat(&pids.nats.to_string()).map_or(0, |(_, own, _)| own);
    // SAFETY: getrusage fills the struct it is given.
    let children_us = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    CpuSnapshot {
        at: Instant::now(),
        machine_busy,
        this,
        postgres,
        nats,
        children_us,
    }
}

/// CPU seconds spent between two snapshots.
#[derive(Clone, Copy)]
struct CpuUse {
    wall: f64,
    machine: f64,
    this: f64,
    postgres: f64,
    nats: f64,
    children: f64,
}

impl CpuUse {
    fn between(a: CpuSnapshot, b: CpuSnapshot) -> Self {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let t = |x: u64, y: u64| y.saturating_sub(x) as f64 / hz;
        Self {
            wall: (b.at - a.at).as_secs_f64(),
            machine: t(a.machine_busy, b.machine_busy),
            this: t(a.this, b.this),
            postgres: t(a.postgres, b.postgres),
            nats: t(a.nats, b.nats),
            children: b.children_us.saturating_sub(a.children_us) as f64 / 1e6,
        }
    }

    fn other(&self) -> f64 {
        (self.machine - self.this - self.postgres - self.nats - self.children).max(0.0)
    }
}

// ---------------------------------------------------------------------------
// pg_stat_statements.

struct Statement {
    query: String,
    calls: i64,
    total_ms: f64,
}

async fn stats_reset(admin: &Client) {
    let _ = admin
        .execute("SELECT public.pg_stat_statements_reset()", &[])
        .await;
}

async fn stats_read(admin: &Client) -> Option<Vec<Statement>> {
    let login = Purpose::Writer.login().expect("writer login");
    let rows = admin
        .query(
            "SELECT s.query, s.calls, s.total_exec_time
             FROM public.pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
             WHERE r.rolname = $1
               AND s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
             ORDER BY s.total_exec_time DESC",
            &[&login],
        )
        .await
        .ok()?;
    Some(
        rows.iter()
            .map(|r| Statement {
                query: r
                    .get::<_, String>(0)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                calls: r.get(1),
                total_ms: r.get(2),
            })
            .collect(),
    )
}

/// Takes CPU and statement figures over `window` while a run goes on.
async fn probe(window: Window, admin: &Client, pids: &Pids, metrics: Option<&Metrics>) -> Probe {
    tokio::time::sleep_until(window.from.into()).await;
    stats_reset(admin).await;
    let apply0 = metrics.map(apply_totals);
    let a = snapshot(pids);
    tokio::time::sleep_until(window.to.into()).await;
    let b = snapshot(pids);
    let apply1 = metrics.map(apply_totals);
    let statements = stats_read(admin).await;
    let apply_mean_ms = match (apply0, apply1) {
        (Some((s0, c0)), Some((s1, c1))) if c1 > c0 => Some((s1 - s0) / (c1 - c0) * 1e3),
        _ => None,
    };
    Probe {
        cpu: CpuUse::between(a, b),
        statements,
        apply_mean_ms,
    }
}

struct Probe {
    cpu: CpuUse,
    statements: Option<Vec<Statement>>,
    apply_mean_ms: Option<f64>,
}

/// `umstore_ingest_apply_seconds`: (sum, count).
fn apply_totals(metrics: &Metrics) -> (f64, f64) {
    let text = metrics.encode();
    let get = |suffix: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("umstore_ingest_apply_seconds_{suffix}")))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (get("sum"), get("count"))
}

// ---------------------------------------------------------------------------
// Run 1: through JetStream.

struct BusSample {
    event_id: Uuid,
    sent: SystemTime,
    acked: Duration,
    total: Duration,
}

type Pending = Arc<Mutex<HashMap<Uuid, oneshot::Sender<Instant>>>>;

struct Writers {
    users: Vec<Uuid>,
    js: jetstream::Context,
    subject: String,
    pending: Pending,
}

async fn bus_writer(w: Arc<Writers>, i: usize, n: usize, window: Window) -> Vec<BusSample> {
    let per = w.users.len() / n;
    let mut out = Vec::new();
    while Instant::now() < window.to {
        let user = w.users[i + n * fastrand::usize(..per)];
        let (event_id, bytes) = updated(user);
        let (tx, rx) = oneshot::channel();
        w.pending.lock().expect("pending map").insert(event_id, tx);
        let sent = SystemTime::now();
        let t0 = Instant::now();
        w.js.publish(w.subject.clone(), bytes.into())
            .await
            .expect("publish")
            .await
            .expect("JetStream PubAck");
        let acked = t0.elapsed();
        let done = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .unwrap_or_else(|_| panic!("event {event_id}: no METADATA_STORED within 30 s"))
            .expect("the demultiplexer stopped");
        if window.holds(done) {
            out.push(BusSample {
                event_id,
                sent,
                acked,
                total: done - t0,
            });
        }
    }
    out
}

/// Routes each `METADATA_STORED` to the writer waiting for it.
async fn demultiplex(client: &async_nats::Client, pending: Pending) {
    let mut sub = client
        .subscribe(format!("{SUBJECT_PREFIX}.out.METADATA_STORED"))
        .await
        .expect("subscribe to METADATA_STORED");
    client.flush().await.expect("flush the subscription");
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let at = Instant::now();
            let id = serde_json::from_slice::<Value>(&m.payload)
                .ok()
                .and_then(|v| v["source_event_id"].as_str()?.parse::<Uuid>().ok());
            if let Some(id) = id {
                if let Some(tx) = pending.lock().expect("pending map").remove(&id) {
                    let _ = tx.send(at);
                }
            }
        }
    });
}

/// Mean and P95 of each stage of the JetStream run, ms.
struct Stages {
    rows: [(f64, f64); 5],
    joined: usize,
}

async fn stages(admin: &Client, samples: &[BusSample]) -> Stages {
    let ids: Vec<Uuid> = samples.iter().map(|s| s.event_id).collect();
    let rows = admin
        .query(
            "SELECT p.event_id, p.processed_at, o.published_at
             FROM umstore.processed_events p
             JOIN umstore.outbox o
               ON o.region = p.region AND o.msg_id = p.event_id::text || ':METADATA_STORED'
             WHERE p.region = $1 AND p.event_id = ANY($2)",
            &[&REGION, &ids],
        )
        .await
        .expect("stage times");
    let at: HashMap<Uuid, (DateTime<Utc>, Option<DateTime<Utc>>)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut cols: [Vec<f64>; 5] = Default::default();
    let span =
        |a: DateTime<Utc>, b: DateTime<Utc>| (b - a).num_microseconds().unwrap_or(0) as f64 / 1e3;
    for s in samples {
        let Some((begun, Some(relayed))) = at.get(&s.event_id).copied() else {
            continue;
        };
        let sent = DateTime::<Utc>::from(s.sent);
        let acked = sent + s.acked;
        let done = sent + s.total;
        cols[0].push(ms(s.acked));
        cols[1].push(span(acked, begun));
        cols[2].push(span(begun, relayed));
        cols[3].push(span(relayed, done));
        cols[4].push(ms(s.total));
    }
    let joined = cols[0].len();
    let stat = |v: &mut Vec<f64>| {
        if v.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        (mean, v[((v.len() - 1) as f64 * 0.95).round() as usize])
    };
    let mut rows = [(0.0, 0.0); 5];
    for (i, c) in cols.iter_mut().enumerate() {
        rows[i] = stat(c);
    }
    Stages { rows, joined }
}

// ---------------------------------------------------------------------------
// Run 2: apply alone.

async fn direct_writer(
    ingest: Ingest,
    users: Arc<Vec<Uuid>>,
    i: usize,
    n: usize,
    window: Window,
) -> Vec<Duration> {
    let per = users.len() / n;
    let mut out = Vec::new();
    while Instant::now() < window.to {
        let (_, bytes) = updated(users[i + n * fastrand::usize(..per)]);
        let t0 = Instant::now();
        let (_, outcome) = ingest.submit(&bytes).await.expect("apply");
        let done = Instant::now();
        assert!(
            matches!(outcome, Outcome::Applied { version: Some(_) }),
            "{outcome:?}"
        );
        if window.holds(done) {
            out.push(done - t0);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Run 3: pgbench.

/// `statement` with `$1`, `$2`, ... replaced by the pgbench variables `vars`.
fn with_vars(statement: &str, vars: &[&str]) -> String {
    let mut out = String::new();
    let mut used = vec![false; vars.len()];
    let mut chars = statement.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            digits.push(*d);
            chars.next();
        }
        let n: usize = digits.parse().expect("a $n parameter");
        out.push(':');
        out.push_str(vars[n - 1]);
        used[n - 1] = true;
    }
    assert!(used.iter().all(|u| *u), "a variable left unused: {vars:?}");
    out
}

/// The pgbench script: for client c of n, a user U + c + n·k (k random), the
/// statements of `apply()` for a `METADATA_UPDATED` in its order.
fn pgbench_script(first_user: usize, users: usize, n: usize) -> String {
    let region_uid = ["region", "uid"];
    let statements = [
        with_vars(sql::LOCK_USER, &["lock_key"]),
        with_vars(
            sql::RECORD_EVENT,
            &["event_id", "region", "event_type", "uid"],
        ),
        with_vars(sql::USER_REGION, &["uid"]),
        with_vars(sql::CURRENT, &region_uid),
        with_vars(
            sql::UPSERT_METADATA,
            &[
                "uid",
                "region",
                "full_name_enc",
                "date_of_birth_enc",
                "birth_year",
                "gender",
                "marital_status",
                "district_enc",
                "pincode_enc",
                "area_type",
                "social_category",
                "disability",
                "phone_enc",
                "identity_token_enc",
                "identity_token_bidx",
                "annual_income_enc",
                "income_lakh",
                "occupation",
                "employment_type",
                "land_holding_acres",
                "has_bank_account",
                "ration_card",
                "household_size",
                "dependents",
                "children",
                "senior_members",
                "head_of_household",
                "version",
                "at",
            ],
        ),
        with_vars(
            sql::UPSERT_DERIVED,
            &[
                "uid",
                "region",
                "age_group",
                "income_bracket",
                "life_stage",
                "employment_category",
                "bpl_status",
                "tax_bracket",
                "is_senior_citizen",
                "is_farmer",
                "per_capita_income_lakh",
                "version",
            ],
        ),
        with_vars(
            sql::APPEND_HISTORY,
            &[
                "uid",
                "region",
                "change_type",
                "changed_fields",
                "old_values",
                "new_values",
                "changed_by",
                "event_id",
                "version",
                "at",
            ],
        ),
        with_vars(sql::INVALIDATE_ELIGIBILITY, &["region", "uid"]),
        with_vars(
            sql::QUEUE_OUTBOX,
            &[
                "region",
                "uid",
                "stored_subject",
                "stored_id",
                "stored_payload",
                "invalidated_subject",
                "invalidated_id",
                "invalidated_payload",
            ],
        ),
    ];
    let [lock, record, region, current, upsert, derived, history, invalidate, queue] = statements;
    format!(
        "\\set k random(0, {last})
\\set idx {first_user} + :client_id + {n} * :k
SELECT v.u AS uid, {LOCK_KEY_SQL} AS lock_key, v.e AS event_id,
       v.e::text || ':' || 'METADATA_STORED' AS stored_id,
       v.e::text || ':' || 'ELIGIBILITY_CACHE_INVALIDATED' AS invalidated_id,
       clock_timestamp() AS at
FROM (SELECT {USER_ID_SQL} AS u, gen_random_uuid() AS e) AS v \\gset
BEGIN;
{lock};
{record};
{region};
{current};
\\startpipeline
{upsert};
{derived};
{history};
{invalidate};
\\endpipeline
{queue};
COMMIT;
",
        last = users / n - 1,
    )
}

/// The values pgbench writes besides the per-transaction ones: those of the
/// last update the product applied (so the bytes have the product's sizes).
async fn pgbench_values(admin: &Client) -> Vec<(String, String)> {
    let history = admin
        .query_one(
            "SELECT user_id, event_id, changed_fields::text, old_values::text,
                    new_values::text, changed_by, version::text
             FROM umstore.user_metadata_history
             WHERE change_type = 'updated' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .expect("an update the product applied");
    let user: Uuid = history.get(0);
    let event: Uuid = history.get(1);
    let mut values: Vec<(String, String)> = vec![
        ("region".into(), REGION.into()),
        ("event_type".into(), "METADATA_UPDATED".into()),
        ("change_type".into(), "updated".into()),
        ("changed_fields".into(), history.get(2)),
        ("old_values".into(), history.get(3)),
        ("new_values".into(), history.get(4)),
        ("changed_by".into(), history.get(5)),
        ("version".into(), history.get(6)),
    ];
    let mut take = |sql: &str, names: &[&str], row: tokio_postgres::Row| {
        for (i, name) in names.iter().enumerate() {
            let v: Option<String> = row.get(i);
            let v = v.unwrap_or_else(|| panic!("{sql}: {name} is NULL"));
            values.push(((*name).into(), v));
        }
    };
    let metadata = [
        "full_name_enc",
        "date_of_birth_enc",
        "birth_year",
        "gender",
        "marital_status",
        "district_enc",
        "pincode_enc",
        "area_type",
        "social_category",
        "disability",
        "phone_enc",
        "identity_token_enc",
        "identity_token_bidx",
        "annual_income_enc",
        "income_lakh",
        "occupation",
        "employment_type",
        "land_holding_acres",
        "has_bank_account",
        "ration_card",
        "household_size",
        "dependents",
        "children",
        "senior_members",
        "head_of_household",
    ];
    let cols: Vec<String> = metadata
        .iter()
        .map(|c| match *c {
            "land_holding_acres" => format!("{c}::float8::text"),
            _ => format!("{c}::text"),
        })
        .collect();
    let q = format!(
        "SELECT {} FROM umstore.user_metadata WHERE region = $1 AND user_id = $2",
        cols.join(", ")
    );
    let row = admin
        .query_one(&q, &[&REGION, &user])
        .await
        .expect("the user's row");
    take("user_metadata", &metadata, row);
    let derived = [
        "age_group",
        "income_bracket",
        "life_stage",
        "employment_category",
        "bpl_status",
        "tax_bracket",
        "is_senior_citizen",
        "is_farmer",
        "per_capita_income_lakh",
    ];
    let cols: Vec<String> = derived
        .iter()
        .map(|c| match *c {
            "per_capita_income_lakh" => format!("{c}::float8::text"),
            _ => format!("{c}::text"),
        })
        .collect();
    let q = format!(
        "SELECT {} FROM umstore.user_derived_attributes WHERE region = $1 AND user_id = $2",
        cols.join(", ")
    );
    let row = admin
        .query_one(&q, &[&REGION, &user])
        .await
        .expect("the user's derived row");
    take("user_derived_attributes", &derived, row);
    for (kind, prefix) in [
        ("METADATA_STORED", "stored"),
        ("ELIGIBILITY_CACHE_INVALIDATED", "invalidated"),
    ] {
        let row = admin
            .query_one(
                "SELECT subject, payload::text FROM umstore.outbox
                 WHERE region = $1 AND msg_id = $2",
                &[&REGION, &format!("{event}:{kind}")],
            )
            .await
            .expect("the update's outbox rows");
        values.push((format!("{prefix}_subject"), row.get(0)));
        values.push((format!("{prefix}_payload"), row.get(1)));
    }
    values
}

struct Pgbench {
    program: std::path::PathBuf,
    port: u16,
    dbname: String,
}

struct PgbenchResult {
    latencies: Vec<Duration>,
    tps: f64,
    prelude_ms: Option<f64>,
}

impl Pgbench {
    async fn run(
        &self,
        dir: &Path,
        script: &Path,
        values: &[(String, String)],
        n: usize,
        seconds: u64,
        log: bool,
    ) -> PgbenchResult {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(["-n", "-M", "prepared"])
            .args(["-c", &n.to_string(), "-j", &n.min(2).to_string()])
            .args(["-T", &seconds.to_string()])
            .arg("-f")
            .arg(script)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", Purpose::Writer.login().expect("writer login")])
            .env("PGPASSWORD", support::password(Purpose::Writer));
        for (k, v) in values {
            cmd.arg("-D").arg(format!("{k}={v}"));
        }
        let prefix = dir.join(format!("tx{n}"));
        if log {
            cmd.args(["-l", "-r"]).arg("--log-prefix").arg(&prefix);
        }
        cmd.arg(&self.dbname);
        let out = cmd.output().await.expect("run pgbench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pgbench failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let tps = stdout
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        let failed = stdout
            .lines()
            .find(|l| l.starts_with("number of failed transactions"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("0");
        assert_eq!(failed, "0", "pgbench transactions failed:\n{stdout}");
        // Per-command latencies: the \gset prelude is the one that names the user.
        let prelude_ms = stdout
            .lines()
            .find(|l| l.contains("umstore-bench-user") || l.contains("SELECT v.u AS uid"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok());
        let mut latencies = Vec::new();
        if log {
            let name = prefix
                .file_name()
                .expect("log prefix")
                .to_string_lossy()
                .into_owned();
            for entry in std::fs::read_dir(dir).expect("pgbench logs").flatten() {
                if !entry.file_name().to_string_lossy().starts_with(&name) {
                    continue;
                }
                let text = std::fs::read_to_string(entry.path()).expect("a pgbench log");
                latencies.extend(text.lines().filter_map(|l| {
                    let us: u64 = l.split_whitespace().nth(2)?.parse().ok()?;
                    Some(Duration::from_micros(us))
                }));
            }
        }
        PgbenchResult {
            latencies,
            tps,
            prelude_ms,
        }
    }
}

// ---------------------------------------------------------------------------

async fn mark_published(admin: &Client) {
    admin
        .execute(
            "UPDATE umstore.outbox SET published_at = now() WHERE published_at IS NULL",
            &[],
        )
        .await
        .expect("mark outbox rows published");
}

async fn wait_published(admin: &Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM umstore.outbox WHERE published_at IS NULL",
                &[],
            )
            .await
            .expect("count unpublished")
            .get(0);
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} outbox rows still unpublished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Level {
    n: usize,
    outbox_rows: i64,
    bus: Run,
    stages: Stages,
    apply_mean_ms: Option<f64>,
    direct: Run,
    pgbench: Run,
    pgbench_tps: f64,
    prelude_ms: Option<f64>,
}

async fn bench(args: Args) {
    let users = args.users;
    let store = Store::migrated().await;
    let admin = support::connect(store.superuser()).await;
    let postgres = umstore_e2e::shared().primary();
    let backend: i32 = admin
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("backend pid")
        .get(0);
    let postmaster = proc_stat(&backend.to_string())
        .expect("the backend's /proc entry")
        .0;
    let nats = Nats::start().expect("nats-server (apt-get install nats-server)");
    let pids = Pids {
        postmaster,
        nats: nats.pid().expect("nats-server pid"),
    };
    let server_version: String = admin
        .query_one("SHOW server_version", &[])
        .await
        .expect("version")
        .get(0);

    // The user ids pgbench computes are the ones seeded, with the product's lock keys.
    for index in [0, users, 2 * users - 1] {
        let q = format!(
            "SELECT v.u, {LOCK_KEY_SQL} FROM (SELECT {} AS u) AS v",
            USER_ID_SQL.replace(":idx", "$1::int8")
        );
        let row = admin
            .query_one(&q, &[&(index as i64)])
            .await
            .expect("user id in SQL");
        let id: Uuid = row.get(0);
        assert_eq!(id, user_id(index));
        assert_eq!(row.get::<_, i64>(1), user_lock_key(id));
    }

    let writer = store.connect(Purpose::Writer).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let provider = KeyProvider::open(KeyProviderConfig::Local {
        dir: keys.path().to_path_buf(),
        require_vault: false,
    })
    .await
    .expect("local key provider");
    // As `serve` makes it.
    let keyring = Arc::new(
        Keyring::open(
            provider,
            DataKeyCache::new(100_000, Duration::from_secs(300)),
            &writer,
        )
        .await
        .expect("keyring"),
    );
    let database = Database::parse(&store.url(Purpose::Writer)).expect("writer url");
    let apply_config = ApplyConfig {
        subject_prefix: SUBJECT_PREFIX.into(),
        eligibility_ttl: chrono::Duration::hours(24),
    };

    // Seed.
    let started = Instant::now();
    {
        let seeder =
            Ingest::new(&database, 4, keyring.clone(), apply_config.clone()).expect("pool");
        let at = Utc::now() - chrono::Duration::hours(1);
        futures_util::stream::iter(0..2 * users)
            .for_each_concurrent(4, |i| {
                let seeder = seeder.clone();
                async move {
                    let bytes = created(i, at).to_string().into_bytes();
                    seeder.submit(&bytes).await.expect("seed a user");
                }
            })
            .await;
    }
    mark_published(&admin).await;
    admin.batch_execute("VACUUM ANALYZE").await.expect("vacuum");
    eprintln!(
        "seeded {} users in {:.1} s",
        2 * users,
        started.elapsed().as_secs_f64()
    );

    let product_config = BusConfig {
        url: nats.url(),
        credentials: None,
        subject_prefix: SUBJECT_PREFIX.into(),
        stream_prefix: "UMSTORE".into(),
        workers: 1,
        max_age: Duration::from_secs(3600),
    };
    let product_js = bus::connect(&product_config).await.expect("connect");
    bus::ensure_streams(&product_js, &product_config)
        .await
        .expect("streams");
    let bench_client = async_nats::connect(nats.url()).await.expect("connect");
    let pending: Pending = Arc::default();
    demultiplex(&bench_client, pending.clone()).await;
    let writers = Arc::new(Writers {
        users: (0..users).map(user_id).collect(),
        js: jetstream::new(bench_client.clone()),
        subject: product_config.inbound_subject(REGION, "METADATA_UPDATED"),
        pending,
    });
    let direct_users = Arc::new(writers.users.clone());
    let pgbench = Pgbench {
        program: postgres.primary().binaries().program("pgbench"),
        port: postgres.port(),
        dbname: store.name.clone(),
    };
    let scratch = tempfile::tempdir().expect("tempdir");

    let mut levels = Vec::new();
    for &n in &args.writers {
        eprintln!("{n} writers: through JetStream");
        let outbox_rows: i64 = admin
            .query_one("SELECT count(*) FROM umstore.outbox", &[])
            .await
            .expect("count the outbox")
            .get(0);
        let metrics = Arc::new(Metrics::new());
        let ingest = Ingest::new(&database, n + 4, keyring.clone(), apply_config.clone())
            .expect("pool")
            .with_metrics(metrics.clone());
        let config = BusConfig {
            workers: n,
            ..product_config.clone()
        };
        let consumer = {
            let (js, config, ingest) = (product_js.clone(), config.clone(), ingest.clone());
            tokio::spawn(async move {
                loop {
                    let _ = bus::consume(&js, &config, &ingest).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        let relay = tokio::spawn(outbox::relay(database.clone(), product_js.clone()));
        let window = Window::after(args.warmup, args.seconds);
        let (samples, p) = tokio::join!(
            join_all((0..n).map(|i| bus_writer(writers.clone(), i, n, window))),
            probe(window, &admin, &pids, Some(&metrics)),
        );
        let samples: Vec<BusSample> = samples.into_iter().flatten().collect();
        wait_published(&admin).await;
        relay.abort();
        consumer.abort();
        let _ = relay.await;
        let _ = consumer.await;
        product_js
            .get_stream(config.inbound_stream())
            .await
            .expect("inbound stream")
            .delete_consumer(&config.consumer())
            .await
            .expect("delete the consumer");
        let stages = stages(&admin, &samples).await;
        let mut bus_run = Run::new(
            samples.iter().map(|s| s.total).collect(),
            args.seconds as f64,
        );
        bus_run.cpu = Some(p.cpu);
        bus_run.statements = p.statements;
        let apply_mean_ms = p.apply_mean_ms;

        eprintln!("{n} writers: apply alone");
        let window = Window::after(args.warmup, args.seconds);
        let (latencies, p) = tokio::join!(
            join_all((0..n).map(|i| direct_writer(
                ingest.clone(),
                direct_users.clone(),
                i,
                n,
                window
            ))),
            probe(window, &admin, &pids, None),
        );
        let mut direct = Run::new(
            latencies.into_iter().flatten().collect(),
            args.seconds as f64,
        );
        direct.cpu = Some(p.cpu);
        direct.statements = p.statements;
        drop(ingest);
        mark_published(&admin).await;

        eprintln!("{n} writers: pgbench");
        let values = pgbench_values(&admin).await;
        let script = scratch.path().join(format!("apply-{n}.sql"));
        std::fs::write(&script, pgbench_script(users, users, n)).expect("write the script");
        if args.warmup > 0 {
            pgbench
                .run(scratch.path(), &script, &values, n, args.warmup, false)
                .await;
        }
        stats_reset(&admin).await;
        let a = snapshot(&pids);
        let result = pgbench
            .run(scratch.path(), &script, &values, n, args.seconds, true)
            .await;
        // pgbench's backends end after it does; their time is counted once the
        // postmaster has reaped them.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b = snapshot(&pids);
        let mut base = Run::new(result.latencies, args.seconds as f64);
        base.cpu = Some(CpuUse::between(a, b));
        base.statements = stats_read(&admin).await;
        mark_published(&admin).await;
        levels.push(Level {
            n,
            outbox_rows,
            bus: bus_run,
            stages,
            apply_mean_ms,
            direct,
            pgbench: base,
            pgbench_tps: result.tps,
            prelude_ms: result.prelude_ms,
        });
    }
    let dead: u64 = {
        let mut dlq = product_js
            .get_stream(product_config.dead_letter_stream())
            .await
            .expect("dead-letter stream");
        dlq.info().await.expect("stream info").state.messages
    };
    assert_eq!(dead, 0, "events were dead-lettered");
    report(&args, &server_version, &levels);
}

fn report(args: &Args, server_version: &str, levels: &[Level]) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "## Write path: event → committed, {} s per run after {} s warm-up",
        args.seconds, args.warmup
    );
    println!();
    println!(
        "{cores} cores, PostgreSQL {server_version} (fsync and synchronous_commit off), \
         nats-server -js, {} users per side. umstore: publish to JetStream → PubAck → \
         consumer applies → commit → outbox relay → METADATA_STORED received. \
         pgbench: the same statements in one transaction (plus one \\gset SELECT).",
        args.users
    );
    println!();
    println!(
        "| writers | umstore P50 / P95 / P99 ms | events/s | pgbench P50 / P95 / P99 ms | tps \
         | throughput ratio | P95 ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for l in levels {
        println!(
            "| {} | {} | {:.0} | {} | {:.0} | {:.2} | {:.1}× |",
            l.n,
            l.bus.pcts(),
            l.bus.rate(),
            l.pgbench.pcts(),
            l.pgbench_tps,
            l.bus.rate() / l.pgbench_tps,
            l.bus.pct(0.95) / l.pgbench.pct(0.95),
        );
    }
    println!();
    println!("### Apply alone: `Ingest::submit` on the writer pool, no bus, no relay");
    println!();
    println!("| writers | P50 / P95 / P99 ms | events/s | ÷ pgbench tps | pgbench \\gset prelude ms (mean) |");
    println!("|---|---|---|---|---|");
    for l in levels {
        println!(
            "| {} | {} | {:.0} | {:.2} | {} |",
            l.n,
            l.direct.pcts(),
            l.direct.rate(),
            l.direct.rate() / l.pgbench_tps,
            l.prelude_ms.map_or("?".into(), |v| format!("{v:.3}")),
        );
    }
    println!();
    println!("### Where an event's time goes through JetStream: mean (P95), ms");
    println!();
    println!(
        "| writers | publish → PubAck | PubAck → apply's BEGIN | apply's BEGIN → relay's BEGIN \
         | relay's BEGIN → received | total | apply, pool → commit (mean) | outbox rows at start |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for l in levels {
        let c = |i: usize| format!("{:.2} ({:.2})", l.stages.rows[i].0, l.stages.rows[i].1);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            l.n,
            c(0),
            c(1),
            c(2),
            c(3),
            c(4),
            l.apply_mean_ms.map_or("?".into(), |v| format!("{v:.2}")),
            l.outbox_rows,
        );
        if l.stages.joined < l.bus.events() {
            println!(
                "<!-- {} of {} events joined with their database times -->",
                l.stages.joined,
                l.bus.events()
            );
        }
    }
    println!();
    println!("### CPU per event, ms (all processes, measured window)");
    println!();
    println!(
        "| writers | run | events | bench process | postgres | nats-server | pgbench | other \
         | machine busy | server exec (pg_stat_statements) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for l in levels {
        for (name, run) in [
            ("JetStream", &l.bus),
            ("apply alone", &l.direct),
            ("pgbench", &l.pgbench),
        ] {
            let Some(c) = run.cpu else { continue };
            let per = |s: f64| s * 1e3 / run.events().max(1) as f64;
            println!(
                "| {} | {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0}% of {cores} cores | {} |",
                l.n,
                run.events(),
                per(c.this),
                per(c.postgres),
                per(c.nats),
                per(c.children),
                per(c.other()),
                c.machine / c.wall / cores.max(1) as f64 * 100.0,
                run.server_ms().map_or("?".into(), |v| format!("{v:.3}")),
            );
        }
    }
    if let Some(l) = levels.last() {
        println!();
        println!(
            "### Server statements at {} writers: calls and mean ms per event",
            l.n
        );
        println!();
        println!("| statement | JetStream calls/event | mean ms | pgbench calls/event | mean ms |");
        println!("|---|---|---|---|---|");
        let key = |q: &str| q.chars().take(60).collect::<String>();
        // Per statement: (calls per event, mean ms) through JetStream and in pgbench.
        type Side = Option<(f64, f64)>;
        let mut rows: Vec<(String, Side, Side)> = Vec::new();
        for (side, run) in [(0, &l.bus), (1, &l.pgbench)] {
            for s in run.statements.iter().flatten() {
                let k = key(&s.query);
                let v = (
                    s.calls as f64 / run.events().max(1) as f64,
                    s.total_ms / s.calls.max(1) as f64,
                );
                match rows.iter_mut().find(|r| r.0 == k) {
                    Some(r) if side == 0 => r.1 = Some(v),
                    Some(r) => r.2 = Some(v),
                    None if side == 0 => rows.push((k, Some(v), None)),
                    None => rows.push((k, None, Some(v))),
                }
            }
        }
        let cell = |v: Option<(f64, f64)>| {
            v.map_or("| – | – ".into(), |(c, m)| {
                format!("| {c:.2} | {m:.3} ")
            })
        };
        for (k, a, b) in rows {
            println!("| `{}` {}{}|", k.replace('|', "\\|"), cell(a), cell(b));
        }
    }
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench(args));
}
