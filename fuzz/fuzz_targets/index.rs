//! Decodes arbitrary bytes as an uncompressed index and validates it (the first byte
//! picks the shard count). Whatever `Index::validate` accepts must hold what the readers
//! rely on without further checks: the assertions restate those promises.
#![no_main]

use ckstream_format::index::{symlink_escapes, validate_path};
use ckstream_format::{EntryKind, Index};
use libfuzzer_sys::fuzz_target;
// The limited global allocator (see `ckstream_fuzz::MALLOC_LIMIT`).
use ckstream_fuzz as _;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&n, raw)) = data.split_first() else {
        return;
    };
    let shard_count = 1 + u32::from(n % 4);
    let Ok(index) = Index::decode(raw) else {
        return;
    };
    let _ = index.summary();
    let Ok(by_path) = index.validate(shard_count) else {
        return;
    };
    assert_eq!(by_path.len(), index.entries.len());
    for (i, e) in index.entries.iter().enumerate() {
        assert_eq!(by_path[&e.path], i);
        assert!(validate_path(&e.path).is_ok());
        let first = usize::try_from(e.first_chunk).unwrap();
        let count = usize::try_from(e.chunk_count).unwrap();
        let chunks = &index.chunks[first..first + count];
        assert!(chunks.is_empty() || e.entry_kind() == EntryKind::File);
        let mut end = 0;
        for c in chunks {
            assert!(c.file_offset >= end && c.raw_len > 0);
            end = c.file_end();
            assert!(end <= e.size);
            assert!(c.shard < shard_count && c.digest.len() == 32 && c.codec_id().is_some());
            if c.in_shared_frame() {
                assert!(
                    u64::from(c.frame_offset) + u64::from(c.raw_len) <= u64::from(c.frame_raw_len)
                );
            }
        }
        match e.entry_kind() {
            EntryKind::Unspecified => panic!("validated an unknown kind"),
            EntryKind::Hardlink => {
                let t = by_path[&e.link_target];
                assert!(t < i && index.entries[t].entry_kind() == EntryKind::File);
            }
            EntryKind::Symlink => assert!(!symlink_escapes(&e.path, &e.link_target)),
            _ => {}
        }
    }
    for &h in &index.hot_list {
        assert!(h < index.entries.len() as u64);
    }
});
