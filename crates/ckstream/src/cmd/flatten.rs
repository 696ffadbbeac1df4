//! `ckstream flatten`: an incremental archive's content, stored in full in a new archive
//! ([`ckstream_format::flatten::copy_archive`] does the work).

use std::time::Instant;

use anyhow::Result;
use ckstream_format::{CodecId, Compression, WriterOptions};
use ckstream_store::{ArchiveLocation, ArchiveSpec};

use crate::output::human_bytes;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive to flatten (with its parents beside it).
    archive: ArchiveLocation,
    /// The new archive, which references no parent.
    #[arg(short, long)]
    output: ArchiveLocation,
    /// none, lz4, zstd or zstd:LEVEL (default: none when every chunk of the archive is
    /// stored uncompressed — then shared by reflink on btrfs/XFS — else zstd:1).
    #[arg(short, long)]
    compress: Option<Compression>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    keys: super::key::WriteKeyArgs,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    crate::interrupt::install();
    let started = Instant::now();
    let reader = super::open(&args.archive)?;
    let index = reader.index();
    let compression = args.compress.unwrap_or_else(|| {
        if index
            .chunks
            .iter()
            .all(|c| c.codec_id() == Some(CodecId::None))
        {
            Compression::NONE
        } else {
            Compression::zstd(1)
        }
    });
    let largest = index.chunks.iter().map(|c| c.raw_len).max().unwrap_or(0);
    let spec = ArchiveSpec {
        shards: 1,
        writer: WriterOptions {
            compression,
            chunk_size: largest.max(index.chunk_size).max(64 << 10),
            keys: args.keys.load()?,
            ..Default::default()
        },
        command: "flatten",
        writeback: Default::default(),
    };
    let stop = crate::interrupt::stop();
    let summary = args
        .output
        .write(&spec, |w| {
            ckstream_format::flatten::copy_archive(&reader, w, stop)
        })
        .map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "flattening {} into {} failed; no archive was written",
                args.archive, args.output
            ))
        })?;
    let archive_bytes: u64 = summary.shard_sizes.iter().sum();
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "archive": args.output.to_string(),
                "from": args.archive.to_string(),
                "parents_read": index.parents.len(),
                "entries": summary.entries,
                "raw_bytes": summary.raw_bytes,
                "archive_bytes": archive_bytes,
                "cloned_bytes": summary.cloned_bytes,
                "compression": compression.to_string(),
                "seconds": secs,
            })
        );
    } else if !quiet {
        eprintln!(
            "flattened {} ({} parent archive{}) into {} ({}, {}, {} reflinked) in {secs:.2}s",
            args.archive,
            index.parents.len(),
            if index.parents.len() == 1 { "" } else { "s" },
            args.output,
            human_bytes(archive_bytes),
            compression,
            human_bytes(summary.cloned_bytes),
        );
    }
    Ok(())
}
