//! Shared helpers for the integration tests: running the real binary, building trees
//! with every file type, comparing trees by a full metadata manifest, loopback
//! filesystems, and (submodules) the memtest workload, the local S3 server and the
//! EIO-injecting FUSE filesystem.

pub mod eiofs;
pub mod fiemap;
pub mod memtest;
pub mod s3server;

/// One `#[test]` per case of a parameterized test:
/// `cases!(round_trip: round_trip_none_1_shard("none", 1), ...)`.
macro_rules! cases {
    ($f:ident: $($name:ident($($arg:expr),*)),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $f($($arg),*)
            }
        )*
    };
}

/// The names in `dir`, sorted (what a test expects to be left there).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ckstream"))
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// True when privileged tests must run (CI sets CKSTREAM_REQUIRE_PRIVILEGED=1 via `make test`).
pub fn privileged_required() -> bool {
    std::env::var("CKSTREAM_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
}

/// Skips (returns false) on a developer machine without root; fails in CI.
pub fn need_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        !privileged_required(),
        "{test} needs root, and CKSTREAM_REQUIRE_PRIVILEGED=1"
    );
    eprintln!("skipping {test}: needs root");
    false
}

/// True when `program --version` runs; otherwise skips (returns false) on a developer
/// machine and fails in CI, naming `hint` (how to install it).
pub fn need_tool(test: &str, program: impl AsRef<OsStr>, hint: &str) -> bool {
    let program = program.as_ref();
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !privileged_required(),
            "{test}: {} not found; {hint}",
            program.to_string_lossy()
        );
        eprintln!("skipping {test}: {} not found", program.to_string_lossy());
    }
    ok
}

/// Sends `sig` to process `pid`, which must exist.
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), sig)
        .unwrap();
}

pub fn run(args: &[&OsStr]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run ckstream")
}

pub fn ck<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(bin())
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("run ckstream")
}

