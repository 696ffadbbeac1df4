//! The FUSE operations of a mounted archive: metadata from the index (held in memory),
//! file data from the [`DataPlane`]. Everything is read-only; the archive never changes
//! while mounted, so the kernel may cache attributes, directory listings and pages for
//! as long as it likes.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use ckstream_format::{Entry, EntryKind};

use super::data::DataPlane;
use super::tree::{NodeSource, Tree, ROOT_INO};

/// A virtual xattr of the mount's root (not listed by listxattr, so copies and
/// manifests of the tree never see it): the mount's counters as JSON, for monitoring
/// and benchmarks without unmounting.
pub const STATS_XATTR: &str = "user.ckstream.stats";

/// How long the kernel may trust what we tell it: the archive is immutable.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// A file opened for reading: which entry, and where its last read ended (in chunk
/// positions), to tell sequential readers from random ones.
struct OpenFile {
    entry: usize,
    /// Position of the last chunk read, plus one; 0 before the first read.
    next_chunk: AtomicUsize,
}

/// The filesystem handed to fuser.
pub struct ArchiveFs {
    data: Arc<DataPlane>,
    tree: Tree,
    /// Time of the root and implied directories: when the archive was written.
    created: SystemTime,
    open_files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_handle: AtomicU64,
}

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::CharDevice => FileType::CharDevice,
        EntryKind::BlockDevice => FileType::BlockDevice,
        EntryKind::Fifo => FileType::NamedPipe,
        EntryKind::Socket => FileType::Socket,
        // Validation leaves only files here (hardlinks resolve to their target).
        _ => FileType::RegularFile,
    }
}

/// The kernel's `new_encode_dev`: how FUSE carries a device number in 32 bits.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

impl ArchiveFs {
    pub fn new(data: Arc<DataPlane>, tree: Tree) -> Self {
        let created_ns = data.reader().header().created_unix_ns;
        ArchiveFs {
            data,
            tree,
            created: UNIX_EPOCH + Duration::from_nanos(created_ns),
            open_files: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        }
    }

    fn entries(&self) -> &[Entry] {
        self.data.reader().entries()
    }

    /// The entry behind `ino`, if it is an archive entry (not the root or an implied dir).
    fn entry(&self, ino: u64) -> Option<(usize, &Entry)> {
        let i = self.tree.entry_of(ino)?;
        Some((i, &self.entries()[i]))
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.tree.node(ino)?;
        let mut attr = FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: node.nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        if let NodeSource::Entry(i) = node.source {
            let e = &self.entries()[i];
            let kind = e.entry_kind();
            let mtime = system_time(e.mtime_ns);
            attr.kind = file_type(kind);
            attr.perm = (e.mode & 0o7777) as u16;
            attr.uid = e.uid;
            attr.gid = e.gid;
            attr.atime = mtime;
            attr.mtime = mtime;
            attr.ctime = mtime;
            attr.crtime = mtime;
            match kind {
                EntryKind::File => {
                    attr.size = e.size;
                    // Holes take no space, as in the tree the archive was made from.
                    let stored: u64 = self
                        .data
                        .reader()
                        .chunks_of(i)
                        .iter()
                        .map(|c| c.raw_len as u64)
                        .sum();
                    attr.blocks = stored.div_ceil(512);
                }
                EntryKind::Symlink => attr.size = e.link_target.len() as u64,
                EntryKind::CharDevice | EntryKind::BlockDevice => {
                    attr.rdev = encode_dev(e.rdev_major, e.rdev_minor);
                }
                _ => {}
            }
        }
        Some(attr)
    }

    fn xattrs(&self, ino: u64) -> Option<&[ckstream_format::Xattr]> {
        match self.tree.node(ino)?.source {
            NodeSource::Entry(i) => Some(&self.entries()[i].xattrs),
            _ => Some(&[]),
        }
    }
}

