//! `ckstream podman checkpoint|import|export|restore`: podman containers in and out
//! of `.cka` archives and podman's own export format.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ckstream_format::{CodecId, Compression, WriterOptions};
use ckstream_podman::export::{plan_from_cka, plan_from_storage, write_export, ExportPlan};
use ckstream_podman::layout::{is_excluded, CKA_CRIU_DIR, CKA_PODMAN_DIR, CKA_ROOTFS_DIR};
use ckstream_podman::podman::{self, Container};
use ckstream_podman::tar::{TarStats, TarWriter};
use ckstream_store::ArchiveLocation;

use super::pack::{write_archive, NewArchiveSpec};
use crate::output::human_bytes;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Checkpoint a running container (podman drives CRIU in place) and write its
    /// CRIU images, rootfs changes and podman metadata in one pass.
    Checkpoint(CheckpointArgs),
    /// Convert a podman export (`podman container checkpoint -e`, tar or tar.zst) to `.cka`.
    Import(ImportArgs),
    /// Convert a `.cka` made by `ckstream podman checkpoint|import` to podman's export format.
    Export(ExportArgs),
    /// Restore a container through `podman container restore --import` from either format.
    Restore(RestoreArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// ckstream's archive: indexed, checksummed, shardable.
    Cka,
    /// podman's export layout, readable by `podman container restore --import` and GNU tar.
    Podman,
}

#[derive(Debug, clap::Args)]
pub struct CheckpointArgs {
    /// Container name or ID.
    container: String,
    /// Output archive (`-` for stdout; `s3://BUCKET/KEY` for the cka format).
    #[arg(short, long)]
    output: ArchiveLocation,
    #[arg(long, value_enum, default_value = "cka")]
    format: Format,
    /// none (reflinks on btrfs/XFS), lz4 (cka only), zstd (level 3, as podman) or zstd:LEVEL.
    #[arg(short, long, default_value = "none")]
    compress: String,
    /// Keep the container running after the checkpoint.
    #[arg(long)]
    leave_running: bool,
    /// Shards for the cka format.
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// podman export archive (tar or tar.zst).
    input: PathBuf,
    #[arg(short, long)]
    output: ArchiveLocation,
    #[arg(short, long, default_value = "none")]
    compress: String,
    #[arg(long, default_value_t = 1)]
    shards: u32,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// `.cka` archive.
    input: ArchiveLocation,
    /// podman archive to write (`-` for stdout).
    #[arg(short, long)]
    output: ArchiveLocation,
    /// none or zstd[:LEVEL] (podman reads both).
    #[arg(short, long, default_value = "none")]
    compress: String,
    #[arg(long)]
    json: bool,
}

/// Who applies the rootfs diff of a `.cka` on restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ApplyDiff {
    /// ckstream, from the archive, in a one-shot OCI prestart hook that runc runs after
    /// mounting the new container's root and before CRIU opens files: one pass, no
    /// nested tar for podman to read three times and untar.
    Ckstream,
    /// podman, from a `rootfs-diff.tar` in the converted archive (its own code path).
    Podman,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// `.cka` or podman export archive.
    input: ArchiveLocation,
    /// Restore under a new name (podman then also drops the static IP/MAC).
    #[arg(long)]
    name: Option<String>,
    /// Where the temporary podman archive goes when restoring a `.cka`
    /// (default: beside the archive, so its data can be reflinked).
    #[arg(long)]
    temp_dir: Option<PathBuf>,
    /// Who applies a `.cka`'s rootfs diff (default: ckstream for local archives,
    /// podman for object-store ones, whose credentials the hook would not have).
    #[arg(long, value_enum)]
    apply_diff: Option<ApplyDiff>,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Command, quiet: bool) -> Result<()> {
    match cmd {
        Command::Checkpoint(a) => checkpoint(a, quiet),
        Command::Import(a) => import(a, quiet),
        Command::Export(a) => export(a, quiet),
        Command::Restore(a) => restore(a, quiet),
    }
}

