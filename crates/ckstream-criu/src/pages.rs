//! Memory pages for a lazy restore, straight from the archive: [`PageFile`] reads byte
//! ranges of one `pages-<id>.img` entry, every chunk digest-checked, with read-ahead
//! workers decoding chunks in ascending order ahead of the requests (CRIU's lazy-pages
//! daemon pushes each process's memory in ascending address order, which is file
//! order); a request for a chunk not yet decoded reads it at once, ahead of them.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use ckstream_format::{ArchiveReader, Chunk};

use crate::error::{CriuError, Result};

/// Decoded chunks held ahead of the requests, per pages file.
pub const READ_AHEAD_BYTES: u64 = 32 << 20;

struct State {
    cached: BTreeMap<usize, Arc<Vec<u8>>>,
    decoding: HashSet<usize>,
    /// Next chunk a read-ahead worker takes.
    next: usize,
    /// Chunks below this one have been served in order: not kept, not read ahead.
    cursor: usize,
    /// A read-ahead worker's error, for the next request.
    failed: Option<ckstream_format::Error>,
    started: bool,
    stopped: bool,
}

/// Part of a page range: bytes of a decoded chunk, or zeros.
pub enum Piece {
    /// This range of a decoded (and checked) chunk.
    Data(Arc<Vec<u8>>, std::ops::Range<usize>),
    /// This many zero bytes (a hole in the file).
    Zeros(u64),
}

/// Byte counts of what a [`PageFile`] served.
#[derive(Debug, Default)]
pub struct PageCounters {
    /// Bytes served from chunks read ahead.
    pub prefetched: AtomicU64,
    /// Bytes whose chunk was read when the request came.
    pub on_demand: AtomicU64,
}

/// One `pages-<id>.img` of the archive (see the module documentation).
pub struct PageFile {
    reader: Arc<ArchiveReader>,
    entry: usize,
    chunks: Vec<Chunk>,
    window: usize,
    state: Mutex<State>,
    changed: Condvar,
    /// What was served, and how.
    pub counters: PageCounters,
}

impl PageFile {
    /// Entry `entry` of `reader`; [`PageFile::start_read_ahead`] starts the workers.
    pub fn new(reader: Arc<ArchiveReader>, entry: usize) -> Arc<PageFile> {
        let chunks = reader.chunks_of(entry).to_vec();
        let typical = chunks
            .first()
            .map_or(1 << 20, |c| u64::from(c.raw_len).max(1));
        Arc::new(PageFile {
            window: (READ_AHEAD_BYTES / typical).max(2) as usize,
            reader,
            entry,
            chunks,
            state: Mutex::new(State {
                cached: BTreeMap::new(),
                decoding: HashSet::new(),
                next: 0,
                cursor: 0,
                failed: None,
                started: false,
                stopped: false,
            }),
            changed: Condvar::new(),
            counters: PageCounters::default(),
        })
    }

    /// Starts `workers` threads reading chunks ahead, from `first_offset` on, in file
    /// order (once: later calls do nothing); they end at the end of the file or on
    /// [`PageFile::stop`].
    pub fn start_read_ahead(self: &Arc<Self>, workers: usize, first_offset: u64) {
        {
            let mut st = self.state.lock().unwrap();
            if st.started {
                return;
            }
            st.started = true;
            st.next = self
                .chunks
                .partition_point(|c| c.file_end() <= first_offset);
            st.cursor = st.next;
        }
        self.reader.will_read_entry(self.entry);
        for _ in 0..workers.max(1) {
            let me = self.clone();
            std::thread::spawn(move || me.read_ahead());
        }
    }

