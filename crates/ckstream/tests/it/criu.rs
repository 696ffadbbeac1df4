//! Real CRIU, real processes: a test program fills memory with pseudo-random data and
//! keeps a checksum; it is checkpointed with `ckstream dump`, must be gone, is restored
//! with `ckstream restore`, and must then still beat and re-verify its memory (parent
//! and children, which talk over pipes and keep a log file open). Also faults: CRIU
//! failing or killed mid-dump, truncated and corrupted archives. Root and CRIU ≥ 4 are
//! required (CI installs CRIU with scripts/install-criu.sh).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::memtest::*;
use crate::support::*;

fn dump_restore_cycle(codec: &str, shards: u32) {
    if !criu_available("dump_restore_cycle") {
        return;
    }
    let children = 2;
    let m = Memtest::start(48, children);
    m.assert_beating();
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("ckpt.cka");
    ck_ok(&dump_args(m.pid, &archive, codec, shards, &[]));
    m.wait_gone();
    ck_ok(&["verify".as_ref(), archive.as_os_str()] as &[&OsStr]);
    let listing =
        String::from_utf8(ck_ok(&["ls".as_ref(), archive.as_os_str()] as &[&OsStr]).stdout)
            .unwrap();
    assert!(
        listing.lines().any(|l| l == "criu/inventory.img"),
        "{listing}"
    );
    assert!(
        listing.lines().any(|l| l.starts_with("criu/pages-")),
        "{listing}"
    );
    ck_ok(&["restore".as_ref(), "-q".as_ref(), archive.as_os_str()] as &[&OsStr]);
    m.assert_beating();
    m.assert_memory_intact(children);
}

cases!(dump_restore_cycle:
    dump_restore_raw_1_shard("none", 1),
    dump_restore_raw_3_shards("none", 3),
    dump_restore_lz4_1_shard("lz4", 1),
    dump_restore_lz4_3_shards("lz4", 3),
    dump_restore_zstd_1_shard("zstd", 1),
    dump_restore_zstd_3_shards("zstd", 3),
);

/// Dump straight into an object store and restore straight from it (2 shards, zstd):
/// the restored tree beats and its memory checks out, and the restore fetched each
/// stored byte about once (it streams; it does not download the archive first).
#[test]
fn dump_to_s3_and_restore_from_s3() {
    if !criu_available("dump_to_s3_and_restore_from_s3") {
        return;
    }
    let Some(s3) = crate::support::s3server::S3Server::start("dump_to_s3_and_restore_from_s3")
    else {
        return;
    };
    let children = 2;
    let m = Memtest::start_with_fill(64, children, "mixed");
    m.assert_beating();
    let url = s3.url("criu/ckpt.cka");
    let args = dump_args(m.pid, std::path::Path::new(&url), "zstd", 2, &[]);
    s3.ck_ok(&args);
    m.wait_gone();
    let info: serde_json::Value =
        serde_json::from_slice(&s3.ck_ok(&["info", "--json", &url]).stdout).unwrap();
    let archive_bytes = info["archive_bytes"].as_u64().unwrap();
    // A chunk stored once for two places (the same library pages in several processes)
    // is read once for each.
    let referenced = info["referenced_bytes"].as_u64().unwrap();
    let restore = s3.ck_ok(&["restore", "-q", &url]);
    m.assert_beating();
    m.assert_memory_intact(children);
    let st = crate::support::s3server::s3_stats(&restore);
    let fetched = st["get_bytes"].as_u64().unwrap();
    // Metadata images are read twice (checked before CRIU starts, then served); read-ahead
    // fetches only the bytes of files being served, so nothing else is fetched twice (it
    // used to be 10-22% more: spans shared by two files read far apart, fetched twice).
    assert!(
        fetched <= archive_bytes + referenced + archive_bytes / 20 + (2 << 20),
        "restore fetched {fetched} bytes of a {archive_bytes}-byte archive \
         ({referenced} bytes referenced twice): {st}"
    );
    assert!(fetched >= archive_bytes / 2, "{st}");
}

