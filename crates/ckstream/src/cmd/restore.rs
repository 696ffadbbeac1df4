//! `ckstream restore`: restore a process tree by serving an archive to `criu restore --stream`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ckstream_criu::serve::{serve, ServeOptions};
use ckstream_criu::{is_metadata_image, run, socket, IMAGES_PREFIX};
use ckstream_format::{ArchiveReader, EntryKind};

use crate::output::human_bytes;
use crate::workdir::WorkDir;

/// Decoder threads per image file when the archive is in an object store.
const REMOTE_DECODERS: usize = 6;

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
    /// Extra arguments for `criu restore` (after `--`), e.g. `-- --shell-job`.
    #[arg(last = true)]
    criu_args: Vec<String>,
}

/// Reads and verifies every CRIU metadata image (everything but pages), so a damaged
/// archive is refused before CRIU starts. Returns (files, bytes) checked.
pub fn verify_metadata(reader: &ArchiveReader) -> Result<(u64, u64)> {
    let prefix = format!("{IMAGES_PREFIX}/");
    let mut files = 0;
    let mut bytes = 0;
    let mut has_inventory = false;
    for (i, e) in reader.entries().iter().enumerate() {
        let Some(name) = e.path.strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        let name = String::from_utf8_lossy(name);
        has_inventory |= name == "inventory.img";
        if e.entry_kind() == EntryKind::File && is_metadata_image(&name) {
            for c in reader.chunks_of(i) {
                bytes += reader.read_chunk(e, c)?.len() as u64;
            }
            files += 1;
        }
    }
    if !has_inventory {
        bail!("the archive holds no CRIU checkpoint ({IMAGES_PREFIX}/inventory.img is missing)");
    }
    Ok((files, bytes))
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    crate::interrupt::install();
    let started = Instant::now();
    let reader = Arc::new(super::open(&args.archive)?);
    verify_metadata(&reader)
        .with_context(|| format!("refusing to restore from {}", args.archive))?;
    if args.verify_first {
        reader
            .verify(super::default_threads(), &|_| {})
            .with_context(|| format!("refusing to restore from {}", args.archive))?;
    }
    if let Some(target) = &args.rootfs {
        if reader.find(ckstream_fs::ROOTFS_PREFIX).is_none() {
            bail!("{} holds no rootfs diff", args.archive);
        }
        let opts = ckstream_fs::UnpackOptions {
            strip_prefix: Some(ckstream_fs::ROOTFS_PREFIX.to_vec()),
            overlay_apply: true,
            ..Default::default()
        };
        ckstream_fs::unpack(
            &reader,
            target,
            &[],
            &opts,
            &ckstream_fs::UnpackStats::default(),
        )
        .with_context(|| format!("applying the rootfs diff onto {}", target.display()))?;
    }
    let mut work = WorkDir::new(args.work_dir.clone(), "ckstream-restore")?;
    let listener = socket::bind(&work.path, socket::SERVE_SOCKET)?;
    let log = work.path.join("restore.log");
    adopt_orphans();
    let child = Arc::new(Mutex::new(run::spawn_restore(&work.path, &args.criu_args)?));
    let watch = {
        let child = child.clone();
        let log = log.clone();
        Box::new(move || -> ckstream_criu::Result<()> {
            match child.lock().unwrap().try_wait() {
                Ok(Some(status)) if !status.success() => {
                    Err(run::criu_failure("restore", status, &log))
                }
                _ => Ok(()),
            }
        })
    };
    // From an object store, each decoder thread has one ranged GET in flight: more of them
    // read further ahead, so download, decompression and CRIU overlap (memory stays
    // bounded at about three chunks per decoder and open image).
    let remote = args.archive.is_remote();
    if remote {
        // CRIU reads the page images front to back: fetch large spans ahead.
        for i in 0..reader.shard_count() {
            reader.shard(i).expect_sequential();
        }
    }
    let default_decoders = if remote {
        super::default_threads().max(REMOTE_DECODERS)
    } else {
        super::default_threads()
    };
    let opts = ServeOptions {
        decoders: args.threads.unwrap_or(default_decoders),
        watch: Some(watch),
        stop: crate::interrupt::requested,
        ..Default::default()
    };
    let served = serve(&listener, reader.clone(), opts);
    drop(listener);
    let status = {
        let mut c = child.lock().unwrap();
        if served.is_err() {
            // CRIU may be blocked reading a pipe we could not fill; it must not go on.
            let _ = c.kill();
        }
        run::wait_with_timeout(&mut c, std::time::Duration::from_secs(600))
            .context("waiting for criu")?
    };
    // CRIU that did not finish (killed by us above, or by anyone) may leave the tasks it
    // forked frozen in its restorer, waiting for it forever: they are ours now, and die.
    let killed = if status.success() { 0 } else { kill_adopted() };
    let killed_note = if killed > 0 {
        format!("; killed {killed} half-restored processes CRIU left behind")
    } else {
        String::new()
    };
    let report = match served {
        Ok(r) => r,
        Err(e) => {
            work.keep();
            return Err(anyhow::Error::new(e).context(format!(
                "restore failed (CRIU work dir kept: {}){killed_note}",
                work.path.display()
            )));
        }
    };
    if !status.success() {
        work.keep();
        return Err(
            anyhow::Error::new(run::criu_failure("restore", status, &log))
                .context(format!("restore failed{killed_note}")),
        );
    }
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

/// Makes this process the child subreaper of what CRIU forks, so that the restored
/// tasks come to us, not to init, if CRIU dies before it let them go.
fn adopt_orphans() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

/// After CRIU failed and was waited for, SIGKILLs and reaps every child left (tasks
/// CRIU forked and abandoned; their children come to us as their parents die).
/// Returns how many were killed.
fn kill_adopted() -> usize {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let mut killed = std::collections::BTreeSet::new();
    loop {
        // SAFETY: waitpid with a null status pointer only reaps.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        let children = own_children();
        if children.is_empty() || Instant::now() > deadline {
            return killed.len();
        }
        for pid in children {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.insert(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The children of every thread of this process (/proc/self/task/*/children).
fn own_children() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}
