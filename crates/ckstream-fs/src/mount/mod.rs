//! Lazy, read-only FUSE mounts of an archive (`ckstream mount`).
//!
//! The tree and every entry's metadata come from the index, which [`ArchiveReader::open`]
//! has already read and validated; file data is fetched chunk by chunk when something
//! reads it, verified against its digest on every fetch (a bad chunk makes that read
//! fail with EIO, it never returns wrong bytes), and kept in a bounded cache. Sequential
//! readers get the next chunks fetched ahead of them on a small worker pool, and the
//! archive's hot list (`Index::hot_list`) is prefetched as soon as the mount is up.
//!
//! The data path only uses [`ArchiveReader`] and its shard sources, so an archive in
//! object storage mounts the same way as one on a local disk.
//!
//! The mount runs on fuser's pure-Rust mount path: as root it calls mount(2) itself; as
//! another user fuser falls back to `fusermount3` (Debian package `fuse3`).

mod cache;
mod data;
mod fs;
mod tree;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ckstream_format::{ArchiveReader, EntryKind, Error, Result};

pub use cache::CacheCounters;
pub use data::MountStats;
pub use fs::STATS_XATTR;

use data::{DataOptions, DataPlane};
use fs::ArchiveFs;
use tree::Tree;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Bytes of decoded chunks kept in memory.
    pub cache_bytes: u64,
    /// Chunks fetched ahead of a sequential reader (0 turns read-ahead off).
    pub readahead_chunks: usize,
    /// Background fetch threads for read-ahead and the hot list.
    pub fetch_threads: usize,
    /// Threads answering kernel requests (a slow fetch then blocks only one of them).
    pub fuse_threads: usize,
    /// Let other users than the one mounting access the files (`allow_other`).
    pub allow_other: bool,
    /// Prefetch the archive's hot list when the mount is up.
    pub prefetch_hot: bool,
    /// Shown as the mount's source in /proc/self/mountinfo.
    pub fs_name: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            cache_bytes: 256 << 20,
            readahead_chunks: 4,
            fetch_threads: 2,
            fuse_threads: 4,
            allow_other: false,
            prefetch_hot: true,
            fs_name: "ckstream".into(),
        }
    }
}

/// What a hot-list prefetch was started with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotPrefetch {
    /// Regular files named (directly, through a hardlink or under a directory) by the list.
    pub files: u64,
    /// Chunks queued.
    pub chunks: u64,
    /// Decoded bytes queued (bounded by half the cache).
    pub bytes: u64,
}

/// A live mount. Dropping it unmounts.
pub struct MountedArchive {
    session: fuser::BackgroundSession,
    data: Arc<DataPlane>,
    mountpoint: PathBuf,
    hot: HotPrefetch,
}

