//! Serve: archive entries under `criu/` → CRIU, on demand, without buffering the image.
//!
//! Every CRIU request gets its own thread, so files can be opened in any order,
//! concurrently, or more than once. A file's chunks are read, verified and
//! decompressed by a few decoder threads ahead of the pipe (bounded: at most two
//! chunks per decoder), and written to CRIU's pipe in order; holes are sent as zeros.
//! No byte reaches CRIU before its chunk digest has been checked.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckstream_format::budget::{chunk_cost, Budget, Lease, CHUNK_MEMORY};
use ckstream_format::{ArchiveReader, EntryKind, Stop};
use crossbeam_channel::bounded;

use crate::error::{CriuError, Result};
use crate::proto::{read_message, write_message, ReplyEntry, RequestEntry};
use crate::socket::{self, check_stop};

/// Settings of one serve.
pub struct ServeOptions {
    /// How long to wait for CRIU to connect.
    pub accept_timeout: Duration,
    /// Longest wait for CRIU's next request.
    pub idle_timeout: Duration,
    /// Decoder threads per file.
    pub decoders: usize,
    /// Pipe size to ask for (F_SETPIPE_SZ).
    pub pipe_size: usize,
    /// External files to send out: archive name and the write end of a pipe/file.
    pub ext_files: Vec<(String, OwnedFd)>,
    /// Image files served from these bytes instead of the archive (a lazy restore's
    /// rewritten pagemaps and reduced page files).
    pub replace: HashMap<String, Arc<Vec<u8>>>,
    /// Called while waiting for CRIU; an error aborts the serve (e.g. CRIU exited).
    pub watch: Option<Box<dyn FnMut() -> Result<()> + Send>>,
    /// Polled while waiting for CRIU: once true the serve ends with
    /// [`CriuError::Interrupted`] (the binary passes its SIGINT/SIGTERM flag).
    pub stop: Stop,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            accept_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(600),
            decoders: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            pipe_size: 4 << 20,
            ext_files: Vec::new(),
            replace: HashMap::new(),
            watch: None,
            stop: Stop::NEVER,
        }
    }
}

/// What a serve did.
#[derive(Debug, Default, Clone)]
pub struct ServeReport {
    /// Requests CRIU made.
    pub requests: u64,
    /// Files sent.
    pub served: u64,
    /// Files CRIU asked for that the archive does not hold (CRIU asks for optional ones).
    pub missing: Vec<String>,
    /// Bytes sent to CRIU.
    pub bytes: u64,
    /// From start to end of the serve.
    pub duration: Duration,
}

/// One chunk ready to go out: decoded bytes, or an uncompressed range of a local shard
/// file (already verified; of this archive or of the parent holding the chunk) to splice
/// into the pipe without copying it through us.
enum Piece<'a> {
    Bytes(Vec<u8>),
    Splice {
        file: &'a File,
        offset: u64,
        len: usize,
    },
}

/// Reads and verifies chunk `c`; uncompressed chunks of a local shard are handed back as
/// a range to splice when `out` is a pipe.
fn prepare<'a>(
    reader: &'a ArchiveReader,
    entry: &ckstream_format::Entry,
    c: &ckstream_format::Chunk,
    splice_ok: bool,
) -> ckstream_format::Result<Piece<'a>> {
    let raw = c.codec_id() == Some(ckstream_format::CodecId::None);
    if splice_ok && raw && !c.in_shared_frame() {
        if let Some(file) = reader.raw_file_of(c) {
            let stored = reader.read_stored(c)?;
            ckstream_format::reader::verify_digest(&stored, &c.digest, || {
                format!("{:?} at offset {}", entry.path_lossy(), c.file_offset)
            })?;
            // A parent's chunk lies at the same offset of the parent's own shard.
            return Ok(Piece::Splice {
                file,
                offset: c.offset,
                len: c.raw_len as usize,
            });
        }
    }
    reader.read_chunk(entry, c).map(Piece::Bytes)
}

