//! The bolt reader and `config_dump` on a real podman 4.3.1 state database
//! (`fixtures/podman-4.3.1-state.db`, made by `fixtures/make-podman-state.sh`),
//! compared with the `config.dump` files podman itself exported for its two
//! containers, plus damaged copies of that database that must fail cleanly.
//! Needs neither root nor podman.

use std::path::PathBuf;

use ckstream_podman::boltdb::{BoltDb, BoltError, Bucket, Value};
use ckstream_podman::config_dump::{
    config_dump, config_dump_from_db, container_bundle_dir, resolve_container_id, ConfigDumpError,
};
use serde_json::Value as Json;

const PAGE_SIZE: usize = 4096;
const CONTAINERS: [&str; 2] = ["fixture-bridge", "fixture-none"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn state_bytes() -> Vec<u8> {
    std::fs::read(fixture("podman-4.3.1-state.db")).unwrap()
}

fn podman_config_dump(container: &str) -> Json {
    let bytes = std::fs::read(fixture(&format!("{container}.config.dump"))).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[test]
fn reads_the_libpod_buckets() {
    let db = BoltDb::open(&fixture("podman-4.3.1-state.db")).unwrap();
    assert_eq!(db.page_size(), PAGE_SIZE);
    let top: Vec<&str> = db.root().keys().unwrap().into_iter().map(text).collect();
    assert_eq!(
        top,
        [
            "all-ctrs",
            "allPods",
            "allVolumes",
            "ctr",
            "exec",
            "exit-code",
            "exit-code-time-stamp",
            "id-registry",
            "name-registry",
            "ns-registry",
            "pod",
            "runtime-config",
            "vol",
            "volume-ctrs"
        ]
    );
    let names = db.bucket(&[b"name-registry"]).unwrap();
    for container in CONTAINERS {
        let id = names.get(container.as_bytes()).unwrap().unwrap();
        let ids = db.bucket(&[b"id-registry"]).unwrap();
        assert_eq!(ids.get(id).unwrap(), Some(container.as_bytes()));
        // The config is larger than a page, so it sits in overflow pages.
        let config = db
            .bucket(&[b"ctr", id])
            .unwrap()
            .get(b"config")
            .unwrap()
            .unwrap();
        assert!(config.len() > PAGE_SIZE);
        let config: Json = serde_json::from_slice(config).unwrap();
        assert_eq!(config["id"], text(id));
        assert_eq!(config["name"], container);
    }
    let static_dir = db
        .bucket(&[b"runtime-config"])
        .unwrap()
        .get(b"static-dir")
        .unwrap();
    assert!(text(static_dir.unwrap()).ends_with("/root/libpod"));
}

#[test]
fn config_dump_equals_what_podman_exported() {
    let path = fixture("podman-4.3.1-state.db");
    let db = BoltDb::open(&path).unwrap();
    for container in CONTAINERS {
        let id = resolve_container_id(&db, container).unwrap();
        let podmans = podman_config_dump(container);
        let ours: Json = serde_json::from_slice(&config_dump(&path, &id).unwrap()).unwrap();
        assert_eq!(ours, podmans, "{container}");
        assert_eq!(
            container_bundle_dir(&db, &id).unwrap().to_str(),
            podmans["staticDir"].as_str()
        );
    }
    // The bridge container's short-ID alias is gone; `none` has no networks at all.
    let bridge = podman_config_dump("fixture-bridge");
    assert_eq!(
        bridge["newNetworks"],
        serde_json::json!({"podman": {"interface_name": "eth0"}})
    );
    assert!(podman_config_dump("fixture-none")
        .get("newNetworks")
        .is_none());
}

#[test]
fn resolves_names_ids_and_prefixes() {
    let db = BoltDb::from_bytes(state_bytes()).unwrap();
    let id = resolve_container_id(&db, "fixture-none").unwrap();
    assert_eq!(id.len(), 64);
    assert_eq!(resolve_container_id(&db, &id).unwrap(), id);
    assert_eq!(resolve_container_id(&db, &id[..5]).unwrap(), id);
    for unknown in ["", "fixture", "no-such-container", "zzzz"] {
        assert!(
            matches!(
                resolve_container_id(&db, unknown),
                Err(ConfigDumpError::NoSuchContainer(_))
            ),
            "{unknown}"
        );
    }
    assert!(matches!(
        config_dump_from_db(&db, "0123456789ab"),
        Err(ConfigDumpError::NoSuchContainer(_))
    ));
}

/// The root page of the newest meta (the fixture's metas are both valid).
fn root_pgid(file: &[u8]) -> u64 {
    let meta_field = |meta: usize, offset: usize| {
        u64::from_le_bytes(
            file[meta + 16 + offset..meta + 24 + offset]
                .try_into()
                .unwrap(),
        )
    };
    let newest = if meta_field(PAGE_SIZE, 48) > meta_field(0, 48) {
        PAGE_SIZE
    } else {
        0
    };
    meta_field(newest, 16)
}

/// The page id of the (non-inline) bucket `name` in leaf page `pgid`.
fn bucket_pgid(file: &[u8], pgid: u64, name: &[u8]) -> u64 {
    let page = &file[pgid as usize * PAGE_SIZE..];
    let count = u16::from_le_bytes([page[10], page[11]]) as usize;
    let field = |at: usize| u32::from_le_bytes(page[at..at + 4].try_into().unwrap()) as usize;
    (0..count)
        .find_map(|index| {
            let element = 16 + index * 16;
            let key = element + field(element + 4);
            let value = key + field(element + 8);
            (&page[key..value] == name)
                .then(|| u64::from_le_bytes(page[value..value + 8].try_into().unwrap()))
        })
        .unwrap()
}

fn expect_error(bytes: Vec<u8>) -> String {
    match BoltDb::from_bytes(bytes) {
        Err(error) => error.to_string(),
        Ok(db) => {
            let id = resolve_container_id(&db, "fixture-bridge").unwrap();
            config_dump_from_db(&db, &id).unwrap_err().to_string()
        }
    }
}

#[test]
fn damaged_copies_fail_cleanly() {
    let file = state_bytes();

    let truncated = expect_error(file[..file.len() - PAGE_SIZE].to_vec());
    assert!(truncated.contains("truncated"), "{truncated}");

    let mut bad_checksums = file.clone();
    for meta in [0, PAGE_SIZE] {
        bad_checksums[meta + 16 + 56] ^= 0x55;
    }
    let error = expect_error(bad_checksums);
    assert!(error.contains("checksum mismatch"), "{error}");

    // The bridge container's bucket page claims another id.
    let ctr = bucket_pgid(&file, root_pgid(&file), b"ctr");
    let id = {
        let db = BoltDb::from_bytes(file.clone()).unwrap();
        resolve_container_id(&db, "fixture-bridge").unwrap()
    };
    let container = bucket_pgid(&file, ctr, id.as_bytes());
    let mut wrong_id = file.clone();
    wrong_id[container as usize * PAGE_SIZE] ^= 0x40;
    let error = expect_error(wrong_id);
    assert!(error.contains(&format!("page {container} says")), "{error}");

    // The `ctr` bucket's page becomes a branch page whose only child is itself.
    let mut cyclic = file.clone();
    let page = &mut cyclic[ctr as usize * PAGE_SIZE..(ctr as usize + 1) * PAGE_SIZE];
    page.fill(0);
    page[0..8].copy_from_slice(&ctr.to_le_bytes());
    page[8..10].copy_from_slice(&1u16.to_le_bytes()); // branch
    page[10..12].copy_from_slice(&1u16.to_le_bytes()); // one element
    page[16..20].copy_from_slice(&16u32.to_le_bytes()); // key right after the element
    page[20..24].copy_from_slice(&1u32.to_le_bytes());
    page[24..32].copy_from_slice(&ctr.to_le_bytes());
    page[32] = b'0';
    let db = BoltDb::from_bytes(cyclic).unwrap();
    assert!(matches!(
        config_dump_from_db(&db, &id),
        Err(ConfigDumpError::Bolt(BoltError::PageCycle { .. }))
    ));
    assert!(matches!(
        db.bucket(&[b"ctr"]).unwrap().entries(),
        Err(BoltError::PageCycle { .. })
    ));
}

/// Flips bytes in the page headers and element tables of every page: reading
/// must fail cleanly or succeed, never panic.
#[test]
fn survives_damage_to_any_page_header_or_element() {
    fn walk(bucket: Bucket<'_>, depth: usize) {
        if depth > 6 {
            return;
        }
        if let Ok(entries) = bucket.entries() {
            for (_, value) in entries {
                if let Value::Bucket(nested) = value {
                    walk(nested, depth + 1);
                }
            }
        }
    }
    let file = state_bytes();
    for page in 0..file.len() / PAGE_SIZE {
        for offset in 0..160 {
            let mut damaged = file.clone();
            damaged[page * PAGE_SIZE + offset] ^= 0xff;
            if let Ok(db) = BoltDb::from_bytes(damaged) {
                walk(db.root(), 0);
                for container in CONTAINERS {
                    if let Ok(id) = resolve_container_id(&db, container) {
                        let _ = config_dump_from_db(&db, &id);
                    }
                }
            }
        }
    }
}
