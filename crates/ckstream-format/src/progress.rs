//! The two conventions every long library operation follows, whatever crate it is in:
//! it counts its work in a [`Progress`] the caller handed it, and it polls a [`Stop`]
//! the caller handed it. Libraries never draw progress and never install signal
//! handlers; the binary polls the counters for its bars and turns SIGINT/SIGTERM into
//! a `Stop`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Bytes of work done and expected, shared between an operation (which adds to it)
/// and whoever shows progress (which polls it). Cloning shares the counters.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// Fresh counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `n` more bytes done.
    pub fn add(&self, n: u64) {
        self.0.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets how many bytes the whole operation is expected to take.
    pub fn set_total(&self, n: u64) {
        self.0.total.store(n, Ordering::Relaxed);
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.0.done.load(Ordering::Relaxed)
    }

    /// Bytes expected (0 when unknown).
    pub fn total(&self) -> u64 {
        self.0.total.load(Ordering::Relaxed)
    }
}

/// Whether the caller wants an operation to stop (the binary: SIGINT or SIGTERM
/// arrived). An operation that sees it stops cleanly: nothing half-done is published.
#[derive(Debug, Clone, Copy)]
pub struct Stop(fn() -> bool);

impl Stop {
    /// Never asks to stop.
    pub const NEVER: Stop = Stop(|| false);

    /// Stops once `requested` returns true.
    pub const fn new(requested: fn() -> bool) -> Self {
        Stop(requested)
    }

    /// True once a stop was requested.
    pub fn requested(&self) -> bool {
        (self.0)()
    }

    /// Fails with an "interrupted" error once a stop was requested.
    ///
    /// # Errors
    /// [`Error::interrupted`] naming `doing`.
    pub fn check(&self, doing: &str) -> Result<()> {
        if self.requested() {
            Err(Error::interrupted(doing))
        } else {
            Ok(())
        }
    }
}

impl Default for Stop {
    fn default() -> Self {
        Stop::NEVER
    }
}
