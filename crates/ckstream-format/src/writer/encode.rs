//! The encoding workers: hash and compress each job into a record, on `threads` threads.
//!
//! Workers take jobs in any order and finish them in any order; every job carries its
//! sequence number so the sequencer can restore the order. A job's digest is always of
//! its raw bytes (for a shared frame, of the whole frame and of each file in it), taken
//! before compression, so what the reader checks is what the caller handed in. An
//! all-zero chunk becomes no record at all (a hole), but still yields a [`Prepared`], so
//! the sequence has no gaps.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use prost::Message;

use super::{Batch, BatchToken, CloneFrom, EntryId, FailFlag};
use crate::codec::{CodecId, Compression, Encoder};
use crate::crypto::ArchiveKey;
use crate::error::Result;
use crate::index::Entry;
use crate::layout::RecordKind;
use crate::parents::ParentChunks;

/// What the caller's thread hands to the workers: one [`ArchiveWriter`](super::ArchiveWriter)
/// call each, numbered in call order.
pub(super) enum Job {
    /// Several small files' contents compressed as one frame.
    Bundle {
        seq: u64,
        parts: Vec<(EntryId, Vec<u8>)>,
    },
    /// An entry's metadata, stored inline and kept for the index.
    Entry {
        seq: u64,
        id: EntryId,
        entry: Box<Entry>,
    },
    /// One chunk of an entry's content.
    Data {
        seq: u64,
        id: EntryId,
        offset: u64,
        data: Bytes,
        clone: CloneFrom,
    },
    /// The final size of a streamed entry.
    EntryEnd { seq: u64, id: EntryId, size: u64 },
}

/// A record's payload as the shard thread writes it.
pub(super) enum Payload {
    /// Bytes to write (stored bytes, or raw bytes for codec none).
    Bytes(Bytes),
    /// Raw bytes that may be cloned from `file` at `offset`; `bytes` is the fallback.
    Clone {
        file: Arc<File>,
        offset: u64,
        bytes: Bytes,
    },
}

impl Payload {
    pub(super) fn len(&self) -> usize {
        self.bytes().len()
    }

    pub(super) fn bytes(&self) -> &Bytes {
        match self {
            Payload::Bytes(b) | Payload::Clone { bytes: b, .. } => b,
        }
    }
}

impl Job {
    /// Bytes of data the job carries (what a batch is measured by).
    pub(super) fn data_len(&self) -> usize {
        match self {
            Job::Data { data, .. } => data.len(),
            Job::Bundle { parts, .. } => parts.iter().map(|(_, d)| d.len()).sum(),
            Job::Entry { .. } | Job::EntryEnd { .. } => 0,
        }
    }
}

/// A finished batch, for the sequencer: its jobs in their order, and its token, handed
/// back once the last of its records is written.
pub(super) struct PreparedBatch {
    pub(super) items: Vec<Prepared>,
    pub(super) token: Arc<BatchToken>,
}

/// A finished job, for the sequencer.
pub(super) struct Prepared {
    pub(super) seq: u64,
    /// `None` for an all-zero chunk, stored as a hole.
    pub(super) record: Option<PreparedRecord>,
    /// The entry to add to the index (for an Entry job).
    pub(super) entry: Option<Box<Entry>>,
}

/// A record ready to be placed: all but its shard, offset and padding.
pub(super) struct PreparedRecord {
    pub(super) kind: RecordKind,
    pub(super) codec: CodecId,
    pub(super) entry_id: EntryId,
    pub(super) file_offset: u64,
    pub(super) raw_len: u32,
    /// BLAKE3 of the raw bytes: what the index records for the chunk.
    pub(super) digest: [u8; 32],
    /// For a sealed payload, BLAKE3 of the sealed bytes: what its record header carries
    /// instead of `digest` (a digest of the plaintext would let anyone confirm a guess
    /// of the content).
    pub(super) sealed_digest: Option<[u8; 32]>,
    pub(super) payload: Payload,
    /// Place the payload at an offset congruent to `file_offset` (uncompressed archives).
    pub(super) align: bool,
    /// For a shared frame: the entries whose content it holds.
    pub(super) parts: Vec<FramePart>,
}

/// One small file's place inside a shared frame.
pub(super) struct FramePart {
    pub(super) entry_id: EntryId,
    pub(super) offset: u32,
    pub(super) len: u32,
    pub(super) digest: [u8; 32],
}

/// Seals `record`'s payload with the archive key when there is one: the payload is then
/// never cloned (a reflink would share plaintext) and never aligned.
fn seal_record(key: Option<&ArchiveKey>, seq: u64, record: &mut PreparedRecord) -> Result<()> {
    let Some(key) = key else {
        return Ok(());
    };
    let payload = std::mem::replace(&mut record.payload, Payload::Bytes(Bytes::new()));
    let mut bytes = Vec::from(payload.bytes().clone());
    drop(payload);
    key.seal(
        seq,
        record.kind,
        record.codec as u8,
        record.raw_len,
        &mut bytes,
    )?;
    record.sealed_digest = Some(*blake3::hash(&bytes).as_bytes());
    record.payload = Payload::Bytes(bytes.into());
    record.align = false;
    Ok(())
}

