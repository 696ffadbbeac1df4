//! Checkpointing a podman container: podman checkpoints it in place (runc drives CRIU;
//! `--stream` cannot pass through runc), then one pass from its storage writes the
//! CRIU images, the overlay upper dir (never the merged mount) and podman's metadata
//! (`config.dump` and `spec.dump` derived as `podman container checkpoint --export`
//! would) into a `.cka` or a podman-format tar.
//!
//! Everything that can be refused is checked before podman touches the container. If
//! writing the archive fails afterwards, the container is restored in place from the
//! images podman kept, so a failed checkpoint never loses the container.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ckstream_format::{
    CodecId, Compression, CompressionArg, EntryKind, Progress, Stop, WriterOptions,
};
use ckstream_fs::{PackInput, PackPlan};
use ckstream_store::{ArchiveLocation, ArchiveSpec};

use crate::error::{PodmanError, Result};
use crate::export::{plan_from_storage, write_podman_archive};
use crate::layout::{
    is_excluded, BUNDLE_FILES, CKA_CRIU_DIR, CKA_PODMAN_DIR, CKA_ROOTFS_DIR, CONFIG_DUMP,
    DELETED_FILES, PODMAN_CHECKPOINT_DIR, SPEC_DUMP,
};
use crate::podman::{self, Container};

/// podman's zstd writer (klauspost SpeedDefault) is about zstd level 3: plain `zstd`
/// means this level for podman containers, so a `.cka` is no larger than podman's
/// export of the same container.
pub const PODMAN_ZSTD_LEVEL: i32 = 3;

/// Which archive a checkpoint writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// ckstream's archive: indexed, checksummed, shardable.
    Cka,
    /// podman's export layout, readable by `podman container restore --import` and GNU tar.
    Podman,
}

/// The compression of a podman-format archive: `None` for an uncompressed (aligned)
/// tar, else the zstd level.
///
/// # Errors
/// [`PodmanError::Unsupported`] for lz4, which podman cannot read.
pub fn podman_zstd_level(compression: CompressionArg) -> Result<Option<i32>> {
    let c = compression.with_zstd_default(PODMAN_ZSTD_LEVEL);
    match c.codec {
        CodecId::None => Ok(None),
        CodecId::Zstd => Ok(Some(c.level)),
        CodecId::Lz4 => Err(PodmanError::Unsupported(
            "podman archives can be none or zstd, not lz4".into(),
        )),
    }
}

/// The compression of a podman `.cka` (plain `zstd` is [`PODMAN_ZSTD_LEVEL`]).
pub fn cka_compression(compression: CompressionArg) -> Compression {
    compression.with_zstd_default(PODMAN_ZSTD_LEVEL)
}

/// How to checkpoint.
pub struct CheckpointOptions<'a> {
    /// Where the archive goes.
    pub output: &'a ArchiveLocation,
    /// `.cka` or podman's export layout.
    pub format: Format,
    /// As given: plain `zstd` means [`PODMAN_ZSTD_LEVEL`].
    pub compression: CompressionArg,
    /// Keep the container running after the checkpoint.
    pub leave_running: bool,
    /// Shards of a `.cka`.
    pub shards: u32,
    /// Counts the bytes of data written.
    pub progress: Progress,
    /// Polled: once it asks, nothing is published and the container is restored in place.
    pub stop: Stop,
    /// Keys to sign and encrypt a `.cka` with (a podman-format archive takes none).
    pub keys: ckstream_format::WriteKeys,
    /// What a `.cka` may reference in a parent archive instead of storing it again.
    pub parents: Option<std::sync::Arc<ckstream_format::ParentChunks>>,
}

/// What a checkpoint did.
#[derive(Debug)]
pub struct CheckpointReport {
    /// The container, as inspected before the checkpoint.
    pub container: Container,
    /// podman's own checkpoint in place (runc + CRIU).
    pub podman_seconds: f64,
    /// Bytes of the archive.
    pub archive_bytes: u64,
    /// Bytes of file data in it.
    pub data_bytes: u64,
    /// Bytes shared by reflink instead of copied.
    pub cloned_bytes: u64,
    /// Bytes of data a parent archive (or this one, earlier) stores already.
    pub referenced_bytes: u64,
    /// Paths in `deleted.files`.
    pub deleted: usize,
}

