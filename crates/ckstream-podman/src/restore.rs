//! Restoring a container from a `.cka` or a podman export through podman's own
//! `podman container restore --import`, so podman's database, network and storage stay
//! podman's.
//!
//! On podman's kernel overlay storage (the default), podman reads a stub export and
//! ckstream places the rootfs diff and the CRIU images into the new container's storage
//! itself ([`crate::place`]); a podman export takes the same path through a temporary
//! `.cka` beside it (reflinked from a block-aligned uncompressed export). Otherwise a
//! `.cka` is converted to a temporary podman export beside it (reflinked where the
//! filesystem shares extents, no rootfs tar by default): its rootfs diff is applied by an
//! OCI prestart hook ([`crate::hook`]) straight from the archive, every chunk verified,
//! and a podman export is read whole and refused before podman sees it when a member or
//! deletion could leave the container's root. Before podman runs, the
//! archive's container settings are shown and checked ([`crate::trust`]), and a diff
//! podman applies itself is checked for paths through symlinks ([`crate::symlinks`]).
//! A failed restore leaves no new container behind (never removing one that existed
//! before).

use std::path::{Path, PathBuf};
use std::time::Instant;

use ckstream_format::{Error, Progress, Stop};
use ckstream_store::ArchiveLocation;

use crate::error::{PodmanError, Result};
use crate::export::{add_prestart_hook, plan_from_cka, replace_member, write_podman_archive};
use crate::hook::{HookOutcome, RootfsTicket};
use crate::layout::{CKA_PODMAN_DIR, CONFIG_DUMP, SPEC_DUMP};
use crate::podman;
use crate::symlinks::{DiffMember, Lower};
use crate::trust::{Trust, TrustReport};

/// Who applies a `.cka`'s rootfs diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyDiff {
    /// ckstream, into the new container's overlay upper directory before podman mounts
    /// it, with the CRIU images placed in its bundle the same way ([`crate::place`]):
    /// reflinked from an uncompressed archive on the same filesystem, never through a
    /// tar. Needs podman's kernel overlay storage.
    Storage,
    /// ckstream, from the archive, in a one-shot OCI prestart hook.
    Hook,
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
    /// Default: [`ApplyDiff::Storage`] on podman's kernel overlay storage; otherwise the
    /// hook for local archives and podman for remote ones (the hook runs without the
    /// object-store credentials).
    pub apply_diff: Option<ApplyDiff>,
    /// Counts the bytes converted.
    pub progress: Progress,
    /// Polled while converting.
    pub stop: Stop,
    /// Restore even when the archive asks for security-relevant settings (the user's
    /// `--trust-config`).
    pub trust_config: bool,
    /// Secret keys that open an encrypted `.cka` (also handed to the restore hook), and
    /// the keys whose signature to require. An archive signed by a trusted key is
    /// restored whatever container settings it asks for, as with `trust_config`.
    pub keys: ckstream_store::KeyFiles,
    /// Called with the archive's container settings before anything is decided on
    /// them, so that they are shown on every restore, refused or not.
    pub on_config: Option<&'a dyn Fn(&TrustReport)>,
    /// With [`ApplyDiff::Storage`]: share the rootfs diff's large files by reflink
    /// without reading them, and check them against their digests once the container
    /// runs (the extents are the archive's own; only the archive can have rotted). The
    /// CRIU images are always verified before CRIU starts.
    pub verify_rootfs_after: bool,
    /// Called with the container's ID and the seconds since the start once it runs,
    /// when the rootfs is still to be verified.
    pub on_running: Option<OnRunning<'a>>,
}

/// Told the container's ID and the seconds since the start, once the container runs.
pub type OnRunning<'a> = &'a dyn Fn(&str, f64);

