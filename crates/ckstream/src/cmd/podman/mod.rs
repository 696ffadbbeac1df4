//! `ckstream podman checkpoint|import|export|restore`: podman containers in and out
//! of `.cka` archives and podman's own export format.

use std::cell::RefCell;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use ckstream_format::{Progress, Stop};
use ckstream_podman::checkpoint::{checkpoint, CheckpointOptions};
use ckstream_podman::restore::{restore, RestoreOptions};
use ckstream_podman::trust::TrustReport;
use ckstream_store::ArchiveLocation;

use crate::output::human_bytes;

mod args;

pub use args::Command;
use args::{ApplyDiff, CheckpointArgs, ExportArgs, Format, ImportArgs, RestoreArgs};

pub fn run(cmd: Command, quiet: bool) -> Result<()> {
    // SIGINT/SIGTERM stop cleanly: nothing half-written is published, and a container
    // stopped by its checkpoint is restored in place.
    crate::interrupt::install();
    let stop = crate::interrupt::stop();
    match cmd {
        Command::Checkpoint(a) => checkpoint_cmd(a, stop, quiet),
        Command::Import(a) => import_cmd(a, stop, quiet),
        Command::Export(a) => export_cmd(a, stop, quiet),
        Command::Restore(a) => restore_cmd(a, stop, quiet),
    }
}

/// Runs `op` with a progress bar labelled `label` fed by the [`Progress`] it fills.
fn with_progress<T>(label: &str, quiet: bool, op: impl FnOnce(&Progress) -> T) -> T {
    let progress = Progress::new();
    let bar = crate::progress::Bar::bytes(label, 0, quiet, {
        let p = progress.clone();
        move || (p.done(), p.total())
    });
    let out = op(&progress);
    bar.finish();
    out
}

fn checkpoint_cmd(a: CheckpointArgs, stop: Stop, quiet: bool) -> Result<()> {
    let keys = a.keys.load()?;
    let parents = a.parent.load(&a.output, quiet)?;
    let started = Instant::now();
    let done = with_progress("podman checkpoint", quiet, |progress| {
        checkpoint(
            &a.container,
            &CheckpointOptions {
                output: &a.output,
                format: match a.format {
                    Format::Cka => ckstream_podman::checkpoint::Format::Cka,
                    Format::Podman => ckstream_podman::checkpoint::Format::Podman,
                },
                compression: a.compress,
                leave_running: a.leave_running,
                shards: a.shards,
                progress: progress.clone(),
                stop,
                keys,
                parents,
            },
        )
    })?;
    let secs = started.elapsed().as_secs_f64();
    let ctr = &done.container;
    report(
        &a.output,
        a.json,
        quiet,
        serde_json::json!({
            "container": ctr.name,
            "id": ctr.id,
            "format": format!("{:?}", a.format).to_lowercase(),
            "archive": a.output.to_string(),
            "podman_checkpoint_seconds": done.podman_seconds,
            "archive_seconds": secs - done.podman_seconds,
            "seconds": secs,
            "archive_bytes": done.archive_bytes,
            "data_bytes": done.data_bytes,
            "cloned_bytes": done.cloned_bytes,
            "referenced_bytes": done.referenced_bytes,
            "deleted_paths": done.deleted,
        }),
        &format!(
            "checkpointed {} into {} ({}, {} of data, {} reflinked) in {:.2}s (podman+CRIU {:.2}s, archive {:.2}s)",
            ctr.name,
            a.output,
            human_bytes(done.archive_bytes),
            human_bytes(done.data_bytes),
            human_bytes(done.cloned_bytes),
            secs,
            done.podman_seconds,
            secs - done.podman_seconds
        ),
    );
    Ok(())
}

fn import_cmd(a: ImportArgs, stop: Stop, quiet: bool) -> Result<()> {
    let started = Instant::now();
    if a.input.to_str().is_some_and(|p| p.starts_with("s3://")) {
        bail!(
            "the podman export to import must be a local file ({})",
            a.input.display()
        );
    }
    let keys = a.keys.load()?;
    let (stats, summary) = with_progress("podman import", quiet, |progress| {
        ckstream_podman::import::import(
            &a.input, &a.output, a.shards, a.compress, progress, stop, &keys,
        )
    })
    .map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "importing into {} failed; no archive was written",
            a.output
        ))
    })?;
    let secs = started.elapsed().as_secs_f64();
    let bytes: u64 = summary.shard_sizes.iter().sum();
    report(
        &a.output,
        a.json,
        quiet,
        serde_json::json!({
            "archive": a.output.to_string(),
            "entries": stats.entries,
            "rootfs_entries": stats.rootfs_entries,
            "deleted_paths": stats.deleted_paths,
            "data_bytes": stats.bytes,
            "archive_bytes": bytes,
            "cloned_bytes": summary.cloned_bytes,
            "seconds": secs,
        }),
        &format!(
            "imported {} ({} entries, {} rootfs changes, {} deletions) into {} ({}, {} reflinked) in {:.2}s",
            a.input.display(),
            stats.entries,
            stats.rootfs_entries,
            stats.deleted_paths,
            a.output,
            human_bytes(bytes),
            human_bytes(summary.cloned_bytes),
            secs
        ),
    );
    Ok(())
}

