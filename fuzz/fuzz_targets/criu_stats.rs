//! CRIU's `stats-dump` image, the one CRIU image ckstream decodes itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
// The limited global allocator (see `ckstream_fuzz::MALLOC_LIMIT`).
use ckstream_fuzz as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(stats) = ckstream_criu::stats::parse_dump_stats(data) {
        assert!(stats.freeze_seconds().is_finite());
    }
});
