//! `ckstream mount`: a lazy, read-only FUSE view of an archive.
//!
//! Runs in the foreground until `umount MOUNTPOINT` (or `fusermount3 -u`), Ctrl-C,
//! SIGTERM or SIGHUP; each of those unmounts and exits 0. `--background` starts the same
//! command detached and returns once the mount is ready (or with the child's exit code
//! when it fails).

mod background;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::Result;
use ckstream_fs::mount::{MountOptions, MountStats, Unmounted};

use crate::output::human_bytes;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive (its first shard; the others are found next to it).
    archive: ckstream_store::ArchiveLocation,
    /// An existing directory to mount it on.
    mountpoint: PathBuf,
    /// Memory for decoded chunks, e.g. 256M, 2G, 65536.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    cache_size: u64,
    /// Chunks to fetch ahead of a sequential reader (0: none).
    #[arg(long, default_value_t = 4)]
    readahead: usize,
    /// Threads fetching read-ahead and hot-list chunks in the background.
    #[arg(long, default_value_t = 2)]
    fetch_threads: usize,
    /// Do not prefetch the archive's hot list.
    #[arg(long)]
    no_prefetch: bool,
    /// Let users other than the one mounting read the files (`allow_other`).
    #[arg(long)]
    allow_other: bool,
    /// Return once the mount is ready and keep serving it from a detached process.
    #[arg(long)]
    background: bool,
    /// Print the mount's counters as JSON on stdout when it ends.
    #[arg(long)]
    json: bool,
    /// With --background: append messages (read errors, the final summary) to this
    /// file; without it they are discarded once the mount is up, as the caller's
    /// terminal or pipe is released.
    #[arg(long, value_name = "FILE", requires = "background")]
    log: Option<PathBuf>,
    /// Internal (--background): file descriptor to write one byte to once mounted.
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,
    /// Internal (--background): where --log pointed.
    #[arg(long, hide = true)]
    log_to: Option<PathBuf>,
}

/// Parses `256M`, `2G`, `512KiB`, `65536` into bytes (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256M, 2G or 65536"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and every thread started after,
/// so they queue up for [`wait_for_signal`] instead of interrupting fetches.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `ms` for one of the blocked signals; returns it.
fn wait_for_signal(set: &libc::sigset_t, ms: i64) -> Option<i32> {
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: ms * 1_000_000,
    };
    // SAFETY: `set` is initialised; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (sig > 0).then_some(sig)
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    if args.background {
        return background::run_in_background(&args, quiet);
    }
    let signals = block_stop_signals();
    let reader = super::open(&args.archive)?;
    let opts = MountOptions {
        cache_bytes: args.cache_size,
        readahead_chunks: args.readahead,
        fetch_threads: args.fetch_threads.max(1),
        allow_other: args.allow_other,
        prefetch_hot: !args.no_prefetch,
        fs_name: format!("ckstream:{}", args.archive),
        ..Default::default()
    };
    let mounted = ckstream_fs::mount::mount(reader, &args.mountpoint, &opts)?;
    if let Some(fd) = args.ready_fd {
        // Let go of the caller's stdout and stderr before saying we are ready, so a
        // caller that reads them to the end (a shell's $(...), a test) is not kept
        // waiting for as long as the mount lives.
        background::release_stdio(args.log_to.as_deref())?;
        // SAFETY: the parent passed us this descriptor for exactly this purpose and
        // nothing else in this process uses it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = rustix::io::write(&fd, b"R");
    }
    let mp = args.mountpoint.display().to_string();
    if !quiet {
        if args.ready_fd.is_none() {
            // (In the background, the parent says where and how.)
            eprintln!(
                "mounted {} at {mp} (read-only); `umount {mp}` or Ctrl-C to unmount",
                args.archive
            );
        }
        let hot = mounted.hot_prefetch();
        if hot.files > 0 {
            eprintln!(
                "prefetching the hot list: {} files, {} chunks, {}",
                hot.files,
                hot.chunks,
                human_bytes(hot.bytes)
            );
        }
    }
    let (how, stats) = loop {
        if let Some(sig) = wait_for_signal(&signals, 200) {
            if !quiet {
                eprintln!("signal {sig}: unmounting {mp}");
            }
            break mounted.unmount()?;
        }
        if mounted.is_finished() {
            break (Unmounted::Clean, mounted.wait()?);
        }
    };
    if how == Unmounted::Detached {
        eprintln!(
            "ckstream: warning: {mp} was busy; it is detached and disappears when its last user goes (reads still in flight fail)"
        );
    }
    report(&args, &stats, quiet);
    Ok(())
}

fn report(args: &Args, stats: &MountStats, quiet: bool) {
    if args.json {
        let mut v: serde_json::Value =
            serde_json::from_str(&stats.to_json()).expect("counters are JSON");
        v["archive"] = args.archive.to_string().into();
        v["mountpoint"] = args.mountpoint.display().to_string().into();
        v["rusage"] = crate::output::rusage_json();
        println!("{v}");
    } else if !quiet {
        eprintln!(
            "unmounted {}: fetched {} from the archive in {} reads; cache {} hits, {} misses; {} read errors",
            args.mountpoint.display(),
            human_bytes(stats.fetched_bytes),
            stats.fetches,
            stats.cache.hits,
            stats.cache.misses,
            stats.read_errors
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
