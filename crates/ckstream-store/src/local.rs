//! Local files, standard output and inherited fds as shard sinks and sources.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use ckstream_format::{Error, Result, ShardSink, ShardSource};

use crate::clone::{clone_or_copy_range, CopyMethod};
use crate::location::Writeback;

/// A shard being written to a regular file. Small writes (record headers, small
/// payloads) are gathered into one buffer and written with one `pwrite`; written data
/// is pushed to disk while the archive is being written, as [`Writeback`] says.
pub struct FileSink {
    file: File,
    /// Offset where the next byte goes (buffered bytes included).
    pos: u64,
    buf: Vec<u8>,
    name: String,
    /// Block size for reflinks; 0 disables cloning.
    block: u64,
    writeback: Writeback,
    /// Writeback has been started for the bytes before this offset...
    writeback_started: u64,
    /// ...and has completed for the bytes before this one.
    writeback_done: u64,
}

const SINK_BUFFER: usize = 1 << 20;

/// Payloads at least this long are written straight from the caller's memory, in one
/// vectored write with whatever the buffer holds (record header, padding), instead of
/// being copied into the buffer first.
const DIRECT_WRITE: usize = 16 << 10;

/// Writes all of `parts` in order with `write` (a `writev`/`pwritev` taking the offset
/// into the whole so far), however short the writes it makes.
fn write_all_vectored(
    parts: &[&[u8]],
    mut write: impl FnMut(&[io::IoSlice<'_>], u64) -> io::Result<usize>,
) -> io::Result<()> {
    let mut part = 0;
    let mut skip = 0;
    let mut done = 0u64;
    while part < parts.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&parts[part][skip..])
            .chain(parts[part + 1..].iter().copied())
            .filter(|p| !p.is_empty())
            .map(io::IoSlice::new)
            .collect();
        if slices.is_empty() {
            return Ok(());
        }
        let mut n = match write(&slices, done) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        done += n as u64;
        while n > 0 {
            let left = parts[part].len() - skip;
            if n < left {
                skip += n;
                n = 0;
            } else {
                n -= left;
                part += 1;
                skip = 0;
            }
        }
        while part < parts.len() && parts[part].len() == skip {
            part += 1;
            skip = 0;
        }
    }
    Ok(())
}

impl FileSink {
    /// Wraps an open, empty file.
    pub fn new(file: File, name: impl Into<String>, writeback: Writeback) -> Self {
        let block = rustix::fs::fstatfs(&file)
            .map(|s| s.f_bsize as u64)
            .unwrap_or(4096)
            .max(512);
        FileSink {
            file,
            pos: 0,
            buf: Vec::with_capacity(SINK_BUFFER),
            name: name.into(),
            block,
            writeback,
            writeback_started: 0,
            writeback_done: 0,
        }
    }

    fn flush_buffer(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let start = self.pos - self.buf.len() as u64;
            self.file.write_all_at(&self.buf, start)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Starts writeback of each full window handed to the kernel, and with a bound, waits
    /// for the oldest data once more than the bound is under way.
    fn push_to_disk(&mut self) -> io::Result<()> {
        if matches!(self.writeback, Writeback::Off | Writeback::Volatile) {
            return Ok(());
        }
        let handed = self.pos - self.buf.len() as u64;
        if handed - self.writeback_started < Writeback::WINDOW {
            return Ok(());
        }
        let start = self.writeback_started;
        if let Err(e) = sync_file_range(&self.file, start, handed - start, false) {
            return self.writeback_failed(e);
        }
        self.writeback_started = handed;
        if let Writeback::Bounded(bound) = self.writeback {
            if handed - self.writeback_done > bound {
                let until = handed - bound / 2;
                let from = self.writeback_done;
                if let Err(e) = sync_file_range(&self.file, from, until - from, true) {
                    return self.writeback_failed(e);
                }
                self.writeback_done = until;
            }
        }
        Ok(())
    }

    /// A file that cannot do ranged writeback (EINVAL, ENOSYS) is simply synced at the
    /// end; anything else (EIO, ENOSPC) is a write error.
    fn writeback_failed(&mut self, e: io::Error) -> io::Result<()> {
        if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            self.writeback = Writeback::Off;
            Ok(())
        } else {
            Err(e)
        }
    }
}

