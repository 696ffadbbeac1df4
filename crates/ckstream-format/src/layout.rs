//! Fixed-size binary structures: the shard header, record headers and the footer.
//!
//! All integers are little-endian. Every structure carries its own check value
//! (the first 8 bytes of the BLAKE3 hash of the preceding bytes), so a flipped
//! byte is reported as corruption rather than misread. See `docs/FORMAT.md`.

use crate::codec::CodecId;
use crate::error::{Error, Result};

/// Magic at offset 0 of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"\x89CKA\r\n\x1a\n";
/// Format version written by this crate; readers reject anything newer.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the shard header; the data region starts right after it.
pub const HEADER_LEN: usize = 4096;
/// Magic at the start of every record header.
pub const RECORD_MAGIC: [u8; 4] = *b"CKR1";
/// Size of a record header.
pub const RECORD_HEADER_LEN: usize = 96;
/// Magic at the start of the footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"CKAFOOT1";
/// Magic at the very end of a committed shard.
pub const END_MAGIC: [u8; 8] = *b"CKAEND\0\x01";
/// Size of the footer at the end of every committed shard.
pub const FOOTER_LEN: usize = 128;
/// Hash algorithm id for BLAKE3-256, the only one defined in version 1.
pub const HASH_BLAKE3: u8 = 1;
/// Largest shard count a reader accepts.
pub const MAX_SHARDS: u32 = 4096;
/// Largest raw chunk a reader accepts (bounds every allocation made for one chunk).
pub const MAX_CHUNK_RAW: u32 = 64 << 20;
/// Largest inline metadata record (entry records) a reader accepts.
pub const MAX_META_RECORD: u32 = 16 << 20;

/// Most bytes shard 0 may hold between its index and its footer: a Keys and a Signature
/// record.
pub const MAX_TRAILER: u64 = 2 * (RECORD_HEADER_LEN as u64 + MAX_META_RECORD as u64);
/// Largest decoded index a reader accepts.
pub const MAX_INDEX_RAW: u64 = 1 << 30;

/// True when `bytes` (the start of a file) begin like a shard: `.cka` rather than,
/// say, a podman tar.
pub fn looks_like_shard(bytes: &[u8]) -> bool {
    bytes.starts_with(&SHARD_MAGIC)
}

/// Required feature bits. A reader must refuse an archive with a bit it does not know.
pub mod required {
    /// Shards 1.. are named by the archive id (`NAME.ID.i`, see docs/FORMAT.md), so a
    /// new archive never overwrites an older one's shards; a reader that does not know
    /// this would look for them under the old names (`NAME.i`).
    pub const ID_NAMED_SHARDS: u64 = 1 << 0;
    /// Every record payload and the index are sealed (AES-256-GCM) under an archive key
    /// that shard 0's Keys record wraps for each recipient; nothing can be read without
    /// one of their secret keys.
    pub const SEALED: u64 = 1 << 1;
    /// The index references chunks stored in parent archives (`Chunk.archive` > 0,
    /// `Index.parents`): an incremental archive, unreadable without its parents.
    pub const PARENTS: u64 = 1 << 2;
    /// Mask of every required feature this version understands.
    pub const KNOWN: u64 = ID_NAMED_SHARDS | SEALED | PARENTS;
}

/// Optional feature bits. Readers may ignore them.
pub mod optional {
    /// Inline entry records precede each entry's data, so the archive can be read from a pipe.
    pub const INLINE_ENTRIES: u64 = 1 << 0;
    /// Uncompressed payloads of at least one alignment unit are placed at
    /// `shard_offset ≡ file_offset (mod alignment)`.
    pub const ALIGNED_RAW: u64 = 1 << 1;
    /// Shard 0 ends with a Signature record (readers that trust no key ignore it).
    pub const SIGNED: u64 = 1 << 2;
}

fn check(bytes: &[u8]) -> [u8; 8] {
    let h = blake3::hash(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.as_bytes()[..8]);
    out
}

