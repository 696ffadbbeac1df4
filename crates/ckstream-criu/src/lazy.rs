//! Lazy (post-copy) restore: the tree runs as soon as its metadata and the few pages
//! that cannot wait are back; its private anonymous memory follows from the archive.
//!
//! CRIU does the userfaultfd work: `criu restore --stream --lazy-pages` restores the
//! tree and hands each process's userfaultfd to `criu lazy-pages`, which fills the lazy
//! ranges — on a fault first, otherwise pushing each process's memory in ascending
//! address order — by asking a page server. ckstream is that page server (on a
//! socketpair, `--ps-socket`), and the image streamer of the restore:
//!
//! * the restore is served every image as usual except `pagemap-<pid>.img`, whose lazy
//!   entries lose `PE_PRESENT`, and `pages-<id>.img`, reduced to the pages that are not
//!   lazy (CRIU skips lazy pages by offset, never by reading: the stream must not hold
//!   them);
//! * the daemon gets `inventory.img`, `pstree.img`, `mm-*.img` and `pagemap-*.img` in a
//!   private directory (it cannot stream);
//! * page requests (`PS_IOV_GET`: pid, dump-time address, page count) are answered in
//!   order from `pages-<id>.img` in the archive, every chunk digest-checked first, read
//!   ahead in the daemon's order ([`crate::pages`]).
//!
//! A restored process whose pages stop coming would run on zero pages: on any error
//! while pages are outstanding (a bad chunk, an unreachable store, the daemon gone)
//! every process of the tree is SIGKILLed before the page server stops answering.

use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckstream_format::{ArchiveReader, EntryKind};

use crate::error::{CriuError, Result};
use crate::images::{self, Pagemap, PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT};
use crate::pages::{PageFile, Piece};
use crate::restore::{
    adopt_orphans, apply_rootfs, default_threads, verify_metadata, RestoreOptions, REMOTE_DECODERS,
};
use crate::serve::{serve, ServeOptions, ServeReport};
use crate::workdir::WorkDir;
use crate::{image_path, run, socket, IMAGES_PREFIX};

/// `PS_IOV_GET`: send pages.
const PS_IOV_GET: u32 = 7;
/// `PS_IOV_ADD_F` with `PE_PRESENT` in the flags half: the reply header.
const PS_REPLY: u32 = 6 | (PE_PRESENT << 16);
/// `PS_IOV_CLOSE` and `PS_IOV_FORCE_CLOSE`: the daemon is done.
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;

/// Is userfaultfd there for CRIU to use (the kernel has it, and we may use it)?
/// `CKSTREAM_NO_USERFAULTFD=1` says no (to test the fallback on a kernel that has it).
pub fn userfaultfd_available() -> bool {
    if std::env::var_os("CKSTREAM_NO_USERFAULTFD").is_some_and(|v| v != "0") {
        return false;
    }
    let sysctl = Path::new("/proc/sys/vm/unprivileged_userfaultfd");
    sysctl.exists()
        && (rustix::process::geteuid().is_root()
            || std::fs::read_to_string(sysctl).is_ok_and(|v| v.trim() == "1"))
}

/// One process's lazy memory: where each lazy range lives in its pages file.
struct LazyProcess {
    file: Arc<PageFile>,
    /// (dump-time address, pages, offset in the pages file), ascending.
    ranges: Vec<(u64, u64, u64)>,
}

/// What the restore is served instead of the archive, what the daemon needs, and where
/// the lazy pages are.
struct Plan {
    replace: HashMap<String, Arc<Vec<u8>>>,
    daemon_images: Vec<(String, usize)>,
    processes: HashMap<u32, LazyProcess>,
    pids: Vec<u32>,
    lazy_bytes: u64,
}

fn read_image(reader: &ArchiveReader, name: &str) -> Result<Option<(usize, Vec<u8>)>> {
    let Some(i) = reader.find(&image_path(name)) else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    reader.copy_entry(i, &mut bytes)?;
    Ok(Some((i, bytes)))
}

