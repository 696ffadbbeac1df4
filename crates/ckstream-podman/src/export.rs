//! Writing podman's checkpoint export layout (see [`crate::layout`]) as one
//! block-aligned tar, either straight from a container's storage or from a `.cka`.
//!
//! The nested `rootfs-diff.tar` is written in place inside the outer tar (its size is
//! computed first by a counting pass), so every byte is written once, and on
//! btrfs/XFS file data is shared by reflink with the container's upper directory or
//! with the `.cka` it comes from.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ckstream_format::{ArchiveReader, CodecId, Entry, EntryKind, Error, Progress, Result, Stop};
use ckstream_fs::{plan_inputs, PackInput, PackPlan};
use ckstream_store::ArchiveLocation;

use crate::layout::{
    is_excluded, BUNDLE_FILES, CKA_CRIU_DIR, CKA_PODMAN_DIR, CKA_ROOTFS_DIR, DELETED_FILES,
    PODMAN_CHECKPOINT_DIR, ROOTFS_DIFF_TAR,
};
use crate::tar::{Member, TarStats, TarWriter};

/// Where a member's data comes from.
#[derive(Debug)]
pub enum Content {
    /// No data (directories, links, devices, empty files).
    None,
    /// A file on disk.
    Disk(PathBuf),
    /// Entry `i` of the `.cka` being exported.
    Archive(usize),
    /// Bytes produced here (`deleted.files`).
    Bytes(Vec<u8>),
}

/// One tar member: its metadata (path relative to the tar it lands in) and content.
#[derive(Debug)]
pub struct Item {
    /// Its metadata and place in the tar.
    pub entry: Entry,
    /// Where its data comes from.
    pub content: Content,
}

/// Everything that goes into a podman export archive.
#[derive(Debug, Default)]
pub struct ExportPlan {
    /// Bundle files and `checkpoint/` (CRIU images), in podman's order.
    pub outer: Vec<Item>,
    /// Members of the nested `rootfs-diff.tar`.
    pub rootfs: Vec<Item>,
    /// Absolute container paths for `deleted.files`.
    pub deleted: Vec<String>,
    /// Modification time for the generated members.
    pub mtime_ns: i64,
    /// Leave out `rootfs-diff.tar` and `deleted.files` (the diff is applied another way).
    pub skip_rootfs: bool,
}

impl ExportPlan {
    /// Bytes of file data to move (for progress).
    pub fn data_bytes(&self) -> u64 {
        self.outer
            .iter()
            .chain(&self.rootfs)
            .filter(|i| i.entry.entry_kind() == EntryKind::File)
            .map(|i| i.entry.size)
            .sum()
    }
}

fn strip(path: &[u8], prefix: &[u8]) -> Option<Vec<u8>> {
    if path == prefix {
        return Some(Vec::new());
    }
    path.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix(b"/"))
        .map(<[u8]>::to_vec)
}

/// A rootfs-diff member from an upper-dir entry stored under `prefix`: `None` for the
/// root itself, whiteouts (they become `deleted.files`) and paths podman excludes.
fn rootfs_item(mut entry: Entry, prefix: &[u8], content: Content) -> Option<Item> {
    let rel = strip(&entry.path, prefix)?;
    if rel.is_empty() || ckstream_fs::is_whiteout(&entry) || is_excluded(&rel) {
        return None;
    }
    if entry.entry_kind() == EntryKind::Hardlink {
        entry.link_target = strip(&entry.link_target, prefix)?;
    }
    entry.path = rel;
    Some(Item { entry, content })
}

