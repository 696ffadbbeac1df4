//! CRIU's image-streamer protocol against a simulated CRIU (see `simulator/mod.rs`):
//! the real `capture` and `serve` run on real UNIX sockets and pipes, archives are
//! written and read by the real archive writer and reader over in-memory shards (or a
//! local file where the file path matters). No root, no CRIU.

mod simulator;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckstream_criu::capture::{capture, CaptureEvent, CaptureOptions, CaptureReport};
use ckstream_criu::run::HOOK_SOCKET;
use ckstream_criu::serve::{serve, ServeOptions, ServeReport};
use ckstream_criu::socket::{self, CAPTURE_SOCKET, SERVE_SOCKET};
use ckstream_criu::CriuError;
use ckstream_format::{
    ArchiveReader, ArchiveWriter, Compression, Entry, EntryKind, Stop, WriterOptions,
};
use ckstream_store::{ArchiveLocation, ArchiveSpec, Writeback};
use simulator::*;

// ---------------------------------------------------------------------------------
// Harness

/// Counts allocations of 1 GiB or more (no test here makes one on purpose).
struct CountingAlloc;

static HUGE_ALLOCS: AtomicUsize = AtomicUsize::new(0);
const HUGE: usize = 1 << 30;

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= HUGE {
            HUGE_ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: the caller upholds GlobalAlloc's contract, which System shares.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= HUGE {
            HUGE_ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: the caller upholds GlobalAlloc's contract, which System shares.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= HUGE {
            HUGE_ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: the caller upholds GlobalAlloc's contract, which System shares.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds GlobalAlloc's contract, which System shares.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// A `Stop` (a plain `fn`) backed by its own static flag: `(flag, stop)`.
macro_rules! stop_flag {
    () => {{
        static FLAG: AtomicBool = AtomicBool::new(false);
        (&FLAG, Stop::new(|| FLAG.load(Ordering::SeqCst)))
    }};
}

/// Short timeouts, pipes left at the kernel's default 64 KiB (so every large image is
/// larger than its pipe).
fn fast_capture<'a>() -> CaptureOptions<'a> {
    CaptureOptions {
        accept_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        pipe_size: 64 << 10,
        ..Default::default()
    }
}

fn fast_serve() -> ServeOptions {
    ServeOptions {
        accept_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        decoders: 2,
        pipe_size: 64 << 10,
        ..Default::default()
    }
}

/// What a capture run left behind.
struct CaptureRun<T> {
    result: Result<CaptureReport, CriuError>,
    criu: T,
    events: Vec<CaptureEvent>,
}

/// Runs `capture` into `writer` on this thread while `criu` plays CRIU on another;
/// with `with_control`, the post-dump hook's control socket is bound too.
fn run_capture<T: Send>(
    writer: &mut ArchiveWriter,
    opts: CaptureOptions<'_>,
    with_control: bool,
    criu: impl FnOnce(&Path) -> T + Send,
) -> CaptureRun<T> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let listener = socket::bind(dir, CAPTURE_SOCKET).unwrap();
    let control = with_control.then(|| socket::bind(dir, HOOK_SOCKET).unwrap());
    let mut events = Vec::new();
    std::thread::scope(|s| {
        let client = s.spawn(|| criu(dir));
        let result = capture(&listener, writer, opts, control.as_ref(), &mut |e| {
            events.push(e)
        });
        let criu = client
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        CaptureRun {
            result,
            criu,
            events,
        }
    })
}

/// Runs a capture without control socket that must fail, and returns its error.
fn capture_error(criu: impl FnOnce(&DumpClient, &Path) + Send) -> CriuError {
    let (mut writer, _) = mem_writer(1, Compression::NONE);
    let run = run_capture(&mut writer, fast_capture(), false, |dir| {
        let c = DumpClient::connect(dir).unwrap();
        criu(&c, dir);
        // Like CRIU after a failed write: wait until the streamer hangs up.
        let _ = (&c.sock).read(&mut [0u8; 1]);
    });
    writer.abort();
    match run.result {
        Ok(r) => panic!("capture succeeded: {r:?}"),
        Err(e) => e,
    }
}

fn file_entry(path: &str, size: u64) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::File as i32,
        mode: 0o600,
        size,
        ..Default::default()
    }
}

fn dir_entry(path: &str) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::Dir as i32,
        mode: 0o700,
        ..Default::default()
    }
}