fn plan(reader: &Arc<ArchiveReader>) -> Result<Plan> {
    let (_, pstree) = read_image(reader, "pstree.img")?
        .ok_or_else(|| CriuError::Criu("the archive holds no criu/pstree.img".into()))?;
    let pids: Vec<u32> = images::parse_pstree(&pstree)?
        .iter()
        .map(|p| p.pid)
        .collect();
    let mut plan = Plan {
        replace: HashMap::new(),
        daemon_images: Vec::new(),
        processes: HashMap::new(),
        pids: pids.clone(),
        lazy_bytes: 0,
    };
    let prefix = format!("{IMAGES_PREFIX}/");
    for (i, e) in reader.entries().iter().enumerate() {
        let Some(name) = e.path.strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        let name = String::from_utf8_lossy(name);
        let for_daemon = name == "inventory.img"
            || name == "pstree.img"
            || (name.starts_with("mm-") || name.starts_with("pagemap-"))
                && name.ends_with(".img")
                && !name.starts_with("pagemap-shmem-");
        if for_daemon && e.entry_kind() == EntryKind::File && !name.contains('/') {
            plan.daemon_images.push((name.into_owned(), i));
        }
    }
    for pid in pids {
        let name = format!("pagemap-{pid}.img");
        let Some((_, bytes)) = read_image(reader, &name)? else {
            continue;
        };
        let mut map = Pagemap::parse(&name, &bytes)?;
        let pages_name = format!("pages-{}.img", map.head.pages_id);
        let pages_entry = reader.find(&image_path(&pages_name));
        let file = pages_entry.map(|i| PageFile::new(reader.clone(), i));
        let mut kept = Vec::new();
        let mut ranges = Vec::new();
        let mut offset = 0u64;
        for entry in &mut map.entries {
            let flags = entry.pe_flags();
            if flags & PE_PARENT != 0 {
                return Err(CriuError::Criu(format!(
                    "{name} has pages in a parent image: an incremental dump cannot be restored lazily"
                )));
            }
            if flags & PE_PRESENT == 0 {
                continue;
            }
            if flags & PE_LAZY != 0 {
                ranges.push((entry.vaddr, u64::from(entry.nr_pages), offset));
                plan.lazy_bytes += entry.len();
                entry.flags = Some(flags & !PE_PRESENT);
            } else {
                let file = file.as_ref().ok_or_else(|| {
                    CriuError::Criu(format!("{pages_name} is missing from the archive"))
                })?;
                file.read(offset, entry.len(), false, &mut kept)?;
            }
            offset += entry.len();
        }
        plan.replace.insert(name, Arc::new(map.encode()));
        plan.replace.insert(pages_name.clone(), Arc::new(kept));
        if !ranges.is_empty() {
            let file = file.ok_or_else(|| {
                CriuError::Criu(format!("{pages_name} is missing from the archive"))
            })?;
            plan.processes.insert(pid, LazyProcess { file, ranges });
        }
    }
    Ok(plan)
}

/// What a lazy restore did.
#[derive(Debug, Default, Clone)]
pub struct LazyReport {
    /// The restore's image serving (metadata and non-lazy pages).
    pub serve: ServeReport,
    /// From the start until `criu restore` returned: the tree runs.
    pub to_running: Duration,
    /// From the start until the last page was in.
    pub to_complete: Duration,
    /// Bytes of lazy memory the archive holds.
    pub lazy_bytes: u64,
    /// Page requests answered.
    pub page_requests: u64,
    /// Lazy bytes served from chunks read ahead.
    pub bytes_prefetched: u64,
    /// Lazy bytes whose chunk was read when the request came.
    pub bytes_on_demand: u64,
    /// Lazy bytes sent to the daemon so far, live while pages are served (for progress).
    pub bytes_served: Arc<AtomicU64>,
}

/// The processes of a restored tree, to SIGKILL when their pages cannot come.
#[derive(Clone)]
struct Tree {
    pids: Vec<u32>,
    /// Boot time (clock ticks) before the restore started: a pid that started earlier
    /// is not one of ours.
    since_ticks: u64,
    children: Arc<Mutex<Vec<Arc<Mutex<Child>>>>>,
}

fn ticks_now() -> u64 {
    let up = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let secs: f64 = up
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    // CLK_TCK is 100 on every Linux architecture CRIU supports.
    (secs * 100.0) as u64
}

fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses).
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Tree {
    /// SIGKILLs CRIU's processes and every process of the tree started since the
    /// restore began. Returns how many tree processes were killed.
    fn kill(&self) -> usize {
        for c in self.children.lock().unwrap().iter() {
            let _ = c.lock().unwrap().kill();
        }
        let mut killed = 0;
        for &pid in &self.pids {
            let ours = start_ticks(pid).is_some_and(|t| t + 1 >= self.since_ticks);
            if let (true, Some(p)) = (ours, rustix::process::Pid::from_raw(pid as i32)) {
                if rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok() {
                    killed += 1;
                }
            }
        }
        killed
    }
}

