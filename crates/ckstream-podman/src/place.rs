//! Restoring a `.cka` with its rootfs diff and CRIU images placed straight into the new
//! container's storage, reflinked where the archive is uncompressed on the same
//! filesystem: no byte goes through a tar, nothing is written through the overlay.
//!
//! Podman still does everything that is podman's (`podman container restore --import`:
//! the database entry, the storage, the network, runc and CRIU), from a *stub* export
//! that holds only the bundle files (`config.dump`, `spec.dump`, `network.status`, …).
//! The stub is handed over through a FIFO, which podman 4 opens twice, in this order
//! (libpod `CRImportCheckpointTar`, `Container.restore`):
//!
//! 1. it reads `config.dump` and `spec.dump` from the first pass, then creates the
//!    container: its database entry and its storage (an empty overlay upper directory,
//!    not mounted);
//! 2. it opens the archive again to untar it into the container's bundle directory, and
//!    only after that checks for `checkpoint/inventory.img` and mounts the storage.
//!
//! While podman waits for the second pass, the container exists and nothing has
//! mounted its layer: ckstream finds it in containers/storage's `containers.json`,
//! checks that its upper directory is empty and its merged directory not mounted
//! (changing an overlay's upper directory is only allowed while it is not mounted),
//! writes the diff there as the overlay upper directory it was stored as (whiteouts,
//! opaque directories) and the CRIU images into `userdata/checkpoint/`, every chunk
//! verified, and then lets podman read the stub. When a podman version does these steps
//! in another order, the checks fail before anything is written and the restore stops
//! with an error naming `--apply-diff hook` (podman gets an unreadable stub, so it
//! stops too).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckstream_format::{ArchiveReader, Error, Progress, Stop};
use ckstream_fs::{UnpackOptions, UnpackStats};

use crate::error::{PodmanError, Result};
use crate::layout::{CKA_CRIU_DIR, CKA_ROOTFS_DIR, PODMAN_CHECKPOINT_DIR};
use crate::podman;

/// The container podman created for the restore, as containers/storage records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewContainer {
    /// Its ID.
    pub id: String,
    /// Its overlay upper directory (`overlay/LAYER/diff`).
    pub upper: PathBuf,
    /// Where podman mounts its root (`overlay/LAYER/merged`).
    pub merged: PathBuf,
    /// Its bundle directory (`overlay-containers/ID/userdata`).
    pub bundle: PathBuf,
}

/// What placing did.
#[derive(Debug, Clone, Default)]
pub struct Placed {
    /// The container podman restored.
    pub container: String,
    /// Writing the diff and the images into the container's storage.
    pub place_seconds: f64,
    /// Bytes of file data placed.
    pub bytes: u64,
    /// With [`PlaceOptions::verify_rootfs_after`]: the rootfs chunks shared by reflink
    /// without being read, to be checked once the container runs
    /// ([`ckstream_fs::verify_unverified`]).
    pub unverified: Vec<(ckstream_format::Entry, ckstream_format::Chunk)>,
}

/// What to place and how.
pub struct PlaceOptions<'a> {
    /// The container's ID in `config.dump` (podman keeps it unless `name` is given).
    pub config_id: &'a str,
    /// `--name`: podman gives the container a new ID.
    pub name: Option<&'a str>,
    /// containers/storage's graph root.
    pub graph_root: &'a Path,
    /// Counts the bytes placed.
    pub progress: &'a Progress,
    /// Polled while placing.
    pub stop: Stop,
    /// The container to remove should ckstream die before the restore ends (see
    /// [`guard`]): the restored container's name, when no container had it before.
    pub remove_on_death: Option<&'a str>,
    /// Share the rootfs diff's whole chunks by reflink without reading them first; they
    /// are returned in [`Placed::unverified`]. The CRIU images are always verified.
    pub verify_rootfs_after: bool,
    /// The archive is a temporary one this process just wrote from a podman export (which
    /// carries no digests of its own), hashing the bytes as it wrote or cloned them: the
    /// rootfs diff's chunks shared by reflink from it are those very extents, so they are
    /// not read again, before or after the start. Chunks copied or decoded, and the CRIU
    /// images, are checked as always.
    pub rootfs_hashed_by_import: bool,
}

