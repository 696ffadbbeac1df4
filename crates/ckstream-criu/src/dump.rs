//! Checkpointing a live process tree: `criu dump --stream` straight into a new archive.
//!
//! The order is what keeps the process safe. Everything that can be refused is checked
//! before CRIU starts (the output can be created, the extra files planned, the rootfs
//! diff prepared). While CRIU streams its images, the archive's files are written back
//! to disk as they grow. At CRIU's post-dump hook — the last moment before CRIU kills
//! the process — the rootfs diff is walked (the tree is still frozen), and the archive
//! is committed and published; only then is the hook answered "ok". Any failure answers
//! it "fail", and CRIU resumes the process instead of killing it.
//!
//! With `leave_running` the process is never at risk, so the freeze should be no longer
//! than plain `criu dump --leave-running`'s: CRIU writes its images into a *spool*
//! directory itself (at page-cache speed, exactly as without ckstream), the hook is
//! answered as soon as the rootfs diff is walked, and the images are packed into the
//! archive — hashed, compressed, reflinked where the spool and the archive share a
//! filesystem — once the process runs again. Streaming them instead would keep the
//! process frozen while every byte is read, hashed (and compressed) by ckstream.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckstream_format::{ArchiveWriter, Stop, WriteSummary, WriterOptions};
use ckstream_fs::PackInput;
use ckstream_store::{ArchiveLocation, ArchiveSpec, NewArchive, PendingArchive, Writeback};

use crate::capture::{capture, CaptureEvent, CaptureOptions, CaptureReport, FrozenHook};
use crate::error::{CriuError, Result};
use crate::run::{self, DumpCommand, HOOK_SOCKET};
use crate::socket;
use crate::stats::{read_dump_stats, DumpStats};
use crate::workdir::WorkDir;

/// What to checkpoint, and where.
pub struct DumpOptions<'a> {
    /// Root of the process tree.
    pub pid: u32,
    /// Where the archive goes.
    pub output: &'a ArchiveLocation,
    /// Number of shards (1..=4096).
    pub shards: u32,
    /// Compression, chunk size, threads, progress.
    pub writer: WriterOptions,
    /// Resume the tree after the checkpoint instead of killing it.
    pub leave_running: bool,
    /// Files stored beside the images (planned before CRIU starts).
    pub includes: Vec<PackInput>,
    /// A container's rootfs diff, from [`ckstream_fs::prepare_rootfs_diff`] (so whatever
    /// cannot be stored was refused already); walked while the tree is frozen.
    pub rootfs: Option<PackInput>,
    /// CRIU's work directory (socket, action script, log); default: a temporary one,
    /// removed on success and kept (for its log) on failure.
    pub work_dir: Option<PathBuf>,
    /// Where CRIU writes its images for a `leave_running` dump (removed afterwards);
    /// default: beside a local archive (so they can be reflinked into it), else the
    /// temporary directory.
    pub spool_dir: Option<PathBuf>,
    /// Extra arguments for `criu dump`.
    pub criu_args: &'a [String],
    /// Polled while capturing: once true the dump stops (CRIU resumes the process).
    pub stop: Stop,
}

/// What a successful dump did.
#[derive(Debug)]
pub struct DumpReport {
    /// What CRIU sent (or, spooled, what it wrote).
    pub capture: CaptureReport,
    /// The committed archive.
    pub summary: WriteSummary,
    /// CRIU's own timing (its `stats-dump`), when it wrote one: the exact freeze.
    pub criu_stats: Option<DumpStats>,
    /// From the first image CRIU sent to the end: the freeze, give or take, when CRIU's
    /// statistics are missing.
    pub since_first_image: Duration,
}

