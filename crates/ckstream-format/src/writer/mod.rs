//! Single-pass archive writer with parallel chunk encoding and load-balanced shards.
//!
//! Data flows one way: the caller adds entries and chunks (in its own thread) →
//! worker threads hash and compress (`encode`) → a sequencer restores the order and
//! assigns each record to the shard with the smallest backlog (`sequencer`) → one
//! writer thread per shard writes (or clones) the bytes (`shard`). The footer, the
//! commit record, is written by [`ArchiveWriter::finish`] only after every shard has been
//! written out.
//!
//! Every job holds one token from a bounded channel from the moment the caller submits it
//! until its bytes are in a sink (or it turned out to need none), so the memory between
//! the caller and the slowest shard is bounded whatever the speeds. The first error of any
//! thread goes into one `FailFlag`; every thread polls it and stops, and the caller's
//! next call returns that error.

mod encode;
mod sequencer;
mod shard;

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, Sender};
use prost::Message;

use self::encode::{encode_worker, Job, PreparedBatch};
use self::sequencer::{sequencer_thread, SequencerOutput, ShardState};
use self::shard::{FinishedShard, ShardThread, WriteOp};
use crate::codec::{CodecId, Compression};
use crate::crypto::{ArchiveKey, INDEX_SEQ};
use crate::error::{Error, Result};
use crate::index::{Entry, Index, MetaItem};
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
    /// Codec (and level) for data chunks.
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
    /// Counts the raw bytes handed to the writer (for the caller's progress display).
    pub progress: crate::Progress,
    /// Keys to seal the archive for and to sign it with (none by default).
    pub keys: crate::crypto::WriteKeys,
    /// Chunks of parent archives to reference instead of storing them again (an
    /// incremental archive). Not with `keys.seal_to`.
    pub parents: Option<Arc<crate::parents::ParentChunks>>,
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
            progress: crate::Progress::default(),
            keys: crate::crypto::WriteKeys::default(),
            parents: None,
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
    /// The new archive's id.
    pub archive_id: [u8; 16],
    /// Entries in the index.
    pub entries: usize,
    /// Chunks in the index.
    pub chunks: usize,
    /// Logical bytes of all file entries (holes included).
    pub logical_bytes: u64,
    /// Raw bytes stored in chunks (holes and all-zero chunks excluded).
    pub raw_bytes: u64,
    /// Stored payload bytes of the chunks this archive stores (each place counted once;
    /// references to parents excluded).
    pub stored_bytes: u64,
    /// Bytes cloned by reflink rather than copied.
    pub cloned_bytes: u64,
    /// Raw bytes not stored because the same chunk is stored once already, in a parent
    /// archive or earlier in this one.
    pub referenced_bytes: u64,
    /// Size of each shard including header, index and footer.
    pub shard_sizes: Vec<u64>,
    /// Stored size of the index.
    pub index_bytes: u64,
}

/// A chunk's optional reflink source: the file and the offset of the chunk in it.
pub type CloneFrom = Option<(Arc<File>, u64)>;

/// Identifies an entry added to a writer.
pub type EntryId = u64;

pub use crate::layout::RECORD_FLAG_SHARED_FRAME;

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

/// What the pipeline's threads share.
#[derive(Clone)]
struct Pipeline {
    fail: Arc<FailFlag>,
    stats: Arc<WriterStats>,
    /// Payloads are sealed: chunks record their sequence number.
    sealed: bool,
}

/// A batch's claim on one token of [`ArchiveWriter::submit`]: handed back when the last
/// record of the batch is written (or needed no writing), whichever thread drops it.
struct BatchToken(Receiver<()>);

impl Drop for BatchToken {
    fn drop(&mut self) {
        let _ = self.0.try_recv();
    }
}

/// Jobs the caller hands over together: passing every chunk through the threads on its
/// own costs more in wake-ups than hashing it when chunks are small.
struct Batch {
    jobs: Vec<Job>,
    token: Arc<BatchToken>,
}

/// A batch is handed over once it holds this many bytes of data...
const BATCH_BYTES: usize = 1 << 20;
/// ...or this many jobs.
const BATCH_JOBS: usize = 64;