#[test]
fn leave_running_keeps_the_process_and_the_archive_restores_later() {
    if !criu_available("leave_running") {
        return;
    }
    let m = Memtest::start(32, 1);
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("ckpt.cka");
    let extra = tmp.path().join("note.txt");
    std::fs::write(&extra, b"included next to the images").unwrap();
    let include = format!("notes/note.txt={}", extra.display());
    let out = ck_ok(&dump_args(
        m.pid,
        &archive,
        "zstd",
        1,
        &["--leave-running", "--include", &include, "--json"],
    ));
    m.assert_beating();
    m.assert_memory_intact(1);
    // CRIU wrote its images into a spool beside the archive, which is gone again.
    assert_eq!(
        dir_names(tmp.path()),
        ["ckpt.cka", "note.txt"],
        "files left beside the archive"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let freeze = summary["freeze_seconds"]
        .as_f64()
        .expect("CRIU's freeze time");
    assert!(freeze > 0.0 && freeze < summary["seconds"].as_f64().unwrap());
    assert!(summary["images"].as_u64().unwrap() >= 5, "{summary}");
    ck_ok(&["verify".as_ref(), archive.as_os_str()] as &[&OsStr]);
    let cat = ck_ok(&[
        "cat".as_ref(),
        archive.as_os_str(),
        "notes/note.txt".as_ref(),
    ] as &[&OsStr]);
    assert_eq!(cat.stdout, b"included next to the images");
    // Now replace the running tree with the checkpointed one.
    m.kill();
    m.wait_gone();
    ck_ok(&["restore".as_ref(), "-q".as_ref(), archive.as_os_str()] as &[&OsStr]);
    m.assert_beating();
    m.assert_memory_intact(1);
}

#[test]
fn failed_or_killed_criu_leaves_no_archive_and_the_process_running() {
    if !criu_available("criu_faults") {
        return;
    }
    let m = Memtest::start(32, 1);
    let tmp = tempfile::tempdir().unwrap();
    // CRIU_FAULT=3 fails the page dump; CRIU_FAULT=1 makes CRIU SIGKILL itself.
    for fault in ["3", "1"] {
        let archive = tmp.path().join(format!("fault-{fault}.cka"));
        let out = Command::new(bin())
            .args(dump_args(m.pid, &archive, "zstd", 2, &[]))
            .env("CRIU_FAULT", fault)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "fault {fault}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("criu dump failed"),
            "fault {fault}: {}",
            stderr(&out)
        );
        assert!(
            !archive.exists(),
            "fault {fault}: an archive was left behind"
        );
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
        assert!(
            leftovers.is_empty(),
            "fault {fault}: files left: {leftovers:?}"
        );
        assert!(m.alive(), "fault {fault}: the process died");
        m.assert_beating();
        m.assert_memory_intact(1);
    }
}

/// The archive is committed and published inside CRIU's post-dump hook, before CRIU
/// may kill the process: when publishing fails (here: the archive's name is taken by a
/// non-empty directory, so the final rename fails; on an object store, completing the
/// uploads), CRIU resumes the process instead of killing it and nothing is left behind.
#[test]
fn failed_publish_leaves_the_process_running() {
    if !criu_available("failed_publish") {
        return;
    }
    let m = Memtest::start(32, 1);
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("ckpt.cka");
    std::fs::create_dir(&archive).unwrap();
    std::fs::write(archive.join("in-the-way"), b"x").unwrap();
    let out = Command::new(bin())
        .args(dump_args(m.pid, &archive, "zstd", 2, &[]))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("renaming"), "{err}");
    assert!(err.contains("no archive was written"), "{err}");
    // Only the directory in the way: both new shards were removed again.
    assert_eq!(dir_names(tmp.path()), ["ckpt.cka"], "files left");
    assert!(
        m.alive(),
        "the process was killed although its checkpoint was not stored"
    );
    m.assert_beating();
    m.assert_memory_intact(1);
}