/// Adds a whole file in chunks of `CHUNK` (all-zero chunks become holes).
fn add_file(w: &mut ArchiveWriter, path: &str, data: &[u8]) {
    let id = w.add_entry(file_entry(path, data.len() as u64)).unwrap();
    for (k, piece) in data.chunks(CHUNK as usize).enumerate() {
        w.add_data(id, (k * CHUNK as usize) as u64, piece.to_vec(), None)
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------
// capture: images into the archive

#[test]
fn capture_stores_interleaved_large_and_empty_images_byte_exact() {
    let cpuinfo = pattern(1, 1000);
    let pagemap = pattern(2, 256 << 10);
    let mut pages = pattern(3, 4 << 20);
    // Zero pages in the middle: stored as a hole, read back as zeros.
    pages[1 << 20..(1 << 20) + (256 << 10)].fill(0);
    let core = pattern(4, 70_001);
    let (mut writer, shards) = mem_writer(2, Compression::zstd(1));
    let run = run_capture(&mut writer, fast_capture(), false, |dir| {
        let criu = DumpClient::connect(dir).unwrap();
        criu.write_image("cpuinfo.img", &cpuinfo).unwrap();
        // CRIU writes a pagemap entry, then its pages, then the next entry..., with
        // blocking writes on one thread. Both images are larger than their pipes, so
        // unless capture drains both pipes at once, CRIU blocks for good.
        let mut pm = criu.open_image("pagemap-1.img").unwrap();
        let mut pg = criu.open_image("pages-1.img").unwrap();
        for (m, p) in pagemap.chunks(4 << 10).zip(pages.chunks(64 << 10)) {
            pm.write_all(m).unwrap();
            pg.write_all(p).unwrap();
        }
        drop((pm, pg));
        criu.write_image("empty.img", &[]).unwrap();
        criu.write_image("core-1.img", &core).unwrap();
    });
    let report = run.result.expect("capture");
    assert_eq!(
        run.events,
        [CaptureEvent::Connected, CaptureEvent::CheckpointStart]
    );
    assert_eq!(
        report.image_names,
        [
            "cpuinfo.img",
            "pagemap-1.img",
            "pages-1.img",
            "empty.img",
            "core-1.img"
        ]
    );
    assert_eq!((report.images, report.ext_files), (5, 0));
    let total = cpuinfo.len() + pagemap.len() + pages.len() + core.len();
    assert_eq!(report.bytes, total as u64);
    assert!(report.pipe_size > 0 && report.pipe_size < pagemap.len());

    writer.finish().unwrap();
    let reader = shards.open().unwrap();
    assert_eq!(
        entry_paths(&reader),
        [
            "criu",
            "criu/cpuinfo.img",
            "criu/pagemap-1.img",
            "criu/pages-1.img",
            "criu/empty.img",
            "criu/core-1.img"
        ]
    );
    assert_eq!(entry_bytes(&reader, "criu/cpuinfo.img"), cpuinfo);
    assert_eq!(entry_bytes(&reader, "criu/pagemap-1.img"), pagemap);
    assert_eq!(entry_bytes(&reader, "criu/pages-1.img"), pages);
    assert_eq!(entry_bytes(&reader, "criu/empty.img"), b"");
    assert_eq!(entry_bytes(&reader, "criu/core-1.img"), core);
    // Process memory is cut by content, whatever the pipes delivered: the chunks are
    // those the page chunker finds in the whole image (all-zero ones stored as holes).
    let chunker = ckstream_format::chunker::PageChunker::for_memory(CHUNK as usize, false);
    let mut expected = Vec::new();
    let mut at = 0;
    while let Some(n) = chunker.next_cut(&pages[at..], true) {
        if pages[at..at + n].iter().any(|&b| b != 0) {
            expected.push((at as u64, n as u32));
        }
        at += n;
    }
    let i = reader.find(b"criu/pages-1.img").unwrap();
    let got: Vec<(u64, u32)> = reader
        .chunks_of(i)
        .iter()
        .map(|c| (c.file_offset, c.raw_len))
        .collect();
    assert_eq!(got, expected);
    assert!(got.len() > 40, "{} chunks", got.len());
    assert!(got.iter().all(|(o, _)| o % 4096 == 0));
    let empty = &reader.entries()[reader.find(b"criu/empty.img").unwrap()];
    assert_eq!((empty.entry_kind(), empty.size), (EntryKind::File, 0));
}

#[test]
fn capture_embeds_external_files_next_to_the_images() {
    let ext = pattern(5, 300_000);
    let inventory = pattern(6, 5000);
    let (ext_r, mut ext_w) = pipe();
    let (empty_r, empty_w) = pipe();
    drop(empty_w);
    let feeder = std::thread::spawn({
        let ext = ext.clone();
        move || ext_w.write_all(&ext)
    });
    let opts = CaptureOptions {
        ext_files: vec![
            ("tcp-stream-1".into(), OwnedFd::from(ext_r)),
            ("empty-ext".into(), OwnedFd::from(empty_r)),
        ],
        ..fast_capture()
    };
    let (mut writer, shards) = mem_writer(1, Compression::zstd(1));
    let run = run_capture(&mut writer, opts, false, |dir| {
        let criu = DumpClient::connect(dir).unwrap();
        criu.write_image("inventory.img", &inventory).unwrap();
    });
    feeder.join().unwrap().unwrap();
    let report = run.result.expect("capture");
    assert_eq!((report.images, report.ext_files), (1, 2));
    assert_eq!(report.bytes, (ext.len() + inventory.len()) as u64);
    writer.finish().unwrap();
    let reader = shards.open().unwrap();
    let mut paths = entry_paths(&reader);
    paths.sort();
    assert_eq!(
        paths,
        ["criu", "criu/inventory.img", "empty-ext", "tcp-stream-1"]
    );
    assert_eq!(entry_bytes(&reader, "tcp-stream-1"), ext);
    assert_eq!(entry_bytes(&reader, "empty-ext"), b"");
    assert_eq!(entry_bytes(&reader, "criu/inventory.img"), inventory);
}

// ---------------------------------------------------------------------------------
// capture: protocol errors

fn assert_protocol(e: CriuError, needle: &str) {
    match e {
        CriuError::Protocol(m) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        e => panic!("expected a protocol error about {needle:?}, got {e:?}"),
    }
}

#[test]
fn capture_rejects_image_names_that_are_not_plain_file_names() {
    for name in ["../x", "a/b", "/etc/passwd", "", ".", ".."] {
        let e = capture_error(|c, _| {
            let _ = c.open_image(name);
        });
        assert_protocol(e, &format!("bad image name {name:?}"));
    }
}

#[test]
fn capture_rejects_the_same_image_twice() {
    let e = capture_error(|c, _| {
        c.write_image("core-1.img", b"first").unwrap();
        let _ = c.write_image("core-1.img", b"second");
    });
    assert_protocol(e, "CRIU wrote image core-1.img twice");
}

#[test]
fn capture_rejects_a_stream_cut_inside_a_request() {
    let frame = request_frame("pages-1.img");
    assert_eq!(frame.len(), 17);
    // Inside the length prefix, right after it, and inside the message.
    for cut in [1, 3, 4, 5, 16] {
        let e = capture_error(|c, _| {
            c.send_raw(&frame[..cut]).unwrap();
            c.sock.shutdown(std::net::Shutdown::Write).unwrap();
        });
        assert_protocol(e, "stream ended inside");
    }
}

#[test]
fn capture_rejects_a_request_without_a_pipe() {
    let e = capture_error(|c, _| {
        c.send_request("core-1.img").unwrap();
        c.sock.shutdown(std::net::Shutdown::Write).unwrap();
    });
    assert_protocol(e, "CRIU closed the socket instead of sending a pipe");
    let e = capture_error(|c, dir| {
        c.send_request("core-1.img").unwrap();
        send_fd(&c.sock, not_a_pipe(dir).as_fd()).unwrap();
    });
    assert_protocol(e, "CRIU sent an fd that is not a pipe");
}

#[test]
fn capture_rejects_an_oversized_message_without_allocating_it() {
    let before = HUGE_ALLOCS.load(Ordering::SeqCst);
    let e = capture_error(|c, _| {
        c.send_raw(&u32::MAX.to_le_bytes()).unwrap();
    });
    assert_protocol(e, &format!("message of {} bytes", u32::MAX));
    assert_eq!(HUGE_ALLOCS.load(Ordering::SeqCst), before);
}

// ---------------------------------------------------------------------------------
// capture: the post-dump hook

#[test]
fn hook_is_answered_ok_only_after_commit_at_hook_committed_the_archive() {
    let inventory = pattern(7, 3000);
    let pages = pattern(8, 1 << 20);
    let frozen = AtomicBool::new(false);
    let committed = AtomicBool::new(false);
    let (mut writer, shards) = mem_writer(1, Compression::zstd(1));
    let opts = CaptureOptions {
        on_frozen: Some(Box::new(|w: &mut ArchiveWriter| {
            assert!(
                !committed.load(Ordering::SeqCst),
                "on_frozen after the commit"
            );
            add_file(w, "rootfs-marker", b"added while frozen");
            frozen.store(true, Ordering::SeqCst);
            Ok(())
        })),
        commit_at_hook: Some(Box::new(|w: &mut ArchiveWriter| {
            assert!(frozen.load(Ordering::SeqCst), "commit before on_frozen");
            w.commit()?;
            committed.store(true, Ordering::SeqCst);
            Ok(())
        })),
        ..fast_capture()
    };
    let run = run_capture(&mut writer, opts, true, |dir| {
        let criu = DumpClient::connect(dir).unwrap();
        criu.write_image("inventory.img", &inventory).unwrap();
        criu.write_image("pages-1.img", &pages).unwrap();
        assert!(
            !committed.load(Ordering::SeqCst),
            "committed before the hook"
        );
        let answer = post_dump_hook(dir).unwrap();
        // What "ok" promises: the archive is committed, readable, complete.
        let was_committed = committed.load(Ordering::SeqCst);
        let reader = shards.open();
        (answer, was_committed, reader)
        // The socket closes here, as CRIU closes it after the post-dump scripts.
    });
    let (answer, was_committed, reader) = run.criu;
    assert_eq!(answer, "ok\n");
    assert!(was_committed, "hook answered before the commit");
    run.result.expect("capture");
    assert_eq!(
        run.events,
        [
            CaptureEvent::Connected,
            CaptureEvent::CheckpointStart,
            CaptureEvent::HookAnswered
        ]
    );
    let reader = reader.expect("archive readable when the hook said ok");
    assert_eq!(entry_bytes(&reader, "criu/inventory.img"), inventory);
    assert_eq!(entry_bytes(&reader, "criu/pages-1.img"), pages);
    assert_eq!(entry_bytes(&reader, "rootfs-marker"), b"added while frozen");
}

#[test]
fn hook_with_commit_at_hook_waits_until_every_image_pipe_is_closed() {
    let pages = pattern(9, 1 << 20);
    let committed = AtomicBool::new(false);
    let (mut writer, shards) = mem_writer(1, Compression::NONE);
    let opts = CaptureOptions {
        commit_at_hook: Some(Box::new(|w: &mut ArchiveWriter| {
            w.commit()?;
            committed.store(true, Ordering::SeqCst);
            Ok(())
        })),
        ..fast_capture()
    };
    let run = run_capture(&mut writer, opts, true, |dir| {
        let criu = DumpClient::connect(dir).unwrap();
        let mut pg = criu.open_image("pages-1.img").unwrap();
        pg.write_all(&pages[..40 << 10]).unwrap();
        // Not CRIU's order (it closes every image before the hook): the hook must not be
        // answered while an image can still grow.
        let hook = connect_hook(dir).unwrap();
        hook.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut hook = BufReader::new(hook);
        let mut early = String::new();
        let waited = hook.read_line(&mut early);
        let committed_early = committed.load(Ordering::SeqCst);
        pg.write_all(&pages[40 << 10..]).unwrap();
        drop(pg);
        hook.get_ref()
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .unwrap();
        let mut answer = String::new();
        hook.read_line(&mut answer).unwrap();
        (waited.map_err(|e| e.kind()), early, committed_early, answer)
    });
    let (waited, early, committed_early, answer) = run.criu;
    assert!(
        matches!(
            waited,
            Err(io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
        ),
        "hook answered {early:?} while an image pipe was open"
    );
    assert!(!committed_early);
    assert_eq!(answer, "ok\n");
    run.result.expect("capture");
    let reader = shards.open().unwrap();
    assert_eq!(entry_bytes(&reader, "criu/pages-1.img"), pages);
}

#[test]
fn hook_is_answered_fail_when_commit_at_hook_fails() {
    let (mut writer, shards) = mem_writer(1, Compression::NONE);
    let opts = CaptureOptions {
        commit_at_hook: Some(Box::new(|_: &mut ArchiveWriter| {
            Err(CriuError::Criu("disk full".into()))
        })),
        ..fast_capture()
    };
    let run = run_capture(&mut writer, opts, true, |dir| {
        let criu = DumpClient::connect(dir).unwrap();
        criu.write_image("inventory.img", b"inv").unwrap();
        post_dump_hook(dir).unwrap()
    });
    assert_eq!(run.criu, "fail\n");
    assert!(
        matches!(&run.result, Err(CriuError::Criu(m)) if m == "disk full"),
        "{:?}",
        run.result
    );
    assert!(!run.events.contains(&CaptureEvent::HookAnswered));
    writer.abort();
    assert!(matches!(
        shards.open(),
        Err(ckstream_format::Error::Incomplete(_))
    ));
}

#[test]
fn leave_running_hook_is_answered_while_an_image_is_still_streaming() {
    let pages = pattern(10, 3 << 20);
    let frozen = AtomicBool::new(false);
    let (mut writer, shards) = mem_writer(1, Compression::zstd(1));
    let opts = CaptureOptions {
        on_frozen: Some(Box::new(|_: &mut ArchiveWriter| {
            frozen.store(true, Ordering::SeqCst);
            Ok(())
        })),
        commit_at_hook: None,
        ..fast_capture()
    };
    let run = run_capture(&mut writer, opts, true, |dir| {
        let criu = DumpClient::connect(dir).unwrap();
        criu.write_image("inventory.img", b"inv").unwrap();
        let mut pg = criu.open_image("pages-1.img").unwrap();
        pg.write_all(&pages[..32 << 10]).unwrap();
        // The pipe is open and most of the image still to come: the answer must not wait.
        let answer = post_dump_hook(dir).unwrap();
        let was_frozen = frozen.load(Ordering::SeqCst);
        pg.write_all(&pages[32 << 10..]).unwrap();
        (answer, was_frozen)
    });
    assert_eq!(run.criu, ("ok\n".to_string(), true));
    let report = run.result.expect("capture");
    assert_eq!(
        run.events,
        [
            CaptureEvent::Connected,
            CaptureEvent::CheckpointStart,
            CaptureEvent::HookAnswered
        ]
    );
    assert_eq!(report.bytes, 3 + pages.len() as u64);
    writer.finish().unwrap();
    let reader = shards.open().unwrap();
    assert_eq!(entry_bytes(&reader, "criu/pages-1.img"), pages);
}

#[test]
fn an_image_after_the_committed_hook_is_a_protocol_error() {
    let (mut writer, _shards) = mem_writer(1, Compression::NONE);
    let opts = CaptureOptions {
        commit_at_hook: Some(Box::new(|w: &mut ArchiveWriter| {
            w.commit()?;
            Ok(())
        })),
        ..fast_capture()
    };
    let run = run_capture(&mut writer, opts, true, |dir| {
        let criu = DumpClient::connect(dir).unwrap();
        criu.write_image("inventory.img", b"inv").unwrap();
        let answer = post_dump_hook(dir).unwrap();
        let _ = criu.write_image("late.img", b"too late");
        let _ = (&criu.sock).read(&mut [0u8; 1]);
        answer
    });
    assert_eq!(run.criu, "ok\n");
    assert_protocol(
        run.result.unwrap_err(),
        "CRIU sent image late.img after its post-dump hook",
    );
}

// ---------------------------------------------------------------------------------
// capture: stop, watch, timeouts

#[test]
fn stop_interrupts_capture_promptly_while_a_pipe_is_busy() {
    let (flag, stop) = stop_flag!();
    // A slow disk holds capture back, so whenever it reads the pipe again the pipe is
    // full: it never runs dry, and capture never gets back to its poll loop.
    let mut writer = slow_writer(Duration::from_millis(5));
    let opts = CaptureOptions {
        stop,
        ..fast_capture()
    };
    let run = run_capture(&mut writer, opts, false, |dir| {
        let criu = DumpClient::connect(dir).unwrap();
        let mut pg = criu.open_image("pages-1.img").unwrap();
        let buf = pattern(11, 64 << 10);
        let start = Instant::now();
        let mut set_at = None;
        loop {
            if let Err(e) = pg.write_all(&buf) {
                return (set_at, e.kind(), Instant::now());
            }
            if set_at.is_none() && start.elapsed() > Duration::from_millis(300) {
                flag.store(true, Ordering::SeqCst);
                set_at = Some(Instant::now());
            }
        }
    });
    assert!(
        matches!(run.result, Err(CriuError::Interrupted)),
        "{:?}",
        run.result
    );
    let (set_at, kind, broken_at) = run.criu;
    assert_eq!(kind, io::ErrorKind::BrokenPipe);
    let latency = broken_at - set_at.expect("stop was requested");
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    writer.abort();
}

#[test]
fn stop_interrupts_capture_while_waiting_for_criu_to_connect() {
    let (flag, stop) = stop_flag!();
    let (mut writer, _shards) = mem_writer(1, Compression::NONE);
    let opts = CaptureOptions {
        stop,
        ..fast_capture()
    };
    let run = run_capture(&mut writer, opts, false, |_| {
        std::thread::sleep(Duration::from_millis(200));
        flag.store(true, Ordering::SeqCst);
        Instant::now()
    });
    let latency = run.criu.elapsed();
    assert!(
        matches!(run.result, Err(CriuError::Interrupted)),
        "{:?}",
        run.result
    );
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    assert!(run.events.is_empty());
    writer.abort();
}

#[test]
fn watch_error_aborts_capture_and_fails_the_pending_hook() {
    let criu_exited = AtomicBool::new(false);
    let (mut writer, _shards) = mem_writer(1, Compression::NONE);
    let opts = CaptureOptions {
        watch: Some(Box::new(|| {
            if criu_exited.load(Ordering::SeqCst) {
                Err(CriuError::Criu("criu dump failed (exit status: 1)".into()))
            } else {
                Ok(())
            }
        })),
        commit_at_hook: Some(Box::new(|w: &mut ArchiveWriter| {
            w.commit()?;
            Ok(())
        })),
        ..fast_capture()
    };
    let run = run_capture(&mut writer, opts, true, |dir| {
        let criu = DumpClient::connect(dir).unwrap();
        let mut pg = criu.open_image("pages-1.img").unwrap();
        pg.write_all(b"some pages").unwrap();
        // The hook is pending (an image is open); then the watch reports trouble.
        let mut hook = BufReader::new(connect_hook(dir).unwrap());
        std::thread::sleep(Duration::from_millis(200));
        criu_exited.store(true, Ordering::SeqCst);
        let mut answer = String::new();
        hook.read_line(&mut answer).unwrap();
        answer
    });
    assert_eq!(run.criu, "fail\n");
    assert!(
        matches!(&run.result, Err(CriuError::Criu(m)) if m.contains("exit status: 1")),
        "{:?}",
        run.result
    );
    writer.abort();
}

#[test]
fn capture_times_out_when_criu_goes_quiet() {
    let (mut writer, _shards) = mem_writer(1, Compression::NONE);
    let opts = CaptureOptions {
        idle_timeout: Duration::from_millis(300),
        ..fast_capture()
    };
    let started = Instant::now();
    let run = run_capture(&mut writer, opts, false, |dir| {
        let criu = DumpClient::connect(dir).unwrap();
        let pg = criu.open_image("pages-1.img").unwrap();
        // Holds the pipe open, writes nothing, until the streamer hangs up.
        let _ = (&criu.sock).read(&mut [0u8; 1]);
        drop(pg);
    });
    let took = started.elapsed();
    assert!(
        matches!(run.result, Err(CriuError::Timeout(_))),
        "{:?}",
        run.result
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    writer.abort();
}

// ---------------------------------------------------------------------------------
// serve

/// Images of the serve tests, as CRIU wrote them.
fn images() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("inventory.img", pattern(20, 2000)),
        ("pagemap-1.img", pattern(21, 100_000)),
        ("pages-1.img", pattern(22, 3 << 20)),
        ("core-1.img", pattern(23, 5000)),
        ("empty.img", Vec::new()),
    ]
}

/// An archive of `images()` plus a rootfs file and a directory under `criu/`.
fn fill_archive(w: &mut ArchiveWriter) -> ckstream_format::Result<()> {
    w.add_entry(dir_entry("criu"))?;
    for (name, data) in images() {
        add_file(w, &format!("criu/{name}"), &data);
    }
    w.add_entry(dir_entry("criu/subdir"))?;
    w.add_entry(dir_entry("rootfs"))?;
    add_file(w, "rootfs/secret", b"not an image");
    Ok(())
}

fn mem_archive(compression: Compression) -> Vec<Vec<u8>> {
    let (mut w, shards) = mem_writer(1, compression);
    fill_archive(&mut w).unwrap();
    w.finish().unwrap();
    shards.bytes()
}

struct ServeRun<T> {
    result: Result<ServeReport, CriuError>,
    criu: T,
}

/// Runs `serve` on this thread while `criu` plays CRIU's restore on another.
fn run_serve<T: Send>(
    reader: ArchiveReader,
    opts: ServeOptions,
    criu: impl FnOnce(&Path) -> T + Send,
) -> ServeRun<T> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let listener = socket::bind(dir, SERVE_SOCKET).unwrap();
    std::thread::scope(|s| {
        let client = s.spawn(|| criu(dir));
        let result = serve(&listener, Arc::new(reader), opts);
        let criu = client
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        ServeRun { result, criu }
    })
}

fn image(name: &str) -> Vec<u8> {
    images()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| d)
        .unwrap()
}

