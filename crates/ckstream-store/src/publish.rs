//! Making a committed archive visible under its name without ever losing the archive
//! that had that name before.
//!
//! A new local archive is written as shard 0 under a temporary name beside the target
//! (`.NAME.RANDOM.partial`) and shards 1.. under names that contain the new archive's id
//! (see [`crate::location`]), which no other archive uses. Publishing is then one
//! atomic step, renaming shard 0 over the old one, followed by an fsync of the
//! directory; only after that are the old archive's other shards (the ones its shard 0
//! named, checked by their headers) removed. A failure before the rename removes the new
//! files and leaves the old archive byte for byte as it was; a crash at any point leaves
//! either the old or the new archive readable (and at worst unreferenced shard files).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ckstream_format::{Error, Result, ShardSink};

use crate::failpoint;
use crate::local::FileSink;
use crate::location::{read_shard_header, shard_path, ShardNames, Writeback};

/// What turns written shards into a visible archive, or removes them.
pub enum PendingArchive {
    /// A stream (standard output, fds): what was written is the archive; nothing to do.
    Stream,
    /// Local files.
    Files(FilePublish),
    /// Multipart uploads, one per shard.
    #[cfg(feature = "s3")]
    S3(crate::s3::S3PendingArchive),
}

impl PendingArchive {
    /// Puts the committed shards in place (see the module documentation), then removes
    /// the shards of the archive that had the name before.
    ///
    /// # Errors
    /// [`Error::Io`] naming what failed; the earlier archive under the name is then
    /// still in place and whole, and the new shards are removed (for an object store
    /// whose answer was lost, the objects that could not be checked are named instead).
    pub fn publish(self) -> Result<()> {
        match self {
            PendingArchive::Stream => Ok(()),
            PendingArchive::Files(f) => f.publish(),
            #[cfg(feature = "s3")]
            PendingArchive::S3(u) => u.publish(),
        }
    }

    /// Removes the new shards (or aborts their uploads); the name keeps what it had.
    pub fn discard(self) {
        match self {
            PendingArchive::Stream => {}
            PendingArchive::Files(f) => f.discard(),
            #[cfg(feature = "s3")]
            PendingArchive::S3(u) => u.discard(),
        }
    }
}

/// The shard files of a new local archive, before publishing.
pub struct FilePublish {
    dst: PathBuf,
    /// Shard 0 under its temporary name.
    tmp0: PathBuf,
    /// Shards 1.., already under their final (id-derived) names.
    others: Vec<PathBuf>,
    archive_id: [u8; 16],
    /// An exclusive `flock` on every file above, held until published or discarded: a
    /// file under these names that nobody holds locked was left by a writer that died,
    /// and the next write to the name sweeps it ([`sweep_stale`]).
    _locks: Vec<File>,
}

impl FilePublish {
    /// Creates the shard files of a new archive whose shard 0 will be `dst` (mode 0600:
    /// archives hold process memory).
    pub(crate) fn create(
        dst: &Path,
        archive_id: [u8; 16],
        names: ShardNames,
        shards: u32,
        writeback: Writeback,
    ) -> Result<(Vec<Box<dyn ShardSink>>, FilePublish)> {
        sweep_stale(dst);
        let (file0, tmp0) = create_partial(dst)?;
        let mut publish = FilePublish {
            dst: dst.to_path_buf(),
            tmp0,
            others: Vec::new(),
            archive_id,
            _locks: Vec::new(),
        };
        publish.lock(&file0)?;
        let mut sinks: Vec<Box<dyn ShardSink>> = vec![Box::new(FileSink::new(
            file0,
            dst.display().to_string(),
            writeback,
        ))];
        for i in 1..shards {
            let path = shard_path(dst, names, i);
            match create_private(&path).and_then(|file| publish.lock(&file).map(|()| file)) {
                Ok(file) => {
                    sinks.push(Box::new(FileSink::new(
                        file,
                        path.display().to_string(),
                        writeback,
                    )));
                    publish.others.push(path);
                }
                Err(e) => {
                    publish.discard();
                    return Err(e);
                }
            }
        }
        Ok((sinks, publish))
    }

    /// Holds an exclusive lock on `file` (through its own descriptor) until published.
    fn lock(&mut self, file: &File) -> Result<()> {
        let held = file
            .try_clone()
            .and_then(|f| {
                rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
                Ok(f)
            })
            .map_err(|e| Error::io("locking a new shard file", e))?;
        self._locks.push(held);
        Ok(())
    }

