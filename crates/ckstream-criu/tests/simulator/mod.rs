//! A CRIU simulator: the client side of CRIU's image-streamer protocol and of its
//! post-dump action script, in plain Rust, so that `capture` and `serve` can be tested
//! on real UNIX sockets and pipes without root and without CRIU (criu-image-streamer
//! tests itself the same way).
//!
//! What it models, from CRIU's `criu/img-streamer.c` and `criu/cr-dump.c`:
//! * dump: one connection to `streamer-capture.sock`; per image file a framed
//!   `img_streamer_request_entry{filename}`, then the read end of a fresh pipe as
//!   SCM_RIGHTS on a 1-byte message; CRIU then writes the image into the pipe's write
//!   end with blocking writes, several pipes open at once (pagemap and pages
//!   interleave). Once every image is closed it runs the `post-dump` action script
//!   (which connects to the control socket and reads `ok`/`fail`), and only then
//!   closes the streamer socket.
//! * restore: one connection to `streamer-serve.sock`; requests are made one after the
//!   other on that socket, each answered by `img_streamer_reply_entry{exists}`, and when
//!   the file exists CRIU sends the write end of a pipe and reads the read end whenever
//!   it needs the file — so several pipes are read concurrently, in any order.
//!
//! Archives live in memory: [`MemShards`] is a set of shard sinks whose bytes can be
//! taken at any time and opened with the real `ArchiveReader`.

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckstream_criu::proto::{read_message, write_message, ReplyEntry, RequestEntry};
use ckstream_criu::run::HOOK_SOCKET;
use ckstream_criu::socket::{CAPTURE_SOCKET, SERVE_SOCKET};
use ckstream_format::{
    ArchiveReader, ArchiveWriter, Compression, ShardSink, ShardSource, WriterOptions,
};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// How long a simulated CRIU waits on a socket before it gives up (a hung capture or
/// serve then fails the test instead of hanging it).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Chunk size of the test archives: small, so that images span many chunks.
pub const CHUNK: u32 = 64 << 10;

// ---------------------------------------------------------------------------------
// In-memory archives

/// One in-memory shard sink; clones share the bytes.
#[derive(Clone, Default)]
pub struct MemSink(Arc<Mutex<Vec<u8>>>);

impl ShardSink for MemSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// The shards of an in-memory archive being written.
#[derive(Clone, Default)]
pub struct MemShards(Vec<MemSink>);

impl MemShards {
    /// The bytes written so far, shard by shard.
    pub fn bytes(&self) -> Vec<Vec<u8>> {
        self.0.iter().map(|s| s.0.lock().unwrap().clone()).collect()
    }

    /// Opens what was written so far (fails unless the archive was committed).
    pub fn open(&self) -> ckstream_format::Result<ArchiveReader> {
        open_shards(self.bytes())
    }
}

/// A writer over `shards` in-memory shards with small chunks and two threads.
pub fn mem_writer(shards: usize, compression: Compression) -> (ArchiveWriter, MemShards) {
    let mem = MemShards((0..shards).map(|_| MemSink::default()).collect());
    let sinks = mem
        .0
        .iter()
        .map(|s| Box::new(s.clone()) as Box<dyn ShardSink>)
        .collect();
    let opts = WriterOptions {
        compression,
        chunk_size: CHUNK,
        threads: 2,
        ..Default::default()
    };
    let writer = ArchiveWriter::new(sinks, opts, [7; 16], 0).expect("archive writer");
    (writer, mem)
}

/// A one-shard writer whose sink takes `delay` per write: a disk slower than CRIU, so
/// capture is held back by the writer and finds its pipes full whenever it reads.
pub fn slow_writer(delay: Duration) -> ArchiveWriter {
    struct SlowSink(Duration);
    impl ShardSink for SlowSink {
        fn write_all(&mut self, _buf: &[u8]) -> io::Result<()> {
            std::thread::sleep(self.0);
            Ok(())
        }
        fn describe(&self) -> String {
            "slow".into()
        }
    }
    let opts = WriterOptions {
        compression: Compression::NONE,
        chunk_size: CHUNK,
        threads: 1,
        ..Default::default()
    };
    ArchiveWriter::new(vec![Box::new(SlowSink(delay))], opts, [7; 16], 0).expect("writer")
}

/// Opens an archive from its shards' bytes.
pub fn open_shards(shards: Vec<Vec<u8>>) -> ckstream_format::Result<ArchiveReader> {
    let rest = shards.clone();
    ArchiveReader::open(Box::new(shards[0].clone()), move |_, i| {
        Ok(Box::new(rest[i as usize].clone()) as Box<dyn ShardSource>)
    })
}