#[test]
fn serve_answers_out_of_order_concurrent_and_repeated_requests_with_identical_bytes() {
    let reader = open_shards(mem_archive(Compression::zstd(1))).unwrap();
    let order = [
        "pages-1.img",
        "core-1.img",
        "pages-1.img",
        "pagemap-1.img",
        "empty.img",
        "inventory.img",
        "pages-1.img",
    ];
    let run = run_serve(reader, fast_serve(), |dir| {
        let mut criu = RestoreClient::connect(dir).unwrap();
        // One request after the other on the one socket, none of the pipes read yet
        // (pages-1.img is 48 times its pipe): serve must not wait for a pipe to drain
        // before it answers the next request.
        let pipes: Vec<_> = order
            .iter()
            .map(|n| criu.request(n).unwrap().expect("exists"))
            .collect();
        // Then CRIU reads them as it needs them: concurrently, last one first.
        let readers: Vec<_> = pipes.into_iter().rev().map(spawn_reader).collect();
        let mut got: Vec<Vec<u8>> = readers
            .into_iter()
            .map(|r| r.join().unwrap().unwrap())
            .collect();
        got.reverse();
        got
    });
    let report = run.result.expect("serve");
    for (name, got) in order.iter().zip(&run.criu) {
        assert!(*got == image(name), "{name}: {} bytes differ", got.len());
    }
    assert_eq!((report.requests, report.served), (7, 7));
    assert!(report.missing.is_empty());
    let total: usize = order.iter().map(|n| image(n).len()).sum();
    assert_eq!(report.bytes, total as u64);
}

