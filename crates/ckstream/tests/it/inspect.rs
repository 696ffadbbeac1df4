//! `ckstream inspect` and `ckstream diff` on real dumps: a memtest tree (two processes,
//! pipes, an open log file, a marked environment) checked section by section against
//! what the test set up; a malformed CRIU image in a valid archive; the same inspection
//! of a copy in object storage. (Sockets are decoded in the unit tests of
//! `ckstream_criu::inspect`: CRIU 4.1.1 cannot dump a socket on this machine's kernel,
//! whose getsockopt(SO_PASSSEC) fails with EOPNOTSUPP.)

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
fn inspect_and_diff_describe_a_dumped_tree() {
    if !criu_available("inspect_and_diff_describe_a_dumped_tree") {
        return;
    }
    let _heavy = heavy_lock();
    let marker = "CKSTREAM_INSPECT_MARKER=tree-7";
    let m = Memtest::start_with_env(32, 1, &[("CKSTREAM_INSPECT_MARKER", "tree-7")]);
    m.assert_beating();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.cka"), tmp.path().join("b.cka"));
    ck_ok(&dump_args(m.pid, &a, "zstd", 1, &["--leave-running"]));
    m.mutate(1);
    ck_ok(&dump_args(
        m.pid,
        &b,
        "zstd",
        1,
        &["--leave-running", "--parent", s(&a)],
    ));

    let v = json(&ck_ok(&["inspect", "--json", "--env", s(&a)]));
    let procs = v["criu"]["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 2, "{v:#}");
    let (root, child) = (&procs[0], &procs[1]);
    assert_eq!(root["pid"], m.pid);
    assert_eq!(child["pid"], m.pids[1]);
    assert_eq!(child["ppid"], m.pid);
    assert_eq!(root["comm"], "memtest");
    let cmdline: Vec<&str> = root["cmdline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(
        cmdline,
        [s(memtest_binary()), "32", m.needle().as_str(), "1"],
        "{v:#}"
    );
    let env = root["environment"].as_array().unwrap();
    assert!(env.iter().any(|e| e == marker), "{env:?}");
    // Files: the log the parent appends to, and the pipes between the two.
    let files = |p: &serde_json::Value| p["files"].as_array().unwrap().clone();
    let log = format!("{}.log", m.needle());
    let log_fd = files(root)
        .into_iter()
        .find(|f| f["path"] == log.as_str())
        .unwrap_or_else(|| panic!("no {log} in {:#}", root["files"]));
    assert_eq!(
        (log_fd["kind"].as_str(), log_fd["mode"].as_str()),
        (Some("file"), Some("w"))
    );
    // The log only grows: its position at the dump is within what it holds now.
    let log_len = std::fs::metadata(&log).unwrap().len();
    assert!(log_fd["position"].as_u64().unwrap() <= log_len, "{log_fd}");
    let pipes = |p: &serde_json::Value| -> std::collections::BTreeSet<u64> {
        files(p)
            .iter()
            .filter(|f| f["kind"] == "pipe")
            .map(|f| f["pipe_id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(pipes(root).len(), 2, "{:#}", root["files"]);
    assert_eq!(pipes(root), pipes(child));
    assert!(
        files(root)
            .iter()
            .chain(&files(child))
            .all(|f| f["socket"].is_null()),
        "memtest opens no socket"
    );
    // Memory: the parent's 32 MiB buffer is one map, all of it in the checkpoint.
    let buffer = root["memory"]["vmas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["end"].as_u64().unwrap() - v["start"].as_u64().unwrap() == 32 << 20)
        .cloned()
        .unwrap_or_else(|| panic!("no 32 MiB map: {:#}", root["memory"]));
    assert_eq!(buffer["dumped_bytes"], 32 << 20);
    assert_eq!(buffer["perms"], "rw-p");
    assert!(root["memory"]["dumped_bytes"].as_u64().unwrap() >= 32 << 20);
    assert!(child["memory"]["dumped_bytes"].as_u64().unwrap() >= 4 << 20);
    assert_eq!(v["summary"]["memory_bytes"], v["criu"]["memory_bytes"]);
    assert!(v["container"].is_null());

    // The text form names the same things.
    let text = String::from_utf8(ck_ok(&["inspect", "--all", s(&a)]).stdout).unwrap();
    for want in [
        format!("{} memtest [alive]", m.pid),
        format!("{} memtest [alive]", m.pids[1]),
        log.clone(),
    ] {
        assert!(text.contains(&want), "{want:?} not in:\n{text}");
    }
    assert!(
        !text.contains(marker),
        "the environment is shown only with --env"
    );

    // Memory reads: the marker is in the parent's environment block.
    let hits = json(&ck_ok(&[
        "inspect",
        "--json",
        "--search",
        &m.pid.to_string(),
        marker,
        s(&a),
    ]));
    let at = hits["addresses"][0].as_u64().expect("the marker in memory");
    let out = ck_ok(&[
        "inspect",
        "--dump-memory",
        &m.pid.to_string(),
        &format!("{at:#x}"),
        &marker.len().to_string(),
        s(&a),
    ]);
    assert_eq!(out.stdout, marker.as_bytes());
    let by_regex = json(&ck_ok(&[
        "inspect",
        "--json",
        "--search-regex",
        &m.pid.to_string(),
        "CKSTREAM_INSPECT_MARKER=[a-z]+-[0-9]",
        s(&a),
    ]));
    assert_eq!(by_regex["addresses"][0], at, "{by_regex}");

    // Diff: the second dump changed 2% of the parent's buffer, nothing of the child's.
    let d = json(&ck_ok(&["diff", "--json", s(&a), s(&b)]));
    let procs = &d["processes"];
    assert!(
        procs["processes_added"].as_array().unwrap().is_empty(),
        "{d:#}"
    );
    assert!(
        procs["processes_gone"].as_array().unwrap().is_empty(),
        "{d:#}"
    );
    let changed = procs["processes_changed"].as_array().unwrap();
    let parent = changed
        .iter()
        .find(|c| c["pid"] == m.pid)
        .unwrap_or_else(|| panic!("{d:#}"));
    let bytes = parent["memory_changed_bytes"].as_u64().unwrap();
    // 2% of 32 MiB is 640 KiB; chunks around the changed runs add to it.
    assert!((640 << 10..4 << 20).contains(&bytes), "{d:#}");
    assert!(
        parent["files_added"].as_array().unwrap().is_empty(),
        "{d:#}"
    );
    // The child's buffer did not change; its stack and libc's data may have.
    if let Some(c) = changed.iter().find(|c| c["pid"] == m.pids[1]) {
        assert!(
            c["memory_changed_bytes"].as_u64().unwrap() < 256 << 10,
            "{d:#}"
        );
    }
    let same = json(&ck_ok(&["diff", "--json", s(&a), s(&a)]));
    assert!(same["processes"]["processes_changed"]
        .as_array()
        .unwrap()
        .is_empty());
    m.kill();
    m.wait_gone();

    // The same answers from object storage.
    if let Some(s3) = crate::support::s3server::shared("inspect_remote") {
        let url = s3.url("inspect/a.cka");
        s3.aws_ok(&["s3", "cp", s(&a), &url]);
        let remote = json(&s3.ck_ok(&["inspect", "--json", "--env", &url]));
        assert_eq!(remote["criu"], v["criu"]);
    }
}

/// A CRIU image that does not decode, in an archive whose chunks are all intact: exit 3,
/// naming the image.
#[test]
fn a_malformed_image_in_a_valid_archive_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    // inventory.img: its magic, then an entry length running past the end.
    let mut inv = 0x5831_3116u32.to_le_bytes().to_vec();
    inv.extend_from_slice(&1000u32.to_le_bytes());
    inv.extend_from_slice(b"short");
    std::fs::write(images.join("inventory.img"), inv).unwrap();
    let a = tmp.path().join("bad.cka");
    ck_ok(&["pack", "-q", "-o", s(&a), &format!("criu={}", s(&images))]);
    let out = ck(&["inspect", s(&a)]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("inventory.img"), "{}", stderr(&out));
}