/// Answers the daemon's page requests until it closes the session. Every error (and
/// the daemon going away before it said it was done) kills the tree first.
fn page_server(
    mut sock: UnixStream,
    processes: &HashMap<u32, LazyProcess>,
    read_ahead: usize,
    tree: &Tree,
    requests: &mut u64,
    served: &AtomicU64,
) -> Result<()> {
    let r = answer_requests(&mut sock, processes, read_ahead, requests, served);
    if r.is_err() {
        tree.kill();
    }
    for p in processes.values() {
        p.file.stop();
    }
    r
}

fn answer_requests(
    sock: &mut UnixStream,
    processes: &HashMap<u32, LazyProcess>,
    read_ahead: usize,
    requests: &mut u64,
    served: &AtomicU64,
) -> Result<()> {
    let mut closed = false;
    loop {
        let mut msg = [0u8; 24];
        match sock.read_exact(&mut msg) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && closed => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(CriuError::Criu(
                    "criu lazy-pages went away before every page was in".into(),
                ))
            }
            Err(e) => return Err(CriuError::io("reading a page request", e)),
        }
        let cmd = u32::from_le_bytes(msg[0..4].try_into().unwrap());
        let nr_pages = u32::from_le_bytes(msg[4..8].try_into().unwrap());
        let vaddr = u64::from_le_bytes(msg[8..16].try_into().unwrap());
        let dst_id = u64::from_le_bytes(msg[16..24].try_into().unwrap());
        match cmd & 0xffff {
            PS_IOV_GET => {}
            c if c == PS_IOV_CLOSE || c == PS_IOV_FORCE_CLOSE => {
                closed = true;
                sock.write_all(&0i32.to_le_bytes())
                    .map_err(|e| CriuError::io("answering the daemon's close", e))?;
                continue;
            }
            c => {
                return Err(CriuError::Protocol(format!(
                    "unexpected page-server command {c:#x}"
                )))
            }
        }
        *requests += 1;
        if *requests == 16 {
            // Tests hold the page server here (SIGSTOP) to break the store mid-transfer.
            ckstream_store::failpoint::hit("lazy.page-request-16")
                .map_err(|e| CriuError::io("serving pages", e))?;
        }
        let unknown = || {
            CriuError::Protocol(format!(
                "page request for {nr_pages} pages at {vaddr:#x} of process {dst_id}, which the checkpoint has no lazy pages for"
            ))
        };
        let p = u32::try_from(dst_id)
            .ok()
            .and_then(|pid| processes.get(&pid))
            .ok_or_else(unknown)?;
        let k = p.ranges.partition_point(|r| r.0 <= vaddr);
        let &(start, pages, offset) = k
            .checked_sub(1)
            .and_then(|k| p.ranges.get(k))
            .ok_or_else(unknown)?;
        let skip = (vaddr - start) / PAGE_SIZE;
        if (vaddr - start) % PAGE_SIZE != 0 || skip >= pages || nr_pages == 0 {
            return Err(unknown());
        }
        // Never more than asked (the daemon would read extra bytes as the next header).
        let m = u64::from(nr_pages).min(pages - skip);
        let mut header = [0u8; 24];
        header[0..4].copy_from_slice(&PS_REPLY.to_le_bytes());
        header[4..8].copy_from_slice(&(m as u32).to_le_bytes());
        header[8..16].copy_from_slice(&vaddr.to_le_bytes());
        header[16..24].copy_from_slice(&dst_id.to_le_bytes());
        let at = offset + skip * PAGE_SIZE;
        // The read-ahead starts with the first request for the file, not while CRIU
        // restores (it would take the cores CRIU needs then), from the first lazy page
        // (the push goes up from there; the first request is often a fault far above).
        p.file.start_read_ahead(read_ahead, p.ranges[0].2);
        // The daemon's background push asks for more than one page, in ascending order;
        // a fault asks for one.
        let pieces = p.file.pieces(at, m * PAGE_SIZE, nr_pages > 1)?;
        send_reply(sock, &header, &pieces)
            .map_err(|e| CriuError::io("sending pages to criu lazy-pages", e))?;
        served.fetch_add(m * PAGE_SIZE, Ordering::Relaxed);
    }
}

