//! The inode table of a mounted archive, built once from the validated index.
//!
//! Inode numbers are stable and derived from entry positions (`entry id + 2`; 1 is the
//! root), so the same archive always mounts with the same numbers. A hardlink entry is a
//! second name for its target's inode, which therefore reports `nlink > 1`. Directories
//! that an entry's path implies but the archive does not list (an archive of
//! `criu/pages-1.img` alone, say) are synthesised with mode 0755, owner 0:0 and the
//! archive's creation time, so every entry is reachable.

use std::collections::HashMap;

use ckstream_format::index::parent_path;
use ckstream_format::{Entry, EntryKind};

/// The inode number of the mount's root directory (fixed by the FUSE protocol).
pub const ROOT_INO: u64 = 1;

/// Where a node's metadata comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeSource {
    /// The mount's root directory.
    Root,
    /// An archive entry (never a hardlink entry: those resolve to their target).
    Entry(usize),
    /// A directory implied by the paths below it, with this path.
    Implied(usize),
}

/// One name in a directory.
#[derive(Clone, Copy, Debug)]
pub struct DirEntry {
    /// Whose path holds the name: an entry (a hardlink entry keeps its own name) or an
    /// implied directory.
    pub name_of: NameRef,
    pub ino: u64,
}

/// Which path a name is the last component of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRef {
    Entry(usize),
    Implied(usize),
}

/// One inode.
#[derive(Debug)]
pub struct Node {
    pub source: NodeSource,
    pub kind: EntryKind,
    pub parent: u64,
    pub nlink: u32,
    /// Sorted by name; empty for everything but directories.
    pub children: Vec<DirEntry>,
}

/// Every inode of the mount.
pub struct Tree {
    /// Indexed by `ino - 1`. Slots of hardlink entries exist but are never handed out.
    nodes: Vec<Node>,
    implied_paths: Vec<Vec<u8>>,
}