/// What a restore did.
#[derive(Debug)]
pub struct RestoreReport {
    /// The restored container's ID.
    pub container: String,
    /// Converting a `.cka` to podman's layout (0 for a podman export).
    pub convert_seconds: f64,
    /// The hook applying the rootfs diff, or ckstream placing it and the CRIU images
    /// into the container's storage, when either did.
    pub rootfs_apply_seconds: Option<f64>,
    /// Who applied the rootfs diff.
    pub applied_by: ApplyDiff,
    /// From the start until the container ran.
    pub running_seconds: f64,
    /// With [`RestoreOptions::verify_rootfs_after`]: bytes of the rootfs checked after
    /// the container started, and how long that took.
    pub verified_after: Option<(u64, f64)>,
    /// The archive's security-relevant container settings.
    pub config: TrustReport,
    /// Why they were accepted.
    pub trust: Trust,
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
    let store = podman::store()?;
    let apply_diff = match (opts.apply_diff, remote) {
        (Some(ApplyDiff::Hook), true) => {
            return Err(PodmanError::Unsupported(
                "--apply-diff hook needs a local archive (the OCI hook runs without your object-store credentials)".into(),
            ))
        }
        (Some(ApplyDiff::Storage), _) if !store.is_kernel_overlay() => {
            return Err(PodmanError::Unsupported(format!(
                "--apply-diff storage needs podman's overlay storage driver mounted by the kernel (this podman uses {}{})",
                store.driver,
                if store.mount_program { " with a mount program" } else { "" }
            )))
        }
        (Some(x), _) => x,
        (None, _) if store.is_kernel_overlay() => ApplyDiff::Storage,
        (None, true) => ApplyDiff::Podman,
        (None, false) => ApplyDiff::Hook,
    };
    let keyring = opts.keys.load()?;
    // A podman export for the storage path: imported into a temporary `.cka` beside it
    // (its data shared by reflink when the export is uncompressed and block-aligned,
    // as `ckstream podman checkpoint --format podman` writes it), then placed as one.
    let mut imported = None;
    let input = match input.local_path() {
        Some(path) if apply_diff == ApplyDiff::Storage && !is_cka(path)? => {
            refuse_untrusted_export(path, &keyring)?;
            let tmp = temp_path(opts.temp_dir, Some(path), "cka");
            imported = Some(TempFile(tmp.clone()));
            let location = ArchiveLocation::Path(tmp);
            crate::import::import_temporary(path, &location, &opts.progress, opts.stop).map_err(
                |e| {
                    PodmanError::Archive(e)
                        .context(format!("reading the podman export {}", path.display()))
                },
            )?;
            location
        }
        _ => input.clone(),
    };
    let input = &input;
    let local = input.local_path();
    let mut name = opts.name.map(str::to_string);
    let mut ticket = None;
    let mut temp = None;
    let decided;
    let prepared = match local {
        Some(path) if !is_cka(path)? => {
            refuse_untrusted_export(path, &keyring)?;
            let checked = crate::import::check_podman_archive(path)?;
            name = name.or(checked.stats.container_name.clone());
            let spec = checked
                .spec_dump
                .as_deref()
                .ok_or_else(|| Error::Corrupt("the podman archive has no spec.dump".into()))?;
            decided = decide(spec, &checked.config_dump, false, opts, &store.roots)?;
            crate::symlinks::check(&checked.diff, &checked.deleted, &mut || {
                lower_of(&checked.config_dump)
            })?;
            Prepared::Export(path.to_path_buf())
        }
        _ => {
            let reader = input.open_keyed(&std::env::temp_dir(), &keyring)?;
            let signed = matches!(
                reader.signature(),
                ckstream_format::SignatureStatus::Verified(_)
            );
            let dump = |name: &str| -> Result<Vec<u8>> {
                let i = reader
                    .find(format!("{CKA_PODMAN_DIR}/{name}").as_bytes())
                    .ok_or_else(|| {
                        Error::Usage(format!(
                            "the archive has no {CKA_PODMAN_DIR}/{name}: it was not written by `ckstream podman checkpoint` or `ckstream podman import`"
                        ))
                    })?;
                let mut bytes = Vec::new();
                reader.copy_entry(i, &mut bytes)?;
                Ok(bytes)
            };
            let config = dump(CONFIG_DUMP)?;
            let spec = dump(SPEC_DUMP)?;
            if name.is_none() {
                name = crate::import::container_name(&config);
            }
            decided = decide(&spec, &config, signed, opts, &store.roots)?;
            let mut plan = plan_from_cka(&reader)?;
            let has_diff = !plan.rootfs.is_empty() || !plan.deleted.is_empty();
            if apply_diff == ApplyDiff::Podman && has_diff {
                // podman applies these on the host itself (the hook and placing never
                // follow a symlink: ckstream_fs::unpack opens every component O_NOFOLLOW).
                let diff: Vec<DiffMember> = plan
                    .rootfs
                    .iter()
                    .map(|it| DiffMember {
                        path: it.entry.path.clone(),
                        kind: it.entry.entry_kind(),
                        link_target: it.entry.link_target.clone(),
                    })
                    .collect();
                crate::symlinks::check(&diff, &plan.deleted, &mut || lower_of(&config))?;
            }
            if apply_diff == ApplyDiff::Storage {
                let config_id = crate::import::container_id(&config)
                    .ok_or_else(|| Error::Corrupt("config.dump names no container ID".into()))?;
                plan.outer
                    .retain(|it| !crate::export::is_checkpoint_member(&it.entry.path));
                plan.skip_rootfs = true;
                let stub = crate::export::export_bytes(&plan, &reader)?;
                Prepared::Placed {
                    reader: Box::new(reader),
                    stub,
                    config_id,
                }
            } else {
                if apply_diff == ApplyDiff::Hook && has_diff {
                    let archive = local.ok_or_else(|| {
                        PodmanError::Unsupported(
                            "--apply-diff hook needs the archive in a local file".into(),
                        )
                    })?;
                    let t = RootfsTicket::create(archive, &reader, &opts.keys.secret)?;
                    let exe = std::env::current_exe().map_err(|e| {
                        Error::io("locating the ckstream binary for the restore hook", e)
                    })?;
                    let spec = add_prestart_hook(&spec, t.hook(&exe))?;
                    replace_member(&mut plan, SPEC_DUMP, spec)?;
                    plan.skip_rootfs = true;
                    ticket = Some(t);
                }
                let tmp = temp_path(opts.temp_dir, local, "tar");
                temp = Some(TempFile(tmp.clone()));
                write_podman_archive(
                    &ArchiveLocation::Path(tmp.clone()),
                    None,
                    &plan,
                    Some(&reader),
                    &opts.progress,
                    opts.stop,
                )?;
                Prepared::Export(tmp)
            }
        }
    };
    let convert_seconds = started.elapsed().as_secs_f64();
    // A failed `restore --import` leaves the container it created behind, which would
    // block a retry; remove it then, but never a container that existed before.
    let existed_before = name.as_deref().is_some_and(podman::container_exists);
    let mut placed = None;
    let (restored, applied_by) = match &prepared {
        Prepared::Export(archive) => (
            podman::restore_import(archive, opts.name),
            if ticket.is_some() {
                ApplyDiff::Hook
            } else {
                ApplyDiff::Podman
            },
        ),
        Prepared::Placed {
            reader,
            stub,
            config_id,
        } => {
            let place_opts = crate::place::PlaceOptions {
                config_id,
                name: opts.name,
                graph_root: &store.roots.graph_root,
                progress: &opts.progress,
                stop: opts.stop,
                remove_on_death: name.as_deref().filter(|_| !existed_before),
                verify_rootfs_after: opts.verify_rootfs_after,
                rootfs_hashed_by_import: imported.is_some(),
            };
            let restored = crate::place::restore_placed(reader, stub, &place_opts).map(|p| {
                let id = p.container.clone();
                placed = Some(p);
                id
            });
            (restored, ApplyDiff::Storage)
        }
    };
    drop(temp);
    drop(imported);
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
    let id = restored.map_err(|e| {
        e.context(match prepared {
            // Placing's own refusals (a bad chunk, an unsafe path) come first here.
            Prepared::Placed { .. } => "the container was not restored",
            Prepared::Export(_) => "podman could not restore the container",
        })
    })?;
    let rootfs_apply_seconds = match hook {
        Some(HookOutcome::Applied { seconds }) => Some(seconds),
        Some(HookOutcome::NotRun) => {
            // The runtime never ran the hook: the container runs without its rootfs changes.
            let _ = podman::remove(&id);
            return Err(PodmanError::Unsupported(format!(
                "the OCI runtime did not run the rootfs hook during the restore, so container {id} was removed; retry with --apply-diff podman"
            )));
        }
        _ => placed.as_ref().map(|p| p.place_seconds),
    };
    let running_seconds = started.elapsed().as_secs_f64();
    let verified_after = match (&prepared, placed) {
        (Prepared::Placed { reader, .. }, Some(p)) if !p.unverified.is_empty() => Some(
            verify_after_start(reader, &p.unverified, &id, running_seconds, opts)?,
        ),
        _ => None,
    };
    let (config, trust) = decided;
    Ok(RestoreReport {
        container: id,
        convert_seconds,
        rootfs_apply_seconds,
        applied_by,
        running_seconds,
        verified_after,
        config,
        trust,
    })
}

