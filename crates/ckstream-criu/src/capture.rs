//! Capture: CRIU's image files → archive entries under `criu/`, plus external files.
//!
//! One thread polls CRIU's socket, the pipes CRIU hands over (several can be open at
//! once: pagemap and pages interleave) and external-file pipes, and feeds full chunks
//! to the archive writer, whose backpressure slows CRIU down rather than buffering.
//! An optional control socket lets CRIU's `post-dump` action script ask whether the
//! archive data is durable before CRIU kills the checkpointed process.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ckstream_format::chunker::{is_memory_image, PageChunker};
use ckstream_format::index::entry_flags;
use ckstream_format::window::ChunkWindows;
use ckstream_format::{ArchiveWriter, Entry, EntryKind, Stop};
use rustix::event::{poll, PollFd, PollFlags};

use crate::error::{CriuError, Result};
use crate::proto::{read_message, RequestEntry};
use crate::socket::{self, check_stop};

/// Settings of one capture; the callbacks may borrow from the caller for `'a`.
pub struct CaptureOptions<'a> {
    /// How long to wait for CRIU to connect.
    pub accept_timeout: Duration,
    /// Longest time without any data or request before giving up.
    pub idle_timeout: Duration,
    /// Pipe size to ask for (F_SETPIPE_SZ).
    pub pipe_size: usize,
    /// External files to embed: archive name and the read end of a pipe.
    pub ext_files: Vec<(String, OwnedFd)>,
    /// Called every ~100 ms; an error aborts the capture (e.g. CRIU exited early).
    pub watch: Option<Box<dyn FnMut() -> Result<()> + 'a>>,
    /// Called once at CRIU's post-dump hook, while the process tree is still frozen: the
    /// place to add what must be consistent with the memory image (a container's rootfs
    /// changes).
    pub on_frozen: Option<FrozenHook<'a>>,
    /// Called at the post-dump hook after `on_frozen`, once every image pipe reached its
    /// end and before the hook is answered: the place to commit and publish the archive,
    /// so that CRIU kills the process only once its checkpoint is stored for good (an
    /// error here makes CRIU resume it instead). CRIU sends no image after the hook;
    /// one arriving anyway is an error. Without it the hook is answered as soon as
    /// `on_frozen` returns, and the process runs on while the pipes are still drained
    /// (for `--leave-running`: the checkpoint puts nothing at risk, so the freeze
    /// should end as soon as CRIU has handed over the data).
    pub commit_at_hook: Option<FrozenHook<'a>>,
    /// Polled every ~100 ms: once true the capture ends with [`CriuError::Interrupted`]
    /// (the binary passes its SIGINT/SIGTERM flag).
    pub stop: Stop,
}

/// See [`CaptureOptions::on_frozen`].
pub type FrozenHook<'a> = Box<dyn FnOnce(&mut ArchiveWriter) -> Result<()> + 'a>;

impl Default for CaptureOptions<'_> {
    fn default() -> Self {
        CaptureOptions {
            accept_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(600),
            pipe_size: 4 << 20,
            ext_files: Vec::new(),
            watch: None,
            on_frozen: None,
            commit_at_hook: None,
            stop: Stop::NEVER,
        }
    }
}

/// Milestones reported while capturing (for criu-image-streamer style progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureEvent {
    /// The capture socket is listening ([`capture_archive`] only).
    Listening,
    /// CRIU connected.
    Connected,
    /// CRIU asked for its first image other than `cpuinfo.img`: the tree is frozen.
    CheckpointStart,
    /// The post-dump hook was answered (after `commit_at_hook`, if there was one): CRIU
    /// now kills or resumes the process.
    HookAnswered,
}

/// What a capture did.
#[derive(Debug, Default, Clone)]
pub struct CaptureReport {
    /// Image files CRIU sent.
    pub images: u64,
    /// External files stored.
    pub ext_files: u64,
    /// Bytes received from CRIU and external files.
    pub bytes: u64,
    /// Smallest pipe size obtained for CRIU's pipes.
    pub pipe_size: usize,
    /// From start to end of the capture.
    pub duration: Duration,
    /// Names of the image files, in the order CRIU wrote them.
    pub image_names: Vec<String>,
}

