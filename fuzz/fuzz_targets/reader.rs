//! Opens arbitrary bytes as a one-shard archive and reads everything it claims to hold.
//! Any panic, hang or unbounded allocation is a bug; errors are fine.
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
    for i in 0..reader.entries().len() {
        let _ = reader.copy_entry(i, &mut std::io::sink());
    }
    let _ = reader.verify(1, &Default::default());
});