/// True when the archive's `rootfs/` is a whole overlay upper directory, as
/// `ckstream podman checkpoint` stores it: every entry's parent directory is an entry
/// too. A diff imported from a podman export lists changed files without their parent
/// directories, whose owner and mode an upper directory must carry (an overlay takes a
/// directory's metadata from its upper copy): placing adds them from the image's layers
/// first ([`crate::layers::complete_upper`]).
pub fn is_whole_upper(entries: &[ckstream_format::Entry]) -> bool {
    let prefix = CKA_ROOTFS_DIR.as_bytes();
    let mut dirs = std::collections::HashSet::new();
    dirs.insert(prefix.to_vec());
    let mut rootfs = Vec::new();
    for e in entries {
        if e.path.starts_with(prefix) && e.path.get(prefix.len()) == Some(&b'/') {
            if e.entry_kind() == ckstream_format::EntryKind::Dir {
                dirs.insert(e.path.clone());
            }
            rootfs.push(&e.path);
        }
    }
    rootfs.iter().all(|p| {
        let parent = &p[..p.iter().rposition(|&b| b == b'/').unwrap_or(0)];
        dirs.contains(parent)
    })
}

/// Restores the container of `reader` by `podman container restore --import` of
/// `stub` (a podman export without `checkpoint/`, `rootfs-diff.tar` and
/// `deleted.files`), placing the archive's `rootfs/` and `criu/` into the container's
/// storage in between (see the module documentation).
///
/// # Errors
/// [`PodmanError::Command`] when podman fails (its message); the errors of placing
/// (a bad chunk is [`PodmanError::Archive`]); [`PodmanError::Unsupported`] when
/// podman's storage is not in the state this path relies on.
pub fn restore_placed(reader: &ArchiveReader, stub: &[u8], opts: &PlaceOptions) -> Result<Placed> {
    // A container that exists already is never the one to place into.
    let existing = container_ids(opts.graph_root)?;
    let dir = PrivateDir::new()?;
    let fifo = dir.0.join("checkpoint.tar");
    make_fifo(&fifo)?;
    let mut args = vec![
        "container".to_string(),
        "restore".into(),
        "--import".into(),
        fifo.to_string_lossy().into_owned(),
    ];
    if let Some(n) = opts.name {
        args.extend(["--name".into(), n.to_string()]);
    }
    let mut child = Command::new(podman::podman_bin())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| podman::podman_error(&args.join(" "), format!("cannot start podman: {e}")))?;
    let outputs = podman::collect_output(&mut child);
    // Held until the restore has ended, whatever its outcome: ckstream's own error
    // handling removes what a failed restore created; the guard only acts when ckstream
    // dies first.
    let _guard = Guard::start(child.id(), &fifo, opts.remove_on_death);
    let placed = serve_stub(&mut child, &fifo, reader, stub, opts, &existing);
    let status = child.wait();
    let (stdout, stderr) = outputs.join();
    let podman_failed = match status {
        Ok(s) if s.success() => None,
        Ok(s) => Some(podman::podman_error(
            &args.join(" "),
            format!("{s}: {}", stderr.trim()),
        )),
        Err(e) => Some(podman::podman_error(&args.join(" "), e)),
    };
    // Placing failed first: podman only failed because the stub was refused to it.
    let placed = placed?;
    if let Some(e) = podman_failed {
        return Err(e);
    }
    let Some(mut placed) = placed else {
        return Err(PodmanError::Unsupported(
            "podman restored the container without reading the archive after creating it, so ckstream could not place its data; retry with --apply-diff hook".into(),
        ));
    };
    placed.container = stdout.lines().last().unwrap_or("").trim().to_string();
    Ok(placed)
}