    fn publish(self) -> Result<()> {
        let old_shards = old_archive_shards(&self.dst, self.archive_id);
        let renamed =
            failpoint::hit("publish.rename").and_then(|()| std::fs::rename(&self.tmp0, &self.dst));
        if let Err(e) = renamed {
            let context = format!("renaming {} to {}", self.tmp0.display(), self.dst.display());
            self.discard();
            return Err(Error::io(context, e));
        }
        // The rename is the commit point: from here on the new archive is the one under
        // the name, so nothing of it is removed even if what follows fails.
        failpoint::hit("publish.dir-sync")
            .and_then(|()| sync_parent(&self.dst))
            .map_err(|e| {
                Error::io(
                    format!(
                        "{} is in place but its directory could not be synced, so it may not survive a crash",
                        self.dst.display()
                    ),
                    MayBeInPlace::wrap(e),
                )
            })?;
        // The new archive is durable under the name: failing to remove an old shard only
        // leaves an unreferenced file, so it is a warning, never a failed publish (the
        // failpoint's `error` makes every removal fail, as a real failure would).
        let injected = failpoint::hit("publish.remove-old").err();
        for p in old_shards {
            let removed = match &injected {
                Some(e) => Err(io::Error::other(e.to_string())),
                None => std::fs::remove_file(&p),
            };
            if let Err(e) = removed {
                if e.kind() != io::ErrorKind::NotFound {
                    eprintln!(
                        "ckstream: warning: could not remove {}, a shard of the archive replaced: {e}",
                        p.display()
                    );
                }
            }
        }
        Ok(())
    }

