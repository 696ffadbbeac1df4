//! Running `criu dump --stream` / `criu restore --stream`, and the post-dump hook that
//! lets CRIU kill the checkpointed process only after the archive data is durable.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::error::{CriuError, Result};

/// Environment variable naming the control socket the hook connects to.
pub const HOOK_SOCKET_ENV: &str = "CKSTREAM_HOOK_SOCKET";
/// Name of the control socket inside the work directory.
pub const HOOK_SOCKET: &str = "ckstream-hook.sock";

/// The criu binary: `$CKSTREAM_CRIU`, else `/usr/local/sbin/criu` (where
/// `scripts/install-criu.sh` puts CRIU 4.x), else `criu` on PATH.
pub fn criu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CKSTREAM_CRIU") {
        return PathBuf::from(p);
    }
    let local = Path::new("/usr/local/sbin/criu");
    if local.exists() {
        return local.to_path_buf();
    }
    PathBuf::from("criu")
}

/// `criu --version` output, first line.
pub fn criu_version() -> Option<String> {
    let out = Command::new(criu_binary()).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

/// How to run `criu dump`.
pub struct DumpCommand<'a> {
    /// Root of the process tree.
    pub pid: u32,
    /// CRIU's work directory: its log, and the streamer socket.
    pub work_dir: &'a Path,
    /// `None`: stream the images (`--stream`) to the capture socket in `work_dir`;
    /// `Some(dir)`: let CRIU write them into `dir` itself.
    pub images_dir: Option<&'a Path>,
    /// Resume the tree after the dump (`--leave-running`).
    pub leave_running: bool,
    /// Shell command CRIU runs as its action script (the post-dump hook).
    pub hook: Option<String>,
    /// Extra arguments given to `criu dump`.
    pub extra_args: &'a [String],
}

/// Starts `criu dump` (`--stream`, or into an images directory); its log goes to
/// `work_dir/dump.log`.
///
/// # Errors
/// When criu cannot be started.
pub fn spawn_dump(cmd: &DumpCommand) -> Result<Child> {
    let mut c = Command::new(criu_binary());
    c.arg("dump").arg("-t").arg(cmd.pid.to_string());
    match cmd.images_dir {
        None => c.arg("--stream").arg("-D").arg(cmd.work_dir),
        Some(dir) => c.arg("-D").arg(dir).arg("-W").arg(cmd.work_dir),
    };
    c.arg("-o").arg("dump.log").arg("-v4");
    if cmd.leave_running {
        c.arg("--leave-running");
    }
    if let Some(h) = &cmd.hook {
        c.arg("--action-script").arg(h);
        c.env(HOOK_SOCKET_ENV, cmd.work_dir.join(HOOK_SOCKET));
    }
    c.args(cmd.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file(cmd.work_dir, "dump")?);
    c.spawn()
        .map_err(|e| CriuError::io(format!("starting {}", criu_binary().display()), e))
}

/// Starts `criu restore --stream -d`; its log goes to `work_dir/restore.log`.
///
/// # Errors
/// When criu cannot be started.
pub fn spawn_restore(work_dir: &Path, extra_args: &[String]) -> Result<Child> {
    let mut c = Command::new(criu_binary());
    c.arg("restore")
        .arg("--stream")
        .arg("-D")
        .arg(work_dir)
        .arg("-o")
        .arg("restore.log")
        .arg("-v4")
        .arg("-d")
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file(work_dir, "restore")?);
    c.spawn()
        .map_err(|e| CriuError::io(format!("starting {}", criu_binary().display()), e))
}

/// CRIU prints early errors (before its log is open) on stderr: keep them next to the log.
pub(crate) fn stderr_file(work_dir: &Path, what: &str) -> Result<Stdio> {
    let p = work_dir.join(format!("criu-{what}.stderr"));
    let f = ckstream_store::create_private_file(&p)
        .map_err(|e| CriuError::io(format!("creating {}", p.display()), e))?;
    Ok(Stdio::from(f))
}

/// The last `n` error lines of a CRIU log (or its last lines when none is marked Error).
pub fn log_summary(log: &Path, n: usize) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .collect();
    let lines: Vec<&str> = if errors.is_empty() {
        text.lines().collect()
    } else {
        errors
    };
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Describes a CRIU failure with its exit status and the tail of its log.
pub fn criu_failure(what: &str, status: ExitStatus, log: &Path) -> CriuError {
    let mut summary = log_summary(log, 3);
    if summary.is_empty() {
        if let Some(dir) = log.parent() {
            summary = log_summary(&dir.join(format!("criu-{what}.stderr")), 3);
        }
    }
    CriuError::Criu(format!(
        "criu {what} failed ({status}); log {}{}",
        log.display(),
        if summary.is_empty() {
            String::new()
        } else {
            format!(": {summary}")
        }
    ))
}

/// Waits for `child` up to `timeout`, then kills it.
///
/// # Errors
/// The I/O error of waiting for or killing the child.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Body of the action script CRIU runs (`ckstream __criu-hook`): on `post-dump`, asks
/// the capturing ckstream whether the archive data is durable and fails (so CRIU resumes
/// the process instead of killing it) unless it is. Returns the exit code.
pub fn hook_client() -> i32 {
    if std::env::var("CRTOOLS_SCRIPT_ACTION").as_deref() != Ok("post-dump") {
        return 0;
    }
    let Some(path) = std::env::var_os(HOOK_SOCKET_ENV) else {
        eprintln!("ckstream hook: {HOOK_SOCKET_ENV} is not set");
        return 1;
    };
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ckstream hook: cannot reach the capture: {e}");
            return 1;
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3600)));
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(_) if line.trim() == "ok" => 0,
        _ => {
            eprintln!("ckstream hook: archive not durable; CRIU will resume the process");
            1
        }
    }
}
