//! The sequencer: puts the workers' records back in call order, places each one in a
//! shard, and builds the index's entry and chunk tables as it goes.
//!
//! It is the only thread that decides where bytes go, so the positions it records in the
//! index are exactly where the shard threads will write (each shard thread writes its
//! records in the order received, with the padding chosen here). Records are placed in
//! `seq` order, the order of the caller's calls, and carry their `seq`, so a reader of
//! several shards can merge them back into that order (an entry's Entry record before its
//! Data). Each record goes to the shard with the smallest backlog (placed minus written), which
//! lets a fast shard (a local file) take more than a slow one (a pipe, an upload).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::encode::{PreparedBatch, PreparedRecord};
use super::shard::WriteOp;
use super::{Pipeline, RECORD_FLAG_SHARED_FRAME};
use crate::error::{Error, Result};
use crate::index::{Chunk, Entry};
use crate::layout::{RecordHeader, RecordKind, RECORD_HEADER_LEN};
use crate::parents::ParentChunks;

/// The sequencer's view of one shard.
pub(super) struct ShardState {
    /// Records for the shard's writer thread.
    pub(super) tx: Sender<Vec<WriteOp>>,
    /// Bytes placed in the shard so far: where its next record starts.
    pub(super) assigned: u64,
    /// Bytes its writer thread has written so far.
    pub(super) written: Arc<AtomicU64>,
    pub(super) records: u64,
}

/// What the sequencer hands to the commit: the index tables and where each shard ends.
pub(super) struct SequencerOutput {
    pub(super) entries: Vec<Entry>,
    /// Each entry's chunks, in the order they were placed.
    pub(super) chunks: Vec<Vec<Chunk>>,
    /// Each shard's length so far (its data region's end).
    pub(super) positions: Vec<u64>,
    pub(super) records: Vec<u64>,
}

/// Smallest offset ≥ `pos` that is congruent to `file_offset` modulo `alignment`.
fn aligned_position(pos: u64, file_offset: u64, alignment: u64) -> u64 {
    let want = file_offset % alignment;
    let have = pos % alignment;
    pos + (want + alignment - have) % alignment
}

/// Chunks whose bytes are stored already — in a parent archive, or earlier in this one —
/// by BLAKE3 of their raw bytes: another chunk with the same digest is recorded as a
/// reference to them instead of being written again.
pub(super) struct Dedup {
    parents: Option<Arc<ParentChunks>>,
    own: HashMap<[u8; 32], Chunk>,
}

impl Dedup {
    pub(super) fn new(parents: Option<Arc<ParentChunks>>) -> Self {
        Dedup {
            parents,
            own: HashMap::new(),
        }
    }

    /// The stored chunk with these raw bytes, if any (`own` holds no shared-frame
    /// parts: only single-chunk records enter it).
    fn find(&self, rec: &PreparedRecord) -> Option<&Chunk> {
        self.own
            .get(&rec.digest)
            .filter(|c| c.raw_len == rec.raw_len)
            .or_else(|| self.parents.as_ref()?.find(&rec.digest, rec.raw_len))
    }
}