#[test]
fn serve_says_missing_for_anything_but_a_file_under_criu() {
    let reader = open_shards(mem_archive(Compression::NONE)).unwrap();
    let asked = [
        "nothere.img",
        "../rootfs/secret",
        "subdir",
        "",
        "..",
        "inventory.img",
    ];
    let run = run_serve(reader, fast_serve(), |dir| {
        let mut criu = RestoreClient::connect(dir).unwrap();
        asked
            .iter()
            .map(|n| criu.request(n).unwrap().map(|p| read_to_end(p).unwrap()))
            .collect::<Vec<_>>()
    });
    let report = run.result.expect("serve");
    let expected: Vec<Option<Vec<u8>>> =
        vec![None, None, None, None, None, Some(image("inventory.img"))];
    assert_eq!(run.criu, expected);
    assert_eq!(
        report.missing,
        ["nothere.img", "../rootfs/secret", "subdir", "", ".."]
    );
    assert_eq!((report.requests, report.served), (6, 1));
}

#[test]
fn serve_sends_holes_as_zeros() {
    let size = (1 << 20) + 123;
    let mut expected = vec![0u8; size];
    let (mut w, shards) = mem_writer(1, Compression::zstd(1));
    w.add_entry(dir_entry("criu")).unwrap();
    let id = w
        .add_entry(file_entry("criu/holes.img", size as u64))
        .unwrap();
    // Data after a leading hole, an all-zero chunk (stored as a hole), unaligned data
    // between holes, and a trailing hole.
    for (offset, data) in [
        (100_000usize, pattern(30, 64 << 10)),
        (100_000 + (64 << 10), pattern(31, 6000)),
        (300_000, vec![0u8; 64 << 10]),
        (600_001, pattern(32, 10)),
    ] {
        expected[offset..offset + data.len()].copy_from_slice(&data);
        w.add_data(id, offset as u64, data, None).unwrap();
    }
    w.finish().unwrap();
    let reader = shards.open().unwrap();
    assert_eq!(reader.chunks_of(1).len(), 3);
    let run = run_serve(reader, fast_serve(), |dir| {
        let mut criu = RestoreClient::connect(dir).unwrap();
        read_to_end(criu.request("holes.img").unwrap().unwrap()).unwrap()
    });
    run.result.expect("serve");
    assert_eq!(run.criu.len(), size);
    assert!(run.criu == expected, "hole bytes differ");
}

