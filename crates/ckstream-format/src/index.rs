//! The archive index: every entry's metadata and every chunk's location and digest.
//!
//! Encoded with protobuf (prost, no code generation) so later versions can add
//! fields that older readers skip. Stored zstd-compressed in shard 0 just before
//! the footer. [`Index::validate`] checks everything a reader later relies on,
//! so code that walks a validated index can index slices without further checks.

use std::collections::{BTreeMap, HashMap};

use crate::codec::CodecId;
use crate::error::{Error, Result};
use crate::layout::{FOOTER_LEN, HEADER_LEN, MAX_CHUNK_RAW, MAX_SHARDS};

/// Kind of filesystem object an entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum EntryKind {
    /// Not set: a reader refuses it.
    Unspecified = 0,
    /// A regular file.
    File = 1,
    /// A directory.
    Dir = 2,
    /// A symbolic link (`link_target` is the target).
    Symlink = 3,
    /// A hard link to an earlier `File` entry named by `link_target`.
    Hardlink = 4,
    /// A character device (`rdev_*`); 0/0 is an overlay whiteout.
    CharDevice = 5,
    /// A block device (`rdev_*`).
    BlockDevice = 6,
    /// A named pipe.
    Fifo = 7,
    /// A Unix socket (its name only).
    Socket = 8,
}

impl EntryKind {
    /// One-letter type as `ls -l` prints it.
    pub fn type_char(self) -> char {
        match self {
            EntryKind::Dir => 'd',
            EntryKind::Symlink => 'l',
            EntryKind::CharDevice => 'c',
            EntryKind::BlockDevice => 'b',
            EntryKind::Fifo => 'p',
            EntryKind::Socket => 's',
            EntryKind::Hardlink => 'h',
            _ => '-',
        }
    }

    /// Lower-case name for listings and reports (`file`, `dir`, ...).
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Unspecified => "unspecified",
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::CharDevice => "chardev",
            EntryKind::BlockDevice => "blockdev",
            EntryKind::Fifo => "fifo",
            EntryKind::Socket => "socket",
        }
    }
}

/// One extended attribute.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Xattr {
    /// Attribute name, with its namespace (`user.`, `trusted.`, `security.`).
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
    /// Attribute value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// Metadata of one archived path.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Entry {
    /// Relative path, `/`-separated, validated by [`validate_path`].
    #[prost(bytes = "vec", tag = "1")]
    pub path: Vec<u8>,
    /// [`EntryKind`] as its protobuf number.
    #[prost(enumeration = "EntryKind", tag = "2")]
    pub kind: i32,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    #[prost(uint32, tag = "3")]
    pub mode: u32,
    /// Owner user id.
    #[prost(uint32, tag = "4")]
    pub uid: u32,
    /// Owner group id.
    #[prost(uint32, tag = "5")]
    pub gid: u32,
    /// Modification time in nanoseconds since the Unix epoch.
    #[prost(int64, tag = "6")]
    pub mtime_ns: i64,
    /// Logical size of a file; bytes not covered by chunks read as zeros (holes).
    #[prost(uint64, tag = "7")]
    pub size: u64,
    /// Device major number (devices only).
    #[prost(uint32, tag = "8")]
    pub rdev_major: u32,
    /// Device minor number (devices only).
    #[prost(uint32, tag = "9")]
    pub rdev_minor: u32,
    /// Symlink target, or the path of the `File` entry a `Hardlink` points to.
    #[prost(bytes = "vec", tag = "10")]
    pub link_target: Vec<u8>,
    /// Extended attributes, in the order they were read.
    #[prost(message, repeated, tag = "11")]
    pub xattrs: Vec<Xattr>,
    /// First chunk of this entry in [`Index::chunks`].
    #[prost(uint64, tag = "12")]
    pub first_chunk: u64,
    /// Number of chunks of this entry (from `first_chunk`).
    #[prost(uint64, tag = "13")]
    pub chunk_count: u64,
    /// Entry flags ([`entry_flags`]).
    #[prost(uint32, tag = "14")]
    pub flags: u32,
}

/// Bits of [`Entry::flags`].
pub mod entry_flags {
    /// Size was unknown when the inline entry record was written (streamed input);
    /// an `EntryEnd` record carries the final size.
    pub const STREAMED: u32 = 1 << 0;
}

