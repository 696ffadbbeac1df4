//! Test tools, for this crate's tests and (with the `testutil` feature, off by default)
//! for its dependents': shards held in memory, and archives crafted byte by byte.
//!
//! A crafted archive is built *without* the writer and so without any of its checks
//! (paths, chunk tables, sizes): it is what a hostile or buggy producer could write, and it
//! is only as valid as the caller makes it. Readers must refuse the bad ones by
//! themselves. Everything here panics instead of returning errors: it is for tests only.

use std::io;
use std::sync::{Arc, Mutex};

use prost::Message;

use crate::codec::CodecId;
use crate::error::Result;
use crate::index::{Chunk, Entry, Index};
use crate::layout::{
    optional, Footer, IndexLocation, RecordHeader, RecordKind, ShardHeader, FOOTER_LEN,
    HASH_BLAKE3, RECORD_HEADER_LEN,
};
use crate::reader::{ArchiveReader, ShardSource};
use crate::writer::ShardSink;

/// An in-memory [`ShardSink`]. Clones share the bytes, so a test keeps one clone and
/// gives the writer the other.
#[derive(Clone, Default)]
pub struct MemSink(Arc<Mutex<Vec<u8>>>);

impl MemSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// `n` sinks, and boxed clones of them to hand to an
    /// [`ArchiveWriter`](crate::ArchiveWriter).
    pub fn many(n: usize) -> (Vec<MemSink>, Vec<Box<dyn ShardSink>>) {
        let sinks: Vec<MemSink> = (0..n).map(|_| MemSink::new()).collect();
        let boxed = sinks
            .iter()
            .map(|s| Box::new(s.clone()) as Box<dyn ShardSink>)
            .collect();
        (sinks, boxed)
    }

    /// A copy of the bytes written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }

    /// The bytes written so far, leaving the sink empty.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl ShardSink for MemSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Opens an archive whose shard `i` is `shards[i]`.
///
/// # Errors
/// As [`ArchiveReader::open`].
pub fn open_in_memory(shards: &[Vec<u8>]) -> Result<ArchiveReader> {
    ArchiveReader::open(Box::new(shards[0].clone()), |_, i| {
        Ok(Box::new(shards[i as usize].clone()) as Box<dyn ShardSource>)
    })
}

/// Reproducible bytes that do not compress (xorshift).
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Archive id of every crafted archive.
pub const CRAFTED_ID: [u8; 16] = [9; 16];

/// Builds a committed one-shard archive from entries (with optional content, stored as
/// one uncompressed chunk), without the writer's validation. Each entry gets an inline
/// Entry record; its `size` is that of its content when it has some.
pub fn craft(entries: Vec<(Entry, Option<Vec<u8>>)>) -> Vec<u8> {
    let mut out = ShardHeader {
        alignment_log2: 12,
        hash_algo: HASH_BLAKE3,
        required_features: 0,
        optional_features: optional::INLINE_ENTRIES,
        archive_id: CRAFTED_ID,
        shard_index: 0,
        shard_count: 1,
        created_unix_ns: 0,
    }
    .encode();
    let mut index = Index::default();
    let mut seq = 0;
    let mut push = |out: &mut Vec<u8>, kind, id, off, payload: &[u8]| {
        let h = RecordHeader {
            kind,
            codec: CodecId::None,
            flags: 0,
            seq,
            entry_id: id,
            file_offset: off,
            raw_len: payload.len() as u32,
            stored_len: payload.len() as u32,
            pad: 0,
            digest: *blake3::hash(payload).as_bytes(),
        };
        seq += 1;
        out.extend_from_slice(&h.encode());
        let at = out.len() as u64;
        out.extend_from_slice(payload);
        at
    };
    for (id, (mut e, data)) in entries.into_iter().enumerate() {
        e.size = data.as_ref().map_or(e.size, |d| d.len() as u64);
        push(
            &mut out,
            RecordKind::Entry,
            id as u64,
            0,
            &e.encode_to_vec(),
        );
        if let Some(d) = data {
            let at = push(&mut out, RecordKind::Data, id as u64, 0, &d);
            e.first_chunk = index.chunks.len() as u64;
            e.chunk_count = 1;
            index.chunks.push(Chunk {
                file_offset: 0,
                raw_len: d.len() as u32,
                stored_len: d.len() as u32,
                shard: 0,
                offset: at,
                codec: CodecId::None as u32,
                digest: blake3::hash(&d).as_bytes().to_vec(),
                ..Default::default()
            });
        }
        index.entries.push(e);
    }
    append_index(&mut out, &index, seq + 1);
    out
}

/// Appends the index record and the footer that commit a crafted one-shard archive;
/// `record_count` must count the index record too.
pub fn append_index(bytes: &mut Vec<u8>, index: &Index, record_count: u64) {
    let raw = index.encode_to_vec();
    let stored = zstd::bulk::compress(&raw, 1).unwrap();
    let h = RecordHeader {
        kind: RecordKind::Index,
        codec: CodecId::Zstd,
        flags: 0,
        seq: 999,
        entry_id: 0,
        file_offset: 0,
        raw_len: raw.len() as u32,
        stored_len: stored.len() as u32,
        pad: 0,
        digest: *blake3::hash(&raw).as_bytes(),
    };
    bytes.extend_from_slice(&h.encode());
    let offset = bytes.len() as u64;
    bytes.extend_from_slice(&stored);
    let footer = Footer {
        archive_id: CRAFTED_ID,
        shard_index: 0,
        shard_count: 1,
        index: Some(IndexLocation {
            offset,
            stored_len: stored.len() as u64,
            raw_len: raw.len() as u64,
        }),
        index_digest: *blake3::hash(&raw).as_bytes(),
        data_end: bytes.len() as u64,
        record_count,
    };
    bytes.extend_from_slice(&footer.encode());
}

/// The footer of a one-shard archive (the last 128 bytes, which must be one).
pub fn crafted_footer(bytes: &[u8]) -> Footer {
    let n = bytes.len();
    Footer::decode(&bytes[n - FOOTER_LEN..], n as u64, "crafted").unwrap()
}

/// Where the footer of a one-shard archive says its index is.
pub fn index_location(bytes: &[u8]) -> IndexLocation {
    crafted_footer(bytes).index.unwrap()
}

/// The index of a one-shard archive, decoded.
pub fn read_index(bytes: &[u8]) -> Index {
    let loc = index_location(bytes);
    let stored = &bytes[loc.offset as usize..(loc.offset + loc.stored_len) as usize];
    let raw = zstd::bulk::decompress(stored, loc.raw_len as usize).unwrap();
    Index::decode(raw.as_slice()).unwrap()
}

/// Replaces the index of a crafted one-shard archive (and its footer) with `index`,
/// keeping everything before it and the footer's record count.
pub fn rewrite_index(bytes: &mut Vec<u8>, index: &Index) {
    let footer = crafted_footer(bytes);
    let loc = footer.index.unwrap();
    bytes.truncate(loc.offset as usize - RECORD_HEADER_LEN);
    append_index(bytes, index, footer.record_count);
}