/// Plans an export straight from a container's storage: the bundle files present in
/// `bundle` (podman's order), `bundle/checkpoint`, the upper directory as already
/// walked by the caller (`upper`: [`plan_inputs`] of it under [`CKA_ROOTFS_DIR`], which
/// the caller also needs for the deletions), and the given deletions.
///
/// Walk the upper directory as an overlay input with the container's merged view
/// ([`ckstream_fs::rootfs_diff_input`]): metacopy files then carry their merged path
/// as data source (so the nested tar gets their full data) and redirected
/// directories are opaque with their complete contents, which
/// [`crate::diff::deleted_files`] turns into the right `deleted.files`.
///
/// # Errors
/// I/O errors walking the bundle.
pub fn plan_from_storage(
    bundle: &Path,
    upper: PackPlan,
    deleted: Vec<String>,
) -> Result<ExportPlan> {
    let mut inputs: Vec<PackInput> = BUNDLE_FILES
        .iter()
        .map(|n| PackInput::new(n.as_bytes(), bundle.join(n)))
        .filter(|i| i.path.symlink_metadata().is_ok())
        .collect();
    inputs.push(PackInput::new(
        PODMAN_CHECKPOINT_DIR.as_bytes(),
        bundle.join(PODMAN_CHECKPOINT_DIR),
    ));
    let mut plan = ExportPlan {
        deleted,
        mtime_ns: now_ns(),
        ..Default::default()
    };
    for p in plan_inputs(&inputs)?.entries {
        let content = disk_content(&p.entry, p.source);
        plan.outer.push(Item {
            entry: p.entry,
            content,
        });
    }
    for p in upper.entries {
        let content = disk_content(&p.entry, p.source);
        plan.rootfs
            .extend(rootfs_item(p.entry, CKA_ROOTFS_DIR.as_bytes(), content));
    }
    Ok(plan)
}

fn disk_content(e: &Entry, source: PathBuf) -> Content {
    if e.entry_kind() == EntryKind::File && e.size > 0 {
        Content::Disk(source)
    } else {
        Content::None
    }
}

/// Plans an export of a `.cka` written by `ckstream podman checkpoint` (or `import`).
///
/// # Errors
/// [`Error::Usage`] when the archive lacks podman's `config.dump`/`spec.dump` or
/// CRIU images; [`Error::Corrupt`] when its `deleted.files` is not a JSON list of
/// safe absolute paths; [`Error::UnsafeEntry`] for anything but files and directories
/// under `podman/` and `criu/`.
pub fn plan_from_cka(reader: &ArchiveReader) -> Result<ExportPlan> {
    let mut plan = ExportPlan {
        mtime_ns: reader.header().created_unix_ns as i64,
        ..Default::default()
    };
    let podman = CKA_PODMAN_DIR.as_bytes();
    let criu = CKA_CRIU_DIR.as_bytes();
    let rootfs = CKA_ROOTFS_DIR.as_bytes();
    let mut bundle: Vec<(usize, Item)> = Vec::new();
    let mut checkpoint = Vec::new();
    let mut deleted_json = None;
    let mut whiteouts = Vec::new();
    // podman extracts podman/ and criu/ into the container's bundle directory, where
    // a link would redirect what podman later writes or bind-mounts there. (CRIU
    // images have no hard links; one is left out below.)
    let outer_kind_ok = |e: &Entry, hardlink_ok: bool| match e.entry_kind() {
        EntryKind::File | EntryKind::Dir => Ok(()),
        EntryKind::Hardlink if hardlink_ok => Ok(()),
        kind => Err(Error::UnsafeEntry(format!(
            "{} is a {}; only files and directories belong in podman/ and criu/",
            e.path_lossy(),
            kind.name()
        ))),
    };
    for (i, e) in reader.entries().iter().enumerate() {
        let content = || {
            if e.entry_kind() == EntryKind::File && e.size > 0 {
                Content::Archive(i)
            } else {
                Content::None
            }
        };
        if let Some(rel) = strip(&e.path, podman) {
            if rel.is_empty() {
                continue;
            }
            outer_kind_ok(e, false)?;
            if rel == DELETED_FILES.as_bytes() {
                deleted_json = Some(i);
                continue;
            }
            let top = rel.split(|&b| b == b'/').next().unwrap_or(&rel);
            let order = BUNDLE_FILES
                .iter()
                .position(|n| n.as_bytes() == top)
                .unwrap_or(BUNDLE_FILES.len());
            let mut entry = e.clone();
            entry.path = rel;
            bundle.push((
                order,
                Item {
                    entry,
                    content: content(),
                },
            ));
        } else if let Some(rel) = strip(&e.path, criu) {
            outer_kind_ok(e, true)?;
            let mut entry = e.clone();
            entry.path = if rel.is_empty() {
                PODMAN_CHECKPOINT_DIR.as_bytes().to_vec()
            } else {
                [PODMAN_CHECKPOINT_DIR.as_bytes(), b"/", &rel].concat()
            };
            if entry.entry_kind() == EntryKind::Hardlink {
                continue; // CRIU images have no hard links; nothing sensible to map.
            }
            checkpoint.push(Item {
                entry,
                content: content(),
            });
        } else if strip(&e.path, rootfs).is_some() {
            if ckstream_fs::is_whiteout(e) {
                if let Some(rel) = strip(&e.path, rootfs) {
                    whiteouts.push(rel);
                }
            }
            plan.rootfs
                .extend(rootfs_item(e.clone(), rootfs, content()));
        }
    }
    let has = |name: &str| {
        bundle
            .iter()
            .any(|(_, it)| it.entry.path == name.as_bytes())
    };
    if !has(crate::layout::CONFIG_DUMP) || !has(crate::layout::SPEC_DUMP) {
        return Err(Error::Usage(
            "the archive has no podman/config.dump and podman/spec.dump: it was not written by `ckstream podman checkpoint` or `ckstream podman import`".into(),
        ));
    }
    if checkpoint.is_empty() {
        return Err(Error::Usage(
            "the archive has no CRIU images (criu/)".into(),
        ));
    }
    bundle.sort_by_key(|(order, _)| *order);
    plan.outer = bundle.into_iter().map(|(_, it)| it).collect();
    if !checkpoint
        .iter()
        .any(|it| it.entry.path == PODMAN_CHECKPOINT_DIR.as_bytes())
    {
        checkpoint.insert(0, dir_item(PODMAN_CHECKPOINT_DIR, plan.mtime_ns));
    }
    plan.outer.extend(checkpoint);
    plan.deleted = match deleted_json {
        Some(i) => {
            let mut buf = Vec::new();
            reader.copy_entry(i, &mut buf)?;
            crate::deleted::parse(&buf)?
        }
        None => whiteouts
            .into_iter()
            .filter(|rel| !is_excluded(rel))
            .map(|rel| format!("/{}", String::from_utf8_lossy(&rel)))
            .collect(),
    };
    Ok(plan)
}

