//! Opens arbitrary bytes as a one-shard archive and reads everything it claims to hold.
//! Any panic, hang or unbounded allocation is a bug; errors are fine. (Fuzzing builds
//! accept any check value, so mutations get past the header, record and footer checks.)
#![no_main]

use ckstream_format::{ArchiveReader, ShardSource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = data.to_vec();
    let Ok(reader) = ArchiveReader::open(Box::new(bytes.clone()), |_, _| {
        Ok(Box::new(bytes.clone()) as Box<dyn ShardSource>)
    }) else {
        return;
    };
    if ckstream_fuzz::decoded_bytes(&reader) > 16 << 20 {
        return;
    }
    for (i, e) in reader.entries().iter().enumerate() {
        if e.size <= 1 << 20 {
            let _ = reader.copy_entry(i, &mut std::io::sink());
        }
    }
    let _ = reader.verify(1, &Default::default());
});