impl Entry {
    /// The kind, with unknown values mapped to `Unspecified` (rejected by validation).
    pub fn entry_kind(&self) -> EntryKind {
        EntryKind::try_from(self.kind).unwrap_or(EntryKind::Unspecified)
    }

    /// The path as text (lossy for non-UTF-8 names), for messages and listings.
    pub fn path_lossy(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

/// Where one chunk of an entry's content lives.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Chunk {
    /// Offset of the chunk's first byte in the entry.
    #[prost(uint64, tag = "1")]
    pub file_offset: u64,
    /// Length once decoded (within its shared frame, for a bundled small file).
    #[prost(uint32, tag = "2")]
    pub raw_len: u32,
    /// Stored payload length (the whole frame, for a bundled small file).
    #[prost(uint32, tag = "3")]
    pub stored_len: u32,
    /// Shard holding the payload.
    #[prost(uint32, tag = "4")]
    pub shard: u32,
    /// Offset of the stored payload in its shard.
    #[prost(uint64, tag = "5")]
    pub offset: u64,
    /// [`CodecId`] as an integer.
    #[prost(uint32, tag = "6")]
    pub codec: u32,
    /// BLAKE3 of the raw bytes.
    #[prost(bytes = "vec", tag = "7")]
    pub digest: Vec<u8>,
    /// 0 = this archive; n > 0 = `Index::parents[n - 1]` (incremental checkpoints, reserved).
    #[prost(uint32, tag = "8")]
    pub archive: u32,
    /// Non-zero for a chunk that shares one compressed frame with other small files: the
    /// stored payload decodes to this many bytes, of which this chunk is
    /// `[frame_offset, frame_offset + raw_len)`.
    #[prost(uint32, tag = "9")]
    pub frame_raw_len: u32,
    /// With `frame_raw_len`: where this chunk starts inside the decoded frame.
    #[prost(uint32, tag = "10")]
    pub frame_offset: u32,
    /// In a sealed archive: the sequence number of the record holding the payload, whose
    /// nonce and associated data it was sealed with (0, and absent, otherwise).
    #[prost(uint64, tag = "11")]
    pub seq: u64,
}

impl Chunk {
    /// The codec, if this reader knows it.
    pub fn codec_id(&self) -> Option<CodecId> {
        u8::try_from(self.codec).ok().and_then(CodecId::from_u8)
    }

    /// File offset just past this chunk.
    pub fn file_end(&self) -> u64 {
        self.file_offset + self.raw_len as u64
    }

    /// True when the chunk is part of a frame shared with other entries.
    pub fn in_shared_frame(&self) -> bool {
        self.frame_raw_len != 0
    }

    /// This chunk's share of the stored bytes: all of them, or for a chunk in a shared
    /// frame, the frame's stored size in proportion to the chunk's part of it (so sums
    /// over chunks count every stored byte once).
    pub fn stored_share(&self) -> u64 {
        if self.in_shared_frame() {
            self.stored_len as u64 * self.raw_len as u64 / self.frame_raw_len.max(1) as u64
        } else {
            self.stored_len as u64
        }
    }

    /// Length of the stored payload once decoded (the whole frame for shared frames).
    pub fn decoded_len(&self) -> u32 {
        if self.in_shared_frame() {
            self.frame_raw_len
        } else {
            self.raw_len
        }
    }
}

/// Another archive whose chunks this one references (reserved for incremental checkpoints).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ParentArchive {
    /// The parent's archive id.
    #[prost(bytes = "vec", tag = "1")]
    pub archive_id: Vec<u8>,
    /// Where to find the parent (relative to this archive when both are local).
    #[prost(string, tag = "2")]
    pub location: String,
    /// BLAKE3 of the parent's decoded index, checked before it is used.
    #[prost(bytes = "vec", tag = "3")]
    pub index_digest: Vec<u8>,
}