/// Writes one archive to 1..N shard sinks.
pub struct ArchiveWriter {
    header: ShardHeader,
    opts: WriterOptions,
    job_tx: Option<Sender<Batch>>,
    token_tx: Sender<()>,
    token_rx: Receiver<()>,
    /// Jobs not handed to the workers yet, and their data bytes.
    pending: Vec<Job>,
    pending_bytes: usize,
    workers: Vec<JoinHandle<()>>,
    sequencer: Option<JoinHandle<Option<SequencerOutput>>>,
    shard_threads: Vec<JoinHandle<Option<FinishedShard>>>,
    fail: Arc<FailFlag>,
    stats: Arc<WriterStats>,
    next_seq: u64,
    next_entry: EntryId,
    meta: Vec<MetaItem>,
    /// Paths to record in the index's hot list, resolved to entry ids by `finish`.
    hot_paths: Vec<Vec<u8>>,
    /// Streamed entries whose final size ([`ArchiveWriter::end_entry`]) is still due.
    open_streams: std::collections::HashSet<EntryId>,
    /// The archive key and the Keys record that wraps it, for a sealed archive.
    sealing: Option<(Arc<ArchiveKey>, Vec<u8>)>,
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
        if opts.parents.is_some() && !opts.keys.seal_to.is_empty() {
            return Err(Error::Usage(
                "an encrypted archive cannot reference a parent archive (its chunks would be readable without the key)".into(),
            ));
        }
        let sealing = if opts.keys.seal_to.is_empty() {
            None
        } else {
            let (key, record) = ArchiveKey::generate(archive_id, &opts.keys.seal_to)?;
            Some((Arc::new(key), record))
        };
        let mut optional_features = optional::INLINE_ENTRIES;
        if opts.compression.codec == CodecId::None && sealing.is_none() {
            optional_features |= optional::ALIGNED_RAW;
        }
        if opts.keys.sign_with.is_some() {
            optional_features |= optional::SIGNED;
        }
        let mut required_features = 0;
        if opts.id_named_shards && shard_count > 1 {
            required_features |= crate::layout::required::ID_NAMED_SHARDS;
        }
        if sealing.is_some() {
            required_features |= crate::layout::required::SEALED;
        }
        if opts
            .parents
            .as_ref()
            .is_some_and(|p| !p.archives.is_empty())
        {
            required_features |= crate::layout::required::PARENTS;
        }
        let header = ShardHeader {
            alignment_log2: opts.alignment_log2,
            hash_algo: HASH_BLAKE3,
            required_features,
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
        let pipeline = Pipeline {
            fail: fail.clone(),
            stats: stats.clone(),
            sealed: sealing.is_some(),
        };

        let mut shard_states = Vec::new();
        let mut shard_threads = Vec::new();
        for (i, mut sink) in sinks.into_iter().enumerate() {
            let h = ShardHeader {
                shard_index: i as u32,
                ..header.clone()
            };
            sink.write_all(&h.encode())
                .map_err(|e| Error::io(format!("writing header of {}", sink.describe()), e))?;
            let (tx, rx) = bounded::<Vec<WriteOp>>(8);
            let written = Arc::new(AtomicU64::new(HEADER_LEN as u64));
            let writer = ShardThread {
                sink,
                written: written.clone(),
                pipeline: pipeline.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("cka-shard-{i}"))
                .spawn(move || writer.run(rx))
                .map_err(|e| Error::io("spawning shard thread", e))?;
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

        let (job_tx, job_rx) = bounded::<Batch>(threads * 2);
        let (done_tx, done_rx) = bounded::<PreparedBatch>(inflight + threads * 2);
        let mut workers = Vec::new();
        for i in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let fail = fail.clone();
            let compression = opts.compression;
            let key = sealing.as_ref().map(|(k, _)| k.clone());
            let parents = opts.parents.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("cka-encode-{i}"))
                    .spawn(move || encode_worker(job_rx, done_tx, fail, compression, key, parents))
                    .map_err(|e| Error::io("spawning encoder thread", e))?,
            );
        }
        drop(done_tx);
        let alignment = 1u64 << opts.alignment_log2;
        // A sealed payload is bound to its record: only unsealed archives share chunks.
        let dedup = sealing
            .is_none()
            .then(|| sequencer::Dedup::new(opts.parents.clone()));
        let sequencer = std::thread::Builder::new()
            .name("cka-sequencer".into())
            .spawn(move || sequencer_thread(done_rx, shard_states, pipeline, alignment, dedup))
            .map_err(|e| Error::io("spawning sequencer thread", e))?;
        Ok(ArchiveWriter {
            header,
            opts,
            sealing,
            job_tx: Some(job_tx),
            token_tx,
            token_rx,
            pending: Vec::new(),
            pending_bytes: 0,
            workers,
            sequencer: Some(sequencer),
            shard_threads,
            fail,
            stats,
            next_seq: 0,
            next_entry: 0,
            meta: Vec::new(),
            hot_paths: Vec::new(),
            open_streams: std::collections::HashSet::new(),
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

    /// True when uncompressed chunks are stored aligned (an uncompressed, unsealed
    /// archive, for reflinks): each chunk then costs up to an alignment unit of padding.
    pub fn aligns_chunks(&self) -> bool {
        self.header.optional_features & optional::ALIGNED_RAW != 0
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
        if self.fail.is_set() {
            return Err(self.fail.take());
        }
        self.pending_bytes += job.data_len();
        self.pending.push(job);
        if self.pending_bytes >= BATCH_BYTES || self.pending.len() >= BATCH_JOBS {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands what was added so far to the pipeline (it is otherwise handed over in
    /// batches of about a megabyte). A caller about to wait for more input calls this,
    /// so the sinks need not wait with it.
    ///
    /// # Errors
    /// The error of a failed worker or shard.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // One token per batch bounds the bytes in flight between caller and shards.
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
        let batch = Batch {
            jobs: std::mem::take(&mut self.pending),
            token: Arc::new(BatchToken(self.token_rx.clone())),
        };
        self.pending_bytes = 0;
        let tx = self
            .job_tx
            .as_ref()
            .ok_or_else(|| Error::Usage("writer already finished".into()))?;
        if tx.send(batch).is_err() {
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
        if entry.flags & crate::index::entry_flags::STREAMED != 0 {
            self.open_streams.insert(id);
        }
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
        data: impl Into<Bytes>,
        clone: CloneFrom,
    ) -> Result<()> {
        let data = data.into();
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
        self.opts.progress.add(data.len() as u64);
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
        self.opts.progress.add(total as u64);
        let seq = self.seq();
        self.submit(Job::Bundle { seq, parts })
    }

    /// Records the final size of a streamed entry (one added with `entry_flags::STREAMED`).
    ///
    /// # Errors
    /// [`Error::Usage`] for an id that is no streamed entry still waiting for its size;
    /// the error of a failed worker or shard.
    pub fn end_entry(&mut self, id: EntryId, size: u64) -> Result<()> {
        if !self.open_streams.remove(&id) {
            return Err(Error::Usage(format!(
                "entry {id} is not a streamed entry waiting for its size"
            )));
        }
        let seq = self.seq();
        self.submit(Job::EntryEnd { seq, id, size })
    }

    fn join_pipeline(&mut self) -> Result<(SequencerOutput, Vec<FinishedShard>)> {
        let flushed = self.flush();
        self.job_tx = None;
        self.pending.clear();
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
        flushed?;
        if self.fail.is_set() {
            return Err(self.fail.take());
        }
        let out = out.ok_or_else(|| Error::Usage("archive writer thread panicked".into()))?;
        if sinks.len() != out.positions.len() {
            return Err(Error::Usage("archive shard thread panicked".into()));
        }
        Ok((out, sinks))
    }

    /// Waits for all data, writes the index to shard 0, then commits every shard with its
    /// footer and syncs it, all shards at once. The footers are not ordered among
    /// themselves: the archive becomes visible under its name only when the store
    /// publishes shard 0, after every sync has returned (docs/FORMAT.md, "Commit order").
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
        for (e, mut list) in entries.iter_mut().zip(per_entry) {
            list.sort_by_key(|c| c.file_offset);
            e.first_chunk = chunks.len() as u64;
            e.chunk_count = list.len() as u64;
            chunks.extend(list);
        }
        let hot_list = resolve_hot_list(&entries, &self.hot_paths)?;
        let index = Index {
            entries,
            chunks,
            parents: self
                .opts
                .parents
                .as_ref()
                .map(|p| p.archives.clone())
                .unwrap_or_default(),
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
        index.validate_for(self.header.shard_count, self.sealing.is_some())?;
        // The same totals `info` shows for this index.
        let totals = index.summary();
        let index_raw = index.encode_to_vec();
        let index_digest = *blake3::hash(&index_raw).as_bytes();
        let raw_len =
            u32::try_from(index_raw.len()).map_err(|_| Error::Usage("index too large".into()))?;
        let mut index_stored =
            zstd::bulk::compress(&index_raw, 3).map_err(|e| Error::io("compressing index", e))?;
        let mut index_record_digest = index_digest;
        if let Some((key, _)) = &self.sealing {
            key.seal(
                INDEX_SEQ,
                RecordKind::Index,
                CodecId::Zstd as u8,
                raw_len,
                &mut index_stored,
            )?;
            index_record_digest = *blake3::hash(&index_stored).as_bytes();
        }

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
            raw_len,
            stored_len: index_stored.len() as u32,
            pad: 0,
            digest: index_record_digest,
        };
        // After the index, in shard 0: the Keys record of a sealed archive, then the
        // Signature record of a signed one (docs/FORMAT.md, "Signatures and encryption").
        let mut trailer: Vec<(RecordKind, Vec<u8>)> = Vec::new();
        if let Some((_, keys)) = &self.sealing {
            trailer.push((RecordKind::Keys, keys.clone()));
        }
        if let Some(signer) = &self.opts.keys.sign_with {
            let signature = signer.sign_archive(
                &self.header.archive_id,
                self.header.shard_count,
                &index_digest,
            )?;
            trailer.push((RecordKind::Signature, signature));
        }
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
                for (k, (kind, payload)) in trailer.iter().enumerate() {
                    let header = RecordHeader {
                        kind: *kind,
                        codec: CodecId::None,
                        flags: 0,
                        seq: self.next_seq + 1 + k as u64,
                        entry_id: 0,
                        file_offset: 0,
                        raw_len: payload.len() as u32,
                        stored_len: payload.len() as u32,
                        pad: 0,
                        digest: *blake3::hash(payload).as_bytes(),
                    };
                    bytes.extend_from_slice(&header.encode());
                    bytes.extend_from_slice(payload);
                    pos += header.record_len();
                    nrec += 1;
                }
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
        write_tails(&mut sinks, &tails)?;
        let shard_sizes: Vec<u64> = tails.iter().map(|(_, size)| *size).collect();
        Ok(WriteSummary {
            archive_id: self.header.archive_id,
            entries: summary_entries,
            chunks: summary_chunks,
            logical_bytes: totals.logical_bytes,
            raw_bytes: totals.raw_bytes,
            stored_bytes: totals.stored_bytes,
            cloned_bytes: self.stats.cloned_bytes.load(Ordering::Relaxed),
            referenced_bytes: totals.referenced_bytes,
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

/// The entry ids of `hot_paths`, in their order.
fn resolve_hot_list(entries: &[Entry], hot_paths: &[Vec<u8>]) -> Result<Vec<u64>> {
    if hot_paths.is_empty() {
        return Ok(Vec::new());
    }
    let by_path: std::collections::HashMap<&[u8], u64> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.as_slice(), i as u64))
        .collect();
    hot_paths
        .iter()
        .map(|p| {
            by_path.get(p.as_slice()).copied().ok_or_else(|| {
                Error::Usage(format!(
                    "hot-list path {:?} is not in the archive",
                    String::from_utf8_lossy(p)
                ))
            })
        })
        .collect()
}

/// Appends each shard's tail (`(bytes, final size)`: shard 0's index record and every
/// footer) and syncs it, all shards in parallel: a commit waits for one sync, not one per
/// shard.
fn write_tails(sinks: &mut [FinishedShard], tails: &[(Vec<u8>, u64)]) -> Result<()> {
    std::thread::scope(|scope| {
        let running: Vec<_> = sinks
            .iter_mut()
            .zip(tails)
            .map(|((sink, _), (bytes, _))| {
                scope.spawn(move || {
                    sink.write_all(bytes)
                        .and_then(|()| sink.sync())
                        .map_err(|e| Error::io(format!("committing {}", sink.describe()), e))
                })
            })
            .collect();
        // The scope joins every thread; the first error (in shard order) is returned.
        running.into_iter().try_for_each(|t| {
            t.join()
                .unwrap_or_else(|_| Err(Error::Usage("commit thread panicked".into())))
        })
    })
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