/// Serves `pages-1.img` with one stored byte of chunk 5 flipped, plus the intact
/// `core-1.img`, on one connection. Returns (pages bytes received, core bytes, result).
fn serve_damaged(reader: ArchiveReader) -> (Vec<u8>, Vec<u8>, Result<ServeReport, CriuError>, u64) {
    let i = reader.find(b"criu/pages-1.img").unwrap();
    let damaged_at = reader.chunks_of(i)[5].file_offset;
    let run = run_serve(reader, fast_serve(), |dir| {
        let mut criu = RestoreClient::connect(dir).unwrap();
        let core = criu.request("core-1.img").unwrap().unwrap();
        let pages = criu.request("pages-1.img").unwrap().unwrap();
        let (core, pages) = (spawn_reader(core), spawn_reader(pages));
        (
            pages.join().unwrap().unwrap(),
            core.join().unwrap().unwrap(),
        )
    });
    (run.criu.0, run.criu.1, run.result, damaged_at)
}

/// Flips one stored byte inside chunk 5 of `pages-1.img`; returns its shard offset.
fn damage_offset(reader: &ArchiveReader) -> u64 {
    let i = reader.find(b"criu/pages-1.img").unwrap();
    let c = &reader.chunks_of(i)[5];
    assert_eq!((c.shard, c.file_offset), (0, 5 * CHUNK as u64));
    c.offset + 1000
}

