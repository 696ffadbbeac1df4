//! Restoring file data, a batch of open files at a time.
//!
//! Files are created at their full size before any data is written and join a batch; a
//! batch's chunks are restored in parallel, then each file gets its metadata. Every chunk
//! is read and verified against its digest *before* anything reaches the output, so a
//! corrupt archive never leaves wrong bytes behind: when any chunk of a batch fails (or
//! the extraction is interrupted), every file of the batch is removed, complete or not,
//! and only files whose data was all written and verified remain.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use ckstream_format::reader::decode_chunk;
use ckstream_format::{ArchiveReader, Chunk, CodecId, Entry, Error, Result};
use ckstream_store::{clone_or_copy_range, CopyMethod};
use rustix::fs::AtFlags;

use super::dirs::{ferr, last_component, os, DirCache};
use super::meta::apply_meta_fd;
use super::{UnpackOptions, UnpackStats};

/// One chunk to restore into an open output file.
pub(super) struct ChunkJob<'a> {
    pub(super) slot: usize,
    pub(super) entry: &'a Entry,
    pub(super) chunk: &'a Chunk,
}

/// Reads, verifies and writes one chunk: reflink from the archive when the chunk is
/// uncompressed and aligned, else copy_file_range, else pwrite of the verified bytes.
/// Bytes are verified *before* anything reaches the output.
fn restore_chunk(
    reader: &ArchiveReader,
    out: &File,
    job: &ChunkJob,
    opts: &UnpackOptions,
    stats: &UnpackStats,
) -> Result<()> {
    let c = job.chunk;
    let stored = reader.read_stored(c)?;
    let data = decode_chunk(job.entry, c, stored)?;
    let werr = |e: io::Error| ferr(&job.entry.path, "cannot write", e);
    let src = reader.shard(c.shard).as_file();
    let block = 4096u64;
    let mut done = 0u64;
    if let (true, Some(src), Some(CodecId::None), false) =
        (opts.reflink, src, c.codec_id(), c.in_shared_frame())
    {
        if c.offset % block == c.file_offset % block && c.file_offset % block == 0 {
            let whole = c.raw_len as u64 - c.raw_len as u64 % block;
            if whole > 0 {
                match clone_or_copy_range(src, c.offset, out, c.file_offset, whole, block)
                    .map_err(werr)?
                {
                    CopyMethod::Cloned => {
                        stats.cloned_bytes.fetch_add(whole, Ordering::Relaxed);
                        done = whole;
                    }
                    CopyMethod::KernelCopy => {
                        stats
                            .kernel_copied_bytes
                            .fetch_add(whole, Ordering::Relaxed);
                        done = whole;
                    }
                    CopyMethod::NotDone => {}
                }
            }
        }
    }
    if done < data.len() as u64 {
        out.write_all_at(&data[done as usize..], c.file_offset + done)
            .map_err(werr)?;
    }
    stats.bytes.fetch_add(c.raw_len as u64, Ordering::Relaxed);
    Ok(())
}

/// Restores several small files from one shared frame: one read, one decode, a digest
/// check per file, then one write per file.
fn restore_shared_frame(
    reader: &ArchiveReader,
    batch: &[OpenFile],
    jobs: &[ChunkJob],
    group: &[usize],
    stats: &UnpackStats,
) -> Result<()> {
    let first = jobs[group[0]].chunk;
    let what = || {
        format!(
            "shared frame at shard {} offset {}",
            first.shard, first.offset
        )
    };
    let stored = reader.read_stored(first)?;
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
        batch[job.slot]
            .file
            .write_all_at(part, c.file_offset)
            .map_err(|e| ferr(&job.entry.path, "cannot write", e))?;
        stats.bytes.fetch_add(c.raw_len as u64, Ordering::Relaxed);
    }
    Ok(())
}

pub(super) struct OpenFile<'a> {
    pub(super) file: File,
    /// Metadata to apply: the entry itself, or for a hard link whose target was not
    /// extracted, the target's metadata under the link's path.
    pub(super) entry: std::borrow::Cow<'a, Entry>,
    pub(super) dir: Vec<u8>,
}

/// Restores a batch of open files: all their chunks in parallel, then metadata.
/// On failure removes the files of the batch that were not completed.
pub(super) fn flush_batch(
    reader: &ArchiveReader,
    batch: &mut Vec<OpenFile>,
    jobs: &mut Vec<ChunkJob>,
    cache: &mut DirCache,
    opts: &UnpackOptions,
    stats: &UnpackStats,
) -> Result<()> {
    // Small files that share one compressed frame are restored together, so the frame
    // is read and decoded once.
    let mut groups: Vec<Vec<usize>> = Vec::with_capacity(jobs.len());
    let mut frame_group: HashMap<(u32, u64), usize> = HashMap::new();
    for (i, job) in jobs.iter().enumerate() {
        let c = job.chunk;
        if c.in_shared_frame() {
            if let Some(&g) = frame_group.get(&(c.shard, c.offset)) {
                groups[g].push(i);
                continue;
            }
            frame_group.insert((c.shard, c.offset), groups.len());
        }
        groups.push(vec![i]);
    }
    let next = AtomicU64::new(0);
    let threads = opts.threads.max(1).min(groups.len().max(1));
    let result = std::thread::scope(|s| -> Result<()> {
        let work = || -> Result<()> {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(group) = groups.get(i) else {
                    return Ok(());
                };
                if opts.stop.requested() {
                    next.store(u64::MAX / 2, Ordering::Relaxed);
                    return Err(Error::interrupted("extracting"));
                }
                let r = if group.len() == 1 {
                    let job = &jobs[group[0]];
                    restore_chunk(reader, &batch[job.slot].file, job, opts, stats)
                } else {
                    restore_shared_frame(reader, batch, jobs, group, stats)
                };
                if let Err(e) = r {
                    next.store(u64::MAX / 2, Ordering::Relaxed);
                    return Err(e);
                }
            }
        };
        let handles: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut first = work().err();
        for h in handles {
            if let Ok(Err(e)) = h.join() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    });
    let result = result.and_then(|()| {
        for f in batch.iter() {
            apply_meta_fd(&f.file, &f.entry, opts)?;
        }
        Ok(())
    });
    if result.is_err() {
        // A file whose data could not be verified is not left behind looking complete.
        discard_batch(batch, cache);
    }
    batch.clear();
    jobs.clear();
    result
}

/// Removes the files of `batch` (created, their data not all written).
pub(super) fn discard_batch(batch: &mut Vec<OpenFile>, cache: &mut DirCache) {
    for f in batch.drain(..) {
        if let Ok(dir) = cache.dir(&f.dir) {
            let _ = rustix::fs::unlinkat(dir, os(last_component(&f.entry.path)), AtFlags::empty());
        }
    }
}
