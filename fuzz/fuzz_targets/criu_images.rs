//! `ckstream inspect` of an archive whose CRIU images are the input: any bytes must give
//! an inspection or an error naming an image, never a panic or an unbounded allocation.
//! The input is split at `|||` into the images of a one-process checkpoint (pid 1); each
//! part gets its image's magic words unless it starts with `!` (then it is taken as is).
#![no_main]

use ckstream_format::testutil::{open_in_memory, MemSink};
use ckstream_format::{ArchiveWriter, Entry, EntryKind, WriterOptions};
use libfuzzer_sys::fuzz_target;

const COMMON: u32 = 0x5456_4319;
const SERVICE: u32 = 0x5510_5940;

/// Image name and its magic words.
const IMAGES: &[(&str, &[u32])] = &[
    ("pstree.img", &[COMMON, 0x5027_3030]),
    ("inventory.img", &[0x5831_3116]),
    ("core-1.img", &[COMMON, 0x5505_3847]),
    ("ids-1.img", &[COMMON, 0x5443_2030]),
    ("files.img", &[COMMON, 0x5630_3138]),
    ("fdinfo-1.img", &[COMMON, 0x5621_3732]),
    ("fs-1.img", &[COMMON, 0x5140_3912]),
    ("mm-1.img", &[COMMON, 0x5749_2820]),
    ("pagemap-1.img", &[COMMON, 0x5608_4025]),
    ("pages-1.img", &[]),
    ("mountpoints-1.img", &[COMMON, 0x5556_3928]),
    ("stats-dump", &[SERVICE, 0x5709_3306]),
];

fuzz_target!(|data: &[u8]| {
    let parts: Vec<&[u8]> = data.split_str_like(b"|||");
    let (sinks, boxed) = MemSink::many(1);
    let mut w = ArchiveWriter::new(boxed, WriterOptions::default(), [1; 16], 0).unwrap();
    w.add_entry(Entry {
        path: b"criu".to_vec(),
        kind: EntryKind::Dir as i32,
        mode: 0o755,
        ..Default::default()
    })
    .unwrap();
    for ((name, magic), part) in IMAGES.iter().zip(&parts) {
        let bytes = match part.strip_prefix(b"!") {
            Some(raw) => raw.to_vec(),
            None => {
                let mut b: Vec<u8> = magic.iter().flat_map(|m| m.to_le_bytes()).collect();
                b.extend_from_slice(part);
                b
            }
        };
        let id = w
            .add_entry(Entry {
                path: format!("criu/{name}").into_bytes(),
                kind: EntryKind::File as i32,
                mode: 0o600,
                size: bytes.len() as u64,
                ..Default::default()
            })
            .unwrap();
        for (k, piece) in bytes.chunks(4096).enumerate() {
            w.add_data(id, (k * 4096) as u64, piece.to_vec(), None).unwrap();
        }
    }
    w.finish().unwrap();
    let reader = open_in_memory(&[sinks[0].take()]).unwrap();
    let opts = ckstream_criu::inspect::InspectOptions {
        cmdline: true,
        environment: true,
    };
    if let Ok(found) = ckstream_criu::inspect::inspect(&reader, opts) {
        for p in &found.processes {
            let pattern = ckstream_criu::inspect::Pattern::Bytes(b"\0\x01".to_vec());
            let _ = ckstream_criu::inspect::search_memory(&reader, p.pid, &pattern, 4);
            for v in p.memory.vmas.iter().take(4) {
                let _ = ckstream_criu::inspect::read_memory(&reader, p.pid, v.start, 64);
            }
        }
        let _ = ckstream_criu::diff::diff(&reader, &found, &reader, &found);
    }
});

/// Splitting a byte slice at a separator.
trait SplitStr {
    fn split_str_like(&self, sep: &[u8]) -> Vec<&[u8]>;
}

impl SplitStr for [u8] {
    fn split_str_like(&self, sep: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut rest = self;
        while let Some(k) = rest.windows(sep.len()).position(|w| w == sep) {
            out.push(&rest[..k]);
            rest = &rest[k + sep.len()..];
        }
        out.push(rest);
        out
    }
}
