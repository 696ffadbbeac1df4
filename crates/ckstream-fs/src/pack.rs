//! Walking inputs into archive entries and feeding their data to an `ArchiveWriter`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ckstream_format::chunker::{is_memory_image, PageChunker};
use ckstream_format::window::ChunkWindows;
use ckstream_format::{ArchiveWriter, CodecId, Entry, EntryKind, Error, Result, Stop};

use crate::overlay::{indirect_kind, overlay_xattr, Indirect};

/// One command-line input: `PATH` (stored under its file name) or `NAME=PATH`
/// (stored under NAME; `.=PATH` stores a directory's contents at the archive root).
#[derive(Debug, Clone)]
pub struct PackInput {
    /// Archive path prefix; empty for the root.
    pub name: Vec<u8>,
    /// Where it is read from.
    pub path: PathBuf,
    /// Set when `path` is an overlayfs upper directory (a rootfs diff, see
    /// [`rootfs_diff_input`]): how to store its entries that are not complete on
    /// their own (metacopy files, redirected directories).
    pub overlay: Option<Overlay>,
}

impl PackInput {
    /// A plain input: `path` stored under `name`.
    pub fn new(name: impl Into<Vec<u8>>, path: impl Into<PathBuf>) -> Self {
        PackInput {
            name: name.into(),
            path: path.into(),
            overlay: None,
        }
    }
}

/// How an overlayfs upper directory is stored.
///
/// Everything is stored as it is in the upper directory (whiteouts, opaque
/// directories, metadata, holes; file data read from the upper directory so it can
/// be reflinked), except two kinds of entries that only make sense together with the
/// lower layers, which are read through the overlay's `merged` view instead:
///
/// - a complete file keeps only its non-redirect xattrs (a renamed lower file whose
///   data was copied up after the rename keeps an `overlay.redirect` that means
///   nothing without the lower layers);
/// - a **metacopy** file (`overlay.metacopy`: only its metadata was copied up) is
///   stored as a regular file with the upper file's metadata and its full data read
///   from the merged path; its `overlay.metacopy`, `overlay.redirect` and
///   `overlay.origin` xattrs are dropped;
/// - a **redirected directory** (`overlay.redirect`: a renamed lower directory) is
///   stored as an opaque directory (`overlay.opaque=y`, in the namespace of its
///   redirect xattr; its other overlay xattrs dropped) with its complete contents as
///   the merged view shows them; entries the upper directory has inside it keep
///   their upper metadata and data source, the others come from the merged view.
///
/// Applying such a diff with overlay semantics (see [`crate::UnpackOptions`]) then
/// yields exactly the merged view. Without a merged view these entries are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay {
    /// The root of the overlay's merged mount (see [`crate::overlay::find_merged`]).
    pub merged: Option<PathBuf>,
}

/// Parses `NAME=PATH` or `PATH`.
///
/// # Errors
/// [`Error::Usage`] when no archive name can be derived, or NAME is unsafe.
pub fn parse_input(arg: &OsStr) -> Result<PackInput> {
    let bytes = arg.as_bytes();
    let (name, path) = match bytes.iter().position(|&b| b == b'=') {
        Some(i)
            if !Path::new(OsStr::from_bytes(&bytes[i + 1..]))
                .as_os_str()
                .is_empty() =>
        {
            (
                bytes[..i].to_vec(),
                PathBuf::from(OsStr::from_bytes(&bytes[i + 1..])),
            )
        }
        _ => {
            let p = PathBuf::from(arg);
            let name = p
                .canonicalize()
                .ok()
                .and_then(|c| c.file_name().map(|n| n.as_bytes().to_vec()))
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "cannot derive an archive name for {}; use NAME=PATH",
                        p.display()
                    ))
                })?;
            (name, p)
        }
    };
    let name: Vec<u8> = name.strip_suffix(b"/").map(|n| n.to_vec()).unwrap_or(name);
    let name = if name == b"." { Vec::new() } else { name };
    if !name.is_empty() {
        ckstream_format::index::validate_path(&name)
            .map_err(|e| Error::Usage(format!("archive name: {e}")))?;
    }
    Ok(PackInput::new(name, path))
}

