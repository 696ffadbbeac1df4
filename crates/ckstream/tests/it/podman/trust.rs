//! Untrusted podman archives (real podman): rootfs diffs podman would apply through a
//! symlink on the host, and container settings (hooks, privileged mode, host mounts,
//! added capabilities) that need `--trust-config`.

use std::io::Read;
use std::path::Path;
use std::process::Output;

use super::{assert_alive_and_intact, have_podman, podman, podman_ok, start, start_from, IMAGE};
use crate::support::*;

/// A tar header for a member of the nested rootfs-diff.tar with any name and link
/// target (the tar crate's builder refuses absolute link targets).
fn raw_header(name: &str, kind: tar::EntryType, link: &str, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.as_mut_bytes()[..name.len()].copy_from_slice(name.as_bytes());
    h.as_mut_bytes()[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h.set_size(size);
    h.set_mode(if kind == tar::EntryType::Symlink {
        0o777
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(kind);
    h.set_cksum();
    h
}

/// A member to add to rootfs-diff.tar: name, `Some(target)` for a symlink, else a file
/// holding `planted`.
type DiffAdd<'a> = (&'a str, Option<&'a str>);

/// `tar` with `add` appended after its last member.
fn append_to_tar(tar: &[u8], add: &[DiffAdd]) -> Vec<u8> {
    let mut end = 0u64;
    let mut ar = tar::Archive::new(tar);
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        end = end.max((e.raw_file_position() + e.size()).div_ceil(512) * 512);
    }
    let mut out = tar[..end as usize].to_vec();
    for (name, link) in add {
        match link {
            Some(target) => out
                .extend_from_slice(raw_header(name, tar::EntryType::Symlink, target, 0).as_bytes()),
            None => {
                let data = b"planted\n";
                out.extend_from_slice(
                    raw_header(name, tar::EntryType::Regular, "", data.len() as u64).as_bytes(),
                );
                out.extend_from_slice(data);
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
        }
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Copies the podman export `src` to `dst`, appending `add` to its rootfs-diff.tar,
/// replacing deleted.files by `deleted` (when given) and letting `edit` change
/// `config.dump` and `spec.dump`.
fn rewrite_export(
    src: &Path,
    dst: &Path,
    add: &[DiffAdd],
    deleted: Option<&[String]>,
    edit: &Edit,
) {
    let mut out = tar::Builder::new(Vec::new());
    let mut ar = tar::Archive::new(std::fs::File::open(src).unwrap());
    let mut seen_deleted = false;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let mut h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        match name.as_str() {
            "rootfs-diff.tar" if !add.is_empty() => data = append_to_tar(&data, add),
            "deleted.files" => {
                seen_deleted = true;
                if let Some(d) = deleted {
                    data = serde_json::to_vec(d).unwrap();
                }
            }
            "config.dump" | "spec.dump" => {
                let mut v: serde_json::Value = serde_json::from_slice(&data).unwrap();
                edit(&name, &mut v);
                data = serde_json::to_vec(&v).unwrap();
            }
            _ => {}
        }
        h.set_size(data.len() as u64);
        out.append_data(&mut h, &name, &data[..]).unwrap();
    }
    if let (Some(d), false) = (deleted, seen_deleted) {
        let data = serde_json::to_vec(d).unwrap();
        let mut h = raw_header(
            "deleted.files",
            tar::EntryType::Regular,
            "",
            data.len() as u64,
        );
        h.set_mode(0o600);
        out.append_data(&mut h, "deleted.files", &data[..]).unwrap();
    }
    std::fs::write(dst, out.into_inner().unwrap()).unwrap();
}

/// Changes `config.dump` or `spec.dump` (by name).
type Edit = dyn Fn(&str, &mut serde_json::Value);

fn no_edit(_: &str, _: &mut serde_json::Value) {}

fn exists(ctr: &str) -> bool {
    podman(&["container", "exists", ctr]).status.success()
}

/// `ckstream podman restore ARGS` is refused with exit `code`, says `says`, and leaves
/// no container behind.
fn assert_refused(args: &[&str], code: i32, says: &[&str], ctr: &str) -> Output {
    let mut all = vec!["podman", "restore"];
    all.extend_from_slice(args);
    let o = ck(&all);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    for s in says {
        assert!(err.contains(s), "{args:?}: {s:?} not in: {err}");
    }
    assert!(
        !err.contains("podman could not restore"),
        "{args:?}: podman was called: {err}"
    );
    assert!(!exists(ctr), "{args:?}: a container was left behind");
    o
}

/// An image like the test image with `/hostroot -> /` in a layer of its own.
struct HostlinkImage(&'static str);

impl HostlinkImage {
    fn build() -> HostlinkImage {
        let image = "localhost/ckstream-memtest-hostlink";
        let build = "ck-hostlink-build";
        let _ = podman(&["rm", "-f", "-t", "0", build]);
        podman_ok(&[
            "run",
            "--name",
            build,
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            IMAGE,
            "/bin/ln",
            "-s",
            "/",
            "/hostroot",
        ]);
        podman_ok(&["commit", "-q", build, image]);
        podman_ok(&["rm", "-f", build]);
        HostlinkImage(image)
    }
}

impl Drop for HostlinkImage {
    fn drop(&mut self) {
        let _ = podman(&["rmi", "-f", self.0]);
    }
}

/// Deleted paths and diff members that podman 4.3 would resolve through a symlink on
/// the host — `x -> /` in rootfs-diff.tar, `/hostroot -> /` in the image — are refused
/// before podman sees the archive where podman applies the diff (`--apply-diff podman`,
/// for podman exports and `.cka` archives); where ckstream places it into podman's
/// storage (the default) or its hook applies it, they are refused without following the
/// link. The host files stay, no container is created; the unmodified export of the
/// same container (whose image has that link) restores.
#[test]
fn deletions_and_writes_through_symlinks_are_refused() {
    if !have_podman("symlinks") {
        return;
    }
    let image = HostlinkImage::build();
    let name = "ck-symlinks";
    let ctr = start_from(name, image.0);
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).to_string_lossy().into_owned();
    // The host files an attacker aims at.
    let victims = tempfile::tempdir().unwrap();
    let victim = victims.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let v = victim.to_str().unwrap();
    let planted = victims.path().join("planted");
    podman_ok(&[
        "container",
        "checkpoint",
        "-e",
        &s("e0.tar"),
        "--compress",
        "none",
        name,
    ]);
    podman_ok(&["rm", "-f", name]);

    // A symlink in the diff, then a deletion through it.
    rewrite_export(
        &p("e0.tar"),
        &p("diff-del.tar"),
        &[("x", Some("/"))],
        Some(&[format!("/x{v}")]),
        &no_edit,
    );
    assert_refused(
        &[&s("diff-del.tar"), "--apply-diff", "podman"],
        3,
        &[&format!(
            "deleted.files entry /x{v} passes through /x, a symlink (-> /) in rootfs-diff.tar"
        )],
        name,
    );
    // ... or a file written through it.
    let through = format!("x{}", planted.display());
    rewrite_export(
        &p("e0.tar"),
        &p("diff-write.tar"),
        &[("x", Some("/")), (&through, None)],
        None,
        &no_edit,
    );
    assert_refused(
        &[&s("diff-write.tar"), "--apply-diff", "podman"],
        3,
        &[&format!(
            "rootfs-diff.tar member /{through} passes through /x"
        )],
        name,
    );
    // A symlink only the image has.
    let via_image = [format!("/hostroot{v}")];
    rewrite_export(
        &p("e0.tar"),
        &p("image-del.tar"),
        &[],
        Some(&via_image),
        &no_edit,
    );
    assert_refused(
        &[&s("image-del.tar"), "--apply-diff", "podman"],
        3,
        &[&format!(
            "passes through /hostroot, a symlink (-> /) in the image {}",
            image.0
        )],
        name,
    );
    // An image that is not here cannot be checked: refused, podman never pulls it.
    // (Already podman's own diff member /tmp/hb needs the image: podman's diffs leave
    // unchanged parent directories out.)
    rewrite_export(
        &p("e0.tar"),
        &p("no-image.tar"),
        &[],
        Some(&via_image),
        &|n, v| {
            if n == "config.dump" {
                v["rootfsImageID"] = "0".repeat(64).into();
                v["rootfsImageName"] = "localhost/ckstream-no-such-image:latest".into();
            }
        },
    );
    assert_refused(
        &[&s("no-image.tar"), "--apply-diff", "podman"],
        1,
        &[
            "is not in the rootfs diff and the image localhost/ckstream-no-such-image:latest is not on this host",
            "podman pull localhost/ckstream-no-such-image:latest",
        ],
        name,
    );

    // The default on podman's kernel overlay storage: ckstream imports the export and
    // places the diff itself, never following a link — the link of the diff cannot
    // even enter the archive, the image's is refused while the parents are copied up.
    for (tar, says) in [
        (
            "diff-del.tar",
            "is inside \"rootfs/x\", which is not a directory",
        ),
        (
            "diff-write.tar",
            "is inside \"rootfs/x\", which is not a directory",
        ),
        (
            "image-del.tar",
            "/hostroot, which is a symlink (-> /) in the container's image",
        ),
    ] {
        let o = ck(&["podman", "restore", &s(tar)]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(3), "{tar}: {err}");
        assert!(err.contains(says), "{tar}: {says:?} not in: {err}");
        assert!(!exists(name), "{tar}: a container was left behind");
    }

    // The same as a .cka: with podman applying the diff, refused before podman runs;
    // with ckstream's hook, the hook opens every component O_NOFOLLOW and refuses to
    // delete through the link, so runc never restores the container; placed into the
    // storage (the default), the link's copy-up is refused.
    ck_ok(&[
        "podman",
        "import",
        &s("image-del.tar"),
        "-o",
        &s("image-del.cka"),
    ]);
    assert_refused(
        &[&s("image-del.cka"), "--apply-diff", "podman"],
        3,
        &[&format!(
            "deleted.files entry /hostroot{v} passes through /hostroot"
        )],
        name,
    );
    for (flags, says) in [
        (
            &["--apply-diff", "hook"][..],
            format!(
                "\"hostroot{}\" in the target is not a directory (a symlink?); refusing to delete through it",
                victims.path().display()
            ),
        ),
        (
            &[][..],
            "the rootfs diff writes below /hostroot, which is a symlink (-> /) in the container's image".to_string(),
        ),
    ] {
        let archive = s("image-del.cka");
        let mut args = vec!["podman", "restore", &archive];
        args.extend_from_slice(flags);
        let o = ck(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(3), "{flags:?}: {err}");
        assert!(err.contains(&says), "{flags:?}: {err}");
        assert!(!exists(name), "{flags:?}: a container was left behind");
    }
    // A .cka whose own diff has the link and whose podman/deleted.files goes through it.
    ck_ok(&["podman", "import", &s("e0.tar"), "-o", &s("e0.cka")]);
    ck_ok(&["unpack", "-q", &s("e0.cka"), "-C", &s("tree")]);
    std::os::unix::fs::symlink("/", p("tree/rootfs/x")).unwrap();
    std::fs::write(
        p("tree/podman/deleted.files"),
        serde_json::to_vec(&[format!("/x{v}")]).unwrap(),
    )
    .unwrap();
    ck_ok(&[
        "pack",
        "-q",
        "-o",
        &s("diff-del.cka"),
        &format!(".={}", s("tree")),
    ]);
    assert_refused(
        &[&s("diff-del.cka"), "--apply-diff", "podman"],
        3,
        &[&format!(
            "deleted.files entry /x{v} passes through /x, a symlink (-> /) in rootfs-diff.tar"
        )],
        name,
    );

    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!planted.exists());
    // The export as podman wrote it passes the same checks (its diff's /tmp is looked
    // up in the image) and restores.
    ck_ok(&["podman", "restore", &s("e0.tar")]);
    assert_alive_and_intact(name);
    drop(ctr);
}

/// Settings that let an archive reach the host are shown and refused without
/// `--trust-config` — a prestart hook, privileged mode, a bind mount of a host
/// directory, CAP_SYS_ADMIN — and each is named; with `--trust-config` the archive
/// restores (the hook really runs on the host, the container with CAP_SYS_ADMIN runs
/// on, memory intact). ckstream's own checkpoints need no flag, also a checkpoint of a
/// container ckstream restored, whose spec carries ckstream's restore hook.
#[test]
fn untrusted_container_settings_need_trust_config() {
    if !have_podman("trust") {
        return;
    }
    let name = "ck-trust";
    let ctr = start(name);
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).to_string_lossy().into_owned();
    let host_dir = tempfile::tempdir().unwrap();
    let hd = host_dir.path().to_str().unwrap().to_string();
    let hook_ran = host_dir.path().join("hook-ran");
    ck_ok(&[
        "podman",
        "checkpoint",
        name,
        "--leave-running",
        "-o",
        &s("own.cka"),
    ]);
    ck_ok(&[
        "podman",
        "checkpoint",
        name,
        "--format",
        "podman",
        "-o",
        &s("e0.tar"),
    ]);
    podman_ok(&["rm", "-f", name]);

    let caps = |v: &mut serde_json::Value| {
        for set in ["bounding", "effective", "permitted"] {
            v["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .push("CAP_SYS_ADMIN".into());
        }
    };
    let hook_path = hook_ran.to_str().unwrap().to_string();
    let cases: Vec<(&str, Box<Edit>, String)> = vec![
        (
            "hook",
            Box::new(move |n, v| {
                if n == "spec.dump" {
                    v["hooks"]["prestart"] =
                        serde_json::json!([{"path": "/bin/touch", "args": ["touch", hook_path]}]);
                }
            }),
            format!(
                "OCI hooks (prestart hook /bin/touch {})",
                hook_ran.display()
            ),
        ),
        (
            "privileged",
            Box::new(|n, v| {
                if n == "config.dump" {
                    v["privileged"] = true.into();
                }
            }),
            "privileged mode (privileged: true in config.dump)".into(),
        ),
        (
            "bind",
            Box::new({
                let hd = hd.clone();
                move |n, v| {
                    if n == "spec.dump" {
                        v["mounts"].as_array_mut().unwrap().push(serde_json::json!(
                            {"destination": "/mnt/host", "type": "bind", "source": hd, "options": ["rbind", "rw"]}
                        ));
                    }
                }
            }),
            format!("host mounts ({hd} at /mnt/host (bind))"),
        ),
        (
            "cap",
            Box::new(move |n, v| {
                if n == "spec.dump" {
                    caps(v);
                }
            }),
            "added capabilities (CAP_SYS_ADMIN)".into(),
        ),
    ];
    for (what, edit, named) in &cases {
        let tar = s(&format!("{what}.tar"));
        rewrite_export(&p("e0.tar"), Path::new(&tar), &[], None, edit.as_ref());
        assert_refused(
            &[&tar],
            3,
            &[
                &format!("refusing to restore: the archive asks for {named}; pass --trust-config if you trust its origin"),
                "container config: image localhost/ckstream-memtest:latest, user 0:0; asks for ",
            ],
            name,
        );
    }
    // --json: the settings on stdout, refused.
    let o = ck(&["podman", "restore", &s("cap.tar"), "--json"]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["refused"], true, "{v}");
    assert_eq!(
        v["config"]["added_capabilities"],
        serde_json::json!(["CAP_SYS_ADMIN"]),
        "{v}"
    );
    assert!(!hook_ran.exists(), "the hook ran although refused");

    // Trusted: the hook runs on the host during the restore (which is why it is refused).
    ck_ok(&["podman", "restore", &s("hook.tar"), "--trust-config"]);
    assert!(hook_ran.exists(), "the trusted prestart hook did not run");
    podman_ok(&["rm", "-f", name]);
    let o = ck_ok(&[
        "podman",
        "restore",
        &s("cap.tar"),
        "--trust-config",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trust"], "--trust-config", "{v}");
    assert_eq!(
        v["config"]["added_capabilities"],
        serde_json::json!(["CAP_SYS_ADMIN"]),
        "{v}"
    );
    assert_alive_and_intact(name);
    let caps = podman_ok(&["inspect", "-f", "{{.EffectiveCaps}}", name]);
    assert!(caps.contains("CAP_SYS_ADMIN"), "{caps}");
    podman_ok(&["rm", "-f", name]);

    // ckstream's own checkpoint, and one of the container it restored with the hook (its
    // spec now holds ckstream's restore hook), restore without any flag.
    let o = ck_ok(&[
        "podman",
        "restore",
        &s("own.cka"),
        "--apply-diff",
        "hook",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trust"], "not needed", "{v}");
    assert_alive_and_intact(name);
    ck_ok(&["podman", "checkpoint", name, "-o", &s("again.cka")]);
    let spec = ck_ok(&["cat", &s("again.cka"), "podman/spec.dump"]).stdout;
    assert!(
        String::from_utf8_lossy(&spec).contains("__podman-rootfs-hook"),
        "the second checkpoint does not carry ckstream's hook"
    );
    podman_ok(&["rm", "-f", name]);
    let o = ck_ok(&["podman", "restore", &s("again.cka")]);
    assert!(
        stderr(&o).contains("no host mounts, devices or hooks"),
        "{}",
        stderr(&o)
    );
    assert_alive_and_intact(name);
    let bundle = podman_ok(&["inspect", "-f", "{{.StaticDir}}", name]);
    let spec = std::fs::read_to_string(Path::new(bundle.trim()).join("config.json")).unwrap();
    assert_eq!(
        spec.matches("__podman-rootfs-hook").count(),
        1,
        "hooks pile up: {spec}"
    );
    drop(ctr);
}

/// An encrypted checkpoint restores only with a recipient's key (ckstream's restore hook
/// opens it with the same key file to apply the rootfs diff), and an archive signed by a
/// trusted key is restored whatever container settings it asks for, while the same
/// archive without that key given is refused. A podman export, which has no signature,
/// is refused when a signature is required.
#[test]
fn signed_and_encrypted_checkpoints_restore_with_their_keys() {
    if !have_podman("signed") {
        return;
    }
    let name = "ck-signed";
    let ctr = start(name);
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).to_string_lossy().into_owned();
    for k in ["alice", "bob"] {
        ck_ok(&["key", "generate", "-o", &s(k)]);
    }
    super::sh(name, super::CHANGES);
    let before = super::manifest(name);
    ck_ok(&[
        "podman",
        "checkpoint",
        name,
        "--leave-running",
        "--format",
        "podman",
        "-o",
        &s("e0.tar"),
    ]);
    ck_ok(&[
        "podman",
        "checkpoint",
        name,
        "-o",
        &s("enc.cka"),
        "--encrypt-to",
        &s("bob.pub"),
        "--sign",
        &s("alice"),
    ]);
    podman_ok(&["rm", "-f", name]);

    let o = ck(&["podman", "restore", &s("enc.cka")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("encrypted"), "{}", stderr(&o));
    assert!(!exists(name));
    let o = ck_ok(&[
        "--key",
        &s("bob"),
        "--trusted-key",
        &s("alice.pub"),
        "podman",
        "restore",
        &s("enc.cka"),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["rootfs_apply_seconds"].is_number(),
        "the hook did not apply the diff: {v}"
    );
    assert_alive_and_intact(name);
    super::assert_same_manifest(&before, &super::manifest(name));
    podman_ok(&["rm", "-f", name]);

    // Added capabilities, signed: refused unless alice's key is trusted.
    rewrite_export(&p("e0.tar"), &p("cap.tar"), &[], None, &|n, v| {
        if n == "spec.dump" {
            for set in ["bounding", "effective", "permitted"] {
                v["process"]["capabilities"][set]
                    .as_array_mut()
                    .unwrap()
                    .push("CAP_SYS_ADMIN".into());
            }
        }
    });
    ck_ok(&[
        "podman",
        "import",
        &s("cap.tar"),
        "-o",
        &s("cap.cka"),
        "--sign",
        &s("alice"),
    ]);
    assert_refused(
        &[&s("cap.cka")],
        3,
        &["added capabilities (CAP_SYS_ADMIN)"],
        name,
    );
    assert_refused(
        &["--trusted-key", &s("alice.pub"), &s("cap.tar")],
        3,
        &["carries no signature"],
        name,
    );
    let o = ck_ok(&[
        "--trusted-key",
        &s("alice.pub"),
        "podman",
        "restore",
        &s("cap.cka"),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trust"], "trusted signature", "{v}");
    assert_alive_and_intact(name);
    let caps = podman_ok(&["inspect", "-f", "{{.EffectiveCaps}}", name]);
    assert!(caps.contains("CAP_SYS_ADMIN"), "{caps}");
    podman_ok(&["rm", "-f", name]);
    drop(ctr);
}
