//! Restoring a process tree: `criu restore --stream` served from an archive.
//!
//! Nothing reaches CRIU before the archive was opened (footer, index, every shard's
//! header), every metadata image was read and verified, and — when asked — every chunk
//! and the rootfs diff applied. Then CRIU starts and is served its images as it asks for
//! them; a chunk that fails its digest closes that image's pipe, so CRIU fails rather
//! than restoring wrong memory, and CRIU is killed if serving stops.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckstream_format::{ArchiveReader, EntryKind, Stop};

use crate::error::{CriuError, Result};
use crate::serve::{serve, stream_entry, ServeOptions, ServeReport};
use crate::workdir::WorkDir;
use crate::{is_metadata_image, run, socket, IMAGES_PREFIX};

/// Decoder threads per image file when the archive is in an object store: each has one
/// ranged GET in flight, so more of them overlap download, decompression and CRIU.
pub const REMOTE_DECODERS: usize = 6;

/// How to restore.
pub struct RestoreOptions<'a> {
    /// Apply the archive's rootfs diff onto this directory before CRIU starts.
    pub rootfs: Option<&'a Path>,
    /// Check every chunk before CRIU starts (reads the archive twice).
    pub verify_first: bool,
    /// CRIU's work directory; default: a temporary one, kept on failure.
    pub work_dir: Option<PathBuf>,
    /// Decoder threads per image file (default: every core, at least
    /// [`REMOTE_DECODERS`] for a remote archive).
    pub decoders: Option<usize>,
    /// Extra arguments for `criu restore`.
    pub criu_args: &'a [String],
    /// Polled while serving: once true the restore stops (CRIU is killed).
    pub stop: Stop,
}

/// Reads and verifies every CRIU metadata image (everything but pages), so a damaged
/// archive is refused before CRIU starts. Returns (files, bytes) checked.
///
/// # Errors
/// The archive's errors (digest mismatch, I/O); [`CriuError::Criu`] when the archive
/// holds no checkpoint (`criu/inventory.img` is missing).
pub fn verify_metadata(reader: &ArchiveReader) -> Result<(u64, u64)> {
    let prefix = format!("{IMAGES_PREFIX}/");
    let mut files = 0;
    let mut bytes = 0;
    let mut has_inventory = false;
    for (i, e) in reader.entries().iter().enumerate() {
        let Some(name) = e.path.strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        let name = String::from_utf8_lossy(name);
        has_inventory |= name == "inventory.img";
        if e.entry_kind() == EntryKind::File && is_metadata_image(&name) {
            for c in reader.chunks_of(i) {
                bytes += reader.read_chunk(e, c)?.len() as u64;
            }
            files += 1;
        }
    }
    if !has_inventory {
        return Err(CriuError::Criu(format!(
            "the archive holds no CRIU checkpoint ({IMAGES_PREFIX}/inventory.img is missing)"
        )));
    }
    Ok((files, bytes))
}

/// Applies the archive's rootfs diff (`rootfs/`) onto `target` with overlay semantics.
///
/// # Errors
/// [`CriuError::Criu`] when the archive has no rootfs diff; the unpack's errors.
pub fn apply_rootfs(reader: &ArchiveReader, target: &Path) -> Result<()> {
    if reader.find(ckstream_fs::ROOTFS_PREFIX).is_none() {
        return Err(CriuError::Criu("the archive holds no rootfs diff".into()));
    }
    let opts = ckstream_fs::UnpackOptions {
        strip_prefix: Some(ckstream_fs::ROOTFS_PREFIX.to_vec()),
        overlay_apply: true,
        ..Default::default()
    };
    ckstream_fs::unpack(reader, target, &[], &opts, &Default::default())
        .map(|_| ())
        .map_err(|source| CriuError::Rootfs {
            target: target.to_path_buf(),
            source,
        })
}

