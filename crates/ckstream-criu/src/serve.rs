//! Serve: archive entries under `criu/` → CRIU, on demand, without buffering the image.
//!
//! Every CRIU request gets its own thread, so files can be opened in any order,
//! concurrently, or more than once. A file's chunks are read, verified and
//! decompressed by a few decoder threads ahead of the pipe (bounded: at most two
//! chunks per decoder), and written to CRIU's pipe in order; holes are sent as zeros.
//! No byte reaches CRIU before its chunk digest has been checked.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckstream_format::{ArchiveReader, EntryKind};
use crossbeam_channel::bounded;

use crate::error::{CriuError, Result};
use crate::proto::{read_message, write_message, ReplyEntry, RequestEntry};
use crate::socket::{self, check_interrupted};

/// Settings of one serve.
pub struct ServeOptions {
    pub accept_timeout: Duration,
    /// Longest wait for CRIU's next request.
    pub idle_timeout: Duration,
    /// Decoder threads per file.
    pub decoders: usize,
    pub pipe_size: usize,
    /// External files to send out: archive name and the write end of a pipe/file.
    pub ext_files: Vec<(String, OwnedFd)>,
    /// Called while waiting for CRIU; an error aborts the serve (e.g. CRIU exited).
    pub watch: Option<Box<dyn FnMut() -> Result<()> + Send>>,
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
            watch: None,
        }
    }
}

/// What a serve did.
#[derive(Debug, Default, Clone)]
pub struct ServeReport {
    pub requests: u64,
    pub served: u64,
    pub missing: Vec<String>,
    pub bytes: u64,
    pub duration: Duration,
}

/// Writes entry `index` of `reader` to `out`: chunks decoded by `decoders` threads,
/// in order, holes as zeros. Returns bytes written. A reader that goes away (EPIPE)
/// ends the copy early without error.
///
/// # Errors
/// Digest, corruption and I/O errors of the archive; write errors other than EPIPE.
pub fn stream_entry(
    reader: &ArchiveReader,
    index: usize,
    out: &mut dyn Write,
    decoders: usize,
    counter: &AtomicU64,
) -> Result<u64> {
    let entry = &reader.entries()[index];
    let chunks = reader.chunks_of(index);
    let k = decoders.clamp(1, chunks.len().max(1));
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    let mut written = 0u64;
    let write = |out: &mut dyn Write, data: &[u8], written: &mut u64| -> Result<bool> {
        match out.write_all(data) {
            Ok(()) => {
                *written += data.len() as u64;
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(CriuError::io(
                format!("sending {} to CRIU", entry.path_lossy()),
                e,
            )),
        }
    };
    let write_zeros = |out: &mut dyn Write, mut n: u64, written: &mut u64| -> Result<bool> {
        while n > 0 {
            let m = n.min(ZEROS.len() as u64) as usize;
            if !write(out, &ZEROS[..m], written)? {
                return Ok(false);
            }
            n -= m as u64;
        }
        Ok(true)
    };
    std::thread::scope(|s| -> Result<u64> {
        let mut rxs = Vec::new();
        for t in 0..k {
            let (tx, rx) = bounded::<ckstream_format::Result<Vec<u8>>>(2);
            rxs.push(rx);
            s.spawn(move || {
                for c in chunks.iter().skip(t).step_by(k) {
                    let r = reader.read_chunk(entry, c);
                    let stop = r.is_err();
                    if tx.send(r).is_err() || stop {
                        return;
                    }
                }
            });
        }
        let mut pos = 0u64;
        for (i, c) in chunks.iter().enumerate() {
            let data = rxs[i % k]
                .recv()
                .map_err(|_| CriuError::Protocol("decoder thread stopped".into()))??;
            if !write_zeros(out, c.file_offset - pos, &mut written)?
                || !write(out, &data, &mut written)?
            {
                return Ok(written);
            }
            pos = c.file_end();
        }
        write_zeros(out, entry.size - pos, &mut written)?;
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
        let mut out = File::from(fd);
        if let Err(e) = stream_entry(&reader, i, &mut out, decoders, &bytes) {
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
    let mut sock = socket::accept_watched(listener, opts.accept_timeout, &mut opts.watch)?;
    let bytes = Arc::new(AtomicU64::new(0));
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
        check_interrupted()?;
        if let Some(e) = first_error.lock().unwrap().take() {
            return Err(e);
        }
        socket::wait_readable(&sock, opts.idle_timeout, "CRIU's next request")?;
        let Some(req) = read_message::<RequestEntry>(&mut sock)? else {
            break;
        };
        report.requests += 1;
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