/// Chunks a decoder takes at once: consecutive ones up to `max_bytes` (at most 64 of
/// them; one alone when it is larger).
fn chunk_runs(chunks: &[ckstream_format::Chunk], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        if i > start && (bytes + u64::from(c.raw_len) > max_bytes || i - start >= 64) {
            runs.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += u64::from(c.raw_len);
    }
    if start < chunks.len() {
        runs.push(start..chunks.len());
    }
    runs
}

/// The run holding chunk `i` (runs are sorted and cover every chunk).
fn i_run(runs: &[std::ops::Range<usize>], i: usize) -> usize {
    runs.partition_point(|r| r.end <= i)
}

/// A private pipe collecting spliced ranges before they go to CRIU's pipe together.
struct Gather {
    read: OwnedFd,
    write: OwnedFd,
    /// Pipe buffers (one per page or part of a page) it has room for...
    slots: usize,
    /// ...and holds: a range takes one per page it touches, so an unaligned one more.
    used: usize,
    pending: usize,
}

/// How much a [`Gather`] pipe holds.
const GATHER_PIPE: usize = 256 << 10;
const PAGE: u64 = 4096;

impl Gather {
    fn new() -> Option<Self> {
        let (read, write) = ckstream_store::pipe::sized_pipe(GATHER_PIPE)
            .ok()
            .flatten()?;
        Some(Gather {
            read,
            write,
            slots: GATHER_PIPE / PAGE as usize,
            used: 0,
            pending: 0,
        })
    }

    /// Takes `len` bytes of `src` at `offset`, sending what it holds to `out` first when
    /// they would not fit (splicing into a full pipe of our own would wait forever).
    /// Returns false on EPIPE.
    fn add(&mut self, src: &File, offset: u64, len: usize, out: &File) -> io::Result<bool> {
        let pages = ((offset % PAGE + len as u64).div_ceil(PAGE)) as usize;
        if pages > self.slots {
            return Ok(self.flush(out)? && splice_all(src, offset, len, out)?);
        }
        if self.used + pages > self.slots && !self.flush(out)? {
            return Ok(false);
        }
        splice_all(src, offset, len, &self.write)?;
        self.used += pages;
        self.pending += len;
        Ok(true)
    }

