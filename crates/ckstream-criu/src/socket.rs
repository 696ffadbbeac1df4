//! The UNIX socket CRIU connects to, receiving pipe fds, pipe sizing and timeouts.
//! Waits poll in short slices and ask the caller's `stop` function between them (the
//! binary's SIGINT/SIGTERM flag), so an interrupt ends them within ~100 ms.

use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

use ckstream_format::Stop;

use crate::error::{CriuError, Result};

/// Socket name CRIU uses for `dump --stream`.
pub const CAPTURE_SOCKET: &str = "streamer-capture.sock";
/// Socket name CRIU uses for `restore --stream`.
pub const SERVE_SOCKET: &str = "streamer-serve.sock";

/// Fails with [`CriuError::Interrupted`] once `stop` says so.
///
/// # Errors
/// [`CriuError::Interrupted`].
pub fn check_stop(stop: Stop) -> Result<()> {
    if stop.requested() {
        Err(CriuError::Interrupted)
    } else {
        Ok(())
    }
}

/// Binds `dir/name`, replacing a stale socket file.
///
/// # Errors
/// I/O errors naming the path.
pub fn bind(dir: &Path, name: &str) -> Result<UnixListener> {
    fs::create_dir_all(dir).map_err(|e| CriuError::io(format!("creating {}", dir.display()), e))?;
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(CriuError::io(
                format!("removing stale {}", path.display()),
                e,
            ))
        }
    }
    UnixListener::bind(&path).map_err(|e| CriuError::io(format!("binding {}", path.display()), e))
}

/// Waits until `fd` is readable, up to `timeout`, checking `stop` every 100 ms.
///
/// # Errors
/// [`CriuError::Timeout`] naming `what`, [`CriuError::Interrupted`], poll errors.
pub fn wait_readable(fd: impl AsFd, timeout: Duration, what: &str, stop: Stop) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        check_stop(stop)?;
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let slice = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        match poll(&mut fds, Some(&slice)) {
            Ok(0) => {}
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(CriuError::io(format!("waiting for {what}"), e)),
        }
        if Instant::now() >= deadline {
            return Err(CriuError::Timeout(format!(
                "{what} (after {}s)",
                timeout.as_secs()
            )));
        }
    }
}

/// Accepts one connection within `timeout`.
///
/// # Errors
/// [`CriuError::Timeout`] when CRIU never connects; [`CriuError::Interrupted`]; I/O
/// errors.
pub fn accept(listener: &UnixListener, timeout: Duration, stop: Stop) -> Result<UnixStream> {
    wait_readable(
        listener,
        timeout,
        "CRIU to connect to the streamer socket",
        stop,
    )?;
    let (s, _) = listener
        .accept()
        .map_err(|e| CriuError::io("accepting CRIU's connection", e))?;
    Ok(s)
}

/// Accepts one connection within `timeout`, calling `watch` every 200 ms so a CRIU
/// that exits before connecting is noticed at once.
///
/// # Errors
/// [`CriuError::Timeout`], the error of `watch`, I/O errors.
pub fn accept_watched<W: FnMut() -> Result<()> + ?Sized>(
    listener: &UnixListener,
    timeout: Duration,
    watch: &mut Option<Box<W>>,
    stop: Stop,
) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match wait_readable(
            listener,
            Duration::from_millis(200),
            "CRIU to connect",
            stop,
        ) {
            Ok(()) => break,
            Err(CriuError::Timeout(_)) => {
                if let Some(w) = watch.as_mut() {
                    w()?;
                }
                if Instant::now() >= deadline {
                    return Err(CriuError::Timeout(format!(
                        "CRIU did not connect to the streamer socket within {}s",
                        timeout.as_secs()
                    )));
                }
            }
            Err(e) => return Err(e),
        }
    }
    let (s, _) = listener
        .accept()
        .map_err(|e| CriuError::io("accepting CRIU's connection", e))?;
    Ok(s)
}

/// Receives the one fd CRIU attaches to a 1-byte message.
///
/// # Errors
/// [`CriuError::Protocol`] when no fd arrives.
pub fn recv_fd(stream: &UnixStream) -> Result<OwnedFd> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let msg = loop {
        match recvmsg(
            stream,
            &mut [io::IoSliceMut::new(&mut byte)],
            &mut cmsg,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r.map_err(|e| CriuError::io("receiving a pipe from CRIU", e))?,
        }
    };
    if msg.bytes == 0 {
        return Err(CriuError::Protocol(
            "CRIU closed the socket instead of sending a pipe".into(),
        ));
    }
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = m {
            if let Some(fd) = fds.next() {
                let st = rustix::fs::fstat(&fd)
                    .map_err(|e| CriuError::io("inspecting CRIU's pipe", e))?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Fifo {
                    return Err(CriuError::Protocol(
                        "CRIU sent an fd that is not a pipe".into(),
                    ));
                }
                return Ok(fd);
            }
        }
    }
    Err(CriuError::Protocol(
        "no pipe attached to CRIU's message".into(),
    ))
}

pub use ckstream_store::pipe::enlarge_pipe;