/// One image (or external file) being read from its pipe.
///
/// The bytes are read into memory, hashed, and written from there. Splicing CRIU's page
/// references on to a pipe sink instead (as criu-image-streamer does) would save a copy
/// but is not safe: the references point at the checkpointed process's own pages, and
/// the kernel writes into them when CRIU kills the tree after the dump (the thread-id
/// word glibc registers with set_tid_address is cleared on exit), so a chunk still in a
/// pipe then differs from what was hashed; with `--leave-running` the process rewrites
/// them at will. Tried, measured (0.3 CPU-s/GB saved) and seen to corrupt chunks.
struct Stream {
    fd: OwnedFd,
    id: u64,
    name: String,
    /// Bytes read of chunks not handed over yet; chunks are split off without copying.
    windows: ChunkWindows,
    offset: u64,
    /// For process memory (`pages-*.img`): cut by content, so that the chunks of an
    /// unchanged page run are the same in the next checkpoint wherever it lands.
    chunker: Option<PageChunker>,
}

/// Memory for reading a stream comes in windows this large; chunks handed to the writer
/// keep their window alive until they are written.
const READ_WINDOW: usize = 2 << 20;

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn streamed_entry(path: Vec<u8>) -> Entry {
    Entry {
        path,
        kind: EntryKind::File as i32,
        mode: 0o600,
        mtime_ns: now_ns(),
        flags: entry_flags::STREAMED,
        ..Default::default()
    }
}

impl Stream {
    fn new(fd: OwnedFd, id: u64, name: String, chunk: usize, aligned: bool) -> Result<Self> {
        rustix::io::ioctl_fionbio(&fd, true)
            .map_err(|e| CriuError::io(format!("setting {name} non-blocking"), e))?;
        Ok(Stream {
            fd,
            id,
            chunker: is_memory_image(name.as_bytes())
                .then(|| PageChunker::for_memory(chunk, aligned)),
            name,
            windows: ChunkWindows::new(READ_WINDOW.max(2 * chunk)),
            offset: 0,
        })
    }

    /// Reads what the pipe has. Returns true at EOF (after handing over the last chunk).
    fn pump(
        &mut self,
        writer: &mut ArchiveWriter,
        chunk: usize,
        bytes: &mut u64,
        stop: Stop,
    ) -> Result<bool> {
        loop {
            // A busy pipe never runs dry: notice signals here, not only between polls.
            check_stop(stop)?;
            let read = self.windows.fill(chunk, |room| {
                rustix::io::read(&self.fd, room).map(|(got, _)| got)
            });
            let got = match read {
                Ok(got) => got,
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(CriuError::io(format!("reading image {}", self.name), e)),
            };
            let at_end = got == 0;
            *bytes += got as u64;
            loop {
                let pending = self.windows.pending();
                let cut = match self.chunker {
                    Some(c) => c.next_cut(pending, at_end),
                    None if pending.len() >= chunk => Some(chunk),
                    None => (at_end && !pending.is_empty()).then_some(pending.len()),
                };
                let Some(n) = cut else { break };
                let data = self.windows.take(n);
                writer.add_data(self.id, self.offset, data, None)?;
                self.offset += n as u64;
            }
            if at_end {
                writer.end_entry(self.id, self.offset)?;
                return Ok(true);
            }
        }
    }
}

