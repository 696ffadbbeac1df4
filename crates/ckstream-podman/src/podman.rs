//! Driving the `podman` command: inspecting a container's storage, checkpointing it
//! in place, and restoring from an export archive.
//!
//! Podman honours its usual configuration (`CONTAINERS_STORAGE_CONF`,
//! `CONTAINERS_CONF`); `CKSTREAM_PODMAN` names another podman binary.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::error::{PodmanError, Result};

/// What ckstream needs to know about a container.
#[derive(Debug, Clone)]
pub struct Container {
    /// Full container ID.
    pub id: String,
    /// Container name.
    pub name: String,
    /// Whether it runs now.
    pub running: bool,
    /// Podman's per-container bundle directory (`userdata`): CRIU images, dumps, logs.
    pub bundle: PathBuf,
    /// The overlay upper directory: the container's rootfs changes.
    pub upper: PathBuf,
    /// The overlay's merged mount (`GraphDriver.Data.MergedDir`); mounted while the
    /// container runs or is mounted (see [`mount`]).
    pub merged: Option<PathBuf>,
    /// Lower layers, top first.
    pub lowers: Vec<PathBuf>,
    /// Image it was created from.
    pub image_name: String,
    /// OCI runtime (`runc`, `crun`).
    pub runtime: String,
    /// Named volumes (podman exports them as `volumes/NAME.tar`; not supported yet).
    pub named_volumes: Vec<String>,
}

pub(crate) fn podman_bin() -> String {
    std::env::var("CKSTREAM_PODMAN").unwrap_or_else(|_| "podman".into())
}

pub(crate) fn podman_error(args: &str, detail: impl std::fmt::Display) -> PodmanError {
    PodmanError::Command {
        args: args.to_string(),
        message: detail.to_string(),
    }
}