/// Writes a reply header and its pages without gathering them into one buffer.
fn send_reply(sock: &mut UnixStream, header: &[u8], pieces: &[Piece]) -> std::io::Result<()> {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    let mut slices = vec![IoSlice::new(header)];
    for piece in pieces {
        match piece {
            Piece::Data(data, range) => slices.push(IoSlice::new(&data[range.clone()])),
            Piece::Zeros(n) => {
                let mut n = *n as usize;
                while n > 0 {
                    let k = n.min(ZEROS.len());
                    slices.push(IoSlice::new(&ZEROS[..k]));
                    n -= k;
                }
            }
        }
    }
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match sock.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes `fd` survive exec (for a child that is told its number).
fn inheritable(fd: &OwnedFd) -> Result<()> {
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())
        .map_err(|e| CriuError::io("passing a descriptor to criu", e))
}

/// Starts `criu lazy-pages` on the images in `daemon_dir`, sharing `work` with the
/// restore, with `ps` as its page server; returns once it listens.
fn spawn_daemon(
    daemon_dir: &Path,
    work: &Path,
    ps: OwnedFd,
    stop: ckstream_format::Stop,
) -> Result<Child> {
    let (status_r, status_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| CriuError::io("creating a pipe", e))?;
    inheritable(&ps)?;
    inheritable(&status_w)?;
    let mut c = Command::new(run::criu_binary());
    c.arg("lazy-pages")
        .arg("-D")
        .arg(daemon_dir)
        .arg("-W")
        .arg(work)
        .arg("--page-server")
        .arg("--ps-socket")
        .arg(ps.as_raw_fd().to_string())
        .arg("--status-fd")
        .arg(status_w.as_raw_fd().to_string())
        .arg("-o")
        .arg("lazy-pages.log")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(run::stderr_file(work, "lazy-pages")?);
    let mut child = c
        .spawn()
        .map_err(|e| CriuError::io(format!("starting {}", run::criu_binary().display()), e))?;
    drop((ps, status_w));
    let log = work.join("lazy-pages.log");
    let mut status = std::fs::File::from(status_r);
    let ready = socket::wait_readable(&status, Duration::from_secs(30), "criu lazy-pages", stop)
        .and_then(|()| {
            let mut b = [0u8; 1];
            match status.read(&mut b) {
                Ok(1) => Ok(()),
                _ => Err(CriuError::Criu(String::new())),
            }
        });
    if let Err(e) = ready {
        let _ = child.kill();
        let st = child
            .wait()
            .map_err(|e| CriuError::io("waiting for criu", e))?;
        return Err(match e {
            CriuError::Criu(_) => run::criu_failure("lazy-pages", st, &log),
            e => e,
        });
    }
    Ok(child)
}

