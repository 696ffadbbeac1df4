//! The data plane of a mount: fetching chunks on demand through the archive reader,
//! verifying each against its digest, caching the decoded bytes, reading ahead of
//! sequential readers and prefetching the archive's hot list on a small worker pool.
//!
//! Everything goes through [`ArchiveReader`] and its [`ckstream_format::ShardSource`]s,
//! so a mount of an archive in object storage needs nothing here to change.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use ckstream_format::budget::{chunk_cost, Budget, CHUNK_MEMORY};
use ckstream_format::reader::verify_digest;
use ckstream_format::{codec, escape_controls, ArchiveReader, Chunk, EntryKind, Error, Result};

use super::cache::{Bytes, CacheCounters, ChunkCache};

/// What the cache holds: a chunk's verified bytes, or the decoded (not yet verified as a
/// whole) shared frame several small files' chunks are cut from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// Position in `Index::chunks`.
    Chunk(usize),
    /// A shared frame, by archive (0, or a parent), shard and payload offset.
    Frame(u32, u32, u64),
}

/// One chunk to fetch in the background: (entry id, position in `Index::chunks`).
type Job = (usize, usize);

/// Counters of a mount, as [`super::MountedArchive::stats`] reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountStats {
    /// Chunk payloads (or shared frames) read from the archive's shards.
    pub fetches: u64,
    /// Stored bytes of those payloads: what the mount read from the archive.
    pub fetched_bytes: u64,
    /// Reads answered with EIO because a chunk failed to fetch, decode or verify.
    pub read_errors: u64,
    /// Chunks queued for read-ahead behind sequential readers.
    pub readahead_queued: u64,
    /// Chunks of hot-list files queued for prefetch when the mount came up.
    pub hot_planned: u64,
    /// Chunks of hot-list files prefetched so far.
    pub hot_prefetched: u64,
    /// Decoded-chunk cache counters.
    pub cache: CacheCounters,
}

impl MountStats {
    /// The counters as one JSON object (what `user.ckstream.stats` on the mount's root
    /// and `ckstream mount --json` show).
    pub fn to_json(&self) -> String {
        format!(
            concat!(
                "{{\"fetches\":{},\"fetched_bytes\":{},\"read_errors\":{},",
                "\"readahead_queued\":{},\"hot_planned_chunks\":{},\"hot_prefetched_chunks\":{},",
                "\"cache_hits\":{},\"cache_misses\":{},\"cache_evictions\":{},\"cache_bytes\":{}}}"
            ),
            self.fetches,
            self.fetched_bytes,
            self.read_errors,
            self.readahead_queued,
            self.hot_planned,
            self.hot_prefetched,
            self.cache.hits,
            self.cache.misses,
            self.cache.evictions,
            self.cache.bytes
        )
    }
}

/// The answer to one read: a range of a shared buffer (a cached chunk, or a buffer
/// assembled for a read that spans chunks or holes).
pub struct ReadData {
    bytes: Bytes,
    range: std::ops::Range<usize>,
    /// Positions (within the entry's chunk list) of the first and last chunk the read
    /// touched, for read-ahead decisions.
    pub chunks: Option<(usize, usize)>,
}

impl ReadData {
    fn empty() -> Self {
        ReadData {
            bytes: Arc::new(Vec::new()),
            range: 0..0,
            chunks: None,
        }
    }

    /// The bytes read.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[self.range.clone()]
    }
}

/// Tuning of the data plane.
#[derive(Clone, Debug)]
pub struct DataOptions {
    /// Bytes of decoded chunks kept in memory.
    pub cache_bytes: u64,
    /// Chunks fetched ahead of a sequential reader (0: no read-ahead).
    pub readahead_chunks: usize,
    /// Background fetch threads (read-ahead and hot-list prefetch).
    pub workers: usize,
}

