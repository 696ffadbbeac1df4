//! Extracting an archive into a directory, safely and with reflinks where possible.
//!
//! Every path is resolved component by component from an open handle on the target
//! directory with `O_NOFOLLOW`, so nothing the archive (or the target) contains can
//! redirect a write outside it. File data is verified chunk by chunk before it is
//! written; uncompressed chunks are cloned from the archive when both sit on one
//! reflink-capable filesystem.
//!
//! An `Unpacker` runs the phases in an order the result depends on:
//! 1. Overlay deletions (whiteouts, opaque directories), before anything is created, so
//!    they only ever remove what the target already had.
//! 2. The entries, in archive order. Directories are created mode 0700 so that
//!    extraction can always write into them; files are created at their full size and
//!    restored a batch at a time; a hard link waits until its target's batch is done.
//! 3. Directory metadata, last and deepest first: a read-only mode or an mtime is set
//!    once nothing more will be written in the directory or below it.
//!
//! An error or an interruption in phase 2 removes the files of the unfinished batch, so a
//! file left in the target always has all its data, verified.
//!
//! The parts live in submodules by concern: `dirs` (safe directory handles and path
//! helpers), `meta` (owners, modes, xattrs, times), `data` (verified chunk restoring, a
//! batch of files at a time) and `overlay` (applying a rootfs diff's deletions).

mod data;
mod dirs;
mod meta;
mod overlay;

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use ckstream_format::budget::{chunk_cost, Budget, CHUNK_MEMORY};
use ckstream_format::{ArchiveReader, Entry, EntryKind, Error, Result, Stop};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use data::Batch;
use dirs::{ferr, os, remove_existing, DirCache};
use meta::{apply_meta_at, apply_meta_fd};
use overlay::{target_view, TargetEntry};

pub use overlay::{is_opaque, is_whiteout};

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
    /// Write an overlayfs upper directory for a new overlay mount (a container's fresh
    /// `diff/` before anything mounts it): whiteouts and opaque directories stay as they
    /// are, opaqueness in the `trusted.overlay.` namespace of a rootful mount; the other
    /// overlay xattrs (`origin`, `impure`, `nlink`, a file's `redirect`) described the
    /// old lower layers and are dropped. Metacopy files and redirected directories are
    /// refused as in `overlay_apply`.
    pub overlay_upper: bool,
    /// Chunks shared whole with the archive by reflink are not read: their digests are
    /// left to the caller, who finds them in [`UnpackStats::unverified`] (the extents are
    /// the archive's own, so only the archive itself can be wrong, and checking it later
    /// reads the same blocks). Every other chunk is verified before it is written.
    pub defer_verify_cloned: bool,
    /// Chunks shared whole with the archive by reflink are checked by reading them back
    /// from the output rather than from the archive: the same bytes (shared extents), but
    /// the output's page cache then holds them for its next reader (CRIU reading the
    /// images it restores from). A mismatch fails the unpack as usual.
    pub verify_from_output: bool,
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
            overlay_upper: false,
            defer_verify_cloned: false,
            verify_from_output: false,
            stop: Stop::NEVER,
        }
    }
}

/// Counters of an unpack run; the atomics let a progress bar watch them.
#[derive(Debug, Default)]
pub struct UnpackStats {
    /// Entries created or updated.
    pub entries: AtomicU64,
    /// Regular files written.
    pub files: AtomicU64,
    /// Raw bytes of file data restored (holes excluded).
    pub bytes: AtomicU64,
    /// Bytes whose extents were shared with the archive.
    pub cloned_bytes: AtomicU64,
    /// Bytes copied inside the kernel (copy_file_range).
    pub kernel_copied_bytes: AtomicU64,
    /// With [`UnpackOptions::defer_verify_cloned`]: the chunks shared without being
    /// verified, with the entry holding them.
    pub unverified: std::sync::Mutex<Vec<(Entry, ckstream_format::Chunk)>>,
}

/// True when `path` is selected by `selection` (equal to, or below, a selected path).
fn selected(path: &[u8], selection: &[Vec<u8>]) -> bool {
    selection.is_empty()
        || selection.iter().any(|s| {
            path == &s[..] || (path.len() > s.len() && path.starts_with(s) && path[s.len()] == b'/')
        })
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
    let view = target_view(reader.entries(), opts)?;
    check_selection(&view, selection)?;
    let root = open_target(dest)?;
    let mut unpacker = Unpacker {
        reader,
        view: &view,
        selection,
        opts,
        stats,
        cache: DirCache::new(root),
        batch: Batch::default(),
        dirs: Vec::new(),
        extracted_files: HashSet::new(),
    };
    if opts.overlay_apply {
        unpacker.apply_deletions()?;
    }
    unpacker.extract_entries()?;
    unpacker.apply_dir_meta()
}

/// Refuses a selected path that is neither an entry nor a directory implied by the
/// entries below it: a typo must not look like a successful, empty extraction. Paths
/// are those of the target (after `strip_prefix`), as the selection applies to them.
fn check_selection(view: &[TargetEntry], selection: &[Vec<u8>]) -> Result<()> {
    for s in selection {
        if !view
            .iter()
            .flatten()
            .any(|e| selected(&e.path, std::slice::from_ref(s)))
        {
            return Err(Error::Usage(format!(
                "{:?} is not in the archive",
                String::from_utf8_lossy(s)
            )));
        }
    }
    Ok(())
}

