//! A bounded cache of decoded chunks, least recently used first out, sized in bytes.
//!
//! Several FUSE threads and read-ahead workers may want the same chunk at once; the first
//! one fetches it and the others wait for its result instead of fetching it again. A
//! failed fetch is not cached, so a later read tries again (and reports again).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Decoded bytes shared between the cache and the readers copying out of them.
pub type Bytes = Arc<Vec<u8>>;

enum Slot {
    /// Some thread is fetching it; wait on the condition variable.
    Loading,
    Ready {
        data: Bytes,
        tick: u64,
    },
}

struct Inner<K> {
    slots: HashMap<K, Slot>,
    /// Recency order: tick -> key, oldest first.
    order: BTreeMap<u64, K>,
    next_tick: u64,
    bytes: u64,
}

/// Counters of one cache, for statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that had to fetch.
    pub misses: u64,
    /// Chunks evicted to stay within the budget.
    pub evictions: u64,
    /// Bytes held now.
    pub bytes: u64,
}

/// An LRU cache of byte buffers keyed by `K`, holding at most `capacity` bytes (one
/// buffer larger than that is handed to its reader but not kept).
pub struct ChunkCache<K> {
    inner: Mutex<Inner<K>>,
    ready: Condvar,
    capacity: u64,
    counters: Mutex<CacheCounters>,
}

impl<K: Copy + Eq + Hash> ChunkCache<K> {
    /// An empty cache that keeps at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        ChunkCache {
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                order: BTreeMap::new(),
                next_tick: 0,
                bytes: 0,
            }),
            ready: Condvar::new(),
            capacity,
            counters: Mutex::new(CacheCounters::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        // A panic while holding the lock cannot leave the map inconsistent in a way
        // that matters more than stopping every reader, so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut CacheCounters)) {
        f(&mut self.counters.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// True when `key` is cached or being fetched (read-ahead skips those).
    pub fn contains_or_loading(&self, key: &K) -> bool {
        self.lock().slots.contains_key(key)
    }

    /// The cached bytes of `key`, or the result of `fetch` (run on this thread, without
    /// the lock held, while other askers for `key` wait for it).
    ///
    /// # Errors
    /// The error of `fetch`; nothing is cached then.
    pub fn get_or_fetch<E>(
        &self,
        key: K,
        fetch: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Bytes, E> {
        let mut inner = self.lock();
        loop {
            match inner.slots.get_mut(&key) {
                Some(Slot::Ready { data, tick }) => {
                    let data = data.clone();
                    let old = *tick;
                    let new = inner.next_tick;
                    inner.next_tick += 1;
                    if let Some(Slot::Ready { tick, .. }) = inner.slots.get_mut(&key) {
                        *tick = new;
                    }
                    inner.order.remove(&old);
                    inner.order.insert(new, key);
                    drop(inner);
                    self.count(|c| c.hits += 1);
                    return Ok(data);
                }
                Some(Slot::Loading) => {
                    inner = self.ready.wait(inner).unwrap_or_else(|p| p.into_inner());
                }
                None => break,
            }
        }
        inner.slots.insert(key, Slot::Loading);
        drop(inner);
        self.count(|c| c.misses += 1);
        // Whatever happens in `fetch` (an error or a panic), the Loading slot must go,
        // or every later reader of this key would wait forever.
        struct Unload<'a, K: Copy + Eq + Hash> {
            cache: &'a ChunkCache<K>,
            key: K,
            armed: bool,
        }
        impl<K: Copy + Eq + Hash> Drop for Unload<'_, K> {
            fn drop(&mut self) {
                if self.armed {
                    self.cache.lock().slots.remove(&self.key);
                    self.cache.ready.notify_all();
                }
            }
        }
        let mut guard = Unload {
            cache: self,
            key,
            armed: true,
        };
        let data = Arc::new(fetch()?);
        guard.armed = false;
        let len = data.len() as u64;
        let mut inner = self.lock();
        let mut evicted = 0;
        if len <= self.capacity {
            let tick = inner.next_tick;
            inner.next_tick += 1;
            inner.slots.insert(
                key,
                Slot::Ready {
                    data: data.clone(),
                    tick,
                },
            );
            inner.order.insert(tick, key);
            inner.bytes += len;
            while inner.bytes > self.capacity {
                let Some((_, old)) = inner.order.pop_first() else {
                    break;
                };
                if let Some(Slot::Ready { data, .. }) = inner.slots.remove(&old) {
                    inner.bytes -= data.len() as u64;
                    evicted += 1;
                }
            }
        } else {
            inner.slots.remove(&key);
        }
        let bytes = inner.bytes;
        drop(inner);
        self.ready.notify_all();
        self.count(|c| {
            c.evictions += evicted;
            c.bytes = bytes;
        });
        Ok(data)
    }

    /// Hits, misses, evictions and bytes held.
    pub fn counters(&self) -> CacheCounters {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let cache: ChunkCache<u32> = ChunkCache::new(300);
        let fetches = AtomicUsize::new(0);
        let get = |k: u32| {
            cache
                .get_or_fetch(k, || -> Result<_, ()> {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    Ok(vec![k as u8; 100])
                })
                .unwrap()
        };
        get(1);
        get(2);
        get(3);
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        get(1); // 1 is now the most recent; 2 the oldest.
        get(4); // evicts 2
        assert_eq!(fetches.load(Ordering::SeqCst), 4);
        assert!(cache.contains_or_loading(&1));
        assert!(!cache.contains_or_loading(&2));
        assert!(cache.contains_or_loading(&3));
        let c = cache.counters();
        assert_eq!((c.hits, c.misses, c.evictions, c.bytes), (1, 4, 1, 300));
    }

    #[test]
    fn oversized_and_failed_fetches_are_not_kept() {
        let cache: ChunkCache<u32> = ChunkCache::new(10);
        let big = cache
            .get_or_fetch(1, || -> Result<_, ()> { Ok(vec![0; 11]) })
            .unwrap();
        assert_eq!(big.len(), 11);
        assert!(!cache.contains_or_loading(&1));
        assert!(cache.get_or_fetch(2, || Err("bad")).is_err());
        assert!(!cache.contains_or_loading(&2));
        assert_eq!(
            *cache
                .get_or_fetch(2, || -> Result<_, ()> { Ok(vec![7]) })
                .unwrap(),
            vec![7]
        );
    }

    #[test]
    fn concurrent_askers_share_one_fetch() {
        let cache: Arc<ChunkCache<u32>> = Arc::new(ChunkCache::new(1 << 20));
        let fetches = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let cache = cache.clone();
                let fetches = fetches.clone();
                std::thread::spawn(move || {
                    cache
                        .get_or_fetch(9, || -> Result<_, ()> {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(vec![1; 1000])
                        })
                        .unwrap()
                        .len()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 1000);
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }
}