/// Checkpoints `container` (see the module documentation).
///
/// # Errors
/// [`PodmanError::Unsupported`] for a container that is not running, has named volumes
/// or needs a merged view podman cannot mount — all before podman touches it;
/// [`PodmanError::Step`] when podman's checkpoint or the archive failed, saying what
/// became of the container.
pub fn checkpoint(container: &str, opts: &CheckpointOptions) -> Result<CheckpointReport> {
    let started = Instant::now();
    let ctr = podman::inspect(container)?;
    if !ctr.running {
        return Err(PodmanError::Unsupported(format!(
            "container {} is not running",
            ctr.name
        )));
    }
    if !ctr.named_volumes.is_empty() {
        return Err(PodmanError::Unsupported(format!(
            "container {} uses named volumes ({}); ckstream does not carry volumes yet",
            ctr.name,
            ctr.named_volumes.join(", ")
        )));
    }
    // Options are validated before the container is touched.
    let zstd_level = match opts.format {
        Format::Cka => None,
        Format::Podman => {
            if !opts.keys.seal_to.is_empty() || opts.keys.sign_with.is_some() {
                return Err(PodmanError::Unsupported(
                    "podman's archive format cannot be signed or encrypted; write a .cka (--format cka)".into(),
                ));
            }
            if opts.parents.is_some() {
                return Err(PodmanError::Unsupported(
                    "podman's archive format cannot reference a parent archive; write a .cka (--format cka)".into(),
                ));
            }
            if !matches!(opts.output, ArchiveLocation::Std | ArchiveLocation::Path(_)) {
                return Err(PodmanError::Unsupported(format!(
                    "a podman-format archive must be a local file or `-` ({}); write a .cka there instead (--format cka)",
                    opts.output
                )));
            }
            podman_zstd_level(opts.compression)?
        }
    };
    // Metacopy files and renamed directories are stored from the merged view, which a
    // checkpoint that stops the container would unmount: take a mount reference first,
    // and refuse before podman freezes anything if there is no merged view.
    let mut merged = MergedView::new(&ctr.id);
    if let Some(found) = ckstream_fs::find_indirect(&ctr.upper)? {
        merged.pin(&ctr.upper).map_err(|e| {
            e.context(format!(
                "{} is {}; storing it needs the container's merged view, which podman could not \
                 mount; the container was not checkpointed",
                found.path.display(),
                found.kind.describe()
            ))
        })?;
    }
    podman::checkpoint_in_place(&ctr.id, opts.leave_running)
        .map_err(|e| e.context("podman could not checkpoint the container; it keeps running"))?;
    let podman_seconds = started.elapsed().as_secs_f64();
    let written = write_checkpoint(&ctr, &mut merged, opts, zstd_level);
    drop(merged);
    match written {
        Ok(w) => Ok(CheckpointReport {
            container: ctr,
            podman_seconds,
            archive_bytes: w.archive_bytes,
            data_bytes: w.data_bytes,
            cloned_bytes: w.cloned_bytes,
            referenced_bytes: w.referenced_bytes,
            deleted: w.deleted,
        }),
        Err(e) if opts.leave_running => Err(e),
        // The archive is lost but the container is not: bring it back from the images
        // podman just wrote.
        Err(e) => Err(match podman::restore_in_place(&ctr.id) {
            Ok(()) => e.context(format!(
                "writing the archive failed; container {} was restored in place",
                ctr.name
            )),
            Err(re) => e.context(format!(
                "writing the archive failed and restoring {} in place failed too ({re})",
                ctr.name
            )),
        }),
    }
}

struct Written {
    archive_bytes: u64,
    data_bytes: u64,
    cloned_bytes: u64,
    referenced_bytes: u64,
    deleted: usize,
}

/// A container's merged view, mounted through `podman mount` on demand and released
/// (`podman umount`) when dropped.
struct MergedView<'a> {
    id: &'a str,
    path: Option<PathBuf>,
}

impl<'a> MergedView<'a> {
    fn new(id: &'a str) -> Self {
        MergedView { id, path: None }
    }

    /// Mounts the container's root (once) and checks it is the overlay of `upper`.
    fn pin(&mut self, upper: &Path) -> Result<&Path> {
        if self.path.is_none() {
            let path = podman::mount(self.id)?;
            self.path = Some(path.clone());
            ckstream_fs::check_merged(upper, &path)?;
        }
        Ok(self.path.as_deref().expect("set above"))
    }
}

impl Drop for MergedView<'_> {
    fn drop(&mut self) {
        if self.path.is_some() {
            // Best effort: a leftover mount reference only keeps the overlay mounted.
            let _ = podman::unmount(self.id);
        }
    }
}

/// The container's rootfs diff under `rootfs/`, metacopy files and redirected
/// directories read through the merged view. Should the upper dir have gained such
/// an entry after the pre-checkpoint scan, the view is mounted now.
fn plan_rootfs(ctr: &Container, merged: &mut MergedView) -> Result<PackPlan> {
    let plan = |m: Option<&Path>| -> ckstream_format::Result<PackPlan> {
        let mut input = ckstream_fs::rootfs_diff_input(&ctr.upper, m)?;
        input.name = CKA_ROOTFS_DIR.as_bytes().to_vec();
        ckstream_fs::plan_inputs(&[input])
    };
    match merged.path.clone() {
        Some(m) => Ok(plan(Some(&m))?),
        None => match plan(None) {
            Err(e) if ckstream_fs::find_indirect(&ctr.upper)?.is_some() => {
                let m = merged
                    .pin(&ctr.upper)
                    .map_err(|pin| pin.context(e.to_string()))?
                    .to_path_buf();
                Ok(plan(Some(&m))?)
            }
            other => Ok(other?),
        },
    }
}

