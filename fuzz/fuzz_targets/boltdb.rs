//! podman's BoltDB state from arbitrary bytes: every bucket walked, and the lookups
//! `ckstream podman` makes (container ids, `config.dump`, the bundle directory). The meta
//! pages' FNV checksums are made right first, so mutations get past them.
#![no_main]

use ckstream_podman::boltdb::{BoltDb, Bucket, Value};
use ckstream_podman::config_dump::{
    config_dump_from_db, container_bundle_dir, resolve_container_id,
};
use libfuzzer_sys::fuzz_target;
// The limited global allocator (see `ckstream_fuzz::MALLOC_LIMIT`).
use ckstream_fuzz as _;

const MAGIC: u32 = 0xED0C_DAED;
const PAGE_HEADER: usize = 16;

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Sets the checksum of the meta page at `page` if it has bbolt's magic.
fn fix_meta(data: &mut [u8], page: usize) {
    let meta = page + PAGE_HEADER;
    if u32_at(data, meta) != Some(MAGIC) || data.len() < meta + 64 {
        return;
    }
    let sum = fnv1a64(&data[meta..meta + 56]);
    data[meta + 56..meta + 64].copy_from_slice(&sum.to_le_bytes());
}

fn walk(bucket: Bucket<'_>, depth: usize, budget: &mut usize) {
    let Ok(entries) = bucket.entries() else {
        return;
    };
    for (key, value) in entries {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let _ = bucket.lookup(key);
        if let Value::Bucket(child) = value {
            if depth < 8 {
                walk(child, depth + 1, budget);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut data = data.to_vec();
    fix_meta(&mut data, 0);
    let page_size = u32_at(&data, PAGE_HEADER + 8).unwrap_or(4096) as usize;
    for page in [page_size, 4096] {
        if page.is_power_of_two() && (512..=1 << 20).contains(&page) {
            fix_meta(&mut data, page);
        }
    }
    let Ok(db) = BoltDb::from_bytes(data) else {
        return;
    };
    let _ = (db.page_size(), db.txid());
    let mut budget = 10_000;
    walk(db.root(), 0, &mut budget);
    let _ = resolve_container_id(&db, "fuzz");
    let Ok(ids) = db.bucket(&[b"ctr"]).and_then(|c| c.keys()) else {
        return;
    };
    for id in ids.into_iter().take(8) {
        let id = String::from_utf8_lossy(id);
        let _ = config_dump_from_db(&db, &id);
        let _ = container_bundle_dir(&db, &id);
        let prefix: String = id.chars().take(4).collect();
        let _ = resolve_container_id(&db, &prefix);
    }
});
