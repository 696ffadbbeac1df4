//! Directory handles inside the extraction target, and the small path helpers.
//!
//! Invariant: every handle a [`DirCache`] holds was reached from the target's own handle
//! one component at a time with `O_NOFOLLOW`, so it names a directory inside the target
//! whatever the archive or the target contains. A symlink in the way (already in the
//! target, or planted by an earlier entry of the archive) fails that open and is refused,
//! never followed. Everything else in extraction calls `*at` functions on one of these
//! handles and a single final name, which it never follows either.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use ckstream_format::index::parent_path;
use ckstream_format::{Error, Result};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

pub(super) fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

pub(super) fn last_component(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

/// An I/O error naming the archive path, which says more than the handle it happened on.
pub(super) fn ferr(path: &[u8], what: &str, e: impl Into<io::Error>) -> Error {
    Error::io(
        format!("{what} {}", String::from_utf8_lossy(path)),
        e.into(),
    )
}

/// Open directory handles inside the target, keyed by archive path ("" = the target).
pub(super) struct DirCache {
    dirs: HashMap<Vec<u8>, OwnedFd>,
}

impl DirCache {
    pub(super) fn new(root: OwnedFd) -> Self {
        let mut dirs = HashMap::new();
        dirs.insert(Vec::new(), root);
        DirCache { dirs }
    }

    /// Handle on directory `path`, creating missing directories (mode 0700 until
    /// their own entry, if any, sets metadata). Refuses to traverse a symlink.
    pub(super) fn dir(&mut self, path: &[u8]) -> Result<&OwnedFd> {
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
    pub(super) fn existing_parent_of<'p>(
        &mut self,
        path: &'p [u8],
    ) -> Result<Option<(OwnedFd, &'p [u8])>> {
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
    pub(super) fn parent_of<'p>(&mut self, path: &'p [u8]) -> Result<(&OwnedFd, &'p [u8])> {
        let parent = parent_path(path).unwrap_or(b"");
        let fd = self.dir(parent)?;
        Ok((fd, last_component(path)))
    }
}

/// Removes whatever is at `name` (a non-directory, or an empty directory) so a new entry
/// can take its place, like tar's default; a non-empty directory is an error. Never
/// follows a symlink.
pub(super) fn remove_existing(dir: &OwnedFd, name: &[u8], path: &[u8]) -> Result<()> {
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