fn assert_damage_not_served(
    (pages, core, result, damaged_at): (Vec<u8>, Vec<u8>, Result<ServeReport, CriuError>, u64),
) {
    // Everything before the damaged chunk, in order, and not one byte more: CRIU sees a
    // short image, never wrong memory.
    assert_eq!(pages.len() as u64, damaged_at);
    assert!(pages[..] == image("pages-1.img")[..pages.len()]);
    assert_eq!(core, image("core-1.img"));
    assert!(
        matches!(
            &result,
            Err(CriuError::Archive(
                ckstream_format::Error::DigestMismatch { what }
            )) if what.contains("pages-1.img")
        ),
        "{result:?}"
    );
}

#[test]
fn serve_closes_the_pipe_before_a_damaged_chunk_in_memory() {
    let mut shards = mem_archive(Compression::NONE);
    let at = damage_offset(&open_shards(shards.clone()).unwrap());
    shards[0][at as usize] ^= 0x40;
    assert_damage_not_served(serve_damaged(open_shards(shards).unwrap()));
}

#[test]
fn serve_closes_the_pipe_before_a_damaged_chunk_in_a_local_shard_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ckpt.cka");
    let location = ArchiveLocation::Path(path.clone());
    let spec = ArchiveSpec {
        shards: 1,
        writer: WriterOptions {
            compression: Compression::NONE,
            chunk_size: CHUNK,
            threads: 2,
            ..Default::default()
        },
        command: "test",
        writeback: Writeback::Off,
    };
    location.write(&spec, fill_archive).unwrap();
    let at = damage_offset(&location.open(tmp.path()).unwrap());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    drop(file);
    let reader = location.open(tmp.path()).unwrap();
    // Uncompressed chunks of a local file are spliced into the pipe: that path too.
    assert!(reader.shard(0).as_file().is_some());
    assert_damage_not_served(serve_damaged(reader));
}

