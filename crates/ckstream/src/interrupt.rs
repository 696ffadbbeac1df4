//! SIGINT/SIGTERM as a flag the commands poll, so that an interrupted command stops
//! cleanly — archive left uncommitted and its temporary shards or uploads removed,
//! half-written files deleted, CRIU left to resume the process, a podman container
//! restored in place — instead of dying wherever the signal found it.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set the flag instead of killing the process. Blocking
/// calls they interrupt return EINTR (no SA_RESTART), so waits notice at once.
pub fn install() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

/// True once SIGINT or SIGTERM has arrived (after [`install`]).
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The flag as the libraries' [`Stop`](ckstream_format::Stop).
pub fn stop() -> ckstream_format::Stop {
    ckstream_format::Stop::new(requested)
}