/// Creates `dest` if missing and opens the handle every path inside it is resolved
/// from. `dest` itself may be (or pass through) a symlink: the caller chose it.
fn open_target(dest: &Path) -> Result<OwnedFd> {
    std::fs::create_dir_all(dest)
        .map_err(|e| Error::io(format!("cannot create {}", dest.display()), e))?;
    rustix::fs::open(
        dest,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(format!("cannot open {}", dest.display()), e.into()))
}

/// One extraction in progress: what it reads, where it writes, and what it has left to
/// finish (the batch of files awaiting data, the directories awaiting metadata).
struct Unpacker<'a> {
    reader: &'a ArchiveReader,
    /// The archive's entries as they land in the target, indexed like the archive's.
    view: &'a [TargetEntry<'a>],
    selection: &'a [Vec<u8>],
    opts: &'a UnpackOptions,
    stats: &'a UnpackStats,
    cache: DirCache,
    /// Files created at full size whose data is not restored yet.
    batch: Batch<'a>,
    /// Directories created, by entry index: their metadata comes last.
    dirs: Vec<usize>,
    /// Target paths of the files extracted so far: a hard link to one of them is a link,
    /// to any other path a copy.
    extracted_files: HashSet<&'a [u8]>,
}

impl<'a> Unpacker<'a> {
    /// Creates every selected entry and restores all file data. On any error, including
    /// an interruption, removes the files of the unfinished batch.
    fn extract_entries(&mut self) -> Result<()> {
        let extracted = self.extract_all();
        if extracted.is_err() {
            self.discard_batch();
        }
        extracted
    }

    fn extract_all(&mut self) -> Result<()> {
        let view = self.view;
        for (i, e) in view.iter().enumerate() {
            if self.opts.stop.requested() {
                return Err(Error::interrupted("extracting"));
            }
            let Some(e) = e.as_deref() else { continue };
            // Whiteouts did their work as deletions; they are not entries of the result.
            if !selected(&e.path, self.selection) || (self.opts.overlay_apply && is_whiteout(e)) {
                continue;
            }
            self.extract(i, e)?;
        }
        self.flush_batch()
    }

    /// Creates entry `i`, which lands in the target as `e`.
    fn extract(&mut self, i: usize, e: &'a Entry) -> Result<()> {
        self.stats.entries.fetch_add(1, Ordering::Relaxed);
        match e.entry_kind() {
            EntryKind::Dir => {
                self.make_dir(e)?;
                self.dirs.push(i);
                Ok(())
            }
            EntryKind::File => self.create_file(e, i),
            EntryKind::Hardlink if self.extracted_files.contains(&e.link_target[..]) => {
                self.make_link(e)
            }
            EntryKind::Hardlink => {
                // The link's target was not extracted (not selected): materialize a copy.
                let original = &self.reader.entries()[i].link_target;
                let target = self.reader.find(original).expect("validated hardlink");
                self.create_file(e, target)
            }
            EntryKind::Symlink => self.make_symlink(e),
            kind @ (EntryKind::CharDevice
            | EntryKind::BlockDevice
            | EntryKind::Fifo
            | EntryKind::Socket) => self.make_node(e, kind),
            EntryKind::Unspecified => unreachable!("validated"),
        }
    }

