//! `ckstream verify`.

use std::time::Instant;

use anyhow::Result;
use ckstream_format::Progress;

use crate::output::human_bytes;
use crate::progress::Bar;

#[derive(Debug, clap::Args)]
pub struct Args {
    archive: ckstream_store::ArchiveLocation,
    /// Print a JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let started = Instant::now();
    let reader = super::open(&args.archive)?;
    let total: u64 = reader.index().chunks.iter().map(|c| c.stored_share()).sum();
    let progress = Progress::new();
    let bar = Bar::bytes("verify", total, quiet, {
        let progress = progress.clone();
        move || (progress.done(), 0)
    });
    let report = reader.verify(
        args.threads.unwrap_or_else(super::default_threads),
        &progress,
    );
    bar.finish();
    let report = report?;
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "ok": true,
                "entries": reader.entries().len(),
                "records": report.records,
                "chunks": report.chunks,
                "raw_bytes": report.raw_bytes,
                "stored_bytes": report.stored_bytes,
                "seconds": secs,
            })
        );
    } else if !quiet {
        println!(
            "OK: {} entries, {} records, {} chunks ({} raw, {} stored) verified in {:.2}s",
            reader.entries().len(),
            report.records,
            report.chunks,
            human_bytes(report.raw_bytes),
            human_bytes(report.stored_bytes),
            secs
        );
    }
    Ok(())
}
