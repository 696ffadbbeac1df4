//! An archive assembled from a structured input (see the `ckstream_fuzz` crate docs:
//! uncompressed index, shard bodies, check values made right): open, `verify`, and read
//! every entry. An archive that verifies must read back whole.
#![no_main]

use ckstream_fuzz::{assemble, decoded_bytes, open, ArchiveInput};
use libfuzzer_sys::fuzz_target;

/// Most bytes one run may decode (several chunks can point at one zstd bomb).
const MAX_DECODED: u64 = 16 << 20;
/// Largest entry read back (its holes are written out as zeros).
const MAX_ENTRY: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let input = ArchiveInput::parse(data);
    let shards = assemble(&input);
    let Ok(reader) = open(&shards) else {
        return;
    };
    if decoded_bytes(&reader) > MAX_DECODED {
        return;
    }
    let threads = 1 + usize::from((input.flags >> 3) & 1);
    let verified = reader.verify(threads, &Default::default()).is_ok();
    for (i, e) in reader.entries().iter().enumerate() {
        if e.size > MAX_ENTRY {
            continue;
        }
        let mut out = Vec::new();
        match reader.copy_entry(i, &mut out) {
            Ok(()) => assert_eq!(out.len() as u64, e.size),
            Err(err) => assert!(!verified, "verified, but entry {i} does not read: {err}"),
        }
    }
});
