//! Applying an entry's metadata: owner, mode, xattrs, then the modification time.
//!
//! The order is what makes the result right: the owner first, because chown clears the
//! setuid and setgid bits the mode then sets; the times last, because any later change
//! to the node would move them. Neither function follows a symlink: nodes are reached by
//! name under a [`DirCache`](super::dirs::DirCache) handle without following, or through
//! a handle the caller opened with `O_NOFOLLOW`. When the directories themselves get
//! their metadata (last, deepest first) is for [`unpack`](super::unpack) to decide.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use ckstream_format::{Entry, EntryKind, Error, Result};
use rustix::fs::{AtFlags, Mode, Timestamps};

use super::dirs::{ferr, os};
use super::UnpackOptions;

/// The archive keeps no access time: both times become the mtime.
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

/// A path naming `name` under the handle `dir`, for the xattr calls that have no `*at`
/// form: the kernel resolves the directory through the handle, and `lsetxattr` leaves
/// the final name unfollowed.
fn proc_path(dir: &OwnedFd, name: &[u8]) -> std::path::PathBuf {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    std::path::PathBuf::from(OsStr::from_bytes(&p))
}

/// Applies owner, mode, xattrs and mtime to a non-directory, non-file node (symlink,
/// device, fifo) without following it.
pub(super) fn apply_meta_at(
    dir: &OwnedFd,
    name: &[u8],
    e: &Entry,
    opts: &UnpackOptions,
) -> Result<()> {
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
    // Linux symlinks have no mode of their own, and chmodat would follow the link.
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
                .map_err(|er| xattr_error(path, &x.name, er))?;
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
pub(super) fn apply_meta_fd(fd: impl AsFd, e: &Entry, opts: &UnpackOptions) -> Result<()> {
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
            .map_err(|er| xattr_error(path, &x.name, er))?;
    }
    rustix::fs::futimens(&fd, &timestamps(e.mtime_ns))
        .map_err(|er| ferr(path, "cannot set times of", er))
}

fn xattr_error(path: &[u8], name: &[u8], e: rustix::io::Errno) -> Error {
    ferr(
        path,
        &format!("cannot set xattr {} on", String::from_utf8_lossy(name)),
        e,
    )
}
