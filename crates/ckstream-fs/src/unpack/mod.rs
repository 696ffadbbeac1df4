//! Extracting an archive into a directory, safely and with reflinks where possible.
//!
//! Every path is resolved component by component from an open handle on the target
//! directory with `O_NOFOLLOW`, so nothing the archive (or the target) contains can
//! redirect a write outside it. File data is verified chunk by chunk before it is
//! written; uncompressed chunks are cloned from the archive when both sit on one
//! reflink-capable filesystem. Directory metadata is applied last, deepest first.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use ckstream_format::index::parent_path;
use ckstream_format::reader::decode_chunk;
use ckstream_format::{ArchiveReader, Chunk, CodecId, Entry, EntryKind, Error, Result, Stop};
use ckstream_store::{clone_or_copy_range, CopyMethod};
use rustix::fs::{AtFlags, Mode, OFlags, Timestamps};
use rustix::io::Errno;

/// Options for [`unpack`].
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Restore owners (default: when running as root).
    pub same_owner: bool,
    /// Threads that read, decompress and verify chunks.
    pub threads: usize,
    /// Try FICLONERANGE / copy_file_range for uncompressed chunks.
    pub reflink: bool,
    /// Extract only entries below this archive directory, relative to it.
    pub strip_prefix: Option<Vec<u8>>,
    /// Apply an overlayfs upper directory onto a plain tree: whiteouts (0/0 character
    /// devices) delete, opaque directories are emptied first, overlay xattrs are dropped.
    pub overlay_apply: bool,
    /// Polled between files and chunks: once it returns true the extraction stops with
    /// an "interrupted" error, removing the files it had not finished.
    pub stop: Stop,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            same_owner: rustix::process::geteuid().is_root(),
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            reflink: true,
            strip_prefix: None,
            overlay_apply: false,
            stop: Stop::NEVER,
        }
    }
}

/// Counters of an unpack run; the atomics let a progress bar watch them.
#[derive(Debug, Default)]
pub struct UnpackStats {
    pub entries: AtomicU64,
    pub files: AtomicU64,
    /// Raw bytes of file data restored (holes excluded).
    pub bytes: AtomicU64,
    /// Bytes whose extents were shared with the archive.
    pub cloned_bytes: AtomicU64,
    /// Bytes copied inside the kernel (copy_file_range).
    pub kernel_copied_bytes: AtomicU64,
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

fn last_component(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

fn ferr(path: &[u8], what: &str, e: impl Into<io::Error>) -> Error {
    Error::io(
        format!("{what} {}", String::from_utf8_lossy(path)),
        e.into(),
    )
}

/// Open directory handles inside the target, keyed by archive path ("" = the target).
struct DirCache {
    dirs: HashMap<Vec<u8>, OwnedFd>,
}

impl DirCache {
    fn new(root: OwnedFd) -> Self {
        let mut dirs = HashMap::new();
        dirs.insert(Vec::new(), root);
        DirCache { dirs }
    }

    /// Handle on directory `path`, creating missing directories (mode 0700 until
    /// their own entry, if any, sets metadata). Refuses to traverse a symlink.
    fn dir(&mut self, path: &[u8]) -> Result<&OwnedFd> {
        if !self.dirs.contains_key(path) {
            let (parent, name) = match parent_path(path) {
                Some(p) => (p.to_vec(), last_component(path)),
                None => (Vec::new(), path),
            };
            let pfd = self.dir(&parent)?;
            let open = |pfd: &OwnedFd| {
                rustix::fs::openat(
                    pfd,
                    os(name),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
            };
            let fd = match open(pfd) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(pfd, os(name), Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(ferr(path, "cannot create directory", e)),
                    }
                    open(pfd).map_err(|e| ferr(path, "cannot open directory", e))?
                }
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(Error::UnsafeEntry(format!(
                        "{:?} in the target is not a directory (a symlink?); refusing to write through it",
                        String::from_utf8_lossy(path)
                    )))
                }
                Err(e) => return Err(ferr(path, "cannot open directory", e)),
            };
            self.dirs.insert(path.to_vec(), fd);
        }
        Ok(&self.dirs[path])
    }

