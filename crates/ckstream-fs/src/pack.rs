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

use ckstream_format::{ArchiveWriter, CodecId, Entry, EntryKind, Error, Result};

/// One command-line input: `PATH` (stored under its file name) or `NAME=PATH`
/// (stored under NAME; `.=PATH` stores a directory's contents at the archive root).
#[derive(Debug, Clone)]
pub struct PackInput {
    /// Archive path prefix; empty for the root.
    pub name: Vec<u8>,
    pub path: PathBuf,
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
    Ok(PackInput { name, path })
}

/// Archive directory holding a container's rootfs changes (an overlayfs upper dir).
pub const ROOTFS_PREFIX: &[u8] = b"rootfs";

/// The input that stores overlayfs upper directory `upper` under [`ROOTFS_PREFIX`].
///
/// # Errors
/// [`Error::Usage`] when `upper` is not a directory.
pub fn rootfs_diff_input(upper: &Path) -> Result<PackInput> {
    if !upper.is_dir() {
        return Err(Error::Usage(format!(
            "{} is not a directory (an overlayfs upper dir)",
            upper.display()
        )));
    }
    Ok(PackInput {
        name: ROOTFS_PREFIX.to_vec(),
        path: upper.to_path_buf(),
    })
}

/// One planned entry: its metadata and, for files, where the data comes from.
#[derive(Debug)]
pub struct Planned {
    pub entry: Entry,
    pub source: PathBuf,
}

/// Every entry to pack, in archive order, with the total bytes of file data.
#[derive(Debug, Default)]
pub struct PackPlan {
    pub entries: Vec<Planned>,
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
/// `Hardlink` entries.
///
/// # Errors
/// I/O errors naming the path; [`Error::UnsafeEntry`] for duplicate archive paths.
pub fn plan_inputs(inputs: &[PackInput]) -> Result<PackPlan> {
    let mut plan = PackPlan::default();
    let mut seen_inodes: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut seen_paths: HashMap<Vec<u8>, ()> = HashMap::new();
    for input in inputs {
        let meta = std::fs::symlink_metadata(&input.path)
            .map_err(|e| io_err(&input.path, "cannot read", e))?;
        if input.name.is_empty() {
            if !meta.is_dir() {
                return Err(Error::Usage(format!(
                    "{} is not a directory; '.=' needs one",
                    input.path.display()
                )));
            }
            walk_dir(
                &input.path,
                b"",
                &mut plan,
                &mut seen_inodes,
                &mut seen_paths,
            )?;
        } else {
            add_path(
                &input.path,
                &meta,
                input.name.clone(),
                &mut plan,
                &mut seen_inodes,
                &mut seen_paths,
            )?;
        }
    }
    Ok(plan)
}

fn walk_dir(
    dir: &Path,
    prefix: &[u8],
    plan: &mut PackPlan,
    seen_inodes: &mut HashMap<(u64, u64), Vec<u8>>,
    seen_paths: &mut HashMap<Vec<u8>, ()>,
) -> Result<()> {
    let mut children: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, "cannot list", e))?
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| io_err(dir, "cannot list", e))?;
    children.sort_by_key(|c| c.file_name());
    for child in children {
        let path = child.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io_err(&path, "cannot read", e))?;
        let name = join(prefix, child.file_name().as_bytes());
        add_path(&path, &meta, name, plan, seen_inodes, seen_paths)?;
    }
    Ok(())
}

fn add_path(
    path: &Path,
    meta: &std::fs::Metadata,
    name: Vec<u8>,
    plan: &mut PackPlan,
    seen_inodes: &mut HashMap<(u64, u64), Vec<u8>>,
    seen_paths: &mut HashMap<Vec<u8>, ()>,
) -> Result<()> {
    if seen_paths.insert(name.clone(), ()).is_some() {
        return Err(Error::UnsafeEntry(format!(
            "two inputs map to the archive path {:?}",
            String::from_utf8_lossy(&name)
        )));
    }
    let ft = meta.file_type();
    let mut entry = Entry {
        path: name.clone(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        xattrs: crate::xattr::read_all(path)
            .map_err(|e| io_err(path, "cannot read xattrs of", e))?,
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
        if meta.nlink() > 1 {
            if let Some(first) = seen_inodes.get(&(meta.dev(), meta.ino())) {
                entry.link_target = first.clone();
                entry.xattrs.clear();
                entry.kind = EntryKind::Hardlink as i32;
                plan.entries.push(Planned {
                    entry,
                    source: path.to_path_buf(),
                });
                return Ok(());
            }
            seen_inodes.insert((meta.dev(), meta.ino()), name.clone());
        }
        entry.size = meta.len();
        plan.total_bytes += meta.len();
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
    plan.entries.push(Planned {
        entry,
        source: path.to_path_buf(),
    });
    if kind == EntryKind::Dir {
        walk_dir(path, &name, plan, seen_inodes, seen_paths)?;
    }
    Ok(())
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
    pub files: u64,
    pub entries: u64,
    pub bytes_read: u64,
}

/// Adds every planned entry to `writer`, reading file data chunk by chunk (aligned to
/// the writer's chunk size, holes skipped). Uncompressed chunks carry their source
/// file so the sink can reflink them.
///
/// # Errors
/// I/O errors naming the file (including a file that shrank while being read) and
/// any writer error.
pub fn pack_inputs(writer: &mut ArchiveWriter, plan: PackPlan) -> Result<PackStats> {
    pack_inputs_until(writer, plan, &|| false)
}

/// As [`pack_inputs`], checking `stop` before every file and chunk; when it turns true
/// the packing ends with an `Interrupted` I/O error (the caller aborts the archive).
///
/// # Errors
/// As [`pack_inputs`], plus the interruption.
pub fn pack_inputs_until(
    writer: &mut ArchiveWriter,
    plan: PackPlan,
    stop: &dyn Fn() -> bool,
) -> Result<PackStats> {
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
    let mut bundle: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut bundle_bytes = 0u64;
    let mut stats = PackStats::default();
    for planned in plan.entries {
        if stop() {
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
        let id = writer.add_entry(planned.entry)?;
        let Some(file) = file else { continue };
        stats.files += 1;
        // Shared with the writer's workers as the reflink source of uncompressed chunks.
        let file = Arc::new(file);
        let read = |buf: &mut [u8], off: u64| {
            file.read_exact_at(buf, off).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    Error::io(
                        format!("{} shrank while being read", planned.source.display()),
                        e,
                    )
                } else {
                    io_err(&planned.source, "cannot read", e)
                }
            })
        };
        if size > 0 && size <= small_limit {
            if bundle_bytes + size > chunk {
                writer.add_bundle(std::mem::take(&mut bundle))?;
                bundle_bytes = 0;
            }
            let mut buf = vec![0u8; size as usize];
            read(&mut buf, 0)?;
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
        for r in ranges {
            let mut off = r.start;
            while off < r.end {
                if stop() {
                    return Err(interrupted());
                }
                let next = ((off / chunk) + 1) * chunk;
                let len = (next.min(r.end) - off) as usize;
                let mut buf = vec![0u8; len];
                read(&mut buf, off)?;
                stats.bytes_read += len as u64;
                let clone = cloneable.then(|| (file.clone(), off));
                writer.add_data(id, off, buf, clone)?;
                off += len as u64;
            }
        }
    }
    writer.add_bundle(bundle)?;
    Ok(stats)
}

/// Files up to this size share compressed frames with their neighbours.
const SMALL_FILE: u64 = 64 << 10;