/// Free-form key/value metadata (tool versions, CRIU version, source host...).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct MetaItem {
    /// Metadata key (`ckstream.version`, `criu.version`, `podman.container.id`, ...).
    #[prost(string, tag = "1")]
    pub key: String,
    /// Its value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// The whole index.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Index {
    /// Every entry; its position is its id.
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    /// Every chunk, grouped by entry and sorted by file offset.
    #[prost(message, repeated, tag = "2")]
    pub chunks: Vec<Chunk>,
    /// Parent archives (reserved for incremental checkpoints).
    #[prost(message, repeated, tag = "3")]
    pub parents: Vec<ParentArchive>,
    /// Tool versions and other facts about the archive.
    #[prost(message, repeated, tag = "4")]
    pub meta: Vec<MetaItem>,
    /// Nominal chunk size the writer used.
    #[prost(uint32, tag = "5")]
    pub chunk_size: u32,
    /// Entry ids worth prefetching first (lazy mounts, streaming restore).
    #[prost(uint64, repeated, tag = "6")]
    pub hot_list: Vec<u64>,
    /// Size in bytes of every shard, footer included, by shard index; 0 for shard 0
    /// (it holds this index, so its size is not known yet when the index is written).
    /// Empty in archives written before it existed. Lets `info` of a remote archive
    /// report every shard's size without asking the store about each one.
    #[prost(uint64, repeated, tag = "7")]
    pub shard_bytes: Vec<u64>,
}

