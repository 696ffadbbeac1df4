//! Pipes: sizing them, and moving bytes out of them with `splice`, which passes page
//! references instead of copying bytes.

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};

static PIPE_WARNED: AtomicBool = AtomicBool::new(false);

/// Largest pipe size an unprivileged process may set (`/proc/sys/fs/pipe-max-size`).
pub fn pipe_max_size() -> usize {
    fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// Enlarges a pipe towards `want` bytes (F_SETPIPE_SZ). Without CAP_SYS_RESOURCE the
/// kernel caps it at `pipe-max-size`; says so once, on stderr. Returns the size achieved.
pub fn enlarge_pipe(fd: impl AsFd, want: usize) -> usize {
    let fd = fd.as_fd();
    let current = rustix::pipe::fcntl_getpipe_size(fd).unwrap_or(65536);
    if current >= want {
        return current;
    }
    if let Ok(n) = rustix::pipe::fcntl_setpipe_size(fd, want) {
        return n;
    }
    let cap = pipe_max_size();
    let got = if cap > current {
        rustix::pipe::fcntl_setpipe_size(fd, cap).unwrap_or(current)
    } else {
        current
    };
    if !PIPE_WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "ckstream: warning: pipes limited to {} KiB (wanted {} KiB): no CAP_SYS_RESOURCE and fs.pipe-max-size is {} KiB; raise it for faster streaming",
            got >> 10,
            want >> 10,
            cap >> 10
        );
    }
    got
}

/// True when `fd` is a pipe (or FIFO).
pub fn is_pipe(fd: impl AsFd) -> bool {
    rustix::fs::fstat(fd)
        .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo)
        .unwrap_or(false)
}

/// A new pipe of at least `size` bytes (both ends close-on-exec), or `None` when the
/// kernel will not make one that large.
///
/// # Errors
/// The error of `pipe2`.
pub fn sized_pipe(size: usize) -> io::Result<Option<(OwnedFd, OwnedFd)>> {
    let (r, w) = pipe_with(PipeFlags::CLOEXEC)?;
    let got = match rustix::pipe::fcntl_setpipe_size(&w, size) {
        Ok(n) => n,
        Err(_) => return Ok(None),
    };
    Ok((got >= size).then_some((r, w)))
}

/// Moves exactly `len` bytes from the pipe `from` to `to` (a pipe, file or socket),
/// waiting for `to` when it is full. `from` must already hold them.
///
/// # Errors
/// The splice error; `UnexpectedEof` when `from` runs dry first.
pub fn splice_exact(from: BorrowedFd<'_>, to: BorrowedFd<'_>, mut len: usize) -> io::Result<()> {
    while len > 0 {
        match splice(
            from,
            None,
            to,
            None,
            len,
            SpliceFlags::MOVE | SpliceFlags::MORE,
        ) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "pipe ran dry before the chunk was moved",
                ))
            }
            Ok(n) => len -= n,
            Err(rustix::io::Errno::INTR) => {}
            // A non-blocking `to` that is full: wait until it has room.
            Err(rustix::io::Errno::AGAIN) => {
                let mut fds = [PollFd::new(&to, PollFlags::OUT)];
                let tick = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                match poll(&mut fds, Some(&tick)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn splice_exact_moves_exactly_and_notices_a_dry_pipe() {
        let (src_r, src_w) = sized_pipe(1 << 16).unwrap().unwrap();
        let (dst_r, dst_w) = sized_pipe(1 << 16).unwrap().unwrap();
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
        fs::File::from(src_w).write_all(&data).unwrap();
        splice_exact(src_r.as_fd(), dst_w.as_fd(), 30_000).unwrap();
        drop(dst_w);
        let mut moved = Vec::new();
        fs::File::from(dst_r).read_to_end(&mut moved).unwrap();
        assert_eq!(moved, data[..30_000]);
        let (_sink_r, sink_w) = sized_pipe(1 << 16).unwrap().unwrap();
        let err = splice_exact(src_r.as_fd(), sink_w.as_fd(), 20_000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn recognises_pipes() {
        let (r, _w) = sized_pipe(4096).unwrap().unwrap();
        assert!(is_pipe(&r));
        let f = tempfile::tempfile().unwrap();
        assert!(!is_pipe(&f));
    }
}
