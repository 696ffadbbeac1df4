//! Applying an overlayfs upper directory (a rootfs diff) onto a plain tree.
//!
//! Deletions come first, before any entry is created: a whiteout removes its path and an
//! opaque directory loses its old contents, so nothing the diff then writes can be
//! removed by them. Deletion walks the target from the [`DirCache`] root without
//! following symlinks and never creates anything on the way: a path whose parent is
//! missing has nothing to delete. Overlayfs's own xattrs are dropped from the entries,
//! and entries whose content the diff does not hold (redirected directories, metadata-only
//! copy-ups) are refused before anything is touched.

use std::borrow::Cow;
use std::os::fd::OwnedFd;

use ckstream_format::{Entry, EntryKind, Error, Result};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::dirs::{ferr, os};
use super::{selected, UnpackOptions, Unpacker};

/// An entry as it lands in the target, `None` when it does not (see [`target_view`]).
pub(super) type TargetEntry<'a> = Option<Cow<'a, Entry>>;

/// The entries as they will land in the target: paths relative to `strip_prefix`
/// (entries outside it, and the prefix directory itself, are `None`), and in overlay
/// mode without overlayfs-internal xattrs.
pub(super) fn target_view<'a>(
    entries: &'a [Entry],
    opts: &UnpackOptions,
) -> Result<Vec<TargetEntry<'a>>> {
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
            if opts.strip_prefix.is_none() && !opts.overlay_apply && !opts.overlay_upper {
                return Ok(Some(Cow::Borrowed(e)));
            }
            let Some(path) = strip(&e.path) else { return Ok(None) };
            let mut mapped = e.clone();
            mapped.path = path;
            if mapped.entry_kind() == EntryKind::Hardlink {
                mapped.link_target = strip(&e.link_target).unwrap_or_default();
            }
            if opts.overlay_apply || opts.overlay_upper {
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
            }
            if opts.overlay_apply {
                mapped.xattrs.retain(|x| !x.name.starts_with(b"trusted.overlay.") && !x.name.starts_with(b"user.overlay."));
            } else if opts.overlay_upper {
                mapped.xattrs.retain_mut(|x| {
                    let overlay = x.name.starts_with(b"trusted.overlay.")
                        || x.name.starts_with(b"user.overlay.");
                    if overlay && x.name.ends_with(b".overlay.opaque") {
                        x.name = b"trusted.overlay.opaque".to_vec();
                    }
                    !overlay || x.name == b"trusted.overlay.opaque"
                });
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

impl Unpacker<'_> {
    /// First step of applying an overlay diff: whiteouts delete their path, opaque
    /// directories lose their old contents (they replace what the lower layers had).
    pub(super) fn apply_deletions(&mut self) -> Result<()> {
        let originals = self.reader.entries();
        for (original, e) in originals.iter().zip(self.view) {
            let Some(e) = e else { continue };
            if !selected(&e.path, self.selection) {
                continue;
            }
            // Opaqueness is an overlay xattr, which the view no longer has.
            if !is_whiteout(e) && !is_opaque(original) {
                continue;
            }
            // Nothing to delete where the target lacks the parent directory.
            let Some((pfd, name)) = self.cache.existing_parent_of(&e.path)? else {
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
                    // Not a directory (or a symlink to one): the opaque directory replaces it.
                    Err(_) => remove_tree_at(pfd, name, &e.path)?,
                }
            }
        }
        Ok(())
    }
}
