//! Extracting an archive into a directory, safely and with reflinks where possible.
//!
//! Every path is resolved component by component from an open handle on the target
//! directory with `O_NOFOLLOW`, so nothing the archive (or the target) contains can
//! redirect a write outside it. File data is verified chunk by chunk before it is
//! written; uncompressed chunks are cloned from the archive when both sit on one
//! reflink-capable filesystem. Directory metadata is applied last, deepest first.
//!
//! The parts live in submodules by concern: `dirs` (safe directory handles and path
//! helpers), `meta` (owners, modes, xattrs, times), `data` (verified chunk restoring, a
//! batch of files at a time) and `overlay` (applying a rootfs diff's deletions).

mod data;
mod dirs;
mod meta;
mod overlay;

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use ckstream_format::index::parent_path;
use ckstream_format::{ArchiveReader, Entry, EntryKind, Error, Result, Stop};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use data::{discard_batch, flush_batch, ChunkJob, OpenFile};
use dirs::{ferr, os, remove_existing, DirCache};
use meta::{apply_meta_at, apply_meta_fd};
use overlay::{apply_deletions, target_view};

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