/// True when `stored` is the check of `bytes`. A fuzzing build (`cfg(fuzzing)`, which only
/// cargo-fuzz sets) accepts any value, so that mutated input reaches the code behind the
/// check instead of stopping at it; every other build compares (see the test
/// `check_values_are_enforced`).
fn check_matches(bytes: &[u8], stored: &[u8]) -> bool {
    cfg!(fuzzing) || check(bytes)[..] == stored[..]
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// The header at offset 0 of every shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardHeader {
    /// log2 of the alignment used for uncompressed payloads (12 = 4096).
    pub alignment_log2: u8,
    /// Hash algorithm of every digest in the archive.
    pub hash_algo: u8,
    /// Feature bits a reader must understand.
    pub required_features: u64,
    /// Feature bits a reader may ignore.
    pub optional_features: u64,
    /// Random id shared by every shard of one archive.
    pub archive_id: [u8; 16],
    /// Position of this shard, 0-based. Shard 0 holds the index.
    pub shard_index: u32,
    /// Number of shards in the archive.
    pub shard_count: u32,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_ns: u64,
}

impl ShardHeader {
    /// True when shards 1.. are named by the archive id ([`required::ID_NAMED_SHARDS`]).
    pub fn id_named_shards(&self) -> bool {
        self.required_features & required::ID_NAMED_SHARDS != 0
    }

    /// The alignment in bytes.
    pub fn alignment(&self) -> u64 {
        1u64 << self.alignment_log2
    }

    /// Serializes into the fixed 4096-byte header block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&SHARD_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&0u16.to_le_bytes());
        b[12] = self.alignment_log2;
        b[13] = self.hash_algo;
        b[16..24].copy_from_slice(&self.required_features.to_le_bytes());
        b[24..32].copy_from_slice(&self.optional_features.to_le_bytes());
        b[32..48].copy_from_slice(&self.archive_id);
        b[48..52].copy_from_slice(&self.shard_index.to_le_bytes());
        b[52..56].copy_from_slice(&self.shard_count.to_le_bytes());
        b[56..64].copy_from_slice(&self.created_unix_ns.to_le_bytes());
        let c = check(&b[0..64]);
        b[64..72].copy_from_slice(&c);
        b
    }

    /// Parses and validates a header block. `what` names the shard in error messages.
    ///
    /// # Errors
    /// [`Error::NotAnArchive`] for a wrong magic; [`Error::Unsupported`] for another
    /// version, hash or unknown required feature; [`Error::Corrupt`] for a bad check.
    pub fn decode(b: &[u8], what: &str) -> Result<Self> {
        if b.len() < HEADER_LEN || b[0..8] != SHARD_MAGIC {
            if b.len() >= 4 && b[0..4] == [0x28, 0xb5, 0x2f, 0xfd] {
                return Err(Error::NotAnArchive(format!(
                    "{what} is a zstd stream, not a .cka archive"
                )));
            }
            return Err(Error::NotAnArchive(format!(
                "{what} does not start with the .cka magic"
            )));
        }
        let version = u16_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(Error::Unsupported(format!(
                "{what} has format version {version}; this ckstream reads version {FORMAT_VERSION}"
            )));
        }
        if !check_matches(&b[0..64], &b[64..72]) {
            return Err(Error::Corrupt(format!(
                "{what}: shard header checksum mismatch"
            )));
        }
        let h = ShardHeader {
            alignment_log2: b[12],
            hash_algo: b[13],
            required_features: u64_at(b, 16),
            optional_features: u64_at(b, 24),
            archive_id: b[32..48].try_into().unwrap(),
            shard_index: u32_at(b, 48),
            shard_count: u32_at(b, 52),
            created_unix_ns: u64_at(b, 56),
        };
        if h.hash_algo != HASH_BLAKE3 {
            return Err(Error::Unsupported(format!(
                "{what} uses hash algorithm {}; only BLAKE3 (1) is known",
                h.hash_algo
            )));
        }
        let unknown = h.required_features & !required::KNOWN;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "{what} requires unknown features {unknown:#x}"
            )));
        }
        if !(9..=21).contains(&h.alignment_log2) {
            return Err(Error::Corrupt(format!(
                "{what}: alignment 2^{} is out of range",
                h.alignment_log2
            )));
        }
        if h.shard_count == 0 || h.shard_count > MAX_SHARDS || h.shard_index >= h.shard_count {
            return Err(Error::Corrupt(format!(
                "{what}: shard {} of {} is impossible",
                h.shard_index, h.shard_count
            )));
        }
        Ok(h)
    }
}