/// Serves the stub at every open of the pipe until podman exits. podman 4.3 reads it
/// three times: for the OCI runtime's name, for `config.dump`/`spec.dump`, and, once it
/// has created the container, to untar it into the bundle (then it mounts the root). At
/// the first open after the container appeared in containers/storage (and was not
/// there before), the archive's data is placed first; when placing fails, podman gets
/// bytes that are no tar instead, so it stops before mounting anything. `None` when
/// podman never created the container.
fn serve_stub(
    child: &mut Child,
    fifo: &Path,
    reader: &ArchiveReader,
    stub: &[u8],
    opts: &PlaceOptions,
    existing: &HashSet<String>,
) -> Result<Option<Placed>> {
    let mut placed: Option<Result<Placed>> = None;
    while let Some(mut f) = open_for_podman(fifo, child)? {
        if placed.is_none() {
            match find_new_container(opts, existing) {
                Ok(None) => {}
                Ok(Some(ctr)) => placed = Some(place(reader, &ctr, opts)),
                Err(e) => placed = Some(Err(e)),
            }
        }
        match placed {
            Some(Err(_)) => refuse(f),
            _ => write_stub(&mut f, stub)?,
        }
        // The pipe's next writer would reach this reader until podman closes it.
        wait_reader_gone(child, fifo);
    }
    placed.transpose()
}

/// Hands podman bytes that are no tar header: its untar fails before anything is
/// mounted.
fn refuse(mut f: std::fs::File) {
    let _ = f.write_all(&[0xff; 1024]);
}

/// Waits until process `pid` no longer has `fifo` open (or has exited).
fn wait_reader_gone(child: &mut Child, fifo: &Path) {
    while has_open(child.id(), fifo) {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// True when process `pid` has a file descriptor on `path`.
fn has_open(pid: u32, path: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
}

fn write_stub(f: &mut std::fs::File, stub: &[u8]) -> Result<()> {
    match f.write_all(stub) {
        // podman stops reading at the end-of-archive blocks of the first pass.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| PodmanError::Archive(Error::io("handing the archive to podman", e))),
    }
}

/// Opens `fifo` for writing once podman opens it for reading; `None` when podman
/// exits first.
fn open_for_podman(fifo: &Path, child: &mut Child) -> Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(fifo)
        {
            Ok(f) => {
                let flags = rustix::fs::fcntl_getfl(&f).map_err(std::io::Error::from);
                flags
                    .and_then(|fl| {
                        rustix::fs::fcntl_setfl(&f, fl - rustix::fs::OFlags::NONBLOCK)
                            .map_err(std::io::Error::from)
                    })
                    .map_err(|e| {
                        PodmanError::Archive(Error::io("opening the pipe to podman", e))
                    })?;
                return Ok(Some(f));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if child.try_wait().ok().flatten().is_some() {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(PodmanError::Archive(Error::io(
                    format!("opening {}", fifo.display()),
                    e,
                )))
            }
        }
    }
}

/// The container podman just created, from containers/storage's `containers.json`,
/// checked to be in the state placing needs: an empty upper directory that nothing
/// has mounted.
fn find_new_container(
    opts: &PlaceOptions,
    existing: &HashSet<String>,
) -> Result<Option<NewContainer>> {
    let bytes = read_containers_json(opts.graph_root)?;
    let Some(ctr) = container_in(&bytes, opts.config_id, opts.name, opts.graph_root, existing)?
    else {
        return Ok(None);
    };
    let unsupported = |why: String| {
        PodmanError::Unsupported(format!(
            "cannot place the archive into podman's storage: {why}; retry with --apply-diff hook"
        ))
    };
    let mut entries = std::fs::read_dir(&ctr.upper)
        .map_err(|e| unsupported(format!("{}: {e}", ctr.upper.display())))?;
    if entries.next().is_some() {
        return Err(unsupported(format!(
            "the new container's upper directory {} is not empty",
            ctr.upper.display()
        )));
    }
    if is_mount_point(&ctr.merged) {
        return Err(unsupported(format!(
            "podman mounted {} before reading the archive",
            ctr.merged.display()
        )));
    }
    if !ctr.bundle.is_dir() {
        return Err(unsupported(format!(
            "the bundle directory {} does not exist",
            ctr.bundle.display()
        )));
    }
    Ok(Some(ctr))
}

/// containers/storage's list of containers (empty before its first container).
fn read_containers_json(graph_root: &Path) -> Result<Vec<u8>> {
    let list = graph_root.join("overlay-containers/containers.json");
    match std::fs::read(&list) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(b"[]".to_vec()),
        r => {
            r.map_err(|e| PodmanError::Archive(Error::io(format!("reading {}", list.display()), e)))
        }
    }
}

