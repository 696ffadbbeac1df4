//! Container rootfs diffs on a real overlayfs mount (root only): changes made through
//! the merged view — modified lower files, deletions, a directory deleted and created
//! again, chmod/chown of a directory, sparse files, hard links, xattrs — are packed from
//! the upper directory and applied onto a copy of the lower layer, which must then equal
//! the merged view exactly. These are the cases podman's rootfs-diff gets wrong.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::support::*;

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn build_lower(lower: &Path) {
    fs::create_dir_all(lower.join("app")).unwrap();
    fs::create_dir_all(lower.join("opt/recreate/sub")).unwrap();
    fs::create_dir_all(lower.join("data")).unwrap();
    fs::create_dir_all(lower.join("tree/deep/er")).unwrap();
    fs::create_dir_all(lower.join("etc")).unwrap();
    fs::write(lower.join("app/existing.txt"), b"original").unwrap();
    fs::write(lower.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(lower.join("opt/recreate/old.txt"), b"old").unwrap();
    fs::write(lower.join("opt/recreate/sub/older.txt"), b"older").unwrap();
    fs::write(lower.join("todelete.txt"), b"bye").unwrap();
    fs::write(lower.join("tree/deep/er/file"), b"gone with its tree").unwrap();
    fs::write(lower.join("app/big"), prng_bytes(9, 3 << 20)).unwrap();
    fs::set_permissions(lower.join("data"), fs::Permissions::from_mode(0o755)).unwrap();
}

fn change_through_merged(m: &Path) {
    fs::write(m.join("app/existing.txt"), b"modified in the container").unwrap();
    sh(&format!(
        "echo 'app:x:1000:1000::/app:/bin/sh' >> {}",
        m.join("etc/passwd").display()
    ));
    fs::remove_file(m.join("todelete.txt")).unwrap();
    fs::remove_dir_all(m.join("tree")).unwrap();
    fs::remove_dir_all(m.join("opt/recreate")).unwrap();
    fs::create_dir(m.join("opt/recreate")).unwrap();
    fs::write(m.join("opt/recreate/newfile"), b"new").unwrap();
    fs::set_permissions(m.join("data"), fs::Permissions::from_mode(0o700)).unwrap();
    rustix::fs::chown(
        m.join("data"),
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(1000)),
    )
    .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(m.join("data/sparse")).unwrap();
        f.set_len(100 << 20).unwrap();
        f.write_all_at(b"middle", 50 << 20).unwrap();
    }
    fs::write(m.join("data/linked"), b"two names").unwrap();
    fs::hard_link(m.join("data/linked"), m.join("app/other-name")).unwrap();
    std::os::unix::fs::symlink("../app/existing.txt", m.join("data/link")).unwrap();
    set_xattr(&m.join("app/existing.txt"), "user.note", b"xattr survives");
    // Modify part of a big lower file: the whole file is copied up.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.join("app/big"))
            .unwrap();
        f.write_all_at(b"patched", 1 << 20).unwrap();
    }
}

/// `ckstream unpack --rootfs-diff TARGET` of `archive`, then TARGET must equal the
/// manifest of the merged view (paths first, for a readable failure).
fn apply_and_compare(
    archive: &Path,
    target: &Path,
    expected: &std::collections::BTreeMap<Vec<u8>, Record>,
    codec: &str,
) {
    ck_ok(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "--rootfs-diff".as_ref(),
        target.as_os_str(),
    ] as &[&OsStr]);
    let got = manifest(target);
    let keys = |m: &std::collections::BTreeMap<Vec<u8>, Record>| {
        m.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(expected), keys(&got));
    for (k, v) in expected {
        assert_eq!(
            v,
            &got[k],
            "{codec}: {} differs from the merged view",
            String::from_utf8_lossy(k)
        );
    }
}