struct Shared {
    reader: Arc<ArchiveReader>,
    cache: ChunkCache<Key>,
    /// Chunks being fetched and decoded (by FUSE threads and workers together) hold at
    /// most this much besides the cache, whatever sizes an archive claims.
    in_flight: Budget,
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
    read_errors: AtomicU64,
    readahead_queued: AtomicU64,
    hot_planned: AtomicU64,
    hot_prefetched: AtomicU64,
    /// Chunks whose failure was already reported, so a file read again and again does
    /// not flood the log with the same message.
    reported: Mutex<HashSet<usize>>,
    stop: AtomicBool,
}

/// Fetches, verifies, caches and reads ahead chunks of one archive.
pub struct DataPlane {
    shared: Arc<Shared>,
    readahead_tx: Mutex<Option<Sender<Job>>>,
    hot_tx: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    readahead_chunks: usize,
}

impl Shared {
    /// The verified bytes of chunk `ci` of entry `ei`.
    fn chunk(&self, ei: usize, ci: usize) -> Result<Bytes> {
        let index = self.reader.index();
        let c: &Chunk = &index.chunks[ci];
        let entry = &index.entries[ei];
        if !c.in_shared_frame() {
            return self.cache.get_or_fetch(Key::Chunk(ci), || {
                // Never closed: always a lease.
                let _lease = self.in_flight.take(chunk_cost(c));
                let stored = self.reader.read_stored(c)?;
                self.fetches.fetch_add(1, Ordering::Relaxed);
                self.fetched_bytes
                    .fetch_add(stored.len() as u64, Ordering::Relaxed);
                ckstream_format::reader::decode_chunk(entry, c, stored)
            });
        }
        // A small file in a shared frame: decode the frame once (its neighbours are
        // likely read next), then cut and verify this file's part of it.
        let what = || format!("{:?} at offset {}", entry.path_lossy(), c.file_offset);
        self.cache.get_or_fetch(Key::Chunk(ci), || {
            let frame =
                self.cache
                    .get_or_fetch(Key::Frame(c.archive, c.shard, c.offset), || {
                        let _lease = self.in_flight.take(chunk_cost(c));
                        let stored = self.reader.read_stored(c)?;
                        self.fetches.fetch_add(1, Ordering::Relaxed);
                        self.fetched_bytes
                            .fetch_add(stored.len() as u64, Ordering::Relaxed);
                        let codec = c.codec_id().ok_or_else(|| {
                            Error::Unsupported(format!("{}: codec {}", what(), c.codec))
                        })?;
                        codec::decode(codec, &stored, c.frame_raw_len as usize, &what())
                    })?;
            let start = c.frame_offset as usize;
            let part = frame
                .get(start..start + c.raw_len as usize)
                .ok_or_else(|| Error::Corrupt(format!("{}: outside its shared frame", what())))?
                .to_vec();
            verify_digest(&part, &c.digest, what)?;
            Ok(part)
        })
    }

    /// Logs a chunk failure once per chunk.
    fn report(&self, ci: usize, context: &str, err: &Error) {
        let first = self
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ci);
        if first {
            // The context names an archive path: its control characters are escaped.
            let line = format!("{context}: {err}").replace('\n', " ");
            eprintln!("ckstream: error: {}", escape_controls(&line));
        }
    }
}

