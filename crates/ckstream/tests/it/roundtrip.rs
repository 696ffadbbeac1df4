//! Pack → verify → unpack round trips of a tree with every file type, for every codec
//! and for 1 and 4 shards, through the real binary.

use crate::support::*;

fn round_trip(codec: &str, shards: u32) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let archive = tmp.path().join("a.cka");
    let shards_s = shards.to_string();
    ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-c".as_ref(),
        codec.as_ref(),
        "--shards".as_ref(),
        shards_s.as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
        format!(".={}", src.display()).as_ref(),
    ] as &[&std::ffi::OsStr]);
    for i in 1..shards {
        assert!(shard_file(&archive, i).exists(), "shard {i} missing");
    }
    let verify = ck_ok(&["verify".as_ref(), archive.as_os_str()] as &[&std::ffi::OsStr]);
    assert!(String::from_utf8_lossy(&verify.stdout).starts_with("OK"));
    let out = tmp.path().join("out");
    ck_ok(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "-C".as_ref(),
        out.as_os_str(),
    ] as &[&std::ffi::OsStr]);
    assert_same_tree(&src, &out);
    // Holes stay holes; an all-zero file becomes sparse.
    assert!(
        allocated(&out.join("sparse")) < 1 << 20,
        "sparse file came back allocated"
    );
    assert!(
        allocated(&out.join("zeros")) < 1 << 20,
        "all-zero file stored as data"
    );
    // No temporary files left next to the archive.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty());
}

cases!(round_trip:
    round_trip_none_1_shard("none", 1),
    round_trip_none_4_shards("none", 4),
    round_trip_lz4_1_shard("lz4", 1),
    round_trip_lz4_4_shards("lz4", 4),
    round_trip_zstd_1_shard("zstd", 1),
    round_trip_zstd_4_shards("zstd:3", 4),
);

#[test]
fn ownership_is_restored_as_root() {
    if !need_root("ownership_is_restored_as_root") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let archive = tmp.path().join("a.cka");
    ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
        src.as_os_str(),
    ] as &[&std::ffi::OsStr]);
    let out = tmp.path().join("out");
    ck_ok(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "-C".as_ref(),
        out.as_os_str(),
    ] as &[&std::ffi::OsStr]);
    let m = manifest(&out.join("src"));
    let rec = &m[&b"dir/4095"[..]];
    assert_eq!((rec.uid, rec.gid), (1234, 5678));
    let link = &m[&b"rel-link"[..]];
    assert_eq!((link.uid, link.gid), (42, 43));
    assert_eq!(
        m[&b"setuid"[..]].mode,
        0o4755,
        "setuid bit must survive chown"
    );
    assert_eq!(m[&b"whiteout"[..]].kind, "chardev");
}

#[test]
fn pack_stores_names_and_unpack_selects_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let archive = tmp.path().join("a.cka");
    let renamed = format!("images/renamed={}", src.join("dir").display());
    ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
        renamed.as_ref(),
        src.join("sparse").as_os_str(),
    ] as &[&std::ffi::OsStr]);
    let ls = ck_ok(&["ls".as_ref(), archive.as_os_str()] as &[&std::ffi::OsStr]);
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(
        listing.lines().any(|l| l == "images/renamed/4096"),
        "{listing}"
    );
    assert!(listing.lines().any(|l| l == "sparse"), "{listing}");
    let out = tmp.path().join("out");
    ck_ok(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "-C".as_ref(),
        out.as_os_str(),
        "images/renamed/nested".as_ref(),
    ] as &[&std::ffi::OsStr]);
    assert!(out.join("images/renamed/nested/random-3.5m").exists());
    assert!(!out.join("images/renamed/4096").exists());
    assert!(!out.join("sparse").exists());
    // The hard link's other name was not selected: its data is restored as a copy.
    assert_eq!(
        std::fs::read(out.join("images/renamed/nested/second-name")).unwrap(),
        b"shared by two names"
    );
}