    /// Handle on an existing directory `path` (never created), or `None` when a component
    /// is missing. Refuses to traverse a symlink like [`dir`](Self::dir).
    fn existing_parent_of<'p>(&mut self, path: &'p [u8]) -> Result<Option<(OwnedFd, &'p [u8])>> {
        let parent = parent_path(path).unwrap_or(b"");
        let name = last_component(path);
        if let Some(fd) = self.dirs.get(parent) {
            return Ok(Some((
                fd.try_clone().map_err(|e| ferr(path, "cannot open", e))?,
                name,
            )));
        }
        let mut fd = self.dirs[&Vec::new()]
            .try_clone()
            .map_err(|e| ferr(path, "cannot open", e))?;
        if parent.is_empty() {
            return Ok(Some((fd, name)));
        }
        for comp in parent.split(|&b| b == b'/') {
            fd = match rustix::fs::openat(&fd, os(comp), OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
                Ok(next) => next,
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(Error::UnsafeEntry(format!(
                        "{:?} in the target is not a directory (a symlink?); refusing to delete through it",
                        String::from_utf8_lossy(parent)
                    )))
                }
                Err(e) => return Err(ferr(path, "cannot open directory", e)),
            };
        }
        Ok(Some((fd, name)))
    }

    /// Parent handle and final name of `path`.
    fn parent_of<'p>(&mut self, path: &'p [u8]) -> Result<(&OwnedFd, &'p [u8])> {
        let parent = parent_path(path).unwrap_or(b"");
        let fd = self.dir(parent)?;
        Ok((fd, last_component(path)))
    }
}

/// Removes whatever non-directory is at `name` so a new entry can take its place
/// (like tar's default). Never follows a symlink.
fn remove_existing(dir: &OwnedFd, name: &[u8], path: &[u8]) -> Result<()> {
    match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => {
            let is_dir =
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
            let flags = if is_dir {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            rustix::fs::unlinkat(dir, os(name), flags)
                .map_err(|e| ferr(path, "cannot replace existing", e))
        }
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(ferr(path, "cannot inspect", e)),
    }
}

fn timestamps(mtime_ns: i64) -> Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn proc_path(dir: &OwnedFd, name: &[u8]) -> std::path::PathBuf {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    std::path::PathBuf::from(OsStr::from_bytes(&p))
}

/// Applies owner, mode, xattrs and mtime to a non-directory, non-file node (symlink,
/// device, fifo) without following it.
fn apply_meta_at(dir: &OwnedFd, name: &[u8], e: &Entry, opts: &UnpackOptions) -> Result<()> {
    let path = &e.path;
    if opts.same_owner {
        rustix::fs::chownat(
            dir,
            os(name),
            Some(rustix::fs::Uid::from_raw(e.uid)),
            Some(rustix::fs::Gid::from_raw(e.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|er| ferr(path, "cannot chown", er))?;
    }
    if e.entry_kind() != EntryKind::Symlink {
        rustix::fs::chmodat(
            dir,
            os(name),
            Mode::from_raw_mode(e.mode & 0o7777),
            AtFlags::empty(),
        )
        .map_err(|er| ferr(path, "cannot chmod", er))?;
    }
    if !e.xattrs.is_empty() {
        let p = proc_path(dir, name);
        for x in &e.xattrs {
            rustix::fs::lsetxattr(&p, os(&x.name), &x.value, rustix::fs::XattrFlags::empty())
                .map_err(|er| {
                    ferr(
                        path,
                        &format!("cannot set xattr {} on", String::from_utf8_lossy(&x.name)),
                        er,
                    )
                })?;
        }
    }
    rustix::fs::utimensat(
        dir,
        os(name),
        &timestamps(e.mtime_ns),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|er| ferr(path, "cannot set times of", er))
}

/// Applies owner, mode, xattrs and mtime through an open handle (files, directories).
fn apply_meta_fd(fd: impl AsFd, e: &Entry, opts: &UnpackOptions) -> Result<()> {
    let path = &e.path;
    if opts.same_owner {
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(e.uid)),
            Some(rustix::fs::Gid::from_raw(e.gid)),
        )
        .map_err(|er| ferr(path, "cannot chown", er))?;
    }
    // After chown, which clears setuid/setgid bits.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(e.mode & 0o7777))
        .map_err(|er| ferr(path, "cannot chmod", er))?;
    for x in &e.xattrs {
        rustix::fs::fsetxattr(&fd, os(&x.name), &x.value, rustix::fs::XattrFlags::empty())
            .map_err(|er| {
                ferr(
                    path,
                    &format!("cannot set xattr {} on", String::from_utf8_lossy(&x.name)),
                    er,
                )
            })?;
    }
    rustix::fs::futimens(&fd, &timestamps(e.mtime_ns))
        .map_err(|er| ferr(path, "cannot set times of", er))
}