fn worker(shared: Arc<Shared>, readahead: Receiver<Job>, hot: Receiver<Job>) {
    loop {
        // Read-ahead for someone reading now comes before the hot list.
        let job = match readahead.try_recv() {
            Ok(job) => Some((job, false)),
            Err(_) => crossbeam_channel::select_biased! {
                recv(readahead) -> j => j.ok().map(|j| (j, false)),
                recv(hot) -> j => j.ok().map(|j| (j, true)),
            },
        };
        let Some(((ei, ci), is_hot)) = job else {
            return;
        };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        match shared.chunk(ei, ci) {
            Ok(_) => {
                if is_hot {
                    shared.hot_prefetched.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                let entry = &shared.reader.index().entries[ei];
                let c = &shared.reader.index().chunks[ci];
                shared.report(
                    ci,
                    &format!(
                        "mount: prefetching {} at offset {}",
                        entry.path_lossy(),
                        c.file_offset
                    ),
                    &e,
                );
            }
        }
    }
}

impl DataPlane {
    /// Starts the worker pool.
    ///
    /// # Errors
    /// [`Error::Io`] when a thread cannot be spawned.
    pub fn new(reader: Arc<ArchiveReader>, opts: &DataOptions) -> Result<Self> {
        let shared = Arc::new(Shared {
            reader,
            cache: ChunkCache::new(opts.cache_bytes),
            in_flight: Budget::new(CHUNK_MEMORY),
            fetches: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            readahead_queued: AtomicU64::new(0),
            hot_planned: AtomicU64::new(0),
            hot_prefetched: AtomicU64::new(0),
            reported: Mutex::new(HashSet::new()),
            stop: AtomicBool::new(false),
        });
        let workers = opts.workers.max(1);
        // Enough queued read-ahead for every worker to stay busy; more would only
        // fetch chunks that get evicted before they are read.
        let (readahead_tx, readahead_rx) = crossbeam_channel::bounded(workers * 4);
        let (hot_tx, hot_rx) = crossbeam_channel::bounded(workers * 2);
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let shared = shared.clone();
            let ra = readahead_rx.clone();
            let hot = hot_rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ckstream-fetch-{i}"))
                    .spawn(move || worker(shared, ra, hot))
                    .map_err(|e| Error::io("starting a fetch thread", e))?,
            );
        }
        Ok(DataPlane {
            shared,
            readahead_tx: Mutex::new(Some(readahead_tx)),
            hot_tx: Mutex::new(Some(hot_tx)),
            threads: Mutex::new(threads),
            readahead_chunks: opts.readahead_chunks,
        })
    }

    /// The reader behind this mount.
    pub fn reader(&self) -> &ArchiveReader {
        &self.shared.reader
    }

    /// Reads `[offset, offset + len)` of file entry `ei` (clamped to its size), fetching
    /// the chunks it needs; holes read as zeros without any fetch.
    ///
    /// # Errors
    /// The first chunk that fails to fetch, decode or verify (already logged once).
    pub fn read(&self, ei: usize, offset: u64, len: usize) -> Result<ReadData> {
        let reader = &self.shared.reader;
        let entry = &reader.entries()[ei];
        debug_assert_eq!(entry.entry_kind(), EntryKind::File);
        if offset >= entry.size || len == 0 {
            return Ok(ReadData::empty());
        }
        let end = entry.size.min(offset.saturating_add(len as u64));
        let chunks = reader.chunks_of(ei);
        let first_global = entry.first_chunk as usize;
        let fetch = |pos: usize| {
            self.shared.chunk(ei, first_global + pos).inspect_err(|e| {
                self.shared.read_errors.fetch_add(1, Ordering::Relaxed);
                self.shared.report(
                    first_global + pos,
                    &format!(
                        "mount: reading {} at offset {}",
                        entry.path_lossy(),
                        chunks[pos].file_offset
                    ),
                    e,
                );
            })
        };
        let mut pos = chunks.partition_point(|c| c.file_end() <= offset);
        if let Some(c) = chunks.get(pos) {
            if c.file_offset <= offset && end <= c.file_end() {
                // The usual case (the kernel asks for pieces of a chunk): hand out a
                // slice of the cached chunk, no copy.
                let data = fetch(pos)?;
                let start = (offset - c.file_offset) as usize;
                return Ok(ReadData {
                    bytes: Bytes::clone(&data),
                    range: start..start + (end - offset) as usize,
                    chunks: Some((pos, pos)),
                });
            }
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let mut touched = None::<(usize, usize)>;
        while pos < chunks.len() && chunks[pos].file_offset < end {
            let c = &chunks[pos];
            let data = fetch(pos)?;
            let from = offset.max(c.file_offset);
            let to = end.min(c.file_end());
            out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(
                &data[(from - c.file_offset) as usize..(to - c.file_offset) as usize],
            );
            touched = Some((touched.map_or(pos, |t| t.0), pos));
            pos += 1;
        }
        let n = out.len();
        Ok(ReadData {
            bytes: Arc::new(out),
            range: 0..n,
            chunks: touched,
        })
    }

    /// Queues the chunks after position `last` of entry `ei` for read-ahead (those not
    /// cached or being fetched already). Never blocks: when the queue is full, the reader
    /// is ahead of the workers anyway.
    pub fn read_ahead(&self, ei: usize, last: usize) {
        if self.readahead_chunks == 0 {
            return;
        }
        let reader = &self.shared.reader;
        let entry = &reader.entries()[ei];
        let first_global = entry.first_chunk as usize;
        let count = entry.chunk_count as usize;
        let guard = self.readahead_tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else { return };
        for pos in last + 1..count.min(last + 1 + self.readahead_chunks) {
            let ci = first_global + pos;
            let c = &reader.index().chunks[ci];
            let key = if c.in_shared_frame() {
                Key::Frame(c.archive, c.shard, c.offset)
            } else {
                Key::Chunk(ci)
            };
            if self.shared.cache.contains_or_loading(&key) {
                continue;
            }
            match tx.try_send((ei, ci)) {
                Ok(()) => {
                    self.shared.readahead_queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => break,
            }
        }
    }

    /// Starts prefetching the chunks of `files` (entry ids of regular files, in order) on
    /// the worker pool, up to `budget` decoded bytes so the prefetch does not evict itself.
    /// Returns the number of chunks and bytes that will be prefetched.
    ///
    /// # Errors
    /// [`Error::Io`] when the feeding thread cannot be spawned.
    pub fn prefetch(&self, files: Vec<usize>, budget: u64) -> Result<(u64, u64)> {
        let reader = &self.shared.reader;
        let mut jobs = Vec::new();
        let mut bytes = 0u64;
        let mut frames = HashSet::new();
        'files: for ei in files {
            let first = reader.entries()[ei].first_chunk as usize;
            for (pos, c) in reader.chunks_of(ei).iter().enumerate() {
                if c.in_shared_frame() && !frames.insert((c.archive, c.shard, c.offset)) {
                    // The frame is already queued: its chunk is cut from the cache.
                    jobs.push((ei, first + pos));
                    continue;
                }
                let cost = c.decoded_len() as u64;
                if bytes + cost > budget {
                    break 'files;
                }
                bytes += cost;
                jobs.push((ei, first + pos));
            }
        }
        let count = jobs.len() as u64;
        self.shared.hot_planned.fetch_add(count, Ordering::Relaxed);
        let Some(tx) = self
            .hot_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok((0, 0));
        };
        let shared = self.shared.clone();
        let feeder = std::thread::Builder::new()
            .name("ckstream-hot".into())
            .spawn(move || {
                for job in jobs {
                    // Blocks while the workers are busy; gives up when the mount ends.
                    let mut job = job;
                    loop {
                        if shared.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        match tx.send_timeout(job, Duration::from_millis(100)) {
                            Ok(()) => break,
                            Err(crossbeam_channel::SendTimeoutError::Timeout(j)) => job = j,
                            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return,
                        }
                    }
                }
            })
            .map_err(|e| Error::io("starting the hot-list prefetch thread", e))?;
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(feeder);
        Ok((count, bytes))
    }

    /// Current counters.
    pub fn stats(&self) -> MountStats {
        let s = &self.shared;
        MountStats {
            fetches: s.fetches.load(Ordering::Relaxed),
            fetched_bytes: s.fetched_bytes.load(Ordering::Relaxed),
            read_errors: s.read_errors.load(Ordering::Relaxed),
            readahead_queued: s.readahead_queued.load(Ordering::Relaxed),
            hot_planned: s.hot_planned.load(Ordering::Relaxed),
            hot_prefetched: s.hot_prefetched.load(Ordering::Relaxed),
            cache: s.cache.counters(),
        }
    }

    /// Stops the workers (queued prefetches are dropped) and waits for them.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.readahead_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.hot_tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}
