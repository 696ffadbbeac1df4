//! Single-pass archive writer with parallel chunk encoding and load-balanced shards.
//!
//! Data flows one way: the caller adds entries and chunks (in its own thread) →
//! worker threads hash and compress → a sequencer restores the order and assigns
//! each record to the shard with the smallest backlog → one writer thread per
//! shard writes (or clones) the bytes. The footer, the commit record, is written
//! by [`ArchiveWriter::finish`] only after every shard has been written out.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use prost::Message;

use crate::codec::{CodecId, Compression, Encoder};
use crate::error::{Error, Result};
use crate::index::{Chunk, Entry, Index, MetaItem};
use crate::layout::{
    optional, Footer, IndexLocation, RecordHeader, RecordKind, ShardHeader, FOOTER_LEN,
    HASH_BLAKE3, HEADER_LEN, MAX_CHUNK_RAW, RECORD_HEADER_LEN,
};

/// Where a shard's bytes go: a file, a pipe, an object upload.
///
/// Implementations live in `ckstream-store`; this crate only calls these methods.
pub trait ShardSink: Send {
    /// Appends `buf`.
    ///
    /// # Errors
    /// Any I/O error; the archive is then abandoned uncommitted.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;

    /// Appends `len` bytes of `src` starting at `src_offset` by sharing extents
    /// (reflink) when the sink can. Returns `Ok(false)` when it cannot, and the
    /// writer then writes the bytes itself. (A sink that finds out on this call that
    /// it can only copy in the kernel may still place these bytes and return `Ok(true)`
    /// once, then `Ok(false)` from then on.)
    ///
    /// # Errors
    /// An I/O error other than "not supported here".
    fn clone_from(&mut self, _src: &File, _src_offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Makes everything written so far durable (fsync for files; no-op for pipes).
    ///
    /// # Errors
    /// The I/O error of the flush.
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// A name for messages ("ckpt.cka.1", "stdout").
    fn describe(&self) -> String;
}

/// How the writer encodes and lays out data.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub compression: Compression,
    /// Nominal chunk size; callers pass chunks of at most this many bytes.
    pub chunk_size: u32,
    /// Worker threads for hashing and compression.
    pub threads: usize,
    /// log2 of the payload alignment (12 = 4096).
    pub alignment_log2: u8,
    /// Set [`required::ID_NAMED_SHARDS`](crate::layout::required::ID_NAMED_SHARDS): the
    /// store names shards 1.. by the archive id. Only meaningful with several shards.
    pub id_named_shards: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            compression: Compression::default(),
            chunk_size: 1 << 20,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            alignment_log2: 12,
            id_named_shards: false,
        }
    }
}

/// Counters the caller can read while the writer runs (progress bars).
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Raw bytes handed to the writer (holes excluded).
    pub raw_bytes: AtomicU64,
    /// Bytes written to all shards.
    pub written_bytes: AtomicU64,
    /// Raw bytes that were shared with the source by reflink instead of copied.
    pub cloned_bytes: AtomicU64,
}

/// What [`ArchiveWriter::finish`] reports.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    pub archive_id: [u8; 16],
    pub entries: usize,
    pub chunks: usize,
    /// Logical bytes of all file entries (holes included).
    pub logical_bytes: u64,
    /// Raw bytes stored in chunks (holes and all-zero chunks excluded).
    pub raw_bytes: u64,
    /// Stored payload bytes of all chunks.
    pub stored_bytes: u64,
    /// Bytes cloned by reflink rather than copied.
    pub cloned_bytes: u64,
    /// Size of each shard including header, index and footer.
    pub shard_sizes: Vec<u64>,
    /// Stored size of the index.
    pub index_bytes: u64,
}

/// A shard sink handed back by its writer thread with the bytes it wrote.
type FinishedShard = (Box<dyn ShardSink>, u64);

/// A chunk's optional reflink source: the file and the offset of the chunk in it.
pub type CloneFrom = Option<(Arc<File>, u64)>;

/// Identifies an entry added to a writer.
pub type EntryId = u64;

enum Job {
    /// Several small files' contents compressed as one frame.
    Bundle {
        seq: u64,
        parts: Vec<(EntryId, Vec<u8>)>,
    },
    Entry {
        seq: u64,
        id: EntryId,
        entry: Box<Entry>,
    },
    Data {
        seq: u64,
        id: EntryId,
        offset: u64,
        data: Vec<u8>,
        clone: CloneFrom,
    },
    EntryEnd {
        seq: u64,
        id: EntryId,
        size: u64,
    },
}

