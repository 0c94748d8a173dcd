//! The database logins reads run as: per purpose a pool on the primary (or
//! PgBouncer in front of it) and, where configured, one on its replica pool.
//! A task per replica measures its lag every [`PROBE_EVERY`]; a read goes to
//! the replica while the lag is within the bound and the replica has replayed
//! the caller's write (read-your-writes), else to the primary.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::SimpleQueryMessage;
use umstore_migrations::roles::Purpose;

use super::error::ApiError;
use crate::db::Database;
use crate::metrics::Metrics;

/// Which server answered a read (the `X-Served-By` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// The primary (or PgBouncer in front of it).
    Primary,
    /// The purpose's replica pool.
    Replica,
}

impl Served {
    /// Whether every transaction of a pooled connection reaches the same
    /// server session, so statements may be prepared once per connection: a
    /// replica pool connects to PostgreSQL directly; the primary may sit
    /// behind PgBouncer in transaction mode, which (before 1.21) does not
    /// keep prepared statements.
    pub fn keeps_sessions(self) -> bool {
        matches!(self, Served::Replica)
    }

    /// The header's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Primary => "primary",
            Served::Replica => "replica",
        }
    }
}

/// The response header that says which server answered.
pub const SERVED_BY_HEADER: &str = "x-served-by";
/// The request header carrying the position a read must see (the `lsn` a
/// write returned): read-your-writes.
pub const MIN_LSN_HEADER: &str = "x-min-lsn";

/// How long a read waits for a pooled connection, or for a new one.
const WAIT: Duration = Duration::from_secs(5);
/// How often each replica's lag is measured.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// A measurement older than this does not count (the probe is stuck).
const PROBE_STALE: Duration = Duration::from_secs(2);

/// A WAL position, `X/Y` in PostgreSQL's text form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

impl std::str::FromStr for Lsn {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (hi, lo) = s.trim().split_once('/').ok_or(())?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| ())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| ())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A read-your-writes position (`X-Min-Lsn`): one WAL position, as a store of
/// one cluster gives it out (`0/16B3740`), or one per cluster that a write
/// touched, as a store of several gives it out
/// (`home:0/16B3740,south:0/3000060`): WAL positions of different clusters
/// do not compare, so each is honoured only against the cluster that issued
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MinLsn {
    /// One position, for whichever cluster answers (a token without cluster
    /// names: the conservative reading in a store of several).
    Any(Lsn),
    /// A position per cluster name.
    PerCluster(Vec<(String, Lsn)>),
}

impl std::str::FromStr for MinLsn {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        if !s.contains(':') {
            return s.parse().map(MinLsn::Any);
        }
        let mut out = Vec::new();
        for part in s.split(',') {
            let (cluster, lsn) = part.trim().split_once(':').ok_or(())?;
            if cluster.is_empty() {
                return Err(());
            }
            out.push((cluster.to_owned(), lsn.parse()?));
        }
        Ok(MinLsn::PerCluster(out))
    }
}

impl MinLsn {
    /// The position a read on `cluster` must have replayed (`None`: any).
    pub fn for_cluster(&self, cluster: &str) -> Option<Lsn> {
        match self {
            MinLsn::Any(lsn) => Some(*lsn),
            MinLsn::PerCluster(all) => all.iter().find(|(c, _)| c == cluster).map(|(_, l)| *l),
        }
    }
}

/// What the last probe of a replica found.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaState {
    /// It answered and is a standby.
    pub up: bool,
    /// How far behind the primary it is in time (zero once caught up).
    pub lag: Duration,
    /// How far behind in WAL bytes.
    pub lag_bytes: u64,
    /// What it has replayed.
    pub replayed: Lsn,
    /// When this was measured.
    pub at: Instant,
}

impl Default for ReplicaState {
    fn default() -> Self {
        Self {
            up: false,
            lag: Duration::MAX,
            lag_bytes: u64::MAX,
            replayed: Lsn::default(),
            at: Instant::now(),
        }
    }
}

#[derive(Clone)]
struct Replica {
    pool: Pool,
    state: Arc<Mutex<ReplicaState>>,
}

#[derive(Clone)]
struct Pools {
    primary: Pool,
    replica: Option<Replica>,
}

/// Pools per purpose with a database login, and the lag bound.
#[derive(Clone, Default)]
pub struct ReadPools {
    purposes: BTreeMap<Purpose, Pools>,
    max_lag: Duration,
}

impl std::fmt::Debug for ReadPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let purposes: Vec<String> = self
            .purposes
            .iter()
            .map(|(p, pools)| {
                format!(
                    "{}{}",
                    p.slug(),
                    if pools.replica.is_some() {
                        "+replica"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        f.debug_struct("ReadPools")
            .field("purposes", &purposes)
            .field("max_lag", &self.max_lag)
            .finish()
    }
}

/// A pool could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the {purpose} read pool: {detail}")]
pub struct PoolError {
    purpose: &'static str,
    detail: String,
}

fn pool(purpose: Purpose, what: &str, login: &Database, size: usize) -> Result<Pool, PoolError> {
    let mut login = login.clone();
    login
        .pg_config_mut()
        .application_name(format!("umstore-api-{}-{what}", purpose.slug()))
        .connect_timeout(WAIT);
    let manager = login.pool_manager(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    });
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(WAIT))
        .create_timeout(Some(WAIT))
        .recycle_timeout(Some(WAIT))
        .build()
        .map_err(|e| PoolError {
            purpose: purpose.slug(),
            detail: e.to_string(),
        })
}