/// Runs one capture on an already bound `listener` until CRIU closes the socket and
/// every pipe reached EOF. `prefix` is the archive directory for CRIU's images
/// (an entry for it is added). With `control`, answers the post-dump hook (see
/// [`crate::run::hook_client`]) once all data is durable.
///
/// # Errors
/// Protocol, I/O, archive, timeout and interrupt errors; on any error the writer is
/// left for the caller to abort, and an open hook connection is told to fail, so
/// CRIU resumes the process instead of killing it.
pub fn capture(
    listener: &UnixListener,
    writer: &mut ArchiveWriter,
    mut opts: CaptureOptions<'_>,
    control: Option<&UnixListener>,
    on_event: &mut dyn FnMut(CaptureEvent),
) -> Result<CaptureReport> {
    let started = Instant::now();
    let chunk = writer.options().chunk_size as usize;
    let mut report = CaptureReport {
        pipe_size: usize::MAX,
        ..Default::default()
    };
    let mut hook: Option<UnixStream> = None;
    let result = capture_loop(
        listener,
        writer,
        &mut opts,
        control,
        on_event,
        chunk,
        &mut report,
        &mut hook,
    );
    if let Some(mut h) = hook {
        let _ = h.write_all(if result.is_ok() { b"ok\n" } else { b"fail\n" });
    }
    if report.pipe_size == usize::MAX {
        report.pipe_size = 0;
    }
    report.duration = started.elapsed();
    result.map(|()| report)
}

#[allow(clippy::too_many_arguments)]
fn capture_loop(
    listener: &UnixListener,
    writer: &mut ArchiveWriter,
    opts: &mut CaptureOptions<'_>,
    control: Option<&UnixListener>,
    on_event: &mut dyn FnMut(CaptureEvent),
    chunk: usize,
    report: &mut CaptureReport,
    hook: &mut Option<UnixStream>,
) -> Result<()> {
    let mut dir = streamed_entry(crate::IMAGES_PREFIX.as_bytes().to_vec());
    dir.kind = EntryKind::Dir as i32;
    dir.mode = 0o700;
    dir.flags = 0;
    writer.add_entry(dir)?;
    let mut sock =
        socket::accept_watched(listener, opts.accept_timeout, &mut opts.watch, opts.stop)?;
    on_event(CaptureEvent::Connected);
    let mut sock_open = true;
    let mut streams: Vec<Stream> = Vec::new();
    for (name, fd) in std::mem::take(&mut opts.ext_files) {
        let id = writer.add_entry(streamed_entry(name.clone().into_bytes()))?;
        streams.push(Stream::new(fd, id, name, chunk, writer.aligns_chunks())?);
        report.ext_files += 1;
    }
    let mut started = false;
    let mut hook_pending = false;
    let mut committed = false;
    let mut last_activity = Instant::now();
    let tick = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    loop {
        check_stop(opts.stop)?;
        if let Some(w) = opts.watch.as_mut() {
            w()?;
        }
        if hook_pending && (opts.commit_at_hook.is_none() || streams.is_empty()) {
            if let Some(f) = opts.on_frozen.take() {
                f(writer)?;
            }
            if let Some(commit) = opts.commit_at_hook.take() {
                commit(writer)?;
                committed = true;
            }
            if let Some(mut h) = hook.take() {
                h.write_all(b"ok\n")
                    .map_err(|e| CriuError::io("answering CRIU's post-dump hook", e))?;
            }
            hook_pending = false;
            on_event(CaptureEvent::HookAnswered);
        }
        if !sock_open && streams.is_empty() {
            return Ok(());
        }
        let mut fds: Vec<PollFd> = Vec::with_capacity(streams.len() + 2);
        if sock_open {
            fds.push(PollFd::new(&sock, PollFlags::IN));
        }
        let control_slot = fds.len();
        let watch_control = control.is_some() && hook.is_none();
        if let (true, Some(c)) = (watch_control, control) {
            fds.push(PollFd::new(c, PollFlags::IN));
        }
        let first_stream = fds.len();
        for s in &streams {
            fds.push(PollFd::from_borrowed_fd(s.fd.as_fd(), PollFlags::IN));
        }
        // Chunks go to the writer in batches: hand over what is pending before waiting.
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let ready_now = match poll(&mut fds, Some(&zero)) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(CriuError::io("polling CRIU's pipes", e)),
        };
        if ready_now == 0 {
            writer.flush()?;
            match poll(&mut fds, Some(&tick)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(CriuError::io("polling CRIU's pipes", e)),
            }
        }
        let sock_ready = sock_open && !fds[0].revents().is_empty();
        let control_ready = watch_control && !fds[control_slot].revents().is_empty();
        let ready: Vec<usize> = (0..streams.len())
            .filter(|&i| !fds[first_stream + i].revents().is_empty())
            .collect();
        drop(fds);
        if sock_ready || control_ready || !ready.is_empty() {
            last_activity = Instant::now();
        } else if last_activity.elapsed() > opts.idle_timeout {
            return Err(CriuError::Timeout(format!(
                "no data from CRIU for {}s",
                opts.idle_timeout.as_secs()
            )));
        }
        // Pipes first: the data of files already announced.
        let mut finished = Vec::new();
        for &i in &ready {
            if streams[i].pump(writer, chunk, &mut report.bytes, opts.stop)? {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            streams.swap_remove(i);
        }
        if control_ready {
            if let Some(c) = control {
                let (h, _) = c
                    .accept()
                    .map_err(|e| CriuError::io("accepting the post-dump hook", e))?;
                *hook = Some(h);
                hook_pending = true;
            }
        }
        if sock_ready {
            match read_message::<RequestEntry>(&mut sock)? {
                None => sock_open = false,
                Some(req) => {
                    let name = req.filename;
                    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                        return Err(CriuError::Protocol(format!("bad image name {name:?}")));
                    }
                    let fd = socket::recv_fd(&sock)?;
                    report.pipe_size = report
                        .pipe_size
                        .min(socket::enlarge_pipe(&fd, opts.pipe_size));
                    if !started && name != "cpuinfo.img" {
                        started = true;
                        on_event(CaptureEvent::CheckpointStart);
                    }
                    if committed {
                        return Err(CriuError::Protocol(format!(
                            "CRIU sent image {name} after its post-dump hook, when the archive was already committed without it"
                        )));
                    }
                    if report.image_names.contains(&name) {
                        return Err(CriuError::Protocol(format!(
                            "CRIU wrote image {name} twice"
                        )));
                    }
                    let id = writer.add_entry(streamed_entry(crate::image_path(&name)))?;
                    report.images += 1;
                    report.image_names.push(name.clone());
                    streams.push(Stream::new(fd, id, name, chunk, writer.aligns_chunks())?);
                }
            }
        }
    }
}