/// True when `path` is selected by `selection` (equal to, or below, a selected path).
fn selected(path: &[u8], selection: &[Vec<u8>]) -> bool {
    selection.is_empty()
        || selection.iter().any(|s| {
            path == &s[..] || (path.len() > s.len() && path.starts_with(s) && path[s.len()] == b'/')
        })
}

/// One chunk to restore into an open output file.
struct ChunkJob<'a> {
    slot: usize,
    entry: &'a Entry,
    chunk: &'a Chunk,
}

/// Reads, verifies and writes one chunk: reflink from the archive when the chunk is
/// uncompressed and aligned, else copy_file_range, else pwrite of the verified bytes.
/// Bytes are verified *before* anything reaches the output.
fn restore_chunk(
    reader: &ArchiveReader,
    out: &File,
    job: &ChunkJob,
    opts: &UnpackOptions,
    stats: &UnpackStats,
) -> Result<()> {
    let c = job.chunk;
    let stored = reader.read_stored(c)?;
    let data = decode_chunk(job.entry, c, stored)?;
    let werr = |e: io::Error| ferr(&job.entry.path, "cannot write", e);
    let src = reader.shard(c.shard).as_file();
    let block = 4096u64;
    let mut done = 0u64;
    if let (true, Some(src), Some(CodecId::None), false) =
        (opts.reflink, src, c.codec_id(), c.in_shared_frame())
    {
        if c.offset % block == c.file_offset % block && c.file_offset % block == 0 {
            let whole = c.raw_len as u64 - c.raw_len as u64 % block;
            if whole > 0 {
                match clone_or_copy_range(src, c.offset, out, c.file_offset, whole, block)
                    .map_err(werr)?
                {
                    CopyMethod::Cloned => {
                        stats.cloned_bytes.fetch_add(whole, Ordering::Relaxed);
                        done = whole;
                    }
                    CopyMethod::KernelCopy => {
                        stats
                            .kernel_copied_bytes
                            .fetch_add(whole, Ordering::Relaxed);
                        done = whole;
                    }
                    CopyMethod::NotDone => {}
                }
            }
        }
    }
    if done < data.len() as u64 {
        out.write_all_at(&data[done as usize..], c.file_offset + done)
            .map_err(werr)?;
    }
    stats.bytes.fetch_add(c.raw_len as u64, Ordering::Relaxed);
    Ok(())
}

/// Restores several small files from one shared frame: one read, one decode, a digest
/// check per file, then one write per file.
fn restore_shared_frame(
    reader: &ArchiveReader,
    batch: &[OpenFile],
    jobs: &[ChunkJob],
    group: &[usize],
    stats: &UnpackStats,
) -> Result<()> {
    let first = jobs[group[0]].chunk;
    let what = || {
        format!(
            "shared frame at shard {} offset {}",
            first.shard, first.offset
        )
    };
    let stored = reader.read_stored(first)?;
    let codec = first.codec_id().ok_or_else(|| Error::Unsupported(what()))?;
    let frame =
        ckstream_format::codec::decode(codec, &stored, first.frame_raw_len as usize, &what())?;
    for &j in group {
        let job = &jobs[j];
        let c = job.chunk;
        let part = &frame[c.frame_offset as usize..(c.frame_offset + c.raw_len) as usize];
        ckstream_format::reader::verify_digest(part, &c.digest, || {
            format!("{:?}", job.entry.path_lossy())
        })?;
        batch[job.slot]
            .file
            .write_all_at(part, c.file_offset)
            .map_err(|e| ferr(&job.entry.path, "cannot write", e))?;
        stats.bytes.fetch_add(c.raw_len as u64, Ordering::Relaxed);
    }
    Ok(())
}