/// What a record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// Inline metadata of one entry (a prost `Entry` without chunk references).
    Entry = 1,
    /// A chunk of an entry's content.
    Data = 2,
    /// End of a streamed entry whose size was unknown when its `Entry` record was written;
    /// `file_offset` holds the final size.
    EntryEnd = 3,
    /// The index (zstd-compressed prost `Index`), only in shard 0, after all data.
    Index = 4,
    /// How the archive key is wrapped for each recipient (sealed archives; shard 0,
    /// after the Index record).
    Keys = 5,
    /// The archive's signature (signed archives; shard 0, last before the footer).
    Signature = 6,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => RecordKind::Entry,
            2 => RecordKind::Data,
            3 => RecordKind::EntryEnd,
            4 => RecordKind::Index,
            5 => RecordKind::Keys,
            6 => RecordKind::Signature,
            _ => return None,
        })
    }
}

/// Record flag: the Data record is a frame shared by several small files, each with its own
/// index chunk (see docs/FORMAT.md, "Data, shared frame").
pub const RECORD_FLAG_SHARED_FRAME: u16 = 1;

/// The 96-byte header in front of every record's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record holds.
    pub kind: RecordKind,
    /// How its payload is encoded.
    pub codec: CodecId,
    /// Record flags (bit 0: a shared frame).
    pub flags: u16,
    /// Global sequence number across all shards: the order the writer produced records in.
    pub seq: u64,
    /// Entry the record belongs to (unused for `Index`).
    pub entry_id: u64,
    /// Byte offset of the payload inside the entry (`Data`), or the final size (`EntryEnd`).
    pub file_offset: u64,
    /// Length of the payload once decoded.
    pub raw_len: u32,
    /// Length of the payload as stored.
    pub stored_len: u32,
    /// Zero bytes between the end of this header and the payload (alignment padding).
    pub pad: u32,
    /// BLAKE3 digest of the decoded payload.
    pub digest: [u8; 32],
}

impl RecordHeader {
    /// Bytes from the start of the record to the end of its payload.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.pad as u64 + self.stored_len as u64
    }

    /// The 96 bytes, check value included.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4] = self.kind as u8;
        b[5] = self.codec as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.entry_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.file_offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.raw_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.stored_len.to_le_bytes());
        b[40..44].copy_from_slice(&self.pad.to_le_bytes());
        b[48..80].copy_from_slice(&self.digest);
        let c = check(&b[0..88]);
        b[88..96].copy_from_slice(&c);
        b
    }

    /// Parses a record header; `at` describes its position for error messages.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a wrong magic or check, an unknown kind or codec, or a
    /// length or padding over its bound.
    pub fn decode(b: &[u8], at: &str) -> Result<Self> {
        if b.len() < RECORD_HEADER_LEN || b[0..4] != RECORD_MAGIC {
            return Err(Error::Corrupt(format!("{at}: no record header")));
        }
        if !check_matches(&b[0..88], &b[88..96]) {
            return Err(Error::Corrupt(format!(
                "{at}: record header checksum mismatch"
            )));
        }
        let kind = RecordKind::from_u8(b[4])
            .ok_or_else(|| Error::Corrupt(format!("{at}: unknown record kind {}", b[4])))?;
        let codec = CodecId::from_u8(b[5])
            .ok_or_else(|| Error::Unsupported(format!("{at}: unknown codec {}", b[5])))?;
        let h = RecordHeader {
            kind,
            codec,
            flags: u16_at(b, 6),
            seq: u64_at(b, 8),
            entry_id: u64_at(b, 16),
            file_offset: u64_at(b, 24),
            raw_len: u32_at(b, 32),
            stored_len: u32_at(b, 36),
            pad: u32_at(b, 40),
            digest: b[48..80].try_into().unwrap(),
        };
        let limit = match kind {
            RecordKind::Data => MAX_CHUNK_RAW,
            RecordKind::Entry | RecordKind::EntryEnd | RecordKind::Keys | RecordKind::Signature => {
                MAX_META_RECORD
            }
            // The footer bounds the decoded index at MAX_INDEX_RAW; a record header must
            // not let a scanner allocate more than that either.
            RecordKind::Index => MAX_INDEX_RAW as u32,
        };
        if h.raw_len > limit || h.stored_len > limit.saturating_add(limit / 8 + 4096) {
            return Err(Error::Corrupt(format!(
                "{at}: record length {} / {} exceeds the limit",
                h.raw_len, h.stored_len
            )));
        }
        if h.pad as u64 >= 1 << 21 {
            return Err(Error::Corrupt(format!(
                "{at}: padding {} is too large",
                h.pad
            )));
        }
        Ok(h)
    }
}