/// Checks the rootfs chunks that were shared without being read, while the restored
/// container `id` runs; returns (bytes, seconds).
///
/// # Errors
/// [`PodmanError::Archive`] (a bad archive) naming every damaged file; the container is
/// left running, for its owner to decide.
fn verify_after_start(
    reader: &ckstream_format::ArchiveReader,
    unverified: &[(ckstream_format::Entry, ckstream_format::Chunk)],
    id: &str,
    running_seconds: f64,
    opts: &RestoreOptions,
) -> Result<(u64, f64)> {
    if let Some(running) = opts.on_running {
        running(id, running_seconds);
    }
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut failed = ckstream_fs::verify_unverified(reader, unverified, threads);
    let bytes = unverified.iter().map(|(_, c)| c.raw_len as u64).sum();
    if failed.is_empty() {
        return Ok((bytes, started.elapsed().as_secs_f64()));
    }
    // One line per file (its first bad chunk); `failed` is sorted by path.
    failed.dedup_by(|a, b| a.0 == b.0);
    let files: Vec<String> = failed
        .iter()
        .map(|(path, e)| {
            let path = path.strip_prefix(b"rootfs/").unwrap_or(path);
            let shown = String::from_utf8_lossy(path);
            format!("/{} ({e})", ckstream_format::escape_controls(&shown))
        })
        .collect();
    Err(PodmanError::Archive(Error::Corrupt(format!(
        "container {id} is running, but {} of its files placed from the archive do not match their digests: {}; the archive is damaged — stop the container (podman rm -f {id}) and restore from a good copy",
        files.len(),
        files.join(", ")
    ))))
}