struct OpenFile<'a> {
    file: File,
    /// Metadata to apply: the entry itself, or for a hard link whose target was not
    /// extracted, the target's metadata under the link's path.
    entry: std::borrow::Cow<'a, Entry>,
    dir: Vec<u8>,
}

/// Restores a batch of open files: all their chunks in parallel, then metadata.
/// On failure removes the files of the batch that were not completed.
fn flush_batch(
    reader: &ArchiveReader,
    batch: &mut Vec<OpenFile>,
    jobs: &mut Vec<ChunkJob>,
    cache: &mut DirCache,
    opts: &UnpackOptions,
    stats: &UnpackStats,
) -> Result<()> {
    // Small files that share one compressed frame are restored together, so the frame
    // is read and decoded once.
    let mut groups: Vec<Vec<usize>> = Vec::with_capacity(jobs.len());
    let mut frame_group: HashMap<(u32, u64), usize> = HashMap::new();
    for (i, job) in jobs.iter().enumerate() {
        let c = job.chunk;
        if c.in_shared_frame() {
            if let Some(&g) = frame_group.get(&(c.shard, c.offset)) {
                groups[g].push(i);
                continue;
            }
            frame_group.insert((c.shard, c.offset), groups.len());
        }
        groups.push(vec![i]);
    }
    let next = AtomicU64::new(0);
    let threads = opts.threads.max(1).min(groups.len().max(1));
    let result = std::thread::scope(|s| -> Result<()> {
        let work = || -> Result<()> {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(group) = groups.get(i) else {
                    return Ok(());
                };
                if opts.stop.requested() {
                    next.store(u64::MAX / 2, Ordering::Relaxed);
                    return Err(Error::interrupted("extracting"));
                }
                let r = if group.len() == 1 {
                    let job = &jobs[group[0]];
                    restore_chunk(reader, &batch[job.slot].file, job, opts, stats)
                } else {
                    restore_shared_frame(reader, batch, jobs, group, stats)
                };
                if let Err(e) = r {
                    next.store(u64::MAX / 2, Ordering::Relaxed);
                    return Err(e);
                }
            }
        };
        let handles: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut first = work().err();
        for h in handles {
            if let Ok(Err(e)) = h.join() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    });
    let result = result.and_then(|()| {
        for f in batch.iter() {
            apply_meta_fd(&f.file, &f.entry, opts)?;
        }
        Ok(())
    });
    if result.is_err() {
        // A file whose data could not be verified is not left behind looking complete.
        discard_batch(batch, cache);
    }
    batch.clear();
    jobs.clear();
    result
}

/// Removes the files of `batch` (created, their data not all written).
fn discard_batch(batch: &mut Vec<OpenFile>, cache: &mut DirCache) {
    for f in batch.drain(..) {
        if let Ok(dir) = cache.dir(&f.dir) {
            let _ = rustix::fs::unlinkat(dir, os(last_component(&f.entry.path)), AtFlags::empty());
        }
    }
}