/// Where each purpose reads (each login with its URL's TLS settings).
#[derive(Debug, Clone, Default)]
pub struct Logins {
    /// The purpose's login on the primary (through PgBouncer where there is one).
    pub primary: BTreeMap<Purpose, Database>,
    /// The purpose's login on its replica pool, where it has one.
    pub replica: BTreeMap<Purpose, Database>,
}

impl ReadPools {
    /// Pools of up to `size` connections each; reads leave a replica whose lag
    /// is over `max_lag`. A replica without a primary login is refused.
    pub fn new(logins: &Logins, size: usize, max_lag: Duration) -> Result<Self, PoolError> {
        let mut purposes = BTreeMap::new();
        for (purpose, config) in &logins.primary {
            let replica = match logins.replica.get(purpose) {
                None => None,
                Some(r) => Some(Replica {
                    pool: pool(*purpose, "replica", r, size)?,
                    state: Arc::default(),
                }),
            };
            purposes.insert(
                *purpose,
                Pools {
                    primary: pool(*purpose, "primary", config, size)?,
                    replica,
                },
            );
        }
        if let Some(p) = logins
            .replica
            .keys()
            .find(|p| !logins.primary.contains_key(p))
        {
            return Err(PoolError {
                purpose: p.slug(),
                detail: "a replica login without a primary login: give both".into(),
            });
        }
        Ok(Self { purposes, max_lag })
    }

    /// The purposes that can read.
    pub fn purposes(&self) -> Vec<Purpose> {
        self.purposes.keys().copied().collect()
    }