/// Expands the hot list into regular files, in list order: a hardlink counts as its
/// target, a directory as every file below it.
fn hot_files(reader: &ArchiveReader) -> Vec<usize> {
    let entries = reader.entries();
    let mut seen = vec![false; entries.len()];
    let mut files = Vec::new();
    let mut add = |i: usize, files: &mut Vec<usize>| {
        if !seen[i] {
            seen[i] = true;
            files.push(i);
        }
    };
    for &id in &reader.index().hot_list {
        let Some(e) = usize::try_from(id).ok().and_then(|i| entries.get(i)) else {
            continue; // Index::validate rejects these; nothing to prefetch.
        };
        match e.entry_kind() {
            EntryKind::File => add(id as usize, &mut files),
            EntryKind::Hardlink => {
                if let Some(t) = reader.find(&e.link_target) {
                    add(t, &mut files);
                }
            }
            EntryKind::Dir => {
                let mut prefix = e.path.clone();
                prefix.push(b'/');
                for (i, below) in entries.iter().enumerate() {
                    if !below.path.starts_with(&prefix) {
                        continue;
                    }
                    match below.entry_kind() {
                        EntryKind::File => add(i, &mut files),
                        EntryKind::Hardlink => {
                            if let Some(t) = reader.find(&below.link_target) {
                                add(t, &mut files);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    files
}

/// Mounts `reader`'s archive read-only at `mountpoint` and serves it on background
/// threads until [`MountedArchive::unmount`] or an outside `umount`.
///
/// # Errors
/// [`Error::Usage`] when `mountpoint` is not a directory; [`Error::Io`] when the mount
/// itself fails (no /dev/fuse, not permitted, mount point busy).
pub fn mount(
    reader: ArchiveReader,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<MountedArchive> {
    match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Usage(format!(
                "mount point {} is not a directory",
                mountpoint.display()
            )))
        }
        Err(e) => {
            return Err(Error::io(
                format!("mount point {}", mountpoint.display()),
                e,
            ))
        }
    }
    let reader = Arc::new(reader);
    let tree = Tree::build(reader.entries(), |p| reader.find(p));
    let data = Arc::new(DataPlane::new(
        reader.clone(),
        &DataOptions {
            cache_bytes: opts.cache_bytes,
            readahead_chunks: opts.readahead_chunks,
            workers: opts.fetch_threads,
        },
    )?);
    let filesystem = ArchiveFs::new(data.clone(), tree);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
        fuser::MountOption::FSName(opts.fs_name.clone()),
        fuser::MountOption::Subtype("ckstream".into()),
    ];
    config.acl = if opts.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(opts.fuse_threads.max(1));
    config.clone_fd = true;
    let session = fuser::spawn_mount(filesystem, mountpoint, &config)
        .map_err(|e| Error::io(format!("cannot mount at {}", mountpoint.display()), e))?;
    widen_kernel_readahead(mountpoint, reader.index().chunk_size);
    let mut hot = HotPrefetch::default();
    if opts.prefetch_hot && !reader.index().hot_list.is_empty() {
        let files = hot_files(&reader);
        hot.files = files.len() as u64;
        (hot.chunks, hot.bytes) = data.prefetch(files, opts.cache_bytes / 2)?;
    }
    Ok(MountedArchive {
        session,
        data,
        mountpoint: mountpoint.to_path_buf(),
        hot,
    })
}

/// Lets the kernel read ahead up to one chunk (at most 1 MiB, FUSE's largest request)
/// instead of its 128 KiB default: fewer, larger read requests for sequential readers.
/// The INIT handshake can only lower the window, but root may raise it through the
/// mount's backing-device entry in sysfs. Best effort: without root it stays as it is.
fn widen_kernel_readahead(mountpoint: &Path, chunk_size: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let want_kb = (chunk_size / 1024).clamp(128, 1024);
    let current: u32 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX);
    if current < want_kb {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, want_kb.to_string().as_bytes()));
    }
}

/// How a mount ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted and every request answered.
    Clean,
    /// The mount point was busy: it was detached (lazy unmount); it disappears when its
    /// last user goes, and requests still in flight then fail.
    Detached,
}

impl MountedArchive {
    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// What the hot-list prefetch was started with.
    pub fn hot_prefetch(&self) -> HotPrefetch {
        self.hot
    }

    /// True once the filesystem was unmounted from outside (`umount`, `fusermount3 -u`).
    pub fn is_finished(&self) -> bool {
        self.session.guard.is_finished()
    }

    /// Counters so far.
    pub fn stats(&self) -> MountStats {
        self.data.stats()
    }

    /// Unmounts (lazily if the mount point is busy) and waits for the request threads.
    ///
    /// # Errors
    /// [`Error::Io`] when neither a normal nor a lazy unmount works, or the request
    /// threads ended with an error.
    pub fn unmount(self) -> Result<(Unmounted, MountStats)> {
        let MountedArchive {
            session,
            data,
            mountpoint,
            ..
        } = self;
        if session.guard.is_finished() {
            session
                .join()
                .map_err(|e| Error::io("serving the mount", e))?;
            data.shutdown();
            return Ok((Unmounted::Clean, data.stats()));
        }
        match session.umount_and_join() {
            Ok(()) => {
                data.shutdown();
                Ok((Unmounted::Clean, data.stats()))
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                detach(&mountpoint)?;
                data.shutdown();
                Ok((Unmounted::Detached, data.stats()))
            }
            Err(e) => Err(Error::io(format!("unmounting {}", mountpoint.display()), e)),
        }
    }

    /// Waits until the filesystem is unmounted from outside.
    ///
    /// # Errors
    /// [`Error::Io`] when the request threads ended with an error.
    pub fn wait(self) -> Result<MountStats> {
        self.session
            .join()
            .map_err(|e| Error::io("serving the mount", e))?;
        self.data.shutdown();
        Ok(self.data.stats())
    }
}

/// Lazy unmount: detaches the mount point now, frees it when its last user goes.
fn detach(mountpoint: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| Error::Usage("mount point with a NUL byte".into()))?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it and nothing else.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(Error::io(
            format!("detaching {}", mountpoint.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