/// Extracts `reader`'s entries (all, or those at or below the `selection` paths) into
/// `dest`, which is created if missing.
///
/// # Errors
/// [`Error::UnsafeEntry`] when a path would leave `dest` (for example through a
/// symlink already in `dest`); digest and corruption errors; I/O errors naming the
/// path; an "interrupted" I/O error once [`UnpackOptions::stop`] says so. Files whose
/// data was not all written and verified are removed on every error.
pub fn unpack(
    reader: &ArchiveReader,
    dest: &Path,
    selection: &[Vec<u8>],
    opts: &UnpackOptions,
    stats: &UnpackStats,
) -> Result<()> {
    for s in selection {
        if reader.find(s).is_none()
            && !reader
                .entries()
                .iter()
                .any(|e| selected(&e.path, std::slice::from_ref(s)))
        {
            return Err(Error::Usage(format!(
                "{:?} is not in the archive",
                String::from_utf8_lossy(s)
            )));
        }
    }
    std::fs::create_dir_all(dest)
        .map_err(|e| Error::io(format!("cannot create {}", dest.display()), e))?;
    let root = rustix::fs::open(
        dest,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(format!("cannot open {}", dest.display()), e.into()))?;
    let mut cache = DirCache::new(root);
    let view = target_view(reader.entries(), opts)?;
    let entries = &view[..];
    if opts.overlay_apply {
        apply_deletions(reader.entries(), entries, selection, &mut cache)?;
    }
    let mut dirs: Vec<usize> = Vec::new();
    let mut batch: Vec<OpenFile> = Vec::new();
    let mut jobs: Vec<ChunkJob> = Vec::new();
    let mut extracted_files: HashMap<&[u8], ()> = HashMap::new();
    const MAX_BATCH_FILES: usize = 128;
    const MAX_BATCH_CHUNKS: usize = 512;

    // Files are created at their full size before their data is written: whatever stops
    // the extraction (an error, a signal) removes the ones not yet complete.
    let extracted = (|| -> Result<()> {
        for (i, e) in entries.iter().enumerate() {
            if opts.stop.requested() {
                return Err(Error::interrupted("extracting"));
            }
            let Some(e) = e.as_ref() else { continue };
            if !selected(&e.path, selection) || (opts.overlay_apply && is_whiteout(e)) {
                continue;
            }
            let mut kind = e.entry_kind();
            let mut data_entry = i;
            if kind == EntryKind::Hardlink && !extracted_files.contains_key(&e.link_target[..]) {
                // The link's target was not extracted (not selected): materialize a copy.
                let original = &reader.entries()[i].link_target;
                data_entry = reader.find(original).expect("validated hardlink");
                kind = EntryKind::File;
            }
            stats.entries.fetch_add(1, Ordering::Relaxed);
            match kind {
                EntryKind::Dir => {
                    let (pfd, name) = cache.parent_of(&e.path)?;
                    match rustix::fs::mkdirat(pfd, os(name), Mode::from_raw_mode(0o700)) {
                        Ok(()) => {}
                        Err(Errno::EXIST) => {
                            let st = rustix::fs::statat(pfd, os(name), AtFlags::SYMLINK_NOFOLLOW)
                                .map_err(|er| ferr(&e.path, "cannot inspect", er))?;
                            if rustix::fs::FileType::from_raw_mode(st.st_mode)
                                != rustix::fs::FileType::Directory
                            {
                                remove_existing(pfd, name, &e.path)?;
                                rustix::fs::mkdirat(pfd, os(name), Mode::from_raw_mode(0o700))
                                    .map_err(|er| ferr(&e.path, "cannot create directory", er))?;
                            }
                        }
                        Err(er) => return Err(ferr(&e.path, "cannot create directory", er)),
                    }
                    dirs.push(i);
                }
                EntryKind::File => {
                    let (pfd, name) = cache.parent_of(&e.path)?;
                    remove_existing(pfd, name, &e.path)?;
                    let fd = rustix::fs::openat(
                        pfd,
                        os(name),
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )
                    .map_err(|er| ferr(&e.path, "cannot create", er))?;
                    let file = File::from(fd);
                    let src = &reader.entries()[data_entry];
                    file.set_len(src.size)
                        .map_err(|er| ferr(&e.path, "cannot size", er))?;
                    stats.files.fetch_add(1, Ordering::Relaxed);
                    extracted_files.insert(&e.path, ());
                    let slot = batch.len();
                    let entry_for_meta = if data_entry == i {
                        std::borrow::Cow::Borrowed(&**e)
                    } else {
                        let mut copy: Entry = Entry::clone(src);
                        copy.path = e.path.clone();
                        std::borrow::Cow::Owned(copy)
                    };
                    batch.push(OpenFile {
                        file,
                        entry: entry_for_meta,
                        dir: parent_path(&e.path).unwrap_or(b"").to_vec(),
                    });
                    for c in reader.chunks_of(data_entry) {
                        jobs.push(ChunkJob {
                            slot,
                            entry: src,
                            chunk: c,
                        });
                    }
                    if batch.len() >= MAX_BATCH_FILES || jobs.len() >= MAX_BATCH_CHUNKS {
                        flush_batch(reader, &mut batch, &mut jobs, &mut cache, opts, stats)?;
                    }
                }
                EntryKind::Hardlink => {
                    // The target must be complete (data and metadata) before linking.
                    flush_batch(reader, &mut batch, &mut jobs, &mut cache, opts, stats)?;
                    let (tfd, tname) = cache.parent_of(&e.link_target)?;
                    let tfd = tfd
                        .try_clone()
                        .map_err(|er| ferr(&e.path, "cannot link", er))?;
                    let tname = tname.to_vec();
                    let (pfd, name) = cache.parent_of(&e.path)?;
                    remove_existing(pfd, name, &e.path)?;
                    rustix::fs::linkat(&tfd, os(&tname), pfd, os(name), AtFlags::empty())
                        .map_err(|er| ferr(&e.path, "cannot create hard link", er))?;
                }
                EntryKind::Symlink => {
                    let (pfd, name) = cache.parent_of(&e.path)?;
                    remove_existing(pfd, name, &e.path)?;
                    rustix::fs::symlinkat(os(&e.link_target), pfd, os(name))
                        .map_err(|er| ferr(&e.path, "cannot create symlink", er))?;
                    apply_meta_at(pfd, name, e, opts)?;
                }
                EntryKind::CharDevice
                | EntryKind::BlockDevice
                | EntryKind::Fifo
                | EntryKind::Socket => {
                    let (pfd, name) = cache.parent_of(&e.path)?;
                    remove_existing(pfd, name, &e.path)?;
                    let ft = match kind {
                        EntryKind::CharDevice => rustix::fs::FileType::CharacterDevice,
                        EntryKind::BlockDevice => rustix::fs::FileType::BlockDevice,
                        EntryKind::Fifo => rustix::fs::FileType::Fifo,
                        _ => rustix::fs::FileType::Socket,
                    };
                    rustix::fs::mknodat(
                        pfd,
                        os(name),
                        ft,
                        Mode::from_raw_mode(e.mode & 0o777),
                        rustix::fs::makedev(e.rdev_major, e.rdev_minor),
                    )
                    .map_err(|er| ferr(&e.path, "cannot create node", er))?;
                    apply_meta_at(pfd, name, e, opts)?;
                }
                EntryKind::Unspecified => unreachable!("validated"),
            }
        }
        flush_batch(reader, &mut batch, &mut jobs, &mut cache, opts, stats)
    })();
    if extracted.is_err() {
        discard_batch(&mut batch, &mut cache);
    }
    extracted?;
    // Deepest first, so setting a directory read-only or its mtime does not disturb its children.
    let dir_entry = |i: usize| entries[i].as_ref().expect("extracted");
    dirs.sort_by_key(|&i| {
        std::cmp::Reverse(dir_entry(i).path.iter().filter(|&&b| b == b'/').count())
    });
    for i in dirs {
        let e = dir_entry(i);
        let fd = {
            let (pfd, name) = cache.parent_of(&e.path)?;
            rustix::fs::openat(
                pfd,
                os(name),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|er| ferr(&e.path, "cannot open directory", er))?
        };
        apply_meta_fd(&fd, e, opts)?;
    }
    Ok(())
}

