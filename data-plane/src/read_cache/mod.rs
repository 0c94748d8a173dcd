//! The read cache at the edge (docs/api.md, "Read cache"): in each data-plane
//! process, the rendered answer of `GET /api/v1/user-metadata/{user_id}` per
//! (purpose, user), bounded by entries and by a time to live.
//!
//! Keyed by purpose as well as user: each purpose reads as its own database
//! login (its grants and row-level security) and only some purposes see PII, so
//! an entry is only ever served to the purpose whose read filled it.
//!
//! Freshness comes from the outbound stream ([`events`]): every process
//! subscribes to `METADATA_STORED` and `USER_ERASED` and drops the user on
//! each. Three guards keep a fill that raced an event from planting a stale
//! entry: a per-user tombstone (the newest version an event announced: an
//! older read is not cached), a generation bumped by every [`ReadCache::clear`]
//! (a read that started before a clear is not cached), and the TTL, which
//! bounds any staleness that slips past both. With [`Verify::Version`] (the
//! default) every hit is also checked against the user's row (one indexed
//! single-row read on the purpose's pool): the version must be the cached one
//! and the user not erased, so a hit is never staler than a miss would be and
//! an erased user is never served from memory, whether or not an event arrived.

pub mod events;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use umstore_migrations::roles::Purpose;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::metrics::Metrics;

/// What a hit is checked against before it is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Verify {
    /// One single-row read per hit: the user's version must equal the cached
    /// one, and the user must not be erased.
    Version,
    /// None: hits come from memory alone, kept fresh by the outbound events,
    /// and for at most the TTL when an event is lost. Needs the event bus.
    None,
}

impl Verify {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Verify::Version => "version",
            Verify::None => "none",
        }
    }
}

/// The cache's settings.
#[derive(Clone, Copy, Debug)]
pub struct ReadCacheConfig {
    /// At most this many (purpose, user) entries.
    pub entries: u64,
    /// An entry is dropped this long after it was filled.
    pub ttl: Duration,
    /// What a hit is checked against.
    pub verify: Verify,
}

/// One cached answer: the body as sent, and what it was read at.
pub struct Entry {
    /// The user's region (where the verification reads).
    pub region: String,
    /// The user's row version when read.
    pub version: i64,
    /// Whether `body` holds decrypted PII (zeroized when the entry is dropped).
    pub pii_included: bool,
    /// The JSON body, as the miss that filled it answered.
    pub body: Zeroizing<Vec<u8>>,
    /// When it was filled.
    pub filled_at: Instant,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("region", &self.region)
            .field("version", &self.version)
            .field("pii_included", &self.pii_included)
            .field("body", &"<redacted>")
            .finish()
    }
}

/// Taken before a miss reads the database; a fill with a ticket older than
/// the last [`ReadCache::clear`] is dropped.
#[derive(Clone, Copy, Debug)]
pub struct Ticket(u64);

/// Why entries were dropped (the `reason` label of
/// `umstore_read_cache_invalidations_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// A `METADATA_STORED` event for the user.
    MetadataStored,
    /// A `USER_ERASED` event for the user.
    UserErased,
    /// A hit's verification found a newer version or an erased user.
    Verify,
    /// The event subscription dropped or (re)started: everything went.
    Resubscribe,
}

impl Invalidation {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Invalidation::MetadataStored => "metadata_stored",
            Invalidation::UserErased => "user_erased",
            Invalidation::Verify => "verify",
            Invalidation::Resubscribe => "resubscribe",
        }
    }
}

/// The purposes whose answers are cached (those that read one user).
const CACHED_PURPOSES: [Purpose; 5] = [
    Purpose::Ai,
    Purpose::Rules,
    Purpose::JsonGenerator,
    Purpose::Dashboard,
    Purpose::Admin,
];

/// The read cache of one process. Cheap to clone.
#[derive(Clone)]
pub struct ReadCache {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Cache<(Purpose, Uuid), Arc<Entry>>,
    /// Per user, the newest version an event announced.
    tombstones: Cache<Uuid, i64>,
    generation: AtomicU64,
    /// Whether hits may be served without verification (the event
    /// subscription is up). Always true with [`Verify::Version`].
    live: AtomicBool,
    config: ReadCacheConfig,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCache")
            .field("config", &self.inner.config)
            .field("entries", &self.inner.entries.entry_count())
            .field("live", &self.inner.live.load(Ordering::Relaxed))
            .finish()
    }
}

