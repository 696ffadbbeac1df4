//! `ckstream restore`: restore a process tree by serving an archive to `criu restore
//! --stream` ([`ckstream_criu::restore`] does the work).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;

use anyhow::{Context, Result};
use ckstream_criu::lazy::{restore_lazy, LazyReport};
use ckstream_criu::restore::{restore, RestoreOptions};

use crate::output::human_bytes;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Archive written by `ckstream dump` (or `capture`).
    archive: ckstream_store::ArchiveLocation,
    /// Apply the archive's rootfs diff onto TARGET (deletions, additions, directory
    /// metadata) before CRIU starts.
    #[arg(long, value_name = "TARGET")]
    rootfs: Option<PathBuf>,
    /// Check every chunk of the archive before CRIU starts (reads it twice).
    #[arg(long)]
    verify_first: bool,
    /// Directory for CRIU's socket and log (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Decoder threads per image file (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Post-copy: return as soon as the tree runs; its memory (private anonymous pages)
    /// follows from the archive, served by a background ckstream until every page is
    /// in (needs userfaultfd; without it, an ordinary restore).
    #[arg(long)]
    lazy: bool,
    /// With --lazy: return only once every page is in, and print both times.
    #[arg(long, requires = "lazy")]
    wait: bool,
    /// Extra arguments for `criu restore` (after `--`), e.g. `-- --shell-job`.
    #[arg(last = true)]
    criu_args: Vec<String>,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    if args.lazy {
        if let Ok(fd) = std::env::var(LAZY_WORKER_ENV) {
            return lazy_worker(args, &fd);
        }
        if ckstream_criu::lazy::userfaultfd_available() {
            return lazy_foreground(&args, quiet);
        }
        eprintln!(
            "ckstream: this kernel offers no userfaultfd to this user: restoring without --lazy"
        );
    }
    crate::interrupt::install();
    let started = Instant::now();
    let reader = Arc::new(super::open(&args.archive)?);
    let report = restore(
        reader,
        args.archive.is_remote(),
        &RestoreOptions {
            rootfs: args.rootfs.as_deref(),
            verify_first: args.verify_first,
            work_dir: args.work_dir.clone(),
            decoders: args.threads,
            criu_args: &args.criu_args,
            stop: crate::interrupt::stop(),
        },
    )
    .with_context(|| format!("restoring from {}", args.archive))?;
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "archive": args.archive.to_string(),
                "files_served": report.served,
                "files_missing": report.missing,
                "bytes": report.bytes,
                "seconds": secs,
                "rusage": crate::output::rusage_json(),
            })
        );
    } else if !quiet {
        eprintln!(
            "restored from {} ({} image files, {} streamed to CRIU) in {:.2}s",
            args.archive,
            report.served,
            human_bytes(report.bytes),
            secs
        );
    }
    Ok(())
}

/// Set in the background ckstream of a lazy restore: the fd it reports progress on.
const LAZY_WORKER_ENV: &str = "CKSTREAM_LAZY_REPORT_FD";

fn lazy_json(args: &Args, r: &LazyReport, complete: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "archive": args.archive.to_string(),
        "lazy": true,
        "files_served": r.serve.served,
        "bytes": r.serve.bytes,
        "lazy_bytes": r.lazy_bytes,
        "seconds_to_running": r.to_running.as_secs_f64(),
    });
    if complete {
        v["seconds_to_complete"] = r.to_complete.as_secs_f64().into();
        v["page_requests"] = r.page_requests.into();
        v["bytes_prefetched"] = r.bytes_prefetched.into();
        v["bytes_on_demand"] = r.bytes_on_demand.into();
    }
    v
}

