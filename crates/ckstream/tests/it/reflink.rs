//! Reflinks on real loopback btrfs and XFS filesystems (root only): packing an
//! uncompressed archive shares extents with the source files, and unpacking shares
//! extents with the archive. Checked with FIEMAP's SHARED flag and full content hashes.

use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::time::Instant;

use crate::support::fiemap::shared_bytes;
use crate::support::*;

fn hash_file(p: &Path) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(p).unwrap()).unwrap();
    *h.finalize().as_bytes()
}

/// Builds a 2 GiB file quickly: 64 MiB of pseudo-random data cloned 32 times.
fn make_big_file(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    let block = prng_bytes(11, 64 << 20);
    f.write_all_at(&block, 0).unwrap();
    f.sync_all().unwrap();
    for i in 1..32u64 {
        ckstream_store::clone::ficlonerange(&f, 0, &f, i * (64 << 20), 64 << 20).unwrap();
    }
    // Make every MiB distinct, so that no chunk is stored once for several places
    // (identical chunks in one archive are).
    for mib in 0..2048u64 {
        f.write_all_at(&mib.to_le_bytes(), mib * (1 << 20) + 12345)
            .unwrap();
    }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

fn reflink_round_trip(kind: &str) {
    let Some(fs) = LoopFs::new(kind) else { return };
    let src = fs.mount.join("src");
    std::fs::create_dir(&src).unwrap();
    make_big_file(&src.join("big"));
    std::fs::write(src.join("odd-tail"), prng_bytes(4, (10 << 20) + 123)).unwrap();
    std::fs::write(src.join("small"), b"tiny").unwrap();
    let archive = fs.mount.join("a.cka");

    let t = Instant::now();
    let pack = ck_ok(&[
        "pack".as_ref(),
        "--json".as_ref(),
        "-c".as_ref(),
        "none".as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
        src.as_os_str(),
    ] as &[&OsStr]);
    let pack_secs = t.elapsed().as_secs_f64();
    let pj = json(&pack);
    let cloned = pj["cloned_bytes"].as_u64().unwrap();
    assert!(
        cloned >= 2 << 30,
        "{kind}: pack cloned only {cloned} bytes: {pj}"
    );
    let (arch_shared, _) = shared_bytes(&archive);
    assert!(
        arch_shared >= 2 << 30,
        "{kind}: archive shares only {arch_shared} bytes with the source"
    );

    let out = fs.mount.join("out");
    let t = Instant::now();
    let unpack = ck_ok(&[
        "unpack".as_ref(),
        "--json".as_ref(),
        archive.as_os_str(),
        "-C".as_ref(),
        out.as_os_str(),
    ] as &[&OsStr]);
    let unpack_secs = t.elapsed().as_secs_f64();
    let uj = json(&unpack);
    assert!(
        uj["cloned_bytes"].as_u64().unwrap() >= 2 << 30,
        "{kind}: {uj}"
    );
    let (shared, total) = shared_bytes(&out.join("src/big"));
    assert_eq!(total, 2 << 30);
    assert_eq!(
        shared, total,
        "{kind}: unpacked file does not share all its extents with the archive"
    );
    let (tail_shared, _) = shared_bytes(&out.join("src/odd-tail"));
    assert!(
        tail_shared >= 10 << 20,
        "{kind}: aligned part of odd-tail not shared"
    );
    for f in ["big", "odd-tail", "small"] {
        assert_eq!(
            hash_file(&src.join(f)),
            hash_file(&out.join("src").join(f)),
            "{kind}: {f} differs"
        );
    }
    ck_ok(&["verify".as_ref(), archive.as_os_str()] as &[&OsStr]);
    // Reported, not asserted: tests never judge speed.
    eprintln!("{kind}: pack 2 GiB+ with reflinks {pack_secs:.2}s, unpack {unpack_secs:.2}s");

    // A compressed archive on the same filesystem cannot share extents, and says so.
    let z = fs.mount.join("z.cka");
    ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-c".as_ref(),
        "lz4".as_ref(),
        "-o".as_ref(),
        z.as_os_str(),
        src.join("odd-tail").as_os_str(),
    ] as &[&OsStr]);
    let zu = ck_ok(&[
        "unpack".as_ref(),
        "--json".as_ref(),
        z.as_os_str(),
        "-C".as_ref(),
        fs.mount.join("zout").as_os_str(),
    ] as &[&OsStr]);
    assert_eq!(json(&zu)["cloned_bytes"], 0);
    assert_eq!(
        hash_file(&src.join("odd-tail")),
        hash_file(&fs.mount.join("zout/odd-tail"))
    );
}

#[test]
fn reflink_btrfs() {
    reflink_round_trip("btrfs");
}

#[test]
fn reflink_xfs() {
    reflink_round_trip("xfs");
}
