//! Compares `config_dump`/`spec_dump` with what real podman writes into a
//! checkpoint export, for containers on the default (CNI `podman`) network
//! (plain, and with network aliases and a static MAC address) and with
//! `--network none`.
//!
//! Needs root, podman and runc. Without podman (or root) the tests are skipped,
//! unless `CKSTREAM_REQUIRE_PRIVILEGED=1`, which turns a skip into a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use ckstream_podman::boltdb::BoltDb;
use ckstream_podman::config_dump::{
    config_dump, container_bundle_dir, find_db_path, resolve_container_id, spec_dump,
};
use serde_json::Value as Json;

const IMAGE: &str = "localhost/ckstream-bolt-test";
/// This VM lacks CAP_SYS_RESOURCE, so podman cannot raise these limits itself.
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// Serializes image creation between the tests of this file.
static IMAGE_LOCK: Mutex<()> = Mutex::new(());

/// Whether the environment can run podman; panics instead of skipping when
/// `CKSTREAM_REQUIRE_PRIVILEGED=1`.
fn podman_available() -> bool {
    let required = std::env::var("CKSTREAM_REQUIRE_PRIVILEGED").is_ok_and(|value| value == "1");
    let problem = if !rustix::process::geteuid().is_root() {
        Some("not running as root".to_string())
    } else {
        match Command::new("podman").arg("--version").output() {
            Ok(output) if output.status.success() => None,
            Ok(output) => Some(format!("podman --version failed: {}", output.status)),
            Err(error) => Some(format!("podman not runnable: {error}")),
        }
    };
    match problem {
        None => true,
        Some(problem) if required => {
            panic!("CKSTREAM_REQUIRE_PRIVILEGED=1 but {problem}")
        }
        Some(problem) => {
            eprintln!("skipping: {problem}");
            false
        }
    }
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("running {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn podman(args: &[&str]) -> Output {
    run(Command::new("podman").args(args))
}

/// Imports a one-binary busybox image, built locally (no registry needed).
fn ensure_image() {
    let _guard = IMAGE_LOCK
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let exists = Command::new("podman")
        .args(["image", "exists", IMAGE])
        .status()
        .expect("running podman image exists");
    if exists.success() {
        return;
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: apt-get install -y -t bookworm --no-install-recommends busybox-static"
    );
    let scratch = tempfile::tempdir().unwrap();
    let rootfs = scratch.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let archive = scratch.path().join("rootfs.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&archive)
        .arg("."));
    podman(&["import", archive.to_str().unwrap(), IMAGE]);
}

/// Removes the container when dropped, so failed assertions leave nothing behind.
struct ContainerGuard(String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "0", &self.0])
            .output();
    }
}

fn read_json(path: &Path) -> Json {
    let bytes = std::fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Describes where two JSON values differ, one line per differing path.
fn differences(path: &str, ours: &Json, podmans: &Json, out: &mut Vec<String>) {
    match (ours, podmans) {
        (Json::Object(a), Json::Object(b)) => {
            for key in a.keys().chain(b.keys().filter(|key| !a.contains_key(*key))) {
                let child = format!("{path}/{key}");
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => differences(&child, x, y, out),
                    (x, y) => out.push(format!("{child}: ours {x:?}, podman's {y:?}")),
                }
            }
        }
        _ if ours != podmans => out.push(format!("{path}: ours {ours}, podman's {podmans}")),
        _ => {}
    }
}

fn assert_same_json(what: &str, ours: &Json, podmans: &Json) {
    let mut diffs = Vec::new();
    differences("", ours, podmans, &mut diffs);
    assert!(
        diffs.is_empty(),
        "{what} differs from podman's:\n{}",
        diffs.join("\n")
    );
}

/// Runs a container with `network_args`, computes config.dump/spec.dump from
/// the DB and bundle, lets podman export a checkpoint, and compares. Returns
/// podman's config.dump.
fn compare_with_podman_export(
    label: &str,
    network_args: &[&str],
    expected_networks: &[&str],
) -> Json {
    ensure_image();
    let name = format!("ckstream-bolt-{label}-{}", std::process::id());
    let _guard = ContainerGuard(name.clone());
    let mut args = vec!["run", "-d"];
    args.extend(ULIMITS);
    args.extend(network_args);
    args.extend([
        "--name",
        &name,
        IMAGE,
        "/bin/sh",
        "-c",
        "while true; do sleep 1; done",
    ]);
    podman(&args);
    let inspected = podman(&["inspect", "--format", "{{.Id}}", &name]);
    let podman_id = String::from_utf8(inspected.stdout)
        .unwrap()
        .trim()
        .to_string();

    let db_path = find_db_path(&[]).expect("locating the podman state");
    let db = BoltDb::open(&db_path).expect("reading the podman state");
    let id = resolve_container_id(&db, &name).expect("resolving the container name");
    assert_eq!(id, podman_id);
    assert_eq!(resolve_container_id(&db, &id[..10]).unwrap(), id);
    let bundle = container_bundle_dir(&db, &id).unwrap();
    drop(db);

    // Computed before podman's export, to show nothing depends on it.
    let our_config: Json = serde_json::from_slice(&config_dump(&db_path, &id).unwrap()).unwrap();
    let our_spec: Json = serde_json::from_slice(&spec_dump(&bundle).unwrap()).unwrap();

    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("export.tar");
    podman(&[
        "container",
        "checkpoint",
        "--export",
        archive.to_str().unwrap(),
        "--compress",
        "none",
        "--leave-running",
        &name,
    ]);
    let extracted: PathBuf = scratch.path().join("extracted");
    std::fs::create_dir(&extracted).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&extracted)
        .arg("-xf")
        .arg(&archive)
        .args(["config.dump", "spec.dump"]));
    let podman_config = read_json(&extracted.join("config.dump"));
    let podman_spec = read_json(&extracted.join("spec.dump"));

    // Make sure the network handling was exercised (or correctly skipped).
    let networks: Vec<&str> = podman_config
        .get("newNetworks")
        .and_then(Json::as_object)
        .map(|networks| networks.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        networks, expected_networks,
        "networks in podman's config.dump"
    );

    assert_same_json("config.dump", &our_config, &podman_config);
    assert_same_json("spec.dump", &our_spec, &podman_spec);
    podman_config
}

#[test]
fn config_and_spec_dump_match_podman_on_the_default_network() {
    if !podman_available() {
        return;
    }
    compare_with_podman_export("bridge", &[], &["podman"]);
}

#[test]
fn config_and_spec_dump_match_podman_without_network() {
    if !podman_available() {
        return;
    }
    compare_with_podman_export("none", &["--network", "none"], &[]);
}

#[test]
fn config_and_spec_dump_match_podman_with_aliases_and_a_static_mac() {
    if !podman_available() {
        return;
    }
    // A locally administered address, different per test process.
    let pid = std::process::id();
    let mac = format!(
        "92:d0:c6:{:02x}:{:02x}:{:02x}",
        (pid >> 16) & 0xff,
        (pid >> 8) & 0xff,
        pid & 0xff
    );
    let podman_config = compare_with_podman_export(
        "alias",
        &[
            "--network-alias",
            "web",
            "--network-alias",
            "db",
            "--mac-address",
            &mac,
        ],
        &["podman"],
    );
    // The user's aliases survive, the short-ID alias does not.
    let options = &podman_config["newNetworks"]["podman"];
    assert_eq!(options["aliases"], serde_json::json!(["web", "db"]));
    assert_eq!(options["static_mac"], mac.as_str());
}
