//! Restoring file data, a batch of open files at a time.
//!
//! Files are created at their full size before any data is written and join a batch; a
//! batch's chunks are restored in parallel, then each file gets its metadata. Every chunk
//! is read and verified against its digest *before* anything reaches the output, so a
//! corrupt archive never leaves wrong bytes behind: when any chunk of a batch fails (or
//! the extraction is interrupted), every file of the batch is removed, complete or not,
//! and only files whose data was all written and verified remain.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use ckstream_format::budget::{chunk_cost, Budget, CHUNK_MEMORY};
use ckstream_format::index::parent_path;
use ckstream_format::reader::{check_stored_raw, decode_chunk, stored_as_raw};
use ckstream_format::{Chunk, CodecId, Entry, Error, Result};
use ckstream_store::{clone_or_copy_range, clone_range, CopyMethod};
use rustix::fs::AtFlags;

use super::dirs::{ferr, last_component, os};
use super::meta::apply_meta_fd;
use super::Unpacker;

/// A batch is restored once it holds this many files or chunks: enough work for every
/// thread, little to remove when it fails.
const MAX_BATCH_FILES: usize = 128;
const MAX_BATCH_CHUNKS: usize = 512;

/// Extents are shared (or copied in the kernel) a whole block at a time.
const BLOCK: u64 = 4096;

thread_local! {
    /// Where a worker reads the uncompressed chunks it checks: allocating and zeroing a
    /// buffer per chunk cost ~10 % of `unpack -c none`.
    static SCRATCH: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::default();
}

/// A reusable buffer whose slices start on a page: the kernel copies into a buffer 16
/// bytes past a page boundary at a fraction of the speed here (see
/// [`ckstream_format::window`]).
#[derive(Default)]
struct AlignedBuf(Vec<u8>);

impl AlignedBuf {
    /// `len` bytes starting on a page (their contents are whatever was there).
    fn get(&mut self, len: usize) -> &mut [u8] {
        let page = BLOCK as usize;
        if self.0.len() < len + page {
            self.0 = vec![0; len + page];
        }
        let pad = self.0.as_ptr().align_offset(page);
        &mut self.0[pad..pad + len]
    }
}

/// Files created at their full size whose data is not restored yet, and their chunks.
#[derive(Default)]
pub(super) struct Batch<'a> {
    files: Vec<OpenFile<'a>>,
    jobs: Vec<ChunkJob<'a>>,
}

struct OpenFile<'a> {
    file: File,
    /// Metadata to apply: the entry itself, or for a hard link whose target was not
    /// extracted, the target's metadata under the link's path.
    entry: Cow<'a, Entry>,
    dir: Vec<u8>,
}

/// One chunk to restore into an open output file.
struct ChunkJob<'a> {
    /// The file's position in [`Batch::files`].
    slot: usize,
    /// The entry holding the data (the hard link's target for a materialized link).
    entry: &'a Entry,
    chunk: &'a Chunk,
}