    /// Sends everything held to `out`. Returns false on EPIPE.
    fn flush(&mut self, out: &File) -> io::Result<bool> {
        if self.pending == 0 {
            return Ok(true);
        }
        let n = self.pending;
        self.pending = 0;
        self.used = 0;
        match ckstream_store::pipe::splice_exact(self.read.as_fd(), out.as_fd(), n) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PIPE.raw_os_error()) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Moves `len` bytes of `src` at `offset` into the pipe `out`. Returns false on EPIPE.
fn splice_all(src: &File, mut offset: u64, mut len: usize, out: impl AsFd) -> io::Result<bool> {
    let out = out.as_fd();
    while len > 0 {
        match rustix::pipe::splice(
            src,
            Some(&mut offset),
            out,
            None,
            len,
            rustix::pipe::SpliceFlags::MORE,
        ) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => len -= n,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::PIPE) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Writes entry `index` of `reader` to `out` (a pipe or a file): chunks are read,
/// verified and decoded by `decoders` threads ahead of the writer, and go out in order,
/// holes as zeros; verified uncompressed chunks of a local shard are spliced into a pipe.
/// Returns bytes written. A reader that goes away (EPIPE) ends the copy early without error.
///
/// # Errors
/// Digest, corruption and I/O errors of the archive; write errors other than EPIPE.
pub fn stream_entry(
    reader: &ArchiveReader,
    index: usize,
    out: &File,
    decoders: usize,
    counter: &AtomicU64,
) -> Result<u64> {
    let entry = &reader.entries()[index];
    let chunks = reader.chunks_of(index);
    reader.will_read_entry(index);
    // Decoders take runs of chunks: about a megabyte from local shards, a quarter from
    // object storage, whose read-ahead keeps 16 MiB per shard (six decoders a quarter
    // megabyte apart stay inside it; a chunk at a time cost a thread switch per 28 KiB:
    // 5.0 CPU-s instead of 3.8 for a 2 GiB restore).
    let local = chunks
        .first()
        .is_some_and(|c| reader.raw_file_of(c).is_some());
    let runs = chunk_runs(chunks, if local { 1 << 20 } else { 256 << 10 });
    let k = decoders.clamp(1, runs.len().max(1));
    let splice_ok = out
        .metadata()
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    let mut written = 0u64;
    let sent = |n: usize, written: &mut u64| {
        *written += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    };
    let err = |e: io::Error| CriuError::io(format!("sending {} to CRIU", entry.path_lossy()), e);
    let write = |data: &[u8], written: &mut u64| -> Result<bool> {
        match (&mut &*out).write_all(data) {
            Ok(()) => {
                sent(data.len(), written);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(err(e)),
        }
    };
    let write_zeros = |mut n: u64, written: &mut u64| -> Result<bool> {
        while n > 0 {
            let m = n.min(ZEROS.len() as u64) as usize;
            if !write(&ZEROS[..m], written)? {
                return Ok(false);
            }
            n -= m as u64;
        }
        Ok(true)
    };
    // Decoded chunks waiting to go out hold at most this much (with one larger chunk
    // alone), however many decoders run and whatever sizes the archive claims. Leases
    // are taken in chunk order, so the chunk the writer waits for never waits for memory
    // that only chunks after it hold.
    let budget = Budget::new(CHUNK_MEMORY);
    let budget = &budget;
    std::thread::scope(|s| -> Result<u64> {
        // However the writer stops, decoders waiting for their turn must not wait on.
        let _close = budget.close_on_drop();
        // Decoders take runs of consecutive chunks (about a megabyte) in turn: handing
        // over each 51 KiB chunk on its own cost more in wake-ups than reading it.
        let mut rxs = Vec::new();
        for t in 0..k {
            type Prepared<'a> = (Vec<ckstream_format::Result<Piece<'a>>>, Option<Lease<'a>>);
            let (tx, rx) = bounded::<Prepared<'_>>(2);
            rxs.push(rx);
            let runs = &runs;
            s.spawn(move || {
                for (r, run) in runs.iter().enumerate().skip(t).step_by(k) {
                    let cost = chunks[run.clone()].iter().map(chunk_cost).sum();
                    let Some(lease) = budget.take_in_turn(r as u64, cost) else {
                        return;
                    };
                    let mut pieces = Vec::with_capacity(run.len());
                    for c in &chunks[run.clone()] {
                        let piece = prepare(reader, entry, c, splice_ok);
                        let failed = piece.is_err();
                        pieces.push(piece);
                        if failed {
                            break;
                        }
                    }
                    let stop = pieces.last().is_some_and(|p| p.is_err());
                    // Ranges to splice hold no memory once they are verified.
                    let holds = pieces.iter().any(|p| matches!(p, Ok(Piece::Bytes(_))));
                    if tx.send((pieces, holds.then_some(lease))).is_err() || stop {
                        return;
                    }
                }
            });
        }
        let mut pos = 0u64;
        let mut gather = splice_ok.then(Gather::new).flatten();
        let mut pending = Vec::new().into_iter();
        let mut _lease = None;
        for (i, c) in chunks.iter().enumerate() {
            let prepared = match pending.next() {
                Some(p) => p,
                None => {
                    let run = i_run(&runs, i);
                    let (pieces, lease) = rxs[run % k]
                        .recv()
                        .map_err(|_| CriuError::Protocol("decoder thread stopped".into()))?;
                    _lease = lease;
                    pending = pieces.into_iter();
                    pending
                        .next()
                        .ok_or_else(|| CriuError::Protocol("decoder sent an empty run".into()))?
                }
            };
            let piece = match prepared {
                Ok(p) => p,
                Err(e) => {
                    // What came before the bad chunk is good: CRIU gets all of it, then
                    // a short image (never wrong memory).
                    if let Some(g) = gather.as_mut() {
                        let _ = g.flush(out);
                    }
                    return Err(e.into());
                }
            };
            let gap = c.file_offset - pos;
            let more = match piece {
                // Contiguous verified ranges are gathered in a pipe of our own and moved
                // to CRIU's a quarter megabyte at a time: one splice per chunk into CRIU's pipe
                // would fight its reader for the pipe's lock every few dozen KiB.
                Piece::Splice { file, offset, len } if gap == 0 => {
                    let ok = match gather.as_mut() {
                        Some(g) => g.add(file, offset, len, out).map_err(err)?,
                        None => splice_all(file, offset, len, out).map_err(err)?,
                    };
                    if ok {
                        sent(len, &mut written);
                    }
                    ok
                }
                piece => {
                    let flushed = match gather.as_mut() {
                        Some(g) => g.flush(out).map_err(err)?,
                        None => true,
                    };
                    flushed
                        && write_zeros(gap, &mut written)?
                        && match piece {
                            Piece::Bytes(data) => write(&data, &mut written)?,
                            Piece::Splice { file, offset, len } => {
                                let ok = splice_all(file, offset, len, out).map_err(err)?;
                                if ok {
                                    sent(len, &mut written);
                                }
                                ok
                            }
                        }
                }
            };
            if !more {
                return Ok(written);
            }
            pos = c.file_end();
        }
        if let Some(g) = gather.as_mut() {
            if !g.flush(out).map_err(err)? {
                return Ok(written);
            }
        }
        write_zeros(entry.size - pos, &mut written)?;
        Ok(written)
    })
}

/// Streams entry `i` into `fd` on a new thread; its error, if any, goes to `first_error`.
fn spawn_transfer(
    reader: &Arc<ArchiveReader>,
    i: usize,
    fd: OwnedFd,
    decoders: usize,
    bytes: &Arc<AtomicU64>,
    first_error: &Arc<Mutex<Option<CriuError>>>,
) -> std::thread::JoinHandle<()> {
    let (reader, bytes, first_error) = (reader.clone(), bytes.clone(), first_error.clone());
    std::thread::spawn(move || {
        let out = File::from(fd);
        if let Err(e) = stream_entry(&reader, i, &out, decoders, &bytes) {
            first_error.lock().unwrap().get_or_insert(e);
        }
    })
}

/// Serves `reader` on an already bound `listener` until CRIU closes the connection.
/// `on_ready` runs once the socket is listening (for `socket-init`).
///
/// # Errors
/// Protocol, timeout, interrupt errors, and the first error of any file transfer
/// (a digest mismatch closes that file's pipe early, so CRIU fails the restore).
pub fn serve(
    listener: &UnixListener,
    reader: Arc<ArchiveReader>,
    mut opts: ServeOptions,
) -> Result<ServeReport> {
    let started = Instant::now();
    let mut sock =
        socket::accept_watched(listener, opts.accept_timeout, &mut opts.watch, opts.stop)?;
    let bytes = Arc::new(AtomicU64::new(0));
    let bytes_sent = bytes.clone();
    let first_error: Arc<Mutex<Option<CriuError>>> = Arc::new(Mutex::new(None));
    let mut report = ServeReport::default();
    let mut workers = Vec::new();
    for (name, fd) in opts.ext_files {
        let Some(i) = reader.find(name.as_bytes()) else {
            return Err(CriuError::Protocol(format!(
                "external file {name} is not in the archive"
            )));
        };
        workers.push(spawn_transfer(
            &reader,
            i,
            fd,
            opts.decoders,
            &bytes,
            &first_error,
        ));
    }
    loop {
        check_stop(opts.stop)?;
        if let Some(e) = first_error.lock().unwrap().take() {
            return Err(e);
        }
        socket::wait_readable(&sock, opts.idle_timeout, "CRIU's next request", opts.stop)?;
        let Some(req) = read_message::<RequestEntry>(&mut sock)? else {
            break;
        };
        report.requests += 1;
        if let Some(bytes) = opts.replace.get(&req.filename) {
            write_message(&mut sock, &ReplyEntry { exists: true })?;
            let fd = socket::recv_fd(&sock)?;
            report.served += 1;
            let (bytes, counter) = (bytes.clone(), bytes_sent.clone());
            workers.push(std::thread::spawn(move || {
                // A reader that went away (EPIPE) is CRIU's business, as in stream_entry.
                if File::from(fd).write_all(&bytes).is_ok() {
                    counter.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
            }));
            continue;
        }
        let found = reader
            .find(&crate::image_path(&req.filename))
            .filter(|&i| reader.entries()[i].entry_kind() == EntryKind::File);
        write_message(
            &mut sock,
            &ReplyEntry {
                exists: found.is_some(),
            },
        )?;
        let Some(i) = found else {
            report.missing.push(req.filename);
            continue;
        };
        let fd = socket::recv_fd(&sock)?;
        socket::enlarge_pipe(&fd, opts.pipe_size);
        report.served += 1;
        workers.push(spawn_transfer(
            &reader,
            i,
            fd,
            opts.decoders,
            &bytes,
            &first_error,
        ));
        workers.retain(|w| !w.is_finished());
    }
    for w in workers {
        let _ = w.join();
    }
    if let Some(e) = first_error.lock().unwrap().take() {
        return Err(e);
    }
    report.bytes = bytes.load(Ordering::Relaxed);
    report.duration = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek};

    use ckstream_format::testutil::{open_in_memory, MemSink};
    use ckstream_format::{ArchiveWriter, Compression, Entry, EntryKind, WriterOptions};

    use super::*;

    const CHUNK: usize = 64 << 10;

    /// One file of 40 chunks (compressible, so decoded chunks are copies that take
    /// leases), in memory.
    fn archive() -> (Vec<u8>, Vec<u8>) {
        let content: Vec<u8> = (0..40 * CHUNK as u64 - 1000)
            .flat_map(|i| (i / 7).to_le_bytes())
            .take(40 * CHUNK - 1000)
            .collect();
        let (sinks, boxed) = MemSink::many(1);
        let opts = WriterOptions {
            compression: Compression::zstd(1),
            chunk_size: CHUNK as u32,
            threads: 2,
            ..Default::default()
        };
        let mut w = ArchiveWriter::new(boxed, opts, [4; 16], 0).unwrap();
        let id = w
            .add_entry(Entry {
                path: b"criu/pages-1.img".to_vec(),
                kind: EntryKind::File as i32,
                size: content.len() as u64,
                ..Default::default()
            })
            .unwrap();
        for (k, piece) in content.chunks(CHUNK).enumerate() {
            w.add_data(id, (k * CHUNK) as u64, piece.to_vec(), None)
                .unwrap();
        }
        w.finish().unwrap();
        (sinks[0].take(), content)
    }

    fn stream(bytes: Vec<u8>, decoders: usize) -> (Result<u64>, Vec<u8>) {
        let reader = open_in_memory(&[bytes]).unwrap();
        let mut out = tempfile::tempfile().unwrap();
        let result = stream_entry(&reader, 0, &out, decoders, &AtomicU64::new(0));
        let mut written = Vec::new();
        out.rewind().unwrap();
        out.read_to_end(&mut written).unwrap();
        (result, written)
    }

    #[test]
    fn chunks_go_out_in_order_whatever_the_decoders() {
        let (bytes, content) = archive();
        for decoders in [1, 3, 8] {
            let (result, written) = stream(bytes.clone(), decoders);
            assert_eq!(result.unwrap(), content.len() as u64);
            assert!(written == content, "{decoders} decoders");
        }
    }

    /// A bad chunk ends the transfer with its error: the decoders that wait for their
    /// turn behind it are released, nothing hangs, and nothing after it goes out.
    #[test]
    fn a_bad_chunk_stops_every_decoder() {
        let (mut bytes, _) = archive();
        let reader = open_in_memory(std::slice::from_ref(&bytes)).unwrap();
        let bad = reader.chunks_of(0)[17].clone();
        bytes[bad.offset as usize + 3] ^= 0x10;
        for decoders in [1, 4] {
            let (result, written) = stream(bytes.clone(), decoders);
            assert!(result.is_err(), "{decoders} decoders");
            assert!(written.len() as u64 <= bad.file_offset);
        }
    }
}