/// Runs until the workers are done or a thread failed; `None` after a failure (the error
/// is in the pipeline's fail flag) or when a shard thread has gone.
pub(super) fn sequencer_thread(
    done: Receiver<PreparedBatch>,
    mut shards: Vec<ShardState>,
    pipeline: Pipeline,
    alignment: u64,
    mut dedup: Option<Dedup>,
) -> Option<SequencerOutput> {
    let mut pending: BTreeMap<u64, PreparedBatch> = BTreeMap::new();
    let mut next = 0u64;
    let mut entries: Vec<Entry> = Vec::new();
    let mut chunks: Vec<Vec<Chunk>> = Vec::new();
    let mut ops: Vec<Vec<WriteOp>> = shards.iter().map(|_| Vec::new()).collect();
    for batch in done {
        let Some(first) = batch.items.first().map(|p| p.seq) else {
            continue;
        };
        pending.insert(first, batch);
        while let Some(batch) = pending.remove(&next) {
            for p in batch.items {
                next = p.seq + 1;
                if let Some(entry) = p.entry {
                    entries.push(*entry);
                    chunks.push(Vec::new());
                }
                // A hole: nothing to write.
                let Some(rec) = p.record else { continue };
                let stored_before = (rec.kind == RecordKind::Data && rec.parts.is_empty())
                    .then(|| dedup.as_ref()?.find(&rec).cloned())
                    .flatten();
                if let Some(stored) = stored_before {
                    match chunks.get_mut(rec.entry_id as usize) {
                        Some(list) => list.push(Chunk {
                            file_offset: rec.file_offset,
                            ..stored
                        }),
                        None => {
                            pipeline.fail.set(Error::Usage(format!(
                                "data for unknown entry {}",
                                rec.entry_id
                            )));
                            return None;
                        }
                    }
                    continue;
                }
                let target = least_backlog(&shards);
                let shard = &mut shards[target];
                let header_end = shard.assigned + RECORD_HEADER_LEN as u64;
                let payload_start = if rec.align && rec.raw_len as u64 >= alignment {
                    aligned_position(header_end, rec.file_offset, alignment)
                } else {
                    header_end
                };
                let pad = (payload_start - header_end) as u32;
                let stored_len = rec.payload.len() as u32;
                let header = RecordHeader {
                    kind: rec.kind,
                    codec: rec.codec,
                    flags: if rec.parts.is_empty() {
                        0
                    } else {
                        RECORD_FLAG_SHARED_FRAME
                    },
                    seq: p.seq,
                    entry_id: rec.entry_id,
                    file_offset: rec.file_offset,
                    raw_len: rec.raw_len,
                    stored_len,
                    pad,
                    digest: rec.sealed_digest.unwrap_or(rec.digest),
                };
                let placed = Placed {
                    shard: target as u32,
                    offset: payload_start,
                    stored_len,
                };
                if let Err(e) = index_record(
                    &mut entries,
                    &mut chunks,
                    &rec,
                    &placed,
                    p.seq,
                    pipeline.sealed,
                ) {
                    pipeline.fail.set(e);
                    return None;
                }
                if let (Some(d), RecordKind::Data, true) =
                    (dedup.as_mut(), rec.kind, rec.parts.is_empty())
                {
                    if let Some(c) = chunks.get(rec.entry_id as usize).and_then(|l| l.last()) {
                        d.own.entry(rec.digest).or_insert_with(|| c.clone());
                    }
                }
                shard.assigned = payload_start + stored_len as u64;
                shard.records += 1;
                ops[target].push(WriteOp {
                    header: header.encode(),
                    pad,
                    payload: rec.payload,
                    _token: batch.token.clone(),
                });
            }
            for (shard, ops) in shards.iter().zip(ops.iter_mut()) {
                if !ops.is_empty() && shard.tx.send(std::mem::take(ops)).is_err() {
                    return None;
                }
            }
        }
        if pipeline.fail.is_set() {
            return None;
        }
    }
    if pipeline.fail.is_set() {
        return None;
    }
    Some(SequencerOutput {
        entries,
        chunks,
        positions: shards.iter().map(|s| s.assigned).collect(),
        records: shards.iter().map(|s| s.records).collect(),
    })
}

/// The shard with the fewest bytes placed but not yet written.
fn least_backlog(shards: &[ShardState]) -> usize {
    (0..shards.len())
        .min_by_key(|&i| {
            shards[i].assigned
                - shards[i]
                    .written
                    .load(Ordering::Relaxed)
                    .min(shards[i].assigned)
        })
        .unwrap_or(0)
}

/// Where a record's payload was placed.
struct Placed {
    shard: u32,
    offset: u64,
    stored_len: u32,
}

/// Adds what a record means for the index: a chunk for each file whose data it holds,
/// or a streamed entry's final size.
fn index_record(
    entries: &mut [Entry],
    chunks: &mut [Vec<Chunk>],
    rec: &PreparedRecord,
    at: &Placed,
    seq: u64,
    sealed: bool,
) -> Result<()> {
    // A sealed payload's nonce is its record's sequence number: the reader needs it.
    let seq = if sealed { seq } else { 0 };
    let unknown = |id: u64| Error::Usage(format!("data for unknown entry {id}"));
    match rec.kind {
        RecordKind::Data if !rec.parts.is_empty() => {
            for part in &rec.parts {
                let list = chunks
                    .get_mut(part.entry_id as usize)
                    .ok_or_else(|| unknown(part.entry_id))?;
                list.push(Chunk {
                    file_offset: 0,
                    raw_len: part.len,
                    stored_len: at.stored_len,
                    shard: at.shard,
                    offset: at.offset,
                    codec: rec.codec as u32,
                    digest: part.digest.to_vec(),
                    archive: 0,
                    frame_raw_len: rec.raw_len,
                    frame_offset: part.offset,
                    seq,
                });
            }
        }
        RecordKind::Data => {
            let list = chunks
                .get_mut(rec.entry_id as usize)
                .ok_or_else(|| unknown(rec.entry_id))?;
            list.push(Chunk {
                file_offset: rec.file_offset,
                raw_len: rec.raw_len,
                stored_len: at.stored_len,
                shard: at.shard,
                offset: at.offset,
                codec: rec.codec as u32,
                digest: rec.digest.to_vec(),
                archive: 0,
                frame_raw_len: 0,
                frame_offset: 0,
                seq,
            });
        }
        RecordKind::EntryEnd => {
            if let Some(e) = entries.get_mut(rec.entry_id as usize) {
                e.size = rec.file_offset;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_math() {
        assert_eq!(aligned_position(4096 + 96, 0, 4096), 8192);
        assert_eq!(aligned_position(8192, 0, 4096), 8192);
        assert_eq!(aligned_position(8200, 4096 * 3 + 10, 4096), 8202);
        assert_eq!(aligned_position(8203, 10, 4096), 12298);
    }
}