impl<'a> Unpacker<'a> {
    /// Adds `file`, just created at its full size, to the batch with the chunks of entry
    /// `data_entry`, and restores the batch once it is full.
    pub(super) fn queue_file(
        &mut self,
        file: File,
        meta: Cow<'a, Entry>,
        data_entry: usize,
    ) -> Result<()> {
        let reader = self.reader;
        let slot = self.batch.files.len();
        let dir = parent_path(&meta.path).unwrap_or(b"").to_vec();
        self.batch.files.push(OpenFile {
            file,
            entry: meta,
            dir,
        });
        let entry = &reader.entries()[data_entry];
        for chunk in reader.chunks_of(data_entry) {
            self.batch.jobs.push(ChunkJob { slot, entry, chunk });
        }
        if self.batch.files.len() >= MAX_BATCH_FILES || self.batch.jobs.len() >= MAX_BATCH_CHUNKS {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// Restores the batch: all its chunks in parallel, then each file's metadata. Leaves
    /// the batch empty; on failure its files are removed.
    pub(super) fn flush_batch(&mut self) -> Result<()> {
        let result = self.restore_batch_data().and_then(|()| {
            for f in &self.batch.files {
                apply_meta_fd(&f.file, &f.entry, self.opts)?;
            }
            Ok(())
        });
        if result.is_err() {
            // A file whose data could not be verified is not left behind looking complete.
            self.discard_batch();
        }
        self.batch.files.clear();
        self.batch.jobs.clear();
        result
    }

    /// Removes the files of the batch (created, their data not all written).
    pub(super) fn discard_batch(&mut self) {
        for f in self.batch.files.drain(..) {
            if let Ok(dir) = self.cache.dir(&f.dir) {
                let _ =
                    rustix::fs::unlinkat(dir, os(last_component(&f.entry.path)), AtFlags::empty());
            }
        }
    }

    /// Restores the batch's chunks on up to `threads` threads; the first error (or an
    /// interruption) stops the others after the chunk they are on.
    fn restore_batch_data(&self) -> Result<()> {
        let cloned = self.clone_up_front()?;
        let groups = frame_groups(&self.batch.jobs);
        let next = AtomicU64::new(0);
        let threads = self.opts.threads.max(1).min(groups.len().max(1));
        // The chunks being restored hold at most this much memory together (with one
        // larger chunk alone), whatever their sizes and the number of threads.
        let budget = Budget::new(CHUNK_MEMORY);
        std::thread::scope(|s| -> Result<()> {
            let work = || -> Result<()> {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(group) = groups.get(i) else {
                        return Ok(());
                    };
                    let cost = chunk_cost(self.batch.jobs[group[0]].chunk);
                    let Some(_lease) = budget.take(cost) else {
                        // Another worker failed and closed the budget.
                        return Ok(());
                    };
                    let restored = if self.opts.stop.requested() {
                        Err(Error::interrupted("extracting"))
                    } else {
                        self.restore_group(group, &cloned)
                    };
                    if restored.is_err() {
                        // Past the end of `groups`: every worker stops at its next fetch,
                        // or at once if it waits for memory.
                        next.store(u64::MAX / 2, Ordering::Relaxed);
                        budget.close();
                        return restored;
                    }
                }
            };
            let handles: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
            let mut first = work().err();
            for h in handles {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        first.get_or_insert(e);
                    }
                    // A worker that panicked wrote only part of its chunks: the batch
                    // must fail (and its files be removed), not pass as complete.
                    Err(_) => {
                        first.get_or_insert(Error::Usage("an unpack worker panicked".into()));
                    }
                }
            }
            first.map_or(Ok(()), Err)
        })
    }

    /// Restores one group of [`frame_groups`]: a chunk of its own, or the files sharing
    /// one frame.
    fn restore_group(&self, group: &[usize], cloned: &[bool]) -> Result<()> {
        if group.len() == 1 {
            let job = &self.batch.jobs[group[0]];
            if cloned[group[0]] {
                self.check_cloned(job)
            } else {
                self.restore_chunk(job)
            }
        } else {
            self.restore_shared_frame(group)
        }
    }

    /// Reads, verifies and writes one chunk: reflink from the archive when the chunk is
    /// uncompressed and aligned, else copy_file_range, else pwrite of the verified bytes.
    /// Bytes are verified *before* anything reaches the output.
    fn restore_chunk(&self, job: &ChunkJob) -> Result<()> {
        let c = job.chunk;
        let out = &self.batch.files[job.slot].file;
        let restore = |data: &[u8]| -> Result<()> {
            let werr = |e: io::Error| ferr(&job.entry.path, "cannot write", e);
            let done = self.clone_blocks(c, out).map_err(werr)?;
            if done < data.len() as u64 {
                out.write_all_at(&data[done as usize..], c.file_offset + done)
                    .map_err(werr)?;
            }
            Ok(())
        };
        if stored_as_raw(c) && !self.reader.is_sealed() {
            // Checked where they are read: a reused page-aligned buffer.
            SCRATCH.with_borrow_mut(|scratch| {
                let raw = scratch.get(c.stored_len as usize);
                self.reader.read_stored_into(c, raw)?;
                check_stored_raw(job.entry, c, raw)?;
                restore(raw)
            })?;
        } else {
            let stored = self.reader.read_stored(c)?;
            restore(&decode_chunk(job.entry, c, stored)?)?;
        }
        self.stats
            .bytes
            .fetch_add(c.raw_len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Shares (or copies in the kernel) the whole blocks of chunk `c` from the archive
    /// into `out`, when reflinks are wanted and the chunk's bytes sit in the archive as
    /// they are in the file, block-aligned on both sides. Returns the bytes done, 0 when
    /// nothing applied.
    fn clone_blocks(&self, c: &Chunk, out: &File) -> io::Result<u64> {
        let Some(src) = self.reflink_source(c) else {
            return Ok(0);
        };
        let whole = c.raw_len as u64 - c.raw_len as u64 % BLOCK;
        if c.offset % BLOCK != 0 || c.file_offset % BLOCK != 0 || whole == 0 {
            return Ok(0);
        }
        let counter = match clone_or_copy_range(src, c.offset, out, c.file_offset, whole, BLOCK)? {
            CopyMethod::Cloned => &self.stats.cloned_bytes,
            CopyMethod::KernelCopy => &self.stats.kernel_copied_bytes,
            CopyMethod::NotDone => return Ok(0),
        };
        counter.fetch_add(whole, Ordering::Relaxed);
        Ok(whole)
    }

    /// The archive file chunk `c` can be shared or copied from in the kernel: when
    /// reflinks are wanted and its stored bytes are the file's bytes (uncompressed,
    /// unsealed, not part of a shared frame).
    fn reflink_source(&self, c: &Chunk) -> Option<&File> {
        let src = self.reader.raw_file_of(c)?;
        (self.opts.reflink && c.codec_id() == Some(CodecId::None) && !c.in_shared_frame())
            .then_some(src)
    }

    /// With [`UnpackOptions::verify_from_output`] or
    /// [`UnpackOptions::defer_verify_cloned`](super::UnpackOptions): shares every chunk of
    /// the batch that can be shared whole by reflink, before any is read; returns which
    /// were. Cloning them all first matters on btrfs, where reading a range right after
    /// cloning it, chunk by chunk, ran at a third of the speed of reading it afterwards.
    fn clone_up_front(&self) -> Result<Vec<bool>> {
        let jobs = &self.batch.jobs;
        if !(self.opts.verify_from_output || self.opts.defer_verify_cloned) {
            return Ok(vec![false; jobs.len()]);
        }
        jobs.iter()
            .map(|job| self.clone_whole(job, &self.batch.files[job.slot].file))
            .collect()
    }

    /// A chunk [`Self::clone_up_front`] shared: with `defer_verify_cloned` recorded in
    /// [`UnpackStats::unverified`](super::UnpackStats) for the caller, else read back from
    /// the output and checked against its digest, so the output's page cache holds it
    /// for whoever reads it next.
    fn check_cloned(&self, job: &ChunkJob) -> Result<()> {
        let c = job.chunk;
        if self.opts.defer_verify_cloned {
            self.stats
                .unverified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((job.entry.clone(), c.clone()));
        } else {
            let mut shared = vec![0u8; c.raw_len as usize];
            self.batch.files[job.slot]
                .file
                .read_exact_at(&mut shared, c.file_offset)
                .map_err(|e| ferr(&job.entry.path, "cannot read back", e))?;
            decode_chunk(job.entry, c, shared)?;
        }
        self.stats
            .bytes
            .fetch_add(c.raw_len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Shares chunk `job` whole (every byte, block-aligned) from the archive into `out` by
    /// reflink; false, with nothing written, when that is not possible.
    fn clone_whole(&self, job: &ChunkJob, out: &File) -> Result<bool> {
        let c = job.chunk;
        let Some(src) = self.reflink_source(c) else {
            return Ok(false);
        };
        let len = c.raw_len as u64;
        if c.offset % BLOCK != 0 || c.file_offset % BLOCK != 0 || len % BLOCK != 0 || len == 0 {
            return Ok(false);
        }
        let cloned = clone_range(src, c.offset, out, c.file_offset, len)
            .map_err(|e| ferr(&job.entry.path, "cannot write", e))?;
        if cloned {
            self.stats.cloned_bytes.fetch_add(len, Ordering::Relaxed);
        }
        Ok(cloned)
    }

    /// Restores several small files from one shared frame: one read, one decode, a digest
    /// check per file, then one write per file.
    fn restore_shared_frame(&self, group: &[usize]) -> Result<()> {
        let jobs = &self.batch.jobs;
        let first = jobs[group[0]].chunk;
        let what = || {
            format!(
                "shared frame at shard {} offset {}",
                first.shard, first.offset
            )
        };
        let stored = self.reader.read_stored(first)?;
        let codec = first.codec_id().ok_or_else(|| Error::Unsupported(what()))?;
        let frame =
            ckstream_format::codec::decode(codec, &stored, first.frame_raw_len as usize, &what())?;
        for &j in group {
            let job = &jobs[j];
            let c = job.chunk;
            let part = &frame[c.frame_offset as usize..(c.frame_offset + c.raw_len) as usize];
            ckstream_format::reader::verify_digest(part, &c.digest, || {
                format!("{:?}", job.entry.path_lossy())
            })?;
            self.batch.files[job.slot]
                .file
                .write_all_at(part, c.file_offset)
                .map_err(|e| ferr(&job.entry.path, "cannot write", e))?;
            self.stats
                .bytes
                .fetch_add(c.raw_len as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// What chunks must agree on to be cut from one decoded frame: where it is (archive,
/// shard, offset), how long it
/// is stored and decoded, and its codec.
type FrameKey = (u32, u32, u64, u32, u32, u32);

/// The batch's jobs (indices into `jobs`) in groups restored as one: small files that
/// share one compressed frame together, so the frame is read and decoded once; every
/// other chunk alone. Chunks at one place that disagree about the frame (a damaged or
/// crafted index) are not grouped: the frame is decoded to the first chunk's
/// `frame_raw_len`, and every chunk of the group is cut from it.
fn frame_groups(jobs: &[ChunkJob]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::with_capacity(jobs.len());
    let mut frame_group: HashMap<FrameKey, usize> = HashMap::new();
    for (i, job) in jobs.iter().enumerate() {
        let c = job.chunk;
        if c.in_shared_frame() {
            let key = (
                c.archive,
                c.shard,
                c.offset,
                c.stored_len,
                c.frame_raw_len,
                c.codec,
            );
            if let Some(&g) = frame_group.get(&key) {
                groups[g].push(i);
                continue;
            }
            frame_group.insert(key, groups.len());
        }
        groups.push(vec![i]);
    }
    groups
}

#[cfg(test)]
mod tests {
    use ckstream_format::testutil::{craft, open_in_memory, read_index, rewrite_index};
    use ckstream_format::{CodecId, Entry, EntryKind, Error};

    use crate::unpack::{unpack, UnpackOptions, UnpackStats};

    fn file(path: &str) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File as i32,
            mode: 0o644,
            ..Default::default()
        }
    }

    /// Two files whose index chunks point at one zstd frame but disagree about its
    /// decoded length: the second one's part lies past the end of the frame as the first
    /// one describes it. Restoring them as one group cut past the frame (a panic); now
    /// each is decoded on its own and the second one fails its length check.
    #[test]
    fn chunks_that_disagree_about_a_shared_frame_are_refused_without_a_panic() {
        let frame = zstd::bulk::compress(b"hello world", 1).unwrap();
        let mut bytes = craft(vec![
            (file("a"), Some(frame.clone())),
            (
                Entry {
                    size: 8,
                    ..file("b")
                },
                None,
            ),
        ]);
        let mut index = read_index(&bytes);
        let mut a = index.chunks[0].clone();
        a.codec = CodecId::Zstd as u32;
        a.frame_raw_len = 11;
        a.raw_len = 5;
        a.digest = blake3::hash(b"hello").as_bytes().to_vec();
        index.entries[0].size = 5;
        let b = ckstream_format::Chunk {
            frame_raw_len: 20,
            frame_offset: 12,
            raw_len: 8,
            ..a.clone()
        };
        index.chunks = vec![a, b];
        index.entries[1].first_chunk = 1;
        index.entries[1].chunk_count = 1;
        rewrite_index(&mut bytes, &index);
        let reader = open_in_memory(&[bytes]).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let opts = UnpackOptions {
            threads: 1,
            ..Default::default()
        };
        let err = unpack(&reader, dest.path(), &[], &opts, &UnpackStats::default()).unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err}");
    }
}