/// criu-image-streamer's `capture`: CRIU (started by someone else) streams its images
/// into a new archive at `output`, which is committed only when CRIU completed the dump.
/// Without running CRIU, completion is recognised by the `stats-dump` file CRIU writes
/// into `images_dir` only on success (a stale one is removed first). `on_event` sees the
/// milestones (criu-image-streamer prints them).
///
/// # Errors
/// Capture errors; [`CriuError::Criu`] when CRIU did not complete the dump. The archive
/// is not committed in either case.
pub fn capture_archive(
    images_dir: &std::path::Path,
    output: &ckstream_store::ArchiveLocation,
    spec: &ckstream_store::ArchiveSpec,
    opts: CaptureOptions<'_>,
    on_event: &mut dyn FnMut(CaptureEvent),
) -> Result<ckstream_format::WriteSummary> {
    let stats_file = images_dir.join("stats-dump");
    let listener = socket::bind(images_dir, socket::CAPTURE_SOCKET)?;
    match std::fs::remove_file(&stats_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(CriuError::io(
                format!("removing the stale {}", stats_file.display()),
                e,
            ))
        }
    }
    let mut archive = output.create(spec)?;
    let stop = opts.stop;
    on_event(CaptureEvent::Listening);
    let captured = capture(&listener, &mut archive.writer, opts, None, on_event);
    let _ = std::fs::remove_file(images_dir.join(socket::CAPTURE_SOCKET));
    if let Err(e) = captured {
        archive.abort();
        return Err(e);
    }
    // CRIU writes the stats file just after it closes the socket: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stats_file.exists() && Instant::now() < deadline && !stop.requested() {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !stats_file.exists() {
        archive.abort();
        return Err(CriuError::Criu(format!(
            "CRIU did not complete the dump ({} was not written)",
            stats_file.display()
        )));
    }
    Ok(archive.finish()?)
}