#[test]
fn cat_reads_one_file_and_ls_json_describes_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, archive) = packed_tree(tmp.path(), &["-c", "zstd"]);
    for name in [
        "dir/nested/random-3.5m",
        "sparse",
        "dir/nested/deeper/text.txt",
        "dir/nested/second-name",
        "empty",
    ] {
        let out =
            ck_ok(&["cat".as_ref(), archive.as_os_str(), name.as_ref()] as &[&std::ffi::OsStr]);
        assert_eq!(out.stdout, std::fs::read(src.join(name)).unwrap(), "{name}");
    }
    let missing =
        ck(&["cat".as_ref(), archive.as_os_str(), "nope".as_ref()] as &[&std::ffi::OsStr]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("not in the archive"));
    let dir = ck(&["cat".as_ref(), archive.as_os_str(), "dir".as_ref()] as &[&std::ffi::OsStr]);
    assert!(!dir.status.success());

    let json =
        ck_ok(&["ls".as_ref(), "--json".as_ref(), archive.as_os_str()] as &[&std::ffi::OsStr]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let text = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "dir/nested/deeper/text.txt")
        .unwrap();
    assert_eq!(text["type"], "file");
    assert!(text["stored_bytes"].as_u64().unwrap() < text["size"].as_u64().unwrap() / 4);
    let info =
        ck_ok(&["info".as_ref(), "--json".as_ref(), archive.as_os_str()] as &[&std::ffi::OsStr]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["shards"], 1);
    assert!(v["ratio"].as_f64().unwrap() > 1.0);
    let long = ck_ok(&["ls".as_ref(), "-l".as_ref(), archive.as_os_str()] as &[&std::ffi::OsStr]);
    let long = String::from_utf8_lossy(&long.stdout);
    assert!(
        long.lines()
            .any(|l| l.starts_with("-rwsr-xr-x") && l.ends_with(" setuid")),
        "{long}"
    );
    assert!(
        long.lines()
            .any(|l| l.starts_with('l') && l.ends_with("rel-link -> dir/4096")),
        "{long}"
    );
}

#[test]
fn pack_to_stdout_and_failures_leave_no_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();
    let out = ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        "-".as_ref(),
        src.as_os_str(),
    ] as &[&std::ffi::OsStr]);
    let archive = tmp.path().join("piped.cka");
    std::fs::write(&archive, &out.stdout).unwrap();
    ck_ok(&["verify".as_ref(), archive.as_os_str()] as &[&std::ffi::OsStr]);

    // A missing input fails with a clear message, non-zero exit and no archive.
    let bad = tmp.path().join("bad.cka");
    let r = ck(&[
        "pack".as_ref(),
        "-o".as_ref(),
        bad.as_os_str(),
        tmp.path().join("missing").as_os_str(),
    ] as &[&std::ffi::OsStr]);
    assert!(!r.status.success());
    assert!(stderr(&r).contains("missing"), "{}", stderr(&r));
    assert!(!bad.exists());
    // An existing good archive is not replaced by a failed pack.
    let unreadable = format!("x={}", tmp.path().join("missing").display());
    let r = ck(&[
        "pack".as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
        unreadable.as_ref(),
    ] as &[&std::ffi::OsStr]);
    assert!(!r.status.success());
    ck_ok(&["verify".as_ref(), archive.as_os_str()] as &[&std::ffi::OsStr]);
    // Bad options.
    let r = ck(&[
        "pack".as_ref(),
        "-c".as_ref(),
        "gzip".as_ref(),
        "-o".as_ref(),
        bad.as_os_str(),
        src.as_os_str(),
    ] as &[&std::ffi::OsStr]);
    // A bad option value is a usage error (exit 2), reported by the argument parser.
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("unknown compression"));
}

#[test]
fn manifest_comparison_detects_a_one_nanosecond_change() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, archive) = packed_tree(tmp.path(), &[]);
    let out = tmp.path().join("out");
    ck_ok(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "-C".as_ref(),
        out.as_os_str(),
    ] as &[&std::ffi::OsStr]);
    let before = manifest(&out);
    assert_eq!(before, manifest(&src));
    let m = std::fs::symlink_metadata(out.join("dir/4096")).unwrap();
    use std::os::unix::fs::MetadataExt;
    set_mtime(
        &out.join("dir/4096"),
        m.mtime() * 1_000_000_000 + m.mtime_nsec() + 1,
    );
    assert_ne!(manifest(&out), manifest(&src));
}

#[test]
fn archives_can_be_read_from_stdin() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let packed = ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        "-".as_ref(),
        format!(".={}", src.display()).as_ref(),
    ] as &[&std::ffi::OsStr]);
    let feed = |args: &[&str]| {
        let mut child = Command::new(bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = packed.stdout.clone();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    };
    let v = feed(&["verify", "-"]);
    assert!(v.status.success(), "{}", stderr(&v));
    let c = feed(&["cat", "-", "dir/nested/deeper/text.txt"]);
    assert_eq!(
        c.stdout,
        std::fs::read(src.join("dir/nested/deeper/text.txt")).unwrap()
    );
    let out = tmp.path().join("out");
    let u = feed(&["unpack", "-q", "-", "-C", out.to_str().unwrap()]);
    assert!(u.status.success(), "{}", stderr(&u));
    assert_same_tree(&src, &out);
}

