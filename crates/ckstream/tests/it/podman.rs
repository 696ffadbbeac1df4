//! Real podman containers (root; podman 4.3.1 + runc + CRIU 4.1 from the project's
//! install scripts): checkpoint with ckstream in both formats, restore with podman,
//! and compare the container's filesystem and memory with what they were.

use std::cell::RefCell;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::support::*;

mod trust;

const IMAGE: &str = "localhost/ckstream-memtest";

thread_local! {
    /// A private podman storage.conf for the current test (tests run on their own threads).
    static STORAGE_CONF: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// Applies the current test's podman storage, if it has its own.
fn in_storage(cmd: &mut Command) -> &mut Command {
    if let Some(conf) = STORAGE_CONF.with(|s| s.borrow().clone()) {
        cmd.env("CONTAINERS_STORAGE_CONF", conf);
    }
    cmd
}

fn build_image() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/podman-test-image.sh");
    let out = in_storage(Command::new("bash").arg(script))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the test image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have_podman(test: &str) -> bool {
    if !need_root(test) {
        return false;
    }
    if !need_tool(
        test,
        "podman",
        "scripts/install-deps.sh --with-podman installs it",
    ) {
        return false;
    }
    build_image();
    true
}

fn podman(args: &[&str]) -> Output {
    in_storage(Command::new("podman").args(args))
        .output()
        .expect("run podman")
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the container when the test ends, even on failure.
struct Ctr(String);

impl Drop for Ctr {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}

fn sh(ctr: &str, script: &str) -> String {
    podman_ok(&["exec", ctr, "/bin/sh", "-c", script])
}

/// Starts memtest (64 MiB + one child) in a new container without a network and waits
/// for its heartbeat. (A restore reclaims the container's old IP; tests running in
/// parallel on the shared CNI network could take it in between.)
fn start(name: &str) -> Ctr {
    start_with_network(name, "none")
}

/// As [`start`], on podman's default bridge network (`"podman"`) or none.
fn start_with_network(name: &str, network: &str) -> Ctr {
    start_image(name, network, IMAGE)
}

/// As [`start`], from another image built on the test image.
fn start_from(name: &str, image: &str) -> Ctr {
    start_image(name, "none", image)
}

fn start_image(name: &str, network: &str, image: &str) -> Ctr {
    let _ = podman(&["rm", "-f", "-t", "0", name]);
    podman_ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--network",
        network,
        image,
        "/bin/memtest",
        "64",
        "/tmp/hb",
        "1",
    ]);
    let ctr = Ctr(name.to_string());
    wait_heartbeat(name);
    ctr
}

fn heartbeat(ctr: &str) -> Option<u64> {
    let out = podman(&["exec", ctr, "/bin/cat", "/tmp/hb"]);
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn wait_heartbeat(ctr: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(n) = heartbeat(ctr) {
            return n;
        }
        assert!(Instant::now() < deadline, "{ctr}: no heartbeat");
        sleep(Duration::from_millis(200));
    }
}

/// The process runs on (heartbeat advances) and its memory checksums still match.
fn assert_alive_and_intact(ctr: &str) {
    let a = wait_heartbeat(ctr);
    let deadline = Instant::now() + Duration::from_secs(30);
    while heartbeat(ctr).unwrap_or(0) <= a {
        assert!(Instant::now() < deadline, "{ctr}: heartbeat stuck at {a}");
        sleep(Duration::from_millis(100));
    }
    sh(ctr, "rm -f /tmp/hb.verify; kill -USR1 1");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = podman(&["exec", ctr, "/bin/cat", "/tmp/hb.verify"]);
        let text = String::from_utf8_lossy(&v.stdout).into_owned();
        if text.starts_with("verify=") {
            assert!(
                text.starts_with("verify=ok"),
                "{ctr}: memory check failed: {text}"
            );
            assert!(text.contains("children_ok=1/1"), "{ctr}: {text}");
            return;
        }
        assert!(Instant::now() < deadline, "{ctr}: no verify result");
        sleep(Duration::from_millis(100));
    }
}

/// Every kind of rootfs change podman itself gets wrong or right.
const CHANGES: &str = "set -e
echo modified >> /app/existing.txt
rm /data/delete-me.txt
rm -rf /opt/gone
rm -rf /opt/recreate; mkdir /opt/recreate; echo new > /opt/recreate/new.txt
chmod 700 /data; chown 7:8 /opt
truncate -s 50M /data/sparse; echo tail >> /data/sparse
dd if=/dev/urandom of=/data/big bs=1M count=12 2>/dev/null
echo x > /data/a; ln /data/a /data/b
ln -s ../app/existing.txt /data/link
mkfifo /data/fifo
mkdir -p /new/deep/dir; echo deep > /new/deep/dir/f; chmod 751 /new/deep
";

/// Paths, types, modes, owners, sizes, file hashes and mtimes, symlink targets,
/// as seen inside the container (podman-managed mounts and memtest's files excluded).
const MANIFEST: &str = r#"find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path '/tmp/hb*' -o -path /etc/hosts -o -path /etc/hostname -o -path /etc/resolv.conf -o -path /etc/mtab \) -prune -o -print | sort | while read -r p; do
  if [ -L "$p" ]; then echo "$p link $(readlink "$p")";
  elif [ -f "$p" ]; then echo "$p $(stat -c '%f %u %g %s %Y %h' "$p") $(sha256sum < "$p" | cut -c1-16)";
  elif [ -d "$p" ]; then echo "$p $(stat -c '%f %u %g' "$p")";
  else echo "$p $(stat -c '%f %u %g' "$p")"; fi
