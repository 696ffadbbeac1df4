//! CRIU's image-streamer protocol: reads framed request and reply messages from arbitrary
//! bytes; every message read writes back to the same bytes and reads back equal.
#![no_main]

use ckstream_criu::proto::{read_message, write_message, ReplyEntry, RequestEntry};
use libfuzzer_sys::fuzz_target;
// The limited global allocator (see `ckstream_fuzz::MALLOC_LIMIT`).
use ckstream_fuzz as _;

fn round_trip<M: prost::Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let mut r = data;
    for _ in 0..256 {
        let Ok(Some(m)) = read_message::<M>(&mut r) else {
            return;
        };
        let mut framed = Vec::new();
        write_message(&mut framed, &m).unwrap();
        let mut again = framed.as_slice();
        assert_eq!(read_message::<M>(&mut again).unwrap(), Some(m));
        assert!(again.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<RequestEntry>(data);
    round_trip::<ReplyEntry>(data);
});