#[test]
fn sigterm_during_pack_removes_its_temporary_files() {
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("big.txt");
    // Compressible, so zstd level 19 takes seconds: time to interrupt it.
    let words = [
        "alpha ", "beta ", "gamma ", "delta ", "log ", "line ", "error ", "ok\n",
    ];
    let noise = prng_bytes(3, 16 << 20);
    let data: Vec<u8> = noise
        .iter()
        .flat_map(|b| words[(*b & 7) as usize].bytes())
        .collect();
    std::fs::write(&src, data).unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let archive = out_dir.join("a.cka");
    let child = Command::new(bin())
        .args(["pack", "-c", "zstd:19", "-o"])
        .arg(&archive)
        .arg(&src)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let partial = || {
        std::fs::read_dir(&out_dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !partial() {
        assert!(std::time::Instant::now() < deadline, "pack never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(child.id(), rustix::process::Signal::TERM);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(!archive.exists());
    assert!(!partial(), "temporary shard left behind");
}

/// SIGTERM during `unpack`: exit 1 saying so, and every file left in the target is
/// complete (the files being written when the signal came are removed, not left at
/// their full size with missing data).
#[test]
fn interrupted_unpack_leaves_only_complete_files() {
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    const FILES: usize = 300;
    for i in 0..FILES {
        std::fs::write(src.join(format!("f{i:03}")), prng_bytes(i as u64, 1 << 20)).unwrap();
    }
    let archive = tmp.path().join("a.cka");
    ck_ok(&[
        std::ffi::OsStr::new("pack"),
        std::ffi::OsStr::new("-q"),
        std::ffi::OsStr::new("-c"),
        std::ffi::OsStr::new("none"),
        std::ffi::OsStr::new("-o"),
        archive.as_os_str(),
        src.as_os_str(),
    ]);
    let out_dir = tmp.path().join("out");
    let child = Command::new(bin())
        .args(["unpack", "-q", "--threads", "1", "--no-reflink", "-C"])
        .arg(&out_dir)
        .arg(&archive)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Files are written in batches of at most 128: once file 150 exists, the first batch
    // is complete and the second is being written.
    let marker = out_dir.join("src/f150");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "unpack never got going"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    signal(child.id(), rustix::process::Signal::TERM);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "unpack was not interrupted: {err}"
    );
    assert!(err.contains("interrupted"), "{err}");
    let mut kept = 0;
    for e in std::fs::read_dir(out_dir.join("src")).unwrap().flatten() {
        let got = std::fs::read(e.path()).unwrap();
        let want = std::fs::read(src.join(e.file_name())).unwrap();
        assert!(got == want, "{:?} was left incomplete", e.file_name());
        kept += 1;
    }
    assert!((128..FILES).contains(&kept), "{kept} files kept");
}

#[test]
fn a_rootfs_diff_unpack_selects_paths_inside_the_diff() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    std::fs::create_dir_all(upper.join("sub")).unwrap();
    std::fs::write(upper.join("sub/a"), b"in sub").unwrap();
    std::fs::write(upper.join("top"), b"at the top").unwrap();
    let archive = tmp.path().join("diff.cka");
    ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
        "--rootfs-diff".as_ref(),
        upper.as_os_str(),
    ] as &[&std::ffi::OsStr]);
    let target = tmp.path().join("target");
    std::fs::create_dir(&target).unwrap();
    // Paths are named as they land in the target: inside the diff, without `rootfs/`.
    ck_ok(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "--rootfs-diff".as_ref(),
        target.as_os_str(),
        "sub".as_ref(),
    ] as &[&std::ffi::OsStr]);
    assert_eq!(std::fs::read(target.join("sub/a")).unwrap(), b"in sub");
    assert!(
        !target.join("top").exists(),
        "an unselected file was extracted"
    );
    let r = ck(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "--rootfs-diff".as_ref(),
        target.as_os_str(),
        "rootfs/top".as_ref(),
    ] as &[&std::ffi::OsStr]);
    assert_eq!(r.status.code(), Some(1));
    assert!(
        stderr(&r).contains("is not in the archive"),
        "{}",
        stderr(&r)
    );
}