/// What podman restores from.
enum Prepared {
    /// A podman export on disk (`podman container restore --import`).
    Export(PathBuf),
    /// A `.cka` placed into podman's storage while podman reads `stub`.
    Placed {
        reader: Box<ckstream_format::ArchiveReader>,
        stub: Vec<u8>,
        config_id: String,
    },
}

/// Reads the archive's container settings, shows them ([`RestoreOptions::on_config`])
/// and decides whether to go on.
fn decide(
    spec: &[u8],
    config: &[u8],
    trusted_signature: bool,
    opts: &RestoreOptions,
    roots: &crate::trust::StorageRoots,
) -> Result<(TrustReport, Trust)> {
    let report = crate::trust::check_config(spec, config, roots)?;
    if let Some(show) = opts.on_config {
        show(&report);
    }
    let trust = report.decide(trusted_signature, opts.trust_config)?;
    Ok((report, trust))
}

/// What podman applies the diff onto: the layers of the image `config_dump` names, or the
/// host directory it uses as root.
fn lower_of(config_dump: &[u8]) -> Result<Lower> {
    let v: serde_json::Value = serde_json::from_slice(config_dump)
        .map_err(|e| Error::Corrupt(format!("config.dump is not JSON: {e}")))?;
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    if !s("rootfs").is_empty() {
        return Ok(Lower::Layers {
            image: format!("(host directory {})", s("rootfs")),
            layers: vec![PathBuf::from(s("rootfs"))],
        });
    }
    let (id, image_name) = (s("rootfsImageID"), s("rootfsImageName"));
    let image = if image_name.is_empty() {
        id.clone()
    } else {
        image_name
    };
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Lower::Unavailable {
            image: if image.is_empty() {
                "(none named)".into()
            } else {
                image
            },
        });
    }
    Ok(match podman::image_layers(&id)? {
        Some(layers) => Lower::Layers { image, layers },
        None => Lower::Unavailable { image },
    })
}

/// A podman export carries no signature: refused when the user asked for signed archives.
fn refuse_untrusted_export(path: &Path, keyring: &ckstream_format::crypto::Keyring) -> Result<()> {
    if keyring.trusted.is_empty() {
        return Ok(());
    }
    Err(PodmanError::Untrusted(format!(
        "{} is a podman export, which carries no signature, and trusted keys were given",
        path.display()
    )))
}

/// Where a temporary archive of this restore goes: `temp_dir` if given, else beside a
/// local archive (so its data can be reflinked), else the temporary directory.
fn temp_path(temp_dir: Option<&Path>, local: Option<&Path>, ext: &str) -> PathBuf {
    let dir = match (temp_dir, local) {
        (Some(d), _) => d.to_path_buf(),
        (None, None) => std::env::temp_dir(),
        (None, Some(archive)) => archive
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    };
    dir.join(format!(
        ".ckstream-podman-restore.{}.{ext}",
        std::process::id()
    ))
}

/// A temporary file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
