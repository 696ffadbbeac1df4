//! Real CRIU workloads for the tests: the memtest program (tests/progs/memtest.c), which
//! fills memory with a pattern, beats a heartbeat file and re-verifies its memory on
//! SIGUSR1; helpers to find its processes; and a child subreaper so that trees whose
//! parent died (the memtest root after `setsid -f`, restored trees after CRIU exited,
//! processes orphaned by a killed ckstream) are reaped at once. PID 1 on some machines
//! reaps late, and a zombie keeps its PID: a restore that needs the same PIDs would fail.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use crate::support::{need_root, need_tool, signal};

/// True when root and CRIU are there; otherwise skips (or fails in CI).
pub fn criu_available(test: &str) -> bool {
    if !need_root(test) {
        return false;
    }
    need_tool(test, criu_binary(), "scripts/install-criu.sh installs it")
}

/// The CRIU that ckstream runs by default.
pub fn criu_binary() -> PathBuf {
    let local = Path::new("/usr/local/sbin/criu");
    if local.exists() {
        local.to_path_buf()
    } else {
        PathBuf::from("criu")
    }
}

/// Compiles tests/progs/memtest.c once per test binary.
pub fn memtest_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/progs/memtest.c");
        // Named `memtest` (its comm, which the subreaper looks for) in a directory of its own.
        let dir = std::env::temp_dir().join(format!("ckstream-memtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("memtest");
        let st = Command::new("gcc")
            .args(["-O2", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("gcc");
        assert!(st.success(), "compiling memtest failed");
        out
    })
}

pub fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What /proc/PID/stat says about a process.
#[derive(Debug, Clone)]
pub struct ProcStat {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    pub sid: u32,
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_string();
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(ProcStat {
        pid,
        comm,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        sid: fields.get(3)?.parse().ok()?,
    })
}

/// Every process on the machine.
pub fn all_processes() -> Vec<ProcStat> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter_map(proc_stat)
        .collect()
}

/// True while `pid` exists and is not a zombie.
pub fn running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// PIDs of every process in session `sid` (zombies included: they still hold their PID).
pub fn session_members(sid: u32) -> Vec<u32> {
    all_processes()
        .into_iter()
        .filter(|p| p.sid == sid)
        .map(|p| p.pid)
        .collect()
}