/// The entries as they will land in the target: paths relative to `strip_prefix`
/// (entries outside it, and the prefix directory itself, are `None`), and in overlay
/// mode without overlayfs-internal xattrs.
fn target_view<'a>(
    entries: &'a [Entry],
    opts: &UnpackOptions,
) -> Result<Vec<Option<std::borrow::Cow<'a, Entry>>>> {
    use std::borrow::Cow;
    let strip = |p: &[u8]| -> Option<Vec<u8>> {
        match &opts.strip_prefix {
            None => Some(p.to_vec()),
            Some(pre) => p
                .strip_prefix(&pre[..])
                .and_then(|rest| rest.strip_prefix(b"/"))
                .map(|r| r.to_vec()),
        }
    };
    entries
        .iter()
        .map(|e| {
            if opts.strip_prefix.is_none() && !opts.overlay_apply {
                return Ok(Some(Cow::Borrowed(e)));
            }
            let Some(path) = strip(&e.path) else { return Ok(None) };
            let mut mapped = e.clone();
            mapped.path = path;
            if mapped.entry_kind() == EntryKind::Hardlink {
                mapped.link_target = strip(&e.link_target).unwrap_or_default();
            }
            if opts.overlay_apply {
                // A redirect on a complete file (renamed, then its data copied up) is
                // harmless; on a directory or with metacopy, content is missing.
                let is_dir = mapped.entry_kind() == EntryKind::Dir;
                if let Some(x) = mapped.xattrs.iter().find(|x| {
                    (is_dir && x.name.ends_with(b"overlay.redirect"))
                        || x.name.ends_with(b"overlay.metacopy")
                }) {
                    // ckstream stores these in full from the merged view when packing;
                    // an archive still holding one was packed without it (or elsewhere).
                    return Err(Error::Unsupported(format!(
                        "{:?} uses overlayfs {} (renamed directory or metadata-only copy-up): its content is not in the diff, which was stored without the overlay's merged view",
                        e.path_lossy(),
                        String::from_utf8_lossy(&x.name)
                    )));
                }
                mapped.xattrs.retain(|x| !x.name.starts_with(b"trusted.overlay.") && !x.name.starts_with(b"user.overlay."));
            }
            Ok(Some(Cow::Owned(mapped)))
        })
        .collect()
}