#[test]
fn damaged_archives_are_refused_before_criu_runs() {
    if !criu_available("damaged_archives") {
        return;
    }
    let m = Memtest::start(32, 0);
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("ckpt.cka");
    ck_ok(&dump_args(m.pid, &archive, "none", 1, &["--leave-running"]));
    let bytes = std::fs::read(&archive).unwrap();
    let reader = open_archive(&archive);
    let inventory = reader.find(b"criu/inventory.img").unwrap();
    let inv_chunk = reader.chunks_of(inventory)[0].clone();
    let pages = reader
        .entries()
        .iter()
        .position(|e| e.path.starts_with(b"criu/pages-"))
        .unwrap();
    let page_chunk = reader.chunks_of(pages)[3].clone();
    drop(reader);

    let work = tmp.path().join("work");
    let restore = |a: &Path, extra: &[&str]| {
        let _ = std::fs::remove_dir_all(&work);
        let mut args: Vec<&OsStr> = vec![
            "restore".as_ref(),
            a.as_os_str(),
            "--work-dir".as_ref(),
            work.as_os_str(),
        ];
        args.extend(extra.iter().map(|s| OsStr::new(*s)));
        ck(&args)
    };
    let criu_ran =
        || work.join("restore.log").exists() || work.join("criu-restore.stderr").exists();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("no footer", bytes[..bytes.len() - 128].to_vec()),
        ("flipped metadata image", {
            let mut b = bytes.clone();
            b[inv_chunk.offset as usize + 5] ^= 1;
            b
        }),
    ];
    for (what, data) in cases {
        let a = tmp.path().join("bad.cka");
        std::fs::write(&a, data).unwrap();
        let out = restore(&a, &[]);
        assert_eq!(out.status.code(), Some(3), "{what}: {}", stderr(&out));
        assert!(!criu_ran(), "{what}: CRIU was started");
    }
    // Damage inside memory pages: --verify-first refuses before CRIU; a plain restore
    // stops at the bad chunk (CRIU gets no corrupt byte) and fails.
    let mut b = bytes.clone();
    b[page_chunk.offset as usize + 100] ^= 1;
    let a = tmp.path().join("bad-pages.cka");
    std::fs::write(&a, b).unwrap();
    let out = restore(&a, &["--verify-first"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(!criu_ran());
    // The original process (left running) is untouched by all of this.
    m.assert_beating();
    m.assert_memory_intact(0);
    m.kill();
    m.wait_gone();
    let out = restore(&a, &[]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("digest mismatch"), "{}", stderr(&out));
    // Whatever CRIU forked must die (zombies included, once init reaps them).
    m.wait_gone();
}

#[test]
fn criu_image_streamer_readme_pipelines_work_with_ckstream() {
    if !criu_available("streamer_readme_pipelines") {
        return;
    }
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/compat/streamer-readme.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("CKSTREAM", bin())
        .env("MEMTEST", memtest_binary())
        .env("CRIU", criu_binary())
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(all.contains("all passed"), "{all}");
}

fn dump_carries_a_rootfs_diff_and_restore_applies_it(lazy: bool) {
    if !criu_available("rootfs_with_dump") {
        return;
    }
    let m = Memtest::start(32, 1);
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    std::fs::create_dir_all(upper.join("app")).unwrap();
    std::fs::write(upper.join("app/state"), b"written by the container").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        upper.join("obsolete"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
    let archive = tmp.path().join("ckpt.cka");
    let upper_arg = upper.to_string_lossy().into_owned();
    ck_ok(&dump_args(
        m.pid,
        &archive,
        "zstd",
        1,
        &["--rootfs-diff", &upper_arg],
    ));
    m.wait_gone();
    let listing =
        String::from_utf8(ck_ok(&["ls".as_ref(), archive.as_os_str()] as &[&OsStr]).stdout)
            .unwrap();
    assert!(
        listing.lines().any(|l| l == "rootfs/app/state"),
        "{listing}"
    );
    let target = tmp.path().join("rootfs");
    std::fs::create_dir_all(target.join("app")).unwrap();
    std::fs::write(target.join("obsolete"), b"deleted in the container").unwrap();
    let mut args: Vec<&OsStr> = vec![
        "restore".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "--rootfs".as_ref(),
        target.as_os_str(),
    ];
    if lazy {
        args.extend(["--lazy".as_ref(), "--wait".as_ref()] as [&OsStr; 2]);
    }
    ck_ok(&args);
    assert_eq!(
        std::fs::read(target.join("app/state")).unwrap(),
        b"written by the container"
    );
    assert!(!target.join("obsolete").exists());
    m.assert_beating();
    m.assert_memory_intact(1);
}

cases!(dump_carries_a_rootfs_diff_and_restore_applies_it:
    dump_carries_a_rootfs_diff_taken_while_frozen_and_restore_applies_it(false),
    dump_carries_a_rootfs_diff_and_a_lazy_restore_applies_it(true),
);

/// An overlay (metacopy=on, redirect_dir=on) whose merged view was changed the way a
/// container on Fedora/RHEL storage changes it: chmod/chown of lower files and renames
/// (metadata-only copy-ups, a redirected directory) besides ordinary changes.
fn metacopy_overlay(base: &Path) -> (PathBuf, PathBuf, OverlayMount) {
    let (lower, upper, work, merged) = (
        base.join("lower"),
        base.join("upper"),
        base.join("work"),
        base.join("merged"),
    );
    std::fs::create_dir_all(lower.join("etc")).unwrap();
    std::fs::create_dir_all(lower.join("srv/data/sub")).unwrap();
    std::fs::write(lower.join("etc/config"), prng_bytes(3, 200_000)).unwrap();
    std::fs::write(lower.join("etc/owned"), b"chown me").unwrap();
    std::fs::write(lower.join("rename-me"), b"a renamed lower file").unwrap();
    std::fs::write(lower.join("srv/data/a"), b"in a renamed directory").unwrap();
    std::fs::write(lower.join("srv/data/sub/b"), prng_bytes(4, 9000)).unwrap();
    std::fs::write(lower.join("obsolete"), b"deleted in the container").unwrap();
    let mount = mount_metacopy_overlay(&lower, &upper, &work, &merged);
    let m = &merged;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(m.join("etc/config"), std::fs::Permissions::from_mode(0o600)).unwrap();
    rustix::fs::chown(
        m.join("etc/owned"),
        Some(rustix::fs::Uid::from_raw(33)),
        Some(rustix::fs::Gid::from_raw(33)),
    )
    .unwrap();
    std::fs::rename(m.join("rename-me"), m.join("etc/renamed")).unwrap();
    std::fs::rename(m.join("srv/data"), m.join("srv/data-v2")).unwrap();
    std::fs::write(m.join("srv/data-v2/new"), b"written after the rename").unwrap();
    std::fs::create_dir_all(m.join("app")).unwrap();
    std::fs::write(m.join("app/state"), b"written by the container").unwrap();
    std::fs::remove_file(m.join("obsolete")).unwrap();
    assert!(has_xattr(
        &upper.join("etc/config"),
        "trusted.overlay.metacopy"
    ));
    assert!(has_xattr(
        &upper.join("srv/data-v2"),
        "trusted.overlay.redirect"
    ));
    (lower, upper, mount)
}

/// `dump --rootfs-diff` of an upper dir with metacopy files and a redirected directory
/// while the overlay is mounted: the merged view is found in mountinfo, the diff is
/// complete, and `restore --rootfs` rebuilds exactly the merged view from the lower dir.
#[test]
fn dump_with_a_metacopy_rootfs_diff_restores_the_merged_view() {
    if !criu_available("rootfs_metacopy_with_dump") {
        return;
    }
    let m = Memtest::start(32, 1);
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper, mount) = metacopy_overlay(tmp.path());
    let expected = manifest(&mount.0);
    let archive = tmp.path().join("ckpt.cka");
    let upper_arg = upper.to_string_lossy().into_owned();
    ck_ok(&dump_args(
        m.pid,
        &archive,
        "zstd",
        1,
        &["--rootfs-diff", &upper_arg],
    ));
    m.wait_gone();
    drop(mount);
    let target = tmp.path().join("rootfs");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&lower)
        .arg(&target)
        .status()
        .unwrap();
    assert!(st.success());
    ck_ok(&[
        "restore".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "--rootfs".as_ref(),
        target.as_os_str(),
    ] as &[&OsStr]);
    let got = manifest(&target);
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (k, v) in &expected {
        assert_eq!(v, &got[k], "{} differs", String::from_utf8_lossy(k));
    }
    m.assert_beating();
    m.assert_memory_intact(1);
}