enum Payload {
    Bytes(Vec<u8>),
    /// Raw bytes that may be cloned from `file` at `offset`; `bytes` is the fallback.
    Clone {
        file: Arc<File>,
        offset: u64,
        bytes: Vec<u8>,
    },
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) | Payload::Clone { bytes: b, .. } => b.len(),
        }
    }
}

struct Prepared {
    seq: u64,
    /// `None` for an all-zero chunk, stored as a hole.
    record: Option<PreparedRecord>,
    entry: Option<Box<Entry>>,
}

struct PreparedRecord {
    kind: RecordKind,
    codec: CodecId,
    entry_id: EntryId,
    file_offset: u64,
    raw_len: u32,
    digest: [u8; 32],
    payload: Payload,
    align: bool,
    /// For a shared frame: the entries whose content it holds.
    parts: Vec<FramePart>,
}

/// One small file's place inside a shared frame.
struct FramePart {
    entry_id: EntryId,
    offset: u32,
    len: u32,
    digest: [u8; 32],
}

pub use crate::layout::RECORD_FLAG_SHARED_FRAME;

enum WriteOp {
    Record {
        header: [u8; RECORD_HEADER_LEN],
        pad: u32,
        payload: Payload,
    },
}

struct ShardState {
    tx: Sender<WriteOp>,
    assigned: u64,
    written: Arc<AtomicU64>,
    records: u64,
}

struct SequencerOutput {
    entries: Vec<Entry>,
    chunks: Vec<Vec<Chunk>>,
    positions: Vec<u64>,
    records: Vec<u64>,
}

