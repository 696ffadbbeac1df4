//! The shard threads: one per sink, writing records exactly as the sequencer placed them.
//!
//! A shard thread never decides anything about layout: it writes each record's header, its
//! padding and its payload, in the order received, so the shard's bytes land at the
//! offsets the index records. The only choice left to it is how: a payload that may be
//! cloned is offered to the sink as a reflink first and written only if the sink cannot
//! clone it. What it has written is published in `written` (for the sequencer's backlog)
//! and the job's token is handed back only once its bytes are in the sink.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Receiver;

use super::encode::Payload;
use super::{BatchToken, Pipeline, ShardSink};
use crate::error::Error;
use crate::layout::RECORD_HEADER_LEN;

/// A shard sink handed back by its writer thread with the bytes it wrote.
pub(super) type FinishedShard = (Box<dyn ShardSink>, u64);

/// One record, placed: header, then `pad` zero bytes, then the payload.
pub(super) struct WriteOp {
    pub(super) header: [u8; RECORD_HEADER_LEN],
    pub(super) pad: u32,
    pub(super) payload: Payload,
    /// Its batch's token: dropped with the op, once its bytes are written.
    pub(super) _token: Arc<BatchToken>,
}

/// Up to 64 KiB of zeros, for padding.
fn zero_pad(n: usize) -> &'static [u8] {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    &ZEROS[..n.min(ZEROS.len())]
}

/// One shard's writer.
pub(super) struct ShardThread {
    pub(super) sink: Box<dyn ShardSink>,
    /// Bytes written to this shard so far, header included.
    pub(super) written: Arc<AtomicU64>,
    pub(super) pipeline: Pipeline,
}

impl ShardThread {
    /// Writes every record of `ops` until the sequencer closes it; returns the sink and
    /// its length, or `None` after a failure (this thread's or another's: the error is in
    /// the pipeline's fail flag).
    pub(super) fn run(mut self, batches: Receiver<Vec<WriteOp>>) -> Option<FinishedShard> {
        for op in batches.into_iter().flatten() {
            if self.pipeline.fail.is_set() {
                return None;
            }
            match self.write_record(&op) {
                Ok(n) => {
                    self.written.fetch_add(n, Ordering::Relaxed);
                    self.pipeline
                        .stats
                        .written_bytes
                        .fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    self.pipeline
                        .fail
                        .set(Error::io(format!("writing {}", self.sink.describe()), e));
                    return None;
                }
            }
        }
        let pos = self.written.load(Ordering::Relaxed);
        Some((self.sink, pos))
    }

    /// Writes one record; returns its length in the shard.
    fn write_record(&mut self, op: &WriteOp) -> io::Result<u64> {
        let sink = &mut self.sink;
        sink.write_all(&op.header)?;
        let mut left = op.pad as usize;
        while left > 0 {
            let z = zero_pad(left);
            sink.write_all(z)?;
            left -= z.len();
        }
        let n = op.payload.len();
        match &op.payload {
            Payload::Bytes(b) => sink.write_all(b)?,
            Payload::Clone {
                file,
                offset,
                bytes,
            } => {
                if sink.clone_from(file, *offset, bytes.len() as u64)? {
                    self.pipeline
                        .stats
                        .cloned_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                } else {
                    sink.write_all(bytes)?;
                }
            }
        }
        Ok((RECORD_HEADER_LEN + op.pad as usize + n) as u64)
    }
}