/// One worker: runs until `jobs` closes, `done` closes (the sequencer stopped) or another
/// thread failed. Its own failure (a codec error) goes into `fail`. With `key`, every
/// payload but an EntryEnd's (which has none) is sealed.
pub(super) fn encode_worker(
    batches: Receiver<Batch>,
    done: Sender<PreparedBatch>,
    fail: Arc<FailFlag>,
    compression: Compression,
    key: Option<Arc<ArchiveKey>>,
    parents: Option<Arc<ParentChunks>>,
) {
    let mut encoder = match Encoder::new(compression) {
        Ok(e) => e,
        Err(e) => return fail.set(e),
    };
    for batch in batches {
        let mut items = Vec::with_capacity(batch.jobs.len());
        for job in batch.jobs {
            if fail.is_set() {
                return;
            }
            let prepared = match job {
                Job::Entry { seq, id, entry } => {
                    let mut inline = (*entry).clone();
                    inline.first_chunk = 0;
                    inline.chunk_count = 0;
                    let bytes = inline.encode_to_vec();
                    Prepared {
                        seq,
                        record: Some(PreparedRecord {
                            kind: RecordKind::Entry,
                            codec: CodecId::None,
                            entry_id: id,
                            file_offset: 0,
                            raw_len: bytes.len() as u32,
                            digest: *blake3::hash(&bytes).as_bytes(),
                            sealed_digest: None,
                            payload: Payload::Bytes(bytes.into()),
                            align: false,
                            parts: Vec::new(),
                        }),
                        entry: Some(entry),
                    }
                }
                Job::Bundle { seq, parts } => {
                    let total: usize = parts.iter().map(|(_, d)| d.len()).sum();
                    let mut frame = Vec::with_capacity(total);
                    let mut frame_parts = Vec::with_capacity(parts.len());
                    for (entry_id, data) in &parts {
                        frame_parts.push(FramePart {
                            entry_id: *entry_id,
                            offset: frame.len() as u32,
                            len: data.len() as u32,
                            digest: *blake3::hash(data).as_bytes(),
                        });
                        frame.extend_from_slice(data);
                    }
                    let digest = *blake3::hash(&frame).as_bytes();
                    let raw_len = frame.len() as u32;
                    let (codec, payload) = match encoder.encode(&frame) {
                        Ok(Some((codec, stored))) => (codec, Payload::Bytes(stored.into())),
                        Ok(None) => (CodecId::None, Payload::Bytes(frame.into())),
                        Err(e) => return fail.set(e),
                    };
                    Prepared {
                        seq,
                        record: Some(PreparedRecord {
                            kind: RecordKind::Data,
                            codec,
                            entry_id: frame_parts.first().map_or(0, |p| p.entry_id),
                            file_offset: 0,
                            raw_len,
                            digest,
                            sealed_digest: None,
                            payload,
                            align: false,
                            parts: frame_parts,
                        }),
                        entry: None,
                    }
                }
                Job::EntryEnd { seq, id, size } => Prepared {
                    seq,
                    record: Some(PreparedRecord {
                        kind: RecordKind::EntryEnd,
                        codec: CodecId::None,
                        entry_id: id,
                        file_offset: size,
                        raw_len: 0,
                        digest: *blake3::hash(&[]).as_bytes(),
                        sealed_digest: None,
                        payload: Payload::Bytes(Bytes::new()),
                        align: false,
                        parts: Vec::new(),
                    }),
                    entry: None,
                },
                Job::Data {
                    seq,
                    id,
                    offset,
                    data,
                    clone,
                } => {
                    if is_all_zero(&data) {
                        Prepared {
                            seq,
                            record: None,
                            entry: None,
                        }
                    } else {
                        let digest = *blake3::hash(&data).as_bytes();
                        let raw_len = data.len() as u32;
                        // Stored in a parent already: the sequencer records a reference, so
                        // the bytes are neither compressed nor kept.
                        let in_parent = parents
                            .as_ref()
                            .is_some_and(|p| p.find(&digest, raw_len).is_some());
                        let encoded = if in_parent {
                            Ok(Some((CodecId::None, Vec::new())))
                        } else {
                            encoder.encode(&data)
                        };
                        let (codec, payload) = match encoded {
                            Ok(Some((codec, stored))) => (codec, Payload::Bytes(stored.into())),
                            Ok(None) => match clone {
                                Some((file, off)) => (
                                    CodecId::None,
                                    Payload::Clone {
                                        file,
                                        offset: off,
                                        bytes: data,
                                    },
                                ),
                                None => (CodecId::None, Payload::Bytes(data)),
                            },
                            Err(e) => return fail.set(e),
                        };
                        let align = codec == CodecId::None && compression.codec == CodecId::None;
                        Prepared {
                            seq,
                            record: Some(PreparedRecord {
                                kind: RecordKind::Data,
                                codec,
                                entry_id: id,
                                file_offset: offset,
                                raw_len,
                                digest,
                                sealed_digest: None,
                                payload,
                                align,
                                parts: Vec::new(),
                            }),
                            entry: None,
                        }
                    }
                }
            };
            let mut prepared = prepared;
            if let Some(record) = prepared
                .record
                .as_mut()
                .filter(|r| r.kind != RecordKind::EntryEnd)
            {
                if let Err(e) = seal_record(key.as_deref(), prepared.seq, record) {
                    return fail.set(e);
                }
            }
            items.push(prepared);
        }
        let finished = PreparedBatch {
            items,
            token: batch.token,
        };
        if done.send(finished).is_err() {
            return;
        }
    }
}

/// True when `data` holds only zero bytes, compared 16 at a time (every chunk of a sparse
/// image passes through here).
fn is_all_zero(data: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128, and align_to keeps the unaligned ends
    // as bytes.
    let (prefix, words, suffix) = unsafe { data.align_to::<u128>() };
    prefix.iter().all(|&b| b == 0)
        && words.iter().all(|&w| w == 0)
        && suffix.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[0u8; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_all_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_all_zero(&v));
    }
}