fn export_cmd(a: ExportArgs, stop: Stop, quiet: bool) -> Result<()> {
    let started = Instant::now();
    let reader = super::open(&a.input)?;
    let plan = ckstream_podman::export::plan_from_cka(&reader)?;
    let zstd_level = ckstream_podman::checkpoint::podman_zstd_level(a.compress)?;
    let (stats, bytes) = with_progress("podman archive", quiet, |progress| {
        ckstream_podman::export::write_podman_archive(
            &a.output,
            zstd_level,
            &plan,
            Some(&reader),
            progress,
            stop,
        )
    })
    .map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "writing {} failed; nothing was written there",
            a.output
        ))
    })?;
    let secs = started.elapsed().as_secs_f64();
    report(
        &a.output,
        a.json,
        quiet,
        serde_json::json!({
            "archive": a.output.to_string(),
            "members": stats.members,
            "archive_bytes": bytes,
            "cloned_bytes": stats.cloned_bytes,
            "seconds": secs,
        }),
        &format!(
            "exported {} to {} ({}, {} reflinked) in {:.2}s",
            a.input,
            a.output,
            human_bytes(bytes),
            human_bytes(stats.cloned_bytes),
            secs
        ),
    );
    Ok(())
}

fn restore_cmd(a: RestoreArgs, stop: Stop, quiet: bool) -> Result<()> {
    let started = Instant::now();
    // The container settings the archive asks for, shown on every restore (after the
    // progress bar, before any refusal).
    let config: RefCell<Option<TrustReport>> = RefCell::new(None);
    let on_config = |r: &TrustReport| *config.borrow_mut() = Some(r.clone());
    let on_running = |id: &str, secs: f64| {
        if !quiet {
            eprintln!(
                "container {id} running after {secs:.2}s; checking the rootfs it shares with the archive"
            );
        }
    };
    let restored = with_progress("podman restore", quiet, |progress| {
        restore(
            &a.input,
            &RestoreOptions {
                name: a.name.as_deref(),
                temp_dir: a.temp_dir.as_deref(),
                apply_diff: a.apply_diff.map(|d| match d {
                    ApplyDiff::Storage => ckstream_podman::restore::ApplyDiff::Storage,
                    ApplyDiff::Hook => ckstream_podman::restore::ApplyDiff::Hook,
                    ApplyDiff::Podman => ckstream_podman::restore::ApplyDiff::Podman,
                }),
                progress: progress.clone(),
                stop,
                trust_config: a.trust_config,
                keys: crate::cmd::key::read_key_files(),
                on_config: Some(&on_config),
                verify_rootfs_after: a.verify_rootfs_after_start,
                on_running: Some(&on_running),
            },
        )
    });
    if let Some(r) = config.borrow().as_ref() {
        if a.json {
            if let Err(e) = &restored {
                // Success prints it with the rest; a failure after reading it says
                // whether the settings were the reason.
                let refused = e.is_untrusted_archive();
                println!(
                    "{}",
                    serde_json::json!({ "config": r.to_json(), "refused": refused })
                );
            }
        } else if !quiet || restored.is_err() {
            eprintln!("{}", r.summary());
        }
    }
    let done = restored?;
    let secs = started.elapsed().as_secs_f64();
    let (id, converted) = (&done.container, done.convert_seconds);
    if !done.config.is_ordinary() && !a.json && !quiet {
        eprintln!("restoring despite that ({})", done.trust.name());
    }
    report(
        &ArchiveLocation::Std,
        a.json,
        quiet,
        serde_json::json!({
            "container": id,
            "convert_seconds": converted,
            "rootfs_apply_seconds": done.rootfs_apply_seconds,
            "running_seconds": done.running_seconds,
            "verified_after_start_bytes": done.verified_after.map(|v| v.0),
            "verified_after_start_seconds": done.verified_after.map(|v| v.1),
            "applied_by": format!("{:?}", done.applied_by).to_lowercase(),
            "seconds": secs,
            "config": done.config.to_json(),
            "trust": done.trust.name(),
        }),
        &format!("restored container {id} in {secs:.2}s (conversion {converted:.2}s)"),
    );
    Ok(())
}

/// `ckstream __podman-rootfs-hook TICKET`: the OCI prestart hook of a restore.
pub fn rootfs_hook(ticket: &Path) -> Result<()> {
    Ok(ckstream_podman::hook::run_hook(
        ticket,
        std::io::stdin().lock(),
    )?)
}

fn report(output: &ArchiveLocation, json: bool, quiet: bool, v: serde_json::Value, line: &str) {
    if json {
        if output.is_stream() && v.get("archive").is_some() {
            eprintln!("{v}");
        } else {
            println!("{v}");
        }
    } else if !quiet {
        eprintln!("{line}");
    }
}
