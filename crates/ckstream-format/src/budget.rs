//! Bounds on the memory that chunk data in flight may take, whatever an archive claims.
//!
//! Every length in an archive is bounded (a chunk decodes to at most 64 MiB), but a
//! reader that works on several chunks at once (threads, queues) multiplies that bound,
//! and a crafted archive can make every chunk claim the maximum. A [`Budget`] caps the
//! bytes held by chunks in flight: a worker takes a [`Lease`] for a chunk's
//! [`chunk_cost`] before it reads the chunk and gives it back (drops it) when the bytes
//! are gone. One chunk larger than the whole budget is admitted alone, so work always
//! proceeds. [`CHUNK_MEMORY`] is the budget `verify`, `unpack`, `mount` and `serve` use:
//! with ordinary archives (1 MiB chunks) it never limits their parallelism.

use std::sync::{Condvar, Mutex, MutexGuard};

use crate::index::Chunk;
use crate::CodecId;

/// Bytes of chunk data (stored and decoded) one operation keeps in flight at most, beside
/// a single chunk that is larger on its own.
pub const CHUNK_MEMORY: u64 = 64 << 20;

/// The memory reading chunk `c` takes while it is worked on: its stored bytes, plus what
/// they decode to unless they are the raw bytes already.
pub fn chunk_cost(c: &Chunk) -> u64 {
    let stored = u64::from(c.stored_len);
    if c.codec_id() == Some(CodecId::None) && !c.in_shared_frame() {
        stored
    } else {
        stored + u64::from(c.decoded_len())
    }
}

#[derive(Debug, Default)]
struct State {
    used: u64,
    /// Next ticket [`Budget::take_in_turn`] serves.
    turn: u64,
    closed: bool,
}

/// A number of bytes that leases are taken from (see the module documentation).
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    state: Mutex<State>,
    freed: Condvar,
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Lease<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        s.used -= self.bytes;
        drop(s);
        self.budget.freed.notify_all();
    }
}

/// Closes its budget when dropped (see [`Budget::close_on_drop`]).
#[derive(Debug)]
pub struct CloseOnDrop<'a>(&'a Budget);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Budget {
            limit,
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fits(&self, s: &State, bytes: u64) -> bool {
        s.used == 0 || s.used.saturating_add(bytes) <= self.limit
    }

    /// Waits until `bytes` fit (or nothing is held) and takes them; `None` once the
    /// budget is [closed](Self::close). A caller must not hold another lease of the same
    /// budget while it waits, or it may wait forever.
    pub fn take(&self, bytes: u64) -> Option<Lease<'_>> {
        let mut s = self.lock();
        while !s.closed && !self.fits(&s, bytes) {
            s = self.freed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.closed {
            return None;
        }
        s.used += bytes;
        Some(Lease {
            budget: self,
            bytes,
        })
    }

    /// Like [`take`](Self::take), for work that is consumed in order (the chunks of one
    /// file written out front to back): tickets 0, 1, 2, ... are served in that order, each
    /// once the ones before it were, so the lease the consumer waits for next never waits
    /// behind leases that only the consumer could give back. Returns `None` once the
    /// budget is [closed](Self::close).
    pub fn take_in_turn(&self, ticket: u64, bytes: u64) -> Option<Lease<'_>> {
        let mut s = self.lock();
        while !s.closed && (s.turn != ticket || !self.fits(&s, bytes)) {
            s = self.freed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.closed {
            return None;
        }
        s.turn += 1;
        s.used += bytes;
        drop(s);
        // The next ticket's holder may be waiting for its turn, not for bytes.
        self.freed.notify_all();
        Some(Lease {
            budget: self,
            bytes,
        })
    }

    /// Stops the work the budget paces: everyone waiting in [`take`](Self::take) or
    /// [`take_in_turn`](Self::take_in_turn), and everyone who comes later, gets `None`.
    /// For the side that gives leases back when it stops early (a consumer that failed:
    /// the leases it left queued, or the tickets it skipped, would never come back).
    pub fn close(&self) {
        self.lock().closed = true;
        self.freed.notify_all();
    }

    /// A guard that [closes](Self::close) the budget when it is dropped: held by the
    /// side that must not leave the other waiting however it stops (an error, a panic).
    pub fn close_on_drop(&self) -> CloseOnDrop<'_> {
        CloseOnDrop(self)
    }

    /// Bytes held by leases now.
    pub fn used(&self) -> u64 {
        self.lock().used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn leases_wait_for_room_and_a_large_one_passes_alone() {
        let budget = Budget::new(100);
        let a = budget.take(60).unwrap();
        let peak = AtomicU64::new(0);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let b = budget.take(50).unwrap();
                peak.fetch_max(budget.used(), Ordering::Relaxed);
                drop(b);
                // Larger than the whole budget: admitted once nothing else is held.
                let _huge = budget.take(1000).unwrap();
                peak.fetch_max(budget.used(), Ordering::Relaxed);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished(), "60 + 50 does not fit in 100");
            drop(a);
        });
        assert_eq!(peak.load(Ordering::Relaxed), 1000);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn tickets_are_served_in_order_and_closing_releases_the_waiters() {
        // One byte: each lease is held alone, so the order they are pushed in is the
        // order they were granted in.
        let budget = Budget::new(1);
        let order = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for ticket in (0..4).rev() {
                let (budget, order) = (&budget, &order);
                s.spawn(move || {
                    let lease = budget.take_in_turn(ticket, 1).unwrap();
                    order.lock().unwrap().push(ticket);
                    drop(lease);
                });
            }
        });
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3]);
        // Ticket 5 waits for ticket 4, which never comes: closing releases it.
        std::thread::scope(|s| {
            let held = budget.take(1).unwrap();
            let in_turn = s.spawn(|| budget.take_in_turn(5, 1).is_none());
            let for_bytes = s.spawn(|| budget.take(1).is_none());
            std::thread::sleep(Duration::from_millis(50));
            budget.close();
            assert!(in_turn.join().unwrap() && for_bytes.join().unwrap());
            drop(held);
        });
    }

    #[test]
    fn cost_counts_decoded_bytes_only_when_they_are_a_copy() {
        let mut c = Chunk {
            raw_len: 100,
            stored_len: 100,
            codec: CodecId::None as u32,
            ..Default::default()
        };
        assert_eq!(chunk_cost(&c), 100);
        c.codec = CodecId::Zstd as u32;
        c.stored_len = 30;
        assert_eq!(chunk_cost(&c), 130);
        c.frame_raw_len = 1000;
        assert_eq!(chunk_cost(&c), 1030);
    }
}
