//! Scans arbitrary bytes record by record, as a pipe reader would.
#![no_main]

use ckstream_format::RecordScanner;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut scanner) = RecordScanner::new(data, "fuzz") else {
        return;
    };
    for _ in 0..100_000 {
        match scanner.next_record() {
            Ok(Some(_)) => {}
            _ => break,
        }
    }
});