done"#;

fn manifest(ctr: &str) -> String {
    sh(ctr, MANIFEST)
}

fn assert_same_manifest(before: &str, after: &str) {
    if before != after {
        let b: Vec<_> = before.lines().collect();
        let a: Vec<_> = after.lines().collect();
        let missing: Vec<_> = b.iter().filter(|l| !a.contains(l)).collect();
        let extra: Vec<_> = a.iter().filter(|l| !b.contains(l)).collect();
        panic!(
            "container filesystem differs after restore\n  lost: {missing:#?}\n  new: {extra:#?}"
        );
    }
}

/// How the test restores: podman itself, or `ckstream podman restore` with extra args.
enum RestoreVia<'a> {
    Podman,
    Ckstream(&'a [&'a str]),
}

fn checkpoint_restore_roundtrip(test: &str, format: &str, compress: &str, via: RestoreVia) {
    if !have_podman(test) {
        return;
    }
    let name = format!("ck-{test}");
    // One test on the default network: the restore must bring back its IP and MAC.
    let ctr = if format == "podman" && compress == "none" {
        start_with_network(&name, "podman")
    } else {
        start(&name)
    };
    sh(&name, CHANGES);
    let before = manifest(&name);
    assert!(before.contains("/opt/recreate/new.txt"), "{before}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(if format == "cka" {
        "ckpt.cka"
    } else {
        "ckpt.tar"
    });
    let o = ck_ok(&[
        "podman",
        "checkpoint",
        &name,
        "-o",
        out.to_str().unwrap(),
        "--format",
        format,
        "-c",
        compress,
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(summary["deleted_paths"].as_u64().unwrap() >= 3, "{summary}");
    // podman stopped the container; remove it so the import recreates it from scratch.
    podman_ok(&["rm", "-f", &name]);
    if format == "podman" {
        // GNU tar reads it without complaint.
        let t = Command::new("tar").arg("-tvf").arg(&out).output().unwrap();
        assert!(
            t.status.success() && t.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&t.stderr)
        );
        let listing = String::from_utf8_lossy(&t.stdout);
        for m in [
            "config.dump",
            "spec.dump",
            "checkpoint/inventory.img",
            "rootfs-diff.tar",
            "deleted.files",
        ] {
            assert!(listing.contains(m), "{m} missing:\n{listing}");
        }
        if compress == "none" {
            assert_aligned_members(&out);
        }
    } else {
        ck_ok(&["verify", out.to_str().unwrap()]);
    }
    match via {
        RestoreVia::Ckstream(extra) => {
            let mut args = vec!["podman", "restore", out.to_str().unwrap()];
            args.extend_from_slice(extra);
            ck_ok(&args);
        }
        RestoreVia::Podman => {
            podman_ok(&["container", "restore", "--import", out.to_str().unwrap()]);
        }
    }
    assert_alive_and_intact(&name);
    assert_same_manifest(&before, &manifest(&name));
    drop(ctr);
}