    /// Creates directory `e` mode 0700 (its own metadata comes last), keeping one that
    /// exists and replacing a non-directory.
    fn make_dir(&mut self, e: &Entry) -> Result<()> {
        let (pfd, name) = self.cache.parent_of(&e.path)?;
        match rustix::fs::mkdirat(pfd, os(name), Mode::from_raw_mode(0o700)) {
            Ok(()) => Ok(()),
            Err(Errno::EXIST) => {
                let st = rustix::fs::statat(pfd, os(name), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|er| ferr(&e.path, "cannot inspect", er))?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    return Ok(());
                }
                remove_existing(pfd, name, &e.path)?;
                rustix::fs::mkdirat(pfd, os(name), Mode::from_raw_mode(0o700))
                    .map_err(|er| ferr(&e.path, "cannot create directory", er))
            }
            Err(er) => Err(ferr(&e.path, "cannot create directory", er)),
        }
    }

    /// Creates file `e` at the full size of entry `data_entry` (itself, or for a hard
    /// link whose target was not extracted, that target) and queues its data.
    fn create_file(&mut self, e: &'a Entry, data_entry: usize) -> Result<()> {
        let (pfd, name) = self.cache.parent_of(&e.path)?;
        remove_existing(pfd, name, &e.path)?;
        // O_EXCL with O_NOFOLLOW: the name was just cleared, so anything there now (a
        // symlink raced in) is refused rather than written through. Readable for
        // `verify_from_output`.
        let access = if self.opts.verify_from_output {
            OFlags::RDWR
        } else {
            OFlags::WRONLY
        };
        let fd = rustix::fs::openat(
            pfd,
            os(name),
            access | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|er| ferr(&e.path, "cannot create", er))?;
        let file = File::from(fd);
        // The target's view of the data entry: without overlay xattrs in overlay mode.
        let src: &Entry = self.view[data_entry]
            .as_deref()
            .unwrap_or(&self.reader.entries()[data_entry]);
        if let Err(er) = file.set_len(src.size) {
            // Not in the batch yet, so nothing else would remove it: no file may be left
            // looking complete without its data.
            let _ = rustix::fs::unlinkat(pfd, os(name), AtFlags::empty());
            return Err(ferr(&e.path, "cannot size", er));
        }
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        self.extracted_files.insert(&e.path);
        // A materialized hard link gets its target's metadata under its own path.
        let meta = if e.entry_kind() == EntryKind::Hardlink {
            let mut copy = src.clone();
            copy.path = e.path.clone();
            Cow::Owned(copy)
        } else {
            Cow::Borrowed(e)
        };
        self.queue_file(file, meta, data_entry)
    }

    /// Links `e` to its target, which was extracted.
    fn make_link(&mut self, e: &Entry) -> Result<()> {
        // The target must be complete (data and metadata) before linking.
        self.flush_batch()?;
        let (tfd, tname) = self.cache.parent_of(&e.link_target)?;
        let tfd = tfd
            .try_clone()
            .map_err(|er| ferr(&e.path, "cannot link", er))?;
        let tname = tname.to_vec();
        let (pfd, name) = self.cache.parent_of(&e.path)?;
        remove_existing(pfd, name, &e.path)?;
        rustix::fs::linkat(&tfd, os(&tname), pfd, os(name), AtFlags::empty())
            .map_err(|er| ferr(&e.path, "cannot create hard link", er))
    }

    fn make_symlink(&mut self, e: &Entry) -> Result<()> {
        let (pfd, name) = self.cache.parent_of(&e.path)?;
        remove_existing(pfd, name, &e.path)?;
        rustix::fs::symlinkat(os(&e.link_target), pfd, os(name))
            .map_err(|er| ferr(&e.path, "cannot create symlink", er))?;
        apply_meta_at(pfd, name, e, self.opts)
    }

    /// Creates a device node, fifo or socket.
    fn make_node(&mut self, e: &Entry, kind: EntryKind) -> Result<()> {
        let (pfd, name) = self.cache.parent_of(&e.path)?;
        remove_existing(pfd, name, &e.path)?;
        let ft = match kind {
            EntryKind::CharDevice => FileType::CharacterDevice,
            EntryKind::BlockDevice => FileType::BlockDevice,
            EntryKind::Fifo => FileType::Fifo,
            _ => FileType::Socket,
        };
        rustix::fs::mknodat(
            pfd,
            os(name),
            ft,
            Mode::from_raw_mode(e.mode & 0o777),
            rustix::fs::makedev(e.rdev_major, e.rdev_minor),
        )
        .map_err(|er| ferr(&e.path, "cannot create node", er))?;
        apply_meta_at(pfd, name, e, self.opts)
    }

    /// Applies the directories' metadata, deepest first, so that setting a directory
    /// read-only or its mtime does not disturb its children.
    fn apply_dir_meta(mut self) -> Result<()> {
        let view = self.view;
        let dir_entry = |i: usize| view[i].as_deref().expect("extracted");
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|&i| {
            std::cmp::Reverse(dir_entry(i).path.iter().filter(|&&b| b == b'/').count())
        });
        for i in dirs {
            let e = dir_entry(i);
            let (pfd, name) = self.cache.parent_of(&e.path)?;
            let fd = rustix::fs::openat(
                pfd,
                os(name),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|er| ferr(&e.path, "cannot open directory", er))?;
            apply_meta_fd(&fd, e, self.opts)?;
        }
        Ok(())
    }
}

/// Checks the digests of chunks an unpack shared without reading them
/// ([`UnpackOptions::defer_verify_cloned`]), on `threads` threads, reading them from the
/// archive with the chunk data in flight within [`CHUNK_MEMORY`] like every other reader.
/// Returns every chunk that failed, with its entry's path and the error.
pub fn verify_unverified(
    reader: &ArchiveReader,
    chunks: &[(Entry, ckstream_format::Chunk)],
    threads: usize,
) -> Vec<(Vec<u8>, Error)> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(Vec::new());
    let budget = Budget::new(CHUNK_MEMORY);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(chunks.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((entry, chunk)) = chunks.get(i) else {
                    return;
                };
                // The lease covers the chunk's bytes until they are checked. The budget is
                // never closed here; were it, the chunk would count as failed.
                let checked = match budget.take(chunk_cost(chunk)) {
                    Some(_lease) => reader.read_stored(chunk).and_then(|stored| {
                        ckstream_format::reader::decode_chunk(entry, chunk, stored).map(drop)
                    }),
                    None => Err(Error::Usage("verification stopped".into())),
                };
                if let Err(e) = checked {
                    failed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((entry.path.clone(), e));
                }
            });
        }
    });
    let mut failed = failed
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    failed.sort_by(|a, b| a.0.cmp(&b.0));
    failed
}