/// Shared first-error slot: the first failing thread records why, everyone stops.
#[derive(Default)]
struct FailFlag {
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl FailFlag {
    fn set(&self, e: Error) {
        let mut slot = self.error.lock().unwrap();
        if slot.is_none() {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
    }
    fn is_set(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
    fn take(&self) -> Error {
        self.error
            .lock()
            .unwrap()
            .take()
            .unwrap_or_else(|| Error::Usage("archive writer stopped after an earlier error".into()))
    }
}

/// Writes one archive to 1..N shard sinks.
pub struct ArchiveWriter {
    header: ShardHeader,
    opts: WriterOptions,
    job_tx: Option<Sender<Job>>,
    token_tx: Sender<()>,
    workers: Vec<JoinHandle<()>>,
    sequencer: Option<JoinHandle<Option<SequencerOutput>>>,
    shard_threads: Vec<JoinHandle<Option<FinishedShard>>>,
    /// Direct lines to the shard threads, for sync barriers (dropped before joining).
    shard_txs: Vec<Sender<WriteOp>>,
    fail: Arc<FailFlag>,
    stats: Arc<WriterStats>,
    next_seq: u64,
    next_entry: EntryId,
    meta: Vec<MetaItem>,
    /// Paths to record in the index's hot list, resolved to entry ids by `finish`.
    hot_paths: Vec<Vec<u8>>,
}

fn zero_pad(n: usize) -> &'static [u8] {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    &ZEROS[..n.min(ZEROS.len())]
}

impl ArchiveWriter {
    /// Starts an archive over `sinks` (shard 0 first) and writes every shard header.
    ///
    /// # Errors
    /// [`Error::Usage`] for bad options, [`Error::Io`] when a header cannot be written.
    pub fn new(
        sinks: Vec<Box<dyn ShardSink>>,
        opts: WriterOptions,
        archive_id: [u8; 16],
        created_unix_ns: u64,
    ) -> Result<Self> {
        if sinks.is_empty() || sinks.len() > crate::layout::MAX_SHARDS as usize {
            return Err(Error::Usage(format!(
                "shard count {} out of range",
                sinks.len()
            )));
        }
        if opts.chunk_size == 0 || opts.chunk_size > MAX_CHUNK_RAW {
            return Err(Error::Usage(format!(
                "chunk size {} out of range",
                opts.chunk_size
            )));
        }
        let shard_count = sinks.len() as u32;
        let mut optional_features = optional::INLINE_ENTRIES;
        if opts.compression.codec == CodecId::None {
            optional_features |= optional::ALIGNED_RAW;
        }
        let header = ShardHeader {
            alignment_log2: opts.alignment_log2,
            hash_algo: HASH_BLAKE3,
            required_features: if opts.id_named_shards && shard_count > 1 {
                crate::layout::required::ID_NAMED_SHARDS
            } else {
                0
            },
            optional_features,
            archive_id,
            shard_index: 0,
            shard_count,
            created_unix_ns,
        };
        let fail = Arc::new(FailFlag::default());
        let stats = Arc::new(WriterStats::default());
        let threads = opts.threads.max(1);
        let inflight = threads * 4 + sinks.len() * 4;
        let (token_tx, token_rx) = bounded::<()>(inflight);

        let mut shard_states = Vec::new();
        let mut shard_threads = Vec::new();
        let mut shard_txs = Vec::new();
        for (i, mut sink) in sinks.into_iter().enumerate() {
            let h = ShardHeader {
                shard_index: i as u32,
                ..header.clone()
            };
            sink.write_all(&h.encode())
                .map_err(|e| Error::io(format!("writing header of {}", sink.describe()), e))?;
            let (tx, rx) = bounded::<WriteOp>(8);
            let written = Arc::new(AtomicU64::new(HEADER_LEN as u64));
            let thread = {
                let written = written.clone();
                let fail = fail.clone();
                let stats = stats.clone();
                let token_rx = token_rx.clone();
                std::thread::Builder::new()
                    .name(format!("cka-shard-{i}"))
                    .spawn(move || shard_thread(sink, rx, written, fail, stats, token_rx))
                    .map_err(|e| Error::io("spawning shard thread", e))?
            };
            shard_txs.push(tx.clone());
            shard_states.push(ShardState {
                tx,
                assigned: HEADER_LEN as u64,
                written,
                records: 0,
            });
            shard_threads.push(thread);
        }
        stats
            .written_bytes
            .store(HEADER_LEN as u64 * shard_count as u64, Ordering::Relaxed);

        let (job_tx, job_rx) = bounded::<Job>(threads * 2);
        let (done_tx, done_rx) = bounded::<Prepared>(inflight + threads * 2);
        let mut workers = Vec::new();
        for i in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let fail = fail.clone();
            let compression = opts.compression;
            workers.push(
                std::thread::Builder::new()
                    .name(format!("cka-encode-{i}"))
                    .spawn(move || encode_worker(job_rx, done_tx, fail, compression))
                    .map_err(|e| Error::io("spawning encoder thread", e))?,
            );
        }
        drop(done_tx);
        let alignment = 1u64 << opts.alignment_log2;
        let sequencer = {
            let fail = fail.clone();
            let token_rx = token_rx.clone();
            std::thread::Builder::new()
                .name("cka-sequencer".into())
                .spawn(move || sequencer_thread(done_rx, shard_states, fail, token_rx, alignment))
                .map_err(|e| Error::io("spawning sequencer thread", e))?
        };
        Ok(ArchiveWriter {
            header,
            opts,
            job_tx: Some(job_tx),
            token_tx,
            workers,
            sequencer: Some(sequencer),
            shard_threads,
            shard_txs,
            fail,
            stats,
            next_seq: 0,
            next_entry: 0,
            meta: Vec::new(),
            hot_paths: Vec::new(),
        })
    }

    /// Live counters for progress reporting.
    pub fn stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    /// The options this writer runs with.
    pub fn options(&self) -> &WriterOptions {
        &self.opts
    }

    /// Adds a key/value pair to the index metadata.
    pub fn add_meta(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.meta.push(MetaItem {
            key: key.into(),
            value: value.into(),
        });
    }

    /// Records `paths` (archive paths, in the order given) as the index's hot list: what
    /// a lazy reader such as `ckstream mount` fetches before anyone asks. Every path must
    /// name an entry by the time [`finish`](Self::finish) runs.
    pub fn set_hot_paths(&mut self, paths: Vec<Vec<u8>>) {
        self.hot_paths = paths;
    }

    fn submit(&mut self, job: Job) -> Result<()> {
        if self.job_tx.is_none() {
            return Err(Error::Usage("the archive was already committed".into()));
        }
        // One token per job bounds the bytes in flight between caller and shards.
        loop {
            if self.fail.is_set() {
                return Err(self.fail.take());
            }
            match self.token_tx.send_timeout((), Duration::from_millis(100)) {
                Ok(()) => break,
                Err(crossbeam_channel::SendTimeoutError::Timeout(())) => continue,
                Err(crossbeam_channel::SendTimeoutError::Disconnected(())) => {
                    return Err(self.fail.take())
                }
            }
        }
        let tx = self
            .job_tx
            .as_ref()
            .ok_or_else(|| Error::Usage("writer already finished".into()))?;
        if tx.send(job).is_err() {
            return Err(self.fail.take());
        }
        Ok(())
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Adds an entry's metadata (the `first_chunk`/`chunk_count` fields are filled in
    /// by the writer). For a file, follow with [`add_data`](Self::add_data) calls.
    ///
    /// # Errors
    /// [`Error::UnsafeEntry`] for a path that fails [`crate::index::validate_path`];
    /// the error of a failed worker or shard.
    pub fn add_entry(&mut self, entry: Entry) -> Result<EntryId> {
        crate::index::validate_path(&entry.path)?;
        let id = self.next_entry;
        self.next_entry += 1;
        let seq = self.seq();
        self.submit(Job::Entry {
            seq,
            id,
            entry: Box::new(entry),
        })?;
        Ok(id)
    }

    /// Adds `data` (at most `chunk_size` bytes) at `offset` of entry `id`. All-zero
    /// chunks become holes. With `clone`, uncompressed data may be shared with the
    /// source by reflink.
    ///
    /// # Errors
    /// [`Error::Usage`] for an oversized chunk; the error of a failed worker or shard.
    pub fn add_data(
        &mut self,
        id: EntryId,
        offset: u64,
        data: Vec<u8>,
        clone: CloneFrom,
    ) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if data.len() > self.opts.chunk_size as usize {
            return Err(Error::Usage(format!(
                "chunk of {} bytes exceeds the chunk size",
                data.len()
            )));
        }
        if id >= self.next_entry {
            return Err(Error::Usage(format!("unknown entry id {id}")));
        }
        self.stats
            .raw_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let seq = self.seq();
        self.submit(Job::Data {
            seq,
            id,
            offset,
            data,
            clone,
        })
    }

    /// Stores the whole contents of several small files as one compressed frame (better
    /// ratio than one frame per file; each file keeps its own digest). The parts must
    /// add up to at most the chunk size; empty parts are ignored.
    ///
    /// # Errors
    /// [`Error::Usage`] for an oversized bundle or unknown entry; pipeline errors.
    pub fn add_bundle(&mut self, parts: Vec<(EntryId, Vec<u8>)>) -> Result<()> {
        let parts: Vec<_> = parts.into_iter().filter(|(_, d)| !d.is_empty()).collect();
        if parts.is_empty() {
            return Ok(());
        }
        let total: usize = parts.iter().map(|(_, d)| d.len()).sum();
        if total > self.opts.chunk_size as usize {
            return Err(Error::Usage(format!(
                "bundle of {total} bytes exceeds the chunk size"
            )));
        }
        if let Some((id, _)) = parts.iter().find(|(id, _)| *id >= self.next_entry) {
            return Err(Error::Usage(format!("unknown entry id {id}")));
        }
        self.stats
            .raw_bytes
            .fetch_add(total as u64, Ordering::Relaxed);
        let seq = self.seq();
        self.submit(Job::Bundle { seq, parts })
    }

    /// Records the final size of a streamed entry (one added with `entry_flags::STREAMED`).
    ///
    /// # Errors
    /// The error of a failed worker or shard.
    pub fn end_entry(&mut self, id: EntryId, size: u64) -> Result<()> {
        let seq = self.seq();
        self.submit(Job::EntryEnd { seq, id, size })
    }

    fn join_pipeline(&mut self) -> Result<(SequencerOutput, Vec<FinishedShard>)> {
        self.job_tx = None;
        self.shard_txs.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let out = self.sequencer.take().and_then(|s| s.join().ok().flatten());
        let mut sinks = Vec::new();
        for t in self.shard_threads.drain(..) {
            if let Ok(Some(s)) = t.join() {
                sinks.push(s);
            }
        }
        if self.fail.is_set() {
            return Err(self.fail.take());
        }
        let out = out.ok_or_else(|| Error::Usage("archive writer thread panicked".into()))?;
        if sinks.len() != out.positions.len() {
            return Err(Error::Usage("archive shard thread panicked".into()));
        }
        Ok((out, sinks))
    }

    /// Waits for all data, writes the index to shard 0 and commits every shard with
    /// its footer (shard 0 last, so the archive reads as complete only when all is).
    ///
    /// # Errors
    /// Any error from the pipeline or sinks; [`Error::Usage`] for a hot-list path that
    /// names no entry. The archive then stays uncommitted.
    pub fn finish(mut self) -> Result<WriteSummary> {
        self.commit()
    }

    /// [`finish`](Self::finish) through a mutable borrow, for a caller that must commit
    /// while the writer is lent to someone else (`ckstream dump` commits inside CRIU's
    /// post-dump hook). Afterwards the writer accepts nothing more: adding fails with
    /// [`Error::Usage`], a second commit too.
    ///
    /// # Errors
    /// As [`finish`](Self::finish).
    pub fn commit(&mut self) -> Result<WriteSummary> {
        if self.job_tx.is_none() {
            return Err(Error::Usage("the archive was already committed".into()));
        }
        let (out, mut sinks) = self.join_pipeline()?;
        let SequencerOutput {
            mut entries,
            chunks: per_entry,
            positions,
            records,
        } = out;
        let mut chunks = Vec::new();
        let mut logical = 0u64;
        let mut raw = 0u64;
        let mut stored = 0u64;
        for (e, mut list) in entries.iter_mut().zip(per_entry) {
            list.sort_by_key(|c| c.file_offset);
            e.first_chunk = chunks.len() as u64;
            e.chunk_count = list.len() as u64;
            if e.entry_kind() == crate::index::EntryKind::File {
                logical += e.size;
            }
            for c in &list {
                raw += c.raw_len as u64;
                stored += c.stored_len as u64;
            }
            chunks.extend(list);
        }
        let hot_list = if self.hot_paths.is_empty() {
            Vec::new()
        } else {
            let by_path: std::collections::HashMap<&[u8], u64> = entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.path.as_slice(), i as u64))
                .collect();
            self.hot_paths
                .iter()
                .map(|p| {
                    by_path.get(p.as_slice()).copied().ok_or_else(|| {
                        Error::Usage(format!(
                            "hot-list path {:?} is not in the archive",
                            String::from_utf8_lossy(p)
                        ))
                    })
                })
                .collect::<Result<Vec<u64>>>()?
        };
        let index = Index {
            entries,
            chunks,
            parents: Vec::new(),
            meta: std::mem::take(&mut self.meta),
            chunk_size: self.opts.chunk_size,
            hot_list,
            // Shards 1.. get no more than their footer after this point.
            shard_bytes: positions
                .iter()
                .enumerate()
                .map(|(i, &pos)| if i == 0 { 0 } else { pos + FOOTER_LEN as u64 })
                .collect(),
        };
        index.validate(self.header.shard_count)?;
        let index_raw = index.encode_to_vec();
        let index_digest = *blake3::hash(&index_raw).as_bytes();
        let index_stored =
            zstd::bulk::compress(&index_raw, 3).map_err(|e| Error::io("compressing index", e))?;

