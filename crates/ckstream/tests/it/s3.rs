//! `s3://` archives against a real SeaweedFS server on 127.0.0.1 (scripts/s3-server.sh):
//! round trips for 1 and 4 shards with and without compression, request and byte
//! counts of `ls`, `info` and `cat`, and faults: the server killed mid-upload, an
//! interrupted upload, a tampered shard object, a missing shard object, wrong
//! credentials.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::support::s3server::{s3_stats, S3Server};
use crate::support::*;

fn osv(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(|s| s.into()).collect()
}

fn stat(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap()
}

fn round_trip(codec: &str, shards: u32) {
    let Some(s3) = crate::support::s3server::shared("round_trip") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let url = s3.url(&format!("roundtrip/{codec}-{shards}/a.cka"));
    let shards_s = shards.to_string();
    let tree = format!(".={}", src.display());
    s3.ck_ok(&[
        "pack", "-q", "-c", codec, "--shards", &shards_s, "-o", &url, &tree,
    ]);
    let keys = s3.objects(&format!("roundtrip/{codec}-{shards}/"));
    // Shards 1.. are named by the first 8 bytes of the archive id.
    let info: serde_json::Value =
        serde_json::from_slice(&s3.ck_ok(&["info", "--json", &url]).stdout).unwrap();
    let id = info["archive_id"].as_str().unwrap()[..16].to_string();
    let want: Vec<String> = (0..shards)
        .map(|i| {
            let k = format!("roundtrip/{codec}-{shards}/a.cka");
            if i == 0 {
                k
            } else {
                format!("{k}.{id}.{i}")
            }
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(sorted, want_sorted, "objects after pack");
    assert!(s3
        .multipart_uploads(&format!("roundtrip/{codec}-{shards}/"))
        .is_empty());

    // The same tree packed locally lists the same.
    let local = tmp.path().join("local.cka");
    ck_ok(&[
        "pack".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        local.as_os_str(),
        tree.as_ref(),
    ] as &[&OsStr]);
    let remote_ls = s3.ck_ok(&["ls", "-l", &url]).stdout;
    let local_ls = ck_ok(&["ls".as_ref(), "-l".as_ref(), local.as_os_str()] as &[&OsStr]).stdout;
    assert_eq!(
        String::from_utf8_lossy(&remote_ls),
        String::from_utf8_lossy(&local_ls)
    );

    let info: serde_json::Value =
        serde_json::from_slice(&s3.ck_ok(&["info", "--json", &url]).stdout).unwrap();
    assert_eq!(info["shards"], shards);
    let verify = s3.ck_ok(&["verify", &url]);
    assert!(String::from_utf8_lossy(&verify.stdout).starts_with("OK"));
    let cat = s3.ck_ok(&["cat", &url, "dir/nested/random-3.5m"]);
    assert_eq!(
        cat.stdout,
        std::fs::read(src.join("dir/nested/random-3.5m")).unwrap()
    );

    let out = tmp.path().join("out");
    s3.ck_ok(&["unpack", "-q", &url, "-C", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
}

cases!(round_trip:
    round_trip_none_1_shard("none", 1),
    round_trip_none_4_shards("none", 4),
    round_trip_zstd_1_shard("zstd", 1),
    round_trip_zstd_4_shards("zstd", 4),
);

/// A tree with a 1 MiB file among 40 MiB of other data, packed into `shards` shards.
fn pack_counted(s3: &S3Server, key: &str, codec: &str, shards: u32) -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("one-mib"), prng_bytes(1, 1 << 20)).unwrap();
    std::fs::write(src.join("eight-mib"), prng_bytes(2, 8 << 20)).unwrap();
    for i in 0..32u64 {
        std::fs::write(src.join(format!("d/f{i}")), prng_bytes(10 + i, 1 << 20)).unwrap();
    }
    for i in 0..300u64 {
        std::fs::write(src.join(format!("d/small{i}")), format!("small file {i}\n")).unwrap();
    }
    let url = s3.url(key);
    let tree = format!(".={}", src.display());
    let shards_s = shards.to_string();
    s3.ck_ok(&[
        "pack", "-q", "-c", codec, "--shards", &shards_s, "-o", &url, &tree,
    ]);
    (tmp, url)
}

#[test]
fn ls_info_and_cat_fetch_only_what_they_need() {
    let Some(s3) = crate::support::s3server::shared("ls_info_and_cat_fetch_only_what_they_need")
    else {
        return;
    };
    for shards in [1u32, 4] {
        let (tmp, url) = pack_counted(s3, &format!("counted/{shards}/a.cka"), "none", shards);
        let src = tmp.path().join("src");
        let info: serde_json::Value =
            serde_json::from_slice(&s3.ck_ok(&["info", "--json", &url]).stdout).unwrap();
        let index_bytes = info["index_bytes"].as_u64().unwrap();
        let archive_bytes = info["archive_bytes"].as_u64().unwrap();
        assert!(archive_bytes > 40 << 20);

        let ls = s3.ck_ok(&["ls", &url]);
        let st = s3_stats(&ls);
        assert!(
            stat(&st, "get_requests") <= 2,
            "ls with {shards} shards: {st}"
        );
        assert_eq!(stat(&st, "put_requests") + stat(&st, "other_requests"), 0);
        assert!(String::from_utf8_lossy(&ls.stdout).contains("d/small299"));

        let info = s3.ck_ok(&["info", &url]);
        let st = s3_stats(&info);
        // The index records the other shards' sizes: none of them is asked.
        assert!(
            stat(&st, "get_requests") <= 2,
            "info with {shards} shards: {st}"
        );

        let cat = s3.ck_ok(&["cat", &url, "one-mib"]);
        assert_eq!(cat.stdout, std::fs::read(src.join("one-mib")).unwrap());
        let st = s3_stats(&cat);
        assert!(
            stat(&st, "get_bytes") <= (2 << 20) + index_bytes,
            "cat of 1 MiB with {shards} shards: {st}, index {index_bytes}"
        );
        // Shard 0's tail and header, the chunk; with several shards also the other
        // shard's header and footer check.
        assert!(stat(&st, "get_requests") <= 3 + 2, "cat requests: {st}");

        // An 8 MiB file in 8 chunks: adjacent chunks are merged, so far fewer requests
        // than chunks (one shard), or about one per shard.
        let cat = s3.ck_ok(&["cat", &url, "eight-mib"]);
        assert_eq!(cat.stdout, std::fs::read(src.join("eight-mib")).unwrap());
        let st = s3_stats(&cat);
        let data_requests = stat(&st, "get_requests") - 2;
        assert!(
            data_requests <= 3 * shards as u64,
            "cat of 8 chunks with {shards} shards: {st}"
        );
        assert!(
            stat(&st, "get_bytes") <= (9 << 20) + index_bytes + (shards as u64 * (16 << 10)),
            "cat of 8 MiB: {st}"
        );
    }
}

/// Random data first (its parts go out quickly), then text that zstd -19 compresses
/// slowly, so a fault injected once the uploads have started surely lands mid-upload.
fn slow_tree(src: &Path) {
    std::fs::create_dir_all(src).unwrap();
    for i in 0..2u64 {
        std::fs::write(src.join(format!("a{i}")), prng_bytes(i, 48 << 20)).unwrap();
    }
    let text: String = (0..4_000_000u32).map(|i| format!("line {i}\n")).collect();
    std::fs::write(src.join("z-text"), text).unwrap();
}

/// Starts packing a slow tree (see [`slow_tree`], made under `tmp`) into object `key`
/// with `shards` shards in the background, and returns once all its multipart uploads
/// exist and at least one part has arrived (so an interruption is mid-upload).
fn start_slow_pack(
    s3: &S3Server,
    tmp: &Path,
    key: &str,
    shards: usize,
    env: &[(&str, &str)],
) -> Child {
    let src = tmp.join("src");
    slow_tree(&src);
    let shard_count = shards.to_string();
    let child = s3
        .command(bin())
        .env("CKSTREAM_S3_STATS", "1")
        .envs(env.iter().copied())
        .args(osv(&[
            "pack",
            "-q",
            "-c",
            "zstd:19",
            "--shards",
            &shard_count,
            "-o",
            &s3.url(key),
        ]))
        .arg(format!(".={}", src.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let prefix = &key[..key.rfind('/').map_or(0, |i| i + 1)];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let uploads = s3.multipart_uploads(prefix);
        if uploads.len() >= shards
            && uploads
                .iter()
                .any(|(key, id)| s3.uploaded_parts(key, id) > 0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the uploads never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn killed_server_mid_upload_leaves_no_archive() {
    let Some(s3) = S3Server::start("killed_server_mid_upload_leaves_no_archive") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let url = s3.url("killed/a.cka");
    // Kill the server once the upload is under way.
    let child = start_slow_pack(
        &s3,
        tmp.path(),
        "killed/a.cka",
        2,
        &[("CKSTREAM_S3_RETRY_SECS", "2")],
    );
    s3.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&url) && err.contains("failed; no archive was written"),
        "{err}"
    );
    assert!(err.contains("killed/a.cka"), "{err}");
    let st = s3_stats(&out);
    assert!(stat(&st, "put_requests") > 0, "no part was uploaded: {st}");

    s3.restart();
    let keys = s3.objects("killed/");
    assert!(keys.is_empty(), "objects after a failed upload: {keys:?}");
    let ls = s3.ck(&["ls", &url]);
    assert_ne!(ls.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&ls.stderr).contains("not found"),
        "{}",
        stderr(&ls)
    );
    // The uploads could not be aborted while the server was down: each one left is
    // named, with its upload id, in a warning (a lifecycle rule or `aws s3api
    // abort-multipart-upload` removes them).
    let left = s3.multipart_uploads("killed/");
    for (key, id) in &left {
        assert!(
            err.contains(id.as_str()) && err.contains(key.as_str()),
            "upload {key} {id} left without a warning: {err}"
        );
    }
}

#[test]
fn interrupted_upload_is_aborted_completely() {
    let Some(s3) = crate::support::s3server::shared("interrupted_upload_is_aborted_completely")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let child = start_slow_pack(s3, tmp.path(), "interrupted/a.cka", 3, &[]);
    signal(child.id(), rustix::process::Signal::TERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let st = s3_stats(&out);
    assert!(stat(&st, "put_requests") > 0, "no part was uploaded: {st}");
    assert!(s3.objects("interrupted/").is_empty());
    assert!(
        s3.multipart_uploads("interrupted/").is_empty(),
        "multipart uploads left after an interrupted pack"
    );
}

/// Replaces object `key` by its bytes with one byte flipped at `at` (from the end when
/// negative).
fn tamper(s3: &S3Server, dir: &Path, key: &str, at: i64) {
    let local = dir.join("tampered");
    let object = format!("s3://{}/{key}", s3.bucket);
    s3.aws_ok(&["s3", "cp", "--quiet", &object, local.to_str().unwrap()]);
    let mut bytes = std::fs::read(&local).unwrap();
    let i = if at < 0 {
        bytes.len() - (-at) as usize
    } else {
        at as usize
    };
    bytes[i] ^= 0x40;
    std::fs::write(&local, bytes).unwrap();
    s3.aws_ok(&["s3", "cp", "--quiet", local.to_str().unwrap(), &object]);
}

#[test]
fn tampered_shard_object_is_refused_with_exit_3() {
    let Some(s3) = crate::support::s3server::shared("tampered_shard_object_is_refused_with_exit_3")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("data"), prng_bytes(7, 6 << 20)).unwrap();
    let url = s3.url("tampered/a.cka");
    let tree = format!(".={}", src.display());
    s3.ck_ok(&["pack", "-q", "-c", "none", "-o", &url, &tree]);
    // The middle of the only file's data.
    tamper(s3, tmp.path(), "tampered/a.cka", 3 << 20);

    let verify = s3.ck(&["verify", &url]);
    assert_eq!(verify.status.code(), Some(3), "{}", stderr(&verify));
    assert!(
        stderr(&verify).contains("digest mismatch"),
        "{}",
        stderr(&verify)
    );

    let cat = s3.ck(&["cat", &url, "data"]);
    assert_eq!(cat.status.code(), Some(3), "{}", stderr(&cat));
    assert!(stderr(&cat).contains("digest mismatch"));
    assert!(
        cat.stdout.len() < 6 << 20,
        "cat wrote the whole damaged file"
    );

    let out = tmp.path().join("out");
    let unpack = s3.ck(&["unpack", "-q", &url, "-C", out.to_str().unwrap()]);
    assert_eq!(unpack.status.code(), Some(3), "{}", stderr(&unpack));
    assert!(stderr(&unpack).contains("digest mismatch"));
    assert!(!out.join("data").exists(), "damaged file extracted");
}

#[test]
fn missing_shard_object_is_named() {
    let Some(s3) = crate::support::s3server::shared("missing_shard_object_is_named") else {
        return;
    };
    let (_tmp, url) = pack_counted(s3, "missing/a.cka", "zstd", 4);
    // Shards 1.. are named by the archive id: KEY.<first 8 id bytes in hex>.i.
    let info: serde_json::Value =
        serde_json::from_slice(&s3.ck_ok(&["info", "--json", &url]).stdout).unwrap();
    let id = info["archive_id"].as_str().unwrap();
    let object = format!("{url}.{}.2", &id[..16]);
    s3.aws_ok(&["s3", "rm", "--quiet", &object]);
    let out_dir = tempfile::tempdir().unwrap();
    let out_dir = out_dir.path().to_str().unwrap();
    for args in [
        vec!["verify", &url],
        vec!["unpack", "-q", &url, "-C", out_dir],
    ] {
        let out = s3.ck(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        assert!(
            err.contains(&format!("{object} does not exist")),
            "{args:?}: {err}"
        );
    }
    let gone = s3.ck(&["ls", &s3.url("missing/nothing-here.cka")]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(stderr(&gone).contains("missing/nothing-here.cka"));
    assert!(stderr(&gone).contains("not found"), "{}", stderr(&gone));
}

#[test]
fn wrong_credentials_are_reported_without_the_secret() {
    let Some(s3) =
        crate::support::s3server::shared("wrong_credentials_are_reported_without_the_secret")
    else {
        return;
    };
    let (_tmp, url) = pack_counted(s3, "creds/a.cka", "zstd", 1);
    let secret = "wrong-secret-Zq8vX3";
    let run = |args: &[&str], key_id: &str| {
        s3.command(bin())
            .env("AWS_ACCESS_KEY_ID", key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .args(args)
            .output()
            .unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"x").unwrap();
    let tree = format!(".={}", tmp.path().display());
    let new_url = s3.url("creds/new.cka");
    let key_id = s3
        .env
        .iter()
        .find(|(k, _)| k == "AWS_ACCESS_KEY_ID")
        .unwrap()
        .1
        .clone();
    for key in [key_id.as_str(), "unknown-access-key"] {
        for args in [
            vec!["ls", url.as_str()],
            vec!["pack", "-q", "-o", new_url.as_str(), tree.as_str()],
        ] {
            let out = run(&args, key);
            let all = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
            assert_eq!(out.status.code(), Some(1), "{args:?}: {all}");
            assert!(all.contains("refused the credentials"), "{args:?}: {all}");
            assert!(!all.contains(secret), "secret printed: {all}");
        }
    }
    assert_eq!(s3.objects("creds/new.cka"), Vec::<String>::new());
}

#[test]
fn credentials_and_endpoint_from_aws_config_files() {
    let Some(s3) =
        crate::support::s3server::shared("credentials_and_endpoint_from_aws_config_files")
    else {
        return;
    };
    let (_tmp, url) = pack_counted(s3, "profile/a.cka", "zstd", 1);
    let get = |k: &str| s3.env.iter().find(|(n, _)| n == k).unwrap().1.clone();
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    let config = dir.path().join("config");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n\
             [bench]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            get("AWS_ACCESS_KEY_ID"),
            get("AWS_SECRET_ACCESS_KEY")
        ),
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "[profile bench]\nregion = us-east-1\nendpoint_url = {}\n",
            get("AWS_ENDPOINT_URL")
        ),
    )
    .unwrap();
    // Nothing in the environment but the profile and where its files are.
    let run = |profile: Option<&str>| {
        let mut c = s3.command(bin());
        for (k, _) in &s3.env {
            if k.starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        c.env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
            .env("AWS_CONFIG_FILE", &config)
            .env("HOME", dir.path());
        if let Some(p) = profile {
            c.env("AWS_PROFILE", p);
        }
        c.args(["ls", &url]).output().unwrap()
    };
    let out = run(Some("bench"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("one-mib"));

    // No credentials anywhere: a clear refusal, without asking a metadata service.
    std::fs::write(&credentials, "").unwrap();
    let out = run(Some("bench"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no S3 credentials"),
        "{}",
        stderr(&out)
    );
}