/// The same upper dir with the overlay unmounted: no merged view, so the dump is
/// refused before CRIU starts. The process was never frozen (CRIU wrote no log), it
/// keeps beating with its memory intact, and no archive exists.
#[test]
fn dump_refuses_a_metacopy_rootfs_diff_without_merged_view_before_criu_runs() {
    if !criu_available("rootfs_metacopy_refused") {
        return;
    }
    let m = Memtest::start(32, 1);
    let tmp = tempfile::tempdir().unwrap();
    let (_lower, upper, mount) = metacopy_overlay(tmp.path());
    drop(mount);
    let archive = tmp.path().join("ckpt.cka");
    let work = tmp.path().join("work");
    let upper_arg = upper.to_string_lossy().into_owned();
    let work_arg = work.to_string_lossy().into_owned();
    let out = ck(&dump_args(
        m.pid,
        &archive,
        "zstd",
        1,
        &["--rootfs-diff", &upper_arg, "--work-dir", &work_arg],
    ));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("CRIU was not started"), "{err}");
    assert!(
        err.contains("metadata-only copy-up") || err.contains("renamed directory"),
        "{err}"
    );
    assert!(err.contains("--rootfs-merged"), "{err}");
    assert!(!work.join("dump.log").exists(), "CRIU ran");
    assert!(!archive.exists(), "an archive was written");
    assert!(m.alive());
    m.assert_beating();
    m.assert_memory_intact(1);
}