        let summary_entries = index.entries.len();
        let summary_chunks = index.chunks.len();
        // Every shard gets its footer (shard 0 the index first) and is synced once, all
        // shards at the same time: the footer becomes durable with the data it vouches
        // for, and a local archive is renamed into place only after every sync returned
        // (ckstream-store), so a torn shard is never visible under the archive's name.
        let index_header = RecordHeader {
            kind: RecordKind::Index,
            codec: CodecId::Zstd,
            flags: 0,
            seq: self.next_seq,
            entry_id: 0,
            file_offset: 0,
            raw_len: u32::try_from(index_raw.len())
                .map_err(|_| Error::Usage("index too large".into()))?,
            stored_len: index_stored.len() as u32,
            pad: 0,
            digest: index_digest,
        };
        let mut tails = Vec::with_capacity(sinks.len());
        for (i, &position) in positions.iter().enumerate() {
            let mut bytes = Vec::new();
            let mut pos = position;
            let mut index_loc = None;
            let mut nrec = records[i];
            if i == 0 {
                bytes.extend_from_slice(&index_header.encode());
                bytes.extend_from_slice(&index_stored);
                index_loc = Some(IndexLocation {
                    offset: pos + RECORD_HEADER_LEN as u64,
                    stored_len: index_stored.len() as u64,
                    raw_len: index_raw.len() as u64,
                });
                pos += index_header.record_len();
                nrec += 1;
            }
            let footer = Footer {
                archive_id: self.header.archive_id,
                shard_index: i as u32,
                shard_count: self.header.shard_count,
                index: index_loc,
                index_digest,
                data_end: pos,
                record_count: nrec,
            };
            bytes.extend_from_slice(&footer.encode());
            tails.push((bytes, pos + FOOTER_LEN as u64));
        }
        std::thread::scope(|scope| {
            let running: Vec<_> = sinks
                .iter_mut()
                .zip(&tails)
                .map(|((sink, _), (bytes, _))| {
                    scope.spawn(move || {
                        sink.write_all(bytes)
                            .and_then(|()| sink.sync())
                            .map_err(|e| Error::io(format!("committing {}", sink.describe()), e))
                    })
                })
                .collect();
            running
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(Error::Usage("commit thread panicked".into())))
                })
                .collect::<Result<Vec<()>>>()
        })?;
        let shard_sizes: Vec<u64> = tails.iter().map(|(_, size)| *size).collect();
        Ok(WriteSummary {
            archive_id: self.header.archive_id,
            entries: summary_entries,
            chunks: summary_chunks,
            logical_bytes: logical,
            raw_bytes: raw,
            stored_bytes: stored,
            cloned_bytes: self.stats.cloned_bytes.load(Ordering::Relaxed),
            shard_sizes,
            index_bytes: index_stored.len() as u64,
        })
    }

    /// Stops without committing: the shards keep what was written but no footer,
    /// so every reader refuses them.
    pub fn abort(mut self) {
        self.fail.set(Error::Usage("aborted".into()));
        let _ = self.join_pipeline();
    }
}

