//! Refusing rootfs diffs that podman would apply through a symlink.
//!
//! podman 4.3 applies an export's rootfs diff on the host, in the container's mounted
//! root, with plain path operations: it untars `rootfs-diff.tar` with containers/storage's
//! `archive.Untar` (which takes `x -> /` for a link inside the root) and then runs
//! `os.RemoveAll(filepath.Join(root, p))` for every path of `deleted.files`. Both resolve
//! every directory component of a path with the host's view, so a symlink `x -> /` in the
//! diff (or in the container's image) turns `/x/etc/shadow` into the host's
//! `/etc/shadow`.
//!
//! [`check`] walks the diff in podman's order and refuses any member path, hard-link
//! target or deleted path whose *directory* components (not the last one, which podman
//! replaces or removes without following it) pass through a symlink, or through a hard
//! link (which may name a symlink): first as the diff leaves the tree (entries seen
//! before, for members; the whole diff, for deletions), else as the container's image
//! has it (its overlay layers, top first, with whiteouts and opaque directories). A diff
//! ckstream or podman wrote from an overlay upper directory never does either: the
//! kernel stores changes under their real paths.

use std::collections::HashMap;
use std::path::PathBuf;

use ckstream_format::{EntryKind, Error};

use crate::error::{PodmanError, Result};
use crate::layers::{MergedLayers, Node};

/// One member of the rootfs diff, in the order podman applies it.
#[derive(Debug, Clone)]
pub struct DiffMember {
    /// Path relative to the container root.
    pub path: Vec<u8>,
    /// What it is.
    pub kind: EntryKind,
    /// A symlink's target, or a hard link's target path relative to the root.
    pub link_target: Vec<u8>,
}

/// What the diff is applied onto.
#[derive(Debug, Clone)]
pub enum Lower {
    /// The image's overlay layer directories, top first (a single plain directory for a
    /// container whose root is a host directory).
    Layers {
        /// The image's name or ID (for messages).
        image: String,
        /// Its layer directories, top first.
        layers: Vec<PathBuf>,
    },
    /// The image is not on this host (podman would pull it): nothing outside the diff
    /// can be checked.
    Unavailable {
        /// The image's name or ID.
        image: String,
    },
}

fn node_of(m: &DiffMember) -> Node {
    match m.kind {
        EntryKind::Dir => Node::Dir,
        EntryKind::Symlink => Node::Symlink(m.link_target.clone()),
        EntryKind::Hardlink => Node::Hardlink(m.link_target.clone()),
        _ => Node::Other,
    }
}

/// Checks `members` (in order) and then `deleted` (absolute paths, already validated
/// by [`crate::deleted::parse`]). `lower` is asked for the image's layers the first time
/// a path component is not in the diff.
///
/// # Errors
/// [`PodmanError::Archive`] ([`Error::UnsafeEntry`]) naming the path and the symlink it
/// passes through; [`PodmanError::Unsupported`] when a component is not in the diff and
/// the image is not available; errors of `lower`; I/O errors reading the layers.
pub fn check(
    members: &[DiffMember],
    deleted: &[String],
    lower: &mut dyn FnMut() -> Result<Lower>,
) -> Result<()> {
    let mut w = Walker {
        diff: HashMap::new(),
        lower: None,
        get_lower: lower,
        merged: None,
    };
    for m in members {
        w.check_parents(&m.path, || {
            format!(
                "rootfs-diff.tar member /{}",
                String::from_utf8_lossy(&m.path)
            )
        })?;
        if m.kind == EntryKind::Hardlink {
            // link(2) resolves the target's directories too (not its last component).
            w.check_parents(&m.link_target, || {
                format!(
                    "the target /{} of hard link /{} in rootfs-diff.tar",
                    String::from_utf8_lossy(&m.link_target),
                    String::from_utf8_lossy(&m.path)
                )
            })?;
        }
        w.diff.insert(m.path.clone(), node_of(m));
    }
    for p in deleted {
        let rel = p.trim_start_matches('/');
        w.check_parents(rel.as_bytes(), || format!("deleted.files entry {p}"))?;
    }
    Ok(())
}

struct Walker<'a> {
    /// The diff as applied so far.
    diff: HashMap<Vec<u8>, Node>,
    lower: Option<Lower>,
    get_lower: &'a mut dyn FnMut() -> Result<Lower>,
    /// The image's layers as overlayfs merges them, once asked for.
    merged: Option<MergedLayers>,
}