/// Archive directory holding a container's rootfs changes (an overlayfs upper dir).
pub const ROOTFS_PREFIX: &[u8] = b"rootfs";

/// The input that stores overlayfs upper directory `upper` under [`ROOTFS_PREFIX`],
/// reading metacopy files and redirected directories through `merged` (the overlay's
/// merged mount), see [`Overlay`]. Only checks that both are directories:
/// [`plan_inputs`] refuses indirect entries when `merged` is `None` (and
/// [`crate::overlay::find_indirect`] finds them beforehand); whether `merged` is
/// really that overlay is for [`crate::overlay::check_merged`].
///
/// # Errors
/// [`Error::Usage`] when `upper` (or `merged`, if given) is not a directory.
pub fn rootfs_diff_input(upper: &Path, merged: Option<&Path>) -> Result<PackInput> {
    if !upper.is_dir() {
        return Err(Error::Usage(format!(
            "{} is not a directory (an overlayfs upper dir)",
            upper.display()
        )));
    }
    if let Some(m) = merged.filter(|m| !m.is_dir()) {
        return Err(Error::Usage(format!(
            "{} is not a directory (the overlay's merged view)",
            m.display()
        )));
    }
    Ok(PackInput {
        name: ROOTFS_PREFIX.to_vec(),
        path: upper.to_path_buf(),
        overlay: Some(Overlay {
            merged: merged.map(Path::to_path_buf),
        }),
    })
}

/// The input for overlay upper dir `upper`, ready to be walked later (for `dump`, while
/// the process tree is frozen): the overlay's merged view is `merged` (checked to be
/// that overlay) or found by its `upperdir=` in `/proc/self/mountinfo`; without one,
/// `upper` is scanned (directory listings and xattr names only) and refused if it holds
/// a metacopy file or a redirected directory, which only the merged view can supply.
/// Meant to run before anything is frozen, so that what cannot be stored is refused
/// while refusing costs nothing.
///
/// # Errors
/// [`Error::Usage`] when `upper` is not a directory, `merged` is not its overlay, or
/// `upper` needs a merged view and none was found; I/O errors of the scan.
pub fn prepare_rootfs_diff(upper: &Path, merged: Option<&Path>) -> Result<PackInput> {
    if !upper.is_dir() {
        return Err(Error::Usage(format!(
            "{} is not a directory (an overlayfs upper dir)",
            upper.display()
        )));
    }
    let merged = match merged {
        Some(m) => {
            crate::overlay::check_merged(upper, m).map_err(|e| match e {
                Error::Usage(msg) => Error::Usage(format!("{}: {msg}", m.display())),
                other => other,
            })?;
            Some(m.to_path_buf())
        }
        None => crate::overlay::find_merged(upper)?,
    };
    if merged.is_none() {
        if let Some(found) = crate::overlay::find_indirect(upper)? {
            return Err(Error::Usage(format!(
                "{} is {}; storing it needs the overlay's merged view, and no mounted overlay \
                 has upperdir={} (/proc/self/mountinfo): mount the overlay, or pass its merged \
                 directory with --rootfs-merged DIR",
                found.path.display(),
                found.kind.describe(),
                upper.display()
            )));
        }
    }
    rootfs_diff_input(upper, merged.as_deref())
}

/// One planned entry: its metadata and, for files, where the data comes from.
#[derive(Debug)]
pub struct Planned {
    /// The entry, with its final metadata.
    pub entry: Entry,
    /// Where its data is read from (files only).
    pub source: PathBuf,
}

/// Every entry to pack, in archive order, with the total bytes of file data.
#[derive(Debug, Default)]
pub struct PackPlan {
    /// Every entry, in archive order.
    pub entries: Vec<Planned>,
    /// Bytes of file data to read.
    pub total_bytes: u64,
}

fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        name.to_vec()
    } else {
        let mut v = prefix.to_vec();
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

fn io_err(path: &Path, what: &str, e: io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

/// Walks the inputs (directories recursively, children sorted by name) and builds
/// entries with full metadata. Hard links to a file already planned become
/// `Hardlink` entries. Overlay inputs ([`PackInput::overlay`]) are stored as
/// [`Overlay`] describes.
///
/// # Errors
/// I/O errors naming the path; [`Error::UnsafeEntry`] for duplicate archive paths;
/// [`Error::Usage`] for an overlay input with a metacopy file or redirected
/// directory but no merged view, or a merged view that does not match the upper
/// directory (a metacopy file missing there or of another size).
pub fn plan_inputs(inputs: &[PackInput]) -> Result<PackPlan> {
    let mut w = Walker::default();
    for input in inputs {
        let meta = std::fs::symlink_metadata(&input.path)
            .map_err(|e| io_err(&input.path, "cannot read", e))?;
        if input.name.is_empty() && !meta.is_dir() {
            return Err(Error::Usage(format!(
                "{} is not a directory; '.=' needs one",
                input.path.display()
            )));
        }
        match &input.overlay {
            None if input.name.is_empty() => w.walk_dir(&input.path, b"")?,
            None => w.add_path(&input.path, &meta, input.name.clone())?,
            Some(ov) => {
                let ctx = OverlayCtx {
                    upper: &input.path,
                    merged: ov.merged.as_deref(),
                };
                if input.name.is_empty() {
                    w.overlay_children(&ctx, Path::new(""), b"", false)?;
                } else {
                    w.overlay_entry(&ctx, Path::new(""), input.name.clone(), false)?;
                }
            }
        }
    }
    Ok(w.plan)
}

/// Where an overlay input's entries are read from.
struct OverlayCtx<'a> {
    upper: &'a Path,
    merged: Option<&'a Path>,
}

impl OverlayCtx<'_> {
    fn upper_path(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.upper.to_path_buf()
        } else {
            self.upper.join(rel)
        }
    }

    /// The merged path of `rel`, or the error refusing `kind` at `upath`.
    fn merged_path(&self, rel: &Path, upath: &Path, kind: Indirect) -> Result<PathBuf> {
        match self.merged {
            Some(m) if rel.as_os_str().is_empty() => Ok(m.to_path_buf()),
            Some(m) => Ok(m.join(rel)),
            None => Err(Error::Usage(format!(
                "{} is {}; storing it needs the overlay's merged view (its mount), and none was found or given",
                upath.display(),
                kind.describe()
            ))),
        }
    }
}

/// Xattrs of an upper entry stored in full: `drop` decides which overlay xattrs
/// (by name without namespace) go.
fn without_overlay_xattrs(xattrs: &mut Vec<ckstream_format::Xattr>, drop: impl Fn(&[u8]) -> bool) {
    xattrs.retain(|x| !overlay_xattr(&x.name).is_some_and(&drop));
}

#[derive(Default)]
struct Walker {
    plan: PackPlan,
    /// First archive path of each multiply-linked inode: (read through the merged
    /// view, dev, ino), so that inode numbers the overlay reports never pair up with
    /// those of the upper directory.
    seen_inodes: HashMap<(bool, u64, u64), Vec<u8>>,
    seen_paths: HashMap<Vec<u8>, ()>,
}

