//! Signed and encrypted archives through the real CLI: key files, `pack`, `dump` of a
//! real process restored by real CRIU, an S3 server, and what a reader without the
//! right key, or with a tampered archive, gets (a clear error and exit code, no data).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::support::memtest::*;
use crate::support::*;

/// Key pairs alice (signs), bob (opens) and mallory (neither) in `dir`.
struct Keys {
    alice: PathBuf,
    bob: PathBuf,
    mallory: PathBuf,
}

impl Keys {
    fn new(dir: &Path) -> Keys {
        let make = |n: &str| {
            let p = dir.join(n);
            let o = ck_ok(&[
                "key".as_ref(),
                "generate".as_ref(),
                "-o".as_ref(),
                p.as_os_str(),
            ] as &[&OsStr]);
            // The secret key is never printed, only its id.
            let secret = std::fs::read_to_string(&p).unwrap();
            let seed = secret
                .lines()
                .find(|l| l.starts_with("signing-seed"))
                .unwrap();
            assert!(!stderr(&o).contains(seed.split(' ').next_back().unwrap()));
            p
        };
        Keys {
            alice: make("alice"),
            bob: make("bob"),
            mallory: make("mallory"),
        }
    }
}

fn public(p: &Path) -> String {
    format!("{}.pub", p.display())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Bytes of `hay` contain `needle`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn key_files_are_private_and_loose_ones_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Keys::new(tmp.path());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&k.alice), 0o600);
    assert_eq!(mode(Path::new(&public(&k.alice))), 0o644);
    // Never overwritten.
    let o = ck(&["key", "generate", "-o", s(&k.alice)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let id = String::from_utf8(ck_ok(&["key", "id", &public(&k.alice)]).stdout).unwrap();
    assert_eq!(id.trim().len(), 16);

    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();
    std::fs::set_permissions(&k.alice, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = tmp.path().join("a.cka");
    let o = ck(&["pack", "-q", "--sign", s(&k.alice), "-o", s(&out), s(&src)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    assert!(!out.exists());
}

#[test]
fn encrypted_and_signed_archives_round_trip_and_refuse_the_wrong_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Keys::new(tmp.path());
    let src = tmp.path().join("src");
    make_tree(&src);
    let marker = b"the secret marker that must not appear in clear ".repeat(40);
    std::fs::write(src.join("secret.txt"), &marker).unwrap();
    for (codec, shards) in [("none", "1"), ("zstd", "3")] {
        let case = format!("{codec}, {shards} shards");
        let archive = tmp.path().join(format!("{codec}.cka"));
        let tree = format!(".={}", src.display());
        ck_ok(&[
            "pack",
            "-q",
            "-c",
            codec,
            "--shards",
            shards,
            "--encrypt-to",
            &public(&k.bob),
            "--encrypt-to",
            &public(&k.alice),
            "--sign",
            s(&k.alice),
            "-o",
            s(&archive),
            &tree,
        ]);
        let mode = std::fs::metadata(&archive).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{case}");
        for shard in 0..shards.parse::<u32>().unwrap() {
            let bytes = std::fs::read(shard_file(&archive, shard)).unwrap();
            assert!(
                !contains(&bytes, &marker[..48]),
                "{case}: plaintext in shard {shard}"
            );
            assert!(!contains(&bytes, b"secret.txt"), "{case}: a path in clear");
        }
        // No key, or the wrong one: a clear error, exit 1, nothing listed.
        for args in [vec![], vec!["--key", s(&k.mallory)]] {
            let mut a = args.clone();
            a.extend(["ls", s(&archive)]);
            let o = ck(&a);
            assert_eq!(o.status.code(), Some(1), "{case}: {}", stderr(&o));
            assert!(o.stdout.is_empty());
            assert!(stderr(&o).contains("encrypted"), "{case}: {}", stderr(&o));
        }
        // Bob opens it, and alice's signature checks out; alice can open it too.
        let key = ["--key", s(&k.bob), "--trusted-key", &public(&k.alice)];
        let info = ck_ok(&[&key[..], &["info", "--json", s(&archive)]].concat());
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["encrypted"], true, "{case}");
        assert_eq!(info["signature_verified"], true, "{case}");
        ck_ok(&[&key[..], &["verify", s(&archive)]].concat());
        let cat = ck_ok(&["--key", s(&k.alice), "cat", s(&archive), "secret.txt"]);
        assert_eq!(cat.stdout, marker);
        let out = tmp.path().join(format!("out-{codec}"));
        let o = std::process::Command::new(bin())
            .args(["unpack", "-q", s(&archive), "-C", s(&out)])
            .env("CKSTREAM_KEY", &k.bob)
            .env("CKSTREAM_TRUSTED_KEYS", public(&k.alice))
            .output()
            .unwrap();
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        assert_same_tree(&src, &out);
        // Someone else's signature is refused, exit 3.
        let o = ck(&[
            "--key",
            s(&k.bob),
            "--trusted-key",
            &public(&k.mallory),
            "ls",
            s(&archive),
        ]);
        assert_eq!(o.status.code(), Some(3), "{case}");
        assert!(
            stderr(&o).contains("not among the trusted keys"),
            "{}",
            stderr(&o)
        );

        // One flipped bit in a chunk: verify and cat fail with exit 3.
        let bytes = std::fs::read(&archive).unwrap();
        let at = bytes.len() / 2;
        let mut bad = bytes.clone();
        bad[at] ^= 0x10;
        std::fs::write(&archive, &bad).unwrap();
        let o = ck(&[&key[..], &["verify", s(&archive)]].concat());
        assert_eq!(o.status.code(), Some(3), "{case}: {}", stderr(&o));
        std::fs::write(&archive, &bytes).unwrap();
    }
}

#[test]
fn an_unsigned_archive_is_refused_when_a_signature_is_required() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Keys::new(tmp.path());
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();
    let plain = tmp.path().join("plain.cka");
    ck_ok(&["pack", "-q", "-o", s(&plain), s(&src)]);
    let o = ck(&[
        "--trusted-key",
        &public(&k.alice),
        "cat",
        s(&plain),
        "src/f",
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("not signed"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    // Signed only: readable by anyone, verifiable by those who trust alice.
    let signed = tmp.path().join("signed.cka");
    ck_ok(&[
        "pack",
        "-q",
        "--sign",
        s(&k.alice),
        "-o",
        s(&signed),
        s(&src),
    ]);
    assert_eq!(ck_ok(&["cat", s(&signed), "src/f"]).stdout, b"data");
    let info = String::from_utf8(ck_ok(&["info", s(&signed)]).stdout).unwrap();
    assert!(info.contains("not checked"), "{info}");
    assert_eq!(
        ck_ok(&[
            "--trusted-key",
            &public(&k.alice),
            "cat",
            s(&signed),
            "src/f"
        ])
        .stdout,
        b"data"
    );
}

/// A real process dumped into an encrypted, signed archive (on a local file and on S3)
/// and restored from it: it beats and its memory checks out; without the key, restore
/// fails before CRIU runs and the process is not restored.
#[test]
fn dump_encrypted_and_restore_with_the_key() {
    if !criu_available("dump_encrypted_and_restore_with_the_key") {
        return;
    }
    let _heavy = heavy_lock();
    let tmp = tempfile::tempdir().unwrap();
    let k = Keys::new(tmp.path());
    let archive = tmp.path().join("ckpt.cka");
    let children = 1;
    let m = Memtest::start(32, children);
    m.assert_beating();
    let bob_pub = public(&k.bob);
    ck_ok(&dump_args(
        m.pid,
        &archive,
        "lz4",
        2,
        &["--encrypt-to", &bob_pub, "--sign", s(&k.alice)],
    ));
    m.wait_gone();
    // The test program's memory pattern is not in the archive in clear.
    let needle = m.needle();
    let bytes = std::fs::read(&archive).unwrap();
    assert!(!contains(&bytes, needle.as_bytes()));
    let o = ck(&["restore", "-q", s(&archive)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("encrypted"), "{}", stderr(&o));
    assert!(!m.alive());
    ck_ok(&[
        "--key",
        s(&k.bob),
        "--trusted-key",
        &public(&k.alice),
        "restore",
        "-q",
        s(&archive),
    ]);
    m.assert_beating();
    m.assert_memory_intact(children);
}

#[test]
fn encrypted_archives_on_s3_read_lazily_with_the_key() {
    let Some(s3) =
        crate::support::s3server::shared("encrypted_archives_on_s3_read_lazily_with_the_key")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let k = Keys::new(tmp.path());
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let big = prng_bytes(7, 6 << 20);
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("small"), b"small file").unwrap();
    let url = s3.url("keys/enc.cka");
    let tree = format!(".={}", src.display());
    s3.ck_ok(&[
        "pack",
        "-q",
        "--shards",
        "2",
        "--encrypt-to",
        &public(&k.bob),
        "-o",
        &url,
        &tree,
    ]);
    let o = s3.ck(&["ls", &url]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        s3.ck_ok(&["--key", s(&k.bob), "cat", &url, "big"]).stdout,
        big
    );
    let listing = String::from_utf8(s3.ck_ok(&["--key", s(&k.bob), "ls", &url]).stdout).unwrap();
    assert!(listing.lines().any(|l| l == "small"), "{listing}");
    s3.ck_ok(&["--key", s(&k.bob), "verify", &url]);
}