fn rootfs_round_trip(codec: &str) {
    if !need_root("rootfs_diff") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper, work, merged) = (
        tmp.path().join("lower"),
        tmp.path().join("upper"),
        tmp.path().join("work"),
        tmp.path().join("merged"),
    );
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
    }
    build_lower(&lower);
    sh(&format!(
        "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {}",
        lower.display(),
        upper.display(),
        work.display(),
        merged.display()
    ));
    change_through_merged(&merged);
    let expected = manifest(&merged);
    sh(&format!("umount {}", merged.display()));
    // The upper dir really holds what podman mishandles: a whiteout and an opaque dir.
    let st = fs::symlink_metadata(upper.join("todelete.txt")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &st.file_type()
    ));
    assert!(rustix::fs::lgetxattr(
        upper.join("opt/recreate"),
        "trusted.overlay.opaque",
        &mut [0u8; 8][..]
    )
    .is_ok());

    let archive = tmp.path().join("diff.cka");
    ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-c".as_ref(),
        codec.as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
        "--rootfs-diff".as_ref(),
        upper.as_os_str(),
    ] as &[&OsStr]);
    let target = tmp.path().join("target");
    sh(&format!("cp -a {} {}", lower.display(), target.display()));
    apply_and_compare(&archive, &target, &expected, codec);
    assert!(
        allocated(&target.join("data/sparse")) < 1 << 20,
        "sparse file came back allocated"
    );
    assert!(!target.join("opt/recreate/old.txt").exists());
}

cases!(rootfs_round_trip:
    rootfs_diff_applies_like_the_merged_view_zstd("zstd"),
    rootfs_diff_applies_like_the_merged_view_raw("none"),
);

#[test]
fn rootfs_diff_refuses_to_delete_through_a_symlink_in_the_target() {
    if !need_root("rootfs_diff_symlink") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir_all(upper.join("etc")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        upper.join("etc/shadow"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
    let archive = tmp.path().join("d.cka");
    ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
        "--rootfs-diff".as_ref(),
        upper.as_os_str(),
    ] as &[&OsStr]);
    // The target's etc is a symlink to a directory outside it: the whiteout must not
    // delete the file it points at.
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("shadow"), b"keep me").unwrap();
    let target = tmp.path().join("target");
    fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("etc")).unwrap();
    let out = ck(&[
        "unpack".as_ref(),
        archive.as_os_str(),
        "--rootfs-diff".as_ref(),
        target.as_os_str(),
    ] as &[&OsStr]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(fs::read(outside.join("shadow")).unwrap(), b"keep me");
}