impl Drop for ArchiveWriter {
    fn drop(&mut self) {
        if self.sequencer.is_some() {
            self.fail
                .set(Error::Usage("archive writer dropped before finish".into()));
            let _ = self.join_pipeline();
        }
    }
}

fn encode_worker(
    jobs: Receiver<Job>,
    done: Sender<Prepared>,
    fail: Arc<FailFlag>,
    compression: Compression,
) {
    let mut encoder = match Encoder::new(compression) {
        Ok(e) => e,
        Err(e) => return fail.set(e),
    };
    for job in jobs {
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
                        payload: Payload::Bytes(bytes),
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
                    Ok(Some((codec, stored))) => (codec, Payload::Bytes(stored)),
                    Ok(None) => (CodecId::None, Payload::Bytes(frame)),
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
                    payload: Payload::Bytes(Vec::new()),
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
                    let (codec, payload) = match encoder.encode(&data) {
                        Ok(Some((codec, stored))) => (codec, Payload::Bytes(stored)),
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
                            payload,
                            align,
                            parts: Vec::new(),
                        }),
                        entry: None,
                    }
                }
            }
        };
        if done.send(prepared).is_err() {
            return;
        }
    }
}

fn is_all_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = unsafe { data.align_to::<u128>() };
    prefix.iter().all(|&b| b == 0)
        && words.iter().all(|&w| w == 0)
        && suffix.iter().all(|&b| b == 0)
}