/// Restores the tree checkpointed in `reader` (see the module documentation). `remote`
/// says the archive is in an object store: its shards then read ahead in large spans.
///
/// # Errors
/// Archive errors before CRIU starts; [`CriuError::Failed`] (CRIU's log kept) when
/// serving or CRIU failed.
pub fn restore(
    reader: Arc<ArchiveReader>,
    remote: bool,
    opts: &RestoreOptions,
) -> Result<ServeReport> {
    verify_metadata(&reader)?;
    if opts.verify_first {
        reader.verify(default_threads(), &Default::default())?;
    }
    if let Some(target) = opts.rootfs {
        apply_rootfs(&reader, target)?;
    }
    let mut work = WorkDir::new(opts.work_dir.clone(), "ckstream-restore")?;
    let listener = socket::bind(&work.path, socket::SERVE_SOCKET)?;
    let log = work.path.join("restore.log");
    adopt_orphans();
    let child = Arc::new(Mutex::new(run::spawn_restore(&work.path, opts.criu_args)?));
    let watch = {
        let (child, log) = (child.clone(), log.clone());
        Box::new(move || -> Result<()> {
            match child.lock().unwrap().try_wait() {
                Ok(Some(status)) if !status.success() => {
                    Err(run::criu_failure("restore", status, &log))
                }
                _ => Ok(()),
            }
        })
    };
    if remote {
        // CRIU reads the page images front to back: fetch large spans ahead.
        reader.expect_sequential();
    }
    let decoders = opts.decoders.unwrap_or(if remote {
        default_threads().max(REMOTE_DECODERS)
    } else {
        default_threads()
    });
    let served = serve(
        &listener,
        reader,
        ServeOptions {
            decoders,
            watch: Some(watch),
            stop: opts.stop,
            ..Default::default()
        },
    );
    drop(listener);
    let status = {
        let mut c = child.lock().unwrap();
        if served.is_err() {
            // CRIU may be blocked reading a pipe we could not fill; it must not go on.
            let _ = c.kill();
        }
        run::wait_with_timeout(&mut c, Duration::from_secs(600))
            .map_err(|e| CriuError::io("waiting for criu", e))?
    };
    // A CRIU that did not finish (killed by us above, or by anyone) may leave the tasks
    // it forked frozen in its restorer, waiting for it forever: they are ours now, and die.
    let killed = if status.success() { 0 } else { kill_adopted() };
    let failed = |work: &mut WorkDir, e: CriuError| {
        work.keep();
        CriuError::Failed {
            what: "restore failed".into(),
            outcome: if killed > 0 {
                format!("no process was restored (killed {killed} half-restored processes CRIU left behind)")
            } else {
                "no process was restored".into()
            },
            work_dir: work.path.clone(),
            source: Box::new(e),
        }
    };
    let report = served.map_err(|e| failed(&mut work, e))?;
    if !status.success() {
        return Err(failed(
            &mut work,
            run::criu_failure("restore", status, &log),
        ));
    }
    Ok(report)
}

/// Writes every CRIU image of `reader` into `dir` (criu-image-streamer's `extract`),
/// and the external files `ext` to their fds; every chunk verified on the way.
///
/// # Errors
/// Archive errors; I/O errors creating the files; [`CriuError::Criu`] for an external
/// file the archive does not hold.
pub fn extract(
    reader: &ArchiveReader,
    dir: &Path,
    ext: Vec<(String, std::os::fd::OwnedFd)>,
    decoders: usize,
) -> Result<u64> {
    let prefix = format!("{IMAGES_PREFIX}/");
    let counter = AtomicU64::new(0);
    for (i, e) in reader.entries().iter().enumerate() {
        let Some(name) = e.path.strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        if e.entry_kind() != EntryKind::File || name.contains(&b'/') {
            continue;
        }
        let name = std::str::from_utf8(name)
            .map_err(|_| CriuError::Protocol("non-UTF-8 image name in the archive".into()))?;
        let path = dir.join(name);
        // Process memory: owner-only, and never written through a symlink in `dir`.
        let out = ckstream_store::create_private_file(&path)
            .map_err(|e| CriuError::io(format!("creating {}", path.display()), e))?;
        stream_entry(reader, i, &out, decoders, &counter)?;
    }
    for (name, fd) in ext {
        let i = reader.find(name.as_bytes()).ok_or_else(|| {
            CriuError::Criu(format!("external file {name} is not in the archive"))
        })?;
        stream_entry(reader, i, &File::from(fd), decoders, &counter)?;
    }
    Ok(counter.into_inner())
}

/// Makes this process the child subreaper of what CRIU forks, so that the restored tasks
/// come to it, not to init, if CRIU dies before it let them go. (A process-wide setting:
/// a restoring process adopts its orphaned descendants for the rest of its life.)
pub(crate) fn adopt_orphans() {
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
}

/// After CRIU failed and was waited for, SIGKILLs and reaps every child left: tasks CRIU
/// forked and abandoned (their own children come to us as their parents die). Returns how
/// many were killed.
fn kill_adopted() -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut killed = std::collections::BTreeSet::new();
    loop {
        while let Ok(Some(_)) = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG)
        {
        }
        let children = own_children();
        if children.is_empty() || Instant::now() > deadline {
            return killed.len();
        }
        for pid in children {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                killed.insert(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The children of every thread of this process (`/proc/self/task/*/children`).
fn own_children() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use ckstream_format::testutil::{craft, open_in_memory};
    use ckstream_format::{Entry, EntryKind};

    use super::extract;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: kind as i32,
            mode: 0o644,
            ..Default::default()
        }
    }

    /// `extract` (criu-image-streamer's) writes the images owner-only, and refuses to
    /// write through a symlink already in the images directory.
    #[test]
    fn images_are_extracted_private_and_never_through_a_symlink() {
        let reader = open_in_memory(&[craft(vec![
            (entry("criu", EntryKind::Dir), None),
            (
                entry("criu/pages-1.img", EntryKind::File),
                Some(b"memory".to_vec()),
            ),
        ])])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        assert_eq!(extract(&reader, &images, Vec::new(), 1).unwrap(), 6);
        let pages = images.join("pages-1.img");
        assert_eq!(std::fs::read(&pages).unwrap(), b"memory");
        assert_eq!(
            std::fs::metadata(&pages).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"not an image").unwrap();
        std::fs::remove_file(&pages).unwrap();
        std::os::unix::fs::symlink(&outside, &pages).unwrap();
        assert!(extract(&reader, &images, Vec::new(), 1).is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"not an image");
    }
}