impl Walker {
    fn walk_dir(&mut self, dir: &Path, prefix: &[u8]) -> Result<()> {
        for name in sorted_children(dir)? {
            let path = dir.join(&name);
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| io_err(&path, "cannot read", e))?;
            self.add_path(&path, &meta, join(prefix, name.as_bytes()))?;
        }
        Ok(())
    }

    fn add_path(&mut self, path: &Path, meta: &std::fs::Metadata, name: Vec<u8>) -> Result<()> {
        let xattrs =
            crate::xattr::read_all(path).map_err(|e| io_err(path, "cannot read xattrs of", e))?;
        let kind = self.push(path, meta, name.clone(), xattrs, false)?;
        if kind == EntryKind::Dir {
            self.walk_dir(path, &name)?;
        }
        Ok(())
    }

    /// Plans one entry (hard links to an inode already planned become `Hardlink`
    /// entries) with data from `source`; returns its kind.
    fn push(
        &mut self,
        source: &Path,
        meta: &std::fs::Metadata,
        name: Vec<u8>,
        xattrs: Vec<ckstream_format::Xattr>,
        via_merged: bool,
    ) -> Result<EntryKind> {
        if self.seen_paths.insert(name.clone(), ()).is_some() {
            return Err(Error::UnsafeEntry(format!(
                "two inputs map to the archive path {:?}",
                String::from_utf8_lossy(&name)
            )));
        }
        let (mut entry, kind) = entry_from_meta(source, meta, name.clone(), xattrs)?;
        if kind == EntryKind::File && meta.nlink() > 1 {
            let key = (via_merged, meta.dev(), meta.ino());
            if let Some(first) = self.seen_inodes.get(&key) {
                entry.link_target = first.clone();
                entry.xattrs.clear();
                entry.size = 0;
                entry.kind = EntryKind::Hardlink as i32;
                self.plan.entries.push(Planned {
                    entry,
                    source: source.to_path_buf(),
                });
                return Ok(EntryKind::Hardlink);
            }
            self.seen_inodes.insert(key, name);
        }
        if kind == EntryKind::File {
            self.plan.total_bytes += entry.size;
        }
        self.plan.entries.push(Planned {
            entry,
            source: source.to_path_buf(),
        });
        Ok(kind)
    }

    /// Plans the overlay entry at `rel` (relative to the upper and merged roots).
    /// `in_merged`: inside a redirected directory, whose listing comes from the merged
    /// view (the entry may then be missing from the upper directory).
    fn overlay_entry(
        &mut self,
        ctx: &OverlayCtx,
        rel: &Path,
        name: Vec<u8>,
        in_merged: bool,
    ) -> Result<()> {
        let upath = ctx.upper_path(rel);
        let umeta = match std::fs::symlink_metadata(&upath) {
            Ok(m) => Some(m),
            Err(e)
                if in_merged
                    && matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
            {
                None
            }
            Err(e) => return Err(io_err(&upath, "cannot read", e)),
        };
        let Some(umeta) = umeta.filter(|m| !(in_merged && is_whiteout_meta(m))) else {
            // Only in a lower layer: as the merged view shows it.
            let mpath = ctx.merged_path(rel, &upath, Indirect::RedirectDir)?;
            let meta =
                std::fs::symlink_metadata(&mpath).map_err(|e| io_err(&mpath, "cannot read", e))?;
            let mut xattrs = crate::xattr::read_all(&mpath)
                .map_err(|e| io_err(&mpath, "cannot read xattrs of", e))?;
            without_overlay_xattrs(&mut xattrs, |_| true);
            if self.push(&mpath, &meta, name.clone(), xattrs, true)? == EntryKind::Dir {
                self.overlay_children(ctx, rel, &name, true)?;
            }
            return Ok(());
        };
        let mut xattrs = crate::xattr::read_all(&upath)
            .map_err(|e| io_err(&upath, "cannot read xattrs of", e))?;
        let indirect = indirect_kind(
            umeta.is_dir(),
            umeta.is_file(),
            xattrs.iter().map(|x| &x.name[..]),
        );
        match indirect {
            Some(Indirect::Metacopy) => {
                let mpath = ctx.merged_path(rel, &upath, Indirect::Metacopy)?;
                let mmeta = std::fs::symlink_metadata(&mpath)
                    .map_err(|e| io_err(&mpath, "cannot read", e))?;
                if !mmeta.is_file() || mmeta.len() != umeta.len() {
                    return Err(Error::Usage(format!(
                        "{} does not match the metacopy file {} (not a regular file of {} bytes): is {} the merged view of {}?",
                        mpath.display(),
                        upath.display(),
                        umeta.len(),
                        ctx.merged.unwrap_or(Path::new("")).display(),
                        ctx.upper.display()
                    )));
                }
                if in_merged {
                    without_overlay_xattrs(&mut xattrs, |_| true);
                } else {
                    without_overlay_xattrs(&mut xattrs, |n| {
                        matches!(n, b"metacopy" | b"redirect" | b"origin")
                    });
                }
                // Upper metadata (and inode, for hard links), data through the merged view.
                let kind = self.push(&upath, &umeta, name, xattrs, false)?;
                if kind == EntryKind::File {
                    self.plan.entries.last_mut().expect("just pushed").source = mpath;
                }
                Ok(())
            }
            Some(Indirect::RedirectDir) => {
                let mpath = ctx.merged_path(rel, &upath, Indirect::RedirectDir)?;
                if !std::fs::symlink_metadata(&mpath).is_ok_and(|m| m.is_dir()) {
                    return Err(Error::Usage(format!(
                        "{} is not a directory like {}: is {} the merged view of {}?",
                        mpath.display(),
                        upath.display(),
                        ctx.merged.unwrap_or(Path::new("")).display(),
                        ctx.upper.display()
                    )));
                }
                let ns: &[u8] = if xattrs
                    .iter()
                    .any(|x| x.name.as_slice() == b"trusted.overlay.redirect")
                {
                    b"trusted"
                } else {
                    b"user"
                };
                without_overlay_xattrs(&mut xattrs, |_| true);
                xattrs.push(ckstream_format::Xattr {
                    name: [ns, b".overlay.opaque"].concat(),
                    value: b"y".to_vec(),
                });
                xattrs.sort_by(|a, b| a.name.cmp(&b.name));
                self.push(&upath, &umeta, name.clone(), xattrs, false)?;
                self.overlay_children(ctx, rel, &name, true)
            }
            None => {
                if in_merged {
                    without_overlay_xattrs(&mut xattrs, |_| true);
                } else if !umeta.is_dir() {
                    // A renamed lower file whose data was copied up since keeps its
                    // redirect: meaningless for a complete file.
                    without_overlay_xattrs(&mut xattrs, |n| n == b"redirect");
                }
                if self.push(&upath, &umeta, name.clone(), xattrs, false)? == EntryKind::Dir {
                    self.overlay_children(ctx, rel, &name, in_merged)?;
                }
                Ok(())
            }
        }
    }

    /// Plans the children of overlay directory `rel`: listed from the upper
    /// directory, or from the merged view inside a redirected directory.
    fn overlay_children(
        &mut self,
        ctx: &OverlayCtx,
        rel: &Path,
        prefix: &[u8],
        in_merged: bool,
    ) -> Result<()> {
        let dir = if in_merged {
            let upath = ctx.upper_path(rel);
            ctx.merged_path(rel, &upath, Indirect::RedirectDir)?
        } else {
            ctx.upper_path(rel)
        };
        for child in sorted_children(&dir)? {
            let crel = rel.join(&child);
            self.overlay_entry(ctx, &crel, join(prefix, child.as_bytes()), in_merged)?;
        }
        Ok(())
    }
}

