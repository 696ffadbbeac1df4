//! Soak: one live multi-process tree checkpointed and restored 100 times in a row,
//! each dump written over the previous archive of that name, alternating a local file
//! and an S3 object, the codecs and the shard counts. After every restore the tree's
//! memory is verified. What must stay flat over the run: ckstream's peak RSS (for the
//! same kind of cycle, early and late), the restored tree's open fds, the files in
//! ckstream's temporary directory and the archive's directory, the mount table, and
//! unfinished multipart uploads (none, ever). Per-cycle timings go to stderr.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::support::memtest::*;
use crate::support::*;

const CYCLES: usize = 100;
const CHILDREN: u32 = 2;

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed: {}", stderr(out));
}

fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

/// One cycle's measurements.
struct Cycle {
    kind: String,
    dump_rss_kib: i64,
    restore_rss_kib: i64,
    fds: usize,
}

#[test]
fn hundred_dump_restore_cycles_keep_memory_intact_and_resources_flat() {
    if !criu_available("soak") {
        return;
    }
    let Some(s3) = crate::support::s3server::shared("soak") else {
        return;
    };
    let started = Instant::now();
    let m = Memtest::start(24, CHILDREN);
    m.assert_beating();
    let tmp = tempfile::tempdir().unwrap();
    // ckstream's temporary directory (CRIU work dirs go there): empty after every cycle.
    let ck_tmp = tmp.path().join("tmp");
    let local_dir = tmp.path().join("archives");
    std::fs::create_dir_all(&ck_tmp).unwrap();
    std::fs::create_dir_all(&local_dir).unwrap();
    let local = local_dir.join("ckpt.cka");
    let prefix = "soak/";
    let url = s3.url("soak/ckpt.cka");
    let mounts = mount_count();
    let run = |args: Vec<OsString>| {
        s3.command(bin())
            .env("TMPDIR", &ck_tmp)
            .args(args)
            .output()
            .unwrap()
    };
    let mut cycles: Vec<Cycle> = Vec::new();
    for i in 0..CYCLES {
        let t0 = Instant::now();
        let on_s3 = i % 2 == 1;
        let codec = ["none", "lz4", "zstd"][i % 3];
        let shards: u32 = [1, 3][(i / 2) % 2];
        let archive: OsString = if on_s3 {
            url.clone().into()
        } else {
            local.clone().into()
        };
        let kind = format!(
            "{} {codec} {shards} shard{}",
            if on_s3 { "s3" } else { "local" },
            if shards == 1 { "" } else { "s" }
        );
        let mut dump = dump_args(m.pid, Path::new(&archive), codec, shards, &[]);
        dump.push("--json".into());
        let out = run(dump);
        assert_ok(&out, &format!("cycle {i} ({kind}): dump"));
        let dump_rss = json(&out)["rusage"]["self_max_rss_kib"].as_i64().unwrap();
        let t_dump = t0.elapsed();
        m.wait_gone();

        // What the name holds is exactly the new archive: no temporary or stale shard.
        if on_s3 {
            let objects = s3.objects(prefix);
            assert_eq!(
                objects.len(),
                shards as usize,
                "cycle {i} ({kind}): {objects:?}"
            );
            let uploads = s3.multipart_uploads(prefix);
            assert!(
                uploads.is_empty(),
                "cycle {i} ({kind}): uploads left: {uploads:?}"
            );
        } else {
            let files = dir_names(&local_dir);
            assert_eq!(
                files.len(),
                shards as usize,
                "cycle {i} ({kind}): {files:?}"
            );
        }

        let t1 = Instant::now();
        let out = run(vec!["restore".into(), "--json".into(), archive.clone()]);
        assert_ok(&out, &format!("cycle {i} ({kind}): restore"));
        let restore_rss = json(&out)["rusage"]["self_max_rss_kib"].as_i64().unwrap();
        let t_restore = t1.elapsed();
        m.assert_memory_intact(CHILDREN);
        let members = session_members(m.pid);
        assert_eq!(
            members.len(),
            1 + CHILDREN as usize,
            "cycle {i} ({kind}): restored tree {members:?}"
        );
        // The least over a few samples: memtest's verification may still hold its report
        // file open for a moment after the report appeared; a leaked fd stays.
        let fds: usize = (0..5)
            .map(|k| {
                if k > 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                members.iter().map(|&p| fd_count(p)).sum::<usize>()
            })
            .min()
            .unwrap();
        let left = dir_names(&ck_tmp);
        assert!(
            left.is_empty(),
            "cycle {i} ({kind}): left in TMPDIR: {left:?}"
        );
        assert_eq!(mount_count(), mounts, "cycle {i} ({kind}): mounts changed");
        eprintln!(
            "soak cycle {i:3} {kind:<22} dump {:.2}s restore {:.2}s verify {:.2}s  rss dump {} MiB restore {} MiB  tree fds {fds}",
            t_dump.as_secs_f64(),
            t_restore.as_secs_f64(),
            (t1.elapsed() - t_restore).as_secs_f64(),
            dump_rss / 1024,
            restore_rss / 1024,
        );
        cycles.push(Cycle {
            kind,
            dump_rss_kib: dump_rss,
            restore_rss_kib: restore_rss,
            fds,
        });
    }

    // Flat: the same kind of cycle costs the same late in the run as early, within
    // noise (10 % + 8 MiB); the restored tree holds the same fds every time.
    let mut first: BTreeMap<&str, &Cycle> = BTreeMap::new();
    let mut last: BTreeMap<&str, &Cycle> = BTreeMap::new();
    for c in &cycles {
        first.entry(&c.kind).or_insert(c);
        last.insert(&c.kind, c);
    }
    let bound = |early: i64| early + early / 10 + 8 * 1024;
    for (kind, early) in &first {
        let late = last[kind];
        assert!(
            late.dump_rss_kib <= bound(early.dump_rss_kib),
            "{kind}: dump peak RSS grew from {} to {} KiB",
            early.dump_rss_kib,
            late.dump_rss_kib
        );
        assert!(
            late.restore_rss_kib <= bound(early.restore_rss_kib),
            "{kind}: restore peak RSS grew from {} to {} KiB",
            early.restore_rss_kib,
            late.restore_rss_kib
        );
    }
    let window =
        |r: std::ops::Range<usize>, f: fn(&Cycle) -> i64| cycles[r].iter().map(f).max().unwrap();
    let (early_dump, late_dump) = (
        window(0..10, |c| c.dump_rss_kib),
        window(CYCLES - 10..CYCLES, |c| c.dump_rss_kib),
    );
    let (early_restore, late_restore) = (
        window(0..10, |c| c.restore_rss_kib),
        window(CYCLES - 10..CYCLES, |c| c.restore_rss_kib),
    );
    eprintln!(
        "soak: peak RSS of the first/last 10 cycles: dump {early_dump}/{late_dump} KiB, restore {early_restore}/{late_restore} KiB; {CYCLES} cycles in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    assert!(late_dump <= bound(early_dump), "dump peak RSS grew");
    assert!(
        late_restore <= bound(early_restore),
        "restore peak RSS grew"
    );
    let fds0 = cycles[0].fds;
    for (i, c) in cycles.iter().enumerate() {
        assert_eq!(
            c.fds, fds0,
            "cycle {i}: the restored tree holds {} fds, the first {fds0}",
            c.fds
        );
    }
    m.assert_beating();
}