/// The background half of `restore --lazy`: restores, tells the foreground when the
/// tree runs and when every page is in (one line each on the report fd), and serves
/// pages in between. Its exit code is the restore's.
fn lazy_worker(args: Args, fd: &str) -> Result<()> {
    crate::interrupt::install();
    let fd: i32 = fd.parse().context("bad report fd")?;
    // SAFETY: the foreground passed this descriptor (the write end of a pipe) to us
    // alone; nothing else in this process owns it.
    let mut report = unsafe { std::fs::File::from_raw_fd(fd) };
    let reader = Arc::new(super::open(&args.archive)?);
    let opts = RestoreOptions {
        rootfs: args.rootfs.as_deref(),
        verify_first: args.verify_first,
        work_dir: args.work_dir.clone(),
        decoders: args.threads,
        criu_args: &args.criu_args,
        stop: crate::interrupt::stop(),
    };
    let progress = report.try_clone()?;
    let mut on_running = |r: &LazyReport| {
        // The foreground may be gone already (it returns now without --wait).
        let _ = writeln!(report, "running {}", lazy_json(&args, r, false));
        if args.wait {
            // For the foreground's progress bar: bytes served, a line every 200 ms.
            let (served, mut out) = (r.bytes_served.clone(), progress.try_clone());
            std::thread::spawn(move || {
                while let Ok(out) = out.as_mut() {
                    let n = served.load(std::sync::atomic::Ordering::Relaxed);
                    if writeln!(out, "progress {n}").is_err() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            });
        }
    };
    let done = restore_lazy(reader, args.archive.is_remote(), &opts, &mut on_running)
        .with_context(|| format!("restoring lazily from {}", args.archive))?;
    let _ = writeln!(report, "done {}", lazy_json(&args, &done, true));
    Ok(())
}

/// The foreground half of `restore --lazy`: starts this binary again as the
/// background worker (in its own process group, so the terminal's signals and hangup
/// do not reach the page server once we are gone) and returns when the tree runs — or,
/// with --wait, when every page is in — with the worker's exit code if it failed.
fn lazy_foreground(args: &Args, quiet: bool) -> Result<()> {
    crate::interrupt::install();
    let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    rustix::io::fcntl_setfd(&write_end, rustix::io::FdFlags::empty())?;
    let mut worker = std::process::Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env(LAZY_WORKER_ENV, write_end.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the lazy restore's background ckstream")?;
    drop(write_end);
    let mut pipe = std::fs::File::from(read_end);
    let mut buf = Vec::new();
    let mut forwarded = false;
    let mut done = None;
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut bar = None;
    loop {
        if crate::interrupt::requested() && !forwarded {
            // Before the tree runs, an interrupt stops the restore (the worker kills
            // what CRIU started); afterwards the worker ignores it: pages must come.
            if let Some(p) = rustix::process::Pid::from_raw(worker.id() as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            }
            forwarded = true;
        }
        let mut fds = [rustix::event::PollFd::new(
            &pipe,
            rustix::event::PollFlags::IN,
        )];
        let slice = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        match rustix::event::poll(&mut fds, Some(&slice)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let mut chunk = [0u8; 4096];
        let n = match std::io::Read::read(&mut pipe, &mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..=end);
            let (event, json) = line.split_once(' ').unwrap_or((&line, "{}"));
            let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
            match event {
                "running" if !args.wait => {
                    print_lazy(args, &v, quiet, false);
                    return Ok(());
                }
                "running" => {
                    if !quiet && !args.json {
                        eprintln!(
                            "running after {:.2}s; pages follow from {}",
                            v["seconds_to_running"].as_f64().unwrap_or(0.0),
                            args.archive
                        );
                    }
                    let served = served.clone();
                    bar = Some(crate::progress::Bar::bytes(
                        "paging in",
                        v["lazy_bytes"].as_u64().unwrap_or(0),
                        quiet,
                        move || (served.load(std::sync::atomic::Ordering::Relaxed), 0),
                    ));
                }
                "progress" => {
                    if let Ok(n) = json.trim().parse() {
                        served.store(n, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                "done" => done = Some(v),
                _ => {}
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    // The worker printed its own error on our shared stderr; its exit code is ours.
    let status = worker.wait()?;
    match (status.code(), done) {
        (Some(0), Some(v)) => {
            print_lazy(args, &v, quiet, true);
            Ok(())
        }
        (code, _) => Err(crate::ExitWith(code.unwrap_or(1).clamp(1, 255) as u8).into()),
    }
}

fn print_lazy(args: &Args, v: &serde_json::Value, quiet: bool, complete: bool) {
    if args.json {
        println!("{v}");
    } else if !quiet {
        let secs = |k: &str| v[k].as_f64().unwrap_or(0.0);
        if complete {
            eprintln!(
                "restored lazily from {}: running after {:.2}s, every page in after {:.2}s ({} of memory: {} read ahead, {} on demand, {} requests)",
                args.archive,
                secs("seconds_to_running"),
                secs("seconds_to_complete"),
                human_bytes(v["lazy_bytes"].as_u64().unwrap_or(0)),
                human_bytes(v["bytes_prefetched"].as_u64().unwrap_or(0)),
                human_bytes(v["bytes_on_demand"].as_u64().unwrap_or(0)),
                v["page_requests"].as_u64().unwrap_or(0),
            );
        } else {
            eprintln!(
                "restored from {}: running after {:.2}s; {} of memory follows in the background",
                args.archive,
                secs("seconds_to_running"),
                human_bytes(v["lazy_bytes"].as_u64().unwrap_or(0)),
            );
        }
    }
}
