//! A container image as overlayfs merges its layers, looked up in user space: what a
//! path is in the merged view and which layer's copy overlayfs shows. Used to check
//! diffs for symlinks podman would follow ([`crate::symlinks`]) and to give a rootfs
//! diff without its parent directories the parents overlayfs would have copied up
//! ([`complete_upper`]).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use ckstream_format::Error;

use crate::error::{PodmanError, Result};

/// What a path is in the tree being looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Dir,
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    /// A non-directory no path can be resolved through.
    Other,
    Absent,
}

/// An image's layer directories, top first, merged as overlayfs merges them (whiteouts
/// hide, opaque directories stop the merge, a non-directory ends it).
pub struct MergedLayers {
    layers: Vec<PathBuf>,
    /// A path's node and, for a directory, the layers where it is one, top first (the
    /// only layers its children can come from; overlayfs shows the first one's owner,
    /// mode and xattrs).
    cache: HashMap<Vec<u8>, (Node, Vec<PathBuf>)>,
}

impl MergedLayers {
    /// The layer directories `layers`, top first.
    pub fn new(layers: Vec<PathBuf>) -> Self {
        MergedLayers {
            layers,
            cache: HashMap::new(),
        }
    }

    /// `path`'s node in the merged layers and the layers where it is a directory.
    pub(crate) fn lookup(&mut self, path: &[u8]) -> Result<(Node, Vec<PathBuf>)> {
        if let Some(hit) = self.cache.get(path) {
            return Ok(hit.clone());
        }
        let candidates = match ckstream_format::index::parent_path(path) {
            None => self.layers.clone(),
            Some(parent) => match self.lookup(parent)? {
                (Node::Dir, layers) => layers,
                _ => Vec::new(),
            },
        };
        let name = std::ffi::OsStr::from_bytes(path);
        let mut result = (Node::Absent, Vec::new());
        for layer in &candidates {
            // Every directory on the way is a real directory in this layer (it is in
            // the parent's list), so lstat follows no symlink.
            let p = layer.join(name);
            let meta = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(layer_err(&p, e)),
            };
            let ft = meta.file_type();
            let whiteout = ft.is_char_device() && meta.rdev() == 0;
            if result.0 == Node::Dir {
                // Below a directory: another directory merges into it, anything else
                // (or a whiteout) ends the merge.
                if !ft.is_dir() {
                    break;
                }
                result.1.push(layer.clone());
                if is_opaque(&p) {
                    break;
                }
                continue;
            }
            if whiteout {
                break;
            }
            if ft.is_dir() {
                result = (Node::Dir, vec![layer.clone()]);
                if is_opaque(&p) {
                    break;
                }
                continue;
            }
            result.0 = if ft.is_symlink() {
                let target = std::fs::read_link(&p).map_err(|e| layer_err(&p, e))?;
                Node::Symlink(target.into_os_string().into_encoded_bytes())
            } else {
                Node::Other
            };
            break;
        }
        self.cache.insert(path.to_vec(), result.clone());
        Ok(result)
    }
}

fn layer_err(p: &Path, e: io::Error) -> PodmanError {
    Error::io(format!("cannot read the image layer {}", p.display()), e).into()
}

/// An overlay opaque directory in an image layer.
pub(crate) fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| {
            let mut v = [0u8; 2];
            rustix::fs::lgetxattr(dir, *name, &mut v).is_ok_and(|n| n >= 1 && v[0] == b'y')
        })
}

/// The lower layers of the overlay layer directory `layer_dir` (containers/storage's
/// `overlay/ID`), top first, from its `lower` file (`l/SHORT:l/SHORT…`, each a link to
/// `../ID/diff`). Empty for a layer without lowers.
///
/// # Errors
/// [`PodmanError::Unsupported`] for an entry or link of another shape (never followed
/// outside `overlay/`); I/O errors reading them.
pub fn lower_layers(graph_root: &Path, layer_dir: &Path) -> Result<Vec<PathBuf>> {
    let lower_file = layer_dir.join("lower");
    let text = match std::fs::read_to_string(&lower_file) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.map_err(|e| Error::io(format!("reading {}", lower_file.display()), e))?,
    };
    let overlay = graph_root.join("overlay");
    let bad = |what: &str| {
        PodmanError::Unsupported(format!(
            "{}: unexpected lower layer {what:?}",
            lower_file.display()
        ))
    };
    text.trim()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(|short| {
            let link = short
                .strip_prefix("l/")
                .filter(|s| s.bytes().all(|b| b.is_ascii_alphanumeric()))
                .ok_or_else(|| bad(short))?;
            let target = std::fs::read_link(overlay.join("l").join(link))
                .map_err(|e| Error::io(format!("resolving lower layer {short}"), e))?;
            // `../ID/diff`, relative to `overlay/l`.
            let id = target
                .strip_prefix("..")
                .ok()
                .and_then(|t| t.parent().filter(|_| t.ends_with("diff")))
                .and_then(Path::to_str)
                .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| bad(&target.to_string_lossy()))?;
            Ok(overlay.join(id).join("diff"))
        })
        .collect()
}