/// Answers a size query, or the data if it fits in `size`, as getxattr/listxattr want.
fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for ArchiveFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(node) = self.tree.node(parent.0) else {
            return reply.error(Errno::ENOENT);
        };
        if node.kind != EntryKind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        match self
            .tree
            .lookup(self.entries(), parent.0, name.as_bytes())
            .and_then(|ino| self.attr(ino))
        {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.entry(ino.0) {
            Some((_, e)) if e.entry_kind() == EntryKind::Symlink => reply.data(&e.link_target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some((i, e)) = self.entry(ino.0) else {
            return reply.error(if self.tree.node(ino.0).is_some() {
                Errno::EISDIR
            } else {
                Errno::ENOENT
            });
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match e.entry_kind() {
            EntryKind::File => {}
            EntryKind::Dir => return reply.error(Errno::EISDIR),
            // The kernel opens device nodes, fifos and sockets itself; nothing to serve.
            _ => return reply.error(Errno::ENXIO),
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.open_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                fh,
                Arc::new(OpenFile {
                    entry: i,
                    next_chunk: AtomicUsize::new(0),
                }),
            );
        // The content never changes: keep the page cache across opens.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let open = self
            .open_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned();
        let entry = match &open {
            Some(o) => o.entry,
            None => match self.entry(ino.0) {
                Some((i, e)) if e.entry_kind() == EntryKind::File => i,
                _ => return reply.error(Errno::EBADF),
            },
        };
        match self.data.read(entry, offset, size as usize) {
            Ok(data) => {
                reply.data(data.as_slice());
                if let (Some(open), Some((first, last))) = (open, data.chunks) {
                    // Sequential when this read starts in the chunk the last one ended
                    // in or the one after (the kernel's own read-ahead splits reads into
                    // pieces smaller than a chunk), or at the start of the file.
                    let prev_next = open.next_chunk.swap(last + 1, Ordering::Relaxed);
                    if offset == 0 || first + 1 == prev_next || first == prev_next {
                        self.data.read_ahead(entry, last);
                    }
                }
            }
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.open_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.node(ino.0) {
            Some(node) if node.kind == EntryKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(node) = self.tree.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if node.kind != EntryKind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        // Offsets: 0 ".", 1 "..", then child k at k + 2; each reply entry carries the
        // offset of the one after it.
        let total = node.children.len() as u64 + 2;
        for off in offset..total {
            let full = match off {
                0 => reply.add(INodeNo(ino.0), 1, FileType::Directory, "."),
                1 => reply.add(INodeNo(node.parent), 2, FileType::Directory, ".."),
                _ => {
                    let child = node.children[(off - 2) as usize];
                    let kind = self
                        .tree
                        .node(child.ino)
                        .map_or(FileType::RegularFile, |n| file_type(n.kind));
                    let name = self.tree.name(self.entries(), child.name_of);
                    reply.add(INodeNo(child.ino), off + 1, kind, OsStr::from_bytes(name))
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let reader = self.data.reader();
        let bytes: u64 = reader.index().chunks.iter().map(|c| c.raw_len as u64).sum();
        reply.statfs(
            bytes.div_ceil(4096),
            0,
            0,
            self.tree.inode_count() as u64,
            0,
            4096,
            255,
            4096,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if ino.0 == ROOT_INO && name == STATS_XATTR {
            return reply_sized(reply, size, self.data.stats().to_json().as_bytes());
        }
        let Some(xattrs) = self.xattrs(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match xattrs.iter().find(|x| x.name == name.as_bytes()) {
            Some(x) => reply_sized(reply, size, &x.value),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(xattrs) = self.xattrs(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for x in xattrs {
            names.extend_from_slice(&x.name);
            names.push(0);
        }
        reply_sized(reply, size, &names);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some((i, e)) = self.entry(ino.0) else {
            return reply.error(Errno::EINVAL);
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        if offset >= e.size {
            return reply.error(Errno::ENXIO);
        }
        let chunks = self.data.reader().chunks_of(i);
        let at = chunks.partition_point(|c| c.file_end() <= offset);
        let found = match whence {
            libc::SEEK_DATA => chunks.get(at).map(|c| offset.max(c.file_offset)),
            libc::SEEK_HOLE => {
                // The first byte at or after `offset` no chunk covers (the end counts as a hole).
                let mut pos = offset;
                for c in &chunks[at..] {
                    if c.file_offset > pos {
                        break;
                    }
                    pos = c.file_end();
                }
                Some(pos.min(e.size))
            }
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Some(pos) => reply.offset(pos as i64),
            None => reply.error(Errno::ENXIO),
        }
    }

    fn destroy(&mut self) {
        self.data.shutdown();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_device_numbers_like_the_kernel() {
        // libc's makedev is the userspace view; the kernel's new_encode_dev packs the
        // same numbers into 32 bits for FUSE.
        for (major, minor) in [(1u32, 3u32), (7, 200), (0, 0), (259, 70000), (4095, 255)] {
            let dev = libc::makedev(major, minor);
            assert_eq!(
                super::encode_dev(major, minor) as u64,
                dev & 0xffff_ffff,
                "{major}:{minor}"
            );
        }
    }
}