/// Smallest offset ≥ `pos` that is congruent to `file_offset` modulo `alignment`.
pub(crate) fn aligned_position(pos: u64, file_offset: u64, alignment: u64) -> u64 {
    let want = file_offset % alignment;
    let have = pos % alignment;
    pos + (want + alignment - have) % alignment
}

fn sequencer_thread(
    done: Receiver<Prepared>,
    mut shards: Vec<ShardState>,
    fail: Arc<FailFlag>,
    token_rx: Receiver<()>,
    alignment: u64,
) -> Option<SequencerOutput> {
    let mut pending: BTreeMap<u64, Prepared> = BTreeMap::new();
    let mut next = 0u64;
    let mut entries: Vec<Entry> = Vec::new();
    let mut chunks: Vec<Vec<Chunk>> = Vec::new();
    for p in done {
        pending.insert(p.seq, p);
        while let Some(p) = pending.remove(&next) {
            next += 1;
            if let Some(entry) = p.entry {
                entries.push(*entry);
                chunks.push(Vec::new());
            }
            let Some(rec) = p.record else {
                let _ = token_rx.try_recv();
                continue;
            };
            // Least backlog wins: a slow shard (pipe, upload) gets fewer records.
            let target = (0..shards.len())
                .min_by_key(|&i| {
                    shards[i].assigned
                        - shards[i]
                            .written
                            .load(Ordering::Relaxed)
                            .min(shards[i].assigned)
                })
                .unwrap_or(0);
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
                digest: rec.digest,
            };
            match rec.kind {
                RecordKind::Data if !rec.parts.is_empty() => {
                    for part in &rec.parts {
                        let Some(list) = chunks.get_mut(part.entry_id as usize) else {
                            fail.set(Error::Usage(format!(
                                "data for unknown entry {}",
                                part.entry_id
                            )));
                            return None;
                        };
                        list.push(Chunk {
                            file_offset: 0,
                            raw_len: part.len,
                            stored_len,
                            shard: target as u32,
                            offset: payload_start,
                            codec: rec.codec as u32,
                            digest: part.digest.to_vec(),
                            archive: 0,
                            frame_raw_len: rec.raw_len,
                            frame_offset: part.offset,
                        });
                    }
                }
                RecordKind::Data => {
                    let list = match chunks.get_mut(rec.entry_id as usize) {
                        Some(l) => l,
                        None => {
                            fail.set(Error::Usage(format!(
                                "data for unknown entry {}",
                                rec.entry_id
                            )));
                            return None;
                        }
                    };
                    list.push(Chunk {
                        file_offset: rec.file_offset,
                        raw_len: rec.raw_len,
                        stored_len,
                        shard: target as u32,
                        offset: payload_start,
                        codec: rec.codec as u32,
                        digest: rec.digest.to_vec(),
                        archive: 0,
                        frame_raw_len: 0,
                        frame_offset: 0,
                    });
                }
                RecordKind::EntryEnd => {
                    if let Some(e) = entries.get_mut(rec.entry_id as usize) {
                        e.size = rec.file_offset;
                    }
                }
                _ => {}
            }
            shard.assigned = payload_start + stored_len as u64;
            shard.records += 1;
            let op = WriteOp::Record {
                header: header.encode(),
                pad,
                payload: rec.payload,
            };
            if shard.tx.send(op).is_err() {
                return None;
            }
        }
        if fail.is_set() {
            return None;
        }
    }
    if fail.is_set() {
        return None;
    }
    Some(SequencerOutput {
        entries,
        chunks,
        positions: shards.iter().map(|s| s.assigned).collect(),
        records: shards.iter().map(|s| s.records).collect(),
    })
}

