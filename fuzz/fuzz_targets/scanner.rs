//! Scans arbitrary bytes record by record, as a pipe reader would. (Fuzzing builds accept
//! any check value, so mutations get past the header, record and footer checks.)
#![no_main]

use ckstream_format::RecordScanner;
use libfuzzer_sys::fuzz_target;
// The limited global allocator (see `ckstream_fuzz::MALLOC_LIMIT`).
use ckstream_fuzz as _;

fuzz_target!(|data: &[u8]| {
    let Ok(mut scanner) = RecordScanner::new(data, "fuzz") else {
        return;
    };
    let mut end = 4096u64;
    for _ in 0..100_000 {
        match scanner.next_record() {
            Ok(Some(rec)) => {
                // Records come in file order, each where the last one ended.
                assert!(rec.payload_offset >= end + 96);
                assert_eq!(rec.stored.len() as u64, u64::from(rec.header.stored_len));
                end = rec.payload_offset + rec.stored.len() as u64;
                assert!(end <= data.len() as u64);
            }
            Ok(None) => {
                assert!(scanner.footer().is_some());
                assert_eq!(end + 128, data.len() as u64);
                break;
            }
            Err(_) => break,
        }
    }
});
