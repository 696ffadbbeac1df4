//! Faults against real components: every test breaks something real (a failing or
//! killed step of the publish path, a power cut, a full disk, a disk returning EIO, the
//! S3 server, CRIU or ckstream itself killed) and checks the promise that matters: the
//! process is alive or restored intact (its memory verified), and nothing that reads as
//! a good archive is left under the name except the old archive, byte for byte as it
//! was, or the complete new one.
//!
//! Faults inside ckstream are injected with `CKSTREAM_FAILPOINT` (see
//! crates/ckstream-store/src/failpoint.rs). Root, CRIU, loop devices, FUSE and the local
//! S3 server are needed; under `CKSTREAM_REQUIRE_PRIVILEGED=1` their absence fails.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::memtest::*;
use crate::support::s3server::S3Server;
use crate::support::*;

// ---------------------------------------------------------------------------------
// Helpers

/// The regular files of `dir` (not below it), name → content.
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn names(files: &BTreeMap<String, Vec<u8>>) -> Vec<&str> {
    files.keys().map(String::as_str).collect()
}

/// `ckstream` with extra environment.
fn ck_env<S: AsRef<OsStr>>(env: &[(&str, &str)], args: &[S]) -> Output {
    Command::new(bin())
        .envs(env.iter().copied())
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("run ckstream")
}

/// True when `ckstream verify ARCHIVE` accepts it.
fn verifies(archive: impl AsRef<OsStr>) -> bool {
    ck(&["verify".as_ref(), archive.as_ref()]).status.success()
}