/// Restores the tree checkpointed in `reader` lazily (see the module documentation).
/// `on_running` is called once `criu restore` returned and the tree runs; the call
/// returns when every page is in.
///
/// # Errors
/// As [`crate::restore::restore`]; once the tree runs, archive errors (exit 3 for a bad
/// archive), I/O errors and the daemon's failure — the tree is killed first.
pub fn restore_lazy(
    reader: Arc<ArchiveReader>,
    remote: bool,
    opts: &RestoreOptions,
    on_running: &mut dyn FnMut(&LazyReport),
) -> Result<LazyReport> {
    let started = Instant::now();
    verify_metadata(&reader)?;
    if opts.verify_first {
        reader.verify(default_threads(), &Default::default())?;
    }
    let plan = plan(&reader)?;
    if let Some(target) = opts.rootfs {
        apply_rootfs(&reader, target)?;
    }
    let mut work = WorkDir::new(opts.work_dir.clone(), "ckstream-restore")?;
    let daemon_dir = work.path.join("lazy-images");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&daemon_dir)
        .map_err(|e| CriuError::io(format!("creating {}", daemon_dir.display()), e))?;
    for (name, i) in &plan.daemon_images {
        let path = daemon_dir.join(name);
        let mut out = ckstream_store::create_private_file(&path)
            .map_err(|e| CriuError::io(format!("creating {}", path.display()), e))?;
        reader.copy_entry(*i, &mut out)?;
    }
    if remote {
        // The push reads each page file front to back, page faults jump ahead of it:
        // fetch spans ahead, small enough that a fault's read does not wait long.
        reader.expect_sequential_with_urgent_reads();
    }
    let decoders = opts.decoders.unwrap_or(if remote {
        default_threads().max(REMOTE_DECODERS)
    } else {
        default_threads()
    });
    let mut report = LazyReport {
        lazy_bytes: plan.lazy_bytes,
        ..Default::default()
    };
    let tree = Tree {
        pids: plan.pids.clone(),
        since_ticks: ticks_now(),
        children: Arc::default(),
    };
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| CriuError::io("creating a socketpair", e))?;
    // A whole 4 MiB reply in the socket at once: the daemon reads it in a few calls
    // instead of one per 200 KiB (a UNIX socket's default). Best effort.
    if rustix::net::sockopt::set_socket_send_buffer_size_force(&ours, 4 << 20).is_err() {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&ours, 4 << 20);
    }
    let daemon = match spawn_daemon(&daemon_dir, &work.path, theirs.into(), opts.stop) {
        Ok(c) => Arc::new(Mutex::new(c)),
        Err(e) => {
            work.keep();
            return Err(e);
        }
    };
    tree.children.lock().unwrap().push(daemon.clone());
    let processes = Arc::new(plan.processes);
    let server = {
        let (tree, processes) = (tree.clone(), processes.clone());
        let served = report.bytes_served.clone();
        std::thread::spawn(move || {
            let mut requests = 0;
            let r = page_server(ours, &processes, decoders, &tree, &mut requests, &served);
            (r, requests)
        })
    };
    let listener = socket::bind(&work.path, socket::SERVE_SOCKET)?;
    adopt_orphans();
    let mut criu_args = opts.criu_args.to_vec();
    criu_args.push("--lazy-pages".into());
    let restore_child = Arc::new(Mutex::new(run::spawn_restore(&work.path, &criu_args)?));
    tree.children.lock().unwrap().push(restore_child.clone());
    let log = work.path.join("restore.log");
    let watch = {
        let (child, log) = (restore_child.clone(), log.clone());
        Box::new(move || -> Result<()> {
            match child.lock().unwrap().try_wait() {
                Ok(Some(status)) if !status.success() => {
                    Err(run::criu_failure("restore", status, &log))
                }
                _ => Ok(()),
            }
        })
    };
    let served = serve(
        &listener,
        reader.clone(),
        ServeOptions {
            decoders,
            replace: plan.replace,
            watch: Some(watch),
            stop: opts.stop,
            ..Default::default()
        },
    );
    drop(listener);
    let restored = served.and_then(|s| {
        let status =
            run::wait_with_timeout(&mut restore_child.lock().unwrap(), Duration::from_secs(600))
                .map_err(|e| CriuError::io("waiting for criu", e))?;
        if status.success() {
            Ok(s)
        } else {
            Err(run::criu_failure("restore", status, &log))
        }
    });
    let failed = |work: &mut WorkDir, e: CriuError, outcome: String| {
        work.keep();
        CriuError::Failed {
            what: "lazy restore failed".into(),
            outcome,
            work_dir: work.path.clone(),
            source: Box::new(e),
        }
    };
    match restored {
        Ok(s) => report.serve = s,
        Err(e) => {
            let killed = tree.kill();
            let _ = run::wait_with_timeout(&mut daemon.lock().unwrap(), Duration::from_secs(10));
            // A page the archive could not give is why CRIU failed, when it is.
            let e = match server.join() {
                Ok((Err(page_error @ CriuError::Archive(_)), _)) => page_error,
                _ => e,
            };
            return Err(failed(
                &mut work,
                e,
                format!("no process was restored (killed {killed} half-restored processes)"),
            ));
        }
    }
    report.to_running = started.elapsed();
    on_running(&report);
    let (served, requests) = server
        .join()
        .unwrap_or_else(|_| (Err(CriuError::Protocol("page server panicked".into())), 0));
    let daemon_status =
        run::wait_with_timeout(&mut daemon.lock().unwrap(), Duration::from_secs(600))
            .map_err(|e| CriuError::io("waiting for criu lazy-pages", e));
    report.page_requests = requests;
    for p in processes.values() {
        report.bytes_prefetched += p.file.counters.prefetched.load(Ordering::Relaxed);
        report.bytes_on_demand += p.file.counters.on_demand.load(Ordering::Relaxed);
    }
    let outcome = |tree: &Tree| {
        tree.kill();
        "the restored processes were killed before they could run on missing pages".to_string()
    };
    if let Err(e) = served {
        return Err(failed(&mut work, e, outcome(&tree)));
    }
    match daemon_status {
        Ok(st) if st.success() => {}
        Ok(st) => {
            let e = run::criu_failure("lazy-pages", st, &work.path.join("lazy-pages.log"));
            return Err(failed(&mut work, e, outcome(&tree)));
        }
        Err(e) => return Err(failed(&mut work, e, outcome(&tree))),
    }
    report.to_complete = started.elapsed();
    Ok(report)
}
