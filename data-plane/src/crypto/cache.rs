//! An in-memory cache of unwrapped data keys: bounded in size and age, so a
//! key lives in memory only while it is in use. Keys are zeroized when the
//! last reference to an evicted entry drops.

use std::sync::Arc;
use std::time::Duration;

use mini_moka::sync::Cache;
use uuid::Uuid;

use super::DataKey;

/// Cache of unwrapped data keys by user.
#[derive(Clone)]
pub struct DataKeyCache {
    inner: Cache<Uuid, Arc<DataKey>>,
}

impl std::fmt::Debug for DataKeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeyCache")
            .field("entries", &self.inner.entry_count())
            .finish()
    }
}

impl DataKeyCache {
    /// At most `capacity` keys, each for at most `ttl` after it was cached.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            inner: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The cached key of `user`.
    pub fn get(&self, user: &Uuid) -> Option<Arc<DataKey>> {
        self.inner.get(user)
    }

    /// Caches `key` for `user`.
    pub fn insert(&self, user: Uuid, key: Arc<DataKey>) {
        self.inner.insert(user, key);
    }

    /// Drops `user`'s key (crypto-shredding).
    pub fn forget(&self, user: &Uuid) {
        self.inner.invalidate(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_on_request_and_after_ttl() {
        let cache = DataKeyCache::new(10, Duration::from_millis(50));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        cache.insert(a, Arc::new(DataKey::generate()));
        cache.insert(b, Arc::new(DataKey::generate()));
        assert!(cache.get(&a).is_some());
        cache.forget(&a);
        assert!(cache.get(&a).is_none());
        std::thread::sleep(Duration::from_millis(80));
        assert!(cache.get(&b).is_none(), "expired after its TTL");
    }
}