#[test]
fn sigterm_during_dump_leaves_no_archive_and_the_process_running() {
    if !criu_available("sigterm_during_dump") {
        return;
    }
    let m = Memtest::start_with_fill(128, 1, "mixed");
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("ckpt.cka");
    let work = tmp.path().join("work");
    let work_arg = work.to_string_lossy().into_owned();
    // zstd level 19 on compressible memory makes the dump slow enough to interrupt.
    let child = Command::new(bin())
        .args(dump_args(
            m.pid,
            &archive,
            "zstd:19",
            1,
            &["--work-dir", &work_arg],
        ))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("CRIU to start dumping", Duration::from_secs(30), || {
        work.join("dump.log").exists()
    });
    std::thread::sleep(Duration::from_millis(300));
    signal(child.id(), rustix::process::Signal::TERM);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(!archive.exists(), "an interrupted dump left an archive");
    let partial: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(partial.is_empty(), "temporary shards left: {partial:?}");
    // No CRIU left behind, and the process resumed with its memory intact.
    wait_for("criu to exit", Duration::from_secs(30), || {
        std::fs::read_dir("/proc").unwrap().flatten().all(|e| {
            std::fs::read(e.path().join("cmdline")).map_or(true, |c| {
                !String::from_utf8_lossy(&c).contains(work_arg.as_str())
            })
        })
    });
    m.assert_beating();
    m.assert_memory_intact(1);
}