/// Checks that `path` is a safe relative archive path: non-empty, no leading `/`,
/// no empty, `.` or `..` components, no NUL, components ≤ 255 bytes, ≤ 4096 bytes total.
///
/// # Errors
/// [`Error::UnsafeEntry`] naming the path and the rule it breaks.
pub fn validate_path(path: &[u8]) -> Result<()> {
    let show = || String::from_utf8_lossy(path).into_owned();
    if path.is_empty() {
        return Err(Error::UnsafeEntry("empty path".into()));
    }
    if path.len() > 4096 {
        return Err(Error::UnsafeEntry(format!(
            "path longer than 4096 bytes: {}",
            show()
        )));
    }
    if path[0] == b'/' {
        return Err(Error::UnsafeEntry(format!("absolute path {:?}", show())));
    }
    if path.contains(&0) {
        return Err(Error::UnsafeEntry(format!(
            "path with NUL byte {:?}",
            show()
        )));
    }
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" => {
                return Err(Error::UnsafeEntry(format!(
                    "path with empty component {:?}",
                    show()
                )))
            }
            b"." => {
                return Err(Error::UnsafeEntry(format!(
                    "path with '.' component {:?}",
                    show()
                )))
            }
            b".." => {
                return Err(Error::UnsafeEntry(format!(
                    "path with '..' component {:?}",
                    show()
                )))
            }
            c if c.len() > 255 => {
                return Err(Error::UnsafeEntry(format!(
                    "path component longer than 255 bytes in {:?}",
                    show()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// True when a relative symlink at `link_path` with `target` would point above the archive root.
/// Absolute targets are interpreted relative to the extraction root and never followed by
/// ckstream, so they do not escape.
pub fn symlink_escapes(link_path: &[u8], target: &[u8]) -> bool {
    if target.first() == Some(&b'/') {
        return false;
    }
    let mut depth: i64 = link_path.split(|&b| b == b'/').count() as i64 - 1;
    for comp in target.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

/// Parent directory of an archive path (`None` for a top-level path).
pub fn parent_path(path: &[u8]) -> Option<&[u8]> {
    path.iter().rposition(|&b| b == b'/').map(|i| &path[..i])
}

/// Totals over an index: what `ckstream info` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexSummary {
    /// Entries per kind name (`file`, `dir`, ...).
    pub kinds: BTreeMap<&'static str, u64>,
    /// Logical bytes of all file entries (holes included).
    pub logical_bytes: u64,
    /// Raw bytes stored in chunks.
    pub raw_bytes: u64,
    /// Stored bytes of all chunks (a shared frame counted once).
    pub stored_bytes: u64,
    /// Per codec name: chunks, raw bytes, stored bytes (of this archive's own chunks).
    pub codecs: BTreeMap<&'static str, CodecTotals>,
    /// Raw bytes of chunks whose bytes are stored elsewhere: in a parent archive, or
    /// once already in this one.
    pub referenced_bytes: u64,
    /// Of them, those stored in parent archives.
    pub parent_bytes: u64,
}

/// Chunks of one codec (see [`IndexSummary`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodecTotals {
    /// Number of chunks.
    pub chunks: u64,
    /// Raw bytes they hold.
    pub raw_bytes: u64,
    /// Stored bytes (a shared frame counted once).
    pub stored_bytes: u64,
}

impl Index {
    /// Totals of entries and chunks.
    pub fn summary(&self) -> IndexSummary {
        let mut s = IndexSummary::default();
        for e in &self.entries {
            *s.kinds.entry(e.entry_kind().name()).or_default() += 1;
            if e.entry_kind() == EntryKind::File {
                s.logical_bytes += e.size;
            }
        }
        let mut places = std::collections::HashSet::new();
        for c in &self.chunks {
            s.raw_bytes += u64::from(c.raw_len);
            if c.archive != 0 {
                s.referenced_bytes += u64::from(c.raw_len);
                s.parent_bytes += u64::from(c.raw_len);
                continue;
            }
            if !c.in_shared_frame() && !places.insert((c.shard, c.offset)) {
                s.referenced_bytes += u64::from(c.raw_len);
                continue;
            }
            let name = c.codec_id().map_or("unknown", CodecId::name);
            let t = s.codecs.entry(name).or_default();
            t.chunks += 1;
            t.raw_bytes += u64::from(c.raw_len);
            t.stored_bytes += c.stored_share();
            s.stored_bytes += c.stored_share();
        }
        s
    }

    /// Validates every entry and chunk; `shard_count` bounds chunk shard numbers.
    /// Returns a map from path to entry position.
    ///
    /// # Errors
    /// [`Error::UnsafeEntry`] for unsafe paths, duplicates, escaping links;
    /// [`Error::Corrupt`] for inconsistent chunk tables or a hot list naming no entry;
    /// [`Error::Corrupt`] for a chunk in a parent the index does not list.
    pub fn validate(&self, shard_count: u32) -> Result<HashMap<Vec<u8>, usize>> {
        self.validate_for(shard_count, false)
    }

    /// [`validate`](Self::validate) for an archive that is `sealed` (every stored payload
    /// then carries an AEAD tag of [`crate::crypto::TAG_LEN`] bytes).
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn validate_for(&self, shard_count: u32, sealed: bool) -> Result<HashMap<Vec<u8>, usize>> {
        let tag = if sealed {
            crate::crypto::TAG_LEN as u64
        } else {
            0
        };
        let mut by_path: HashMap<Vec<u8>, usize> = HashMap::with_capacity(self.entries.len());
        let nchunks = self.chunks.len() as u64;
        // Chunks are checked through the entries they belong to; one that belongs to no
        // entry would be checked by nothing (and trusted by code that walks all chunks).
        let mut owned = vec![false; self.chunks.len()];
        for (i, e) in self.entries.iter().enumerate() {
            validate_path(&e.path)?;
            let name = e.path_lossy();
            if by_path.insert(e.path.clone(), i).is_some() {
                return Err(Error::UnsafeEntry(format!("duplicate path {name:?}")));
            }
            let kind = e.entry_kind();
            match kind {
                EntryKind::Unspecified => {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: unknown entry kind {}",
                        e.kind
                    )))
                }
                EntryKind::Symlink => {
                    if e.link_target.is_empty()
                        || e.link_target.contains(&0)
                        || e.link_target.len() > 4096
                    {
                        return Err(Error::UnsafeEntry(format!(
                            "{name:?}: invalid symlink target"
                        )));
                    }
                    if symlink_escapes(&e.path, &e.link_target) {
                        return Err(Error::UnsafeEntry(format!(
                            "symlink {name:?} -> {:?} points outside the archive root",
                            String::from_utf8_lossy(&e.link_target)
                        )));
                    }
                }
                EntryKind::Hardlink => {
                    validate_path(&e.link_target).map_err(|err| {
                        Error::UnsafeEntry(format!("hardlink {name:?}: target {err}"))
                    })?;
                    match by_path.get(&e.link_target) {
                        Some(&t) if self.entries[t].entry_kind() == EntryKind::File => {}
                        _ => {
                            return Err(Error::UnsafeEntry(format!(
                                "hardlink {name:?} -> {:?} does not point to an earlier regular file in the archive",
                                String::from_utf8_lossy(&e.link_target)
                            )))
                        }
                    }
                }
                _ => {}
            }
            let mut ancestor = parent_path(&e.path);
            while let Some(parent) = ancestor {
                if let Some(&p) = by_path.get(parent) {
                    if self.entries[p].entry_kind() != EntryKind::Dir {
                        return Err(Error::UnsafeEntry(format!(
                            "{name:?} is inside {:?}, which is not a directory",
                            String::from_utf8_lossy(parent)
                        )));
                    }
                }
                ancestor = parent_path(parent);
            }
            if kind != EntryKind::File && e.chunk_count != 0 {
                return Err(Error::Corrupt(format!(
                    "{name:?}: a {} has data chunks",
                    kind.name()
                )));
            }
            let end = e.first_chunk.checked_add(e.chunk_count);
            if end.is_none_or(|end| end > nchunks) {
                return Err(Error::Corrupt(format!(
                    "{name:?}: chunk range out of bounds"
                )));
            }
            let range = e.first_chunk as usize..(e.first_chunk + e.chunk_count) as usize;
            owned[range.clone()].fill(true);
            let mut covered = 0u64;
            for c in &self.chunks[range] {
                if c.file_offset < covered {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: chunks overlap or are out of order"
                    )));
                }
                if c.raw_len == 0 || c.raw_len > MAX_CHUNK_RAW {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: chunk length {} out of range",
                        c.raw_len
                    )));
                }
                covered = c
                    .file_offset
                    .checked_add(c.raw_len as u64)
                    .ok_or_else(|| Error::Corrupt(format!("{name:?}: chunk offset overflows")))?;
                if covered > e.size {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: chunk beyond the file size"
                    )));
                }
                let Some(codec) = c.codec_id() else {
                    return Err(Error::Unsupported(format!(
                        "{name:?}: unknown codec {}",
                        c.codec
                    )));
                };
                if c.in_shared_frame()
                    && (c.frame_raw_len > MAX_CHUNK_RAW
                        || c.frame_offset as u64 + c.raw_len as u64 > c.frame_raw_len as u64)
                {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: chunk outside its shared frame"
                    )));
                }
                let decoded = c.decoded_len() as u64;
                if codec == CodecId::None && c.stored_len as u64 != decoded + tag {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: raw chunk with stored length {}",
                        c.stored_len
                    )));
                }
                if c.stored_len as u64 > decoded + decoded / 8 + 4096 + tag {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: stored chunk length out of range"
                    )));
                }
                if c.archive == 0 && c.shard >= shard_count.min(MAX_SHARDS) {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: chunk in shard {} of {shard_count}",
                        c.shard
                    )));
                }
                if c.digest.len() != 32 {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: chunk digest of {} bytes",
                        c.digest.len()
                    )));
                }
                if c.archive as usize > self.parents.len() {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: chunk in parent archive {} of {}",
                        c.archive,
                        self.parents.len()
                    )));
                }
                if c.archive != 0 && sealed {
                    return Err(Error::Corrupt(format!(
                        "{name:?}: a sealed archive references a parent's chunk"
                    )));
                }
            }
        }
        if self.parents.len() > crate::parents::MAX_CHAIN {
            return Err(Error::Corrupt(format!(
                "a chain of {} parent archives",
                self.parents.len()
            )));
        }
        for p in &self.parents {
            if p.archive_id.len() != 16 || p.index_digest.len() != 32 {
                return Err(Error::Corrupt(
                    "a parent archive without id or index digest".into(),
                ));
            }
            validate_path(p.location.as_bytes()).map_err(|e| {
                Error::UnsafeEntry(format!("parent archive location {:?}: {e}", p.location))
            })?;
        }
        if let Some(k) = owned.iter().position(|&o| !o) {
            return Err(Error::Corrupt(format!(
                "index chunk {k} belongs to no entry"
            )));
        }
        if !self.shard_bytes.is_empty()
            && (self.shard_bytes.len() != shard_count as usize
                || self.shard_bytes[0] != 0
                || self.shard_bytes[1..]
                    .iter()
                    .any(|&b| b < (HEADER_LEN + FOOTER_LEN) as u64))
        {
            return Err(Error::Corrupt(format!(
                "the index records {} shard sizes ({:?}...) for {shard_count} shards",
                self.shard_bytes.len(),
                &self.shard_bytes[..self.shard_bytes.len().min(4)]
            )));
        }
        if let Some(&id) = self
            .hot_list
            .iter()
            .find(|&&id| id >= self.entries.len() as u64)
        {
            return Err(Error::Corrupt(format!(
                "hot list names entry {id}, but the index has {} entries",
                self.entries.len()
            )));
        }
        Ok(by_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for ok in [&b"a"[..], b"a/b", b"a/.b/..c", b"x y"] {
            validate_path(ok).unwrap();
        }
        for bad in [
            &b""[..],
            b"/a",
            b"a/../b",
            b"..",
            b"a//b",
            b"a/",
            b"./a",
            b"a\0b",
        ] {
            assert!(
                validate_path(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn symlink_escape_rules() {
        assert!(!symlink_escapes(b"a/l", b"../b"));
        assert!(symlink_escapes(b"a/l", b"../../b"));
        assert!(symlink_escapes(b"l", b".."));
        assert!(!symlink_escapes(b"l", b"/etc/passwd"));
        assert!(!symlink_escapes(b"a/b/l", b"c/../../x"));
        assert!(symlink_escapes(b"a/l", b"x/../../../y"));
    }

    fn file(path: &str) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File as i32,
            ..Default::default()
        }
    }

    #[test]
    fn validate_rejects_duplicates_and_bad_hardlinks() {
        let mut idx = Index {
            entries: vec![file("a"), file("a")],
            ..Default::default()
        };
        assert!(idx.validate(1).is_err());
        idx.entries[1] = Entry {
            path: b"h".to_vec(),
            kind: EntryKind::Hardlink as i32,
            link_target: b"missing".to_vec(),
            ..Default::default()
        };
        assert!(idx.validate(1).is_err());
        idx.entries[1].link_target = b"a".to_vec();
        idx.validate(1).unwrap();
    }

    #[test]
    fn validate_rejects_files_inside_non_directories() {
        let idx = Index {
            entries: vec![
                Entry {
                    path: b"l".to_vec(),
                    kind: EntryKind::Symlink as i32,
                    link_target: b"/tmp".to_vec(),
                    ..Default::default()
                },
                file("l/x"),
            ],
            ..Default::default()
        };
        assert!(idx.validate(1).is_err());
    }

    #[test]
    fn validate_rejects_hot_list_outside_the_entries() {
        let mut idx = Index {
            entries: vec![file("a")],
            hot_list: vec![0],
            ..Default::default()
        };
        idx.validate(1).unwrap();
        idx.hot_list.push(1);
        assert!(idx.validate(1).is_err());
    }

    /// Every chunk must belong to an entry: the chunk table of one that does not was
    /// never checked, and opening the archive indexed shards by it (found by the
    /// `archive` fuzz target: a chunk in shard 5 of 3 panicked in `open`).
    #[test]
    fn validate_rejects_chunks_of_no_entry() {
        let chunk = Chunk {
            raw_len: 1,
            stored_len: 1,
            digest: vec![0; 32],
            ..Default::default()
        };
        let mut idx = Index {
            entries: vec![Entry {
                size: 1,
                first_chunk: 0,
                chunk_count: 1,
                ..file("a")
            }],
            chunks: vec![chunk.clone()],
            ..Default::default()
        };
        idx.validate(3).unwrap();
        idx.chunks.push(Chunk { shard: 5, ..chunk });
        let err = idx.validate(3).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt(m) if m.contains("chunk 1 belongs to no entry")),
            "{err}"
        );
    }

    #[test]
    fn validate_checks_recorded_shard_sizes() {
        let mut idx = Index {
            entries: vec![file("a")],
            ..Default::default()
        };
        idx.validate(3).unwrap();
        idx.shard_bytes = vec![0, 8192, 16384];
        idx.validate(3).unwrap();
        for bad in [vec![0, 8192], vec![1, 8192, 16384], vec![0, 8192, 4096]] {
            idx.shard_bytes = bad.clone();
            assert!(idx.validate(3).is_err(), "{bad:?}");
        }
    }
}
