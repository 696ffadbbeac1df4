//! `ckstream dump`: checkpoint a live process tree straight into an archive
//! ([`ckstream_criu::dump`] does the work).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ckstream_criu::dump::{dump, DumpOptions};
use ckstream_format::{Compression, WriterOptions};
use ckstream_store::ArchiveLocation;

use crate::output::human_bytes;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Root of the process tree to checkpoint.
    #[arg(long, short = 't', visible_alias = "tree")]
    pid: u32,
    /// Archive to write (`-` for stdout, `s3://BUCKET/KEY`).
    #[arg(short, long)]
    output: ArchiveLocation,
    /// Keep the process running after the checkpoint.
    #[arg(long)]
    leave_running: bool,
    /// none, lz4, zstd or zstd:LEVEL.
    #[arg(short, long, default_value = "zstd:1")]
    compress: Compression,
    /// Number of shard files.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    shards: u32,
    /// A container's overlayfs upper dir, stored under `rootfs/` while the process tree
    /// is frozen (after CRIU wrote the images, before the process is killed or resumed).
    /// Metacopy files and renamed (redirected) directories are read through the
    /// overlay's merged mount (found in /proc/self/mountinfo, or --rootfs-merged); without
    /// one, an upper dir holding them is refused before CRIU starts.
    #[arg(long, value_name = "UPPER")]
    rootfs_diff: Option<PathBuf>,
    /// The merged mount of the overlay whose upper dir is --rootfs-diff (default: found
    /// by its upperdir= in /proc/self/mountinfo).
    #[arg(long, value_name = "DIR", requires = "rootfs_diff")]
    rootfs_merged: Option<PathBuf>,
    /// Also store NAME=PATH (or PATH) in the archive.
    #[arg(long = "include")]
    include: Vec<OsString>,
    /// Directory for CRIU's socket and log (default: a new temporary directory, removed on success).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// With --leave-running: where CRIU writes its images before they are packed, while
    /// the process runs again (default: beside the archive, so they can be reflinked
    /// into it; removed afterwards).
    #[arg(long, value_name = "DIR", requires = "leave_running")]
    spool_dir: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Extra arguments for `criu dump` (after `--`), e.g. `-- --shell-job --tcp-established`.
    #[arg(last = true)]
    criu_args: Vec<String>,
    #[command(flatten)]
    keys: super::key::WriteKeyArgs,
    #[command(flatten)]
    parent: super::ParentArgs,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let compression = args.compress;
    if args.json && args.output.is_stream() {
        bail!("--json cannot be used when the archive goes to stdout");
    }
    let keys = args.keys.load()?;
    let parents = args.parent.load(&args.output, quiet)?;
    crate::interrupt::install();
    let started = Instant::now();
    // Checked before anything else, so that a diff which cannot be stored is refused
    // before CRIU freezes the process tree. It is walked while the tree is frozen.
    let rootfs = match &args.rootfs_diff {
        Some(upper) => Some(
            ckstream_fs::prepare_rootfs_diff(upper, args.rootfs_merged.as_deref())
                .context("refusing --rootfs-diff before checkpointing (CRIU was not started)")?,
        ),
        None => None,
    };
    let includes = args
        .include
        .iter()
        .map(|a| ckstream_fs::parse_input(a))
        .collect::<Result<Vec<_>, _>>()?;
    let done = dump(DumpOptions {
        pid: args.pid,
        output: &args.output,
        shards: args.shards,
        writer: WriterOptions {
            compression,
            keys,
            parents,
            ..Default::default()
        },
        leave_running: args.leave_running,
        includes,
        rootfs,
        work_dir: args.work_dir.clone(),
        spool_dir: args.spool_dir.clone(),
        criu_args: &args.criu_args,
        stop: crate::interrupt::stop(),
    })?;
    let secs = started.elapsed().as_secs_f64();
    let archive_bytes: u64 = done.summary.shard_sizes.iter().sum();
    let stats = done.criu_stats.as_ref();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "archive": args.output.to_string(),
                "pid": args.pid,
                "images": done.capture.images,
                "image_bytes": done.capture.bytes,
                "archive_bytes": archive_bytes,
                "raw_bytes": done.summary.raw_bytes,
                "referenced_bytes": done.summary.referenced_bytes,
                "compression": compression.to_string(),
                "pipe_size": done.capture.pipe_size,
                "seconds": secs,
                "seconds_since_freeze": done.since_first_image.as_secs_f64(),
                "freeze_seconds": stats.map(|s| s.freeze_seconds()),
                "criu_stats": stats.map(|s| serde_json::json!({
                    "freezing_us": s.freezing_time,
                    "frozen_us": s.frozen_time,
                    "memdump_us": s.memdump_time,
                    "memwrite_us": s.memwrite_time,
                    "pages_scanned": s.pages_scanned,
                    "pages_written": s.pages_written,
                })),
                "rusage": crate::output::rusage_json(),
            })
        );
    } else if !quiet {
        let freeze = stats.map_or_else(String::new, |s| {
            format!(", frozen {:.2}s", s.freeze_seconds())
        });
        eprintln!(
            "checkpointed pid {} ({} images, {}) into {} ({}, {}) in {:.2}s{freeze}{}",
            args.pid,
            done.capture.images,
            human_bytes(done.capture.bytes),
            args.output,
            human_bytes(archive_bytes),
            compression,
            secs,
            if args.leave_running {
                ", process left running"
            } else {
                ""
            }
        );
    }
    Ok(())
}
