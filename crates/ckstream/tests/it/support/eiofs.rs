//! A read-only FUSE passthrough of one flat directory that fails reads of one file with
//! EIO in a chosen byte range: the test's stand-in for a disk with bad sectors
//! (device-mapper's `error` target, where there is no device-mapper). Every read reaches
//! this filesystem (direct I/O, no page cache), so the bad range is hit each time. In
//! stall mode, reads of the range wait until the test opens the gate instead: a reader
//! is then certainly in the middle of that range when the test injects another fault.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};

const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(1);

/// Which reads fail: those of `file` overlapping `[start, end)`; `start == u64::MAX`
/// disarms it.
pub struct BadRange {
    pub file: OsString,
    pub start: AtomicU64,
    pub end: AtomicU64,
    /// Reads that were failed so far.
    pub failed: AtomicU64,
    /// Stall reads of the range (until [`BadRange::open_gate`]) instead of failing them.
    pub stall: AtomicBool,
    /// Reads that are or were stalled.
    pub stalled: AtomicU64,
    gate_open: Mutex<bool>,
    gate: Condvar,
}

impl BadRange {
    pub fn new(file: impl Into<OsString>) -> Arc<BadRange> {
        Arc::new(BadRange {
            file: file.into(),
            start: AtomicU64::new(u64::MAX),
            end: AtomicU64::new(u64::MAX),
            failed: AtomicU64::new(0),
            stall: AtomicBool::new(false),
            stalled: AtomicU64::new(0),
            gate_open: Mutex::new(false),
            gate: Condvar::new(),
        })
    }

    /// Lets stalled reads (and all later ones) through.
    pub fn open_gate(&self) {
        *self.gate_open.lock().unwrap() = true;
        self.gate.notify_all();
    }

    fn wait_gate(&self) {
        let mut open = self.gate_open.lock().unwrap();
        while !*open {
            open = self.gate.wait(open).unwrap();
        }
    }

    pub fn arm(&self, start: u64, end: u64) {
        self.end.store(end, Ordering::SeqCst);
        self.start.store(start, Ordering::SeqCst);
    }

    fn hits(&self, offset: u64, len: u64) -> bool {
        let (start, end) = (
            self.start.load(Ordering::SeqCst),
            self.end.load(Ordering::SeqCst),
        );
        offset < end && offset + len > start
    }
}

struct EioFs {
    dir: PathBuf,
    /// Inode → file name (inode = position in the listing + 2).
    names: Vec<OsString>,
    bad: Arc<BadRange>,
    open: Mutex<HashMap<u64, (Arc<File>, bool)>>,
    next_fh: AtomicU64,
}

impl EioFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let path = if ino == ROOT {
            self.dir.clone()
        } else {
            self.dir.join(self.names.get((ino - 2) as usize)?)
        };
        let m = std::fs::metadata(path).ok()?;
        let t = UNIX_EPOCH + Duration::from_secs(m.mtime().max(0) as u64);
        Some(FileAttr {
            ino: INodeNo(ino),
            size: m.size(),
            blocks: m.blocks(),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: if m.is_dir() {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: (m.mode() & 0o7777) as u16,
            nlink: 1,
            uid: m.uid(),
            gid: m.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for EioFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        match self
            .names
            .iter()
            .position(|n| n == name)
            .and_then(|i| self.attr(i as u64 + 2))
        {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let Some(name) = ino
            .0
            .checked_sub(2)
            .and_then(|i| self.names.get(i as usize))
        else {
            return reply.error(Errno::EISDIR);
        };
        let file = match File::open(self.dir.join(name)) {
            Ok(f) => f,
            Err(_) => return reply.error(Errno::EIO),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let bad = *name == self.bad.file;
        self.open.lock().unwrap().insert(fh, (Arc::new(file), bad));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((file, bad)) = self.open.lock().unwrap().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        if bad && self.bad.hits(offset, size as u64) {
            if self.bad.stall.load(Ordering::SeqCst) {
                self.bad.stalled.fetch_add(1, Ordering::SeqCst);
                self.bad.wait_gate();
            } else {
                self.bad.failed.fetch_add(1, Ordering::SeqCst);
                return reply.error(Errno::EIO);
            }
        }
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => return reply.error(Errno::EIO),
            }
        }
        reply.data(&buf[..got]);
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
        self.open.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let total = self.names.len() as u64 + 2;
        for off in offset..total {
            let full = match off {
                0 => reply.add(INodeNo(ROOT), 1, FileType::Directory, "."),
                1 => reply.add(INodeNo(ROOT), 2, FileType::Directory, ".."),
                _ => reply.add(
                    INodeNo(off),
                    off + 1,
                    FileType::RegularFile,
                    &self.names[(off - 2) as usize],
                ),
            };
            if full {
                break;
            }
        }
        reply.ok();
    }
}

/// The files of `dir` (a flat directory, listed once at mount time) served read-only at
/// `mountpoint` until dropped.
pub struct EioMount {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: PathBuf,
    bad: Arc<BadRange>,
}

impl EioMount {
    pub fn new(dir: &Path, mountpoint: &Path, bad: Arc<BadRange>) -> EioMount {
        let mut names: Vec<OsString> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name())
            .collect();
        names.sort();
        let fs = EioFs {
            dir: dir.to_path_buf(),
            names,
            bad: bad.clone(),
            open: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName("ckstream-eio-test".into()),
        ];
        config.acl = fuser::SessionACL::Owner;
        config.n_threads = Some(4);
        let session = fuser::spawn_mount(fs, mountpoint, &config).expect("FUSE mount");
        EioMount {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            bad,
        }
    }
}

impl Drop for EioMount {
    fn drop(&mut self) {
        // A stalled read would keep the unmount waiting.
        self.bad.open_gate();
        if let Some(s) = self.session.take() {
            if s.umount_and_join().is_err() {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
        }
    }
}
