//! Incremental archives through the CLI: `pack --parent` and `dump --parent` store only
//! the chunks their parents do not hold, and every reader follows the chain; a parent
//! that is missing or replaced is refused, naming it (exit 3). Real files, real CRIU.

use std::path::Path;

use crate::support::memtest::*;
use crate::support::*;

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_chain_of_packs_stores_changes_only_and_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("big"), prng_bytes(1, 8 << 20)).unwrap();
    std::fs::write(tree.join("sub/keep"), prng_bytes(2, 3 << 20)).unwrap();
    std::fs::write(tree.join("gone"), prng_bytes(3, 1 << 20)).unwrap();
    let archive = |n: u32| tmp.path().join(format!("g{n}.cka"));
    let pack = |n: u32, extra: &[&str]| {
        let out = archive(n);
        let mut args = vec!["pack", "-q", "--json", "-c", "zstd:1", "-o", s(&out)];
        args.extend_from_slice(extra);
        args.push(s(&tree));
        json(&ck_ok(&args))
    };
    let g1 = pack(1, &[]);
    assert_eq!(g1["referenced_bytes"], 0);
    // Generation 2: one MiB of `big` rewritten in place, a file deleted, one added,
    // a mode changed.
    let mut big = std::fs::read(tree.join("big")).unwrap();
    big[(3 << 20)..(4 << 20)].copy_from_slice(&prng_bytes(4, 1 << 20));
    std::fs::write(tree.join("big"), &big).unwrap();
    std::fs::remove_file(tree.join("gone")).unwrap();
    std::fs::write(tree.join("sub/new"), prng_bytes(5, 1 << 20)).unwrap();
    std::fs::set_permissions(
        tree.join("sub/keep"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let g2 = pack(2, &["--parent", s(&archive(1))]);
    assert_eq!(g2["referenced_bytes"].as_u64().unwrap(), 10 << 20, "{g2}");
    assert!(
        g2["archive_bytes"].as_u64().unwrap() < g1["archive_bytes"].as_u64().unwrap() / 4,
        "{g1} {g2}"
    );
    // Generation 3 on top of 2.
    big[0..(1 << 20)].copy_from_slice(&prng_bytes(6, 1 << 20));
    std::fs::write(tree.join("big"), &big).unwrap();
    let g3 = pack(3, &["--parent", s(&archive(2))]);
    assert_eq!(g3["referenced_bytes"].as_u64().unwrap(), 11 << 20, "{g3}");

    let info = json(&ck_ok(&["info", "--json", s(&archive(3))]));
    let parents: Vec<&str> = info["parents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["location"].as_str().unwrap())
        .collect();
    assert_eq!(parents, ["g2.cka", "g1.cka"], "{info}");
    ck_ok(&["verify", "-q", s(&archive(3))]);
    let out = tmp.path().join("out");
    ck_ok(&["unpack", "-q", s(&archive(3)), "-C", s(&out)]);
    assert_eq!(std::fs::read(out.join("tree/big")).unwrap(), big);
    assert_eq!(
        std::fs::read(out.join("tree/sub/new")).unwrap(),
        prng_bytes(5, 1 << 20)
    );
    assert!(!out.join("tree/gone").exists());
    let mode = std::fs::metadata(out.join("tree/sub/keep")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let cat = ck_ok(&["cat", s(&archive(3)), "tree/sub/keep"]);
    assert_eq!(cat.stdout, prng_bytes(2, 3 << 20));

    // Flattened: the same content in an archive that needs no parent.
    let flat = tmp.path().join("flat.cka");
    let fj = json(&ck_ok(&[
        "flatten",
        "--json",
        s(&archive(3)),
        "-o",
        s(&flat),
    ]));
    assert_eq!(fj["parents_read"], 2, "{fj}");
    let finfo = json(&ck_ok(&["info", "--json", s(&flat)]));
    assert!(finfo["parents"].as_array().unwrap().is_empty(), "{finfo}");
    assert_eq!(finfo["logical_bytes"], info["logical_bytes"]);

    // The chain moves as a whole: the same names in another directory still read.
    let moved = tmp.path().join("moved");
    std::fs::create_dir(&moved).unwrap();
    for n in 1..=3 {
        std::fs::rename(archive(n), moved.join(format!("g{n}.cka"))).unwrap();
    }
    ck_ok(&["verify", "-q", s(&moved.join("g3.cka"))]);

    // A parent outside the new archive's directory is refused when writing.
    let elsewhere = tempfile::tempdir().unwrap();
    let o = ck(&[
        "pack",
        "-q",
        "-o",
        s(&elsewhere.path().join("x.cka")),
        "--parent",
        s(&moved.join("g2.cka")),
        s(&tree),
    ]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("must lie beside the new archive"),
        "{}",
        stderr(&o)
    );

    // A missing parent, and a parent replaced by another archive, are named (exit 3).
    std::fs::rename(moved.join("g1.cka"), moved.join("g1.away")).unwrap();
    // (The flattened archive does not care.)
    ck_ok(&["verify", "-q", s(&flat)]);
    let flat_out = tmp.path().join("flat-out");
    ck_ok(&["unpack", "-q", s(&flat), "-C", s(&flat_out)]);
    for f in ["big", "sub/keep", "sub/new"] {
        assert_eq!(
            std::fs::read(flat_out.join("tree").join(f)).unwrap(),
            std::fs::read(out.join("tree").join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!flat_out.join("tree/gone").exists());
    let mode = std::fs::metadata(flat_out.join("tree/sub/keep")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let o = ck(&["cat", s(&moved.join("g3.cka")), "tree/sub/keep"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("g1.cka is missing"), "{}", stderr(&o));
    ck_ok(&["pack", "-q", "-o", s(&moved.join("g1.cka")), s(&tree)]);
    let o = ck(&[
        "unpack",
        "-q",
        s(&moved.join("g3.cka")),
        "-C",
        s(&tmp.path().join("o2")),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("is another archive"), "{}", stderr(&o));
}

/// `--max-chain`: a parent that already ends a chain that long makes a full archive.
#[test]
fn max_chain_stores_in_full() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("f"), prng_bytes(1, 2 << 20)).unwrap();
    let a = |n: u32| tmp.path().join(format!("{n}.cka"));
    ck_ok(&["pack", "-q", "-o", s(&a(1)), s(&tree)]);
    ck_ok(&["pack", "-q", "-o", s(&a(2)), "--parent", s(&a(1)), s(&tree)]);
    let o = ck_ok(&[
        "pack",
        "--json",
        "-o",
        s(&a(3)),
        "--parent",
        s(&a(2)),
        "--max-chain",
        "1",
        s(&tree),
    ]);
    assert_eq!(json(&o)["referenced_bytes"], 0);
    assert!(
        stderr(&o).contains("storing the new archive in full"),
        "{}",
        stderr(&o)
    );
    let info = json(&ck_ok(&["info", "--json", s(&a(3))]));
    assert!(info["parents"].as_array().unwrap().is_empty());
}

/// A live process tree dumped five times, rewriting 2% of its memory before each later
/// dump and, before the second, mapping 16 MiB more below its buffer (every page of the
/// buffer then moves 16 MiB in CRIU's page image): each later dump stores a fraction of
/// the first, and every generation restores with its own memory intact (read through
/// up to four parents), also lazily and flattened.
#[test]
fn dumps_of_a_running_tree_form_a_chain_whose_every_generation_restores() {
    if !criu_available("dumps_of_a_running_tree_form_a_chain_whose_every_generation_restores") {
        return;
    }
    let _heavy = heavy_lock();
    let children = 1;
    let m = Memtest::start_inserting(64, children, 16);
    m.assert_beating();
    let tmp = tempfile::tempdir().unwrap();
    let a = |n: u32| tmp.path().join(format!("gen{n}.cka"));
    let mut sizes = Vec::new();
    for n in 1..=5u32 {
        // The last dump streams from CRIU and ends the tree (the others go through the
        // spool of --leave-running): both ways cut the page images the same.
        let mut extra = vec!["--json"];
        if n < 5 {
            extra.push("--leave-running");
        }
        let parent = a(n - 1);
        if n > 1 {
            extra.extend(["--parent", s(&parent)]);
            m.mutate(n - 1);
        }
        let out = json(&ck_ok(&dump_args(m.pid, &a(n), "zstd", 1, &extra)));
        sizes.push(out["archive_bytes"].as_u64().unwrap());
        if n == 5 {
            m.wait_gone();
        }
        if n > 1 {
            let raw = out["raw_bytes"].as_u64().unwrap();
            let referenced = out["referenced_bytes"].as_u64().unwrap();
            // Pages are cut by content: the changed 2% and the pages around them are
            // stored (and the new mapping), also where the page image shifted.
            let new_mapping = if n == 2 { 16 << 20 } else { 0 };
            assert!(
                referenced * 10 >= (raw - new_mapping) * 8,
                "generation {n}: {out}"
            );
        }
        if n < 5 {
            m.assert_beating();
        }
    }
    assert!(sizes[1] < (16 << 20) + sizes[0] / 4, "{sizes:?}");
    assert!(sizes[2..].iter().all(|&b| b * 4 < sizes[0]), "{sizes:?}");
    ck_ok(&["verify", "-q", s(&a(5))]);
    for n in (1..=5).rev() {
        ck_ok(&["restore", "-q", s(&a(n))]);
        m.assert_beating();
        m.assert_memory_intact(children);
        m.kill();
        m.wait_gone();
    }
    // Lazily too: the pages the tree faults on come from all five archives.
    ck_ok(&["restore", "-q", "--lazy", "--wait", s(&a(5))]);
    m.assert_beating();
    m.assert_memory_intact(children);
    // Flattened, with the parents gone.
    let flat = tmp.path().join("flat.cka");
    ck_ok(&["flatten", "-q", s(&a(5)), "-o", s(&flat)]);
    for n in 1..5 {
        std::fs::remove_file(a(n)).unwrap();
    }
    m.kill();
    m.wait_gone();
    ck_ok(&["restore", "-q", s(&flat)]);
    m.assert_beating();
    m.assert_memory_intact(children);
}

/// The same in an object store: a tree dumped five times straight to S3, each dump
/// naming the one before; the oldest, a middle and the newest generation restore from
/// the bucket with their memory intact.
#[test]
fn dumps_into_object_storage_form_a_chain_that_restores_from_it() {
    if !criu_available("dumps_into_object_storage_form_a_chain_that_restores_from_it") {
        return;
    }
    let Some(s3) = crate::support::s3server::shared("dumps_into_object_storage_chain") else {
        return;
    };
    let _heavy = heavy_lock();
    let children = 1;
    let m = Memtest::start(32, children);
    m.assert_beating();
    let url = |n: u32| s3.url(&format!("dump-chain/gen{n}.cka"));
    for n in 1..=5u32 {
        let (this, parent) = (url(n), url(n - 1));
        let mut extra = vec!["--json", "--leave-running"];
        if n > 1 {
            extra.extend(["--parent", parent.as_str()]);
            m.mutate(n - 1);
        }
        let out = json(&s3.ck_ok(&dump_args(m.pid, Path::new(&this), "zstd", 2, &extra)));
        if n > 1 {
            let raw = out["raw_bytes"].as_u64().unwrap();
            let referenced = out["referenced_bytes"].as_u64().unwrap();
            assert!(referenced * 10 >= raw * 8, "generation {n}: {out}");
        }
    }
    m.kill();
    m.wait_gone();
    for n in [5, 3, 1] {
        s3.ck_ok(&["restore", "-q", &url(n)]);
        m.assert_beating();
        m.assert_memory_intact(children);
        m.kill();
        m.wait_gone();
    }
}

/// A chain in an object store: the child finds its parent beside it in the bucket, and
/// a deleted parent is named (exit 3).
#[test]
fn a_chain_in_object_storage_reads_back_and_names_a_missing_parent() {
    let Some(s3) = crate::support::s3server::shared("a_chain_in_object_storage") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("f"), prng_bytes(41, 4 << 20)).unwrap();
    let (g1, g2) = (s3.url("incr/g1.cka"), s3.url("incr/g2.cka"));
    s3.ck_ok(&["pack", "-q", "-o", &g1, s(&tree)]);
    let mut f = std::fs::read(tree.join("f")).unwrap();
    f[(2 << 20)..(2 << 20) + 10].copy_from_slice(b"changed!!!");
    std::fs::write(tree.join("f"), &f).unwrap();
    let out = json(&s3.ck_ok(&["pack", "-q", "--json", "-o", &g2, "--parent", &g1, s(&tree)]));
    assert_eq!(out["referenced_bytes"].as_u64().unwrap(), 3 << 20, "{out}");
    assert_eq!(s3.ck_ok(&["cat", &g2, "tree/f"]).stdout, f);
    s3.ck_ok(&["verify", "-q", &g2]);
    s3.aws_ok(&["s3", "rm", &g1]);
    let o = s3.ck(&["cat", &g2, "tree/f"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("incr/g1.cka"), "{}", stderr(&o));
}