/// Writer options for a podman `.cka`: plain `zstd` means level 3 here, podman's own
/// default, so that a `.cka` is no larger than podman's export of the same container.
fn writer_options(compress: &str) -> Result<WriterOptions> {
    let compression = if compress == "zstd" {
        Compression::zstd(PODMAN_ZSTD_LEVEL)
    } else {
        compress.parse::<Compression>()?
    };
    Ok(WriterOptions {
        compression,
        threads: super::default_threads(),
        ..Default::default()
    })
}

/// zstd level for a podman-format output, `None` for an uncompressed (aligned) tar.
fn podman_compression(compress: &str) -> Result<Option<i32>> {
    let c: Compression = compress.parse()?;
    match c.codec {
        CodecId::None => Ok(None),
        CodecId::Zstd => Ok(Some(if compress.contains(':') {
            c.level
        } else {
            PODMAN_ZSTD_LEVEL
        })),
        CodecId::Lz4 => bail!("podman archives can be none or zstd, not lz4"),
    }
}

/// podman's zstd writer (klauspost SpeedDefault) is about zstd level 3.
const PODMAN_ZSTD_LEVEL: i32 = 3;

fn checkpoint(a: CheckpointArgs, quiet: bool) -> Result<()> {
    let started = Instant::now();
    // SIGINT/SIGTERM stop the archive cleanly (nothing published) and the container is
    // then restored in place.
    crate::interrupt::install();
    let ctr = podman::inspect(&a.container)?;
    if !ctr.running {
        bail!("container {} is not running", ctr.name);
    }
    if !ctr.named_volumes.is_empty() {
        bail!(
            "container {} uses named volumes ({}); ckstream does not carry volumes yet",
            ctr.name,
            ctr.named_volumes.join(", ")
        );
    }
    // Validate options before the container is touched.
    let cka_opts = match a.format {
        Format::Cka => Some(writer_options(&a.compress)?),
        Format::Podman => {
            podman_compression(&a.compress)?;
            local_only(&a.output, "a podman-format archive")?;
            None
        }
    };
    // Metacopy files and renamed directories are stored from the merged view, which a
    // checkpoint that stops the container would unmount: take a mount reference first,
    // and refuse before podman freezes anything if there is no merged view.
    let mut merged = MergedView::new(&ctr.id);
    if let Some(found) = ckstream_fs::find_indirect(&ctr.upper)? {
        merged.pin(&ctr.upper).with_context(|| {
            format!(
                "{} is {}; storing it needs the container's merged view, which podman could not \
                 mount; the container was not checkpointed",
                found.path.display(),
                found.kind.describe()
            )
        })?;
    }
    podman::checkpoint_in_place(&ctr.id, a.leave_running)
        .context("podman could not checkpoint the container; it keeps running")?;
    let criu_secs = started.elapsed().as_secs_f64();
    let written = write_checkpoint(&a, &ctr, &mut merged, cka_opts, quiet);
    let summary = match written {
        Ok(s) => s,
        Err(e) => {
            if !a.leave_running {
                // The archive is lost but the container is not: bring it back from the
                // images podman just wrote.
                match podman::podman(&["container", "restore", &ctr.id]) {
                    Ok(_) => eprintln!(
                        "ckstream: writing the archive failed; container {} was restored in place",
                        ctr.name
                    ),
                    Err(re) => eprintln!(
                        "ckstream: writing the archive failed and restoring {} in place failed too: {re}",
                        ctr.name
                    ),
                }
            }
            return Err(e);
        }
    };
    let secs = started.elapsed().as_secs_f64();
    report(
        &a.output,
        a.json,
        quiet,
        serde_json::json!({
            "container": ctr.name,
            "id": ctr.id,
            "format": format!("{:?}", a.format).to_lowercase(),
            "archive": a.output.to_string(),
            "podman_checkpoint_seconds": criu_secs,
            "archive_seconds": secs - criu_secs,
            "seconds": secs,
            "archive_bytes": summary.archive_bytes,
            "data_bytes": summary.data_bytes,
            "cloned_bytes": summary.cloned_bytes,
            "deleted_paths": summary.deleted,
        }),
        &format!(
            "checkpointed {} into {} ({}, {} of data, {} reflinked) in {:.2}s (podman+CRIU {:.2}s, archive {:.2}s)",
            ctr.name,
            a.output,
            human_bytes(summary.archive_bytes),
            human_bytes(summary.data_bytes),
            human_bytes(summary.cloned_bytes),
            secs,
            criu_secs,
            secs - criu_secs
        ),
    );
    Ok(())
}