fn shard_thread(
    mut sink: Box<dyn ShardSink>,
    ops: Receiver<WriteOp>,
    written: Arc<AtomicU64>,
    fail: Arc<FailFlag>,
    stats: Arc<WriterStats>,
    token_rx: Receiver<()>,
) -> Option<FinishedShard> {
    for op in ops {
        if fail.is_set() {
            return None;
        }
        let (header, pad, payload) = match op {
            WriteOp::Record {
                header,
                pad,
                payload,
            } => (header, pad, payload),
        };
        let result = (|| -> io::Result<u64> {
            sink.write_all(&header)?;
            let mut left = pad as usize;
            while left > 0 {
                let z = zero_pad(left);
                sink.write_all(z)?;
                left -= z.len();
            }
            let n = match &payload {
                Payload::Bytes(b) => {
                    sink.write_all(b)?;
                    b.len()
                }
                Payload::Clone {
                    file,
                    offset,
                    bytes,
                } => {
                    if sink.clone_from(file, *offset, bytes.len() as u64)? {
                        stats
                            .cloned_bytes
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    } else {
                        sink.write_all(bytes)?;
                    }
                    bytes.len()
                }
            };
            Ok((RECORD_HEADER_LEN + pad as usize + n) as u64)
        })();
        match result {
            Ok(n) => {
                written.fetch_add(n, Ordering::Relaxed);
                stats.written_bytes.fetch_add(n, Ordering::Relaxed);
                let _ = token_rx.try_recv();
            }
            Err(e) => {
                fail.set(Error::io(format!("writing {}", sink.describe()), e));
                return None;
            }
        }
    }
    let pos = written.load(Ordering::Relaxed);
    Some((sink, pos))
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