/// Gives the overlay upper directory `upper` (empty, not mounted) every parent
/// directory of `paths` (relative, the diff's entries) that the diff does not hold
/// itself (`in_diff`), as overlayfs copies one up when a file is created below it: with
/// the owner, mode and xattrs of its copy in the merged `lower` layers (overlayfs's own
/// xattrs aside), or as `0755 root` like podman's untar when no layer has it. Returns how
/// many it created.
///
/// # Errors
/// [`Error::UnsafeEntry`] when a parent is a symlink or another non-directory in the
/// image (podman would resolve the path through it on the host; the diff of an overlay
/// never holds such a path); I/O errors.
pub fn complete_upper(
    upper: &Path,
    paths: &[&[u8]],
    in_diff: &dyn Fn(&[u8]) -> bool,
    lower: &mut MergedLayers,
) -> Result<usize> {
    let mut missing = BTreeSet::new();
    for p in paths {
        let mut parent = ckstream_format::index::parent_path(p);
        while let Some(dir) = parent {
            if in_diff(dir) || !missing.insert(dir.to_vec()) {
                break;
            }
            parent = ckstream_format::index::parent_path(dir);
        }
    }
    // BTreeSet order puts every directory before the paths below it.
    for dir in &missing {
        let shown = || String::from_utf8_lossy(dir).into_owned();
        let target = upper.join(std::ffi::OsStr::from_bytes(dir));
        match lower.lookup(dir)? {
            (Node::Dir, layers) => {
                copy_dir_up(&layers[0].join(std::ffi::OsStr::from_bytes(dir)), &target)?
            }
            (Node::Absent, _) => make_dir(&target, 0o755, 0, 0)?,
            (node, _) => {
                return Err(Error::UnsafeEntry(format!(
                    "the rootfs diff writes below /{}, which is {} in the container's image",
                    shown(),
                    match node {
                        Node::Symlink(t) =>
                            format!("a symlink (-> {})", String::from_utf8_lossy(&t)),
                        _ => "not a directory".into(),
                    }
                ))
                .into())
            }
        }
    }
    Ok(missing.len())
}

fn make_dir(target: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
    let err = |what: &str, e: io::Error| -> PodmanError {
        Error::io(format!("{what} {}", target.display()), e).into()
    };
    // The upper directory is new and only this function creates directories in it
    // before the diff is written, so no component on the way is a symlink.
    std::fs::create_dir(target).map_err(|e| err("creating", e))?;
    std::os::unix::fs::lchown(target, Some(uid), Some(gid)).map_err(|e| err("chown", e))?;
    // After chown, which clears set-id bits.
    rustix::fs::chmod(target, rustix::fs::Mode::from_raw_mode(mode & 0o7777))
        .map_err(|e| err("chmod", e.into()))
}