fn dir_item(name: &str, mtime_ns: i64) -> Item {
    Item {
        entry: Entry {
            path: name.as_bytes().to_vec(),
            kind: EntryKind::Dir as i32,
            mode: 0o700,
            mtime_ns,
            ..Default::default()
        },
        content: Content::None,
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn member(e: &Entry) -> Member<'_> {
    let kind = e.entry_kind();
    Member {
        path: &e.path,
        kind,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime_ns: e.mtime_ns,
        size: if kind == EntryKind::File { e.size } else { 0 },
        link_target: if matches!(kind, EntryKind::Symlink | EntryKind::Hardlink) {
            &e.link_target
        } else {
            b""
        },
        rdev: (e.rdev_major, e.rdev_minor),
        xattrs: e
            .xattrs
            .iter()
            .filter(|x| {
                !x.name.starts_with(b"trusted.overlay.") && !x.name.starts_with(b"user.overlay.")
            })
            .map(|x| (&x.name[..], &x.value[..]))
            .collect(),
    }
}

/// Bytes of a disk file copied between progress reports (a multiple of any block size).
const DISK_PIECE: u64 = 16 << 20;

fn interrupted() -> Error {
    Error::interrupted("writing the podman archive")
}

fn tar_err(what: &[u8], e: io::Error) -> Error {
    Error::io(
        format!("writing {} to the tar", String::from_utf8_lossy(what)),
        e,
    )
}

fn write_item(
    w: &mut TarWriter,
    item: &Item,
    reader: Option<&ArchiveReader>,
    progress: &dyn Fn(u64) -> bool,
) -> Result<()> {
    let e = &item.entry;
    if e.entry_kind() == EntryKind::Socket {
        return Ok(()); // tar has no sockets; podman skips them as well
    }
    if !progress(0) {
        return Err(interrupted());
    }
    w.header(&member(e)).map_err(|x| tar_err(&e.path, x))?;
    match &item.content {
        Content::None => {}
        Content::Bytes(b) => w.data_bytes(b).map_err(|x| tar_err(&e.path, x))?,
        Content::Disk(path) => {
            let f = File::open(path)
                .map_err(|x| Error::io(format!("cannot open {}", path.display()), x))?;
            // In pieces, so that a stop request is noticed within one piece.
            let mut off = 0;
            while off < e.size {
                let n = (e.size - off).min(DISK_PIECE);
                w.data_from_file(&f, off, n)
                    .map_err(|x| tar_err(&e.path, x))?;
                off += n;
                if !progress(n) {
                    return Err(interrupted());
                }
            }
        }
        Content::Archive(i) => {
            let reader = reader.ok_or_else(|| Error::Usage("no archive to read from".into()))?;
            let source = &reader.entries()[*i];
            let mut pos = 0u64;
            for c in reader.chunks_of(*i) {
                w.data_zeros(c.file_offset - pos)
                    .map_err(|x| tar_err(&e.path, x))?;
                // Always decode: that verifies the digest before anything is written.
                let data = reader.read_chunk(source, c)?;
                let raw_in_file = c.codec_id() == Some(CodecId::None) && !c.in_shared_frame();
                match reader.raw_file_of(c) {
                    Some(f) if raw_in_file => w.data_from_file(f, c.offset, c.raw_len as u64),
                    _ => w.data_bytes(&data),
                }
                .map_err(|x| tar_err(&e.path, x))?;
                pos = c.file_end();
                if !progress(c.raw_len as u64) {
                    return Err(interrupted());
                }
            }
            w.data_zeros(e.size - pos)
                .map_err(|x| tar_err(&e.path, x))?;
        }
    }
    w.end_member().map_err(|x| tar_err(&e.path, x))
}

fn write_rootfs(
    w: &mut TarWriter,
    items: &[Item],
    reader: Option<&ArchiveReader>,
    progress: &dyn Fn(u64) -> bool,
) -> Result<()> {
    for item in items {
        write_item(w, item, reader, progress)?;
    }
    w.finish_archive()
        .map_err(|x| tar_err(b"rootfs-diff.tar", x))
}

/// Size of the nested rootfs tar as `w` would lay it out.
fn nested_size(items: &[Item], align: bool) -> Result<u64> {
    let mut c = TarWriter::counting(align);
    for item in items {
        let e = &item.entry;
        if e.entry_kind() == EntryKind::Socket {
            continue;
        }
        c.header(&member(e)).map_err(|x| tar_err(&e.path, x))?;
        if e.entry_kind() == EntryKind::File {
            c.data_zeros(e.size).map_err(|x| tar_err(&e.path, x))?;
        }
        c.end_member().map_err(|x| tar_err(&e.path, x))?;
    }
    c.finish_archive()
        .map_err(|x| tar_err(b"rootfs-diff.tar", x))?;
    Ok(c.position())
}

/// Writes the whole export archive described by `plan` to `w` (its nested rootfs tar
/// aligned like `w`), counting data bytes in `progress` and stopping when `stop` asks.
///
/// # Errors
/// Read errors of the sources (digest mismatches of a `.cka` among them), write errors
/// of the output, [`Error::interrupted`] when stopped.
pub fn write_export(
    w: &mut TarWriter,
    plan: &ExportPlan,
    reader: Option<&ArchiveReader>,
    progress: &Progress,
    stop: Stop,
) -> Result<TarStats> {
    let align = w.is_aligned();
    let progress = &|n: u64| {
        progress.add(n);
        !stop.requested()
    };
    for item in &plan.outer {
        write_item(w, item, reader, progress)?;
    }
    if plan.skip_rootfs {
        w.finish_archive()
            .map_err(|x| tar_err(b"end of archive", x))?;
        return Ok(w.stats());
    }
    let size = nested_size(&plan.rootfs, align)?;
    let diff = file_entry(ROOTFS_DIFF_TAR, size, 0o644, plan.mtime_ns);
    w.nested_member(&member(&diff), |w| {
        write_rootfs(w, &plan.rootfs, reader, progress)
    })?;
    let mut json = serde_json::to_vec_pretty(&plan.deleted)
        .map_err(|e| Error::io("encoding deleted.files", io::Error::other(e)))?;
    json.push(b'\n');
    let deleted = Item {
        entry: file_entry(DELETED_FILES, json.len() as u64, 0o600, plan.mtime_ns),
        content: Content::Bytes(json),
    };
    write_item(w, &deleted, reader, progress)?;
    w.finish_archive()
        .map_err(|x| tar_err(b"end of archive", x))?;
    Ok(w.stats())
}

fn file_entry(name: &str, size: u64, mode: u32, mtime_ns: i64) -> Entry {
    Entry {
        path: name.as_bytes().to_vec(),
        kind: EntryKind::File as i32,
        mode,
        size,
        mtime_ns,
        ..Default::default()
    }
}

/// True for the `checkpoint` directory of an export and what is in it.
pub fn is_checkpoint_member(path: &[u8]) -> bool {
    path.strip_prefix(PODMAN_CHECKPOINT_DIR.as_bytes())
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
}

/// The export `plan` as bytes in memory (for small plans: the bundle files alone).
///
/// # Errors
/// The errors of [`write_export`].
pub fn export_bytes(plan: &ExportPlan, reader: &ArchiveReader) -> Result<Vec<u8>> {
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Shared::default();
    let mut w = TarWriter::to_stream(Box::new(buf.clone()));
    write_export(
        &mut w,
        plan,
        Some(reader),
        &Progress::default(),
        Stop::NEVER,
    )?;
    w.into_file()
        .map_err(|e| Error::io("writing the podman archive in memory", e))?;
    let bytes = std::mem::take(&mut *buf.0.lock().expect("not poisoned"));
    Ok(bytes)
}

/// Replaces the content of the outer member `name` (e.g. `spec.dump`) with `bytes`.
///
/// # Errors
/// [`Error::Usage`] when the plan has no such member.
pub fn replace_member(plan: &mut ExportPlan, name: &str, bytes: Vec<u8>) -> Result<()> {
    let item = plan
        .outer
        .iter_mut()
        .find(|i| i.entry.path == name.as_bytes())
        .ok_or_else(|| Error::Usage(format!("no {name} to replace")))?;
    item.entry.size = bytes.len() as u64;
    item.content = Content::Bytes(bytes);
    Ok(())
}

/// Adds an OCI `prestart` hook to a runtime spec (podman's `spec.dump`), dropping the
/// hooks earlier ckstream restores left there ([`crate::hook::is_own_hook`]). runc runs
/// prestart hooks during a restore too, after the container's root is mounted and
/// before CRIU opens any file in it.
///
/// # Errors
/// [`Error::Corrupt`] when the spec is not a JSON object.
pub fn add_prestart_hook(spec: &[u8], hook: serde_json::Value) -> Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(spec)
        .map_err(|e| Error::Corrupt(format!("spec.dump is not JSON: {e}")))?;
    let hooks = v
        .as_object_mut()
        .ok_or_else(|| Error::Corrupt("spec.dump is not a JSON object".into()))?
        .entry("hooks")
        .or_insert_with(|| serde_json::json!({}));
    let prestart = hooks
        .as_object_mut()
        .ok_or_else(|| Error::Corrupt("spec.dump hooks is not an object".into()))?
        .entry("prestart")
        .or_insert_with(|| serde_json::json!([]));
    let prestart = prestart
        .as_array_mut()
        .ok_or_else(|| Error::Corrupt("spec.dump prestart hooks is not a list".into()))?;
    // The hooks of earlier ckstream restores of this container, inert without their
    // tickets, would pile up from one generation of checkpoints to the next.
    prestart.retain(|h| !crate::hook::is_own_hook(h));
    prestart.push(hook);
    serde_json::to_vec_pretty(&v).map_err(|e| Error::io("encoding spec.dump", io::Error::other(e)))
}