struct Written {
    archive_bytes: u64,
    data_bytes: u64,
    cloned_bytes: u64,
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
            if let Err(e) = podman::unmount(self.id) {
                eprintln!("ckstream: warning: {e}");
            }
        }
    }
}

/// The container's rootfs diff under `rootfs/`, metacopy files and redirected
/// directories read through the merged view. Should the upper dir have gained such
/// an entry after the pre-checkpoint scan, the view is mounted now.
fn plan_rootfs(ctr: &Container, merged: &mut MergedView) -> Result<ckstream_fs::PackPlan> {
    let plan = |m: Option<&Path>| -> Result<ckstream_fs::PackPlan> {
        let mut input = ckstream_fs::rootfs_diff_input(&ctr.upper, m)?;
        input.name = CKA_ROOTFS_DIR.as_bytes().to_vec();
        Ok(ckstream_fs::plan_inputs(&[input])?)
    };
    match merged.path.clone() {
        Some(m) => plan(Some(&m)),
        None => match plan(None) {
            Err(e) if ckstream_fs::find_indirect(&ctr.upper)?.is_some() => {
                let m = merged.pin(&ctr.upper).context(e.to_string())?.to_path_buf();
                plan(Some(&m))
            }
            other => other,
        },
    }
}

fn write_checkpoint(
    a: &CheckpointArgs,
    ctr: &Container,
    merged: &mut MergedView,
    cka_opts: Option<WriterOptions>,
    quiet: bool,
) -> Result<Written> {
    // The two files podman writes only for `--export`, derived the way podman does.
    let db = ckstream_podman::config_dump::find_db_path(&[])?;
    let config = ckstream_podman::config_dump::config_dump(&db, &ctr.id)
        .with_context(|| format!("reading container {} from {}", ctr.id, db.display()))?;
    let spec = ckstream_podman::config_dump::spec_dump(&ctr.bundle)
        .with_context(|| format!("reading the OCI spec in {}", ctr.bundle.display()))?;
    write_bundle_file(&ctr.bundle, ckstream_podman::layout::CONFIG_DUMP, &config)?;
    write_bundle_file(&ctr.bundle, ckstream_podman::layout::SPEC_DUMP, &spec)?;

    let rootfs_plan = plan_rootfs(ctr, merged)?;
    let upper_entries: Vec<_> = rootfs_plan.entries.iter().map(|p| &p.entry).collect();
    let deleted = ckstream_podman::diff::deleted_files(
        &upper_entries,
        CKA_ROOTFS_DIR.as_bytes(),
        &ctr.lowers,
    )?;
    let mut json = serde_json::to_vec_pretty(&deleted)?;
    json.push(b'\n');
    write_bundle_file(&ctr.bundle, ckstream_podman::layout::DELETED_FILES, &json)?;

    match cka_opts {
        Some(opts) => {
            let mut inputs: Vec<ckstream_fs::PackInput> = ckstream_podman::layout::BUNDLE_FILES
                .iter()
                .chain(&[ckstream_podman::layout::DELETED_FILES])
                .map(|n| {
                    ckstream_fs::PackInput::new(
                        format!("{CKA_PODMAN_DIR}/{n}").into_bytes(),
                        ctr.bundle.join(n),
                    )
                })
                .filter(|i| i.path.symlink_metadata().is_ok())
                .collect();
            inputs.push(ckstream_fs::PackInput::new(
                CKA_CRIU_DIR.as_bytes(),
                ctr.bundle
                    .join(ckstream_podman::layout::PODMAN_CHECKPOINT_DIR),
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
                .filter(|p| p.entry.entry_kind() == ckstream_format::EntryKind::File)
                .map(|p| p.entry.size)
                .sum();
            let spec = NewArchiveSpec {
                output: &a.output,
                shards: a.shards,
                opts,
                command: "podman checkpoint",
                doing: "writing the checkpoint to",
                total_bytes: plan.total_bytes,
                quiet,
            };
            let total = plan.total_bytes;
            let summary = write_archive(&spec, |w| {
                w.add_meta("podman.container.id", ctr.id.clone());
                w.add_meta("podman.container.name", ctr.name.clone());
                w.add_meta("podman.image", ctr.image_name.clone());
                w.add_meta("podman.runtime", ctr.runtime.clone());
                ckstream_fs::pack_inputs_until(w, plan, &crate::interrupt::requested).map(|_| ())
            })?;
            Ok(Written {
                archive_bytes: summary.shard_sizes.iter().sum(),
                data_bytes: total,
                cloned_bytes: summary.cloned_bytes,
                deleted: deleted.len(),
            })
        }
        None => {
            let plan = plan_from_storage(&ctr.bundle, rootfs_plan, deleted)?;
            let deleted = plan.deleted.len();
            let (stats, bytes) = write_podman_archive(&a.output, &a.compress, &plan, None, quiet)?;
            Ok(Written {
                archive_bytes: bytes,
                data_bytes: plan.data_bytes(),
                cloned_bytes: stats.cloned_bytes,
                deleted,
            })
        }
    }
}

/// Writes a bundle file the way podman does (owner-only, replaced atomically).
fn write_bundle_file(bundle: &Path, name: &str, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = bundle.join(format!(".{name}.ckstream-tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_data()?;
    std::fs::rename(&tmp, bundle.join(name))?;
    Ok(())
}

/// Writes a podman export to `output` (a temporary name renamed into place when
/// complete, or stdout). Returns the tar statistics and the bytes written.
fn write_podman_archive(
    output: &ArchiveLocation,
    compress: &str,
    plan: &ExportPlan,
    reader: Option<&ckstream_format::ArchiveReader>,
    quiet: bool,
) -> Result<(TarStats, u64)> {
    let level = podman_compression(compress)?;
    local_only(output, "a podman-format archive")?;
    let moved = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = crate::progress::Progress::bytes("podman archive", plan.data_bytes(), quiet, {
        let moved = moved.clone();
        move || moved.load(std::sync::atomic::Ordering::Relaxed)
    });
    let on_data = |n: u64| {
        moved.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        !crate::interrupt::requested()
    };
    let path = match output {
        ArchiveLocation::Std => None,
        ArchiveLocation::Path(p) => Some(p),
        _ => unreachable!("refused by local_only"),
    };
    let Some(path) = path else {
        let stdout: Box<dyn Write + Send> = Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        ));
        let out: Box<dyn Write + Send> = match level {
            Some(l) => Box::new(zstd_writer(stdout, l)?),
            None => stdout,
        };
        let mut w = TarWriter::to_stream(out);
        let stats = write_export(&mut w, plan, reader, false, &on_data)?;
        let pos = w.position();
        w.into_file()?;
        progress.finish();
        return Ok((stats, pos));
    };
    let (file, pending) = ckstream_store::create_file_atomically(path)?;
    let result = (|| -> Result<(TarStats, u64)> {
        let (stats, file) = match level {
            None => {
                let mut w = TarWriter::to_file(file, true);
                let stats = write_export(&mut w, plan, reader, true, &on_data)?;
                (stats, w.into_file()?)
            }
            Some(l) => {
                let out = std::io::BufWriter::with_capacity(1 << 20, file.try_clone()?);
                let mut w = TarWriter::to_stream(Box::new(zstd_writer(out, l)?));
                let stats = write_export(&mut w, plan, reader, false, &on_data)?;
                w.into_file()?;
                (stats, Some(file))
            }
        };
        let file = file.expect("a file output");
        file.sync_all()?;
        Ok((stats, file.metadata()?.len()))
    })();
    progress.finish();
    let result = match result {
        Ok(done) => pending.publish().map(|()| done).map_err(Into::into),
        Err(e) => {
            pending.discard();
            Err(e)
        }
    };
    result.with_context(|| format!("writing {output} failed; nothing was written there"))
}

fn zstd_writer<W: Write + Send + 'static>(
    w: W,
    level: i32,
) -> Result<zstd::stream::AutoFinishEncoder<'static, W>> {
    let mut enc = zstd::stream::write::Encoder::new(w, level)?;
    enc.multithread(super::default_threads() as u32)?;
    // Memory images repeat pages and library code far apart: a 32 MiB window with
    // long-distance matching makes a CRIU memory image ~10 % smaller at the same speed
    // (measured with zstd -3 on a memtest mixed dump), and any zstd decoder accepts it.
    enc.long_distance_matching(true)?;
    enc.window_log(25)?;
    Ok(enc.auto_finish())
}

