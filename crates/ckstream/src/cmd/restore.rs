//! `ckstream restore`: restore a process tree by serving an archive to `criu restore
//! --stream` ([`ckstream_criu::restore`] does the work).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
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
    /// Extra arguments for `criu restore` (after `--`), e.g. `-- --shell-job`.
    #[arg(last = true)]
    criu_args: Vec<String>,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
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
