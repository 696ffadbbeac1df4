//! `ckstream pack`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result};
use ckstream_format::{ArchiveWriter, Compression, WriterOptions};
use ckstream_store::{ArchiveLocation, ArchiveSpec};

use crate::output::human_bytes;
use crate::progress::Progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Archive to write (`-` for stdout, `s3://BUCKET/KEY`). Shards beyond the first go
    /// beside it, named by the archive id.
    #[arg(short, long)]
    output: ArchiveLocation,
    /// none, lz4, zstd or zstd:LEVEL.
    #[arg(short, long, default_value = "zstd:1")]
    compress: String,
    /// Number of shard files to spread the archive over.
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Worker threads for hashing and compression (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Chunk size in KiB (64..=16384).
    #[arg(long, default_value_t = 1024)]
    chunk_kib: u32,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// An overlayfs upper directory (a container's rootfs changes), stored under `rootfs/`
    /// exactly as it is: whiteouts, opaque directories, metadata, holes.
    #[arg(long, value_name = "UPPER")]
    rootfs_diff: Option<std::path::PathBuf>,
    /// An archive path (as `ls` shows it) that `ckstream mount` prefetches as soon as it
    /// mounts the archive; repeat for more, in priority order. A directory stands for every
    /// file below it.
    #[arg(long = "hot", value_name = "ARCHIVE_PATH")]
    hot: Vec<OsString>,
    /// PATH (stored under its name) or NAME=PATH (stored under NAME; `.=DIR` stores DIR's contents at the root).
    #[arg(required_unless_present = "rootfs_diff")]
    inputs: Vec<OsString>,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let compression: Compression = args.compress.parse()?;
    // SIGINT/SIGTERM stop the pack cleanly: temporary shards are removed, nothing is published.
    crate::interrupt::install();
    if !(64..=16384).contains(&args.chunk_kib) {
        anyhow::bail!("--chunk-kib must be between 64 and 16384");
    }
    if args.shards == 0 || args.shards > 256 {
        anyhow::bail!("--shards must be between 1 and 256");
    }
    if args.json && args.output.is_stream() {
        anyhow::bail!("--json cannot be used when the archive goes to stdout");
    }
    let mut inputs = args
        .inputs
        .iter()
        .map(|a| ckstream_fs::parse_input(a))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(upper) = &args.rootfs_diff {
        inputs.push(ckstream_fs::rootfs_diff_input(upper)?);
    }
    let started = Instant::now();
    let plan = ckstream_fs::plan_inputs(&inputs)?;
    let total = plan.total_bytes;
    let opts = WriterOptions {
        compression,
        chunk_size: args.chunk_kib * 1024,
        threads: args.threads.unwrap_or_else(super::default_threads),
        ..Default::default()
    };
    let target = NewArchiveSpec {
        output: &args.output,
        shards: args.shards,
        opts,
        command: "pack",
        doing: "packing",
        total_bytes: total,
        quiet,
    };
    let hot: Vec<Vec<u8>> = args
        .hot
        .iter()
        .map(|p| {
            let p = p.as_bytes();
            p.strip_prefix(b"/").unwrap_or(p).to_vec()
        })
        .collect();
    let summary = write_archive(&target, |writer| {
        writer.set_hot_paths(hot);
        ckstream_fs::pack_inputs_until(writer, plan, &crate::interrupt::requested).map(|_| ())
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

/// Where and how a command writes a new archive.
pub(crate) struct NewArchiveSpec<'a> {
    pub output: &'a ArchiveLocation,
    pub shards: u32,
    pub opts: WriterOptions,
    /// Recorded as `ckstream.command`; names the progress bar.
    pub command: &'a str,
    /// What failed, for the error message ("packing" → "packing OUT failed; ...").
    pub doing: &'a str,
    /// Data bytes expected, for the progress bar.
    pub total_bytes: u64,
    pub quiet: bool,
}

/// Creates the archive, lets `fill` add its entries, and commits it: the footers are
/// written and the archive published under its name only when `fill` succeeded.
/// On failure (or SIGINT/SIGTERM noticed by `fill`) nothing is published and an
/// earlier archive of the same name stays as it was.
pub(crate) fn write_archive(
    spec: &NewArchiveSpec,
    fill: impl FnOnce(&mut ArchiveWriter) -> ckstream_format::Result<()>,
) -> Result<ckstream_format::WriteSummary> {
    let failed = || {
        format!(
            "{} {} failed; no archive was written",
            spec.doing, spec.output
        )
    };
    let mut archive = spec
        .output
        .create(&ArchiveSpec {
            shards: spec.shards,
            writer: spec.opts.clone(),
            command: spec.command,
            writeback: Default::default(),
        })
        .with_context(failed)?;
    let stats = archive.writer.stats();
    let progress = Progress::bytes(spec.command, spec.total_bytes, spec.quiet, move || {
        stats.raw_bytes.load(Ordering::Relaxed)
    });
    let filled = fill(&mut archive.writer);
    let result = match filled {
        Ok(()) => archive.finish(),
        Err(e) => {
            archive.abort();
            Err(e)
        }
    };
    progress.finish();
    result.map_err(|e| {
        let context = if ckstream_store::may_be_in_place(&e) {
            // Publishing failed after the rename (or an unanswered S3 completion).
            format!(
                "{} {} failed; the new archive may be in place under that name",
                spec.doing, spec.output
            )
        } else {
            failed()
        };
        anyhow::Error::new(e).context(context)
    })
}