fn write_checkpoint(
    ctr: &Container,
    merged: &mut MergedView,
    opts: &CheckpointOptions,
    zstd_level: Option<i32>,
) -> Result<Written> {
    // The two files podman writes only for `--export`, derived the way podman does.
    let state = |source| PodmanError::State {
        container: ctr.id.clone(),
        source,
    };
    let db = crate::config_dump::find_db_path(&[]).map_err(state)?;
    let config = crate::config_dump::config_dump(&db, &ctr.id).map_err(state)?;
    let spec = crate::config_dump::spec_dump(&ctr.bundle).map_err(state)?;
    write_bundle_file(&ctr.bundle, CONFIG_DUMP, &config)?;
    write_bundle_file(&ctr.bundle, SPEC_DUMP, &spec)?;

    let rootfs_plan = plan_rootfs(ctr, merged)?;
    let upper_entries: Vec<_> = rootfs_plan.entries.iter().map(|p| &p.entry).collect();
    let deleted =
        crate::diff::deleted_files(&upper_entries, CKA_ROOTFS_DIR.as_bytes(), &ctr.lowers)?;
    let mut json = serde_json::to_vec_pretty(&deleted).expect("a list of strings serializes");
    json.push(b'\n');
    write_bundle_file(&ctr.bundle, DELETED_FILES, &json)?;

    if opts.format == Format::Podman {
        let plan = plan_from_storage(&ctr.bundle, rootfs_plan, deleted)?;
        let (stats, bytes) = write_podman_archive(
            opts.output,
            zstd_level,
            &plan,
            None,
            &opts.progress,
            opts.stop,
        )?;
        return Ok(Written {
            archive_bytes: bytes,
            data_bytes: plan.data_bytes(),
            cloned_bytes: stats.cloned_bytes,
            referenced_bytes: 0,
            deleted: plan.deleted.len(),
        });
    }
    let mut inputs: Vec<PackInput> = BUNDLE_FILES
        .iter()
        .chain(&[DELETED_FILES])
        .map(|n| {
            PackInput::new(
                format!("{CKA_PODMAN_DIR}/{n}").into_bytes(),
                ctr.bundle.join(n),
            )
        })
        .filter(|i| i.path.symlink_metadata().is_ok())
        .collect();
    inputs.push(PackInput::new(
        CKA_CRIU_DIR.as_bytes(),
        ctr.bundle.join(PODMAN_CHECKPOINT_DIR),
    ));
    let mut plan = ckstream_fs::plan_inputs(&inputs)?;
    let prefix = [CKA_ROOTFS_DIR.as_bytes(), b"/"].concat();
    plan.entries
        .extend(rootfs_plan.entries.into_iter().filter(|p| {
            p.entry
                .path
                .strip_prefix(&prefix[..])
                .is_none_or(|rel| !is_excluded(rel))
        }));
    plan.total_bytes = plan
        .entries
        .iter()
        .filter(|p| p.entry.entry_kind() == EntryKind::File)
        .map(|p| p.entry.size)
        .sum();
    let total = plan.total_bytes;
    opts.progress.set_total(total);
    let spec = ArchiveSpec {
        shards: opts.shards,
        writer: WriterOptions {
            compression: cka_compression(opts.compression),
            progress: opts.progress.clone(),
            keys: opts.keys.clone(),
            parents: opts.parents.clone(),
            ..Default::default()
        },
        command: "podman checkpoint",
        writeback: Default::default(),
    };
    let summary = opts.output.write(&spec, |w| {
        w.add_meta("podman.container.id", ctr.id.clone());
        w.add_meta("podman.container.name", ctr.name.clone());
        w.add_meta("podman.image", ctr.image_name.clone());
        w.add_meta("podman.runtime", ctr.runtime.clone());
        ckstream_fs::pack_inputs(w, plan, opts.stop).map(|_| ())
    })?;
    Ok(Written {
        archive_bytes: summary.shard_sizes.iter().sum(),
        data_bytes: total,
        cloned_bytes: summary.cloned_bytes,
        referenced_bytes: summary.referenced_bytes,
        deleted: deleted.len(),
    })
}

/// Writes a bundle file the way podman does (owner-only, replaced atomically).
fn write_bundle_file(bundle: &Path, name: &str, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let path = bundle.join(name);
    let tmp = bundle.join(format!(".{name}.ckstream-tmp"));
    let written = (|| -> std::io::Result<()> {
        // Owner-only, never through a symlink planted under the temporary name.
        let mut f = ckstream_store::create_private_file(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &path)
    })();
    written.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        PodmanError::Bundle { path, source }
    })
}