fn import(a: ImportArgs, quiet: bool) -> Result<()> {
    crate::interrupt::install();
    let started = Instant::now();
    let opts = writer_options(&a.compress)?;
    if a.input.to_str().is_some_and(|p| p.starts_with("s3://")) {
        bail!(
            "the podman export to import must be a local file ({})",
            a.input.display()
        );
    }
    let total = std::fs::metadata(&a.input)
        .with_context(|| format!("cannot read {}", a.input.display()))?
        .len();
    let spec = NewArchiveSpec {
        output: &a.output,
        shards: a.shards,
        opts,
        command: "podman import",
        doing: "importing into",
        total_bytes: total,
        quiet,
    };
    let mut stats = None;
    let summary = write_archive(&spec, |w| {
        stats = Some(ckstream_podman::import::import_podman_archive(
            &a.input,
            w,
            &crate::interrupt::requested,
        )?);
        Ok(())
    })?;
    let stats = stats.expect("set on success");
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

fn export(a: ExportArgs, quiet: bool) -> Result<()> {
    crate::interrupt::install();
    let started = Instant::now();
    let reader = super::open(&a.input)?;
    let plan = plan_from_cka(&reader)?;
    let (stats, bytes) = write_podman_archive(&a.output, &a.compress, &plan, Some(&reader), quiet)?;
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

fn restore(a: RestoreArgs, quiet: bool) -> Result<()> {
    let started = Instant::now();
    let mut temp: Option<PathBuf> = None;
    let mut ticket: Option<RootfsTicket> = None;
    let mut name = a.name.clone();
    let remote = a.input.is_remote();
    let apply_diff = match (a.apply_diff, remote) {
        (Some(ApplyDiff::Ckstream), true) => bail!(
            "--apply-diff ckstream needs a local archive (the OCI hook runs without your object-store credentials)"
        ),
        (Some(x), _) => x,
        (None, true) => ApplyDiff::Podman,
        (None, false) => ApplyDiff::Ckstream,
    };
    let local_input = a.input.local_path().map(Path::to_path_buf);
    let podman_archive = if remote || local_input.as_deref().map_or(Ok(true), is_cka)? {
        let reader = super::open(&a.input)?;
        if name.is_none() {
            if let Some(i) = reader.find(
                format!("{CKA_PODMAN_DIR}/{}", ckstream_podman::layout::CONFIG_DUMP).as_bytes(),
            ) {
                let mut config = Vec::new();
                reader.copy_entry(i, &mut config)?;
                name = ckstream_podman::import::container_name(&config);
            }
        }
        let mut plan = plan_from_cka(&reader)?;
        let has_diff = !plan.rootfs.is_empty() || !plan.deleted.is_empty();
        if apply_diff == ApplyDiff::Ckstream && has_diff {
            let archive = local_input
                .as_deref()
                .context("--apply-diff ckstream needs the archive in a local file")?;
            let t = RootfsTicket::create(archive, &reader)?;
            let spec_i = reader
                .find(format!("{CKA_PODMAN_DIR}/{}", ckstream_podman::layout::SPEC_DUMP).as_bytes())
                .context("the archive has no podman/spec.dump")?;
            let mut spec = Vec::new();
            reader.copy_entry(spec_i, &mut spec)?;
            let spec = ckstream_podman::export::add_prestart_hook(&spec, t.hook()?)?;
            ckstream_podman::export::replace_member(
                &mut plan,
                ckstream_podman::layout::SPEC_DUMP,
                spec,
            )?;
            plan.skip_rootfs = true;
            ticket = Some(t);
        }
        let dir = match &a.temp_dir {
            Some(d) => d.clone(),
            None if remote => std::env::temp_dir(),
            None => local_input
                .as_deref()
                .and_then(Path::parent)
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let tmp = dir.join(format!(
            ".ckstream-podman-restore.{}.tar",
            std::process::id()
        ));
        temp = Some(tmp.clone());
        if let Err(e) = write_podman_archive(
            &ArchiveLocation::Path(tmp.clone()),
            "none",
            &plan,
            Some(&reader),
            quiet,
        ) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        tmp
    } else {
        let input = local_input.context("a podman export must be a local file")?;
        let stats = ckstream_podman::import::check_podman_archive(&input)
            .with_context(|| format!("refusing {}", input.display()))?;
        name = name.or(stats.container_name);
        input
    };
    let converted_secs = started.elapsed().as_secs_f64();
    // A failed `restore --import` leaves the container it created behind, which would
    // block a retry; remove it then, but never a container that existed before.
    let existed_before = name.as_deref().is_some_and(podman::container_exists);
    let restored = podman::restore_import(&podman_archive, a.name.as_deref());
    if restored.is_err() && !existed_before {
        if let Some(n) = name.as_deref().filter(|n| podman::container_exists(n)) {
            let _ = podman::podman(&["rm", "-f", "-t", "0", n]);
        }
    }
    if let Some(t) = &temp {
        let _ = std::fs::remove_file(t);
    }
    let hook_result = ticket.as_ref().map(RootfsTicket::outcome);
    drop(ticket);
    let hook_secs = match hook_result {
        Some(Some(Err(hook_error))) => {
            return Err(hook_error).context(
                "applying the rootfs diff in the restore hook failed; podman did not restore the container",
            )
        }
        Some(Some(Ok(secs))) => Some(Some(secs)),
        Some(None) => Some(None),
        None => None,
    };
    let id = restored.context("podman could not restore the container")?;
    let diff_secs = match hook_secs {
        Some(Some(secs)) => Some(secs),
        Some(None) => {
            // The runtime never ran the hook: the container runs without its rootfs changes.
            let _ = podman::podman(&["rm", "-f", "-t", "0", &id]);
            bail!("the OCI runtime did not run the rootfs hook during the restore, so container {id} was removed; retry with --apply-diff podman");
        }
        _ => None,
    };
    let secs = started.elapsed().as_secs_f64();
    report(
        &ArchiveLocation::Std,
        a.json,
        quiet,
        serde_json::json!({
            "container": id,
            "convert_seconds": converted_secs,
            "rootfs_apply_seconds": diff_secs,
            "seconds": secs,
        }),
        &format!("restored container {id} in {secs:.2}s (conversion {converted_secs:.2}s)"),
    );
    Ok(())
}

/// A one-shot permission for the restore hook to apply one archive's rootfs diff:
/// a file under /run/ckstream that the hook consumes. The hook stays in the restored
/// container's spec (podman keeps spec.dump), but without its ticket it does nothing.
struct RootfsTicket {
    path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TicketData {
    archive: PathBuf,
    archive_id: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TicketOutcome {
    ok: bool,
    error: Option<String>,
    /// The error was damage in the archive (exit code 3 for the restore too).
    bad_archive: bool,
    seconds: f64,
}

const TICKET_DIR: &str = "/run/ckstream";

impl RootfsTicket {
    fn create(archive: &Path, reader: &ckstream_format::ArchiveReader) -> Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(TICKET_DIR)
            .with_context(|| format!("cannot create {TICKET_DIR}"))?;
        let path = PathBuf::from(format!(
            "{TICKET_DIR}/rootfs-{}-{}.json",
            std::process::id(),
            crate::output::hex(&ckstream_store::new_archive_id()[..8])
        ));
        let data = TicketData {
            archive: std::fs::canonicalize(archive)?,
            archive_id: crate::output::hex(&reader.header().archive_id),
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        f.write_all(&serde_json::to_vec(&data)?)?;
        Ok(RootfsTicket { path })
    }

    fn result_path(ticket: &Path) -> PathBuf {
        ticket.with_extension("result")
    }

    /// The prestart hook: `sh` checks for the ticket (so a later start of the restored
    /// container, or a missing ckstream, is harmless) and hands over to ckstream.
    fn hook(&self) -> Result<serde_json::Value> {
        let exe = std::env::current_exe().context("locating the ckstream binary")?;
        Ok(serde_json::json!({
            "path": "/bin/sh",
            "args": [
                "sh", "-c",
                "[ -e \"$0\" ] || exit 0; exec \"$1\" __podman-rootfs-hook \"$0\"",
                self.path, exe,
            ],
        }))
    }

    /// `None` when the hook never ran; else its success (seconds) or error.
    fn outcome(&self) -> Option<std::result::Result<f64, anyhow::Error>> {
        let bytes = std::fs::read(Self::result_path(&self.path)).ok()?;
        let o: TicketOutcome = match serde_json::from_slice(&bytes) {
            Ok(o) => o,
            Err(e) => return Some(Err(anyhow::anyhow!("unreadable hook result: {e}"))),
        };
        Some(if o.ok {
            Ok(o.seconds)
        } else {
            let msg = o.error.unwrap_or_else(|| "unknown error".into());
            Err(if o.bad_archive {
                ckstream_format::Error::Corrupt(msg).into()
            } else {
                anyhow::anyhow!(msg)
            })
        })
    }
}

impl Drop for RootfsTicket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(Self::result_path(&self.path));
    }
}

/// `ckstream __podman-rootfs-hook TICKET`, run by runc as an OCI prestart hook during
/// `podman container restore`: applies the ticket's archive rootfs diff onto the new
/// container's mounted root (given by the OCI state on stdin and the bundle's
/// config.json). Without a ticket it does nothing.
pub fn rootfs_hook(ticket: &Path) -> Result<()> {
    let Ok(bytes) = std::fs::read(ticket) else {
        return Ok(());
    };
    // One shot: a later start of this container must not apply the diff again.
    let _ = std::fs::remove_file(ticket);
    let started = Instant::now();
    let applied = (|| -> Result<()> {
        let t: TicketData = serde_json::from_slice(&bytes).context("reading the ticket")?;
        let state: serde_json::Value = serde_json::from_reader(std::io::stdin().lock())
            .context("reading the OCI state on stdin")?;
        let bundle = state["bundle"]
            .as_str()
            .context("the OCI state has no bundle")?;
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(Path::new(bundle).join("config.json"))
                .with_context(|| format!("reading {bundle}/config.json"))?,
        )?;
        let root = config["root"]["path"]
            .as_str()
            .context("config.json has no root.path")?;
        let root = Path::new(bundle).join(root);
        let reader = super::open(&ArchiveLocation::Path(t.archive.clone()))?;
        if crate::output::hex(&reader.header().archive_id) != t.archive_id {
            bail!(
                "{} is not the archive the restore started with",
                t.archive.display()
            );
        }
        let opts = ckstream_fs::UnpackOptions {
            strip_prefix: Some(CKA_ROOTFS_DIR.as_bytes().to_vec()),
            overlay_apply: true,
            ..Default::default()
        };
        ckstream_fs::unpack(
            &reader,
            &root,
            &[],
            &opts,
            &ckstream_fs::UnpackStats::default(),
        )
        .with_context(|| format!("applying the rootfs diff onto {}", root.display()))?;
        Ok(())
    })();
    let outcome = TicketOutcome {
        ok: applied.is_ok(),
        error: applied.as_ref().err().map(|e| format!("{e:#}")),
        bad_archive: applied.as_ref().err().is_some_and(|e| {
            e.chain().any(|c| {
                c.downcast_ref::<ckstream_format::Error>()
                    .is_some_and(|f| f.is_bad_archive())
            })
        }),
        seconds: started.elapsed().as_secs_f64(),
    };
    std::fs::write(
        RootfsTicket::result_path(ticket),
        serde_json::to_vec(&outcome)?,
    )?;
    applied
}

/// Refuses anything but a local file or standard output where only those will do.
fn local_only(location: &ArchiveLocation, what: &str) -> Result<()> {
    if !matches!(location, ArchiveLocation::Std | ArchiveLocation::Path(_)) {
        bail!("{what} must be a local file or `-` ({location}); write a .cka there instead (--format cka)");
    }
    Ok(())
}

/// True when `path` starts with a `.cka` shard header.
fn is_cka(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 8];
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let n = std::io::Read::read(&mut f, &mut magic)?;
    Ok(n == 8 && magic == ckstream_format::layout::SHARD_MAGIC)
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
