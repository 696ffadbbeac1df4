//! A real SeaweedFS S3 server on 127.0.0.1 for the object-storage tests, run through
//! `scripts/s3-server.sh` with a private directory and free ports. One shared server per
//! test binary ([`shared`]), stopped by the script's watchdog when the test process
//! exits; tests that kill their server start a private one ([`S3Server::start`]).
//! Without a server the tests skip, except under `CKSTREAM_REQUIRE_PRIVILEGED=1` (CI),
//! where they fail.

use std::ffi::OsStr;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A running server and the environment a client needs for it.
pub struct S3Server {
    pub dir: PathBuf,
    pub port: u16,
    pub bucket: String,
    pub env: Vec<(String, String)>,
    /// Stop (and remove `dir`) on drop; false for the shared server.
    owned: bool,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/s3-server.sh")
}

pub fn venv() -> PathBuf {
    std::env::var_os("CKSTREAM_S3_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ckstream/seaweedfs-venv"))
}

/// The lowest port the kernel hands out to outgoing connections: ports at or above it
/// can be taken by any client socket (ckstream's, aws's, podman's) between our check and
/// the server's bind, so the server's ports stay below it.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|w| w.parse().ok()))
        .unwrap_or(32768)
}

/// A base port whose S3, master, volume, filer and admin ports (and their gRPC ports at
/// +10000) are all free right now and outside the ephemeral range.
fn free_port_block() -> u16 {
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    let low = 10000u64;
    let high = (ephemeral_low() as u64)
        .saturating_sub(10005)
        .max(low + 1000);
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    for k in 0..500u64 {
        let base = (low + (seed + k * 101) % (high - low)) as u16;
        if (0..5).all(|o| free(base + o) && free(base + 10000 + o)) {
            return base;
        }
    }
    panic!("no free block of ports for the S3 server");
}

impl S3Server {
    /// Starts a private server (stopped and removed on drop). `None` when it cannot be
    /// started and the privileged tests are not required.
    pub fn start(test: &str) -> Option<S3Server> {
        Self::start_with(test, true)
    }