impl ReadCache {
    /// An empty cache. With [`Verify::None`] it serves nothing until
    /// [`Self::set_live`] says the event subscription is up.
    pub fn new(config: ReadCacheConfig, metrics: Arc<Metrics>) -> Self {
        let entries = Cache::builder()
            .max_capacity(config.entries)
            .time_to_live(config.ttl)
            .build();
        // A tombstone only has to outlive a fill that read before its event:
        // past the TTL such a fill's entry would have expired anyway.
        let tombstones = Cache::builder()
            .max_capacity(config.entries.max(1024))
            .time_to_live(config.ttl)
            .build();
        metrics
            .read_cache_live
            .set(i64::from(config.verify == Verify::Version));
        Self {
            inner: Arc::new(Inner {
                entries,
                tombstones,
                generation: AtomicU64::new(0),
                live: AtomicBool::new(config.verify == Verify::Version),
                config,
                metrics,
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> ReadCacheConfig {
        self.inner.config
    }

    /// The entry for `purpose` and `user`, if one may be served (before any
    /// verification). An entry holding PII is never returned to a purpose
    /// that may not see PII (it cannot be there: entries are per purpose; this
    /// is the second lock on that door).
    pub async fn lookup(&self, purpose: Purpose, user: Uuid) -> Option<Arc<Entry>> {
        if !self.inner.live.load(Ordering::Acquire) {
            return None;
        }
        let entry = self.inner.entries.get(&(purpose, user)).await?;
        if entry.pii_included && !crate::api::users::sees_pii(purpose) {
            self.inner.entries.invalidate(&(purpose, user)).await;
            return None;
        }
        Some(entry)
    }

    /// Whether hits are served right now.
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }

    /// Take before reading what [`Self::fill`] will cache.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.inner.generation.load(Ordering::Acquire))
    }

    /// Caches `entry` for `purpose` and `user` unless, since `ticket`, the
    /// cache was cleared or an event announced a newer version of the user.
    pub async fn fill(&self, ticket: Ticket, purpose: Purpose, user: Uuid, entry: Entry) {
        let version = entry.version;
        if !self.fresh(ticket, user, version).await {
            return;
        }
        self.inner
            .entries
            .insert((purpose, user), Arc::new(entry))
            .await;
        // An event or a clear between the check and the insert: undo it. (The
        // event's own invalidation may have run before the insert.)
        if !self.fresh(ticket, user, version).await {
            self.inner.entries.invalidate(&(purpose, user)).await;
        }
    }

    async fn fresh(&self, ticket: Ticket, user: Uuid, version: i64) -> bool {
        if self.inner.generation.load(Ordering::Acquire) != ticket.0 {
            return false;
        }
        match self.inner.tombstones.get(&user).await {
            Some(newest) => version >= newest,
            None => true,
        }
    }

    /// Drops every purpose's entry for `user`; `version` (what an event
    /// announced) keeps older reads out from now on.
    pub async fn invalidate(&self, user: Uuid, version: Option<i64>, why: Invalidation) {
        if let Some(version) = version {
            self.inner
                .tombstones
                .entry(user)
                .and_upsert_with(|old| {
                    let newest = old.map_or(version, |o| (*o.value()).max(version));
                    std::future::ready(newest)
                })
                .await;
        }
        for purpose in CACHED_PURPOSES {
            self.inner.entries.invalidate(&(purpose, user)).await;
        }
        self.inner.metrics.read_cache_invalidated(why.as_str());
    }

    /// Drops one purpose's entry for `user` (a hit that failed verification).
    pub async fn invalidate_one(&self, purpose: Purpose, user: Uuid) {
        self.inner.entries.invalidate(&(purpose, user)).await;
        self.inner
            .metrics
            .read_cache_invalidated(Invalidation::Verify.as_str());
    }

    /// Drops everything, and every fill that began before.
    pub fn clear(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.entries.invalidate_all();
        self.inner
            .metrics
            .read_cache_invalidated(Invalidation::Resubscribe.as_str());
    }

    /// Whether the event subscription is up. Going down clears the cache;
    /// with [`Verify::None`] nothing is served until it is back (coming back
    /// clears it again: what was missed in between is gone with it).
    pub fn set_live(&self, live: bool) {
        self.clear();
        let live = live || self.inner.config.verify == Verify::Version;
        self.inner.live.store(live, Ordering::Release);
        self.inner.metrics.read_cache_live.set(i64::from(live));
    }

    /// Refreshes the entry-count gauge (at scrape time).
    pub fn export_size(&self) {
        let count = self.inner.entries.entry_count();
        self.inner
            .metrics
            .read_cache_entries
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Records a served hit (its entry's age) or a miss.
    pub fn count_hit(&self, entry: &Entry) {
        self.inner.metrics.read_cache_lookup("hit");
        self.inner
            .metrics
            .read_cache_hit_age_seconds
            .observe(entry.filled_at.elapsed().as_secs_f64());
    }

    /// Records a miss (read from the database).
    pub fn count_miss(&self) {
        self.inner.metrics.read_cache_lookup("miss");
    }

    /// Records a request the cache may not answer (`as_of`, `X-Min-Lsn`, or
    /// the subscription down).
    pub fn count_bypass(&self) {
        self.inner.metrics.read_cache_lookup("bypass");
    }

    /// Entries held now (moka's count catches up with recent changes
    /// asynchronously; see [`Self::settle`]).
    pub fn entry_count(&self) -> u64 {
        self.inner.entries.entry_count()
    }

    /// Runs the cache's pending housekeeping (tests: exact counts).
    pub async fn settle(&self) {
        self.inner.entries.run_pending_tasks().await;
    }

    /// The metrics the cache reports to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(verify: Verify) -> ReadCache {
        ReadCache::new(
            ReadCacheConfig {
                entries: 100,
                ttl: Duration::from_secs(60),
                verify,
            },
            Arc::new(Metrics::new()),
        )
    }

    fn entry(version: i64, pii: bool) -> Entry {
        Entry {
            region: "KA".into(),
            version,
            pii_included: pii,
            body: Zeroizing::new(format!("{{\"version\":{version}}}").into_bytes()),
            filled_at: Instant::now(),
        }
    }

    #[tokio::test]
    async fn a_fill_older_than_an_announced_version_is_not_cached() {
        let cache = cache(Verify::Version);
        let user = Uuid::new_v4();
        let ticket = cache.ticket();
        cache
            .invalidate(user, Some(3), Invalidation::MetadataStored)
            .await;
        cache.fill(ticket, Purpose::Ai, user, entry(2, true)).await;
        assert!(cache.lookup(Purpose::Ai, user).await.is_none());
        cache
            .fill(cache.ticket(), Purpose::Ai, user, entry(3, true))
            .await;
        let hit = cache.lookup(Purpose::Ai, user).await.expect("version 3");
        assert_eq!(hit.version, 3);
        // Entries are per purpose.
        assert!(cache.lookup(Purpose::Dashboard, user).await.is_none());
    }

    #[tokio::test]
    async fn a_fill_that_began_before_a_clear_is_not_cached() {
        let cache = cache(Verify::Version);
        let user = Uuid::new_v4();
        let ticket = cache.ticket();
        cache.clear();
        cache.fill(ticket, Purpose::Ai, user, entry(1, true)).await;
        assert!(cache.lookup(Purpose::Ai, user).await.is_none());
    }

    #[tokio::test]
    async fn an_event_drops_the_user_for_every_purpose() {
        let cache = cache(Verify::Version);
        let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
        for p in [Purpose::Ai, Purpose::Rules, Purpose::Admin] {
            cache.fill(cache.ticket(), p, user, entry(1, false)).await;
        }
        cache
            .fill(cache.ticket(), Purpose::Ai, other, entry(1, false))
            .await;
        cache
            .invalidate(user, Some(2), Invalidation::UserErased)
            .await;
        for p in [Purpose::Ai, Purpose::Rules, Purpose::Admin] {
            assert!(cache.lookup(p, user).await.is_none(), "{p:?}");
        }
        assert!(cache.lookup(Purpose::Ai, other).await.is_some());
    }

    #[tokio::test]
    async fn pii_never_reaches_a_purpose_that_may_not_see_it() {
        let cache = cache(Verify::Version);
        let user = Uuid::new_v4();
        // Not something the read API fills; the lookup refuses it all the same.
        cache
            .fill(cache.ticket(), Purpose::Rules, user, entry(1, true))
            .await;
        assert!(cache.lookup(Purpose::Rules, user).await.is_none());
    }

    #[tokio::test]
    async fn unverified_hits_wait_for_the_subscription_and_stop_when_it_drops() {
        let cache = cache(Verify::None);
        let user = Uuid::new_v4();
        cache
            .fill(cache.ticket(), Purpose::Ai, user, entry(1, true))
            .await;
        assert!(cache.lookup(Purpose::Ai, user).await.is_none(), "not live");
        cache.set_live(true);
        cache
            .fill(cache.ticket(), Purpose::Ai, user, entry(1, true))
            .await;
        assert!(cache.lookup(Purpose::Ai, user).await.is_some());
        cache.set_live(false);
        assert!(!cache.is_live());
        cache.set_live(true);
        assert!(
            cache.lookup(Purpose::Ai, user).await.is_none(),
            "cleared when the subscription dropped"
        );
    }
}