/// Writes the action script CRIU runs (CRIU execs it directly, without a shell) into
/// the work directory: it calls back into this binary's post-dump hook (the binary
/// answers `__criu-hook` with [`run::hook_client`]).
fn write_hook_script(dir: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe()
        .map_err(|e| CriuError::io("locating the ckstream binary for CRIU's action script", e))?;
    let exe = exe.to_string_lossy();
    if exe.contains('\'') {
        return Err(CriuError::Criu(format!(
            "the path of the ckstream binary contains a quote: {exe}"
        )));
    }
    let path = dir.join("ckstream-action-script");
    ckstream_store::create_private_file(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(
                &mut f,
                format!("#!/bin/sh\nexec '{exe}' __criu-hook\n").as_bytes(),
            )?;
            f.set_permissions(std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| CriuError::io(format!("writing {}", path.display()), e))?;
    Ok(path.to_string_lossy().into_owned())
}

/// Watches the CRIU child: an early non-zero exit aborts the capture.
fn watch_child(child: &Mutex<Child>, log: &Path) -> Result<()> {
    match child.lock().unwrap().try_wait() {
        Ok(Some(status)) if !status.success() => Err(run::criu_failure("dump", status, log)),
        _ => Ok(()),
    }
}

/// The new archive and how far it got: committed (and published) inside the hook, or
/// still pending.
struct Outcome {
    pending: Option<PendingArchive>,
    committed: Option<WriteSummary>,
}

impl Outcome {
    fn commit(&mut self, writer: &mut ArchiveWriter) -> Result<()> {
        let summary = writer.commit()?;
        if let Some(p) = self.pending.take() {
            p.publish()?;
        }
        self.committed = Some(summary);
        Ok(())
    }
}

/// Checkpoints the tree at `opts.pid` into `opts.output` (see the module documentation).
///
/// # Errors
/// [`CriuError::Failed`] saying whether an archive was written (none was, unless
/// CRIU failed after the commit) and where CRIU's log is; errors before CRIU started
/// (the output cannot be created, an include cannot be read) as they are.
pub fn dump(opts: DumpOptions) -> Result<DumpReport> {
    let mut work = WorkDir::new(opts.work_dir.clone(), "ckstream-dump")?;
    let mut control = Some(socket::bind(&work.path, HOOK_SOCKET)?);
    let includes = ckstream_fs::plan_inputs(&opts.includes)?;
    let spool = if opts.leave_running {
        Some(Spool::create(&opts)?)
    } else {
        None
    };
    let NewArchive {
        mut writer,
        pending,
    } = opts.output.create(&ArchiveSpec {
        shards: opts.shards,
        writer: opts.writer.clone(),
        command: "dump",
        // Data is pushed to disk while CRIU streams it, so the commit at the post-dump
        // hook (the end of the freeze) flushes only the tail.
        writeback: Writeback::default(),
    })?;
    writer.add_meta("criu.pid", opts.pid.to_string());
    if let Some(v) = run::criu_version() {
        writer.add_meta("criu.version", v);
    }
    let mut outcome = Outcome {
        pending: Some(pending),
        committed: None,
    };
    let log = work.path.join("dump.log");
    let mut first_image = Instant::now();
    let stop = opts.stop;
    let on_frozen = opts.rootfs.clone().map(|input| {
        Box::new(move |w: &mut ArchiveWriter| -> Result<()> {
            let plan = ckstream_fs::plan_inputs(&[input])?;
            ckstream_fs::pack_inputs(w, plan, stop)?;
            Ok(())
        }) as FrozenHook
    });
    let captured = (|| -> Result<CaptureReport> {
        ckstream_fs::pack_inputs(&mut writer, includes, opts.stop)?;
        // CRIU connects to the capture socket as soon as it starts: bind it first.
        let listener = match &spool {
            Some(_) => None,
            None => Some(socket::bind(&work.path, socket::CAPTURE_SOCKET)?),
        };
        let child = Arc::new(Mutex::new(run::spawn_dump(&DumpCommand {
            pid: opts.pid,
            work_dir: &work.path,
            images_dir: spool.as_ref().map(|s| s.path.as_path()),
            leave_running: opts.leave_running,
            hook: Some(write_hook_script(&work.path)?),
            extra_args: opts.criu_args,
        })?));
        let hook_socket = control.as_ref().expect("bound above");
        let result = match &spool {
            Some(spool) => {
                answer_hook(hook_socket, &child, &log, opts.stop, on_frozen, &mut writer)
                    .map(|()| spool.report())
            }
            None => {
                let listener = listener.expect("bound when there is no spool");
                let capture_opts = CaptureOptions {
                    watch: Some(Box::new({
                        let (child, log) = (child.clone(), log.clone());
                        move || watch_child(&child, &log)
                    })),
                    on_frozen,
                    commit_at_hook: Some(Box::new(|w: &mut ArchiveWriter| outcome.commit(w))),
                    stop: opts.stop,
                    ..Default::default()
                };
                capture(
                    &listener,
                    &mut writer,
                    capture_opts,
                    Some(hook_socket),
                    &mut |e| {
                        if e == CaptureEvent::CheckpointStart {
                            first_image = Instant::now();
                        }
                    },
                )
            }
        };
        // Whatever happened, let CRIU finish on its own: on our failure it sees broken
        // pipes or a failing hook and resumes the process rather than killing it. The
        // hook socket closes first, so a hook that comes only now is refused at once
        // (and CRIU resumes the tree) instead of waiting, frozen, for an answer.
        control = None;
        let status = run::wait_with_timeout(&mut child.lock().unwrap(), Duration::from_secs(600))
            .map_err(|e| CriuError::io("waiting for criu", e))?;
        let report = result?;
        if !status.success() {
            return Err(run::criu_failure("dump", status, &log));
        }
        Ok(report)
    })();
    let capture = match captured {
        Ok(r) => r,
        Err(e) => {
            work.keep();
            let (what, outcome) = if outcome.committed.is_some() {
                (
                    "CRIU failed after its post-dump hook".to_string(),
                    format!(
                        "the checkpoint was complete and is committed to {}",
                        opts.output
                    ),
                )
            } else {
                writer.abort();
                if let Some(p) = outcome.pending.take() {
                    p.discard();
                }
                let what = if matches!(e, CriuError::Interrupted) {
                    "interrupted"
                } else {
                    "checkpoint failed"
                };
                (what.to_string(), nothing_written(&e, opts.output))
            };
            return Err(CriuError::Failed {
                what,
                outcome,
                work_dir: work.path.clone(),
                source: Box::new(e),
            });
        }
    };
    let since_first_image = first_image.elapsed();
    // CRIU writes its statistics into its working directory, streaming or not.
    let criu_stats = read_dump_stats(&work.path).ok();
    if let Some(spool) = &spool {
        // The process runs again: now the images go into the archive.
        if let Err(e) = spool.pack_into(&mut writer, opts.stop) {
            work.keep();
            writer.abort();
            if let Some(p) = outcome.pending.take() {
                p.discard();
            }
            return Err(CriuError::Failed {
                what: "packing CRIU's images failed".into(),
                outcome: "no archive was written (the process was left running)".into(),
                work_dir: work.path.clone(),
                source: Box::new(e),
            });
        }
    }
    let summary = match outcome.committed.take() {
        Some(summary) => summary,
        // --leave-running (or CRIU skipped the hook): commit now, the process runs on.
        None => {
            let pending = outcome.pending.take();
            let committed = writer
                .finish()
                .map_err(CriuError::from)
                .and_then(|summary| {
                    if let Some(p) = pending {
                        p.publish()?;
                    }
                    Ok(summary)
                });
            committed.map_err(|e| {
                work.keep();
                CriuError::Failed {
                    what: format!("committing {} failed", opts.output),
                    outcome: format!(
                        "{}{}",
                        nothing_written(&e, opts.output),
                        if opts.leave_running {
                            " (the process was left running)"
                        } else {
                            ""
                        }
                    ),
                    work_dir: work.path.clone(),
                    source: Box::new(e),
                }
            })?
        }
    };
    Ok(DumpReport {
        capture,
        summary,
        criu_stats,
        since_first_image,
    })
}

/// Waits for CRIU's post-dump action script while CRIU runs a dump into an images
/// directory; walks `on_frozen` (the tree is frozen until the answer) and answers `ok`,
/// or `fail` when that failed. Returns when answered, or when CRIU ended without asking.
fn answer_hook(
    control: &UnixListener,
    child: &Mutex<Child>,
    log: &Path,
    stop: Stop,
    on_frozen: Option<FrozenHook>,
    writer: &mut ArchiveWriter,
) -> Result<()> {
    loop {
        match socket::wait_readable(
            control,
            Duration::from_millis(100),
            "CRIU's post-dump hook",
            stop,
        ) {
            Ok(()) => break,
            Err(CriuError::Timeout(_)) => match child.lock().unwrap().try_wait() {
                Ok(Some(status)) if !status.success() => {
                    return Err(run::criu_failure("dump", status, log))
                }
                Ok(Some(_)) => return Ok(()),
                _ => {}
            },
            Err(e) => return Err(e),
        }
    }
    let (mut hook, _) = control
        .accept()
        .map_err(|e| CriuError::io("accepting the post-dump hook", e))?;
    let walked = on_frozen.map_or(Ok(()), |f| f(writer));
    let answer: &[u8] = if walked.is_ok() { b"ok\n" } else { b"fail\n" };
    let _ = hook.write_all(answer);
    walked
}

/// The directory CRIU writes the images of a `leave_running` dump into; removed on drop.
struct Spool {
    path: PathBuf,
}

impl Spool {
    /// Creates the spool directory (mode 0700: the images hold process memory).
    fn create(opts: &DumpOptions) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let (dir, name) = match (&opts.spool_dir, opts.output) {
            (Some(d), _) => (d.clone(), "ckstream-dump".to_string()),
            (None, ArchiveLocation::Path(p)) => (
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
                p.file_name().map_or_else(
                    || "ckstream-dump".into(),
                    |n| n.to_string_lossy().into_owned(),
                ),
            ),
            (None, _) => (std::env::temp_dir(), "ckstream-dump".to_string()),
        };
        let path = dir.join(format!(".{name}.{}.images", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| {
                CriuError::io(format!("creating the image spool {}", path.display()), e)
            })?;
        Ok(Spool { path })
    }

    /// What CRIU wrote, in the shape of a capture's report.
    fn report(&self) -> CaptureReport {
        let mut report = CaptureReport::default();
        if let Ok(dir) = std::fs::read_dir(&self.path) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name == STATS_DUMP {
                    continue;
                }
                report.images += 1;
                report.bytes += e.metadata().map_or(0, |m| m.len());
                report.image_names.push(name);
            }
        }
        report.image_names.sort();
        report
    }

    /// Adds every image under [`crate::IMAGES_PREFIX`] (CRIU's statistics, not an image
    /// CRIU streams, excepted should a CRIU put them here).
    fn pack_into(&self, writer: &mut ArchiveWriter, stop: Stop) -> Result<()> {
        match std::fs::remove_file(self.path.join(STATS_DUMP)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CriuError::io("removing stats-dump from the spool", e)),
        }
        let input = PackInput::new(crate::IMAGES_PREFIX.as_bytes(), &self.path);
        let plan = ckstream_fs::plan_inputs(&[input])?;
        ckstream_fs::pack_inputs(writer, plan, stop)?;
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// CRIU's statistics file in its images directory.
const STATS_DUMP: &str = "stats-dump";

/// What a failed dump left under the archive's name: nothing, unless publishing failed
/// only after the new archive was put in place (its directory could not be synced, or
/// an object store's answer was lost), in which case CRIU resumed the process, since the
/// checkpoint might not survive a crash.
fn nothing_written(e: &CriuError, output: &ArchiveLocation) -> String {
    if ckstream_store::may_be_in_place(e) {
        format!("the new archive may be in place at {output} (the process was resumed)")
    } else {
        "no archive was written".into()
    }
}