/// A lower layer for the metacopy tests: files to chmod/chown (metadata-only copy-ups),
/// directories and a file to rename (redirects), beside what `build_lower` has.
fn build_metacopy_lower(lower: &Path) {
    build_lower(lower);
    fs::create_dir_all(lower.join("meta")).unwrap();
    fs::write(lower.join("meta/chmod-me"), prng_bytes(11, (3 << 20) + 5)).unwrap();
    fs::write(lower.join("meta/chown-me"), b"owned by someone else soon").unwrap();
    set_xattr(
        &lower.join("meta/chown-me"),
        "user.lower",
        b"copied up with the metadata",
    );
    fs::write(lower.join("meta/rename-me"), prng_bytes(12, 70_000)).unwrap();
    fs::write(
        lower.join("meta/rename-then-write"),
        b"renamed, then appended to",
    )
    .unwrap();
    fs::create_dir_all(lower.join("moved-from/sub/deeper")).unwrap();
    fs::write(lower.join("moved-from/kept"), b"comes from the lower layer").unwrap();
    fs::write(
        lower.join("moved-from/to-delete"),
        b"deleted after the rename",
    )
    .unwrap();
    fs::write(lower.join("moved-from/to-chmod"), prng_bytes(13, 9000)).unwrap();
    fs::write(
        lower.join("moved-from/sub/deeper/file"),
        b"deep in a renamed dir",
    )
    .unwrap();
    fs::set_permissions(
        lower.join("moved-from/sub"),
        fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    fs::create_dir_all(lower.join("nest/inner")).unwrap();
    fs::write(
        lower.join("nest/inner/f"),
        b"renamed into another directory",
    )
    .unwrap();
}

fn change_metacopy_through_merged(m: &Path) {
    fs::set_permissions(m.join("meta/chmod-me"), fs::Permissions::from_mode(0o640)).unwrap();
    rustix::fs::chown(
        m.join("meta/chown-me"),
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(1001)),
    )
    .unwrap();
    fs::rename(m.join("meta/rename-me"), m.join("renamed-file")).unwrap();
    // Renamed (metacopy + redirect), then written: a full copy-up that keeps its redirect.
    fs::rename(
        m.join("meta/rename-then-write"),
        m.join("written-after-rename"),
    )
    .unwrap();
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m.join("written-after-rename"))
            .unwrap();
        f.write_all(b" and more").unwrap();
    }
    // A renamed directory (relative redirect), then changes inside it.
    fs::rename(m.join("moved-from"), m.join("moved-to")).unwrap();
    fs::remove_file(m.join("moved-to/to-delete")).unwrap();
    fs::set_permissions(
        m.join("moved-to/to-chmod"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::write(m.join("moved-to/sub/added"), b"new in the renamed dir").unwrap();
    // Renamed into another directory (absolute redirect).
    fs::rename(m.join("nest/inner"), m.join("data/inner-moved")).unwrap();
}

fn sh_status(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .status()
        .is_ok_and(|s| s.success())
}

/// Metacopy files and redirected directories are stored from the merged view (found by
/// its upperdir= in mountinfo; the paths contain a space, which mountinfo escapes, and
/// UPPER is given relative and through a symlink) and applied onto a copy of the lower
/// layer, which then equals the merged view exactly. Without the merged view, pack
/// refuses (exit 1) and writes nothing.
fn metacopy_round_trip(codec: &str) {
    if !need_root("rootfs_metacopy") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("with space");
    let (lower, upper, work, merged) = (
        base.join("lower"),
        base.join("upper"),
        base.join("work"),
        base.join("merged"),
    );
    build_metacopy_lower(&lower);
    let mount = mount_metacopy_overlay(&lower, &upper, &work, &merged);
    change_through_merged(&merged);
    change_metacopy_through_merged(&merged);
    let expected = manifest(&merged);
    // The upper dir really holds metacopy files and redirected directories.
    for (p, x) in [
        ("meta/chmod-me", "trusted.overlay.metacopy"),
        ("meta/chown-me", "trusted.overlay.metacopy"),
        ("renamed-file", "trusted.overlay.redirect"),
        ("moved-to", "trusted.overlay.redirect"),
        ("moved-to/to-chmod", "trusted.overlay.metacopy"),
        ("data/inner-moved", "trusted.overlay.redirect"),
        ("written-after-rename", "trusted.overlay.redirect"),
    ] {
        assert!(has_xattr(&upper.join(p), x), "{p} has no {x}");
    }
    // No data blocks (at most an xattr block).
    assert!(allocated(&upper.join("meta/chmod-me")) <= 4096);

    // UPPER relative to the working directory and through a symlink.
    std::os::unix::fs::symlink(&base, tmp.path().join("link")).unwrap();
    let archive = tmp.path().join("diff.cka");
    let out = Command::new(bin())
        .current_dir(tmp.path())
        .args(["pack", "-q", "-c", codec, "-o"])
        .arg(&archive)
        .args(["--rootfs-diff", "link/upper/"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let listing: serde_json::Value = serde_json::from_slice(
        &ck_ok(&["ls".as_ref(), "--json".as_ref(), archive.as_os_str()] as &[&OsStr]).stdout,
    )
    .unwrap();
    let entries = listing.as_array().unwrap();
    for e in entries {
        for x in e["xattrs"].as_array().unwrap() {
            let x = x.as_str().unwrap();
            assert!(
                !x.ends_with("overlay.metacopy") && !x.ends_with("overlay.redirect"),
                "{} keeps {x}",
                e["path"]
            );
        }
    }
    let entry = |p: &str| {
        entries
            .iter()
            .find(|e| e["path"] == p)
            .unwrap_or_else(|| panic!("{p} not in the archive"))
    };
    assert_eq!(entry("rootfs/meta/chmod-me")["size"], (3 << 20) + 5);
    assert!(entry("rootfs/moved-to")["xattrs"]
        .as_array()
        .unwrap()
        .contains(&"trusted.overlay.opaque".into()));
    // The renamed directory is complete: its lower contents are in the archive.
    entry("rootfs/moved-to/sub/deeper/file");
    entry("rootfs/data/inner-moved/f");

    if codec == "none" {
        // The same with the merged view named explicitly.
        let explicit = tmp.path().join("explicit.cka");
        ck_ok(&[
            "pack".as_ref(),
            "-q".as_ref(),
            "-c".as_ref(),
            codec.as_ref(),
            "-o".as_ref(),
            explicit.as_os_str(),
            "--rootfs-diff".as_ref(),
            upper.as_os_str(),
            "--rootfs-merged".as_ref(),
            merged.as_os_str(),
        ] as &[&OsStr]);
        let paths = |a: &Path| {
            String::from_utf8(ck_ok(&["ls".as_ref(), a.as_os_str()] as &[&OsStr]).stdout).unwrap()
        };
        assert_eq!(paths(&archive), paths(&explicit));
        // A directory that is not that overlay's merged view is refused.
        let out = ck(&[
            "pack".as_ref(),
            "-q".as_ref(),
            "-o".as_ref(),
            tmp.path().join("wrong.cka").as_os_str(),
            "--rootfs-diff".as_ref(),
            upper.as_os_str(),
            "--rootfs-merged".as_ref(),
            lower.as_os_str(),
        ] as &[&OsStr]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("not a mounted overlayfs"),
            "{}",
            stderr(&out)
        );
    }
    drop(mount);

    let target = tmp.path().join("target");
    assert!(sh_status(&format!(
        "cp -a '{}' '{}'",
        lower.display(),
        target.display()
    )));
    apply_and_compare(&archive, &target, &expected, codec);

    // The overlay is unmounted now: no merged view, so pack refuses.
    let refused = tmp.path().join("refused.cka");
    let out = ck(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-c".as_ref(),
        codec.as_ref(),
        "-o".as_ref(),
        refused.as_os_str(),
        "--rootfs-diff".as_ref(),
        upper.as_os_str(),
    ] as &[&OsStr]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("metadata-only copy-up") || err.contains("renamed directory"),
        "{err}"
    );
    assert!(err.contains("--rootfs-merged"), "{err}");
    assert!(err.contains(&*upper.to_string_lossy()), "{err}");
    assert!(!refused.exists());
}

#[test]
fn rootfs_diff_with_metacopy_and_redirects_applies_like_the_merged_view_zstd() {
    metacopy_round_trip("zstd");
}

#[test]
fn rootfs_diff_with_metacopy_and_redirects_applies_like_the_merged_view_raw() {
    metacopy_round_trip("none");
}

/// An overlay mounted with relative paths (as podman's storage does when the layer list
/// is long): mountinfo then shows `upperdir=upper`, relative to a directory that is gone.
/// The merged view is still found for the real upper dir (its path ends with that and
/// the merged root shows its attributes), but not for another directory of the same
/// name and layout, which is refused.
#[test]
fn relative_upperdir_in_mountinfo_is_matched_by_suffix_and_attributes() {
    if !need_root("rootfs_relative_upperdir") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    fs::create_dir_all(base.join("lower/d")).unwrap();
    for d in ["upper", "work", "merged"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    fs::write(base.join("lower/f"), prng_bytes(5, 100_000)).unwrap();
    fs::write(base.join("lower/d/x"), b"x").unwrap();
    sh(&format!(
        "cd '{}' && mount -t overlay overlay -o lowerdir=lower,upperdir=upper,workdir=work,metacopy=on merged",
        base.display()
    ));
    let _mount = OverlayMount(base.join("merged"));
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(info.contains(",upperdir=upper,"), "{info}");
    let merged = base.join("merged");
    fs::set_permissions(merged.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(merged.join("d"), merged.join("d2")).unwrap();
    fs::write(merged.join("new"), b"new").unwrap();
    let expected = manifest(&merged);
    assert!(has_xattr(&base.join("upper/f"), "trusted.overlay.metacopy"));

    // A directory that is not the overlay's upper dir, with the same names and types.
    let decoy = tmp.path().join("decoy/upper");
    fs::create_dir_all(decoy.join("d2")).unwrap();
    fs::File::create(decoy.join("f"))
        .unwrap()
        .set_len(100_000)
        .unwrap();
    set_xattr(&decoy.join("f"), "trusted.overlay.metacopy", b"");
    fs::write(decoy.join("new"), b"new").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        decoy.join("d"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
    let out = ck(&[
        "pack".as_ref(),
        "-o".as_ref(),
        tmp.path().join("decoy.cka").as_os_str(),
        "--rootfs-diff".as_ref(),
        decoy.as_os_str(),
    ] as &[&OsStr]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no mounted overlay"),
        "{}",
        stderr(&out)
    );

    let archive = tmp.path().join("diff.cka");
    ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
        "--rootfs-diff".as_ref(),
        base.join("upper").as_os_str(),
    ] as &[&OsStr]);
    let target = tmp.path().join("target");
    sh(&format!(
        "cp -a '{}' '{}'",
        base.join("lower").display(),
        target.display()
    ));
    ck_ok(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "--rootfs-diff".as_ref(),
        target.as_os_str(),
    ] as &[&OsStr]);
    assert_eq!(manifest(&target), expected);
}