/// Location of the index inside shard 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexLocation {
    /// Offset of the index payload (zstd frame) in shard 0.
    pub offset: u64,
    /// Stored (compressed) length.
    pub stored_len: u64,
    /// Decoded length.
    pub raw_len: u64,
}

/// The fixed 128-byte footer: the commit record of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// The archive id, identical in every shard.
    pub archive_id: [u8; 16],
    /// This shard's position (0 holds the index).
    pub shard_index: u32,
    /// How many shards the archive has.
    pub shard_count: u32,
    /// Present in shard 0 only.
    pub index: Option<IndexLocation>,
    /// BLAKE3 of the decoded index, identical in every shard of one archive.
    pub index_digest: [u8; 32],
    /// Offset where the footer starts (= length of header + data region + index record
    /// + in shard 0 of a sealed or signed archive, its Keys and Signature records).
    pub data_end: u64,
    /// Number of records in this shard.
    pub record_count: u64,
}

impl Footer {
    /// The 128 bytes, check value and end magic included.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&FOOTER_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let flags: u16 = if self.index.is_some() { 1 } else { 0 };
        b[10..12].copy_from_slice(&flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.archive_id);
        b[32..36].copy_from_slice(&self.shard_index.to_le_bytes());
        b[36..40].copy_from_slice(&self.shard_count.to_le_bytes());
        let loc = self.index.unwrap_or(IndexLocation {
            offset: 0,
            stored_len: 0,
            raw_len: 0,
        });
        b[40..48].copy_from_slice(&loc.offset.to_le_bytes());
        b[48..56].copy_from_slice(&loc.stored_len.to_le_bytes());
        b[56..64].copy_from_slice(&loc.raw_len.to_le_bytes());
        b[64..96].copy_from_slice(&self.index_digest);
        b[96..104].copy_from_slice(&self.data_end.to_le_bytes());
        b[104..112].copy_from_slice(&self.record_count.to_le_bytes());
        let c = check(&b[0..112]);
        b[112..120].copy_from_slice(&c);
        b[120..128].copy_from_slice(&END_MAGIC);
        b
    }

    /// Parses the last 128 bytes of a shard of `shard_len` bytes.
    ///
    /// # Errors
    /// [`Error::Incomplete`] when they are no footer (the shard was never committed);
    /// [`Error::Corrupt`] for a bad check or a footer that contradicts the shard's size.
    pub fn decode(b: &[u8], shard_len: u64, what: &str) -> Result<Self> {
        if b.len() < FOOTER_LEN || b[120..128] != END_MAGIC || b[0..8] != FOOTER_MAGIC {
            return Err(Error::Incomplete(format!("{what} has no commit footer")));
        }
        if !check_matches(&b[0..112], &b[112..120]) {
            return Err(Error::Corrupt(format!("{what}: footer checksum mismatch")));
        }
        let version = u16_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(Error::Unsupported(format!(
                "{what}: footer version {version}"
            )));
        }
        let has_index = u16_at(b, 10) & 1 == 1;
        let loc = IndexLocation {
            offset: u64_at(b, 40),
            stored_len: u64_at(b, 48),
            raw_len: u64_at(b, 56),
        };
        let f = Footer {
            archive_id: b[16..32].try_into().unwrap(),
            shard_index: u32_at(b, 32),
            shard_count: u32_at(b, 36),
            index: has_index.then_some(loc),
            index_digest: b[64..96].try_into().unwrap(),
            data_end: u64_at(b, 96),
            record_count: u64_at(b, 104),
        };
        if f.data_end.checked_add(FOOTER_LEN as u64) != Some(shard_len)
            || f.data_end < HEADER_LEN as u64
        {
            return Err(Error::Corrupt(format!(
                "{what}: footer says the data ends at {} but the shard is {shard_len} bytes",
                f.data_end
            )));
        }
        if let Some(loc) = f.index {
            // Between the index and the footer: nothing, or the Keys and Signature
            // records of a sealed or signed archive (checked by the reader).
            let end = loc.offset.checked_add(loc.stored_len);
            let trailer = end.and_then(|end| f.data_end.checked_sub(end));
            if loc.offset < HEADER_LEN as u64 || trailer.is_none_or(|t| t > MAX_TRAILER) {
                return Err(Error::Corrupt(format!(
                    "{what}: index location is out of bounds"
                )));
            }
            if loc.raw_len > MAX_INDEX_RAW || loc.stored_len > MAX_INDEX_RAW {
                return Err(Error::Corrupt(format!(
                    "{what}: index of {} bytes exceeds the limit",
                    loc.raw_len
                )));
            }
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_flip_detection() {
        let h = ShardHeader {
            alignment_log2: 12,
            hash_algo: HASH_BLAKE3,
            required_features: 0,
            optional_features: optional::INLINE_ENTRIES,
            archive_id: [7; 16],
            shard_index: 1,
            shard_count: 3,
            created_unix_ns: 42,
        };
        let mut b = h.encode();
        assert_eq!(ShardHeader::decode(&b, "s").unwrap(), h);
        b[50] ^= 1;
        assert!(matches!(
            ShardHeader::decode(&b, "s"),
            Err(Error::Corrupt(_))
        ));
    }

    /// The fuzzing bypass of [`check_matches`] must never be in a normal build: a flipped
    /// check value is refused in the shard header, a record header and the footer.
    #[test]
    fn check_values_are_enforced() {
        let mut header = ShardHeader {
            alignment_log2: 12,
            hash_algo: HASH_BLAKE3,
            required_features: 0,
            optional_features: 0,
            archive_id: [7; 16],
            shard_index: 0,
            shard_count: 1,
            created_unix_ns: 42,
        }
        .encode();
        header[64] ^= 1;
        assert!(
            matches!(ShardHeader::decode(&header, "s"), Err(Error::Corrupt(m)) if m.contains("checksum"))
        );
        let mut record = RecordHeader {
            kind: RecordKind::Data,
            codec: CodecId::None,
            flags: 0,
            seq: 1,
            entry_id: 0,
            file_offset: 0,
            raw_len: 1,
            stored_len: 1,
            pad: 0,
            digest: [0; 32],
        }
        .encode();
        record[95] ^= 0x80;
        assert!(
            matches!(RecordHeader::decode(&record, "r"), Err(Error::Corrupt(m)) if m.contains("checksum"))
        );
        let mut footer = Footer {
            archive_id: [1; 16],
            shard_index: 0,
            shard_count: 1,
            index: None,
            index_digest: [2; 32],
            data_end: 5000,
            record_count: 0,
        }
        .encode();
        footer[112] ^= 1;
        assert!(
            matches!(Footer::decode(&footer, 5128, "s"), Err(Error::Corrupt(m)) if m.contains("checksum"))
        );
    }

    #[test]
    fn footer_rejects_wrong_length() {
        let f = Footer {
            archive_id: [1; 16],
            shard_index: 0,
            shard_count: 1,
            index: Some(IndexLocation {
                offset: 5000,
                stored_len: 100,
                raw_len: 300,
            }),
            index_digest: [2; 32],
            data_end: 5100,
            record_count: 3,
        };
        let b = f.encode();
        assert_eq!(Footer::decode(&b, 5228, "s").unwrap(), f);
        assert!(Footer::decode(&b, 5229, "s").is_err());
    }

    #[test]
    fn record_header_bounds() {
        let mut h = RecordHeader {
            kind: RecordKind::Data,
            codec: CodecId::None,
            flags: 0,
            seq: 9,
            entry_id: 1,
            file_offset: 0,
            raw_len: 10,
            stored_len: 10,
            pad: 0,
            digest: [0; 32],
        };
        assert_eq!(RecordHeader::decode(&h.encode(), "r").unwrap(), h);
        h.raw_len = MAX_CHUNK_RAW + 1;
        assert!(RecordHeader::decode(&h.encode(), "r").is_err());
        // An index record is bounded by the largest index a reader accepts, so a scanner
        // never allocates gigabytes for a crafted header.
        h.kind = RecordKind::Index;
        h.raw_len = 1000;
        h.stored_len = u32::MAX;
        assert!(RecordHeader::decode(&h.encode(), "r").is_err());
        h.stored_len = 1000;
        assert!(RecordHeader::decode(&h.encode(), "r").is_ok());
    }
}