/// Writes the podman export `plan` to `output` (a local file or standard output): an
/// uncompressed tar with block-aligned file data (reflinked where the filesystem
/// allows), or a zstd stream at `zstd_level`. A file is written under a temporary name,
/// synced and renamed into place only when complete. Returns the tar statistics and the
/// bytes written.
///
/// # Errors
/// [`Error::Usage`] for an output that is neither a local file nor standard output; the
/// errors of [`write_export`]; I/O errors of the output. Nothing is left at the output
/// path on failure.
pub fn write_podman_archive(
    output: &ArchiveLocation,
    zstd_level: Option<i32>,
    plan: &ExportPlan,
    reader: Option<&ArchiveReader>,
    progress: &Progress,
    stop: Stop,
) -> Result<(TarStats, u64)> {
    progress.set_total(plan.data_bytes());
    let path = match output {
        ArchiveLocation::Std => None,
        ArchiveLocation::Path(p) => Some(p),
        other => {
            return Err(Error::Usage(format!(
                "a podman-format archive must be a local file or `-` ({other}); write a .cka there instead"
            )))
        }
    };
    let Some(path) = path else {
        let stdout: Box<dyn Write + Send> =
            Box::new(io::BufWriter::with_capacity(1 << 20, io::stdout()));
        let out: Box<dyn Write + Send> = match zstd_level {
            Some(l) => Box::new(zstd_writer(stdout, l)?),
            None => stdout,
        };
        let mut w = TarWriter::to_stream(out);
        let stats = write_export(&mut w, plan, reader, progress, stop)?;
        let written = w.position();
        w.into_file()
            .map_err(|e| Error::io("finishing the podman archive on stdout", e))?;
        return Ok((stats, written));
    };
    let (file, pending) = ckstream_store::create_file_atomically(path)?;
    let written = (|| -> Result<(TarStats, u64)> {
        let io_err = |e| Error::io(format!("writing {}", path.display()), e);
        let (stats, file) = match zstd_level {
            None => {
                let mut w = TarWriter::to_file(file, true);
                let stats = write_export(&mut w, plan, reader, progress, stop)?;
                (stats, w.into_file().map_err(io_err)?)
            }
            Some(l) => {
                let out = io::BufWriter::with_capacity(1 << 20, file.try_clone().map_err(io_err)?);
                let mut w = TarWriter::to_stream(Box::new(zstd_writer(out, l)?));
                let stats = write_export(&mut w, plan, reader, progress, stop)?;
                w.into_file().map_err(io_err)?;
                (stats, Some(file))
            }
        };
        let file = file.expect("a file output");
        file.sync_all().map_err(io_err)?;
        Ok((stats, file.metadata().map_err(io_err)?.len()))
    })();
    match written {
        Ok(done) => pending.publish().map(|()| done),
        Err(e) => {
            pending.discard();
            Err(e)
        }
    }
}

/// podman's zstd stream, tuned for memory images.
fn zstd_writer<W: Write + Send + 'static>(
    w: W,
    level: i32,
) -> Result<zstd::stream::AutoFinishEncoder<'static, W>> {
    let setup = || -> io::Result<zstd::stream::AutoFinishEncoder<'static, W>> {
        let mut enc = zstd::stream::write::Encoder::new(w, level)?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        enc.multithread(threads as u32)?;
        // Memory images repeat pages and library code far apart: a 32 MiB window with
        // long-distance matching makes a CRIU memory image ~10 % smaller at the same
        // speed (measured with zstd -3 on a memtest mixed dump), and any zstd decoder
        // accepts it.
        enc.long_distance_matching(true)?;
        enc.window_log(25)?;
        Ok(enc.auto_finish())
    };
    setup().map_err(|e| Error::io("starting the zstd encoder", e))
}