/// Runs ckstream and asserts success.
pub fn ck_ok<S: AsRef<OsStr>>(args: &[S]) -> Output {
    let out = ck(args);
    assert!(
        out.status.success(),
        "ckstream {:?} failed: {}\n{}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn prng_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn set_mtime(path: &Path, ns: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

/// Builds a tree with every file type ckstream supports. Ownership, devices and
/// trusted xattrs only when running as root.
pub fn make_tree(root: &Path) {
    let root_user = is_root();
    fs::create_dir_all(root.join("dir/nested/deeper")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    fs::create_dir_all(root.join("sticky")).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("one-byte"), b"x").unwrap();
    for (name, len) in [
        ("4095", 4095usize),
        ("4096", 4096),
        ("4097", 4097),
        ("mib-plus-3", (1 << 20) + 3),
    ] {
        fs::write(root.join("dir").join(name), prng_bytes(len as u64, len)).unwrap();
    }
    fs::write(
        root.join("dir/nested/random-3.5m"),
        prng_bytes(7, 3 * (1 << 20) + (1 << 19)),
    )
    .unwrap();
    let text: String = (0..60_000)
        .map(|i| format!("line {i} of a very compressible file\n"))
        .collect();
    fs::write(root.join("dir/nested/deeper/text.txt"), &text).unwrap();
    // Sparse: 24 MiB with data at three places.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(root.join("sparse")).unwrap();
        f.set_len(24 << 20).unwrap();
        f.write_all_at(&prng_bytes(1, 5000), 0).unwrap();
        f.write_all_at(&prng_bytes(2, 70_000), 9 << 20).unwrap();
        f.write_all_at(b"tail", (24 << 20) - 4).unwrap();
    }
    // A file whose content is all zeros but fully allocated.
    fs::write(root.join("zeros"), vec![0u8; 3 << 20]).unwrap();
    symlink("dir/4096", root.join("rel-link")).unwrap();
    symlink("/etc/passwd", root.join("abs-link")).unwrap();
    symlink("does/not/exist", root.join("dangling-link")).unwrap();
    symlink("../4095", root.join("dir/nested/up-link")).unwrap();
    fs::write(root.join("dir/hardlinked"), b"shared by two names").unwrap();
    fs::hard_link(
        root.join("dir/hardlinked"),
        root.join("dir/nested/second-name"),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    let _ = std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap();
    let long = "L".repeat(255);
    fs::write(root.join(&long), b"long name").unwrap();
    let mut deep = root.to_path_buf();
    for i in 0..12 {
        deep.push(format!("{i:02}-{}", "d".repeat(90)));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("deep-file"), b"deep").unwrap();
    fs::write(root.join(OsStr::from_bytes(b"non-utf8-\xff\xfe")), b"bytes").unwrap();
    fs::write(root.join("setuid"), b"#!/bin/true\n").unwrap();
    fs::write(root.join("private"), b"secret").unwrap();
    set_xattr(
        &root.join("dir/4097"),
        "user.checkpoint",
        b"value with \0 nul",
    );
    set_xattr(&root.join("dir"), "user.dirattr", b"d");
    if root_user {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("null-dev"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("block-dev"),
            rustix::fs::FileType::BlockDevice,
            rustix::fs::Mode::from_raw_mode(0o660),
            rustix::fs::makedev(7, 200),
        )
        .unwrap();
        // An overlay whiteout is a 0/0 character device.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("whiteout"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0),
            rustix::fs::makedev(0, 0),
        )
        .unwrap();
        set_xattr(&root.join("empty-dir"), "trusted.overlay.opaque", b"y");
        set_xattr(&root.join("abs-link"), "trusted.linkattr", b"on a symlink");
        rustix::fs::chownat(
            rustix::fs::CWD,
            root.join("dir/4095"),
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(5678)),
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
        rustix::fs::chownat(
            rustix::fs::CWD,
            root.join("rel-link"),
            Some(rustix::fs::Uid::from_raw(42)),
            Some(rustix::fs::Gid::from_raw(43)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        rustix::fs::chownat(
            rustix::fs::CWD,
            root.join("dir/nested"),
            Some(rustix::fs::Uid::from_raw(1000)),
            Some(rustix::fs::Gid::from_raw(1000)),
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
        rustix::fs::chownat(
            rustix::fs::CWD,
            root.join("setuid"),
            Some(rustix::fs::Uid::from_raw(0)),
            Some(rustix::fs::Gid::from_raw(7)),
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
    }
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("dir/nested"), fs::Permissions::from_mode(0o2750)).unwrap();
    fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    // Distinct nanosecond mtimes, set last (children first so directory times stick).
    let mut n = 0i64;
    let mut all: Vec<PathBuf> = walk(root);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in all {
        n += 1;
        set_mtime(&p, 1_600_000_000_000_000_000 + n * 1_000_001_007);
    }
    set_mtime(&root.join("one-byte"), 315_532_800_123_456_789); // 1980
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        let m = fs::symlink_metadata(&p).unwrap();
        out.push(p.clone());
        if m.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

/// Everything ckstream promises to restore about one path.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Record {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub rdev: u64,
    pub link: Option<Vec<u8>>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub content: Option<[u8; 32]>,
    /// Paths (relative) sharing this inode, sorted; for hardlink checks.
    pub hardlink_group: Vec<Vec<u8>>,
}

fn xattrs_of(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap_or(0);
    names.truncate(n);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut v = vec![0u8; 65536];
        let k = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut v[..]).unwrap();
        v.truncate(k);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// Manifest of a tree: relative path → record.
pub fn manifest(root: &Path) -> BTreeMap<Vec<u8>, Record> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    for p in walk(root) {
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_file() {
            "file"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_char_device() {
            "chardev"
        } else {
            "blockdev"
        };
        if ft.is_file() && m.nlink() > 1 {
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(rel.clone());
        }
        out.insert(
            rel,
            Record {
                kind,
                mode: if ft.is_symlink() {
                    0
                } else {
                    m.mode() & 0o7777
                },
                uid: m.uid(),
                gid: m.gid(),
                size: if ft.is_dir() { 0 } else { m.size() },
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                rdev: m.rdev(),
                link: ft
                    .is_symlink()
                    .then(|| fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
                xattrs: xattrs_of(&p),
                content: ft
                    .is_file()
                    .then(|| *blake3::hash(&fs::read(&p).unwrap()).as_bytes()),
                hardlink_group: Vec::new(),
            },
        );
    }
    for (_, mut group) in inodes {
        group.sort();
        for p in &group {
            out.get_mut(p).unwrap().hardlink_group = group.clone();
        }
    }
    out
}

/// Asserts two manifests are equal, reporting the first difference readably.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let ma = manifest(a);
    let mb = manifest(b);
    let ka: Vec<_> = ma
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let kb: Vec<_> = mb
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(ka, kb, "different sets of paths");
    for (k, ra) in &ma {
        assert_eq!(ra, &mb[k], "difference at {}", String::from_utf8_lossy(k));
    }
}

/// Allocated bytes of a file.
pub fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// A loop-mounted filesystem image, unmounted and deleted on drop.
pub struct LoopFs {
    pub image: PathBuf,
    pub mount: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl LoopFs {
    pub fn new(kind: &str) -> Option<LoopFs> {
        let mkfs = format!("mkfs.{kind}");
        if !need_root(&format!("reflink on {kind}")) {
            return None;
        }
        if !have(&mkfs) {
            assert!(
                !privileged_required(),
                "{mkfs} missing; scripts/install-deps.sh installs it"
            );
            eprintln!("skipping: {mkfs} missing");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("ckstream-loop-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let image = dir.path().join(format!("{kind}.img"));
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        fs::File::create(&image).unwrap().set_len(8 << 30).unwrap();
        let mut mk = Command::new(&mkfs);
        if kind == "xfs" {
            mk.args(["-q", "-m", "reflink=1"]);
        } else {
            mk.arg("-q");
        }
        let out = mk.arg(&image).output().unwrap();
        assert!(
            out.status.success(),
            "{mkfs}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(LoopFs {
            image,
            mount,
            _dir: dir,
        })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // -R: podman's overlay driver leaves a private bind mount of its storage inside.
        if !Command::new("umount")
            .arg("-R")
            .arg(&self.mount)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Path of shard `i` of the local archive `archive` (shards 1.. are named by the
/// archive id, which shard 0's header holds).
pub fn shard_file(archive: &Path, i: u32) -> PathBuf {
    ckstream_store::local_shard_paths(archive).unwrap()[i as usize].clone()
}

/// Opens a local archive with the library, as the binary does.
pub fn open_archive(archive: &Path) -> ckstream_format::ArchiveReader {
    ckstream_store::ArchiveLocation::Path(archive.to_path_buf())
        .open(&std::env::temp_dir())
        .unwrap()
}

/// True when `p` (not followed) has xattr `name`.
pub fn has_xattr(p: &Path, name: &str) -> bool {
    rustix::fs::lgetxattr(p, name, &mut [0u8; 256][..]).is_ok()
}

/// An overlayfs mount (of the merged view); unmounted on drop, so a failing test leaves no overlay behind.
pub struct OverlayMount(pub PathBuf);

impl Drop for OverlayMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts an overlay of `lower` with `metacopy=on,redirect_dir=on` at `merged`
/// (creating `upper`, `work` and `merged`): a chmod/chown or rename of a lower file
/// then copies up only metadata, a renamed lower directory gets `overlay.redirect`.
pub fn mount_metacopy_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    merged: &Path,
) -> OverlayMount {
    for d in [upper, work, merged] {
        fs::create_dir_all(d).unwrap();
    }
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={},metacopy=on,redirect_dir=on",
            lower.display(),
            upper.display(),
            work.display()
        ))
        .arg(merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mounting an overlay with metacopy=on,redirect_dir=on: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    OverlayMount(merged.to_path_buf())
}

/// A [`make_tree`] at `dir/src` packed into `dir/a.cka` with `ckstream pack -q ARGS`
/// (`.=src`: its contents at the archive root). Returns (src, archive).
pub fn packed_tree(dir: &Path, args: &[&str]) -> (PathBuf, PathBuf) {
    let src = dir.join("src");
    make_tree(&src);
    let archive = dir.join("a.cka");
    let mut cmd: Vec<std::ffi::OsString> = vec!["pack".into(), "-q".into()];
    cmd.extend(args.iter().map(|a| a.into()));
    cmd.extend(["-o".into(), archive.clone().into_os_string()]);
    cmd.push(format!(".={}", src.display()).into());
    ck_ok(&cmd);
    (src, archive)
}
