//! `ckstream mount` through real FUSE mounts: the mounted tree equals the packed one for
//! every codec and shard count, a corrupted chunk reads as EIO without hurting other
//! files, every way of stopping leaves no mount behind, and a damaged archive is never
//! mounted.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Generous: a mount appears in milliseconds; this only stops a broken test from hanging.
const DEADLINE: Duration = Duration::from_secs(60);

/// True when FUSE mounts can run here; skips on a developer machine without root or
/// /dev/fuse, fails when CKSTREAM_REQUIRE_PRIVILEGED=1.
fn need_fuse(test: &str) -> bool {
    if !need_root(test) {
        return false;
    }
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    assert!(
        !privileged_required(),
        "{test} needs /dev/fuse, and CKSTREAM_REQUIRE_PRIVILEGED=1"
    );
    eprintln!("skipping {test}: no /dev/fuse");
    false
}

/// Decodes the octal escapes (`\040` for a space) of a /proc/self/mountinfo field.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let s = std::str::from_utf8(&b[i + 1..i + 4]).unwrap();
            out.push(u8::from_str_radix(s, 8).unwrap());
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// True when something is mounted at `mp` (its canonical path) in this mount namespace.
fn is_mounted(mp: &Path) -> bool {
    let want = mp.as_os_str().as_bytes();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|f| unescape(f) == want))
}

/// A `ckstream mount` running in the foreground, with its stderr captured.
struct Mounted {
    child: Option<Child>,
    mp: PathBuf,
}