    /// The purposes that read from a replica.
    pub fn replicated(&self) -> Vec<Purpose> {
        self.purposes
            .iter()
            .filter(|(_, p)| p.replica.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// The last probe of `purpose`'s replica.
    pub fn replica_state(&self, purpose: Purpose) -> Option<ReplicaState> {
        let replica = self.purposes.get(&purpose)?.replica.as_ref()?;
        Some(*replica.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Starts a probe per replica; they run until the returned handles are aborted.
    pub fn spawn_probes(&self, metrics: Arc<Metrics>) -> Vec<tokio::task::JoinHandle<()>> {
        self.spawn_probes_in(metrics, None)
    }

    /// [`Self::spawn_probes`] for the pools of `cluster` (a store with several
    /// clusters: the gauges are labelled by cluster too).
    pub fn spawn_probes_in(
        &self,
        metrics: Arc<Metrics>,
        cluster: Option<&str>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let cluster = cluster.map(str::to_owned);
        self.purposes
            .iter()
            .filter_map(|(purpose, pools)| {
                let replica = pools.replica.clone()?;
                let primary = pools.primary.clone();
                let (purpose, metrics, cluster) = (*purpose, metrics.clone(), cluster.clone());
                Some(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(PROBE_EVERY);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut was_up = None;
                    loop {
                        tick.tick().await;
                        let state = probe(&primary, &replica.pool).await;
                        match &cluster {
                            None => metrics.replica(
                                purpose.slug(),
                                state.up,
                                state.lag,
                                state.lag_bytes,
                            ),
                            Some(c) => metrics.cluster_replica(
                                c,
                                purpose.slug(),
                                state.up,
                                state.lag,
                                state.lag_bytes,
                            ),
                        }
                        if was_up != Some(state.up) {
                            if state.up {
                                tracing::info!(
                                    purpose = purpose.slug(),
                                    cluster = cluster.as_deref().unwrap_or(""),
                                    "replica serving reads"
                                );
                            } else {
                                tracing::warn!(
                                    purpose = purpose.slug(),
                                    cluster = cluster.as_deref().unwrap_or(""),
                                    "replica not answering; reads go to the primary"
                                );
                            }
                            was_up = Some(state.up);
                        }
                        *replica.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
                    }
                }))
            })
            .collect()
    }

    /// A connection as `purpose`'s login on the primary, whatever the replica's
    /// state (route lookups: a route written a moment ago must be found).
    pub async fn get_primary(&self, purpose: Purpose) -> Result<Object, ApiError> {
        let pools = self.pools_of(purpose)?;
        pools.primary.get().await.map_err(|e| {
            tracing::warn!(purpose = purpose.slug(), error = %e, "no primary connection");
            ApiError::Unavailable(format!(
                "the database does not answer for the purpose {}; retry shortly",
                purpose.slug()
            ))
        })
    }

    fn pools_of(&self, purpose: Purpose) -> Result<&Pools, ApiError> {
        self.purposes.get(&purpose).ok_or_else(|| {
            ApiError::Unavailable(format!(
                "no database login is configured for the purpose {0}: give serve \
                 --{0}-database-url (or UMSTORE_{1}_DATABASE_URL)",
                purpose.slug(),
                purpose.slug().replace('-', "_").to_uppercase()
            ))
        })
    }

    /// A connection as `purpose`'s login: on its replica when the replica is
    /// up, within the lag bound and has replayed `min_lsn`; else on the primary.
    pub async fn get(
        &self,
        purpose: Purpose,
        min_lsn: Option<Lsn>,
    ) -> Result<(Object, Served), ApiError> {
        let pools = self.pools_of(purpose)?;
        if let Some(replica) = &pools.replica {
            let s = *replica.state.lock().unwrap_or_else(|e| e.into_inner());
            let usable = s.up
                && s.at.elapsed() < PROBE_STALE
                && s.lag <= self.max_lag
                && min_lsn.is_none_or(|lsn| s.replayed >= lsn);
            if usable {
                match replica.pool.get().await {
                    Ok(client) => return Ok((client, Served::Replica)),
                    Err(e) => tracing::debug!(
                        purpose = purpose.slug(),
                        error = %e,
                        "replica connection failed; reading from the primary"
                    ),
                }
            }
        }
        let client = pools.primary.get().await.map_err(|e| {
            tracing::warn!(purpose = purpose.slug(), error = %e, "no read connection");
            ApiError::Unavailable(format!(
                "the database does not answer for the purpose {}; retry shortly",
                purpose.slug()
            ))
        })?;
        Ok((client, Served::Primary))
    }
}

/// One measurement: the primary's WAL position first, then what the replica
/// replayed, so a replica at or past that position is caught up (lag zero)
/// even when nothing was written for a while.
async fn probe(primary: &Pool, replica: &Pool) -> ReplicaState {
    let down = ReplicaState {
        at: Instant::now(),
        ..ReplicaState::default()
    };
    // The simple protocol: safe through PgBouncer in transaction mode.
    let Ok(Some(primary_lsn)) = first_value(primary, "SELECT pg_current_wal_lsn()::text").await
    else {
        return down;
    };
    let Ok(primary_lsn) = primary_lsn.parse::<Lsn>() else {
        return down;
    };
    let sql = "SELECT pg_is_in_recovery()::text, pg_last_wal_replay_lsn()::text, \
               coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8, -1)::text";
    let Ok(client) = tokio::time::timeout(WAIT, replica.get()).await else {
        return down;
    };
    let Ok(client) = client else {
        return down;
    };
    let Ok(Ok(messages)) = tokio::time::timeout(WAIT, client.simple_query(sql)).await else {
        return down;
    };
    let Some(row) = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    }) else {
        return down;
    };
    let standby = row.get(0) == Some("true");
    let Some(replayed) = row.get(1).and_then(|l| l.parse::<Lsn>().ok()) else {
        return down;
    };
    let since_replay = row
        .get(2)
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(-1.0);
    let lag = if replayed >= primary_lsn {
        Duration::ZERO
    } else if since_replay >= 0.0 {
        Duration::from_secs_f64(since_replay)
    } else {
        Duration::MAX
    };
    ReplicaState {
        up: standby,
        lag,
        lag_bytes: primary_lsn.0.saturating_sub(replayed.0),
        replayed,
        at: Instant::now(),
    }
}

async fn first_value(pool: &Pool, sql: &str) -> Result<Option<String>, ()> {
    let client = tokio::time::timeout(WAIT, pool.get())
        .await
        .map_err(|_| ())?
        .map_err(|_| ())?;
    let messages = tokio::time::timeout(WAIT, client.simple_query(sql))
        .await
        .map_err(|_| ())?
        .map_err(|_| ())?;
    Ok(messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_compare_and_print_as_postgresql_does() {
        let a: Lsn = "0/16B3740".parse().expect("lsn");
        let b: Lsn = "1/0".parse().expect("lsn");
        assert!(a < b);
        assert_eq!(a.to_string(), "0/16B3740");
        assert_eq!(b.0, 1 << 32);
        assert!("16B3740".parse::<Lsn>().is_err());
        assert!("0/xyz".parse::<Lsn>().is_err());
    }

    #[test]
    fn a_per_cluster_position_is_honoured_only_by_its_cluster() {
        let plain: MinLsn = "0/10".parse().expect("plain");
        assert_eq!(plain.for_cluster("south"), Some(Lsn(0x10)));
        let token: MinLsn = "home:0/20,south:1/0".parse().expect("token");
        assert_eq!(token.for_cluster("home"), Some(Lsn(0x20)));
        assert_eq!(token.for_cluster("south"), Some(Lsn(1 << 32)));
        assert_eq!(token.for_cluster("north"), None);
        for bad in ["home:", ":0/1", "home:0/1,", "home0/1,x"] {
            assert!(bad.parse::<MinLsn>().is_err(), "{bad}");
        }
    }
}