fn is_whiteout_meta(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    m.file_type().is_char_device() && m.rdev() == 0
}

/// Names in `dir`, sorted.
fn sorted_children(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, "cannot list", e))?
        .map(|c| c.map(|c| c.file_name()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| io_err(dir, "cannot list", e))?;
    names.sort();
    Ok(names)
}

/// An entry with `meta`'s metadata and the given xattrs (symlink targets read from
/// `path`), and its kind.
fn entry_from_meta(
    path: &Path,
    meta: &std::fs::Metadata,
    name: Vec<u8>,
    xattrs: Vec<ckstream_format::Xattr>,
) -> Result<(Entry, EntryKind)> {
    let ft = meta.file_type();
    let mut entry = Entry {
        path: name,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        xattrs,
        ..Default::default()
    };
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| io_err(path, "cannot read link", e))?;
        entry.link_target = target.as_os_str().as_bytes().to_vec();
        EntryKind::Symlink
    } else if ft.is_file() {
        entry.size = meta.len();
        EntryKind::File
    } else {
        let rdev = meta.rdev();
        entry.rdev_major = rustix::fs::major(rdev);
        entry.rdev_minor = rustix::fs::minor(rdev);
        if ft.is_char_device() {
            EntryKind::CharDevice
        } else if ft.is_block_device() {
            EntryKind::BlockDevice
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else {
            EntryKind::Socket
        }
    };
    entry.kind = kind as i32;
    Ok((entry, kind))
}

