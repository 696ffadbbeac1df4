//! `ckstream mount --background`: the mount server runs detached in its own session,
//! and the command returns once it reports the mount ready (or exits with its code).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::Args;

/// Points stdout and stderr at `log` (appending) or at /dev/null.
pub(super) fn release_stdio(log: Option<&std::path::Path>) -> Result<()> {
    let target = match log {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .with_context(|| format!("opening the log {}", path.display()))?,
        None => std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .context("opening /dev/null")?,
    };
    for fd in [1, 2] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(target.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("redirecting output");
        }
    }
    Ok(())
}

/// Starts `ckstream mount` again without `--background`, detached in its own session,
/// and waits until it reports the mount ready or exits.
pub(super) fn run_in_background(args: &Args, quiet: bool) -> Result<()> {
    let (ready_rx, ready_tx) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("creating a pipe")?;
    let exe = std::env::current_exe().context("finding the ckstream binary")?;
    let mut cmd = Command::new(exe);
    if quiet {
        cmd.arg("-q");
    }
    cmd.arg("mount")
        .arg(args.archive.to_string())
        .arg(&args.mountpoint)
        .arg(format!("--cache-size={}", args.cache_size))
        .arg(format!("--readahead={}", args.readahead))
        .arg(format!("--fetch-threads={}", args.fetch_threads))
        .arg(format!("--ready-fd={}", ready_tx.as_raw_fd()));
    if args.no_prefetch {
        cmd.arg("--no-prefetch");
    }
    if args.allow_other {
        cmd.arg("--allow-other");
    }
    if args.json {
        cmd.arg("--json");
    }
    if let Some(log) = &args.log {
        // Absolute, since the server may outlive the caller's working directory.
        let log = std::path::absolute(log).context("the --log path")?;
        cmd.arg("--log-to").arg(log);
    }
    cmd.stdin(std::process::Stdio::null());
    let ready_fd = ready_tx.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls: setsid and fcntl.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            // Its own session: the terminal's Ctrl-C and hangup no longer reach it.
            libc::setsid();
            // Keep the readiness pipe open across exec (it was created close-on-exec so
            // no other child inherits it).
            if libc::fcntl(ready_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the background mount")?;
    drop(ready_tx);
    let mut byte = [0u8; 1];
    let mut rx = std::fs::File::from(ready_rx);
    let got = loop {
        match rx.read(&mut byte) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("waiting for the background mount"),
        }
    };
    if got == 1 {
        if !quiet {
            eprintln!(
                "mounted {} at {} in the background (pid {}); `umount {}` to unmount",
                args.archive,
                args.mountpoint.display(),
                child.id(),
                args.mountpoint.display()
            );
        }
        return Ok(());
    }
    // The child exited (or closed the pipe) without mounting: its error is already on
    // stderr; pass its exit code on.
    let status = child.wait().context("waiting for the background mount")?;
    match status.code() {
        Some(code) => std::process::exit(code),
        None => bail!("the background mount was killed ({status})"),
    }
}