/// Runs podman with `args`, returning its stdout; its stderr is passed through on
/// failure in the error.
///
/// # Errors
/// [`PodmanError::Command`] when podman cannot start or exits non-zero (with its message).
pub fn podman(args: &[&str]) -> Result<String> {
    let out = Command::new(podman_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| podman_error(&args.join(" "), format!("cannot run {}: {e}", podman_bin())))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(podman_error(
            &args.join(" "),
            format!("{} ({})", stderr.trim(), out.status),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Looks a container up by name or ID.
///
/// # Errors
/// [`PodmanError::Command`] when podman fails or the container does not exist;
/// [`PodmanError::Unsupported`] for storage drivers other than overlay.
pub fn inspect(container: &str) -> Result<Container> {
    let out = podman(&["container", "inspect", container])?;
    let v: Value = serde_json::from_str(&out)
        .map_err(|e| podman_error("container inspect", format!("unreadable output: {e}")))?;
    let c = v
        .get(0)
        .ok_or_else(|| podman_error("container inspect", format!("no container {container}")))?;
    let s = |p: &str| {
        c.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let driver = s("/GraphDriver/Name");
    if driver != "overlay" {
        return Err(PodmanError::Unsupported(format!(
            "container {container} uses the {driver:?} storage driver; ckstream reads overlay upper directories only"
        )));
    }
    let lowers = s("/GraphDriver/Data/LowerDir")
        .split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect();
    let named_volumes = c
        .pointer("/Mounts")
        .and_then(Value::as_array)
        .map(|mounts| {
            mounts
                .iter()
                .filter(|m| m.get("Type").and_then(Value::as_str) == Some("volume"))
                .filter_map(|m| m.get("Name").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default();
    Ok(Container {
        id: s("/Id"),
        name: s("/Name"),
        running: c.pointer("/State/Running").and_then(Value::as_bool) == Some(true),
        bundle: PathBuf::from(s("/StaticDir")),
        upper: PathBuf::from(s("/GraphDriver/Data/UpperDir")),
        merged: Some(s("/GraphDriver/Data/MergedDir"))
            .filter(|m| !m.is_empty())
            .map(PathBuf::from),
        lowers,
        image_name: s("/ImageName"),
        runtime: s("/OCIRuntime"),
        named_volumes,
    })
}

/// Checkpoints a running container in place: CRIU images land in the bundle's
/// `checkpoint/` directory, the container stops unless `leave_running`.
///
/// # Errors
/// [`PodmanError::Command`] with podman's message when the checkpoint fails (podman and CRIU
/// leave the container running in that case).
pub fn checkpoint_in_place(id: &str, leave_running: bool) -> Result<()> {
    let mut args = vec!["container", "checkpoint", "--keep"];
    if leave_running {
        args.push("--leave-running");
    }
    args.push(id);
    podman(&args).map(|_| ())
}

/// Mounts a container's root filesystem (`podman mount`; for a running container this
/// only takes another reference on its mount) and returns the merged directory. The
/// mount stays until [`unmount`], even across a checkpoint that stops the container.
///
/// # Errors
/// [`PodmanError::Command`] with podman's message.
pub fn mount(id: &str) -> Result<PathBuf> {
    let out = podman(&["mount", id])?;
    let path = out.trim();
    if path.is_empty() {
        return Err(podman_error(
            &format!("mount {id}"),
            "printed no mount point",
        ));
    }
    Ok(PathBuf::from(path))
}

/// Drops the reference [`mount`] took (`podman umount`).
///
/// # Errors
/// [`PodmanError::Command`] with podman's message.
pub fn unmount(id: &str) -> Result<()> {
    podman(&["umount", id]).map(|_| ())
}

/// Restores a container from a podman export archive (`podman container restore --import`).
///
/// # Errors
/// [`PodmanError::Command`] with podman's message.
pub fn restore_import(archive: &std::path::Path, name: Option<&str>) -> Result<String> {
    let path = archive.to_string_lossy();
    let mut args = vec!["container", "restore", "--import", &path];
    if let Some(n) = name {
        args.extend(["--name", n]);
    }
    podman(&args).map(|s| s.trim().to_string())
}

/// True when a container with this name or ID exists.
pub fn container_exists(name: &str) -> bool {
    podman(&["container", "exists", name]).is_ok()
}

/// Restores a container from the checkpoint podman keeps in its bundle
/// (`podman container restore`, after a `--keep` checkpoint).
///
/// # Errors
/// [`PodmanError::Command`] with podman's message.
pub fn restore_in_place(id: &str) -> Result<()> {
    podman(&["container", "restore", id]).map(|_| ())
}

/// Removes a container at once (`podman rm -f -t 0`).
///
/// # Errors
/// [`PodmanError::Command`] with podman's message.
pub fn remove(name: &str) -> Result<()> {
    podman(&["rm", "-f", "-t", "0", name]).map(|_| ())
}

/// The standard output and error of a running child, read on threads so that neither
/// pipe fills up while the child runs.
pub(crate) struct ChildOutput(
    std::thread::JoinHandle<String>,
    std::thread::JoinHandle<String>,
);

impl ChildOutput {
    /// Both outputs, once the child closed them.
    pub(crate) fn join(self) -> (String, String) {
        (
            self.0.join().unwrap_or_default(),
            self.1.join().unwrap_or_default(),
        )
    }
}

/// Starts reading `child`'s piped standard output and error.
pub(crate) fn collect_output(child: &mut std::process::Child) -> ChildOutput {
    fn read_all(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    }
    ChildOutput(read_all(child.stdout.take()), read_all(child.stderr.take()))
}

/// podman's container storage on this host.
#[derive(Debug, Clone)]
pub struct Store {
    /// Where it lives.
    pub roots: crate::trust::StorageRoots,
    /// The storage driver (`overlay`, `vfs`, `btrfs`, …).
    pub driver: String,
    /// The overlay is mounted by a helper (`fuse-overlayfs`), not the kernel.
    pub mount_program: bool,
}

impl Store {
    /// True when the container's root is a kernel overlay mount whose upper directory
    /// ckstream can write before podman mounts it.
    pub fn is_kernel_overlay(&self) -> bool {
        self.driver == "overlay" && !self.mount_program
    }
}

/// podman's storage on this host (`podman info`: `store.graphRoot`, `store.runRoot`,
/// `store.graphDriverName`, `store.graphOptions`).
///
/// # Errors
/// [`PodmanError::Command`] when podman fails or does not report them.
pub fn store() -> Result<Store> {
    let out = podman(&["info", "--format", "json"])?;
    let v: Value = serde_json::from_str(&out)
        .map_err(|e| podman_error("info", format!("unreadable output: {e}")))?;
    Ok(Store {
        roots: roots_of(&v)?,
        driver: v
            .pointer("/store/graphDriverName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        mount_program: v
            .pointer("/store/graphOptions")
            .and_then(Value::as_object)
            .is_some_and(|o| o.keys().any(|k| k.ends_with("mount_program"))),
    })
}

/// podman's storage roots on this host (`podman info`: `store.graphRoot`,
/// `store.runRoot`).
///
/// # Errors
/// [`PodmanError::Command`] when podman fails or does not report them.
pub fn storage_roots() -> Result<crate::trust::StorageRoots> {
    store().map(|s| s.roots)
}

fn roots_of(v: &Value) -> Result<crate::trust::StorageRoots> {
    let root = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| podman_error("info", format!("no {p} in its output")))
    };
    Ok(crate::trust::StorageRoots {
        graph_root: root("/store/graphRoot")?,
        run_root: root("/store/runRoot")?,
    })
}

/// The overlay layer directories of the local image `id` (a full image ID), top first;
/// `None` when there is no such image here.
///
/// # Errors
/// [`PodmanError::Command`] when podman fails; [`PodmanError::Unsupported`] for an image
/// on another storage driver than overlay.
pub fn image_layers(id: &str) -> Result<Option<Vec<PathBuf>>> {
    if podman(&["image", "exists", id]).is_err() {
        return Ok(None);
    }
    let out = podman(&["image", "inspect", "--format", "json", id])?;
    let v: Value = serde_json::from_str(&out)
        .map_err(|e| podman_error("image inspect", format!("unreadable output: {e}")))?;
    let driver = v.pointer("/0/GraphDriver/Name").and_then(Value::as_str);
    if driver != Some("overlay") {
        return Err(PodmanError::Unsupported(format!(
            "image {id} uses the {driver:?} storage driver; ckstream reads overlay layers only"
        )));
    }
    let data = |k: &str| {
        v.pointer(&format!("/0/GraphDriver/Data/{k}"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let mut layers: Vec<PathBuf> = Vec::new();
    layers.extend(
        Some(data("UpperDir"))
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
    );
    layers.extend(
        data("LowerDir")
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
    );
    if layers.is_empty() {
        return Err(podman_error(
            "image inspect",
            format!("no layers for image {id}"),
        ));
    }
    Ok(Some(layers))
}
