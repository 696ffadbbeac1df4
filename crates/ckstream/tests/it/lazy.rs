//! `ckstream restore --lazy` with real CRIU (restore, lazy-pages daemon, userfaultfd):
//! the memtest tree is dumped, restored lazily, and must then beat and re-verify all its
//! memory — right away (every page a fault or a race with the push) or once every page
//! is in (`--wait`). A bad chunk or a store that dies mid-transfer must kill the tree
//! (it would otherwise run on zero pages) and exit 3 or 1.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::faults::{wait_output, wait_stopped};
use crate::support::memtest::*;
use crate::support::s3server::S3Server;
use crate::support::*;

fn restore_args(archive: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["restore".into(), "--lazy".into(), archive.into()];
    v.extend(extra.iter().map(OsString::from));
    v
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Waits until no background page server for `archive` is left.
fn wait_page_server_gone(archive: &str) {
    wait_for(
        "the background page server to exit",
        Duration::from_secs(120),
        || {
            live_with_cmdline(archive)
                .into_iter()
                .all(|p| proc_stat(p).is_none_or(|s| s.comm != "ckstream"))
        },
    );
}

fn lazy_cycle(codec: &str, shards: u32, wait: bool) {
    if !criu_available("lazy_cycle") {
        return;
    }
    let children = 2;
    let m = Memtest::start_with_fill(64, children, "mixed");
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("ckpt.cka");
    ck_ok(&dump_args(m.pid, &archive, codec, shards, &[]));
    m.wait_gone();
    let mut extra = vec!["--json"];
    if wait {
        extra.push("--wait");
    }
    let out = ck_ok(&restore_args(&archive, &extra));
    let v = json(&out);
    let lazy_bytes = v["lazy_bytes"].as_u64().unwrap();
    assert!(lazy_bytes >= 64 << 20, "{v}");
    let running = v["seconds_to_running"].as_f64().unwrap();
    if wait {
        let complete = v["seconds_to_complete"].as_f64().unwrap();
        assert!(running <= complete, "{v}");
        let served =
            v["bytes_prefetched"].as_u64().unwrap() + v["bytes_on_demand"].as_u64().unwrap();
        assert!(served >= lazy_bytes / 2, "{v}");
        assert!(v["page_requests"].as_u64().unwrap() > 0, "{v}");
    } else {
        assert!(v.get("seconds_to_complete").is_none(), "{v}");
    }
    // Without --wait the pages are still coming: the check touches them all at once.
    m.assert_memory_intact(children);
    m.assert_beating();
    wait_page_server_gone(archive.to_str().unwrap());
    m.assert_memory_intact(children);
}

cases!(lazy_cycle:
    lazy_restore_raw_1_shard_touching_memory_at_once("none", 1, false),
    lazy_restore_zstd_3_shards_touching_memory_at_once("zstd", 3, false),
    lazy_restore_zstd_1_shard_waiting_for_every_page("zstd", 1, true),
    lazy_restore_lz4_3_shards_waiting_for_every_page("lz4", 3, true),
);

/// From an object store: dumped there, restored lazily straight from it.
#[test]
fn lazy_restore_from_s3() {
    if !criu_available("lazy_restore_from_s3") {
        return;
    }
    let Some(s3) = S3Server::start("lazy_restore_from_s3") else {
        return;
    };
    let children = 1;
    let m = Memtest::start_with_fill(64, children, "mixed");
    let url = s3.url("lazy/ckpt.cka");
    s3.ck_ok(&dump_args(m.pid, Path::new(&url), "zstd", 2, &[]));
    m.wait_gone();
    let out = s3.ck_ok(&["restore", "--lazy", "--wait", "--json", &url]);
    let v = json(&out);
    assert!(v["lazy_bytes"].as_u64().unwrap() >= 64 << 20, "{v}");
    m.assert_beating();
    m.assert_memory_intact(children);
}

/// A flipped byte in a chunk of lazy memory: found when its page is asked for (after
/// the tree runs, or while it is being restored); the tree is killed, exit 3.
#[test]
fn a_corrupt_page_chunk_kills_the_tree_and_exits_3() {
    if !criu_available("lazy_corrupt_chunk") {
        return;
    }
    let m = Memtest::start(64, 1);
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("ckpt.cka");
    ck_ok(&dump_args(m.pid, &archive, "none", 1, &[]));
    m.wait_gone();
    let reader = open_archive(&archive);
    let pages = reader
        .find(format!("criu/pages-{}.img", m.pid).as_bytes())
        .or_else(|| {
            // The pages file is named by the pagemap's pages id: the largest one.
            (0..reader.entries().len())
                .filter(|&i| reader.entries()[i].path.starts_with(b"criu/pages-"))
                .max_by_key(|&i| reader.entries()[i].size)
        })
        .unwrap();
    let chunks = reader.chunks_of(pages);
    let bad = chunks[chunks.len() * 2 / 3].clone();
    drop(reader);
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes[bad.offset as usize + 100] ^= 0x40;
    std::fs::write(&archive, bytes).unwrap();

    let out = ck(&restore_args(&archive, &["--wait"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("killed"), "{err}");
    wait_for("the tree to be gone", Duration::from_secs(20), || {
        !m.alive()
    });
    wait_page_server_gone(archive.to_str().unwrap());
}

/// The object store dies while pages are being served (the page server held at its
/// 16th request meanwhile): the tree is killed, exit 1.
#[test]
fn s3_server_killed_mid_transfer_kills_the_tree_and_exits_1() {
    if !criu_available("lazy_s3_killed") {
        return;
    }
    let Some(s3) = S3Server::start("lazy_s3_killed") else {
        return;
    };
    let _heavy = heavy_lock();
    // Random memory, more than the read-ahead holds: pages still to fetch when the
    // store goes away.
    let m = Memtest::start(256, 1);
    let url = s3.url("lazy/ckpt.cka");
    s3.ck_ok(&dump_args(m.pid, Path::new(&url), "none", 2, &[]));
    m.wait_gone();
    let child = s3
        .command(bin())
        .env("CKSTREAM_S3_RETRY_SECS", "2")
        .env("CKSTREAM_FAILPOINT", "lazy.page-request-16:stop")
        .args(["restore", "--lazy", "--wait", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let worker = {
        let mut found = None;
        wait_for(
            "the page server to stop at its 16th request",
            Duration::from_secs(60),
            || {
                found = live_with_cmdline(&url).into_iter().find(|&p| {
                    proc_stat(p).is_some_and(|s| s.comm == "ckstream" && s.state == 'T')
                });
                found.is_some()
            },
        );
        found.unwrap()
    };
    wait_stopped(worker, "the page server");
    s3.kill();
    signal(worker, rustix::process::Signal::CONT);
    let out = wait_output(child, Duration::from_secs(180));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("killed"), "{err}");
    wait_for("the tree to be gone", Duration::from_secs(20), || {
        !m.alive()
    });
    wait_page_server_gone(&url);
}

/// Twenty lazy restores in a row: each verified, and nothing left behind — no page
/// server, no CRIU daemon, no work directory.
#[test]
fn twenty_lazy_restores_leave_nothing_behind() {
    if !criu_available("twenty_lazy_restores") {
        return;
    }
    let children = 1;
    let m = Memtest::start_with_fill(16, children, "mixed");
    let tmp = tempfile::tempdir().unwrap();
    let ck_tmp = tmp.path().join("tmp");
    std::fs::create_dir(&ck_tmp).unwrap();
    let archive = tmp.path().join("ckpt.cka");
    let criu_before = all_processes()
        .iter()
        .filter(|p| p.comm == "criu" && p.state != 'Z')
        .count();
    for i in 0..20 {
        let run = |args: Vec<OsString>| {
            let out = std::process::Command::new(bin())
                .env("TMPDIR", &ck_tmp)
                .args(&args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "cycle {i}: {args:?}: {}",
                stderr(&out)
            );
        };
        run(dump_args(m.pid, &archive, "zstd", 1 + i % 3, &[]));
        m.wait_gone();
        let wait = if i % 2 == 0 { "--wait" } else { "-q" };
        run(restore_args(&archive, &[wait]));
        m.assert_memory_intact(children);
        wait_page_server_gone(archive.to_str().unwrap());
        assert_eq!(dir_names(&ck_tmp), Vec::<String>::new(), "cycle {i}");
    }
    let criu_after = all_processes()
        .iter()
        .filter(|p| p.comm == "criu" && p.state != 'Z')
        .count();
    assert!(criu_after <= criu_before, "criu processes left");
    m.assert_beating();
}

/// Without userfaultfd, `--lazy` says so once and restores the ordinary way.
#[test]
fn without_userfaultfd_lazy_falls_back_to_a_full_restore() {
    if !criu_available("lazy_fallback") {
        return;
    }
    let m = Memtest::start(16, 1);
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("ckpt.cka");
    ck_ok(&dump_args(m.pid, &archive, "zstd", 1, &[]));
    m.wait_gone();
    let out = std::process::Command::new(bin())
        .env("CKSTREAM_NO_USERFAULTFD", "1")
        .args(restore_args(&archive, &["--wait", "--json"]))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("userfaultfd").count(), 1, "{err}");
    assert!(json(&out).get("lazy").is_none(), "not a lazy restore");
    m.assert_beating();
    m.assert_memory_intact(1);
}