/// The IDs of the containers in containers/storage now.
fn container_ids(graph_root: &Path) -> Result<HashSet<String>> {
    let v: serde_json::Value =
        serde_json::from_slice(&read_containers_json(graph_root)?).map_err(|e| {
            PodmanError::Unsupported(format!("containers/storage's containers.json: {e}"))
        })?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["id"].as_str().map(str::to_string))
        .collect())
}

/// The container named `name` (or with ID `config_id` when no name is given) in
/// `containers.json`, unless its ID is one of `existing`.
fn container_in(
    json: &[u8],
    config_id: &str,
    name: Option<&str>,
    graph_root: &Path,
    existing: &HashSet<String>,
) -> Result<Option<NewContainer>> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| {
        PodmanError::Unsupported(format!("containers/storage's containers.json: {e}"))
    })?;
    let found = v.as_array().into_iter().flatten().find(|c| {
        let is_new = c["id"].as_str().is_some_and(|id| !existing.contains(id));
        is_new
            && match name {
                Some(n) => c["names"]
                    .as_array()
                    .is_some_and(|ns| ns.iter().any(|x| x.as_str() == Some(n))),
                None => c["id"].as_str() == Some(config_id),
            }
    });
    let Some(c) = found else {
        return Ok(None);
    };
    let field = |k: &str| {
        c[k].as_str()
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                PodmanError::Unsupported(format!("containers.json: the container has no {k}"))
            })
    };
    let (id, layer) = (field("id")?, field("layer")?);
    let layer_dir = graph_root.join("overlay").join(layer);
    Ok(Some(NewContainer {
        id: id.to_string(),
        upper: layer_dir.join("diff"),
        merged: layer_dir.join("merged"),
        bundle: graph_root
            .join("overlay-containers")
            .join(id)
            .join("userdata"),
    }))
}

/// True when `path` is the root of a mount (another device than its parent's).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(Ok(parent))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    me.dev() != parent.dev()
}

/// Writes `rootfs/` into the upper directory and `criu/` into the bundle's checkpoint
/// directory; returns the bytes written. Whatever fails leaves the checkpoint directory
/// absent (podman then finds no checkpoint) and the upper directory to podman's removal
/// of the container.
fn place(reader: &ArchiveReader, ctr: &NewContainer, opts: &PlaceOptions) -> Result<Placed> {
    let started = Instant::now();
    let stats = UnpackStats::default();
    let unpack = |prefix: &str, dest: &Path, overlay_upper: bool| {
        let o = UnpackOptions {
            strip_prefix: Some(prefix.as_bytes().to_vec()),
            overlay_upper,
            defer_verify_cloned: overlay_upper
                && (opts.verify_rootfs_after || opts.rootfs_hashed_by_import),
            // CRIU reads the images right after: leave them in the page cache.
            verify_from_output: true,
            stop: opts.stop,
            ..Default::default()
        };
        let has_any = reader.entries().iter().any(|e| {
            e.path.starts_with(prefix.as_bytes()) && e.path.get(prefix.len()) == Some(&b'/')
        });
        if !has_any {
            return Ok(());
        }
        ckstream_fs::unpack(reader, dest, &[], &o, &stats).map_err(|e| {
            PodmanError::Archive(e).context(format!("placing {prefix}/ into {}", dest.display()))
        })
    };
    let checkpoint = ctr.bundle.join(PODMAN_CHECKPOINT_DIR);
    let done = complete_upper(reader.entries(), ctr, opts.graph_root)
        .and_then(|()| unpack(CKA_ROOTFS_DIR, &ctr.upper, true))
        .and_then(|()| {
            std::fs::DirBuilder::new()
                .mode_private()
                .create(&checkpoint)
                .map_err(|e| {
                    PodmanError::Archive(Error::io(format!("creating {}", checkpoint.display()), e))
                })?;
            unpack(CKA_CRIU_DIR, &checkpoint, false)
        });
    let bytes = stats.bytes.load(std::sync::atomic::Ordering::Relaxed);
    opts.progress.add(bytes);
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&checkpoint);
    }
    done.map(|()| Placed {
        container: String::new(),
        place_seconds: started.elapsed().as_secs_f64(),
        bytes,
        unverified: if opts.rootfs_hashed_by_import {
            Vec::new()
        } else {
            stats
                .unverified
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        },
    })
}

