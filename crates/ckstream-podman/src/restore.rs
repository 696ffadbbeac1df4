//! Restoring a container from a `.cka` or a podman export through podman's own
//! `podman container restore --import`, so podman's database, network and storage stay
//! podman's.
//!
//! A `.cka` is first converted to a temporary podman export beside it (reflinked where
//! the filesystem shares extents, no rootfs tar by default): its rootfs diff is applied
//! by an OCI prestart hook ([`crate::hook`]) straight from the archive, every chunk
//! verified. A podman export is read whole and refused before podman sees it when a
//! member or deletion could leave the container's root. A failed restore leaves no new
//! container behind (never removing one that existed before).

use std::path::{Path, PathBuf};
use std::time::Instant;

use ckstream_format::{Error, Progress, Stop};
use ckstream_store::ArchiveLocation;

use crate::error::{PodmanError, Result};
use crate::export::{add_prestart_hook, plan_from_cka, replace_member, write_podman_archive};
use crate::hook::{HookOutcome, RootfsTicket};
use crate::layout::{CKA_PODMAN_DIR, CONFIG_DUMP, SPEC_DUMP};
use crate::podman;

/// Who applies a `.cka`'s rootfs diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyDiff {
    /// ckstream, from the archive, in a one-shot OCI prestart hook.
    Ckstream,
    /// podman, from a `rootfs-diff.tar` in the converted archive (its own code path).
    Podman,
}

/// How to restore.
pub struct RestoreOptions<'a> {
    /// Restore under this name (podman then drops the static IP/MAC).
    pub name: Option<&'a str>,
    /// Where the temporary export goes (default: beside a local archive, so its data
    /// can be reflinked; the temporary directory for a remote one).
    pub temp_dir: Option<&'a Path>,
    /// Default: ckstream for local archives, podman for remote ones (the hook runs
    /// without the object-store credentials).
    pub apply_diff: Option<ApplyDiff>,
    /// Counts the bytes converted.
    pub progress: Progress,
    /// Polled while converting.
    pub stop: Stop,
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreReport {
    /// The restored container's ID.
    pub container: String,
    /// Converting a `.cka` to podman's layout (0 for a podman export).
    pub convert_seconds: f64,
    /// The hook applying the rootfs diff, when it did.
    pub rootfs_apply_seconds: Option<f64>,
}

/// True when the local file at `path` is a `.cka` (not a podman tar).
fn is_cka(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    Ok(ckstream_format::layout::looks_like_shard(&magic[..n]))
}

/// Restores the container checkpointed in `input` (see the module documentation).
///
/// # Errors
/// [`PodmanError::Archive`] for an unreadable, damaged or hostile archive (before podman
/// runs); [`PodmanError::Step`] when podman's restore or the hook failed (the container
/// podman created is removed again).
pub fn restore(input: &ArchiveLocation, opts: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let remote = input.is_remote();
    let apply_diff = match (opts.apply_diff, remote) {
        (Some(ApplyDiff::Ckstream), true) => {
            return Err(PodmanError::Unsupported(
                "--apply-diff ckstream needs a local archive (the OCI hook runs without your object-store credentials)".into(),
            ))
        }
        (Some(x), _) => x,
        (None, true) => ApplyDiff::Podman,
        (None, false) => ApplyDiff::Ckstream,
    };
    let local = input.local_path();
    let mut name = opts.name.map(str::to_string);
    let mut ticket = None;
    let mut temp = None;
    let podman_archive = match local {
        Some(path) if !is_cka(path)? => {
            let stats = crate::import::check_podman_archive(path)?;
            name = name.or(stats.container_name);
            path.to_path_buf()
        }
        _ => {
            let reader = input.open(&std::env::temp_dir())?;
            if name.is_none() {
                if let Some(i) = reader.find(format!("{CKA_PODMAN_DIR}/{CONFIG_DUMP}").as_bytes()) {
                    let mut config = Vec::new();
                    reader.copy_entry(i, &mut config)?;
                    name = crate::import::container_name(&config);
                }
            }
            let mut plan = plan_from_cka(&reader)?;
            let has_diff = !plan.rootfs.is_empty() || !plan.deleted.is_empty();
            if apply_diff == ApplyDiff::Ckstream && has_diff {
                let archive = local.ok_or_else(|| {
                    PodmanError::Unsupported(
                        "--apply-diff ckstream needs the archive in a local file".into(),
                    )
                })?;
                let t = RootfsTicket::create(archive, &reader)?;
                let spec_i = reader
                    .find(format!("{CKA_PODMAN_DIR}/{SPEC_DUMP}").as_bytes())
                    .ok_or_else(|| Error::Corrupt("the archive has no podman/spec.dump".into()))?;
                let mut spec = Vec::new();
                reader.copy_entry(spec_i, &mut spec)?;
                let exe = std::env::current_exe().map_err(|e| {
                    Error::io("locating the ckstream binary for the restore hook", e)
                })?;
                let spec = add_prestart_hook(&spec, t.hook(&exe))?;
                replace_member(&mut plan, SPEC_DUMP, spec)?;
                plan.skip_rootfs = true;
                ticket = Some(t);
            }
            let dir = match opts.temp_dir {
                Some(d) => d.to_path_buf(),
                None if remote => std::env::temp_dir(),
                None => local
                    .and_then(Path::parent)
                    .filter(|p| !p.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
            };
            let tmp = dir.join(format!(
                ".ckstream-podman-restore.{}.tar",
                std::process::id()
            ));
            temp = Some(TempFile(tmp.clone()));
            write_podman_archive(
                &ArchiveLocation::Path(tmp.clone()),
                None,
                &plan,
                Some(&reader),
                &opts.progress,
                opts.stop,
            )?;
            tmp
        }
    };
    let convert_seconds = started.elapsed().as_secs_f64();
    // A failed `restore --import` leaves the container it created behind, which would
    // block a retry; remove it then, but never a container that existed before.
    let existed_before = name.as_deref().is_some_and(podman::container_exists);
    let restored = podman::restore_import(&podman_archive, opts.name);
    drop(temp);
    let remove_new = |n: &str| {
        if !existed_before && podman::container_exists(n) {
            let _ = podman::remove(n);
        }
    };
    if restored.is_err() {
        if let Some(n) = name.as_deref() {
            remove_new(n);
        }
    }
    let hook = ticket.as_ref().map(RootfsTicket::outcome);
    drop(ticket);
    if let Some(HookOutcome::Failed {
        message,
        bad_archive,
    }) = hook
    {
        let cause = if bad_archive {
            PodmanError::Archive(Error::Corrupt(message))
        } else {
            PodmanError::Unsupported(message)
        };
        return Err(cause.context(
            "applying the rootfs diff in the restore hook failed; podman did not restore the container",
        ));
    }
    let id = restored.map_err(|e| e.context("podman could not restore the container"))?;
    let rootfs_apply_seconds = match hook {
        Some(HookOutcome::Applied { seconds }) => Some(seconds),
        Some(HookOutcome::NotRun) => {
            // The runtime never ran the hook: the container runs without its rootfs changes.
            let _ = podman::remove(&id);
            return Err(PodmanError::Unsupported(format!(
                "the OCI runtime did not run the rootfs hook during the restore, so container {id} was removed; retry with --apply-diff podman"
            )));
        }
        _ => None,
    };
    Ok(RestoreReport {
        container: id,
        convert_seconds,
        rootfs_apply_seconds,
    })
}

/// A temporary file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
