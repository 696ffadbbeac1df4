//! The list of deleted paths (`deleted.files`) of an overlay upper directory, in the
//! form podman's restore applies correctly.
//!
//! Podman restores by extracting `rootfs-diff.tar` and only then deleting every path
//! in `deleted.files`. Listing a deleted-and-recreated (opaque) directory itself, as
//! podman does, therefore deletes the new directory on restore. This list instead
//! names, for an opaque directory, the lower-layer children that the upper layer
//! does not provide again, so apply-then-delete yields exactly the merged view.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use ckstream_format::{Entry, EntryKind};

use crate::layout::is_excluded;
use ckstream_format::{Error, Result};

/// Computes `deleted.files` from the entries of an upper directory (paths relative to
/// it, as [`ckstream_fs::plan_inputs`] yields them under `prefix`) and the lower
/// directories (top first). Returns absolute container paths, sorted.
///
/// # Errors
/// [`Error::Io`] reading a lower directory; [`Error::Unsupported`] for a path that is
/// not UTF-8 (podman's JSON list cannot hold it).
pub fn deleted_files(upper: &[&Entry], prefix: &[u8], lowers: &[PathBuf]) -> Result<Vec<String>> {
    let rel_of = |e: &Entry| -> Option<Vec<u8>> {
        e.path
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix(b"/"))
            .map(|r| r.to_vec())
    };
    let kinds: HashMap<Vec<u8>, EntryKind> = upper
        .iter()
        .filter_map(|e| rel_of(e).map(|r| (r, e.entry_kind())))
        .collect();
    let mut deleted: BTreeSet<Vec<u8>> = BTreeSet::new();
    for e in upper {
        let Some(rel) = rel_of(e) else { continue };
        if ckstream_fs::is_whiteout(e) {
            deleted.insert(rel);
        } else if ckstream_fs::is_opaque(e) {
            for lower in lowers {
                hidden_by_opaque(lower, &rel, &kinds, &mut deleted)?;
            }
        }
    }
    deleted
        .into_iter()
        .filter(|rel| !is_excluded(rel))
        .map(|rel| {
            String::from_utf8(rel)
                .map(|s| format!("/{s}"))
                .map_err(|e| {
                    Error::Unsupported(format!(
                        "deleted path {:?} is not UTF-8; podman's deleted.files cannot hold it",
                        String::from_utf8_lossy(e.as_bytes())
                    ))
                })
        })
        .collect()
}

/// Adds the children of `lower/rel` that the upper layer does not provide again
/// (recursing where both sides have a directory, since an opaque parent hides the
/// whole lower subtree).
fn hidden_by_opaque(
    lower: &Path,
    rel: &[u8],
    upper: &HashMap<Vec<u8>, EntryKind>,
    out: &mut BTreeSet<Vec<u8>>,
) -> Result<()> {
    let dir = lower.join(OsStr::from_bytes(rel));
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(())
        }
        Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
    };
    for child in rd {
        let child = child.map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
        let mut crel = rel.to_vec();
        crel.push(b'/');
        crel.extend_from_slice(child.file_name().as_bytes());
        match upper.get(&crel) {
            None => {
                out.insert(crel);
            }
            Some(EntryKind::Dir) => {
                let lower_is_dir = child.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if lower_is_dir {
                    hidden_by_opaque(lower, &crel, upper, out)?;
                }
            }
            Some(_) => {}
        }
    }
    Ok(())
}