    fn start_with(test: &str, owned: bool) -> Option<S3Server> {
        let dir = std::env::temp_dir().join(format!(
            "ckstream-s3-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        // A port can still be taken between the check and weed's bind (weed then stops
        // with "address already in use"): try again on another block.
        let mut attempts = 0;
        let (port, out) = loop {
            attempts += 1;
            let port = free_port_block();
            let out = Command::new("bash")
                .arg(script())
                .arg("start")
                .env("CKSTREAM_S3_DIR", &dir)
                .env("CKSTREAM_S3_PORT", port.to_string())
                .env("CKSTREAM_S3_BUCKET", "ckstream-test")
                .env("CKSTREAM_S3_WATCH_PID", std::process::id().to_string())
                .env("CKSTREAM_S3_REMOVE_DIR", "1")
                .output()
                .expect("run scripts/s3-server.sh");
            let in_use = String::from_utf8_lossy(&out.stderr).contains("address already in use");
            if out.status.success() || !in_use || attempts == 3 {
                break (port, out);
            }
            eprintln!("{test}: S3 server port {port} was taken, trying another");
            let _ = Command::new("bash")
                .arg(script())
                .arg("stop")
                .env("CKSTREAM_S3_DIR", &dir)
                .output();
            let _ = std::fs::remove_dir_all(&dir);
        };
        if !out.status.success() {
            let msg = format!(
                "{test}: the S3 server did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!super::privileged_required(), "{msg}");
            eprintln!("skipping {msg}");
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(S3Server {
            dir,
            port,
            bucket: "ckstream-test".into(),
            env,
            owned,
        })
    }

    /// `s3://BUCKET/KEY`.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// A command with this server's environment (and no other AWS settings).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs ckstream against this server with request counting on.
    pub fn ck<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command(super::bin())
            .env("CKSTREAM_S3_STATS", "1")
            .args(args)
            .output()
            .expect("run ckstream")
    }

    /// Runs ckstream and asserts success.
    pub fn ck_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        let out = self.ck(args);
        assert!(
            out.status.success(),
            "ckstream {:?} failed: {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs the aws CLI (installed beside SeaweedFS) against this server.
    pub fn aws<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        let endpoint = format!("http://127.0.0.1:{}", self.port);
        self.command(venv().join("bin/aws"))
            .arg("--endpoint-url")
            .arg(endpoint)
            .args(args)
            .output()
            .expect("run aws")
    }

    /// Runs the aws CLI and returns its stdout, asserting success.
    pub fn aws_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.aws(args);
        assert!(
            out.status.success(),
            "aws failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Keys of the objects under `prefix`.
    pub fn objects(&self, prefix: &str) -> Vec<String> {
        let out = self.aws_ok(&[
            "s3api",
            "list-objects-v2",
            "--bucket",
            &self.bucket,
            "--prefix",
            prefix,
            "--query",
            "Contents[].Key",
            "--output",
            "text",
        ]);
        words(&out)
    }

    /// `(key, upload id)` of the unfinished multipart uploads under `prefix`.
    pub fn multipart_uploads(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.aws_ok(&[
            "s3api",
            "list-multipart-uploads",
            "--bucket",
            &self.bucket,
            "--prefix",
            prefix,
            "--query",
            "Uploads[].[Key,UploadId]",
            "--output",
            "text",
        ]);
        out.lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, id)| (k.trim().to_string(), id.trim().to_string()))
            .collect()
    }

    /// Parts uploaded so far to the multipart upload `id` of `key`.
    pub fn uploaded_parts(&self, key: &str, id: &str) -> usize {
        let out = self.aws_ok(&[
            "s3api",
            "list-parts",
            "--bucket",
            &self.bucket,
            "--key",
            key,
            "--upload-id",
            id,
            "--query",
            "length(Parts || `[]`)",
            "--output",
            "text",
        ]);
        out.trim().parse().unwrap_or(0)
    }

    /// Kills the server process (SIGKILL), as a crash would.
    pub fn kill(&self) {
        let pid: i32 = std::fs::read_to_string(self.dir.join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let pid = rustix::process::Pid::from_raw(pid).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        while rustix::process::test_kill_process(pid).is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Starts the server again on the same directory and port (the data written before
    /// it was killed is still there).
    pub fn restart(&self) {
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .env("CKSTREAM_S3_DIR", &self.dir)
            .env("CKSTREAM_S3_PORT", self.port.to_string())
            .env("CKSTREAM_S3_BUCKET", &self.bucket)
            .env("CKSTREAM_S3_WATCH_PID", std::process::id().to_string())
            .env("CKSTREAM_S3_REMOVE_DIR", if self.owned { "1" } else { "0" })
            .output()
            .expect("run scripts/s3-server.sh");
        assert!(
            out.status.success(),
            "restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new("bash")
                .arg(script())
                .arg("stop")
                .env("CKSTREAM_S3_DIR", &self.dir)
                .output();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace()
        .filter(|w| *w != "None")
        .map(str::to_string)
        .collect()
}

/// The server shared by every test of this binary.
pub fn shared(test: &str) -> Option<&'static S3Server> {
    static SERVER: OnceLock<Option<S3Server>> = OnceLock::new();
    SERVER
        .get_or_init(|| S3Server::start_with(test, false))
        .as_ref()
        .or_else(|| {
            assert!(
                !super::privileged_required(),
                "{test}: no S3 server (see above)"
            );
            None
        })
}

/// The `ckstream-s3-stats:` line a command printed on stderr, as JSON.
pub fn s3_stats(out: &Output) -> serde_json::Value {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("ckstream-s3-stats: "))
        .unwrap_or_else(|| panic!("no S3 stats in: {err}"));
    serde_json::from_str(line).unwrap()
}