/// Gives a diff stored without its parent directories (an imported podman export) the
/// parents overlayfs would have copied up from the container's image, so the diff
/// lands in the upper directory as podman's untar through the mounted root would have
/// left it (see [`crate::layers::complete_upper`]).
fn complete_upper(
    entries: &[ckstream_format::Entry],
    ctr: &NewContainer,
    graph_root: &Path,
) -> Result<()> {
    if is_whole_upper(entries) {
        return Ok(());
    }
    let prefix = [CKA_ROOTFS_DIR.as_bytes(), b"/"].concat();
    let paths: Vec<&[u8]> = entries
        .iter()
        .filter_map(|e| e.path.strip_prefix(&prefix[..]))
        .collect();
    let dirs: HashSet<&[u8]> = entries
        .iter()
        .filter(|e| e.entry_kind() == ckstream_format::EntryKind::Dir)
        .filter_map(|e| e.path.strip_prefix(&prefix[..]))
        .collect();
    let layer_dir = ctr.upper.parent().unwrap_or(&ctr.upper);
    let mut lower =
        crate::layers::MergedLayers::new(crate::layers::lower_layers(graph_root, layer_dir)?);
    crate::layers::complete_upper(&ctr.upper, &paths, &|d| dirs.contains(d), &mut lower)?;
    Ok(())
}

/// The hidden ckstream command that runs [`guard`].
pub const GUARD_COMMAND: &str = "__podman-restore-guard";

/// A ckstream process beside podman that cleans up if this one dies before the restore
/// ended (SIGKILL, OOM): podman would wait forever for the pipe's next writer, and the
/// container it created would stay. The guard gets a byte on its standard input when
/// the restore ended; end of file without it means ckstream died.
struct Guard(Option<Child>);

impl Guard {
    fn start(podman_pid: u32, fifo: &Path, remove: Option<&str>) -> Guard {
        use std::os::unix::process::CommandExt;
        let Ok(exe) = std::env::current_exe() else {
            return Guard(None);
        };
        let mut cmd = Command::new(exe);
        cmd.arg(GUARD_COMMAND)
            .arg(podman_pid.to_string())
            .arg(fifo)
            .args(remove)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Not in the terminal's process group: Ctrl-C stops ckstream, not its guard.
            .process_group(0);
        Guard(cmd.spawn().ok())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"k");
            }
            let _ = child.wait();
        }
    }
}