/// Creates `target` as a copy-up of the lower directory `source`: owner, mode, and
/// every xattr except overlayfs's own. Times are left to what the diff then writes
/// below it, as overlayfs's copy-up leaves them to the file created there.
fn copy_dir_up(source: &Path, target: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(source).map_err(|e| layer_err(source, e))?;
    make_dir(target, meta.mode(), meta.uid(), meta.gid())?;
    for x in ckstream_fs::xattr::read_all(source).map_err(|e| layer_err(source, e))? {
        if x.name.starts_with(b"trusted.overlay.") || x.name.starts_with(b"user.overlay.") {
            continue;
        }
        let name = std::ffi::OsStr::from_bytes(&x.name);
        rustix::fs::lsetxattr(target, name, &x.value, rustix::fs::XattrFlags::empty()).map_err(
            |e| {
                PodmanError::from(Error::io(
                    format!("setting xattrs on {}", target.display()),
                    e.into(),
                ))
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Unit tests on plain directories standing in for image layers (no overlay mount).
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mkdir(p: &Path, mode: u32) {
        std::fs::create_dir_all(p).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn missing_parents_are_copied_up_from_the_topmost_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, low, upper) = (
            tmp.path().join("top"),
            tmp.path().join("low"),
            tmp.path().join("upper"),
        );
        mkdir(&top.join("etc"), 0o750);
        mkdir(&low.join("etc"), 0o755);
        mkdir(&low.join("usr/lib"), 0o700);
        mkdir(&low.join("srv"), 0o1777);
        std::os::unix::fs::symlink("usr/lib", low.join("lib")).unwrap();
        let root = rustix::process::geteuid().is_root();
        if root {
            std::os::unix::fs::lchown(top.join("etc"), Some(5), Some(6)).unwrap();
        }
        let xattr = rustix::fs::lsetxattr(
            top.join("etc"),
            "user.k",
            b"v",
            rustix::fs::XattrFlags::empty(),
        )
        .is_ok();
        std::fs::create_dir(&upper).unwrap();
        let mut lower = MergedLayers::new(vec![top.clone(), low.clone()]);
        let paths: Vec<&[u8]> = vec![
            b"etc/new.conf",
            b"usr/lib/x/y",
            b"usr/lib/x",
            b"opt/new/file",
            b"srv/f",
        ];
        let created = complete_upper(&upper, &paths, &|d| d == b"usr/lib/x", &mut lower).unwrap();
        assert_eq!(created, 6, "etc usr usr/lib opt opt/new srv");
        assert_eq!(mode(&upper.join("etc")), 0o750, "the top layer's copy wins");
        assert_eq!(mode(&upper.join("usr/lib")), 0o700);
        assert_eq!(mode(&upper.join("srv")), 0o1777);
        assert_eq!(
            mode(&upper.join("opt/new")),
            0o755,
            "in no layer: as podman's untar makes it"
        );
        assert!(!upper.join("usr/lib/x").exists(), "the diff holds this one");
        if root {
            let m = std::fs::symlink_metadata(upper.join("etc")).unwrap();
            assert_eq!((m.uid(), m.gid()), (5, 6));
        }
        if xattr {
            let got = ckstream_fs::xattr::read_all(&upper.join("etc")).unwrap();
            assert!(
                got.iter().any(|x| x.name == b"user.k" && x.value == b"v"),
                "{got:?}"
            );
        }
        // A path below a symlink of the image is refused, nothing is created for it.
        let err = complete_upper(&upper, &[b"lib/x.so"], &|_| false, &mut lower).unwrap_err();
        assert!(
            matches!(&err, PodmanError::Archive(Error::UnsafeEntry(m)) if m.contains("/lib, which is a symlink (-> usr/lib)")),
            "{err:?}"
        );
        assert!(!upper.join("lib").exists());
    }

    #[test]
    fn whiteouts_and_opaque_directories_hide_lower_copies() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: whiteouts (character devices 0/0) need root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (top, low, upper) = (
            tmp.path().join("top"),
            tmp.path().join("low"),
            tmp.path().join("upper"),
        );
        mkdir(&low.join("var/cache"), 0o700);
        mkdir(&low.join("data/inner"), 0o700);
        mkdir(&top.join("data"), 0o711);
        std::fs::create_dir_all(&top).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            top.join("var"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let opaque = rustix::fs::lsetxattr(
            top.join("data"),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .is_ok();
        std::fs::create_dir(&upper).unwrap();
        let mut lower = MergedLayers::new(vec![top, low]);
        complete_upper(
            &upper,
            &[b"var/cache/f", b"data/inner/f"],
            &|_| false,
            &mut lower,
        )
        .unwrap();
        assert_eq!(mode(&upper.join("var")), 0o755, "whited out: in no layer");
        assert_eq!(mode(&upper.join("var/cache")), 0o755);
        assert_eq!(mode(&upper.join("data")), 0o711);
        if opaque {
            assert_eq!(
                mode(&upper.join("data/inner")),
                0o755,
                "hidden by the opaque directory"
            );
        }
        let x = ckstream_fs::xattr::read_all(&upper.join("data")).unwrap();
        assert!(
            x.iter().all(|x| !x.name.starts_with(b"trusted.overlay.")),
            "{x:?}"
        );
    }

    #[test]
    fn lower_layers_follow_the_short_links() {
        let tmp = tempfile::tempdir().unwrap();
        let overlay = tmp.path().join("overlay");
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        for id in [&a, &b, &"c".repeat(64)] {
            std::fs::create_dir_all(overlay.join(id).join("diff")).unwrap();
        }
        std::fs::create_dir_all(overlay.join("l")).unwrap();
        std::os::unix::fs::symlink(format!("../{a}/diff"), overlay.join("l/AAAA")).unwrap();
        std::os::unix::fs::symlink(format!("../{b}/diff"), overlay.join("l/BBBB")).unwrap();
        let layer = overlay.join("c".repeat(64));
        assert!(lower_layers(tmp.path(), &layer).unwrap().is_empty());
        std::fs::write(layer.join("lower"), "l/BBBB:l/AAAA").unwrap();
        assert_eq!(
            lower_layers(tmp.path(), &layer).unwrap(),
            vec![overlay.join(&b).join("diff"), overlay.join(&a).join("diff")]
        );
        std::fs::write(layer.join("lower"), "l/../../etc").unwrap();
        assert!(lower_layers(tmp.path(), &layer).is_err());
        std::os::unix::fs::symlink("/etc", overlay.join("l/EVIL")).unwrap();
        std::fs::write(layer.join("lower"), "l/EVIL").unwrap();
        assert!(lower_layers(tmp.path(), &layer).is_err());
    }
}