/// Every file of 4 KiB or more in the outer tar and in the nested rootfs-diff.tar
/// starts on a 4 KiB boundary.
fn assert_aligned_members(path: &Path) {
    let mut outer = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut checked = 0;
    for e in outer.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_path_buf();
        if e.header().entry_type().is_file() && e.size() >= 4096 {
            assert_eq!(e.raw_file_position() % 4096, 0, "{}", name.display());
            checked += 1;
        }
        if name == Path::new("rootfs-diff.tar") {
            let base = e.raw_file_position();
            let mut inner = tar::Archive::new(&mut e);
            for f in inner.entries().unwrap() {
                let f = f.unwrap();
                if f.header().entry_type().is_file() && f.size() >= 4096 {
                    assert_eq!((base + f.raw_file_position()) % 4096, 0);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 3, "only {checked} large members");
}

#[test]
fn podman_format_checkpoint_is_restored_by_podman_itself() {
    checkpoint_restore_roundtrip("podfmt", "podman", "none", RestoreVia::Podman);
}

#[test]
fn cka_checkpoint_is_restored_through_ckstream() {
    checkpoint_restore_roundtrip("ckafmt", "cka", "none", RestoreVia::Ckstream(&[]));
}

#[test]
fn podman_format_zstd_is_restored_by_podman_itself() {
    checkpoint_restore_roundtrip("podzst", "podman", "zstd", RestoreVia::Podman);
}

#[test]
fn podman_format_zstd_is_checked_and_restored_by_ckstream() {
    checkpoint_restore_roundtrip("podzck", "podman", "zstd", RestoreVia::Ckstream(&[]));
}

/// The fallback path: podman applies the diff from a converted rootfs-diff.tar.
#[test]
fn cka_zstd_checkpoint_restores_with_podman_applying_the_diff() {
    checkpoint_restore_roundtrip(
        "ckazst",
        "cka",
        "zstd",
        RestoreVia::Ckstream(&["--apply-diff", "podman"]),
    );
}

/// `podman checkpoint --parent`: a second checkpoint of a running container references
/// what the first stored (its unchanged file, most of its memory) and restores with its
/// memory intact and its rootfs as it was.
#[test]
fn an_incremental_podman_checkpoint_restores() {
    if !have_podman("incremental") {
        return;
    }
    let name = "ck-incremental";
    let ctr = start(name);
    sh(
        name,
        "dd if=/dev/urandom of=/data/big bs=1M count=8 2>/dev/null",
    );
    let dir = tempfile::tempdir().unwrap();
    let (g1, g2) = (dir.path().join("g1.cka"), dir.path().join("g2.cka"));
    let (g1, g2) = (g1.to_str().unwrap(), g2.to_str().unwrap());
    ck_ok(&["podman", "checkpoint", name, "--leave-running", "-o", g1]);
    sh(name, "echo more > /data/small");
    let before = manifest(name);
    let o = ck_ok(&[
        "podman",
        "checkpoint",
        name,
        "-o",
        g2,
        "--parent",
        g1,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let referenced = v["referenced_bytes"].as_u64().unwrap();
    assert!(referenced >= (8 + 32) << 20, "{v}");
    // Inspect and diff read the chain: the second checkpoint wrote /data/small.
    let seen = podman_inspect(name);
    let v = inspect_names_the_container(g2, &seen);
    let written = |v: &serde_json::Value, path: &str| {
        v["rootfs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["path"] == path && c["change"] == "written")
    };
    assert!(
        written(&v, "/data/small") && written(&v, "/data/big"),
        "{:#}",
        v["rootfs"]
    );
    let d: serde_json::Value =
        serde_json::from_slice(&ck_ok(&["diff", "--json", g1, g2]).stdout).unwrap();
    let changed: Vec<&str> = ["added", "modified"]
        .iter()
        .flat_map(|k| d["rootfs"][k].as_array().unwrap())
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert!(changed.contains(&"/data/small"), "{d:#}");
    assert!(!changed.contains(&"/data/big"), "{d:#}");
    podman_ok(&["rm", "-f", name]);
    ck_ok(&["podman", "restore", g2]);
    assert_alive_and_intact(name);
    assert_same_manifest(&before, &manifest(name));
    drop(ctr);
}

/// `ckstream inspect --json` of a container checkpoint: the summary names the container
/// as `podman inspect` did before the checkpoint (`seen`), and the tree holds processes.
fn inspect_names_the_container(archive: &str, seen: &serde_json::Value) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_slice(&ck_ok(&["inspect", "--json", archive]).stdout).unwrap();
    let c = &v["container"];
    assert_eq!(c["name"], seen["Name"], "{c:#}");
    assert_eq!(c["id"], seen["Id"], "{c:#}");
    assert_eq!(c["image"], seen["ImageName"], "{c:#}");
    let procs = v["criu"]["processes"].as_array().unwrap();
    assert!(!procs.is_empty(), "{v:#}");
    assert!(
        procs
            .iter()
            .all(|p| !p["comm"].as_str().unwrap().is_empty()),
        "{v:#}"
    );
    v
}

fn podman_inspect(name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&podman_ok(&["inspect", name])).unwrap();
    v[0].clone()
}

/// podman's own export → `ckstream podman import` → `.cka` → `ckstream podman export`
/// → `podman container restore --import`.
#[test]
fn podman_exports_convert_both_ways() {
    if !have_podman("convert") {
        return;
    }
    let name = "ck-convert";
    let ctr = start(name);
    sh(name, "echo kept > /data/kept; rm /data/delete-me.txt");
    let before = manifest(name);
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    // podman's default export: zstd-compressed tar.
    let seen = podman_inspect(name);
    podman_ok(&["container", "checkpoint", "-e", &p("podman.tar.zst"), name]);
    podman_ok(&["rm", "-f", name]);
    let o = ck_ok(&[
        "podman",
        "import",
        &p("podman.tar.zst"),
        "-o",
        &p("c.cka"),
        "-c",
        "zstd",
        "--json",
    ]);
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["deleted_paths"], 1, "{stats}");
    let ls = String::from_utf8_lossy(&ck_ok(&["ls", &p("c.cka")]).stdout).into_owned();
    for want in [
        "criu/inventory.img",
        "podman/config.dump",
        "rootfs/data/kept",
        "rootfs/data/delete-me.txt",
    ] {
        assert!(ls.contains(want), "{want} not in\n{ls}");
    }
    // Inspected from the index: podman's container, its changed and deleted paths.
    let v = inspect_names_the_container(&p("c.cka"), &seen);
    let change = |path: &str| {
        v["rootfs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["path"] == path)
            .map(|c| c["change"].as_str().unwrap().to_string())
    };
    assert_eq!(
        change("/data/kept").as_deref(),
        Some("written"),
        "{:#}",
        v["rootfs"]
    );
    assert_eq!(
        change("/data/delete-me.txt").as_deref(),
        Some("deleted"),
        "{:#}",
        v["rootfs"]
    );
    assert!(
        v["criu"]["stats"]["frozen_time_us"].as_u64().is_some(),
        "{:#}",
        v["criu"]
    );
    ck_ok(&["podman", "export", &p("c.cka"), "-o", &p("back.tar")]);
    // Through ckstream: its safety check walks the tar by seeking, then podman restores.
    ck_ok(&["podman", "restore", &p("back.tar")]);
    assert_alive_and_intact(name);
    assert_same_manifest(&before, &manifest(name));
    drop(ctr);
}

/// A tar header with an arbitrary (possibly hostile) name, which the tar crate's
/// builder would refuse to write.
fn raw_member(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.as_mut_bytes()[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// Exports hold process memory: `podman import` and `podman export` write them
/// owner-only (no podman needed: the export is built here).
#[test]
fn converted_archives_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let mut t = Vec::new();
    raw_member(&mut t, "config.dump", br#"{"name": "private"}"#);
    raw_member(&mut t, "spec.dump", b"{}");
    raw_member(&mut t, "checkpoint/pages-1.img", b"process memory");
    t.extend_from_slice(&[0u8; 1024]);
    std::fs::write(p("in.tar"), t).unwrap();
    ck_ok(&["podman", "import", &p("in.tar"), "-o", &p("c.cka")]);
    for (out, compress) in [("out.tar", "none"), ("out.tar.zst", "zstd")] {
        ck_ok(&[
            "podman",
            "export",
            &p("c.cka"),
            "-o",
            &p(out),
            "-c",
            compress,
        ]);
    }
    for name in ["c.cka", "out.tar", "out.tar.zst"] {
        let mode = std::fs::metadata(p(name)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "{name}: {mode:o}");
    }
}

#[test]
fn hostile_podman_archives_are_rejected_before_podman_sees_them() {
    if !have_podman("hostile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>); 2] = [
        ("deleted", {
            let mut t = Vec::new();
            raw_member(&mut t, "config.dump", b"{}");
            raw_member(&mut t, "spec.dump", b"{}");
            raw_member(
                &mut t,
                "deleted.files",
                br#"["/../../../../tmp/ckstream-victim"]"#,
            );
            t.extend_from_slice(&[0u8; 1024]);
            t
        }),
        ("rootfs", {
            let mut inner = Vec::new();
            raw_member(&mut inner, "../../escape", b"owned");
            inner.extend_from_slice(&[0u8; 1024]);
            let mut t = Vec::new();
            raw_member(&mut t, "config.dump", b"{}");
            raw_member(&mut t, "spec.dump", b"{}");
            raw_member(&mut t, "rootfs-diff.tar", &inner);
            t.extend_from_slice(&[0u8; 1024]);
            t
        }),
    ];
    for (what, bytes) in cases {
        let path = dir.path().join(format!("{what}.tar"));
        std::fs::write(&path, bytes).unwrap();
        let out = dir.path().join(format!("{what}.cka"));
        let o = ck(&[
            "podman",
            "import",
            path.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(3), "{what}: {}", stderr(&o));
        assert!(stderr(&o).contains("unsafe"), "{what}: {}", stderr(&o));
        assert!(!out.exists());
        let o = ck(&["podman", "restore", path.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(3), "{what}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains("podman could not restore"),
            "{what}: podman was called: {}",
            stderr(&o)
        );
    }
}

/// Container storage on a loopback XFS with the archive beside it: the container's
/// changed files and CRIU's pages are shared by reflink, not copied, in both formats.
#[test]
fn checkpoint_on_xfs_storage_shares_extents() {
    if !have_podman("xfs-reflink") {
        return;
    }
    let Some(fs) = LoopFs::new("xfs") else { return };
    let conf = fs.mount.join("storage.conf");
    std::fs::write(
        &conf,
        format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{0}/storage\"\nrunroot = \"{0}/run\"\n",
            fs.mount.display()
        ),
    )
    .unwrap();
    STORAGE_CONF.with(|s| *s.borrow_mut() = Some(conf.clone()));
    build_image();
    let name = "ck-xfs";
    for format in ["podman", "cka"] {
        let ctr = start(name);
        sh(
            name,
            "dd if=/dev/urandom of=/data/big bs=1M count=32 2>/dev/null",
        );
        let before = manifest(name);
        let out = fs.mount.join(format!("ckpt.{format}"));
        let o = in_storage(
            Command::new(bin())
                .args([
                    "podman",
                    "checkpoint",
                    name,
                    "--json",
                    "--format",
                    format,
                    "-o",
                ])
                .arg(&out),
        )
        .output()
        .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        // 32 MiB of the diff plus CRIU's 64+ MiB of pages, all cloned.
        assert!(
            v["cloned_bytes"].as_u64().unwrap() >= 96 << 20,
            "{format}: {v}"
        );
        podman_ok(&["rm", "-f", name]);
        let o = in_storage(Command::new(bin()).args(["podman", "restore"]).arg(&out))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_alive_and_intact(name);
        assert_same_manifest(&before, &manifest(name));
        drop(ctr);
    }
    let _ = podman(&["rmi", "-a", "-f"]);
}

/// A `.cka` whose rootfs diff is damaged: the restore hook finds the digest mismatch
/// before writing the file, runc aborts the restore, and no container is left behind.
#[test]
fn damaged_rootfs_diff_stops_the_restore() {
    if !have_podman("damaged-diff") {
        return;
    }
    let name = "ck-damaged";
    let ctr = start(name);
    sh(
        name,
        "dd if=/dev/urandom of=/data/big bs=1M count=4 2>/dev/null",
    );
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("ckpt.cka");
    let a = archive.to_str().unwrap();
    ck_ok(&["podman", "checkpoint", name, "-o", a, "--leave-running"]);
    let reader = open_archive(&archive);
    let big = reader.find(b"rootfs/data/big").unwrap();
    let chunk = reader.chunks_of(big)[1].clone();
    drop(reader);
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes[chunk.offset as usize + 77] ^= 0x40;
    std::fs::write(&archive, bytes).unwrap();
    podman_ok(&["rm", "-f", name]);
    let o = ck(&["podman", "restore", a]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("digest mismatch"), "{}", stderr(&o));
    assert!(
        !podman(&["container", "exists", name]).status.success(),
        "a container was left behind"
    );
    drop(ctr);
}

/// SIGTERM while the archive is being written: nothing is published, no temporary file
/// stays behind, and the container podman had stopped is restored in place, intact.
#[test]
fn interrupted_checkpoint_restores_the_container_in_place() {
    if !have_podman("interrupted") {
        return;
    }
    let name = "ck-interrupted";
    let ctr = start(name);
    // Enough data that writing it takes a while (zstd level 19 on 2 cores).
    sh(
        name,
        "dd if=/dev/urandom of=/data/big bs=1M count=128 2>/dev/null",
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ckpt.tar");
    let mut child = Command::new(bin())
        .args([
            "podman",
            "checkpoint",
            name,
            "--format",
            "podman",
            "-c",
            "zstd:19",
            "-o",
        ])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = || {
        std::fs::read_dir(dir.path()).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")
        })
    };
    while !partial() {
        assert!(Instant::now() < deadline, "the archive was never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "checkpoint ended early"
        );
        sleep(Duration::from_millis(20));
    }
    signal(child.id(), rustix::process::Signal::TERM);
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("restored in place"), "{err}");
    assert!(!out.exists());
    assert!(!partial(), "a temporary file was left behind");
    assert_alive_and_intact(name);
    drop(ctr);
}

/// `podman checkpoint` straight to object storage and `podman restore` straight from it
/// (real SeaweedFS on 127.0.0.1): the diff is applied by podman from the converted
/// archive, since the OCI hook would not have the credentials.
#[test]
fn checkpoint_to_s3_and_restore_from_it() {
    if !have_podman("s3") {
        return;
    }
    let Some(s3) = crate::support::s3server::S3Server::start("podman_s3") else {
        return;
    };
    let name = "ck-s3";
    let ctr = start(name);
    sh(name, CHANGES);
    let before = manifest(name);
    let url = s3.url("podman/ckpt.cka");
    s3.ck_ok(&[
        "podman",
        "checkpoint",
        name,
        "-o",
        &url,
        "-c",
        "zstd",
        "--shards",
        "2",
    ]);
    podman_ok(&["rm", "-f", name]);
    let o = s3.ck(&["podman", "restore", &url, "--apply-diff", "ckstream"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a hook cannot read s3: {}",
        stderr(&o)
    );
    s3.ck_ok(&["podman", "restore", &url]);
    assert_alive_and_intact(name);
    assert_same_manifest(&before, &manifest(name));
    drop(ctr);
}

/// A private podman storage (graphroot and runroot under `dir`) with the given overlay
/// `mountopt`, used by the current test's podman and ckstream commands. On drop its
/// containers and images are removed and whatever is still mounted below `dir`
/// (podman's private bind mount of its overlay home) is unmounted.
struct PrivateStorage {
    dir: PathBuf,
}

impl PrivateStorage {
    fn new(dir: &Path, mountopt: &str) -> PrivateStorage {
        let conf = dir.join("storage.conf");
        std::fs::write(
            &conf,
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{0}/storage\"\nrunroot = \"{0}/run\"\n\
                 [storage.options.overlay]\nmountopt = \"{mountopt}\"\n",
                dir.display()
            ),
        )
        .unwrap();
        STORAGE_CONF.with(|s| *s.borrow_mut() = Some(conf));
        PrivateStorage {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for PrivateStorage {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-a", "-f", "-t", "0"]);
        let _ = podman(&["rmi", "-a", "-f"]);
        let prefix = format!("{}/", self.dir.display());
        let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
        STORAGE_CONF.with(|s| *s.borrow_mut() = None);
    }
}

/// ckstream with the current test's podman storage.
fn ck_storage(args: &[&str]) -> Output {
    in_storage(Command::new(bin()).args(args))
        .output()
        .expect("run ckstream")
}

fn ck_storage_ok(args: &[&str]) -> Output {
    let o = ck_storage(args);
    assert!(
        o.status.success(),
        "ckstream {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Metadata-only copy-ups and renamed directories, as a container on storage with
/// `metacopy=on` (Fedora/RHEL's default) makes them, besides ordinary changes.
const METACOPY_CHANGES: &str = "set -e
chmod 640 /opt/keep.txt
chown 5:6 /etc/group
mv /data/delete-me.txt /data/renamed.txt
mv /opt/gone /moved-gone
mv /opt/recreate /opt/renamed
chmod 600 /opt/renamed/old.txt
echo new > /opt/renamed/new.txt
echo added > /moved-gone/sub/added.txt
mkdir -p /new/dir; echo x > /new/dir/f
";

/// Container storage with `mountopt = "metacopy=on"`: the upper dir holds metacopy
/// files and redirected directories. ckstream stores them from the container's merged
/// view (taking a `podman mount` reference across the checkpoint) in both formats; the
/// `.cka` restores through ckstream, the podman export through `podman container
/// restore --import`, and the container then sees exactly the filesystem it had. When
/// podman cannot mount the merged view, the checkpoint is refused before podman
/// checkpoints anything.
#[test]
fn metacopy_storage_checkpoints_in_both_formats() {
    if !have_podman("metacopy") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("ckstream-metacopy-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let storage = PrivateStorage::new(dir.path(), "nodev,metacopy=on");
    build_image();
    let name = "ck-metacopy";
    let ctr = start(name);
    sh(name, METACOPY_CHANGES);
    let before = manifest(name);
    let upper = upper_dir(name);
    assert!(has_xattr(
        &upper.join("opt/keep.txt"),
        "trusted.overlay.metacopy"
    ));
    assert!(has_xattr(
        &upper.join("data/renamed.txt"),
        "trusted.overlay.redirect"
    ));
    assert!(has_xattr(
        &upper.join("moved-gone"),
        "trusted.overlay.redirect"
    ));
    assert!(has_xattr(
        &upper.join("opt/renamed"),
        "trusted.overlay.redirect"
    ));

    // No merged view (podman cannot mount it): refused, the container never stopped.
    let wrapper = dir.path().join("podman-without-mount");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\n[ \"$1\" = mount ] && { echo 'mount refused by the test' >&2; exit 125; }\nexec podman \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let refused = dir.path().join("refused.cka");
    let o = in_storage(
        Command::new(bin())
            .env("CKSTREAM_PODMAN", &wrapper)
            .args(["podman", "checkpoint", name, "-o"])
            .arg(&refused),
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("was not checkpointed"), "{err}");
    assert!(err.contains("mount refused by the test"), "{err}");
    assert!(!refused.exists());
    assert_eq!(
        podman_ok(&["inspect", "-f", "{{.State.Running}}", name]).trim(),
        "true"
    );
    assert_alive_and_intact(name);

    let tar = dir.path().join("ckpt.tar");
    let cka = dir.path().join("ckpt.cka");
    ck_storage_ok(&[
        "podman",
        "checkpoint",
        name,
        "--format",
        "podman",
        "--leave-running",
        "-o",
        tar.to_str().unwrap(),
    ]);
    ck_storage_ok(&["podman", "checkpoint", name, "-o", cka.to_str().unwrap()]);
    // Full data and complete directories, no overlay xattrs, in both.
    let listing: serde_json::Value =
        serde_json::from_slice(&ck_storage_ok(&["ls", "--json", cka.to_str().unwrap()]).stdout)
            .unwrap();
    let entry = |p: &str| {
        listing
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == p)
            .unwrap_or_else(|| panic!("{p} not in the archive"))
            .clone()
    };
    assert_eq!(entry("rootfs/opt/keep.txt")["size"], 11);
    entry("rootfs/moved-gone/sub/file.txt");
    let t = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -xOf '{}' rootfs-diff.tar | tar -tv; tar -xOf '{}' deleted.files",
            tar.display(),
            tar.display()
        ))
        .output()
        .unwrap();
    let nested = String::from_utf8_lossy(&t.stdout);
    assert!(nested.contains("moved-gone/sub/file.txt"), "{nested}");
    assert!(nested.contains("\"/opt/gone\""), "{nested}");

    podman_ok(&["rm", "-f", name]);
    ck_storage_ok(&["podman", "restore", cka.to_str().unwrap()]);
    assert_alive_and_intact(name);
    assert_same_manifest(&before, &manifest(name));
    podman_ok(&["rm", "-f", name]);
    podman_ok(&["container", "restore", "--import", tar.to_str().unwrap()]);
    assert_alive_and_intact(name);
    assert_same_manifest(&before, &manifest(name));
    drop(ctr);
    drop(storage);
}

/// `ckstream podman restore ARGS --json` into the test's storage, asserting that the
/// diff was placed into the storage; the JSON report.
fn restore_placed(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["podman", "restore"];
    all.extend_from_slice(args);
    all.push("--json");
    let v: serde_json::Value = serde_json::from_slice(&ck_storage_ok(&all).stdout).unwrap();
    assert_eq!(v["applied_by"], "storage", "{v}");
    v
}

/// The container's overlay upper directory.
fn upper_dir(ctr: &str) -> PathBuf {
    PathBuf::from(podman_ok(&["inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", ctr]).trim())
}

/// Asserts that all of `path`'s 32 MiB share their extents (FIEMAP).
fn assert_fully_shared(path: &Path, what: &str) {
    let (shared, total) = crate::support::fiemap::shared_bytes(path);
    assert_eq!(total, 32 << 20, "{what}: not fully mapped");
    assert_eq!(shared, total, "{what}: copied, not reflinked");
}

/// A `.cka` restored into podman storage on a loopback XFS or btrfs, the archive beside
/// it: ckstream places the rootfs diff into the new container's overlay upper directory
/// before podman mounts it, by reflink (FIEMAP: every byte of the restored file shares
/// its extents), with every kind of change podman gets wrong, and the container runs on
/// with its memory intact.
fn restore_places_the_diff_by_reflink(kind: &str) {
    if !have_podman(&format!("place-{kind}")) {
        return;
    }
    let Some(fs) = LoopFs::new(kind) else { return };
    let _storage = PrivateStorage::new(&fs.mount, "nodev");
    build_image();
    let name = format!("ck-place-{kind}");
    // On XFS, on podman's bridge: the restore brings back the IP and MAC.
    let network = if kind == "xfs" { "podman" } else { "none" };
    let ctr = start_with_network(&name, network);
    let address = |ctr: &str| {
        podman_ok(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.IPAddress}} {{.NetworkSettings.MacAddress}}",
            ctr,
        ])
    };
    let address_before = address(&name);
    sh(&name, CHANGES);
    sh(
        &name,
        "dd if=/dev/urandom of=/data/placed bs=1M count=32 2>/dev/null",
    );
    let before = manifest(&name);
    let archive = fs.mount.join("ckpt.cka");
    let a = archive.to_str().unwrap();
    ck_storage_ok(&["podman", "checkpoint", &name, "-o", a]);
    podman_ok(&["rm", "-f", &name]);
    restore_placed(&[a]);
    assert_alive_and_intact(&name);
    assert_same_manifest(&before, &manifest(&name));
    assert_fully_shared(
        &upper_dir(&name).join("data/placed"),
        &format!("{kind}: data/placed"),
    );
    assert_eq!(address(&name), address_before);

    // Exports take the same path through a temporary `.cka` beside them: ckstream's
    // podman format (block-aligned, so still reflinked end to end), and podman's own
    // (unaligned: copied once), whose diff lacks the parent directories an overlay upper
    // directory needs (copied up from the image's layers).
    let before = manifest(&name);
    let tar = fs.mount.join("ckpt.tar");
    let t = tar.to_str().unwrap();
    ck_storage_ok(&["podman", "checkpoint", &name, "-o", t, "--format", "podman"]);
    podman_ok(&["rm", "-f", &name]);
    restore_placed(&[t]);
    assert_alive_and_intact(&name);
    assert_same_manifest(&before, &manifest(&name));
    assert_fully_shared(
        &upper_dir(&name).join("data/placed"),
        &format!("{kind}: data/placed from the podman-format export"),
    );
    assert!(
        std::fs::read_dir(&fs.mount)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".ckstream")),
        "a temporary archive was left beside the export"
    );
    if kind == "xfs" {
        // podman's own export is what it is: it misses /app/existing.txt (modified in
        // place) and may list /opt/recreate as deleted, so that podman's restore deletes
        // what was written there again. The container must come back as podman's own
        // import brings it back, except that the recreated directory keeps its contents.
        let own = fs.mount.join("podman-own.tar");
        let own = own.to_str().unwrap();
        podman_ok(&[
            "container",
            "checkpoint",
            "--compress",
            "none",
            "-e",
            own,
            &name,
        ]);
        let t = Command::new("sh")
            .arg("-c")
            .arg(format!("tar -xOf '{own}' rootfs-diff.tar | tar -t"))
            .output()
            .unwrap();
        let nested = String::from_utf8_lossy(&t.stdout);
        assert!(
            nested.lines().any(|l| l == "tmp/hb") && !nested.lines().any(|l| l == "tmp/"),
            "podman's diff should hold /tmp/hb without /tmp (a parent ckstream copies up, mode 1777):\n{nested}"
        );
        podman_ok(&["rm", "-f", &name]);
        podman_ok(&["container", "restore", "--import", own]);
        assert_alive_and_intact(&name);
        let by_podman = manifest(&name);
        podman_ok(&["rm", "-f", &name]);
        restore_placed(&[own]);
        assert_alive_and_intact(&name);
        let by_ckstream = manifest(&name);
        let outside_recreate = |m: &str| {
            m.lines()
                .filter(|l| !l.starts_with("/opt/recreate"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_same_manifest(
            &outside_recreate(&by_podman),
            &outside_recreate(&by_ckstream),
        );
        let recreate = |m: &str| {
            m.lines()
                .filter(|l| l.starts_with("/opt/recreate"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_same_manifest(&recreate(&before), &recreate(&by_ckstream));
    }

    // Compressed, under a new name beside the original: decoded straight into place.
    let zstd_archive = fs.mount.join("ckpt-zstd.cka");
    let z = zstd_archive.to_str().unwrap();
    let before = manifest(&name);
    ck_storage_ok(&["podman", "checkpoint", &name, "-o", z, "-c", "zstd"]);
    let copy = format!("{name}-copy");
    let copy_guard = Ctr(copy.clone());
    restore_placed(&[z, "--name", &copy]);
    assert_alive_and_intact(&copy);
    assert_same_manifest(&before, &manifest(&copy));
    drop(copy_guard);

    // --verify-rootfs-after-start: the container runs first, then the shared files are
    // checked; a clean archive reports what it checked.
    let late = format!("{name}-late");
    let late_guard = Ctr(late.clone());
    let o = ck_storage_ok(&[
        "podman",
        "restore",
        a,
        "--name",
        &late,
        "--verify-rootfs-after-start",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["verified_after_start_bytes"].as_u64().unwrap_or(0) >= 32 << 20,
        "{v}"
    );
    assert!(v["running_seconds"].as_f64().unwrap() <= v["seconds"].as_f64().unwrap());
    assert_alive_and_intact(&late);

    drop(late_guard);

    // A flipped byte in a shared file: the container runs on it, and the command says so
    // (exit 3, naming the file) instead of succeeding.
    let bad = fs.mount.join("bad.cka");
    let mut bytes = std::fs::read(&archive).unwrap();
    let reader = open_archive(&archive);
    let placed = reader.find(b"rootfs/data/placed").unwrap();
    let chunk = reader.chunks_of(placed)[2].clone();
    drop(reader);
    bytes[chunk.offset as usize + 4099] ^= 0x01;
    std::fs::write(&bad, bytes).unwrap();
    let rotten = format!("{name}-rotten");
    let _rotten_guard = Ctr(rotten.clone());
    let restore_bad = |flags: &[&str]| {
        let mut args = vec![
            "podman",
            "restore",
            bad.to_str().unwrap(),
            "--name",
            &rotten,
        ];
        args.extend_from_slice(flags);
        ck_storage(&args)
    };
    // Without the flag the shared chunk is read back from the new container's upper
    // directory and checked before podman starts anything: refused, nothing left.
    let o = restore_bad(&[]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("digest mismatch"), "{}", stderr(&o));
    assert!(
        !podman(&["container", "exists", &rotten]).status.success(),
        "a container was left behind"
    );
    let o = restore_bad(&["--verify-rootfs-after-start"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("/data/placed"), "{}", stderr(&o));
    assert_eq!(
        podman_ok(&["inspect", "-f", "{{.State.Running}}", &rotten]).trim(),
        "true",
        "the container should be left running for its owner to decide"
    );
    drop(ctr);
}

#[test]
fn restore_places_the_diff_by_reflink_on_xfs() {
    restore_places_the_diff_by_reflink("xfs");
}

#[test]
fn restore_places_the_diff_by_reflink_on_btrfs() {
    restore_places_the_diff_by_reflink("btrfs");
}

/// The overlay layers in a private storage.
fn layers(storage: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(storage.join("storage/overlay"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "l")
        .collect();
    names.sort();
    names
}

/// Overlay mounts of a private storage's layers.
fn layer_mounts(storage: &Path) -> usize {
    let prefix = format!("{}/storage/overlay/", storage.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&prefix)))
        .count()
}

/// Waits until a failed or killed restore has left nothing behind: no container, no
/// layer beyond `layers_before`, no overlay mount.
fn assert_nothing_left(what: &str, name: &str, storage: &Path, layers_before: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let container = podman(&["container", "exists", name]).status.success();
        let now = layers(storage);
        let mounts = layer_mounts(storage);
        if !container && now == layers_before && mounts == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: left behind: container={container}, layers {now:?} (before {layers_before:?}), {mounts} mounts"
        );
        sleep(Duration::from_millis(100));
    }
}

/// A restore that stops half-way leaves no container, no layer and no mount: ckstream
/// SIGKILLed while it places the archive into the container podman has just created
/// (its guard process makes podman fail and removes the container), and podman failing
/// because a chunk turns out damaged while it is placed.
#[test]
fn a_restore_killed_or_failed_half_way_leaves_nothing_behind() {
    if !have_podman("restore-killed") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("ckstream-killed-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let _storage = PrivateStorage::new(dir.path(), "nodev");
    build_image();
    let name = "ck-killed";
    let ctr = start(name);
    sh(
        name,
        "dd if=/dev/urandom of=/data/big bs=1M count=128 2>/dev/null",
    );
    let archive = dir.path().join("ckpt.cka");
    let a = archive.to_str().unwrap();
    ck_storage_ok(&["podman", "checkpoint", name, "-o", a, "-c", "zstd"]);
    podman_ok(&["rm", "-f", name]);
    let before = layers(dir.path());

    let mut child = in_storage(Command::new(bin()).args(["podman", "restore", a]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // The new layer's upper directory gets the diff's first directory: placing began.
    let placing = || {
        layers(dir.path()).iter().any(|l| {
            dir.path()
                .join("storage/overlay")
                .join(l)
                .join("diff/data")
                .exists()
        })
    };
    while !placing() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended before placing was seen"
        );
        assert!(Instant::now() < deadline, "placing never began");
        sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_nothing_left("SIGKILL while placing", name, dir.path(), &before);

    let reader = open_archive(&archive);
    let big = reader.find(b"rootfs/data/big").unwrap();
    let chunk = reader.chunks_of(big)[3].clone();
    drop(reader);
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes[chunk.offset as usize + 100] ^= 0x40;
    std::fs::write(&archive, bytes).unwrap();
    let o = ck_storage(&["podman", "restore", a]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_nothing_left("damaged chunk", name, dir.path(), &before);
    drop(ctr);
}