impl Walker<'_> {
    /// Refuses `path` if a directory component of it is a symlink (or hard link) once
    /// podman has applied what the diff holds so far.
    fn check_parents(&mut self, path: &[u8], what: impl Fn() -> String) -> Result<()> {
        let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        for i in 0..comps.len().saturating_sub(1) {
            let prefix = comps[..=i].join(&b'/');
            let shown = String::from_utf8_lossy(&prefix).into_owned();
            let (node, origin) = match self.diff.get(&prefix) {
                Some(n) => (n.clone(), "in rootfs-diff.tar".to_string()),
                None => self.lower_node(&prefix, &shown, &what)?,
            };
            match node {
                // podman creates missing directories on the way (members) or finds
                // nothing to delete (deletions); either way nothing to follow.
                Node::Dir | Node::Absent => {}
                Node::Other => return Ok(()),
                Node::Symlink(target) => {
                    return Err(Error::UnsafeEntry(format!(
                        "{} passes through /{shown}, a symlink (-> {}) {origin}; podman would follow it on the host",
                        what(),
                        String::from_utf8_lossy(&target)
                    ))
                    .into())
                }
                Node::Hardlink(target) => {
                    return Err(Error::UnsafeEntry(format!(
                        "{} passes through /{shown}, a hard link (to /{}) {origin}, which podman could resolve as a symlink on the host",
                        what(),
                        String::from_utf8_lossy(&target)
                    ))
                    .into())
                }
            }
        }
        Ok(())
    }

    /// What `prefix` is in the image (as overlayfs merges its layers), and where it
    /// comes from (for messages).
    fn lower_node(
        &mut self,
        prefix: &[u8],
        shown: &str,
        what: &dyn Fn() -> String,
    ) -> Result<(Node, String)> {
        if self.lower.is_none() {
            self.lower = Some((self.get_lower)()?);
        }
        let (image, layers) = match self.lower.as_ref().expect("just set") {
            Lower::Layers { image, layers } => (image.clone(), layers.clone()),
            Lower::Unavailable { image } => {
                return Err(PodmanError::Unsupported(format!(
                    "cannot check {}: /{shown} is not in the rootfs diff and the image {image} is not on this host, so ckstream cannot tell whether it is a symlink podman would follow on the host; pull the image first (podman pull {image})",
                    what()
                )))
            }
        };
        let merged = self.merged.get_or_insert_with(|| MergedLayers::new(layers));
        Ok((merged.lookup(prefix)?.0, format!("in the image {image}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn m(path: &str, kind: EntryKind, target: &str) -> DiffMember {
        DiffMember {
            path: path.as_bytes().to_vec(),
            kind,
            link_target: target.as_bytes().to_vec(),
        }
    }

    fn dir(path: &str) -> DiffMember {
        m(path, EntryKind::Dir, "")
    }

    /// Two image layers (top first): the lower has `hostroot -> /`, `d/link -> /etc`,
    /// `o/link -> /etc`; the upper has `d/` and `o/` (opaque where xattrs allow it).
    fn layers(tmp: &Path) -> (Vec<PathBuf>, bool) {
        let (top, low) = (tmp.join("top"), tmp.join("low"));
        for d in ["d", "o"] {
            std::fs::create_dir_all(low.join(d)).unwrap();
            std::fs::create_dir_all(top.join(d)).unwrap();
            std::os::unix::fs::symlink("/etc", low.join(d).join("link")).unwrap();
        }
        std::os::unix::fs::symlink("/", low.join("hostroot")).unwrap();
        let opaque = rustix::fs::lsetxattr(
            top.join("o"),
            "user.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .is_ok();
        (vec![top, low], opaque)
    }

    fn run(members: &[DiffMember], deleted: &[&str], lower: Lower) -> Result<()> {
        let deleted: Vec<String> = deleted.iter().map(|s| s.to_string()).collect();
        check(members, &deleted, &mut || Ok(lower.clone()))
    }

    fn unsafe_msg(r: Result<()>) -> String {
        match r {
            Err(PodmanError::Archive(Error::UnsafeEntry(m))) => m,
            other => panic!("not refused as unsafe: {other:?}"),
        }
    }

    #[test]
    fn symlinks_in_the_diff_are_refused() {
        let none = Lower::Layers {
            image: "img".into(),
            layers: vec![],
        };
        let link = m("x", EntryKind::Symlink, "/");
        let msg = unsafe_msg(run(
            std::slice::from_ref(&link),
            &["/x/etc/shadow"],
            none.clone(),
        ));
        assert!(msg.contains("deleted.files entry /x/etc/shadow passes through /x, a symlink (-> /) in rootfs-diff.tar"), "{msg}");
        // A member written through it, and a hard link whose target goes through it.
        let msg = unsafe_msg(run(
            &[link.clone(), m("x/tmp/evil", EntryKind::File, "")],
            &[],
            none.clone(),
        ));
        assert!(msg.contains("member /x/tmp/evil"), "{msg}");
        let msg = unsafe_msg(run(
            &[link.clone(), m("h", EntryKind::Hardlink, "x/etc/shadow")],
            &[],
            none.clone(),
        ));
        assert!(
            msg.contains("target /x/etc/shadow of hard link /h"),
            "{msg}"
        );
        // Through a hard link (which may name a symlink).
        let msg = unsafe_msg(run(
            &[m("h", EntryKind::Hardlink, "f")],
            &["/h/x"],
            none.clone(),
        ));
        assert!(msg.contains("a hard link"), "{msg}");
        // Relative links are refused too: nothing legitimate goes through one.
        unsafe_msg(run(
            &[dir("a"), m("a/l", EntryKind::Symlink, "..")],
            &["/a/l/b"],
            none.clone(),
        ));
        // The link itself may be deleted or replaced; a directory that replaces it
        // before the path is fine; a file on the way ends the path (ENOTDIR).
        run(std::slice::from_ref(&link), &["/x"], none.clone()).unwrap();
        run(
            &[link.clone(), dir("x"), m("x/f", EntryKind::File, "")],
            &["/x/g"],
            none.clone(),
        )
        .unwrap();
        run(&[m("f", EntryKind::File, "")], &["/f/x"], none.clone()).unwrap();
    }

    #[test]
    fn symlinks_in_the_image_are_refused_as_overlayfs_merges_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (l, opaque) = layers(tmp.path());
        let lower = Lower::Layers {
            image: "localhost/img".into(),
            layers: l.clone(),
        };
        let msg = unsafe_msg(run(&[], &["/hostroot/etc/shadow"], lower.clone()));
        assert!(
            msg.contains("passes through /hostroot, a symlink (-> /) in the image localhost/img"),
            "{msg}"
        );
        unsafe_msg(run(
            &[m("hostroot/tmp/x", EntryKind::File, "")],
            &[],
            lower.clone(),
        ));
        // The diff replaces the link by a directory: podman removes the link first.
        run(&[dir("hostroot")], &["/hostroot/etc/shadow"], lower.clone()).unwrap();
        // A lower directory merges into an upper one; an opaque one hides it.
        unsafe_msg(run(&[], &["/d/link/passwd"], lower.clone()));
        if opaque {
            run(&[], &["/o/link/passwd"], lower.clone()).unwrap();
        }
        // Missing paths are fine (podman creates directories, finds nothing to delete).
        run(
            &[m("new/dir/f", EntryKind::File, "")],
            &["/gone/x/y"],
            lower.clone(),
        )
        .unwrap();
        // A whiteout in the upper layer hides the lower link.
        if rustix::process::geteuid().is_root() {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                l[0].join("hostroot"),
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::from_raw_mode(0o600),
                0,
            )
            .unwrap();
            run(&[], &["/hostroot/etc/shadow"], lower).unwrap();
        }
    }

    #[test]
    fn an_image_that_is_not_here_is_asked_for_only_when_needed() {
        let asked = std::cell::Cell::new(0);
        let deleted = vec!["/data/x".to_string()];
        let mut lower = || {
            asked.set(asked.get() + 1);
            Ok(Lower::Unavailable {
                image: "quay.io/x/y".into(),
            })
        };
        check(&[dir("data")], &deleted, &mut lower).unwrap();
        check(
            &[m("top", EntryKind::File, "")],
            &["/top".to_string()],
            &mut lower,
        )
        .unwrap();
        assert_eq!(asked.get(), 0);
        match check(&[], &deleted, &mut lower) {
            Err(PodmanError::Unsupported(msg)) => {
                assert!(msg.contains("/data is not in the rootfs diff and the image quay.io/x/y is not on this host"), "{msg}");
                assert!(msg.contains("podman pull quay.io/x/y"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(asked.get(), 1);
    }
}