/// Live (not zombie) processes whose command line contains `needle` (a memtest tree:
/// its heartbeat path), originals and restored copies alike (not the `unshare` that
/// started a tree in a PID namespace).
pub fn live_with_cmdline(needle: &str) -> Vec<u32> {
    all_processes()
        .into_iter()
        .filter(|p| p.state != 'Z' && p.state != 'X' && p.comm != "unshare")
        .filter(|p| {
            std::fs::read(format!("/proc/{}/cmdline", p.pid))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .map(|p| p.pid)
        .collect()
}

/// Children of `pid` (by /proc ppid).
pub fn children_of(pid: u32) -> Vec<u32> {
    all_processes()
        .into_iter()
        .filter(|p| p.ppid == pid)
        .map(|p| p.pid)
        .collect()
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Makes this test process the child subreaper of everything it starts, and reaps
/// adopted zombies (memtest trees, unshare, the S3 server, CRIU and its half-restored
/// tasks) on a background thread. Direct children that the tests wait for themselves
/// (ckstream, setsid, aws, ...) are never touched; a zombie named `criu` or `bash` is
/// reaped only after it stayed a zombie for a while (a `criu --version` or the S3
/// script the tests ran is waited for at once). A killed server that nobody reaps stays
/// a zombie, and `S3Server::kill` waits for it to vanish.
pub fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER failed");
        std::thread::spawn(|| {
            let me = std::process::id();
            let mut seen: HashMap<u32, Instant> = HashMap::new();
            loop {
                let zombies: Vec<ProcStat> = all_processes()
                    .into_iter()
                    .filter(|p| p.ppid == me && p.state == 'Z')
                    .collect();
                seen.retain(|pid, _| zombies.iter().any(|z| z.pid == *pid));
                for z in zombies {
                    let first = *seen.entry(z.pid).or_insert_with(Instant::now);
                    let reap = match z.comm.as_str() {
                        // Never started directly by a test.
                        "memtest" | "unshare" | "weed" => true,
                        // A lazy restore's background page server, once every page is in.
                        "ckstream" => first.elapsed() > Duration::from_secs(2),
                        // CRIU's orphans and the S3 script's watchdog; a test's own
                        // `criu --version` or `bash` child is waited for long before.
                        "criu" | "bash" => first.elapsed() > Duration::from_secs(2),
                        _ => false,
                    };
                    if reap {
                        // SAFETY: waitpid on one known child, no pointers kept.
                        unsafe { libc::waitpid(z.pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    });
}

/// A running memtest process tree, killed on drop.
pub struct Memtest {
    pub dir: tempfile::TempDir,
    /// The root (host PID); it leads its own session, and its PID is the session id.
    pub pid: u32,
    /// The processes of the tree at start (root first).
    pub pids: Vec<u32>,
    pub children: u32,
}

impl Memtest {
    pub fn start(mib: u32, children: u32) -> Memtest {
        Memtest::start_with(mib, children, &[], false)
    }

    /// `fill`: memtest's MEMTEST_FILL (random, or mixed for compressible memory).
    pub fn start_with_fill(mib: u32, children: u32, fill: &str) -> Memtest {
        Memtest::start_with(mib, children, &[("MEMTEST_FILL", fill)], false)
    }

    /// A tree started with extra environment variables (memtest's MEMTEST_*, or any).
    pub fn start_with_env(mib: u32, children: u32, env: &[(&str, &str)]) -> Memtest {
        Memtest::start_with(mib, children, env, false)
    }

    /// A tree whose [`mutate`](Self::mutate) first also maps `insert_mib` MiB of fresh
    /// memory below the buffer (memtest's MEMTEST_MUTATE=insert), so every page of the
    /// buffer moves that far in CRIU's page image.
    pub fn start_inserting(mib: u32, children: u32, insert_mib: u32) -> Memtest {
        let insert = insert_mib.to_string();
        let env = [
            ("MEMTEST_MUTATE", "insert"),
            ("MEMTEST_INSERT_MIB", insert.as_str()),
        ];
        Memtest::start_with(mib, children, &env, false)
    }

    /// A tree that is the init of its own PID namespace: CRIU dumps the namespace and
    /// restores it into a new one, so a restore can run while the original (dumped with
    /// `--leave-running`) still runs: PIDs cannot clash.
    pub fn start_in_pid_namespace(mib: u32, children: u32) -> Memtest {
        Memtest::start_with(mib, children, &[], true)
    }

    fn start_with(mib: u32, children: u32, env: &[(&str, &str)], pidns: bool) -> Memtest {
        become_subreaper();
        let dir = tempfile::Builder::new()
            .prefix("ckstream-memtest-")
            .tempdir()
            .unwrap();
        let hb = dir.path().join("hb");
        // setsid -f: always fork, so the tree runs in its own session and we do not wait
        // for it. In a PID namespace, `setsid` (PID 1 there) makes memtest a session
        // leader without forking.
        let mut cmd = Command::new("setsid");
        cmd.envs(env.iter().copied()).arg("-f");
        if pidns {
            cmd.args(["unshare", "--pid", "--fork", "setsid"]);
        }
        cmd.arg(memtest_binary())
            .arg(mib.to_string())
            .arg(&hb)
            .arg(children.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
            .wait()
            .unwrap();
        wait_for("memtest to start", Duration::from_secs(60), || {
            read_trim(&hb).is_some_and(|s| !s.is_empty())
        });
        let needle = hb.to_string_lossy().into_owned();
        let pid = if pidns {
            // hb.pid says 1; the host PID is the tree's session leader.
            let live = live_with_cmdline(&needle);
            *live
                .iter()
                .find(|&&p| proc_stat(p).is_some_and(|s| s.sid == p))
                .expect("the memtest root in its PID namespace")
        } else {
            read_trim(&dir.path().join("hb.pid"))
                .unwrap()
                .parse()
                .unwrap()
        };
        let mut pids = session_members(pid);
        pids.sort_by_key(|&p| p != pid);
        assert_eq!(pids.len(), 1 + children as usize, "memtest tree: {pids:?}");
        Memtest {
            dir,
            pid,
            pids,
            children,
        }
    }

    pub fn hb(&self) -> PathBuf {
        self.dir.path().join("hb")
    }

    /// The heartbeat path as a string: it is on the command line of every process of
    /// the tree (and of restored copies).
    pub fn needle(&self) -> String {
        self.hb().to_string_lossy().into_owned()
    }

    pub fn heartbeat(&self) -> u64 {
        read_trim(&self.hb())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    pub fn assert_beating(&self) {
        let before = self.heartbeat();
        wait_for("the heartbeat to advance", Duration::from_secs(10), || {
            self.heartbeat() > before + 2
        });
    }

    /// Has the parent rewrite 2% of its buffer (SIGUSR2; see memtest's MEMTEST_MUTATE),
    /// as its `n`-th change, and waits until it has.
    pub fn mutate(&self, n: u32) {
        signal(self.pid, rustix::process::Signal::USR2);
        let log = self.dir.path().join("hb.log");
        let want = format!("mutated={n}");
        wait_for("the memory change", Duration::from_secs(30), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.lines().any(|x| x == want))
        });
    }

    /// Asks the tree to re-checksum all its memory and checks the answer.
    pub fn assert_memory_intact(&self, children: u32) {
        let verify = self.dir.path().join("hb.verify");
        let _ = std::fs::remove_file(&verify);
        signal(self.pid, rustix::process::Signal::USR1);
        wait_for("memory verification", Duration::from_secs(30), || {
            verify.exists()
        });
        let text = std::fs::read_to_string(&verify).unwrap();
        assert_eq!(
            text.lines().next(),
            Some("verify=ok"),
            "memory check failed: {text}"
        );
        assert!(
            text.contains(&format!("children_ok={children}/{children}")),
            "children check failed: {text}"
        );
    }

    /// Alive (every process of the tree, none stopped), beating, memory verified.
    pub fn assert_alive_and_intact(&self, what: &str) {
        for &p in &self.pids {
            let st = proc_stat(p);
            assert!(
                st.as_ref()
                    .is_some_and(|s| s.state != 'Z' && s.state != 'X'),
                "{what}: process {p} of the tree is gone ({st:?})"
            );
            assert_ne!(
                st.unwrap().state,
                'T',
                "{what}: process {p} of the tree was left stopped"
            );
        }
        self.assert_beating();
        self.assert_memory_intact(self.children);
    }

    pub fn wait_gone(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !session_members(self.pid).is_empty() {
            if Instant::now() > deadline {
                let left: Vec<_> = session_members(self.pid)
                    .into_iter()
                    .map(proc_stat)
                    .collect();
                panic!("timed out waiting for the checkpointed tree to exit: {left:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&self) -> bool {
        session_members(self.pid).iter().any(|&p| running(p))
    }

    /// SIGKILLs every process of the tree (and any restored copy of it).
    pub fn kill(&self) {
        let mut pids = session_members(self.pid);
        pids.extend(live_with_cmdline(&self.needle()));
        for pid in pids {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Drop for Memtest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `ckstream dump` arguments.
pub fn dump_args(
    pid: u32,
    archive: &Path,
    codec: &str,
    shards: u32,
    extra: &[&str],
) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        "dump".into(),
        "-q".into(),
        "--pid".into(),
        pid.to_string().into(),
        "-o".into(),
        archive.into(),
        "-c".into(),
        codec.into(),
        "--shards".into(),
        shards.to_string().into(),
    ];
    v.extend(extra.iter().map(|s| s.into()));
    v
}

/// Serialises the tests of one binary that must not overlap (CRIU freezing two large
/// trees at once on 2 cores makes timing-based fault injection unreliable).
pub fn heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
