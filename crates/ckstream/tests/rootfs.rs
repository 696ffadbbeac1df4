//! Container rootfs diffs on a real overlayfs mount (root only): changes made through
//! the merged view — modified lower files, deletions, a directory deleted and created
//! again, chmod/chown of a directory, sparse files, hard links, xattrs — are packed from
//! the upper directory and applied onto a copy of the lower layer, which must then equal
//! the merged view exactly. These are the cases podman's rootfs-diff gets wrong.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

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
    ck_ok(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        archive.as_os_str(),
        "--rootfs-diff".as_ref(),
        target.as_os_str(),
    ] as &[&OsStr]);
    let got = manifest(&target);
    let keys = |m: &std::collections::BTreeMap<Vec<u8>, Record>| {
        m.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&expected), keys(&got));
    for (k, v) in &expected {
        assert_eq!(
            v,
            &got[k],
            "{codec}: {} differs from the merged view",
            String::from_utf8_lossy(k)
        );
    }
    assert!(
        allocated(&target.join("data/sparse")) < 1 << 20,
        "sparse file came back allocated"
    );
    assert!(!target.join("opt/recreate/old.txt").exists());
}

#[test]
fn rootfs_diff_applies_like_the_merged_view_zstd() {
    rootfs_round_trip("zstd");
}

#[test]
fn rootfs_diff_applies_like_the_merged_view_raw() {
    rootfs_round_trip("none");
}

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