/// An overlayfs whiteout: a character device 0/0.
pub fn is_whiteout(e: &Entry) -> bool {
    e.entry_kind() == EntryKind::CharDevice && e.rdev_major == 0 && e.rdev_minor == 0
}

/// True when the entry is a directory marked opaque (it replaces, not merges, what
/// the lower layers have).
pub fn is_opaque(e: &Entry) -> bool {
    e.entry_kind() == EntryKind::Dir
        && e.xattrs.iter().any(|x| {
            (x.name == b"trusted.overlay.opaque" || x.name == b"user.overlay.opaque")
                && x.value == b"y"
        })
}

/// Removes `name` under `dir` and everything below it, never following symlinks.
fn remove_tree_at(dir: &OwnedFd, name: &[u8], path: &[u8]) -> Result<()> {
    let st = match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(ferr(path, "cannot inspect", e)),
    };
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
        let fd = rustix::fs::openat(
            dir,
            os(name),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ferr(path, "cannot open directory", e))?;
        empty_dir(&fd, path)?;
        rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR)
            .map_err(|e| ferr(path, "cannot remove", e))
    } else {
        rustix::fs::unlinkat(dir, os(name), AtFlags::empty())
            .map_err(|e| ferr(path, "cannot remove", e))
    }
}

/// Removes everything inside the open directory `fd`.
fn empty_dir(fd: &OwnedFd, path: &[u8]) -> Result<()> {
    let mut names = Vec::new();
    let mut d = rustix::fs::Dir::read_from(fd).map_err(|e| ferr(path, "cannot list", e))?;
    while let Some(ent) = d.read() {
        let ent = ent.map_err(|e| ferr(path, "cannot list", e))?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    for n in names {
        remove_tree_at(fd, &n, path)?;
    }
    Ok(())
}

/// First step of applying an overlay diff: whiteouts delete their path, opaque
/// directories lose their old contents (they replace what the lower layers had).
fn apply_deletions(
    originals: &[Entry],
    view: &[Option<std::borrow::Cow<Entry>>],
    selection: &[Vec<u8>],
    cache: &mut DirCache,
) -> Result<()> {
    for (original, e) in originals.iter().zip(view) {
        let Some(e) = e else { continue };
        if !selected(&e.path, selection) {
            continue;
        }
        if !is_whiteout(e) && !is_opaque(original) {
            continue;
        }
        // Nothing to delete where the target lacks the parent directory.
        let Some((pfd, name)) = cache.existing_parent_of(&e.path)? else {
            continue;
        };
        let pfd = &pfd;
        if is_whiteout(e) {
            remove_tree_at(pfd, name, &e.path)?;
        } else {
            match rustix::fs::openat(
                pfd,
                os(name),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => empty_dir(&fd, &e.path)?,
                Err(Errno::NOENT) => {}
                Err(_) => remove_tree_at(pfd, name, &e.path)?,
            }
        }
    }
    Ok(())
}
