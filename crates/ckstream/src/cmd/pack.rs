//! `ckstream pack`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::time::Instant;

use anyhow::Result;
use ckstream_format::{Compression, Progress, WriterOptions};
use ckstream_store::{ArchiveLocation, ArchiveSpec};

use crate::output::human_bytes;
use crate::progress::Bar;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Archive to write (`-` for stdout, `s3://BUCKET/KEY`). Shards beyond the first go
    /// beside it, named by the archive id.
    #[arg(short, long)]
    output: ArchiveLocation,
    /// none, lz4, zstd or zstd:LEVEL.
    #[arg(short, long, default_value = "zstd:1")]
    compress: Compression,
    /// Number of shard files to spread the archive over (1..=256).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    shards: u32,
    /// Worker threads for hashing and compression (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Chunk size in KiB (64..=16384).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(64..=16384))]
    chunk_kib: u32,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// An overlayfs upper directory (a container's rootfs changes), stored under `rootfs/`
    /// exactly as it is: whiteouts, opaque directories, metadata, holes.
    /// Metacopy files and renamed (redirected) directories are read through the
    /// overlay's merged mount, found in /proc/self/mountinfo or given by --rootfs-merged.
    #[arg(long, value_name = "UPPER")]
    rootfs_diff: Option<std::path::PathBuf>,
    /// The merged mount of the overlay whose upper dir is --rootfs-diff (default: found
    /// by its upperdir= in /proc/self/mountinfo).
    #[arg(long, value_name = "DIR", requires = "rootfs_diff")]
    rootfs_merged: Option<std::path::PathBuf>,
    /// An archive path (as `ls` shows it) that `ckstream mount` prefetches as soon as it
    /// mounts the archive; repeat for more, in priority order. A directory stands for every
    /// file below it.
    #[arg(long = "hot", value_name = "ARCHIVE_PATH")]
    hot: Vec<OsString>,
    /// PATH (stored under its name) or NAME=PATH (stored under NAME; `.=DIR` stores DIR's contents at the root).
    #[arg(required_unless_present = "rootfs_diff")]
    inputs: Vec<OsString>,
    #[command(flatten)]
    keys: super::key::WriteKeyArgs,
    #[command(flatten)]
    parent: super::ParentArgs,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let compression = args.compress;
    // SIGINT/SIGTERM stop the pack cleanly: temporary shards are removed, nothing is published.
    crate::interrupt::install();
    if args.json && args.output.is_stream() {
        anyhow::bail!("--json cannot be used when the archive goes to stdout");
    }
    let mut inputs = args
        .inputs
        .iter()
        .map(|a| ckstream_fs::parse_input(a))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(upper) = &args.rootfs_diff {
        inputs.push(ckstream_fs::prepare_rootfs_diff(
            upper,
            args.rootfs_merged.as_deref(),
        )?);
    }
    let keys = args.keys.load()?;
    let parents = args.parent.load(&args.output, quiet)?;
    let started = Instant::now();
    let plan = ckstream_fs::plan_inputs(&inputs)?;
    let total = plan.total_bytes;
    let hot: Vec<Vec<u8>> = args
        .hot
        .iter()
        .map(|p| {
            let p = p.as_bytes();
            p.strip_prefix(b"/").unwrap_or(p).to_vec()
        })
        .collect();
    let progress = Progress::new();
    let bar = Bar::bytes("pack", total, quiet, {
        let progress = progress.clone();
        move || (progress.done(), 0)
    });
    let spec = ArchiveSpec {
        shards: args.shards,
        writer: WriterOptions {
            compression,
            chunk_size: args.chunk_kib * 1024,
            threads: args.threads.unwrap_or_else(super::default_threads),
            progress,
            keys,
            parents,
            ..Default::default()
        },
        command: "pack",
        writeback: Default::default(),
    };
    let stop = crate::interrupt::stop();
    let summary = args.output.write(&spec, |writer| {
        writer.set_hot_paths(hot);
        ckstream_fs::pack_inputs(writer, plan, stop).map(|_| ())
    });
    bar.finish();
    let summary = summary.map_err(|e| {
        let outcome = if ckstream_store::may_be_in_place(&e) {
            // Publishing failed after the rename (or an unanswered S3 completion).
            "the new archive may be in place under that name"
        } else {
            "no archive was written"
        };
        anyhow::Error::new(e).context(format!("packing {} failed; {outcome}", args.output))
    })?;
    let secs = started.elapsed().as_secs_f64();
    let archive_bytes: u64 = summary.shard_sizes.iter().sum();
    let ratio = if archive_bytes > 0 {
        summary.logical_bytes as f64 / archive_bytes as f64
    } else {
        0.0
    };
    if args.json {
        let v = serde_json::json!({
            "archive": args.output.to_string(),
            "archive_id": crate::output::hex(&summary.archive_id),
            "entries": summary.entries,
            "chunks": summary.chunks,
            "logical_bytes": summary.logical_bytes,
            "raw_bytes": summary.raw_bytes,
            "stored_bytes": summary.stored_bytes,
            "archive_bytes": archive_bytes,
            "cloned_bytes": summary.cloned_bytes,
            "referenced_bytes": summary.referenced_bytes,
            "index_bytes": summary.index_bytes,
            "shard_bytes": summary.shard_sizes,
            "compression": compression.to_string(),
            "ratio": ratio,
            "seconds": secs,
        });
        println!("{v}");
    } else if !quiet {
        eprintln!(
            "packed {} entries, {} of data into {} ({}, {} shard{}, ratio {:.2}, {} reflinked) in {:.2}s",
            summary.entries,
            human_bytes(summary.logical_bytes),
            human_bytes(archive_bytes),
            compression,
            summary.shard_sizes.len(),
            if summary.shard_sizes.len() == 1 { "" } else { "s" },
            ratio,
            human_bytes(summary.cloned_bytes),
            secs
        );
    }
    Ok(())
}