/// Data regions of a file (SEEK_DATA/SEEK_HOLE), or the whole file when it has no holes.
fn data_ranges(file: &File, size: u64, blocks: u64) -> io::Result<Vec<Range<u64>>> {
    if size == 0 {
        return Ok(Vec::new());
    }
    if blocks * 512 >= size {
        return Ok(std::iter::once(0..size).collect());
    }
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(e) if e == rustix::io::Errno::NXIO => break,
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::OPNOTSUPP => {
                return Ok(std::iter::once(0..size).collect())
            }
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(e) => return Err(e.into()),
        };
        out.push(start..end);
        pos = end;
    }
    Ok(out)
}

/// Counters of a pack run.
#[derive(Debug, Default, Clone)]
pub struct PackStats {
    /// Files whose data was read.
    pub files: u64,
    /// Entries added.
    pub entries: u64,
    /// Bytes of file data read.
    pub bytes_read: u64,
}

/// Adds every planned entry to `writer`, reading file data chunk by chunk (aligned to
/// the writer's chunk size, holes skipped). Uncompressed chunks carry their source
/// file so the sink can reflink them. `stop` is checked before every file and chunk;
/// once it asks, the packing ends with an "interrupted" error (the caller aborts the
/// archive).
///
/// # Errors
/// I/O errors naming the file (including a file that shrank while being read), any
/// writer error, and the interruption.
pub fn pack_inputs(writer: &mut ArchiveWriter, plan: PackPlan, stop: Stop) -> Result<PackStats> {
    let interrupted = || Error::interrupted("packing");
    let chunk = writer.options().chunk_size as u64;
    let cloneable = writer.options().compression.codec == CodecId::None;
    // Compressed archives pack small files together into shared frames: one frame per
    // file would lose most of the compression context (and cost a record per file).
    let small_limit = if cloneable {
        0
    } else {
        (chunk / 8).min(SMALL_FILE)
    };
    // File data is read into windows and handed to the writer without copying.
    let mut windows = ChunkWindows::new((2 * chunk as usize).max(READ_WINDOW));
    let mut bundle: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut bundle_bytes = 0u64;
    let mut stats = PackStats::default();
    for planned in plan.entries {
        if stop.requested() {
            return Err(interrupted());
        }
        let is_file = planned.entry.entry_kind() == EntryKind::File;
        let size = planned.entry.size;
        stats.entries += 1;
        let file = if is_file {
            Some(
                File::open(&planned.source)
                    .map_err(|e| io_err(&planned.source, "cannot open", e))?,
            )
        } else {
            None
        };
        let path = planned.entry.path.clone();
        let id = writer.add_entry(planned.entry)?;
        let Some(file) = file else { continue };
        stats.files += 1;
        // Shared with the writer's workers as the reflink source of uncompressed chunks.
        let file = Arc::new(file);
        let read_err = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::io(
                    format!("{} shrank while being read", planned.source.display()),
                    e,
                )
            } else {
                io_err(&planned.source, "cannot read", e)
            }
        };
        if size > 0 && size <= small_limit {
            if bundle_bytes + size > chunk {
                writer.add_bundle(std::mem::take(&mut bundle))?;
                bundle_bytes = 0;
            }
            let mut buf = vec![0u8; size as usize];
            file.read_exact_at(&mut buf, 0).map_err(read_err)?;
            stats.bytes_read += size;
            bundle.push((id, buf));
            bundle_bytes += size;
            continue;
        }
        let meta = file
            .metadata()
            .map_err(|e| io_err(&planned.source, "cannot stat", e))?;
        let ranges = data_ranges(&file, size, meta.blocks())
            .map_err(|e| io_err(&planned.source, "cannot map holes of", e))?;
        // Process memory (CRIU's pages-*.img) is cut by content, so that an unchanged
        // run of pages gives the same chunks in the next checkpoint wherever it lands.
        let chunker = is_memory_image(&path)
            .then(|| PageChunker::for_memory(chunk as usize, writer.aligns_chunks()));
        for r in ranges {
            // File offset of the first pending byte; every range starts with none.
            let mut off = r.start;
            debug_assert!(windows.pending().is_empty());
            while off < r.end {
                if stop.requested() {
                    return Err(interrupted());
                }
                let have = windows.pending().len() as u64;
                let want = match chunker {
                    Some(_) => chunk - have,
                    None => ((off / chunk) + 1) * chunk - off - have,
                };
                let mut more = (r.end - off - have).min(want) as usize;
                let mut at = off + have;
                while more > 0 {
                    let read = windows.fill(more, |room| {
                        rustix::io::pread(&*file, &mut room[..more], at).map(|(got, _)| got)
                    });
                    let got = match read {
                        Ok(0) => return Err(read_err(io::ErrorKind::UnexpectedEof.into())),
                        Ok(got) => got,
                        Err(rustix::io::Errno::INTR) => continue,
                        Err(e) => return Err(read_err(e.into())),
                    };
                    stats.bytes_read += got as u64;
                    more -= got;
                    at += got as u64;
                }
                let at_end = off + windows.pending().len() as u64 == r.end;
                loop {
                    let pending = windows.pending();
                    let cut = match chunker {
                        Some(c) => c.next_cut(pending, at_end),
                        None => (!pending.is_empty()).then_some(pending.len()),
                    };
                    let Some(n) = cut else { break };
                    let clone = cloneable.then(|| (file.clone(), off));
                    writer.add_data(id, off, windows.take(n), clone)?;
                    off += n as u64;
                }
            }
        }
    }
    writer.add_bundle(bundle)?;
    Ok(stats)
}