/// `sync_file_range(2)`: starts writeback of `offset..offset + len`, and with `wait`
/// also waits for it (and for writeback already under way there) to complete.
fn sync_file_range(file: &File, offset: u64, len: u64, wait: bool) -> io::Result<()> {
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: plain syscall on a descriptor we own; no memory is passed.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl ShardSink for FileSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.len() >= DIRECT_WRITE {
            let start = self.pos - self.buf.len() as u64;
            let file = &self.file;
            write_all_vectored(&[&self.buf[..], buf], |slices, done| {
                rustix::io::pwritev(file, slices, start + done).map_err(io::Error::from)
            })?;
            self.buf.clear();
        } else {
            if self.buf.len() + buf.len() > SINK_BUFFER {
                self.flush_buffer()?;
            }
            self.buf.extend_from_slice(buf);
        }
        self.pos += buf.len() as u64;
        self.push_to_disk()
    }

    fn clone_from(&mut self, src: &File, src_offset: u64, len: u64) -> io::Result<bool> {
        if self.block == 0 || src_offset % self.block != 0 || self.pos % self.block != 0 {
            return Ok(false);
        }
        self.flush_buffer()?;
        // Clone whole blocks; the tail (if any) is written by the caller's bytes
        // only when nothing could be cloned, so copy it here to keep one code path.
        let whole = len - len % self.block;
        if whole == 0 {
            return Ok(false);
        }
        match clone_or_copy_range(src, src_offset, &self.file, self.pos, whole, self.block)? {
            CopyMethod::Cloned => {}
            CopyMethod::KernelCopy => {
                // The bytes are in place, but not shared: later chunks are written from
                // memory (the caller has them anyway) instead of trying again.
                self.block = 0;
            }
            CopyMethod::NotDone => {
                self.block = 0;
                return Ok(false);
            }
        }
        if whole < len {
            let mut tail = vec![0u8; (len - whole) as usize];
            src.read_exact_at(&mut tail, src_offset + whole)?;
            self.file.write_all_at(&tail, self.pos + whole)?;
        }
        self.pos += len;
        Ok(true)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.flush_buffer()?;
        crate::failpoint::hit("sink.sync")?;
        if self.writeback == Writeback::Volatile {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// A shard written to standard output (a pipe or a redirected file): an [`FdSink`] on a
/// duplicate of fd 1, bypassing the standard library's line-buffered `Stdout` (which
/// would split binary data at every newline byte).
pub struct StdoutSink(FdSink);

impl StdoutSink {
    /// The process's standard output.
    ///
    /// # Errors
    /// [`Error::Usage`] when fd 1 is not open.
    pub fn new() -> Result<Self> {
        Ok(StdoutSink(FdSink::new(
            take_fd(1, "standard output")?,
            "stdout",
        )))
    }
}

impl ShardSink for StdoutSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// How large a pipe an [`FdSink`] asks for: its reader then wakes up less often.
const SINK_PIPE: usize = 4 << 20;

/// A shard written to an inherited file descriptor (a pipe to `lz4`, `aws s3 cp`, ...).
/// Small records are gathered in a buffer; large payloads are written from the caller's
/// memory in one `writev` with it.
pub struct FdSink {
    out: File,
    buf: Vec<u8>,
    name: String,
}

const FD_SINK_BUFFER: usize = 256 << 10;

impl FdSink {
    /// Wraps an inherited descriptor (`name` is for messages). A pipe is enlarged as far
    /// as the kernel allows.
    pub fn new(file: File, name: impl Into<String>) -> Self {
        if crate::pipe::is_pipe(&file) {
            crate::pipe::enlarge_pipe(&file, SINK_PIPE);
        }
        FdSink {
            out: file,
            buf: Vec::with_capacity(FD_SINK_BUFFER),
            name: name.into(),
        }
    }

    fn flush_buffer(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// A reader that goes away leaves the archive incomplete: unlike `ckstream ls | head`,
/// that is a failure, so it must not look like the broken pipe a command may ignore.
fn reader_gone(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        io::Error::other("the reader closed the pipe before the archive was complete")
    } else {
        e
    }
}

impl ShardSink for FdSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.len() >= DIRECT_WRITE {
            let out = &self.out;
            write_all_vectored(&[&self.buf[..], buf], |slices, _| {
                rustix::io::writev(out, slices).map_err(io::Error::from)
            })
            .map_err(reader_gone)?;
            self.buf.clear();
            return Ok(());
        }
        if self.buf.len() + buf.len() > FD_SINK_BUFFER {
            self.flush_buffer().map_err(reader_gone)?;
        }
        self.buf.extend_from_slice(buf);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.flush_buffer().map_err(reader_gone)
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// A shard read from a local file with positional reads.
pub struct FileSource {
    file: File,
    name: String,
    /// Announced ranges ([`ShardSource::will_read`]) not yet handed to the kernel's
    /// read-ahead, in the order they will be read.
    unadvised: Mutex<VecDeque<(u64, u64)>>,
}

/// How far ahead of the reads the kernel is asked to fetch announced ranges. A cold
/// restore then reads the disk in large requests while the chunks before are checked
/// and sent, instead of one 1 MiB chunk at a time.
pub const FILE_READ_AHEAD: u64 = 32 << 20;

impl FileSource {
    /// Opens `path` for reading.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        Ok(Self::from_file(file, path.display().to_string()))
    }

    /// Wraps an open file.
    pub fn from_file(file: File, name: impl Into<String>) -> Self {
        FileSource {
            file,
            name: name.into(),
            unadvised: Mutex::new(VecDeque::new()),
        }
    }

    /// Asks the kernel to read ahead the announced bytes up to `until` (a read position
    /// plus [`FILE_READ_AHEAD`]); best effort.
    fn advise_until(&self, until: u64) {
        let mut queue = self.unadvised.lock().unwrap();
        while let Some(&(offset, len)) = queue.front() {
            if offset >= until {
                break;
            }
            let take = len.min(until - offset);
            // SAFETY: plain syscall on a descriptor we own; no memory is passed.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    offset as i64,
                    take as i64,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
            if take == len {
                queue.pop_front();
            } else {
                queue[0] = (offset + take, len - take);
            }
        }
    }
}

impl ShardSource for FileSource {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.advise_until(offset + buf.len() as u64 + FILE_READ_AHEAD);
        self.file.read_exact_at(buf, offset)
    }
    fn will_read(&self, ranges: &[(u64, u64)]) {
        let Some(&(first, _)) = ranges.first() else {
            return;
        };
        {
            let mut queue = self.unadvised.lock().unwrap();
            for &(offset, len) in ranges {
                // Chunks lie back to back, record headers and padding between them.
                match queue.back_mut() {
                    Some((o, l)) if offset >= *o + *l && offset - (*o + *l) < 64 << 10 => {
                        *l = offset + len - *o;
                    }
                    _ => queue.push_back((offset, len)),
                }
            }
        }
        self.advise_until(first + FILE_READ_AHEAD);
    }
    fn as_file(&self) -> Option<&File> {
        Some(&self.file)
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// Takes an inherited fd (duplicated, so closing ours leaves the caller's alone).
///
/// # Errors
/// [`Error::Usage`] when `fd` is not open.
pub fn take_fd(fd: i32, what: &str) -> Result<File> {
    if fd < 0 {
        return Err(Error::Usage(format!(
            "{what} fd {fd} is not a file descriptor"
        )));
    }
    // SAFETY: only borrowed for the dup; an fd that is not open makes the dup fail.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let owned = rustix::io::fcntl_dupfd_cloexec(borrowed, 3)
        .map_err(|e| Error::Usage(format!("{what} fd {fd} is not open: {e}")))?;
    Ok(File::from(owned))
}

/// Returns `f` itself when it is a regular file; otherwise (a pipe) copies it into an
/// unlinked temporary file in `dir` and returns that, so it can be read at random
/// (a stream's commit footer comes last, so nothing of it can be trusted before).
///
/// # Errors
/// [`Error::Io`] when the spool file cannot be created or the stream not read.
pub fn seekable(mut f: File, dir: &Path, what: &str) -> Result<File> {
    if f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Ok(f);
    }
    let tmp = rustix::fs::open(
        dir,
        rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .map_err(|e| {
        Error::io(
            format!("creating a spool file in {}", dir.display()),
            e.into(),
        )
    })?;
    let mut tmp = File::from(tmp);
    io::copy(&mut f, &mut tmp).map_err(|e| Error::io(format!("reading {what}"), e))?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn vectored_writes_survive_short_writes() {
        let parts: [&[u8]; 4] = [b"header", b"", b"0123456789", b"tail"];
        let mut out = Vec::new();
        write_all_vectored(&parts, |slices, done| {
            assert_eq!(done, out.len() as u64, "offset of the write");
            // Never more than 7 bytes at once, across slice boundaries.
            let mut n = 0;
            for s in slices {
                let take = (7 - n).min(s.len());
                out.extend_from_slice(&s[..take]);
                n += take;
                if n == 7 {
                    break;
                }
            }
            Ok(n)
        })
        .unwrap();
        assert_eq!(out, b"header0123456789tail");
    }

    #[test]
    fn fd_sink_keeps_order_of_buffered_and_direct_writes() {
        let (r, w) = crate::pipe::sized_pipe(1 << 16).unwrap().unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            File::from(r).read_to_end(&mut all).unwrap();
            all
        });
        let mut sink = FdSink::new(File::from(w), "test pipe");
        let mut expected = Vec::new();
        for i in 0..50u32 {
            let small = vec![i as u8; 100 + i as usize];
            let large: Vec<u8> = (0..DIRECT_WRITE as u32 + i * 977)
                .map(|k| (k ^ i) as u8)
                .collect();
            sink.write_all(&small).unwrap();
            sink.write_all(&large).unwrap();
            expected.extend_from_slice(&small);
            expected.extend_from_slice(&large);
        }
        sink.write_all(b"end").unwrap();
        expected.extend_from_slice(b"end");
        sink.sync().unwrap();
        drop(sink);
        assert!(reader.join().unwrap() == expected);
    }

    #[test]
    fn a_reader_gone_is_not_a_harmless_broken_pipe() {
        let (r, w) = crate::pipe::sized_pipe(1 << 16).unwrap().unwrap();
        drop(r);
        let mut sink = FdSink::new(File::from(w), "test pipe");
        let e = sink.write_all(&vec![1u8; 1 << 20]).unwrap_err();
        assert_ne!(e.kind(), io::ErrorKind::BrokenPipe);
        assert!(
            e.to_string().contains("before the archive was complete"),
            "{e}"
        );
    }
}
