//! A podman checkpoint export (tar, or zstd-compressed tar) from arbitrary bytes: checked
//! as `check_podman_archive` does before podman sees it, then (if it passes) imported
//! into an archive in memory, which must then open (the writer must not commit what
//! readers refuse).
#![no_main]

use std::io::{self, Read};
use std::sync::{Arc, Mutex, OnceLock};

use ckstream_format::{
    ArchiveReader, ArchiveWriter, Compression, ShardSink, ShardSource, Stop, WriterOptions,
};
use ckstream_podman::import::{check_podman_archive, import_podman_archive};
use libfuzzer_sys::fuzz_target;
// The limited global allocator (see `ckstream_fuzz::MALLOC_LIMIT`).
use ckstream_fuzz as _;

/// Largest decompressed export a run reads (zstd input could expand without end).
const MAX_TAR: u64 = 8 << 20;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl ShardSink for Sink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("ckstream-fuzz-podman.")
            .tempdir()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let Ok(dec) = zstd::stream::Decoder::new(data) else {
            return;
        };
        let mut n = 0u64;
        let mut limited = dec.take(MAX_TAR + 1);
        let mut buf = [0u8; 1 << 16];
        while let Ok(k) = limited.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        if n > MAX_TAR {
            return;
        }
    }
    let path = dir().path().join("export.tar");
    std::fs::write(&path, data).unwrap();
    // Importing reads the export the same way (without seeking) and then writes it:
    // what the check refuses, the import refuses too, at more cost, so only what
    // passes the check is imported.
    if check_podman_archive(&path).is_err() {
        return;
    }
    let sink = Sink::default();
    let opts = WriterOptions {
        compression: if data.len().is_multiple_of(2) {
            Compression::NONE
        } else {
            Compression::zstd(1)
        },
        chunk_size: 64 << 10,
        threads: 1,
        ..Default::default()
    };
    let mut writer = ArchiveWriter::new(vec![Box::new(sink.clone())], opts, [1; 16], 0).unwrap();
    if import_podman_archive(&path, &mut writer, Stop::NEVER).is_err() {
        return;
    }
    if writer.finish().is_err() {
        return;
    }
    let bytes = sink.0.lock().unwrap().clone();
    let opened = ArchiveReader::open(
        Box::new(bytes),
        |_, _| -> ckstream_format::Result<Box<dyn ShardSource>> { unreachable!("one shard") },
    );
    if let Err(e) = opened {
        panic!("an imported archive does not open: {e}");
    }
});