/// The guard process (see [`Guard`]): waits for ckstream's word; without it, makes
/// podman (`podman_pid`) fail by handing it bytes that are no tar at every open of
/// `fifo`, waits for it to exit, removes the container named `remove` and the pipe's
/// private directory. Returns the exit code.
pub fn guard(
    podman_pid: u32,
    fifo: &Path,
    remove: Option<&str>,
    mut from_ckstream: impl std::io::Read,
) -> i32 {
    let mut word = [0u8; 1];
    if matches!(from_ckstream.read(&mut word), Ok(1)) {
        return 0;
    }
    while is_running(podman_pid) {
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(fifo)
        {
            refuse(f);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(name) = remove {
        if podman::container_exists(name) {
            let _ = podman::remove(name);
        }
    }
    if let Some(dir) = fifo.parent().filter(|d| {
        d.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(PRIVATE_DIR_PREFIX))
    }) {
        let _ = std::fs::remove_dir_all(dir);
    }
    eprintln!("ckstream: the restore was interrupted; removed what podman had created");
    1
}

/// True while process `pid` exists and is no zombie (an orphan's exit status is
/// nobody's to collect here, and PID 1 may reap it late).
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

const PRIVATE_DIR_PREFIX: &str = "ckstream-podman-restore.";

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::DirBuilder {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(0o700)
    }
}

fn make_fifo(path: &Path) -> Result<()> {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .map_err(|e| {
        PodmanError::Archive(Error::io(
            format!("creating the pipe {}", path.display()),
            e.into(),
        ))
    })
}

/// A private (0700) temporary directory, removed with what is in it.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "{PRIVATE_DIR_PREFIX}{}.{:016x}",
            std::process::id(),
            u64::from_le_bytes(ckstream_store::new_archive_id()[..8].try_into().unwrap())
        ));
        std::fs::DirBuilder::new()
            .mode_private()
            .create(&path)
            .map_err(|e| {
                PodmanError::Archive(Error::io(format!("creating {}", path.display()), e))
            })?;
        Ok(PrivateDir(path))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const L: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn the_new_container_is_found_by_id_or_by_name() {
        let json = format!(
            r#"[{{"id":"{A}","names":["old"],"layer":"{L}"}},{{"id":"{B}","names":["new"],"layer":"{L}"}}]"#
        );
        let root = Path::new("/g");
        let none = HashSet::new();
        let by_id = container_in(json.as_bytes(), A, None, root, &none)
            .unwrap()
            .unwrap();
        assert_eq!(by_id.id, A);
        assert_eq!(by_id.upper, Path::new("/g/overlay").join(L).join("diff"));
        assert_eq!(by_id.merged, Path::new("/g/overlay").join(L).join("merged"));
        assert_eq!(
            by_id.bundle,
            Path::new("/g/overlay-containers").join(A).join("userdata")
        );
        let by_name = container_in(json.as_bytes(), A, Some("new"), root, &none);
        assert_eq!(by_name.unwrap().unwrap().id, B);
        assert!(container_in(json.as_bytes(), A, Some("other"), root, &none)
            .unwrap()
            .is_none());
        // A container that was there before the restore is never the new one.
        let before: HashSet<String> = [A.to_string()].into();
        assert!(container_in(json.as_bytes(), A, None, root, &before)
            .unwrap()
            .is_none());
        // An ID or layer that is not 64 hex digits never becomes a path.
        let bad = format!(r#"[{{"id":"{A}","names":[],"layer":"../../etc"}}]"#);
        assert!(container_in(bad.as_bytes(), A, None, root, &none).is_err());
    }

    #[test]
    fn a_diff_without_its_parent_directories_is_no_whole_upper() {
        let entry = |path: &str, kind: ckstream_format::EntryKind| ckstream_format::Entry {
            path: path.as_bytes().to_vec(),
            kind: kind as i32,
            ..Default::default()
        };
        use ckstream_format::EntryKind::{Dir, File};
        let whole = [
            entry("podman/config.dump", File),
            entry("rootfs", Dir),
            entry("rootfs/etc", Dir),
            entry("rootfs/etc/passwd", File),
            entry("rootfs/top", File),
        ];
        assert!(is_whole_upper(&whole));
        let imported = [entry("rootfs/etc/passwd", File), entry("rootfs/top", File)];
        assert!(!is_whole_upper(&imported));
        assert!(is_whole_upper(&[entry("criu/inventory.img", File)]));
    }

    #[test]
    fn mount_points_are_told_from_directories() {
        assert!(is_mount_point(Path::new("/proc")));
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(d.path()));
        assert!(!is_mount_point(&d.path().join("missing")));
    }
}
