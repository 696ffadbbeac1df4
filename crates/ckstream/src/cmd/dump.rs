//! `ckstream dump`: checkpoint a live process tree straight into an archive.

use std::cell::RefCell;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Child;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ckstream_criu::capture::{capture, CaptureEvent, CaptureOptions};
use ckstream_criu::run::{self, DumpCommand, HOOK_SOCKET};
use ckstream_criu::{socket, CriuError};
use ckstream_format::{ArchiveWriter, Compression, WriteSummary, WriterOptions};
use ckstream_store::{ArchiveLocation, ArchiveSpec, NewArchive, Writeback};

use crate::output::human_bytes;
use crate::workdir::WorkDir;

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
    compress: String,
    /// Number of shard files.
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// A container's overlayfs upper dir, stored under `rootfs/` while the process tree
    /// is frozen (after CRIU wrote the images, before the process is killed or resumed).
    #[arg(long, value_name = "UPPER")]
    rootfs_diff: Option<PathBuf>,
    /// Also store NAME=PATH (or PATH) in the archive.
    #[arg(long = "include")]
    include: Vec<OsString>,
    /// Directory for CRIU's socket and log (default: a new temporary directory, removed on success).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Extra arguments for `criu dump` (after `--`), e.g. `-- --shell-job --tcp-established`.
    #[arg(last = true)]
    criu_args: Vec<String>,
}