impl Mounted {
    /// Starts `ckstream mount ARCHIVE MP EXTRA...` and waits until the mount is there.
    fn start(archive: &Path, mp: &Path, extra: &[&str]) -> Mounted {
        fs::create_dir_all(mp).unwrap();
        let mp = mp.canonicalize().unwrap();
        let child = Command::new(bin())
            .arg("mount")
            .args(extra)
            .arg(archive)
            .arg(&mp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut m = Mounted {
            child: Some(child),
            mp,
        };
        let start = Instant::now();
        while !is_mounted(&m.mp) {
            if m.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                let (status, out, err) = m.finish();
                panic!("ckstream mount exited with {status} before mounting: {err}{out}");
            }
            assert!(start.elapsed() < DEADLINE, "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Collects the output of the exited process.
    fn finish(&mut self) -> (ExitStatus, String, String) {
        let mut child = self.child.take().unwrap();
        let mut out = String::new();
        let mut err = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (child.wait().unwrap(), out, err)
    }

    /// Waits for the process to exit; returns its status, stdout and stderr.
    fn wait(mut self) -> (ExitStatus, String, String) {
        let start = Instant::now();
        loop {
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                return self.finish();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "ckstream mount did not exit after being told to"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `umount MP`, then waits for the process.
    fn umount(self) -> (ExitStatus, String, String) {
        let st = Command::new("umount").arg(&self.mp).status().unwrap();
        assert!(st.success(), "umount {} failed", self.mp.display());
        self.wait()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Only after a failed assertion: leave nothing mounted or running.
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("umount").arg("-l").arg(&self.mp).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn pack(src: &Path, archive: &Path, codec: &str, shards: u32, extra: &[&str]) {
    let shards = shards.to_string();
    let dot = format!(".={}", src.display());
    let mut args: Vec<&OsStr> = vec![
        "pack".as_ref(),
        "-q".as_ref(),
        "-c".as_ref(),
        codec.as_ref(),
        "--shards".as_ref(),
        shards.as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
    ];
    args.extend(extra.iter().map(|a| OsStr::new(*a)));
    args.push(dot.as_ref());
    ck_ok(&args);
}

/// The tree of make_tree plus a directory of small files (bundled into shared frames
/// in compressed archives) and an 8 MiB file.
fn make_source(root: &Path) {
    make_tree(root);
    let small = root.join("small");
    fs::create_dir(&small).unwrap();
    for i in 0..200u64 {
        let text: String = (0..(i * 37) % 3000).map(|k| format!("{i}:{k} ")).collect();
        fs::write(small.join(format!("f{i:03}.txt")), text).unwrap();
    }
    fs::write(root.join("big-8m"), prng_bytes(99, 8 << 20)).unwrap();
    set_mtime(&small, 1_650_000_000_123_456_789);
    set_mtime(root, 1_650_000_000_000_000_001);
}

/// The live counters of the mount at `mp` (its root's `user.ckstream.stats` xattr).
fn live_stats(mp: &Path) -> serde_json::Value {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::getxattr(mp, "user.ckstream.stats", &mut buf[..]).unwrap();
    serde_json::from_slice(&buf[..n]).unwrap()
}

fn parse_json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON {out:?}: {e}"))
}

fn mount_matches_source(codec: &str, shards: u32) {
    let test = format!("mount_{codec}_{shards}");
    if !need_fuse(&test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src);
    let archive = tmp.path().join("a.cka");
    pack(&src, &archive, codec, shards, &[]);
    let m = Mounted::start(&archive, &tmp.path().join("mnt"), &["--json"]);
    let mp = m.mp.clone();
    assert_same_tree(&src, &mp);
    // Hardlinks share an inode; holes take no space; the mount is read-only.
    let a = fs::metadata(mp.join("dir/hardlinked")).unwrap();
    let b = fs::metadata(mp.join("dir/nested/second-name")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert!(allocated(&mp.join("sparse")) < 1 << 20);
    let err = fs::OpenOptions::new()
        .write(true)
        .open(mp.join("dir/4096"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        fs::write(mp.join("new-file"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    // SEEK_DATA / SEEK_HOLE see the holes of the sparse file.
    {
        let f = fs::File::open(mp.join("sparse")).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), 1 << 20, libc::SEEK_DATA) };
        assert_eq!(data, 9 << 20);
        // SAFETY: lseek on an open descriptor.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), 9 << 20, libc::SEEK_HOLE) };
        // The 70 000 bytes written at 9 MiB, rounded up to the source's allocation.
        assert!(
            ((9 << 20) + 70_000..=10 << 20).contains(&hole),
            "hole at {hole}"
        );
    }
    let (status, out, err) = m.umount();
    assert!(status.success(), "mount exited with {status}: {err}");
    assert!(!is_mounted(&mp), "still mounted after umount");
    let stats = parse_json(&out);
    assert_eq!(stats["read_errors"], 0);
    // Reading 8 MiB sequentially (manifest hashes every file) queued read-ahead.
    assert!(stats["readahead_queued"].as_u64().unwrap() > 0, "{stats}");
    // Every byte fetched was stored in the archive, and nothing was fetched twice
    // (the cache holds the whole tree here).
    let archive_bytes: u64 = (0..shards)
        .map(|i| fs::metadata(shard_file(&archive, i)).unwrap().len())
        .sum();
    let fetched = stats["fetched_bytes"].as_u64().unwrap();
    assert!(
        fetched > 0 && fetched < archive_bytes,
        "{fetched} of {archive_bytes}"
    );
    assert_eq!(stats["cache_evictions"], 0, "{stats}");
}

cases!(mount_matches_source:
    mount_none_1_shard("none", 1),
    mount_none_3_shards("none", 3),
    mount_lz4_1_shard("lz4", 1),
    mount_lz4_3_shards("lz4", 3),
    mount_zstd_1_shard("zstd", 1),
    mount_zstd_3_shards("zstd", 3),
);

/// Flips one byte in the payload of chunk `pos` of `path`.
fn corrupt_chunk(archive: &Path, path: &str, pos: usize) {
    let reader = open_archive(archive);
    let i = reader.find(path.as_bytes()).unwrap();
    let c = reader.chunks_of(i)[pos].clone();
    let shard = shard_file(archive, c.shard);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&shard)
        .unwrap();
    let at = c.offset + u64::from(c.stored_len) / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
}

fn corrupt_chunk_reads_as_eio(codec: &str) {
    if !need_fuse(&format!("corrupt_chunk_{codec}")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src);
    let archive = tmp.path().join("a.cka");
    pack(&src, &archive, codec, 2, &[]);
    // The second MiB of the 3.5 MiB file.
    corrupt_chunk(&archive, "dir/nested/random-3.5m", 1);
    let m = Mounted::start(&archive, &tmp.path().join("mnt"), &["--json"]);
    let bad = m.mp.join("dir/nested/random-3.5m");
    let err = fs::read(&bad).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Again: still EIO (failures are not cached), never other bytes.
    let f = fs::File::open(&bad).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = f.read_exact_at(&mut buf, (1 << 20) + 10).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The intact chunks of the same file, and every other file, still read.
    f.read_exact_at(&mut buf, 4096).unwrap();
    let want = fs::read(src.join("dir/nested/random-3.5m")).unwrap();
    assert_eq!(buf, want[4096..8192]);
    f.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert_eq!(buf, want[3 << 20..(3 << 20) + 4096]);
    drop(f);
    for p in [
        "big-8m",
        "dir/mib-plus-3",
        "dir/nested/deeper/text.txt",
        "small/f007.txt",
    ] {
        assert_eq!(
            fs::read(m.mp.join(p)).unwrap(),
            fs::read(src.join(p)).unwrap(),
            "{p}"
        );
    }
    let mp = m.mp.clone();
    let (status, out, err) = m.umount();
    assert!(status.success(), "{err}");
    assert!(!is_mounted(&mp));
    assert!(
        err.contains("dir/nested/random-3.5m") && err.contains("offset 1048576"),
        "no clear error message: {err}"
    );
    assert!(
        err.contains("digest mismatch") || err.contains("does not decode"),
        "{err}"
    );
    let stats = parse_json(&out);
    assert!(stats["read_errors"].as_u64().unwrap() >= 2, "{stats}");
}

#[test]
fn corrupt_chunk_reads_as_eio_none() {
    corrupt_chunk_reads_as_eio("none");
}

#[test]
fn corrupt_chunk_reads_as_eio_zstd() {
    corrupt_chunk_reads_as_eio("zstd");
}

/// A small tree for the start/stop tests.
fn small_archive(tmp: &Path) -> PathBuf {
    let src = tmp.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/file"), prng_bytes(5, 3 << 20)).unwrap();
    let archive = tmp.join("a.cka");
    pack(&src, &archive, "zstd", 1, &[]);
    archive
}

fn signal_unmounts(sig: rustix::process::Signal, name: &str) {
    if !need_fuse(name) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let archive = small_archive(tmp.path());
    let m = Mounted::start(&archive, &tmp.path().join("mnt"), &[]);
    let mp = m.mp.clone();
    assert_eq!(fs::read(mp.join("d/file")).unwrap(), prng_bytes(5, 3 << 20));
    signal(m.pid(), sig);
    let (status, _, err) = m.wait();
    assert!(status.success(), "exit {status}: {err}");
    assert!(!is_mounted(&mp), "still mounted after {name}");
    assert!(err.contains("unmounted"), "{err}");
}

#[test]
fn sigterm_unmounts_and_exits_0() {
    signal_unmounts(rustix::process::Signal::TERM, "sigterm_unmounts");
}

#[test]
fn sigint_unmounts_and_exits_0() {
    signal_unmounts(rustix::process::Signal::INT, "sigint_unmounts");
}

#[test]
fn fusermount3_unmounts_and_exits_0() {
    if !need_fuse("fusermount3_unmounts") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let archive = small_archive(tmp.path());
    let m = Mounted::start(&archive, &tmp.path().join("mnt"), &[]);
    let mp = m.mp.clone();
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&mp)
        .status()
        .expect("fusermount3 (Debian package fuse3, installed by scripts/install-deps.sh)");
    assert!(st.success());
    let (status, _, err) = m.wait();
    assert!(status.success(), "exit {status}: {err}");
    assert!(!is_mounted(&mp));
}

#[test]
fn busy_mount_is_detached_on_sigterm() {
    if !need_fuse("busy_mount_is_detached") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let archive = small_archive(tmp.path());
    let m = Mounted::start(&archive, &tmp.path().join("mnt"), &[]);
    let mp = m.mp.clone();
    // An open file keeps the mount busy.
    let f = fs::File::open(mp.join("d/file")).unwrap();
    signal(m.pid(), rustix::process::Signal::TERM);
    let (status, _, err) = m.wait();
    assert!(status.success(), "exit {status}: {err}");
    assert!(!is_mounted(&mp), "busy mount left behind");
    assert!(err.contains("busy"), "{err}");
    drop(f);
}

#[test]
fn truncated_archive_is_not_mounted() {
    if !need_fuse("truncated_archive_is_not_mounted") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let archive = small_archive(tmp.path());
    let len = fs::metadata(&archive).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&archive).unwrap();
    f.set_len(len - 100).unwrap();
    drop(f);
    let mp = tmp.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let out = ck(&["mount".as_ref(), archive.as_os_str(), mp.as_os_str()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("incomplete"), "{}", stderr(&out));
    assert!(!is_mounted(&mp.canonicalize().unwrap()));
    // The same in the background: the parent reports the child's failure.
    let out = ck(&[
        "mount".as_ref(),
        "--background".as_ref(),
        archive.as_os_str(),
        mp.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(!is_mounted(&mp.canonicalize().unwrap()));
}

#[test]
fn bad_mount_point_fails() {
    if !need_fuse("bad_mount_point_fails") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let archive = small_archive(tmp.path());
    let out = ck(&[
        "mount".as_ref(),
        archive.as_os_str(),
        tmp.path().join("missing").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = ck(&["mount".as_ref(), archive.as_os_str(), archive.as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a directory"), "{}", stderr(&out));
}

#[test]
fn background_mount_serves_until_umount() {
    if !need_fuse("background_mount") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let archive = small_archive(tmp.path());
    let mp = tmp.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let mp = mp.canonicalize().unwrap();
    let out = ck_ok(&[
        "mount".as_ref(),
        "--background".as_ref(),
        archive.as_os_str(),
        mp.as_os_str(),
    ]);
    // Ready when the command returns: no waiting.
    assert!(is_mounted(&mp));
    let err = stderr(&out);
    let pid: i32 = err
        .split("(pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {err:?}"));
    assert_eq!(fs::read(mp.join("d/file")).unwrap(), prng_bytes(5, 3 << 20));
    let st = Command::new("umount").arg(&mp).status().unwrap();
    assert!(st.success());
    assert!(!is_mounted(&mp));
    // The detached server exits (it is not our child: watch /proc).
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(start.elapsed() < DEADLINE, "background mount kept running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hot_list_is_prefetched_and_small_cache_stays_correct() {
    if !need_fuse("hot_list_prefetch") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src);
    let archive = tmp.path().join("a.cka");
    pack(
        &src,
        &archive,
        "lz4",
        1,
        &["--hot", "dir/nested/random-3.5m", "--hot", "small"],
    );
    let reader = open_archive(&archive);
    assert_eq!(reader.index().hot_list.len(), 2);
    let info = ck_ok(&["info".as_ref(), "--json".as_ref(), archive.as_os_str()]);
    assert_eq!(
        parse_json(&String::from_utf8_lossy(&info.stdout))["hot_list"],
        serde_json::json!(["dir/nested/random-3.5m", "small"])
    );
    // A hot path that names nothing fails the pack, and nothing is written.
    let missing = tmp.path().join("missing.cka");
    let out = ck(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        missing.as_os_str(),
        "--hot".as_ref(),
        "no/such/path".as_ref(),
        format!(".={}", src.display()).as_ref(),
    ] as &[&OsStr]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no/such/path"), "{}", stderr(&out));
    assert!(!missing.exists());
    let hot_entry = reader.find(b"dir/nested/random-3.5m").unwrap();
    let hot_chunks = reader.chunks_of(hot_entry).len() as u64;
    let m = Mounted::start(&archive, &tmp.path().join("mnt"), &["--json"]);
    let mp = m.mp.clone();
    // Nobody reads: the mount fetches the hot files by itself.
    let start = Instant::now();
    let before = loop {
        let s = live_stats(&mp);
        let planned = s["hot_planned_chunks"].as_u64().unwrap();
        if planned == 0 {
            // The prefetcher plans in the background once the mount is up.
            assert!(start.elapsed() < DEADLINE, "hot list never planned: {s}");
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        // The 3.5 MiB file and 199 small files (f000 is empty), cut from a few shared frames.
        assert_eq!(planned, hot_chunks + 199, "{s}");
        if s["hot_prefetched_chunks"] == planned {
            break s;
        }
        assert!(start.elapsed() < DEADLINE, "hot list not prefetched: {s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        fs::read(mp.join("dir/nested/random-3.5m")).unwrap(),
        fs::read(src.join("dir/nested/random-3.5m")).unwrap()
    );
    for i in [0, 77, 199] {
        let p = format!("small/f{i:03}.txt");
        assert_eq!(
            fs::read(mp.join(&p)).unwrap(),
            fs::read(src.join(&p)).unwrap()
        );
    }
    // Reading them fetched nothing more: it all came from the prefetch.
    let after = live_stats(&mp);
    assert_eq!(after["fetches"], before["fetches"], "{before} then {after}");
    let (status, out, err) = m.umount();
    assert!(status.success(), "{err}");
    assert!(err.contains("prefetching the hot list: 201 files"), "{err}");
    assert_eq!(parse_json(&out)["fetches"], before["fetches"]);

    // A cache far smaller than the data: evictions, same bytes.
    let m = Mounted::start(
        &archive,
        &tmp.path().join("mnt2"),
        &["--json", "--no-prefetch", "--cache-size", "1M"],
    );
    for _ in 0..2 {
        assert_eq!(
            fs::read(m.mp.join("big-8m")).unwrap(),
            fs::read(src.join("big-8m")).unwrap()
        );
        // Drop this file's page cache so the second pass goes to the mount again.
        let f = fs::File::open(m.mp.join("big-8m")).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: fadvise on an open descriptor.
        let advised =
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(advised, 0);
    }
    let (status, out, err) = m.umount();
    assert!(status.success(), "{err}");
    let stats = parse_json(&out);
    assert!(stats["cache_evictions"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["cache_bytes"].as_u64().unwrap() <= 1 << 20, "{stats}");
    assert_eq!(stats["hot_prefetched_chunks"], 0, "{stats}");
}

/// An encrypted archive mounts with a recipient's key and reads back exactly (every
/// chunk opened as it is fetched); without the key the mount is refused and nothing is
/// mounted.
#[test]
fn encrypted_archive_mounts_with_the_key() {
    if !need_fuse("encrypted_archive_mounts_with_the_key") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src);
    let key = tmp.path().join("key");
    ck_ok(&[
        "key".as_ref(),
        "generate".as_ref(),
        "-o".as_ref(),
        key.as_os_str(),
    ] as &[&OsStr]);
    let public = format!("{}.pub", key.display());
    let archive = tmp.path().join("a.cka");
    pack(&src, &archive, "zstd", 2, &["--encrypt-to", &public]);
    let mp = tmp.path().join("mnt");
    fs::create_dir_all(&mp).unwrap();
    let o = ck(&["mount".as_ref(), archive.as_os_str(), mp.as_os_str()] as &[&OsStr]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("encrypted"), "{}", stderr(&o));
    assert!(!is_mounted(&mp));
    let m = Mounted::start(&archive, &mp, &["--key", key.to_str().unwrap()]);
    assert_same_tree(&src, &m.mp);
    let (status, _, err) = m.umount();
    assert!(status.success(), "mount exited with {status}: {err}");
}