    fn read_ahead(&self) {
        let mut st = self.state.lock().unwrap();
        loop {
            if st.stopped || st.failed.is_some() || st.next >= self.chunks.len() {
                return;
            }
            let i = st.next;
            if i >= st.cursor + self.window {
                st = self.changed.wait(st).unwrap();
                continue;
            }
            st.next += 1;
            if st.cached.contains_key(&i) || !st.decoding.insert(i) {
                continue;
            }
            drop(st);
            let r = self.decode(i);
            st = self.state.lock().unwrap();
            st.decoding.remove(&i);
            match r {
                Ok(data) if i >= st.cursor => {
                    st.cached.insert(i, data);
                }
                Ok(_) => {}
                Err(e) => {
                    st.failed.get_or_insert(e);
                }
            }
            self.changed.notify_all();
        }
    }

    fn decode(&self, i: usize) -> ckstream_format::Result<Arc<Vec<u8>>> {
        let entry = &self.reader.entries()[self.entry];
        self.reader.read_chunk(entry, &self.chunks[i]).map(Arc::new)
    }

    /// Chunk `i`, decoded and checked: from the read-ahead, or read now.
    fn chunk(&self, i: usize, len: u64) -> Result<Arc<Vec<u8>>> {
        let mut st = self.state.lock().unwrap();
        loop {
            if let Some(e) = st.failed.take() {
                st.stopped = true;
                return Err(e.into());
            }
            if let Some(d) = st.cached.get(&i) {
                self.counters.prefetched.fetch_add(len, Ordering::Relaxed);
                return Ok(d.clone());
            }
            if !st.decoding.contains(&i) {
                break;
            }
            st = self.changed.wait(st).unwrap();
        }
        st.decoding.insert(i);
        drop(st);
        let r = self.decode(i);
        let mut st = self.state.lock().unwrap();
        st.decoding.remove(&i);
        if let Ok(d) = &r {
            if i >= st.cursor && i < st.cursor + self.window {
                st.cached.insert(i, d.clone());
            }
        }
        self.changed.notify_all();
        self.counters.on_demand.fetch_add(len, Ordering::Relaxed);
        Ok(r?)
    }