/// Files up to this size share compressed frames with their neighbours.
const SMALL_FILE: u64 = 64 << 10;
/// File data is read into windows of at least this size (see [`ChunkWindows`]).
const READ_WINDOW: usize = 2 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn set(p: &Path, name: &str, value: &[u8]) {
        rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty()).unwrap();
    }

    fn names(x: &[ckstream_format::Xattr]) -> Vec<String> {
        x.iter()
            .map(|x| String::from_utf8_lossy(&x.name).into_owned())
            .collect()
    }

    /// An upper dir with `user.overlay.*` xattrs (as with `userxattr`) and a plain
    /// directory standing in for the merged view: the walk takes metacopy data and the
    /// redirected directory's listing from the merged side, everything else from upper.
    #[test]
    fn overlay_inputs_read_indirect_entries_through_the_merged_view() {
        let dir = tempfile::tempdir().unwrap();
        let (upper, merged) = (dir.path().join("upper"), dir.path().join("merged"));
        std::fs::create_dir_all(upper.join("moved/sub")).unwrap();
        std::fs::create_dir_all(merged.join("moved/sub")).unwrap();
        std::fs::create_dir_all(merged.join("moved/lower-dir")).unwrap();
        // A metacopy file: size but no data in upper, the data in merged.
        std::fs::File::create(upper.join("meta"))
            .unwrap()
            .set_len(5)
            .unwrap();
        set(&upper.join("meta"), "user.overlay.metacopy", b"");
        set(&upper.join("meta"), "user.overlay.origin", b"o");
        set(&upper.join("meta"), "user.kept", b"k");
        std::fs::write(merged.join("meta"), b"hello").unwrap();
        // A redirected dir: one upper child, the rest only in the merged view.
        set(&upper.join("moved"), "user.overlay.redirect", b"old");
        set(&upper.join("moved"), "user.overlay.origin", b"o");
        std::fs::write(upper.join("moved/sub/upper-file"), b"upper").unwrap();
        std::fs::write(merged.join("moved/sub/upper-file"), b"upper").unwrap();
        std::fs::write(merged.join("moved/lower-file"), b"lower").unwrap();
        std::fs::write(upper.join("plain"), b"plain").unwrap();
        std::fs::write(merged.join("plain"), b"plain").unwrap();
        // Renamed, then its data copied up: complete, the redirect is dropped.
        std::fs::write(upper.join("renamed"), b"full").unwrap();
        set(&upper.join("renamed"), "user.overlay.redirect", b"/old");
        set(&upper.join("renamed"), "user.overlay.origin", b"o");

        let found = crate::overlay::find_indirect(&upper).unwrap().unwrap();
        assert!(found.path.ends_with("meta") || found.path.ends_with("moved"));

        let input = rootfs_diff_input(&upper, Some(&merged)).unwrap();
        let plan = plan_inputs(&[input]).unwrap();
        let get = |p: &str| {
            plan.entries
                .iter()
                .find(|e| e.entry.path == p.as_bytes())
                .unwrap_or_else(|| panic!("{p} not planned"))
        };
        let meta = get("rootfs/meta");
        assert_eq!(meta.source, merged.join("meta"));
        assert_eq!(meta.entry.size, 5);
        assert_eq!(names(&meta.entry.xattrs), ["user.kept"]);
        let moved = get("rootfs/moved");
        assert_eq!(moved.source, upper.join("moved"));
        assert_eq!(names(&moved.entry.xattrs), ["user.overlay.opaque"]);
        assert_eq!(moved.entry.xattrs[0].value, b"y");
        assert_eq!(
            get("rootfs/moved/sub/upper-file").source,
            upper.join("moved/sub/upper-file")
        );
        assert_eq!(
            get("rootfs/moved/lower-file").source,
            merged.join("moved/lower-file")
        );
        get("rootfs/moved/lower-dir");
        assert_eq!(get("rootfs/plain").source, upper.join("plain"));
        let renamed = get("rootfs/renamed");
        assert_eq!(renamed.source, upper.join("renamed"));
        assert_eq!(names(&renamed.entry.xattrs), ["user.overlay.origin"]);
        assert_eq!(plan.total_bytes, 5 + 5 + 5 + 5 + 4);

        // Without the merged view both are refused, naming the path.
        let input = rootfs_diff_input(&upper, None).unwrap();
        match plan_inputs(&[input]) {
            Err(Error::Usage(m)) => assert!(m.contains("merged view"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A merged view that does not match (the metacopy file's size differs).
        std::fs::write(merged.join("meta"), b"other size").unwrap();
        let input = rootfs_diff_input(&upper, Some(&merged)).unwrap();
        assert!(matches!(plan_inputs(&[input]), Err(Error::Usage(_))));
        // Plain inputs are never treated as overlays.
        let plan = plan_inputs(&[PackInput::new(b"x".to_vec(), &upper)]).unwrap();
        assert!(plan
            .entries
            .iter()
            .any(|e| names(&e.entry.xattrs).contains(&"user.overlay.metacopy".to_string())));
    }
}