#[test]
fn serve_survives_criu_closing_a_pipe_early() {
    let reader = open_shards(mem_archive(Compression::zstd(1))).unwrap();
    let run = run_serve(reader, fast_serve(), |dir| {
        let mut criu = RestoreClient::connect(dir).unwrap();
        let mut pages = criu.request("pages-1.img").unwrap().unwrap();
        let mut head = vec![0u8; 1000];
        pages.read_exact(&mut head).unwrap();
        drop(pages);
        let core = read_to_end(criu.request("core-1.img").unwrap().unwrap()).unwrap();
        (head, core)
    });
    let report = run.result.expect("an early close is no serve error");
    let (head, core) = run.criu;
    assert_eq!(head, image("pages-1.img")[..1000]);
    assert_eq!(core, image("core-1.img"));
    assert_eq!((report.requests, report.served), (2, 2));
    assert!(report.bytes < (image("pages-1.img").len() + core.len()) as u64);
}

#[test]
fn stop_interrupts_serve_waiting_for_the_next_request() {
    let (flag, stop) = stop_flag!();
    let reader = open_shards(mem_archive(Compression::NONE)).unwrap();
    let opts = ServeOptions {
        stop,
        ..fast_serve()
    };
    let run = run_serve(reader, opts, |dir| {
        let criu = RestoreClient::connect(dir).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        flag.store(true, Ordering::SeqCst);
        let set_at = Instant::now();
        // Until the streamer hangs up.
        let n = (&criu.sock).read(&mut [0u8; 1]);
        (set_at, n.map_err(|e| e.kind()), Instant::now())
    });
    assert!(
        matches!(run.result, Err(CriuError::Interrupted)),
        "{:?}",
        run.result
    );
    let (set_at, n, hung_up) = run.criu;
    assert_eq!(n, Ok(0));
    assert!(hung_up - set_at < Duration::from_secs(1));
}

#[test]
fn serve_times_out_when_criu_goes_quiet_or_never_comes() {
    let reader = open_shards(mem_archive(Compression::NONE)).unwrap();
    let opts = ServeOptions {
        idle_timeout: Duration::from_millis(300),
        ..fast_serve()
    };
    let started = Instant::now();
    let run = run_serve(reader, opts, |dir| {
        let mut criu = RestoreClient::connect(dir).unwrap();
        let inv = read_to_end(criu.request("inventory.img").unwrap().unwrap()).unwrap();
        let _ = (&criu.sock).read(&mut [0u8; 1]);
        inv
    });
    let took = started.elapsed();
    assert_eq!(run.criu, image("inventory.img"));
    assert!(
        matches!(run.result, Err(CriuError::Timeout(_))),
        "{:?}",
        run.result
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "took {took:?}"
    );

    let reader = open_shards(mem_archive(Compression::NONE)).unwrap();
    let opts = ServeOptions {
        accept_timeout: Duration::from_millis(300),
        ..fast_serve()
    };
    let started = Instant::now();
    let run = run_serve(reader, opts, |_| ());
    let took = started.elapsed();
    assert!(
        matches!(run.result, Err(CriuError::Timeout(_))),
        "{:?}",
        run.result
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
}
