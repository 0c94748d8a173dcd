//! An in-memory cache of unwrapped data keys: bounded in size and age, so a
//! key lives in memory only while it is in use. Keys are zeroized when the
//! last reference to an evicted entry drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::DataKey;

/// Shards: lookups of different users rarely wait for each other.
const SHARDS: usize = 16;

type Shard = HashMap<Uuid, (Arc<DataKey>, Instant)>;

/// Cache of unwrapped data keys by user: a few mutex-guarded maps, each held
/// only for one lookup or insert (no background work, nothing that blocks a
/// caller for longer). A full shard first drops its expired keys, then,
/// if still full, the oldest half.
#[derive(Clone)]
pub struct DataKeyCache {
    shards: Arc<[Mutex<Shard>; SHARDS]>,
    per_shard: usize,
    ttl: Duration,
}

impl std::fmt::Debug for DataKeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: usize = (0..SHARDS).map(|i| self.shard_at(i).len()).sum();
        f.debug_struct("DataKeyCache")
            .field("entries", &entries)
            .finish()
    }
}

impl DataKeyCache {
    /// At most about `capacity` keys, each for at most `ttl` after it was cached.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        Self {
            shards: Arc::new(std::array::from_fn(|_| Mutex::new(HashMap::new()))),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            ttl,
        }
    }

    fn shard_at(&self, index: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard leaves a consistent map behind.
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shard(&self, user: &Uuid) -> MutexGuard<'_, Shard> {
        self.shard_at(usize::from(user.as_bytes()[15]) % SHARDS)
    }

    /// The cached key of `user`.
    pub fn get(&self, user: &Uuid) -> Option<Arc<DataKey>> {
        let mut shard = self.shard(user);
        match shard.get(user) {
            Some((key, at)) if at.elapsed() < self.ttl => Some(key.clone()),
            Some(_) => {
                shard.remove(user);
                None
            }
            None => None,
        }
    }

    /// Caches `key` for `user`.
    pub fn insert(&self, user: Uuid, key: Arc<DataKey>) {
        let mut shard = self.shard(&user);
        if shard.len() >= self.per_shard && !shard.contains_key(&user) {
            let ttl = self.ttl;
            shard.retain(|_, (_, at)| at.elapsed() < ttl);
            if shard.len() >= self.per_shard {
                let mut ages: Vec<Instant> = shard.values().map(|(_, at)| *at).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                shard.retain(|_, (_, at)| *at > cut);
            }
        }
        shard.insert(user, (key, Instant::now()));
    }

    /// Drops `user`'s key (crypto-shredding).
    pub fn forget(&self, user: &Uuid) {
        self.shard(user).remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_on_request() {
        // Room for both in any shard: with 10 keys (one per shard) two users
        // in one shard (1 in 16) evicted each other and failed the test.
        let cache = DataKeyCache::new(10 * SHARDS as u64, Duration::from_secs(60));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        cache.insert(a, Arc::new(DataKey::generate()));
        cache.insert(b, Arc::new(DataKey::generate()));
        assert!(cache.get(&a).is_some());
        cache.forget(&a);
        assert!(cache.get(&a).is_none());
        assert!(cache.get(&b).is_some(), "only the forgotten key goes");
    }

    #[test]
    fn forgets_after_its_ttl() {
        // Only the lower bound is timed: a loaded machine may take longer, never less.
        let cache = DataKeyCache::new(10, Duration::from_millis(50));
        let b = Uuid::new_v4();
        cache.insert(b, Arc::new(DataKey::generate()));
        std::thread::sleep(Duration::from_millis(200));
        assert!(cache.get(&b).is_none(), "expired after its TTL");
    }

    #[test]
    fn stays_within_its_capacity_keeping_the_newest() {
        let cache = DataKeyCache::new(160, Duration::from_secs(60));
        let users: Vec<Uuid> = (0..2_000).map(|_| Uuid::new_v4()).collect();
        for u in &users {
            cache.insert(*u, Arc::new(DataKey::generate()));
        }
        let held = users.iter().filter(|u| cache.get(u).is_some()).count();
        assert!(held <= 160 + SHARDS, "{held} keys held");
        assert!(held >= 40, "{held} keys held");
        assert!(cache.get(&users[1_999]).is_some(), "the newest key is kept");
    }
}