    /// Bytes `offset..offset + len` of the file, as pieces of decoded chunks and runs of
    /// zeros (holes), without copying them. `in_order` says the request continues the
    /// ascending push: chunks before it are then dropped and the read-ahead moves on.
    ///
    /// # Errors
    /// The archive's errors (digest mismatch, I/O), also those a read-ahead worker met.
    pub fn pieces(&self, offset: u64, len: u64, in_order: bool) -> Result<Vec<Piece>> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| CriuError::Protocol("page range overflows".into()))?;
        let mut out = Vec::new();
        let mut pos = offset;
        let mut i = self.chunks.partition_point(|c| c.file_end() <= offset);
        while pos < end {
            let Some(c) = self.chunks.get(i).filter(|c| c.file_offset < end) else {
                out.push(Piece::Zeros(end - pos));
                break;
            };
            if c.file_offset > pos {
                out.push(Piece::Zeros(c.file_offset - pos));
                pos = c.file_offset;
            }
            let take = c.file_end().min(end) - pos;
            let data = self.chunk(i, take)?;
            let from = (pos - c.file_offset) as usize;
            out.push(Piece::Data(data, from..from + take as usize));
            pos += take;
            i += 1;
        }
        if in_order {
            let last = self
                .chunks
                .partition_point(|c| c.file_end() <= end.saturating_sub(1));
            let mut st = self.state.lock().unwrap();
            if last > st.cursor {
                st.cursor = last;
                st.cached = st.cached.split_off(&last);
                st.next = st.next.max(last);
                self.changed.notify_all();
            }
        }
        Ok(out)
    }

    /// Appends bytes `offset..offset + len` of the file to `out` (see [`PageFile::pieces`]).
    ///
    /// # Errors
    /// As [`PageFile::pieces`].
    pub fn read(&self, offset: u64, len: u64, in_order: bool, out: &mut Vec<u8>) -> Result<()> {
        for piece in self.pieces(offset, len, in_order)? {
            match piece {
                Piece::Data(data, range) => out.extend_from_slice(&data[range]),
                Piece::Zeros(n) => out.resize(out.len() + n as usize, 0),
            }
        }
        Ok(())
    }

    /// Stops the read-ahead workers (they finish the chunk they decode).
    pub fn stop(&self) {
        self.state.lock().unwrap().stopped = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use ckstream_format::testutil::{open_in_memory, MemSink};
    use ckstream_format::{ArchiveWriter, Compression, Entry, EntryKind, WriterOptions};

    use super::*;

    const CHUNK: usize = 64 << 10;

    /// A pages file of 20 chunks with a hole (chunks 5 and 6 not stored).
    fn archive() -> (Vec<u8>, Vec<u8>) {
        let len = 20 * CHUNK;
        let mut content: Vec<u8> = (0..len).map(|i| (i / 4096 * 7 + i % 251) as u8).collect();
        content[5 * CHUNK..7 * CHUNK].fill(0);
        let (sinks, boxed) = MemSink::many(1);
        let opts = WriterOptions {
            compression: Compression::zstd(1),
            chunk_size: CHUNK as u32,
            threads: 2,
            ..Default::default()
        };
        let mut w = ArchiveWriter::new(boxed, opts, [5; 16], 0).unwrap();
        let id = w
            .add_entry(Entry {
                path: b"criu/pages-1.img".to_vec(),
                kind: EntryKind::File as i32,
                size: len as u64,
                ..Default::default()
            })
            .unwrap();
        for k in (0..20).filter(|k| !(5..7).contains(k)) {
            w.add_data(
                id,
                (k * CHUNK) as u64,
                content[k * CHUNK..(k + 1) * CHUNK].to_vec(),
                None,
            )
            .unwrap();
        }
        w.finish().unwrap();
        (sinks[0].take(), content)
    }

    #[test]
    fn ranges_read_back_in_and_out_of_order_with_holes() {
        let (bytes, content) = archive();
        let reader = Arc::new(open_in_memory(&[bytes]).unwrap());
        let file = PageFile::new(reader, 0);
        file.start_read_ahead(2, 4096);
        // A fault far ahead, then the ascending push across the hole, then a fault
        // behind the push (a page served twice, as after a fork).
        let mut reads = vec![(17 * CHUNK as u64 + 4096, 4096, false)];
        let mut off = 4096;
        while off < content.len() as u64 {
            let n = (3 * 4096 * 5).min(content.len() as u64 - off);
            reads.push((off, n, true));
            off += n;
        }
        reads.push((4096, 4096, false));
        for (offset, len, in_order) in reads {
            let mut out = Vec::new();
            file.read(offset, len, in_order, &mut out).unwrap();
            assert!(
                out == content[offset as usize..(offset + len) as usize],
                "bytes at {offset}+{len}"
            );
        }
        let served = file.counters.prefetched.load(Ordering::Relaxed)
            + file.counters.on_demand.load(Ordering::Relaxed);
        assert!(served > 0);
        file.stop();
    }

    #[test]
    fn a_bad_chunk_fails_the_request_that_needs_it_or_the_next_one() {
        let (mut bytes, _) = archive();
        let reader = open_in_memory(std::slice::from_ref(&bytes)).unwrap();
        let bad = reader.chunks_of(0)[9].clone();
        bytes[bad.offset as usize + 5] ^= 1;
        let reader = Arc::new(open_in_memory(&[bytes]).unwrap());
        let file = PageFile::new(reader, 0);
        file.start_read_ahead(2, 0);
        let mut off = 0;
        let err = loop {
            let mut out = Vec::new();
            match file.read(off, 4 * 4096, true, &mut out) {
                Ok(()) => off += 4 * 4096,
                Err(e) => break e,
            }
            assert!(off < bad.file_end(), "the bad chunk was served");
        };
        assert!(
            matches!(err, CriuError::Archive(ref e) if e.is_bad_archive()),
            "{err}"
        );
    }
}
