//! Incremental archives: what a new archive may reference instead of storing again.
//!
//! A child archive lists its whole ancestry in `Index.parents` (its parent first, then
//! the parent's own parents), and every referenced chunk names the archive that stores
//! its bytes (`Chunk.archive = n` → `parents[n - 1]`), never one that merely references
//! them: a reader opens each listed archive once, checks its id and index digest, and
//! reads a chunk from exactly one place.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::index::{Chunk, ParentArchive};
use crate::reader::ArchiveReader;

/// Most archives a chain may hold above a child.
pub const MAX_CHAIN: usize = 64;

/// The chunks a new archive can reference, by digest, and the parents they live in.
#[derive(Debug, Default, Clone)]
pub struct ParentChunks {
    /// The new archive's `Index.parents`.
    pub archives: Vec<ParentArchive>,
    /// Every chunk stored in one of them, as the new archive records a reference to it
    /// (`archive` numbered in `archives`), by BLAKE3 of its raw bytes.
    pub by_digest: HashMap<[u8; 32], Chunk>,
}

impl ParentChunks {
    /// What a child of `parent` may reference: `parent`'s chunks and everything it
    /// references itself. `location` is where the child will find `parent` (relative to
    /// the child when both are local), `rebase` maps each of `parent`'s own parent
    /// locations to where the child will find it.
    ///
    /// # Errors
    /// [`Error::Usage`] for a sealed parent (its chunks are sealed under its own key) or
    /// a chain longer than [`MAX_CHAIN`].
    pub fn of_parent(
        parent: &ArchiveReader,
        location: String,
        rebase: &dyn Fn(&str) -> Result<String>,
    ) -> Result<Self> {
        if parent.is_sealed() {
            return Err(Error::Usage(
                "an encrypted archive cannot be a parent: its chunks are sealed under its own key"
                    .into(),
            ));
        }
        let grand = &parent.index().parents;
        if grand.len() + 1 > MAX_CHAIN {
            return Err(Error::Usage(format!(
                "the parent already has a chain of {} archives (at most {MAX_CHAIN})",
                grand.len()
            )));
        }
        let mut archives = vec![ParentArchive {
            archive_id: parent.header().archive_id.to_vec(),
            location,
            index_digest: parent.footer().index_digest.to_vec(),
        }];
        for g in grand {
            archives.push(ParentArchive {
                location: rebase(&g.location)?,
                ..g.clone()
            });
        }
        let mut by_digest = HashMap::with_capacity(parent.index().chunks.len());
        for c in &parent.index().chunks {
            let Ok(digest) = <[u8; 32]>::try_from(&c.digest[..]) else {
                continue;
            };
            // In the parent, 0 is the parent itself and n its parents[n - 1]: one more
            // for the child, whose parents[0] is the parent.
            let reference = Chunk {
                archive: c.archive + 1,
                file_offset: 0,
                ..c.clone()
            };
            by_digest.entry(digest).or_insert(reference);
        }
        Ok(ParentChunks {
            archives,
            by_digest,
        })
    }

    /// The parent chunk holding exactly these raw bytes, if any (a part of a shared frame
    /// is never one).
    pub fn find(&self, digest: &[u8; 32], raw_len: u32) -> Option<&Chunk> {
        self.by_digest
            .get(digest)
            .filter(|c| c.raw_len == raw_len && !c.in_shared_frame())
    }

    /// The depth of the chain a child of these parents ends.
    pub fn depth(&self) -> usize {
        self.archives.len()
    }
}

/// Checks that `reader` is the archive `expected` names (by id and index digest).
///
/// # Errors
/// [`Error::Corrupt`] naming `what` when it is another archive or was rewritten since.
pub fn check_parent(reader: &ArchiveReader, expected: &ParentArchive, what: &str) -> Result<()> {
    if reader.header().archive_id[..] != expected.archive_id[..] {
        return Err(Error::Corrupt(format!(
            "parent archive {what} is another archive (id {} instead of {}): it was replaced since the child was written",
            hex(&reader.header().archive_id),
            hex(&expected.archive_id)
        )));
    }
    if reader.footer().index_digest[..] != expected.index_digest[..] {
        return Err(Error::Corrupt(format!(
            "parent archive {what} has the right id but another index: it was rewritten since the child was written"
        )));
    }
    if reader.is_sealed() {
        return Err(Error::Corrupt(format!(
            "parent archive {what} is encrypted; a parent never is"
        )));
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