    fn discard(self) {
        let _ = std::fs::remove_file(&self.tmp0);
        for p in &self.others {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The cause of a publish error raised when the new archive may already have replaced
/// the old one under its name (the directory could not be synced after the rename; an
/// object store's answer to completing shard 0 was lost and could not be checked). A
/// caller must then not report that nothing was written: see [`may_be_in_place`].
#[derive(Debug)]
pub struct MayBeInPlace(io::Error);

impl MayBeInPlace {
    /// `e`, marked (same kind, same message).
    pub(crate) fn wrap(e: io::Error) -> io::Error {
        io::Error::new(e.kind(), MayBeInPlace(e))
    }
}

impl std::fmt::Display for MayBeInPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for MayBeInPlace {}

/// True when `e` or one of its causes says the new archive may be in place under its
/// name although publishing failed ([`MayBeInPlace`]).
pub fn may_be_in_place(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        let io = c
            .downcast_ref::<io::Error>()
            .or(match c.downcast_ref::<Error>() {
                Some(Error::Io { source, .. }) => Some(source),
                _ => None,
            });
        if c.is::<MayBeInPlace>()
            || io
                .and_then(|i| i.get_ref())
                .is_some_and(|i| i.is::<MayBeInPlace>())
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Shards 1.. of the committed archive now at `dst`, found by the names its shard 0
/// gives them and kept only when their own header carries its archive id (so nothing
/// that is not one of its shards is ever removed). Empty when `dst` is no archive.
fn old_archive_shards(dst: &Path, new_id: [u8; 16]) -> Vec<PathBuf> {
    let Ok(old) = read_shard_header(dst) else {
        return Vec::new();
    };
    if old.shard_index != 0 || old.archive_id == new_id {
        return Vec::new();
    }
    let names = ShardNames::of(&old);
    (1..old.shard_count)
        .map(|i| shard_path(dst, names, i))
        .filter(|p| {
            read_shard_header(p).is_ok_and(|h| h.archive_id == old.archive_id && h.shard_index != 0)
        })
        .collect()
}

/// Removes what writers of an archive named `dst` left when they died (SIGKILL, a power
/// cut): temporary shard 0s (`.NAME.RANDOM.partial`) and id-named shards 1.. that no
/// living writer holds locked and that the archive now at `dst` does not name. Best
/// effort: whatever cannot be checked is left.
fn sweep_stale(dst: &Path) {
    let (Some(dir), Some(name)) = (dst.parent(), dst.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let name = name.to_string_lossy();
    let current = read_shard_header(dst).ok().filter(|h| h.shard_index == 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let partial_prefix = format!(".{name}.");
    let shard_prefix = format!("{name}.");
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let stale_partial = file_name
            .strip_prefix(&partial_prefix)
            .and_then(|rest| rest.strip_suffix(".partial"))
            .is_some_and(|random| {
                random.len() == 12 && random.bytes().all(|b| b.is_ascii_hexdigit())
            });
        let id_named_shard = file_name.strip_prefix(&shard_prefix).is_some_and(|rest| {
            rest.split_once('.').is_some_and(|(id, i)| {
                id.len() == 16
                    && id.bytes().all(|b| b.is_ascii_hexdigit())
                    && !i.is_empty()
                    && i.bytes().all(|b| b.is_ascii_digit())
            })
        });
        if !stale_partial && !id_named_shard {
            continue;
        }
        let path = e.path();
        if id_named_shard {
            // Shards of the archive now under the name are in use, locked or not.
            let in_use = read_shard_header(&path).is_ok_and(|h| {
                current
                    .as_ref()
                    .is_some_and(|c| h.archive_id == c.archive_id)
            });
            if in_use {
                continue;
            }
        }
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        else {
            continue;
        };
        // A living writer holds its files locked; only an abandoned file can be taken.
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
            && file.metadata().is_ok_and(|m| m.is_file())
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// fsyncs the directory holding `path`, so a rename or creation in it is durable.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// A new file that only the owner can read (archives hold process memory). `O_EXCL`
/// already refuses any existing name, a symlink included; `O_NOFOLLOW` says so too.
fn create_private(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))
}

/// Opens `path` to be written from its start, only the owner able to read it (mode 0600,
/// also when it existed: its old mode could let others read what is now written), and
/// never through a symlink (`O_NOFOLLOW`: a planted link fails with `ELOOP` instead of
/// redirecting the write). For files holding process memory or written where others
/// could have placed a name: CRIU images extracted from an archive, logs and notes in
/// work directories.
///
/// # Errors
/// The I/O error of opening (ELOOP for a symlink) or of setting the mode.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if file.metadata()?.permissions().mode() & 0o7777 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

fn random_suffix() -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Creates the temporary file that will become `dst`: `.NAME.RANDOM.partial` beside it.
fn create_partial(dst: &Path) -> Result<(File, PathBuf)> {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dst.with_file_name(format!(".{name}.{}.partial", random_suffix()));
    Ok((create_private(&tmp)?, tmp))
}

/// A single new file (not an archive: a podman export, say) written under a temporary
/// name beside its destination and renamed into place by [`AtomicFile::publish`].
pub struct AtomicFile {
    tmp: PathBuf,
    dst: PathBuf,
}

/// Creates a new file (mode 0600) that becomes `dst` only when published, so a failed
/// write never replaces an earlier file.
///
/// # Errors
/// [`Error::Io`] when the temporary file cannot be created.
pub fn create_file_atomically(dst: &Path) -> Result<(File, AtomicFile)> {
    let (file, tmp) = create_partial(dst)?;
    Ok((
        file,
        AtomicFile {
            tmp,
            dst: dst.to_path_buf(),
        },
    ))
}

impl AtomicFile {
    /// Renames the (already synced) file into place and syncs the directory.
    ///
    /// # Errors
    /// [`Error::Io`]; the temporary file is removed when the rename failed.
    pub fn publish(self) -> Result<()> {
        if let Err(e) = std::fs::rename(&self.tmp, &self.dst) {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(Error::io(
                format!("renaming {} to {}", self.tmp.display(), self.dst.display()),
                e,
            ));
        }
        sync_parent(&self.dst).map_err(|e| {
            Error::io(
                format!("syncing the directory of {}", self.dst.display()),
                e,
            )
        })
    }

    /// Removes the temporary file.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::create_private_file;

    #[test]
    fn private_files_are_0600_and_never_written_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let new = dir.path().join("new");
        create_private_file(&new).unwrap();
        assert_eq!(mode(&new), 0o600);
        // An existing file readable by others is truncated and made private.
        let old = dir.path().join("old");
        std::fs::write(&old, b"previous content").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        create_private_file(&old).unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(std::fs::metadata(&old).unwrap().len(), 0);
        // A symlink, to a file or nowhere, is refused and its target left alone.
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        for (link, to) in [("link", &target), ("dangling", &dir.path().join("nothing"))] {
            let link = dir.path().join(link);
            std::os::unix::fs::symlink(to, &link).unwrap();
            let err = create_private_file(&link).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!dir.path().join("nothing").exists());
    }
}