/// The archive id `ckstream info --json` reports (the archive must open).
fn archive_id(archive: impl AsRef<OsStr>) -> String {
    let out = ck_ok(&["info".as_ref(), "--json".as_ref(), archive.as_ref()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["archive_id"].as_str().unwrap().to_string()
}

/// The archive id in the header of any shard file (hex of bytes 32..48).
fn header_id(shard: &Path) -> String {
    let b = std::fs::read(shard).unwrap();
    b[32..48].iter().map(|x| format!("{x:02x}")).collect()
}

fn killed_by_sigkill(out: &Output) -> bool {
    out.status.signal() == Some(9)
}

/// Asserts that no file of `dir` but `keep` reads as a good archive. A process killed
/// (SIGKILL: no cleanup) after writing its footers but before its rename leaves its
/// hidden temporary shard 0 (`.NAME.RANDOM.partial`), which is complete for a one-shard
/// archive but never synced nor renamed: such files are allowed after a crash (and
/// reported), nothing else is.
fn assert_no_other_good_archive(dir: &Path, keep: &[&str], what: &str) {
    for name in files_of(dir).keys() {
        if keep.contains(&name.as_str()) || !verifies(dir.join(name)) {
            continue;
        }
        let crashed = what.contains(":kill") || what.contains("killed");
        assert!(
            crashed && name.starts_with('.') && name.ends_with(".partial"),
            "{what}: {name} is left and reads as a good archive"
        );
        eprintln!("{what}: the crash left {name}, a complete but never published temporary file");
    }
}

/// A tree of `files` random files of `size` bytes each (distinct per `seed`).
fn random_tree(dir: &Path, seed: u64, files: u64, size: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..files {
        std::fs::write(
            dir.join(format!("s{seed}-f{i}")),
            prng_bytes(seed * 1000 + i, size),
        )
        .unwrap();
    }
}

fn pack_args(archive: &Path, src: &Path, shards: u32, codec: &str) -> Vec<std::ffi::OsString> {
    vec![
        "pack".into(),
        "-q".into(),
        "-c".into(),
        codec.into(),
        "--shards".into(),
        shards.to_string().into(),
        "-o".into(),
        archive.into(),
        format!(".={}", src.display()).into(),
    ]
}

/// A mounted filesystem, unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if !Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn mount(args: &[&OsStr], at: &Path) -> Mounted {
    std::fs::create_dir_all(at).unwrap();
    let out = Command::new("mount").args(args).arg(at).output().unwrap();
    assert!(
        out.status.success(),
        "mount {args:?} {}: {}",
        at.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Mounted(at.to_path_buf())
}

fn tmpfs(at: &Path, size: &str) -> Mounted {
    let opts = format!("size={size},mode=0755");
    mount(
        &[
            "-t".as_ref(),
            "tmpfs".as_ref(),
            "-o".as_ref(),
            opts.as_ref(),
            "tmpfs".as_ref(),
        ],
        at,
    )
}

/// Waits for a child, killing it after `timeout`.
pub(crate) fn wait_output(child: Child, timeout: Duration) -> Output {
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if done.load(Ordering::SeqCst) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !done.load(Ordering::SeqCst) {
                signal(pid, rustix::process::Signal::KILL);
                return true;
            }
            false
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    assert!(
        !watchdog.join().unwrap(),
        "ckstream (pid {pid}) hung for {timeout:?} and was killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------------
// 1. Overwriting a local archive: every step of the publish path failing or crashing.

const BEFORE_RENAME: [&str; 2] = ["sink.sync", "publish.rename"];
const AFTER_RENAME: [&str; 2] = ["publish.dir-sync", "publish.remove-old"];

fn local_overwrite_case(point: &str, action: &str, old_shards: u32, new_shards: u32) {
    let what = format!("{point}:{action}, {old_shards} shards replaced by {new_shards}");
    let tmp = tempfile::tempdir().unwrap();
    let (old_src, new_src) = (tmp.path().join("old-src"), tmp.path().join("new-src"));
    random_tree(&old_src, 1, 5, 700_000);
    random_tree(&new_src, 2, 4, 900_000);
    let dir = tmp.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let name = dir.join("ckpt.cka");
    ck_ok(&pack_args(&name, &old_src, old_shards, "none"));
    let old_files = files_of(&dir);
    assert_eq!(old_files.len(), old_shards as usize);
    let old_id = archive_id(&name);

    let failpoint = format!("{point}:{action}");
    let out = ck_env(
        &[("CKSTREAM_FAILPOINT", &failpoint)],
        &pack_args(&name, &new_src, new_shards, "none"),
    );
    let err = stderr(&out);
    let now = files_of(&dir);
    if action == "kill" {
        assert!(killed_by_sigkill(&out), "{what}: {:?} {err}", out.status);
    }
    if BEFORE_RENAME.contains(&point) {
        // The old archive is untouched, byte for byte, and still the one under the name.
        for (n, bytes) in &old_files {
            assert!(
                now.get(n) == Some(bytes),
                "{what}: old shard {n} changed or vanished"
            );
        }
        assert!(
            verifies(&name),
            "{what}: the old archive no longer verifies"
        );
        assert_eq!(archive_id(&name), old_id, "{what}");
        if action == "error" {
            assert_eq!(out.status.code(), Some(1), "{what}: {err}");
            assert!(
                err.contains(&format!("failpoint {point} fired"))
                    && err.contains("no archive was written"),
                "{what}: {err}"
            );
            assert_eq!(names(&now), names(&old_files), "{what}: new files left");
        }
        // A crash may leave the new shards (never synced) behind, but none of them can
        // pass for an archive.
        let keep: Vec<&str> = names(&old_files);
        assert_no_other_good_archive(&dir, &keep, &what);
    } else {
        // The rename happened: the new archive is under the name, whole.
        assert!(verifies(&name), "{what}: the new archive does not verify");
        let new_id = archive_id(&name);
        assert_ne!(new_id, old_id, "{what}: the old archive is still there");
        let listing =
            String::from_utf8_lossy(&ck_ok(&["ls".as_ref(), name.as_os_str()]).stdout).into_owned();
        assert!(listing.contains("s2-f0"), "{what}: {listing}");
        assert!(
            !now.keys().any(|n| n.ends_with(".partial")),
            "{what}: temporary file left: {:?}",
            names(&now)
        );
        let new_shards_names: Vec<String> = local_shard_paths(&name)
            .into_iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        // Besides the new shards, at most the old archive's shards 1.. (unreferenced).
        for n in now.keys() {
            assert!(
                new_shards_names.contains(n) || (old_files.contains_key(n) && n != "ckpt.cka"),
                "{what}: unexpected file {n} left: {:?}",
                names(&now)
            );
        }
        let stale: Vec<&String> = now
            .keys()
            .filter(|n| !new_shards_names.contains(n))
            .collect();
        match (point, action) {
            // The directory sync failed: the rename may not survive a crash, so the old
            // archive's shards are kept (a crash could bring the old shard 0 back), and
            // the command fails, saying the new archive is in place.
            ("publish.dir-sync", "error") => {
                assert_eq!(out.status.code(), Some(1), "{what}: {err}");
                assert!(
                    err.contains("could not be synced")
                        && err.contains("the new archive may be in place")
                        && !err.contains("no archive was written"),
                    "{what}: {err}"
                );
                assert_eq!(stale.len(), old_shards as usize - 1, "{what}: {stale:?}");
            }
            // Removing an old shard failed: the new archive is stored for good, which
            // is what the command promised; the leftovers are named in a warning.
            ("publish.remove-old", "error") => {
                assert!(out.status.success(), "{what}: {err}");
                assert_eq!(stale.len(), old_shards as usize - 1, "{what}: {stale:?}");
                for s in &stale {
                    assert!(
                        err.contains(s.as_str()) && err.contains("warning"),
                        "{what}: {s} left without a warning: {err}"
                    );
                }
            }
            _ => {}
        }
        let keep: Vec<&str> = vec!["ckpt.cka"];
        assert_no_other_good_archive(&dir, &keep, &what);
    }
}

fn local_shard_paths(name: &Path) -> Vec<PathBuf> {
    let n = open_archive(name).shard_count();
    (0..n).map(|i| shard_file(name, i)).collect()
}

/// Every failpoint in `points`, failing and crashing, for more and for fewer shards.
fn local_overwrite_cases(points: &[&str]) {
    for (old, new) in [(3, 2), (2, 3)] {
        for point in points {
            for action in ["error", "kill"] {
                local_overwrite_case(point, action, old, new);
            }
        }
    }
}

#[test]
fn local_overwrite_failing_or_crashing_before_the_rename_keeps_the_old_archive_byte_for_byte() {
    local_overwrite_cases(&BEFORE_RENAME);
}

#[test]
fn local_overwrite_failing_or_crashing_after_the_rename_leaves_the_new_archive_whole() {
    local_overwrite_cases(&AFTER_RENAME);
}

/// The reproduction: the old archive's shard 0 cannot be replaced (immutable).
#[test]
fn immutable_old_archive_fails_the_pack_and_stays_whole() {
    if !need_root("immutable_old_archive") {
        return;
    }
    if !have("chattr") {
        assert!(!privileged_required(), "chattr missing (e2fsprogs)");
        eprintln!("skipping immutable_old_archive: no chattr");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (old_src, new_src) = (tmp.path().join("old-src"), tmp.path().join("new-src"));
    random_tree(&old_src, 1, 5, 700_000);
    random_tree(&new_src, 2, 4, 900_000);
    let dir = tmp.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let name = dir.join("ckpt.cka");
    ck_ok(&pack_args(&name, &old_src, 3, "none"));
    let old_files = files_of(&dir);
    struct Mutable(PathBuf);
    impl Drop for Mutable {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let st = Command::new("chattr")
        .arg("+i")
        .arg(&name)
        .status()
        .unwrap();
    assert!(st.success(), "chattr +i");
    let _guard = Mutable(name.clone());
    let out = ck(&pack_args(&name, &new_src, 2, "none"));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Operation not permitted") && err.contains("no archive was written"),
        "{err}"
    );
    assert!(verifies(&name), "the old archive no longer verifies");
    assert_eq!(files_of(&dir), old_files, "files changed or left behind");
}

// ---------------------------------------------------------------------------------
// 2. Overwriting an archive in S3.

/// Objects under `prefix`: key → (ETag, size).
fn s3_objects(s3: &S3Server, prefix: &str) -> BTreeMap<String, String> {
    let out = s3.aws_ok(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        &s3.bucket,
        "--prefix",
        prefix,
        "--query",
        "Contents[].[Key,ETag,Size]",
        "--output",
        "text",
    ]);
    out.lines()
        .filter(|l| !l.trim().is_empty() && l.trim() != "None")
        .map(|l| {
            let mut f = l.split('\t');
            let key = f.next().unwrap().trim().to_string();
            (key, f.map(str::trim).collect::<Vec<_>>().join(" "))
        })
        .collect()
}

fn s3_pack(s3: &S3Server, url: &str, src: &Path, shards: u32, env: &[(&str, &str)]) -> Output {
    s3.command(bin())
        .envs(env.iter().copied())
        .args([
            "pack",
            "-c",
            "none",
            "--json",
            "--shards",
            &shards.to_string(),
            "-o",
            url,
        ])
        .arg(format!(".={}", src.display()))
        .output()
        .unwrap()
}

#[test]
fn s3_overwrite_keeps_the_old_archive_until_shard_0_completes() {
    let Some(s3) = crate::support::s3server::shared("s3_overwrite") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (old_src, new_src) = (tmp.path().join("old-src"), tmp.path().join("new-src"));
    random_tree(&old_src, 1, 5, 700_000);
    random_tree(&new_src, 2, 4, 900_000);
    for (case, failpoint, new_shards) in [
        ("complete-0-error", "s3.complete-0:error", 2u32),
        ("complete-error", "s3.complete:error", 2),
        ("complete-0-kill", "s3.complete-0:kill", 2),
        ("answer-lost", "s3.complete-0-answer:error", 2),
        ("to-one-shard", "", 1),
    ] {
        let prefix = format!("overwrite/{case}/");
        let url = s3.url(&format!("{prefix}ckpt.cka"));
        let out = s3_pack(s3, &url, &old_src, 3, &[]);
        assert!(out.status.success(), "{case}: {}", stderr(&out));
        let old_objects = s3_objects(s3, &prefix);
        assert_eq!(old_objects.len(), 3, "{case}: {old_objects:?}");
        let old_id = s3_id(s3, &url);

        let env: Vec<(&str, &str)> = if failpoint.is_empty() {
            vec![]
        } else {
            vec![("CKSTREAM_FAILPOINT", failpoint)]
        };
        let out = s3_pack(s3, &url, &new_src, new_shards, &env);
        let err = stderr(&out);
        let objects = s3_objects(s3, &prefix);
        let verify = s3.ck(&["verify", &url]);
        assert!(verify.status.success(), "{case}: {}", stderr(&verify));
        if case == "answer-lost" || case == "to-one-shard" {
            // The new archive is under the key, and only its objects are left.
            assert!(out.status.success(), "{case}: {err}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let new_id = v["archive_id"].as_str().unwrap();
            assert_eq!(s3_id(s3, &url), new_id, "{case}");
            assert_eq!(objects.len(), new_shards as usize, "{case}: {objects:?}");
            assert!(
                old_objects
                    .keys()
                    .filter(|k| !k.ends_with("ckpt.cka"))
                    .all(|k| !objects.contains_key(k)),
                "{case}: old shards left: {objects:?}"
            );
        } else {
            // The old archive is untouched: same objects, same ETags, same id.
            if case == "complete-0-kill" {
                assert!(killed_by_sigkill(&out), "{case}: {err}");
            } else {
                assert_eq!(out.status.code(), Some(1), "{case}: {err}");
                assert!(err.contains("no archive was written"), "{case}: {err}");
            }
            assert_eq!(s3_id(s3, &url), old_id, "{case}");
            for (k, tag) in &old_objects {
                assert_eq!(objects.get(k), Some(tag), "{case}: old object {k} changed");
            }
            if case != "complete-0-kill" {
                assert_eq!(objects, old_objects, "{case}: new objects left");
            }
        }
        if case != "complete-0-kill" {
            let uploads = s3.multipart_uploads(&prefix);
            assert!(
                uploads.is_empty(),
                "{case}: multipart uploads left: {uploads:?}"
            );
        } else {
            // Crashed: its uploads stay until a lifecycle rule removes them. Clean up.
            for (key, id) in s3.multipart_uploads(&prefix) {
                s3.aws_ok(&[
                    "s3api",
                    "abort-multipart-upload",
                    "--bucket",
                    &s3.bucket,
                    "--key",
                    &key,
                    "--upload-id",
                    &id,
                ]);
            }
        }
    }
}

fn s3_id(s3: &S3Server, url: &str) -> String {
    let out = s3.ck_ok(&["info", "--json", url]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["archive_id"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------
// 3. Power cuts during the commit, on ext4 and XFS.
//
// The filesystem under test lives in an image file on a loop device. The image file
// itself lies on an XFS with reflink (a loop mount too), so `cp --reflink=always` of
// the image is an atomic snapshot of exactly what the loop device has been given:
// blocks the filesystem submitted, none of its page cache. Mounting that snapshot
// replays the journal, as booting after a power cut would. (It does not model a disk
// whose volatile cache loses writes that were never flushed.)

struct PowerCutRig {
    /// Unmounted before `outer` (fields drop in order).
    _mounted: Mounted,
    /// Holds the images; reflink-capable.
    outer: LoopFs,
    kind: &'static str,
    image: PathBuf,
    /// Where the filesystem under test is mounted.
    mnt: PathBuf,
    snapshots: u32,
}

impl PowerCutRig {
    fn new(kind: &'static str) -> Option<PowerCutRig> {
        let outer = LoopFs::new("xfs")?;
        let mkfs = format!("mkfs.{kind}");
        if !have(&mkfs) {
            assert!(
                !privileged_required(),
                "{mkfs} missing; scripts/install-deps.sh installs it"
            );
            eprintln!("skipping the power cut test: {mkfs} missing");
            return None;
        }
        let image = outer.mount.join(format!("{kind}.img"));
        let size: u64 = if kind == "xfs" { 320 << 20 } else { 256 << 20 };
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let out = Command::new(format!("mkfs.{kind}"))
            .arg(if kind == "xfs" { "-qf" } else { "-qF" })
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success(), "mkfs.{kind}: {}", stderr(&out));
        let mnt = outer.mount.join("fs");
        let mounted = mount(&["-o".as_ref(), "loop".as_ref(), image.as_os_str()], &mnt);
        Some(PowerCutRig {
            outer,
            kind,
            image,
            _mounted: mounted,
            mnt,
            snapshots: 0,
        })
    }

    /// The state a power cut would leave now: an atomic copy of the image.
    fn power_cut(&mut self) -> PathBuf {
        self.snapshots += 1;
        let copy = self.outer.mount.join(format!("cut-{}.img", self.snapshots));
        let out = Command::new("cp")
            .arg("--reflink=always")
            .arg(&self.image)
            .arg(&copy)
            .output()
            .unwrap();
        assert!(out.status.success(), "snapshot: {}", stderr(&out));
        copy
    }

    /// Mounts a power-cut state (replaying the journal, as after a reboot).
    fn mount_cut(&self, copy: &Path) -> (Mounted, PathBuf) {
        let at = copy.with_extension("mnt");
        let opts = if self.kind == "xfs" {
            "loop,nouuid"
        } else {
            "loop"
        };
        let m = mount(&["-o".as_ref(), opts.as_ref(), copy.as_os_str()], &at);
        (m, at)
    }

    /// Checks the archive `name` in a power-cut state: it must verify and be the old or
    /// the new one. Returns which.
    fn check_cut(
        &self,
        copy: &Path,
        name: &str,
        old_id: &str,
        new_id: &str,
        what: &str,
    ) -> &'static str {
        let (m, at) = self.mount_cut(copy);
        let archive = at.join(name);
        let out = ck(&["verify".as_ref(), archive.as_os_str()]);
        assert!(
            out.status.success(),
            "{what}: after a power cut {name} does not verify: {}; files: {:?}",
            stderr(&out),
            names(&files_of(&at))
        );
        let id = archive_id(&archive);
        let which = if id == old_id {
            "old"
        } else if id == new_id {
            "new"
        } else {
            panic!("{what}: after a power cut {name} is archive {id}, neither the old {old_id} nor the new {new_id}")
        };
        drop(m);
        let _ = std::fs::remove_file(copy);
        which
    }

    /// Empties the filesystem under test and packs `src` as the (durable) old archive.
    fn reset(&self, name: &str, src: &Path) -> String {
        for e in std::fs::read_dir(&self.mnt).unwrap().flatten() {
            if e.file_type().unwrap().is_file() {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        let archive = self.mnt.join(name);
        ck_ok(&pack_args(&archive, src, 3, "none"));
        assert!(Command::new("sync").status().unwrap().success());
        archive_id(&archive)
    }
}

pub(crate) fn wait_stopped(pid: u32, what: &str) {
    wait_for(what, Duration::from_secs(60), || {
        proc_stat(pid).is_some_and(|s| s.state == 'T')
    });
}

fn power_cut_during_commit(kind: &'static str) {
    if !need_root("power_cut") {
        return;
    }
    let Some(mut rig) = PowerCutRig::new(kind) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (old_src, new_src) = (tmp.path().join("old-src"), tmp.path().join("new-src"));
    random_tree(&old_src, 1, 5, 700_000);
    random_tree(&new_src, 2, 6, 900_000);
    let name = "ckpt.cka";
    let archive = rig.mnt.join(name);
    for point in [
        "sink.sync",
        "publish.rename",
        "publish.dir-sync",
        "publish.remove-old",
    ] {
        let what = format!("{kind}, stopped at {point}");
        let old_id = rig.reset(name, &old_src);
        let child = Command::new(bin())
            .env("CKSTREAM_FAILPOINT", format!("{point}:stop"))
            .args(pack_args(&archive, &new_src, 2, "none"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_stopped(child.id(), &what);
        // The new archive's id: in its temporary shard 0, or under the name once renamed.
        let partial: Vec<PathBuf> = std::fs::read_dir(&rig.mnt)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".partial"))
            .collect();
        let new_id = match partial.as_slice() {
            [p] => header_id(p),
            [] => header_id(&archive),
            more => panic!("{what}: several temporary files: {more:?}"),
        };
        assert_ne!(new_id, old_id);
        // Writeback the process started before it stopped may still be landing.
        std::thread::sleep(Duration::from_millis(200));
        let cut = rig.power_cut();
        signal(child.id(), rustix::process::Signal::KILL);
        let _ = child.wait_with_output();
        let which = rig.check_cut(&cut, name, &old_id, &new_id, &what);
        let expected = match point {
            "sink.sync" | "publish.rename" => Some("old"),
            "publish.remove-old" => Some("new"),
            _ => None, // renamed, directory not synced yet: either
        };
        if let Some(e) = expected {
            assert_eq!(
                which, e,
                "{what}: the {which} archive survived the power cut"
            );
        }
        eprintln!("{what}: the {which} archive survived");
    }
    // Power cuts at random moments of a larger pack without failpoints.
    let big_src = tmp.path().join("big-src");
    random_tree(&big_src, 3, 24, 4 << 20);
    let old_id = rig.reset(name, &old_src);
    // zstd on random data: slower, so the cuts fall at several points of the write.
    let child = Command::new(bin())
        .args(pack_args(&archive, &big_src, 2, "zstd:3"))
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cuts = Vec::new();
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    let pid = child.id();
    while running(pid) && cuts.len() < 8 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 80));
        cuts.push(rig.power_cut());
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_id = v["archive_id"].as_str().unwrap().to_string();
    let mut seen = Vec::new();
    for (i, cut) in cuts.iter().enumerate() {
        let what = format!("{kind}, power cut {i} during a pack");
        seen.push(rig.check_cut(cut, name, &old_id, &new_id, &what));
    }
    eprintln!("{kind}: random power cuts found {seen:?}");
    assert!(verifies(&archive));
    assert_eq!(archive_id(&archive), new_id);
}

#[test]
fn power_cut_during_the_commit_leaves_the_old_or_the_new_archive_on_ext4() {
    power_cut_during_commit("ext4");
}

#[test]
fn power_cut_during_the_commit_leaves_the_old_or_the_new_archive_on_xfs() {
    power_cut_during_commit("xfs");
}

// ---------------------------------------------------------------------------------
// 4. A full disk.

#[test]
fn full_disk_fails_the_dump_clearly_and_the_process_and_the_old_archive_survive() {
    if !criu_available("full_disk_dump") {
        return;
    }
    let _heavy = heavy_lock();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    random_tree(&src, 1, 2, 1 << 20);
    let fs = tmp.path().join("fs");
    let _m = tmpfs(&fs, "48m");
    let name = fs.join("ckpt.cka");
    ck_ok(&pack_args(&name, &src, 2, "none"));
    let old_files = files_of(&fs);
    // More memory than the filesystem holds, stored uncompressed.
    let m = Memtest::start(96, 1);
    let work = tmp.path().join("work");
    let work = work.to_str().unwrap();
    let out = ck(&dump_args(m.pid, &name, "none", 1, &["--work-dir", work]));
    let err = stderr(&out);
    eprintln!("dump into a full filesystem: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("no archive was written"),
        "{err}"
    );
    m.assert_alive_and_intact("after a dump into a full filesystem");
    assert_eq!(files_of(&fs), old_files, "files changed or left behind");
    assert!(verifies(&name), "the old archive no longer verifies");
}

#[test]
fn full_disk_fails_the_unpack_and_leaves_no_file_looking_complete() {
    if !need_root("full_disk_unpack") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    random_tree(&src, 4, 8, 3 << 20);
    for i in 0..20 {
        std::fs::write(src.join(format!("small-{i}")), format!("small file {i}\n")).unwrap();
    }
    let archive = tmp.path().join("a.cka");
    ck_ok(&pack_args(&archive, &src, 1, "zstd"));
    let out_dir = tmp.path().join("out");
    let _m = tmpfs(&out_dir, "10m");
    let out = ck(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "-C".as_ref(),
        out_dir.as_os_str(),
    ]);
    let err = stderr(&out);
    eprintln!("unpack into a full filesystem: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    // What is left is complete: every file there has all of its data.
    let left = files_of(&out_dir);
    assert!(left.len() < 28, "everything was unpacked into 10 MiB?");
    for (name, bytes) in &left {
        assert_eq!(
            bytes,
            &std::fs::read(src.join(name)).unwrap(),
            "{name} is left incomplete or wrong after the disk filled up"
        );
    }
}

// ---------------------------------------------------------------------------------
// 5. Read errors (EIO) from the disk holding the archive, during restore.

fn need_fuse(test: &str) -> bool {
    let ok = Path::new("/dev/fuse").exists();
    if !ok {
        assert!(!privileged_required(), "{test}: /dev/fuse is missing");
        eprintln!("skipping {test}: no /dev/fuse");
    }
    ok
}

/// Byte ranges in shard 0 of (a) the longest run of adjacent chunks that hold nothing
/// but memory pages (of the largest `criu/pages-*` image, without its first chunk), and
/// (b) the first chunk of a metadata image (the first one in the file).
fn pages_and_metadata_ranges(archive: &Path) -> ((u64, u64), (u64, u64)) {
    let r = open_archive(archive);
    let pages = (0..r.entries().len())
        .filter(|&i| r.entries()[i].path.starts_with(b"criu/pages-"))
        .max_by_key(|&i| r.entries()[i].size)
        .unwrap();
    // Every chunk of the archive by offset: (offset, end, is one of `pages`' chunks
    // after its first).
    let mut all: Vec<(u64, u64, bool)> = Vec::new();
    let mut metadata = (u64::MAX, 0);
    for i in 0..r.entries().len() {
        let path = String::from_utf8_lossy(&r.entries()[i].path).into_owned();
        for (k, c) in r.chunks_of(i).iter().enumerate() {
            assert_eq!(c.shard, 0);
            let range = (c.offset, c.offset + c.stored_len as u64);
            all.push((range.0, range.1, i == pages && k > 0));
            if path.starts_with("criu/") && !path.starts_with("criu/pages-") && range.0 < metadata.0
            {
                metadata = range;
            }
        }
    }
    all.sort();
    let mut best = (0, 0);
    let mut run: Option<(u64, u64)> = None;
    for (start, end, ours) in all {
        run = match (ours, run) {
            (true, Some((s, _))) => Some((s, end)),
            (true, None) => Some((start, end)),
            (false, _) => None,
        };
        if let Some((s, e)) = run {
            if e - s > best.1 - best.0 {
                best = (s, e);
            }
        }
    }
    assert!(
        best.1 - best.0 >= 4 << 20,
        "no run of page chunks: {best:?}"
    );
    (best, metadata)
}

#[test]
fn read_errors_during_restore_fail_it_and_leave_no_process_behind() {
    if !criu_available("read_errors_during_restore") || !need_fuse("read_errors_during_restore") {
        return;
    }
    let _heavy = heavy_lock();
    // In its own PID namespace, so a restore can run while the original still does.
    let m = Memtest::start_in_pid_namespace(64, 1);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let archive = src.join("ckpt.cka");
    ck_ok(&dump_args(m.pid, &archive, "none", 1, &["--leave-running"]));
    m.assert_alive_and_intact("after the dump");
    let (pages, metadata) = pages_and_metadata_ranges(&archive);
    let bad = crate::support::eiofs::BadRange::new("ckpt.cka");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _fuse = crate::support::eiofs::EioMount::new(&src, &mnt, bad.clone());
    let served = mnt.join("ckpt.cka");
    for (what, range) in [("a metadata image", metadata), ("memory pages", pages)] {
        bad.arm(range.0, range.1);
        let failed_before = bad.failed.load(Ordering::SeqCst);
        let work = tmp.path().join(format!("work-{}", what.replace(' ', "-")));
        let child = Command::new(bin())
            .args([
                "restore".as_ref(),
                served.as_os_str(),
                "--work-dir".as_ref(),
                work.as_os_str(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_output(child, Duration::from_secs(120));
        let err = stderr(&out);
        eprintln!("EIO in {what}: {err}");
        assert!(
            !out.status.success(),
            "{what}: restore succeeded despite EIO"
        );
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains("Input/output error"), "{what}: {err}");
        assert!(
            bad.failed.load(Ordering::SeqCst) > failed_before,
            "{what}: no read failed"
        );
        if what == "a metadata image" {
            assert!(
                !work.join("restore.log").exists(),
                "{what}: CRIU was started on an archive that could not be read"
            );
        }
        // No restored copy is left, and the original runs on untouched.
        let mut original = m.pids.clone();
        original.sort();
        wait_for(
            "the failed restore's processes to go",
            Duration::from_secs(20),
            || {
                let mut live = live_with_cmdline(&m.needle());
                live.sort();
                live == original
            },
        );
        m.assert_alive_and_intact(what);
    }
}

// ---------------------------------------------------------------------------------
// 6. The S3 server killed mid-restore and mid-dump.

#[test]
fn s3_server_killed_mid_restore_fails_it_and_leaves_no_process() {
    if !criu_available("s3_killed_mid_restore") {
        return;
    }
    let Some(s3) = S3Server::start("s3_killed_mid_restore") else {
        return;
    };
    let _heavy = heavy_lock();
    // In its own PID namespace: the restore runs while the original still does.
    let m = Memtest::start_in_pid_namespace(256, 1);
    let url = s3.url("restore/ckpt.cka");
    let tmp = tempfile::tempdir().unwrap();
    s3.ck_ok(&dump_args(
        m.pid,
        Path::new(&url),
        "none",
        2,
        &["--leave-running"],
    ));
    let work = tmp.path().join("work");
    let child = s3
        .command(bin())
        .env("CKSTREAM_S3_RETRY_SECS", "2")
        .args([
            "restore".as_ref(),
            url.as_ref(),
            "--work-dir".as_ref(),
            work.as_os_str(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // CRIU forks the tree (a child of CRIU) and then fills its memory from the pages.
    let ckstream = child.id();
    wait_for(
        "CRIU to fork the restored tree",
        Duration::from_secs(60),
        || {
            children_of(ckstream)
                .into_iter()
                .any(|criu| !children_of(criu).is_empty())
        },
    );
    std::thread::sleep(Duration::from_millis(100));
    s3.kill();
    let out = wait_output(child, Duration::from_secs(120));
    let err = stderr(&out);
    eprintln!("S3 server killed mid-restore: {err}");
    assert!(
        !out.status.success(),
        "the restore succeeded: the server was killed too late to test anything: {err}"
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&url), "{err}");
    let mut original = m.pids.clone();
    original.sort();
    wait_for(
        "the half-restored tree to go",
        Duration::from_secs(20),
        || {
            let mut live = live_with_cmdline(&m.needle());
            live.sort();
            live == original
        },
    );
    m.assert_alive_and_intact("after the failed restore");
}

#[test]
fn s3_server_killed_mid_dump_resumes_the_process_and_keeps_the_old_archive() {
    if !criu_available("s3_killed_mid_dump") {
        return;
    }
    let Some(s3) = S3Server::start("s3_killed_mid_dump") else {
        return;
    };
    let _heavy = heavy_lock();
    let m = Memtest::start_with_fill(256, 1, "mixed");
    let prefix = "dump/";
    let url = s3.url("dump/ckpt.cka");
    s3.ck_ok(&dump_args(
        m.pid,
        Path::new(&url),
        "zstd",
        2,
        &["--leave-running"],
    ));
    let old_objects = s3_objects(&s3, prefix);
    let old_id = s3_id(&s3, &url);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    // Held (SIGSTOP) once the parts of shard 1 are uploaded, before its completion: the
    // server then dies under a dump whose uploads are open (polling for parts instead
    // raced with a dump that finished between two polls).
    let child = s3
        .command(bin())
        .env("CKSTREAM_S3_RETRY_SECS", "2")
        .env("CKSTREAM_FAILPOINT", "s3.complete:stop")
        .args(dump_args(
            m.pid,
            Path::new(&url),
            "zstd:6",
            2,
            &["--work-dir", work.to_str().unwrap()],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_stopped(child.id(), "the dump to reach the completion of shard 1");
    assert!(
        s3.multipart_uploads(prefix)
            .iter()
            .any(|(key, id)| s3.uploaded_parts(key, id) > 0),
        "no part of the new archive was uploaded"
    );
    s3.kill();
    signal(child.id(), rustix::process::Signal::CONT);
    let out = wait_output(child, Duration::from_secs(120));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no archive was written"), "{err}");
    m.assert_alive_and_intact("after the server died mid-dump");
    s3.restart();
    // The restarted server answers before its volumes are back (500 Internal Error).
    wait_for(
        "the restarted server to serve data",
        Duration::from_secs(60),
        || s3.ck(&["info", &url]).status.success(),
    );
    assert_eq!(s3_objects(&s3, prefix), old_objects, "objects changed");
    assert_eq!(s3_id(&s3, &url), old_id);
    let verify = s3.ck(&["verify", &url]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    // Uploads that could not be aborted while the server was down are named.
    for (key, id) in s3.multipart_uploads(prefix) {
        assert!(
            err.contains(id.as_str()) && err.contains(key.as_str()),
            "upload {key} {id} left without a warning: {err}"
        );
    }
}

// ---------------------------------------------------------------------------------
// 7 and 9. CRIU or ckstream killed while the pages are being restored.

/// Dumps a tree, then restores it from a FUSE copy of the archive whose page reads
/// stall; once CRIU is waiting for pages, `kill` picks the victim (given ckstream's
/// PID, returns the PID to SIGKILL). Then: the restore fails, no restored process is
/// left, and a plain restore afterwards brings the tree back intact.
fn killed_mid_restore(test: &str, victim: &str) {
    if !criu_available(test) || !need_fuse(test) {
        return;
    }
    let _heavy = heavy_lock();
    let m = Memtest::start(64, 2);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let archive = src.join("ckpt.cka");
    ck_ok(&dump_args(m.pid, &archive, "none", 1, &[]));
    m.wait_gone();
    let (pages, _) = pages_and_metadata_ranges(&archive);
    let bad = crate::support::eiofs::BadRange::new("ckpt.cka");
    bad.stall.store(true, Ordering::SeqCst);
    bad.arm(pages.0, pages.1);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let fuse = crate::support::eiofs::EioMount::new(&src, &mnt, bad.clone());
    let work = tmp.path().join("work");
    let child = Command::new(bin())
        .args([
            "restore".as_ref(),
            mnt.join("ckpt.cka").as_os_str(),
            "--work-dir".as_ref(),
            work.as_os_str(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a page read to stall", Duration::from_secs(60), || {
        bad.stalled.load(Ordering::SeqCst) > 0
    });
    let criu: Vec<u32> = children_of(child.id())
        .into_iter()
        .filter(|&p| proc_stat(p).is_some_and(|s| s.comm == "criu"))
        .collect();
    assert_eq!(criu.len(), 1, "CRIU is not running: {criu:?}");
    let criu = criu[0];
    assert!(running(m.pid), "CRIU has not forked the tree yet");
    let target = if victim == "criu" { criu } else { child.id() };
    signal(target, rustix::process::Signal::KILL);
    std::thread::sleep(Duration::from_millis(100));
    bad.open_gate();
    let out = wait_output(child, Duration::from_secs(120));
    let err = stderr(&out);
    eprintln!("{victim} killed mid-restore: {err}");
    if victim == "criu" {
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("criu restore failed"), "{err}");
    } else {
        assert!(killed_by_sigkill(&out), "{:?} {err}", out.status);
    }
    wait_for("CRIU to exit", Duration::from_secs(30), || !running(criu));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let live = live_with_cmdline(&m.needle());
        // The restored tasks are CRIU's until they run: count those too.
        let tasks: Vec<u32> = session_members(m.pid)
            .into_iter()
            .filter(|&p| running(p))
            .collect();
        if live.is_empty() && tasks.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let states: Vec<_> = tasks.iter().chain(&live).map(|&p| proc_stat(p)).collect();
            m.kill();
            panic!("{victim} killed mid-restore left a half-restored tree: {states:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(fuse);
    // Killed tasks are zombies for a moment, and a zombie still holds its PID.
    wait_for(
        "the tree's PIDs to be free",
        Duration::from_secs(30),
        || m.pids.iter().all(|&p| proc_stat(p).is_none()),
    );
    ck_ok(&["restore".as_ref(), "-q".as_ref(), archive.as_os_str()]);
    m.assert_alive_and_intact("restored after the failed restore");
}

#[test]
fn criu_killed_mid_restore_leaves_no_half_restored_tree() {
    killed_mid_restore("criu_killed_mid_restore", "criu");
}

#[test]
fn ckstream_killed_mid_restore_leaves_no_half_restored_tree() {
    killed_mid_restore("ckstream_killed_mid_restore", "ckstream");
}

// ---------------------------------------------------------------------------------
// 8. ckstream killed mid-dump: CRIU must resume the process.

#[test]
fn ckstream_killed_while_criu_streams_pages_leaves_the_process_running() {
    if !criu_available("ckstream_killed_mid_dump") {
        return;
    }
    let _heavy = heavy_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let old_src = tmp.path().join("old-src");
    random_tree(&old_src, 1, 2, 1 << 20);
    std::fs::create_dir(&dir).unwrap();
    let name = dir.join("ckpt.cka");
    ck_ok(&pack_args(&name, &old_src, 1, "none"));
    let old_files = files_of(&dir);
    let m = Memtest::start_with_fill(256, 1, "mixed");
    let work = tmp.path().join("work");
    let work_arg = work.to_string_lossy().into_owned();
    let child = Command::new(bin())
        .args(dump_args(
            m.pid,
            &name,
            "zstd",
            1,
            &["--work-dir", &work_arg],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let partial_len = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .max()
            .unwrap_or(0)
    };
    wait_for("pages to stream", Duration::from_secs(60), || {
        partial_len() > 8 << 20
    });
    let criu: Vec<u32> = children_of(child.id())
        .into_iter()
        .filter(|&p| proc_stat(p).is_some_and(|s| s.comm == "criu"))
        .collect();
    signal(child.id(), rustix::process::Signal::KILL);
    let out = child.wait_with_output().unwrap();
    assert!(
        killed_by_sigkill(&out),
        "the dump ended before it was killed"
    );
    for &c in &criu {
        wait_for("CRIU to exit", Duration::from_secs(60), || !running(c));
    }
    m.assert_alive_and_intact("after ckstream was killed mid-dump");
    let now = files_of(&dir);
    for (n, bytes) in &old_files {
        assert_eq!(now.get(n), Some(bytes), "the old archive changed");
    }
    assert!(verifies(&name));
    assert_no_other_good_archive(&dir, &["ckpt.cka"], "killed mid-dump");
    let log = std::fs::read_to_string(work.join("dump.log")).unwrap_or_default();
    eprintln!(
        "CRIU's log after ckstream died: {}",
        log.lines()
            .filter(|l| l.contains("Error") || l.contains("resum") || l.contains("Unfreez"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

#[test]
fn ckstream_killed_at_the_commit_in_the_post_dump_hook_leaves_the_process_running() {
    if !criu_available("ckstream_killed_at_commit") {
        return;
    }
    let _heavy = heavy_lock();
    let m = Memtest::start(32, 1);
    for failpoint in ["sink.sync:kill", "publish.rename:kill"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let old_src = tmp.path().join("old-src");
        random_tree(&old_src, 1, 2, 1 << 20);
        std::fs::create_dir(&dir).unwrap();
        let name = dir.join("ckpt.cka");
        ck_ok(&pack_args(&name, &old_src, 1, "none"));
        let old_files = files_of(&dir);
        let work = tmp.path().join("work");
        let out = ck_env(
            &[("CKSTREAM_FAILPOINT", failpoint)],
            &dump_args(
                m.pid,
                &name,
                "zstd",
                1,
                &["--work-dir", work.to_str().unwrap()],
            ),
        );
        assert!(
            killed_by_sigkill(&out),
            "{failpoint}: {:?} {}",
            out.status,
            stderr(&out)
        );
        // CRIU (now a child of ours) finishes on its own.
        wait_for("CRIU to exit", Duration::from_secs(60), || {
            all_processes()
                .iter()
                .all(|p| p.comm != "criu" || p.state == 'Z' || p.ppid != std::process::id())
        });
        m.assert_alive_and_intact(failpoint);
        let now = files_of(&dir);
        for (n, bytes) in &old_files {
            assert_eq!(
                now.get(n),
                Some(bytes),
                "{failpoint}: the old archive changed"
            );
        }
        assert!(verifies(&name), "{failpoint}");
        let left: Vec<&str> = names(&now)
            .into_iter()
            .filter(|n| *n != "ckpt.cka")
            .collect();
        eprintln!("{failpoint}: files left besides the old archive: {left:?}");
        assert_no_other_good_archive(&dir, &["ckpt.cka"], failpoint);
    }
}

/// Failures after the rename, inside the post-dump hook: a directory that cannot be
/// synced makes CRIU resume the process (the checkpoint might not survive a crash) and
/// the error says the new archive may be under the name; an old shard that cannot be
/// removed is only a warning: the checkpoint is stored, the process is checkpointed.
#[test]
fn dump_failing_after_the_rename_says_so_and_resumes_the_process_only_if_not_durable() {
    if !criu_available("dump_failing_after_the_rename") {
        return;
    }
    let _heavy = heavy_lock();
    let m = Memtest::start(32, 1);
    let tmp = tempfile::tempdir().unwrap();
    let old_src = tmp.path().join("old-src");
    random_tree(&old_src, 1, 3, 1 << 20);
    for failpoint in ["publish.dir-sync:error", "publish.remove-old:error"] {
        let dir = tmp.path().join(failpoint);
        std::fs::create_dir(&dir).unwrap();
        let name = dir.join("ckpt.cka");
        ck_ok(&pack_args(&name, &old_src, 3, "none"));
        let old_id = archive_id(&name);
        let work = tmp.path().join(format!("work-{failpoint}"));
        let out = ck_env(
            &[("CKSTREAM_FAILPOINT", failpoint)],
            &dump_args(
                m.pid,
                &name,
                "zstd",
                2,
                &["--work-dir", work.to_str().unwrap()],
            ),
        );
        let err = stderr(&out);
        eprintln!("dump with {failpoint}: {err}");
        assert!(
            verifies(&name),
            "{failpoint}: the new archive does not verify"
        );
        assert_ne!(archive_id(&name), old_id, "{failpoint}");
        if failpoint.starts_with("publish.dir-sync") {
            assert_eq!(out.status.code(), Some(1), "{failpoint}: {err}");
            assert!(
                err.contains("the new archive may be in place")
                    && err.contains("resumed")
                    && !err.contains("no archive was written"),
                "{failpoint}: {err}"
            );
            m.assert_alive_and_intact(failpoint);
        } else {
            assert!(out.status.success(), "{failpoint}: {err}");
            assert!(err.contains("warning"), "{failpoint}: {err}");
            m.wait_gone();
            ck_ok(&["restore".as_ref(), "-q".as_ref(), name.as_os_str()]);
            m.assert_alive_and_intact("restored");
        }
    }
}