/// The whole content of entry `path` (holes as zeros), every chunk verified.
pub fn entry_bytes(reader: &ArchiveReader, path: &str) -> Vec<u8> {
    let i = reader
        .find(path.as_bytes())
        .unwrap_or_else(|| panic!("{path} is not in the archive"));
    let mut out = Vec::new();
    reader.copy_entry(i, &mut out).expect("reading entry");
    out
}

/// Every entry path of the archive, in index order.
pub fn entry_paths(reader: &ArchiveReader) -> Vec<String> {
    reader.entries().iter().map(|e| e.path_lossy()).collect()
}

/// `len` pseudo-random (incompressible) bytes, different for every `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------
// Sockets and pipes

/// A pipe as `(read end, write end)`, close-on-exec.
pub fn pipe() -> (File, File) {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
    (File::from(r), File::from(w))
}

/// Sends `fd` the way CRIU's `send_fd` does: one byte of data, the fd as SCM_RIGHTS.
pub fn send_fd(sock: &UnixStream, fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    assert!(cmsg.push(SendAncillaryMessage::ScmRights(&fds)));
    let n = sendmsg(
        sock,
        &[io::IoSlice::new(&[0])],
        &mut cmsg,
        SendFlags::empty(),
    )?;
    assert_eq!(n, 1);
    Ok(())
}

fn connect(dir: &Path, name: &str) -> io::Result<UnixStream> {
    let s = UnixStream::connect(dir.join(name))?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    Ok(s)
}

/// Frames `msg` as CRIU's `pb_write_one` does (u32 little-endian length, then the body).
pub fn request_frame(filename: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    write_message(
        &mut buf,
        &RequestEntry {
            filename: filename.into(),
        },
    )
    .unwrap();
    buf
}

// ---------------------------------------------------------------------------------
// criu dump --stream

/// CRIU's side of a capture: the streamer connection.
pub struct DumpClient {
    pub sock: UnixStream,
}

impl DumpClient {
    /// Connects to `dir/streamer-capture.sock`.
    pub fn connect(dir: &Path) -> io::Result<Self> {
        Ok(DumpClient {
            sock: connect(dir, CAPTURE_SOCKET)?,
        })
    }

    /// Announces image `name` and hands over the read end of a new pipe; returns the
    /// write end, into which CRIU then writes the image (closing it ends the image).
    pub fn open_image(&self, name: &str) -> io::Result<File> {
        let (r, w) = pipe();
        self.send_request(name)?;
        send_fd(&self.sock, r.as_fd())?;
        Ok(w)
    }

    /// Sends only the framed request for `name`.
    pub fn send_request(&self, name: &str) -> io::Result<()> {
        self.send_raw(&request_frame(name))
    }

    /// Sends raw bytes on the streamer socket.
    pub fn send_raw(&self, bytes: &[u8]) -> io::Result<()> {
        (&self.sock).write_all(bytes)
    }

    /// Writes a whole image through its own pipe.
    pub fn write_image(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let mut w = self.open_image(name)?;
        w.write_all(data)
    }
}

/// The post-dump action script, as `run::hook_client` does it: connects to
/// `dir/ckstream-hook.sock` and returns the line it is answered with (empty when the
/// connection ends without one).
pub fn post_dump_hook(dir: &Path) -> io::Result<String> {
    let s = connect(dir, HOOK_SOCKET)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

/// Connects the hook but does not read yet.
pub fn connect_hook(dir: &Path) -> io::Result<UnixStream> {
    connect(dir, HOOK_SOCKET)
}

// ---------------------------------------------------------------------------------
// criu restore --stream

/// CRIU's side of a serve: the streamer connection.
pub struct RestoreClient {
    pub sock: UnixStream,
}

impl RestoreClient {
    /// Connects to `dir/streamer-serve.sock`.
    pub fn connect(dir: &Path) -> io::Result<Self> {
        Ok(RestoreClient {
            sock: connect(dir, SERVE_SOCKET)?,
        })
    }

    /// Asks for image `name`. When it exists, hands over the write end of a new pipe and
    /// returns the read end; `None` when the streamer says it does not exist.
    pub fn request(&mut self, name: &str) -> io::Result<Option<File>> {
        self.sock.write_all(&request_frame(name))?;
        let reply: ReplyEntry = read_message(&mut self.sock)
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        if !reply.exists {
            return Ok(None);
        }
        let (r, w) = pipe();
        send_fd(&self.sock, w.as_fd())?;
        drop(w);
        Ok(Some(r))
    }
}

/// Reads a pipe to its end.
pub fn read_to_end(mut f: File) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// Reads a pipe to its end on a new thread.
pub fn spawn_reader(f: File) -> std::thread::JoinHandle<io::Result<Vec<u8>>> {
    std::thread::spawn(move || read_to_end(f))
}

/// An fd that is not a pipe (for "CRIU sent something else" tests).
pub fn not_a_pipe(dir: &Path) -> OwnedFd {
    OwnedFd::from(File::create(dir.join("not-a-pipe")).unwrap())
}