/// Last component of a path.
fn base_name(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

impl Tree {
    /// Builds the inode table. `entries` must come from a validated index (hardlink
    /// targets exist and are files, no entry lies below a non-directory, paths are unique).
    pub fn build(entries: &[Entry], by_path: impl Fn(&[u8]) -> Option<usize>) -> Tree {
        let n = entries.len();
        let mut nodes: Vec<Node> = Vec::with_capacity(n + 1);
        nodes.push(Node {
            source: NodeSource::Root,
            kind: EntryKind::Dir,
            parent: ROOT_INO,
            nlink: 2,
            children: Vec::new(),
        });
        for (i, e) in entries.iter().enumerate() {
            nodes.push(Node {
                source: NodeSource::Entry(i),
                kind: e.entry_kind(),
                parent: ROOT_INO,
                nlink: 1,
                children: Vec::new(),
            });
        }
        let mut implied_paths: Vec<Vec<u8>> = Vec::new();
        let mut implied_by_path: HashMap<Vec<u8>, u64> = HashMap::new();
        let ino_of_entry = |i: usize| i as u64 + 2;

        // The directory inode for `path`, creating implied directories (and their own
        // parents) as needed.
        fn dir_ino(
            path: Option<&[u8]>,
            nodes: &mut Vec<Node>,
            implied_paths: &mut Vec<Vec<u8>>,
            implied_by_path: &mut HashMap<Vec<u8>, u64>,
            by_path: &dyn Fn(&[u8]) -> Option<usize>,
            entry_count: usize,
        ) -> u64 {
            let Some(path) = path else { return ROOT_INO };
            if let Some(i) = by_path(path) {
                return i as u64 + 2;
            }
            if let Some(&ino) = implied_by_path.get(path) {
                return ino;
            }
            let parent = dir_ino(
                parent_path(path),
                nodes,
                implied_paths,
                implied_by_path,
                by_path,
                entry_count,
            );
            let k = implied_paths.len();
            implied_paths.push(path.to_vec());
            nodes.push(Node {
                source: NodeSource::Implied(k),
                kind: EntryKind::Dir,
                parent,
                nlink: 2,
                children: Vec::new(),
            });
            let ino = nodes.len() as u64;
            debug_assert_eq!(ino, (entry_count + 2 + k) as u64);
            nodes[parent as usize - 1].children.push(DirEntry {
                name_of: NameRef::Implied(k),
                ino,
            });
            implied_by_path.insert(path.to_vec(), ino);
            ino
        }

        for (i, e) in entries.iter().enumerate() {
            let parent = dir_ino(
                parent_path(&e.path),
                &mut nodes,
                &mut implied_paths,
                &mut implied_by_path,
                &by_path,
                n,
            );
            let ino = if e.entry_kind() == EntryKind::Hardlink {
                let target = by_path(&e.link_target).expect("validated hardlink target");
                let t = ino_of_entry(target);
                nodes[t as usize - 1].nlink += 1;
                t
            } else {
                let ino = ino_of_entry(i);
                nodes[ino as usize - 1].parent = parent;
                ino
            };
            nodes[parent as usize - 1].children.push(DirEntry {
                name_of: NameRef::Entry(i),
                ino,
            });
        }
        let mut tree = Tree {
            nodes,
            implied_paths,
        };
        // Sort every directory by name for binary-search lookups, and count
        // subdirectories (each one's ".." links to its parent).
        for idx in 0..tree.nodes.len() {
            if tree.nodes[idx].children.is_empty() {
                continue;
            }
            let mut children = std::mem::take(&mut tree.nodes[idx].children);
            children.sort_by(|a, b| {
                tree.name(entries, a.name_of)
                    .cmp(tree.name(entries, b.name_of))
            });
            let subdirs = children
                .iter()
                .filter(|c| tree.nodes[c.ino as usize - 1].kind == EntryKind::Dir)
                .count() as u32;
            tree.nodes[idx].nlink = 2 + subdirs;
            tree.nodes[idx].children = children;
        }
        tree
    }

    /// The node with inode number `ino`, if it is one this tree hands out.
    pub fn node(&self, ino: u64) -> Option<&Node> {
        let node = self.nodes.get(usize::try_from(ino).ok()?.checked_sub(1)?)?;
        (node.kind != EntryKind::Hardlink).then_some(node)
    }

    /// The name a directory entry refers to.
    pub fn name<'a>(&'a self, entries: &'a [Entry], name: NameRef) -> &'a [u8] {
        match name {
            NameRef::Entry(i) => base_name(&entries[i].path),
            NameRef::Implied(k) => base_name(&self.implied_paths[k]),
        }
    }

    /// Looks `name` up in directory `dir`.
    pub fn lookup(&self, entries: &[Entry], dir: u64, name: &[u8]) -> Option<u64> {
        let node = self.node(dir)?;
        node.children
            .binary_search_by(|c| self.name(entries, c.name_of).cmp(name))
            .ok()
            .map(|i| node.children[i].ino)
    }

    /// Number of inodes, implied directories included.
    pub fn inode_count(&self) -> usize {
        self.nodes.len()
    }

    /// Number of directories the archive does not list but its paths imply.
    #[cfg(test)]
    pub fn implied_count(&self) -> usize {
        self.implied_paths.len()
    }

    /// The entry id behind inode `ino` (None for the root and implied directories).
    pub fn entry_of(&self, ino: u64) -> Option<usize> {
        match self.node(ino)?.source {
            NodeSource::Entry(i) => Some(i),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind, target: &str) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: kind as i32,
            link_target: target.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn implied_dirs_hardlinks_and_lookup() {
        let entries = vec![
            entry("criu/pages-1.img", EntryKind::File, ""),
            entry("d", EntryKind::Dir, ""),
            entry("d/f", EntryKind::File, ""),
            entry("d/sub", EntryKind::Dir, ""),
            entry("d/h", EntryKind::Hardlink, "d/f"),
            entry("a/b/c", EntryKind::Symlink, "x"),
        ];
        let map: HashMap<Vec<u8>, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.clone(), i))
            .collect();
        let by_path = |p: &[u8]| map.get(p).copied();
        let tree = Tree::build(&entries, by_path);
        assert_eq!(tree.implied_count(), 3); // criu, a, a/b
        let criu = tree.lookup(&entries, ROOT_INO, b"criu").unwrap();
        assert_eq!(tree.node(criu).unwrap().kind, EntryKind::Dir);
        let pages = tree.lookup(&entries, criu, b"pages-1.img").unwrap();
        assert_eq!(tree.entry_of(pages), Some(0));
        let d = tree.lookup(&entries, ROOT_INO, b"d").unwrap();
        let f = tree.lookup(&entries, d, b"f").unwrap();
        let h = tree.lookup(&entries, d, b"h").unwrap();
        assert_eq!(f, h);
        assert_eq!(tree.node(f).unwrap().nlink, 2);
        assert_eq!(tree.node(d).unwrap().nlink, 3);
        assert_eq!(tree.node(ROOT_INO).unwrap().nlink, 5);
        assert!(tree.lookup(&entries, d, b"missing").is_none());
        let a = tree.lookup(&entries, ROOT_INO, b"a").unwrap();
        let b = tree.lookup(&entries, a, b"b").unwrap();
        assert_eq!(tree.node(b).unwrap().parent, a);
        assert!(tree.lookup(&entries, b, b"c").is_some());
        // The hardlink entry's own slot is never handed out.
        assert!(tree.node(6).is_none());
        assert!(tree.node(0).is_none());
        assert!(tree.node(1000).is_none());
    }
}
