//! What nearly every request looks up, kept for a moment: a token's record ([`crate::auth`])
//! and whether a directory takes uploads ([`crate::upload`]). Each costs a query, and a client
//! sending uploads back to back asks the same two questions each time.
//!
//! Entries live `http.lookup_ttl` (1 s), so a change made anywhere (a token revoked by
//! `orbit-gateway admin`, a directory archived through another gateway) holds on every gateway
//! within that, with no message between them; this gateway's own archive forgets its entry at
//! once. A lookup that finds nothing is not kept: an unknown token never fills the cache, and
//! a token created a moment ago works at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries at most; past it the stale ones go, and if none is, all of them.
const MAX_ENTRIES: usize = 10_000;

pub struct Recent<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Eq + Hash, V: Clone> Recent<K, V> {
    /// Keeps entries for `ttl`; zero keeps nothing.
    pub fn new(ttl: Duration) -> Self {
        Recent {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().expect("never poisoned");
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, value)| value.clone())
    }

    pub fn put(&self, key: K, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().expect("never poisoned");
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), value));
    }

    /// The kept value of `key`, or what `load` finds, kept from then on. A load that finds
    /// nothing (`Ok(None)`) or fails keeps nothing.
    pub async fn get_or_load<E, F>(&self, key: &K, load: impl FnOnce() -> F) -> Result<Option<V>, E>
    where
        K: Clone,
        F: std::future::Future<Output = Result<Option<V>, E>>,
    {
        if let Some(value) = self.get(key) {
            return Ok(Some(value));
        }
        let found = load().await?;
        if let Some(value) = &found {
            self.put(key.clone(), value.clone());
        }
        Ok(found)
    }

    pub fn forget(&self, key: &K) {
        self.entries.lock().expect("never poisoned").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_for_the_ttl_and_zero_keeps_nothing() {
        let recent = Recent::new(Duration::from_millis(50));
        recent.put(1, "a");
        assert_eq!(recent.get(&1), Some("a"));
        recent.forget(&1);
        assert_eq!(recent.get(&1), None);
        recent.put(2, "b");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(recent.get(&2), None);
        let never = Recent::new(Duration::ZERO);
        never.put(1, "a");
        assert_eq!(never.get(&1), None);
    }

    #[test]
    fn a_full_cache_makes_room() {
        let recent = Recent::new(Duration::from_secs(60));
        for n in 0..MAX_ENTRIES + 5 {
            recent.put(n, n);
        }
        assert_eq!(recent.get(&(MAX_ENTRIES + 4)), Some(MAX_ENTRIES + 4));
        assert!(recent.entries.lock().unwrap().len() <= MAX_ENTRIES);
    }
}
