//! `ckstream unpack`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use ckstream_fs::{UnpackOptions, UnpackStats};

use crate::output::human_bytes;
use crate::progress::Bar;

/// Worker threads when the archive is in an object store.
const REMOTE_THREADS: usize = 8;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Archive to read.
    archive: ckstream_store::ArchiveLocation,
    /// Directory to extract into (created if missing).
    #[arg(
        short = 'C',
        long = "directory",
        default_value = ".",
        conflicts_with = "rootfs_diff"
    )]
    directory: PathBuf,
    /// Apply the archive's rootfs diff (`rootfs/`, an overlayfs upper dir) onto TARGET:
    /// deletions first, then additions, then directory metadata.
    #[arg(long, value_name = "TARGET")]
    rootfs_diff: Option<PathBuf>,
    /// Do not restore file owners (the default when not root).
    #[arg(long)]
    no_same_owner: bool,
    /// Always copy data, never share extents with the archive.
    #[arg(long)]
    no_reflink: bool,
    /// Worker threads (default: all cores; at least 8 for an archive in an object store).
    #[arg(long)]
    threads: Option<usize>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Only these archive paths (and what is below them).
    paths: Vec<OsString>,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    crate::interrupt::install();
    let started = Instant::now();
    let reader = super::open(&args.archive)?;
    let mut opts = UnpackOptions {
        stop: crate::interrupt::stop(),
        ..UnpackOptions::default()
    };
    opts.same_owner &= !args.no_same_owner;
    opts.reflink = !args.no_reflink;
    if let Some(t) = args.threads {
        opts.threads = t.max(1);
    } else if args.archive.is_remote() {
        // Each worker has one ranged GET in flight: more workers hide the latency.
        opts.threads = opts.threads.max(REMOTE_THREADS);
    }
    let directory = match &args.rootfs_diff {
        Some(target) => {
            if reader.find(ckstream_fs::ROOTFS_PREFIX).is_none() {
                anyhow::bail!("{} holds no rootfs diff", args.archive);
            }
            opts.strip_prefix = Some(ckstream_fs::ROOTFS_PREFIX.to_vec());
            opts.overlay_apply = true;
            target.clone()
        }
        None => args.directory.clone(),
    };
    let selection: Vec<Vec<u8>> = args
        .paths
        .iter()
        .map(|p| {
            p.as_bytes()
                .trim_ascii_end()
                .strip_suffix(b"/")
                .unwrap_or(p.as_bytes())
                .to_vec()
        })
        .collect();
    let total: u64 = reader.index().chunks.iter().map(|c| c.raw_len as u64).sum();
    let stats = Arc::new(UnpackStats::default());
    let progress = {
        let stats = stats.clone();
        Bar::bytes("unpack", total, quiet, move || {
            (stats.bytes.load(Ordering::Relaxed), 0)
        })
    };
    let result = ckstream_fs::unpack(&reader, &directory, &selection, &opts, &stats);
    progress.finish();
    result.with_context(|| format!("unpacking {} into {}", args.archive, directory.display()))?;
    let secs = started.elapsed().as_secs_f64();
    let bytes = stats.bytes.load(Ordering::Relaxed);
    let cloned = stats.cloned_bytes.load(Ordering::Relaxed);
    let kcopied = stats.kernel_copied_bytes.load(Ordering::Relaxed);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "entries": stats.entries.load(Ordering::Relaxed),
                "files": stats.files.load(Ordering::Relaxed),
                "bytes": bytes,
                "cloned_bytes": cloned,
                "kernel_copied_bytes": kcopied,
                "seconds": secs,
            })
        );
    } else if !quiet {
        eprintln!(
            "unpacked {} entries, {} verified ({} reflinked, {} copied in kernel) into {} in {:.2}s",
            stats.entries.load(Ordering::Relaxed),
            human_bytes(bytes),
            human_bytes(cloned),
            human_bytes(kcopied),
            directory.display(),
            secs
        );
    }
    Ok(())
}