/// Writes the action script CRIU runs (CRIU execs it directly, without a shell) into
/// the work directory: it calls back into this binary's post-dump hook.
fn write_hook_script(dir: &std::path::Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let exe =
        std::env::current_exe().context("locating the ckstream binary for CRIU's action script")?;
    let exe = exe.to_string_lossy();
    if exe.contains('\'') {
        bail!("the path of the ckstream binary contains a quote: {exe}");
    }
    let path = dir.join("ckstream-action-script");
    std::fs::write(&path, format!("#!/bin/sh\nexec '{exe}' __criu-hook\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
    Ok(path.to_string_lossy().into_owned())
}

/// Watches the CRIU child: an early non-zero exit aborts the capture.
fn watch_child(
    child: Arc<Mutex<Child>>,
    log: PathBuf,
) -> Box<dyn FnMut() -> ckstream_criu::Result<()> + Send> {
    Box::new(move || {
        let mut c = child.lock().unwrap();
        match c.try_wait() {
            Ok(Some(status)) if !status.success() => Err(run::criu_failure("dump", status, &log)),
            _ => Ok(()),
        }
    })
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let compression: Compression = args.compress.parse()?;
    if args.json && args.output.is_stream() {
        bail!("--json cannot be used when the archive goes to stdout");
    }
    crate::interrupt::install();
    let started = Instant::now();
    let mut work = WorkDir::new(args.work_dir.clone(), "ckstream-dump")?;
    let listener = socket::bind(&work.path, socket::CAPTURE_SOCKET)?;
    let control = socket::bind(&work.path, HOOK_SOCKET)?;
    let inputs = args
        .include
        .iter()
        .map(|a| ckstream_fs::parse_input(a))
        .collect::<Result<Vec<_>, _>>()?;
    let plan = ckstream_fs::plan_inputs(&inputs)?;
    let NewArchive {
        mut writer,
        pending,
    } = args.output.create(&ArchiveSpec {
        shards: args.shards,
        writer: WriterOptions {
            compression,
            ..Default::default()
        },
        command: "dump",
        // Data is pushed to disk while CRIU streams it, so the commit at the post-dump
        // hook (the end of the freeze) flushes only the tail. A dump that leaves the
        // process running answers the hook without waiting for the disk at all.
        writeback: if args.leave_running {
            Writeback::Unbounded
        } else {
            Writeback::default()
        },
    })?;
    // Taken by the post-dump hook, which commits and publishes the archive before CRIU
    // may kill the process; only a dump that never reached the hook still has them here.
    let pending = Rc::new(RefCell::new(Some(pending)));
    let committed: Rc<RefCell<Option<WriteSummary>>> = Rc::new(RefCell::new(None));
    writer.add_meta("criu.pid", args.pid.to_string());
    if let Some(v) = run::criu_version() {
        writer.add_meta("criu.version", v);
    }
    let log = work.path.join("dump.log");
    let result = (|| -> Result<(ckstream_criu::capture::CaptureReport, Instant)> {
        ckstream_fs::pack_inputs(&mut writer, plan)?;
        let child = run::spawn_dump(&DumpCommand {
            pid: args.pid,
            work_dir: &work.path,
            leave_running: args.leave_running,
            hook: Some(write_hook_script(&work.path)?),
            extra_args: &args.criu_args,
        })?;
        let child = Arc::new(Mutex::new(child));
        let mut frozen_at = Instant::now();
        let rootfs = match &args.rootfs_diff {
            Some(upper) => Some(ckstream_fs::rootfs_diff_input(upper)?),
            None => None,
        };
        let on_frozen: Option<ckstream_criu::capture::FrozenHook> = rootfs.map(|input| {
            Box::new(move |w: &mut ArchiveWriter| -> ckstream_criu::Result<()> {
                let plan = ckstream_fs::plan_inputs(&[input])?;
                ckstream_fs::pack_inputs(w, plan)?;
                Ok(())
            }) as ckstream_criu::capture::FrozenHook
        });
        // With --leave-running the process is not at risk: the hook is answered at once
        // and the archive is committed after CRIU resumed it.
        let commit_at_hook = (!args.leave_running).then(|| {
            let (pending, committed) = (pending.clone(), committed.clone());
            Box::new(move |w: &mut ArchiveWriter| -> ckstream_criu::Result<()> {
                let summary = w.commit()?;
                if let Some(p) = pending.borrow_mut().take() {
                    p.publish()?;
                }
                *committed.borrow_mut() = Some(summary);
                Ok(())
            }) as ckstream_criu::capture::FrozenHook
        });
        let opts = CaptureOptions {
            watch: Some(watch_child(child.clone(), log.clone())),
            on_frozen,
            commit_at_hook,
            stop: crate::interrupt::requested,
            ..Default::default()
        };
        let captured = capture(&listener, &mut writer, opts, Some(&control), &mut |e| {
            if e == CaptureEvent::CheckpointStart {
                frozen_at = Instant::now();
            }
        });
        // Whatever happened, let CRIU finish on its own: on our failure it sees broken
        // pipes or a failing hook and resumes the process rather than killing it.
        drop(listener);
        let status = {
            let mut c = child.lock().unwrap();
            run::wait_with_timeout(&mut c, std::time::Duration::from_secs(600))
                .context("waiting for criu")?
        };
        let report = captured?;
        if !status.success() {
            return Err(run::criu_failure("dump", status, &log).into());
        }
        Ok((report, frozen_at))
    })();
    let (report, frozen_at) = match result {
        Ok(r) => r,
        Err(e) if committed.borrow().is_some() => {
            work.keep();
            return Err(e.context(format!(
                "the checkpoint was complete and is committed to {} (CRIU failed after \
                 its post-dump hook; CRIU work dir kept: {})",
                args.output,
                work.path.display()
            )));
        }
        Err(e) => {
            writer.abort();
            if let Some(p) = pending.borrow_mut().take() {
                p.discard();
            }
            work.keep();
            let hint = if e
                .downcast_ref::<CriuError>()
                .is_some_and(|c| matches!(c, CriuError::Interrupted))
            {
                "interrupted"
            } else {
                "checkpoint failed"
            };
            let written = if e.chain().any(ckstream_store::may_be_in_place) {
                // Publishing failed after the rename: CRIU resumed the process, since the
                // checkpoint may not survive a crash, but the name may hold it.
                format!(
                    "the new archive may be in place at {} (the process was resumed)",
                    args.output
                )
            } else {
                "no archive was written".to_string()
            };
            return Err(e.context(format!(
                "{hint}; {written} (CRIU work dir kept: {})",
                work.path.display()
            )));
        }
    };
    let since_freeze = frozen_at.elapsed();
    // CRIU's own measure of the freeze (ends when it killed or resumed the tree); our
    // clock starts only when the first image arrives, a little after the freeze began.
    let criu_stats = ckstream_criu::stats::read_dump_stats(&work.path).ok();
    let committed_at_hook = committed.borrow_mut().take();
    let summary = match committed_at_hook {
        Some(summary) => summary,
        // --leave-running (or CRIU skipped the hook): commit now, the process runs on.
        None => {
            let pending = pending.borrow_mut().take();
            let committed = writer.finish().and_then(|summary| {
                if let Some(p) = pending {
                    p.publish()?;
                }
                Ok(summary)
            });
            committed.with_context(|| {
                format!(
                    "committing {} failed; no archive was written{}",
                    args.output,
                    if args.leave_running {
                        " (the process was left running)"
                    } else {
                        ""
                    }
                )
            })?
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let archive_bytes: u64 = summary.shard_sizes.iter().sum();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "archive": args.output.to_string(),
                "pid": args.pid,
                "images": report.images,
                "image_bytes": report.bytes,
                "archive_bytes": archive_bytes,
                "compression": compression.to_string(),
                "pipe_size": report.pipe_size,
                "seconds": secs,
                "seconds_since_freeze": since_freeze.as_secs_f64(),
                "freeze_seconds": criu_stats.as_ref().map(|s| s.freeze_seconds()),
                "criu_stats": criu_stats.as_ref().map(|s| serde_json::json!({
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
        let freeze = criu_stats.as_ref().map_or_else(String::new, |s| {
            format!(", frozen {:.2}s", s.freeze_seconds())
        });
        eprintln!(
            "checkpointed pid {} ({} images, {}) into {} ({}, {}) in {:.2}s{freeze}{}",
            args.pid,
            report.images,
            human_bytes(report.bytes),
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
