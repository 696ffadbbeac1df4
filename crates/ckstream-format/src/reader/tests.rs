//! The reader against archives held in memory: written by [`ArchiveWriter`], then read
//! back, cut short, damaged or mixed with another archive's shards. The helpers here are
//! shared with the scanner's and verify's tests.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::codec::Compression;
use crate::error::{Error, Result};
use crate::index::{Entry, EntryKind};
use crate::layout::{Footer, ShardHeader, FOOTER_LEN};
use crate::reader::{ArchiveReader, ShardOpener, ShardSource};
pub(crate) use crate::testutil::noise;
use crate::testutil::{open_in_memory, MemSink};
use crate::writer::{ArchiveWriter, ShardSink, WriterOptions};

pub(crate) const CHUNK: usize = 64 << 10;

/// The files of the sample tree with their whole content (holes as zeros): several
/// chunks of noise, compressible text, a sparse file with one stored chunk and an
/// all-zero one, an empty file, and small files that share one frame.
pub(crate) fn sample_files() -> Vec<(String, Vec<u8>)> {
    let mut sparse = vec![0u8; 5 * CHUNK];
    sparse[2 * CHUNK..3 * CHUNK].copy_from_slice(&noise(3, CHUNK));
    let mut files = vec![
        ("d/random".to_string(), noise(1, 200_000)),
        (
            "d/text".to_string(),
            (0..15_000)
                .flat_map(|i| format!("{i:>9}\n").into_bytes())
                .collect(),
        ),
        ("d/sparse".to_string(), sparse),
        ("empty".to_string(), Vec::new()),
    ];
    for i in 0..4 {
        files.push((
            format!("small-{i}"),
            format!("small file {i} ").repeat(20 * (i + 1)).into_bytes(),
        ));
    }
    files
}

pub(crate) fn options(compression: Compression) -> WriterOptions {
    WriterOptions {
        compression,
        chunk_size: CHUNK as u32,
        threads: 2,
        ..Default::default()
    }
}

/// A sink that takes a while over every write, so records pile up before it and the
/// writer spreads them over every shard instead of keeping to shard 0.
struct Slow(MemSink);

impl ShardSink for Slow {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        std::thread::sleep(Duration::from_millis(1));
        self.0.write_all(buf)
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// Writes the sample tree (a directory, [`sample_files`], a symlink) over `shards`
/// in-memory shards and returns their bytes.
pub(crate) fn write_sample(opts: WriterOptions, shards: usize, id: [u8; 16]) -> Vec<Vec<u8>> {
    let (sinks, _) = MemSink::many(shards);
    let boxed = sinks
        .iter()
        .map(|s| Box::new(Slow(s.clone())) as Box<dyn ShardSink>)
        .collect();
    let mut w = ArchiveWriter::new(boxed, opts, id, 0).unwrap();
    w.add_entry(entry("d", EntryKind::Dir, 0)).unwrap();
    let mut bundle = Vec::new();
    for (path, content) in sample_files() {
        let id = w
            .add_entry(entry(&path, EntryKind::File, content.len() as u64))
            .unwrap();
        if path.starts_with("small-") {
            bundle.push((id, content));
            continue;
        }
        for (k, piece) in content.chunks(CHUNK).enumerate() {
            w.add_data(id, (k * CHUNK) as u64, piece.to_vec(), None)
                .unwrap();
        }
    }
    w.add_bundle(bundle).unwrap();
    w.add_entry(Entry {
        link_target: b"d/text".to_vec(),
        ..entry("link", EntryKind::Symlink, 0)
    })
    .unwrap();
    w.finish().unwrap();
    sinks.iter().map(MemSink::take).collect()
}

pub(crate) fn entry(path: &str, kind: EntryKind, size: u64) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind: kind as i32,
        mode: 0o644,
        size,
        ..Default::default()
    }
}

/// The error of opening `shards`, which must fail.
fn open_err(shards: &[Vec<u8>]) -> Error {
    match open_in_memory(shards) {
        Ok(_) => panic!("opened"),
        Err(e) => e,
    }
}

/// Some shard ≥ 1 that holds a chunk, with an entry and that chunk.
fn chunk_outside_shard_0(r: &ArchiveReader) -> (u32, usize, crate::index::Chunk) {
    (0..r.entries().len())
        .flat_map(|i| r.chunks_of(i).iter().map(move |c| (c.shard, i, c.clone())))
        .find(|(shard, _, _)| *shard != 0)
        .expect("the writer put every chunk in shard 0")
}

#[test]
fn every_entry_reads_back_for_each_codec_and_shard_count() {
    for compression in [Compression::NONE, Compression::LZ4, Compression::zstd(3)] {
        for shards in [1, 3] {
            let case = format!("{:?}, {shards} shards", compression.codec);
            let r = open_in_memory(&write_sample(options(compression), shards, [1; 16])).unwrap();
            assert_eq!(r.shard_count(), shards as u32, "{case}");
            for (path, content) in sample_files() {
                let i = r.find(path.as_bytes()).expect(&path);
                let e = &r.entries()[i];
                assert_eq!(e.size, content.len() as u64, "{case}: {path}");
                let mut out = Vec::new();
                r.copy_entry(i, &mut out).unwrap();
                assert!(out == content, "{case}: {path} read back differently");
                for c in r.chunks_of(i) {
                    let data = r.read_chunk(e, c).unwrap();
                    let range = c.file_offset as usize..c.file_end() as usize;
                    assert!(data == content[range], "{case}: {path} chunk at {c:?}");
                }
            }
            // Compressible text is stored with the archive's codec, small files share
            // one frame, and a sparse file keeps only its non-zero chunk.
            let text = r.find(b"d/text").unwrap();
            assert!(
                r.chunks_of(text)
                    .iter()
                    .all(|c| c.codec == compression.codec as u32),
                "{case}"
            );
            let small = r.find(b"small-0").unwrap();
            assert!(r.chunks_of(small)[0].in_shared_frame(), "{case}");
            let sparse = r.find(b"d/sparse").unwrap();
            assert_eq!(r.chunks_of(sparse).len(), 1, "{case}");
            let link = &r.entries()[r.find(b"link").unwrap()];
            assert_eq!(link.link_target, b"d/text", "{case}");
            if shards > 1 {
                chunk_outside_shard_0(&r);
            }
        }
    }
}

#[test]
fn id_named_shards_is_set_only_for_several_shards() {
    for (shards, asked, expected) in [(1, true, false), (3, true, true), (3, false, false)] {
        let opts = WriterOptions {
            id_named_shards: asked,
            ..options(Compression::LZ4)
        };
        let bytes = write_sample(opts, shards, [2; 16]);
        for (i, shard) in bytes.iter().enumerate() {
            let h = ShardHeader::decode(shard, "shard").unwrap();
            assert_eq!(h.id_named_shards(), expected, "{shards} shards, shard {i}");
        }
        let r = open_in_memory(&bytes).unwrap();
        assert_eq!(r.header().id_named_shards(), expected);
    }
}

#[test]
fn a_shard_cut_short_is_incomplete() {
    let bytes = write_sample(options(Compression::zstd(1)), 1, [3; 16]).remove(0);
    let n = bytes.len();
    for cut in [0, 7, 100, 4096, 4096 + 50, n / 2, n - 129, n - 128, n - 1] {
        let err = open_err(&[bytes[..cut].to_vec()]);
        if cut < 8 {
            assert!(matches!(err, Error::NotAnArchive(_)), "cut at {cut}: {err}");
        } else {
            assert!(matches!(err, Error::Incomplete(_)), "cut at {cut}: {err}");
        }
    }
}

#[test]
fn a_later_shard_cut_short_is_refused() {
    let bytes = write_sample(options(Compression::zstd(1)), 3, [4; 16]);
    let mut cut = bytes.clone();
    // Any length the index does not record is corrupt...
    cut[1].truncate(bytes[1].len() - 1);
    let err = open_err(&cut);
    assert!(
        matches!(&err, Error::Corrupt(m) if m.contains("the index says")),
        "{err}"
    );
    // ...and one without room for a footer is not committed.
    cut[1].truncate(4096);
    let err = open_err(&cut);
    assert!(matches!(err, Error::Incomplete(_)), "{err}");
}

#[test]
fn a_flipped_payload_byte_fails_read_chunk_and_verify() {
    let mut bytes = write_sample(options(Compression::NONE), 1, [5; 16]);
    let r = open_in_memory(&bytes).unwrap();
    let i = r.find(b"d/random").unwrap();
    let (damaged, intact) = (r.chunks_of(i)[1].clone(), r.chunks_of(i)[2].clone());
    bytes[0][damaged.offset as usize + 10] ^= 0x20;

    let r = open_in_memory(&bytes).unwrap();
    let e = &r.entries()[i];
    match r.read_chunk(e, &damaged) {
        Err(Error::DigestMismatch { what }) => assert!(what.contains("d/random"), "{what}"),
        other => panic!("read_chunk gave {:?}", other.map(|d| d.len())),
    }
    assert!(r.read_chunk(e, &intact).is_ok());
    let err = r.copy_entry(i, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    let err = r.verify(2, &Default::default()).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

#[test]
fn a_shard_of_another_archive_is_refused() {
    let ours = write_sample(options(Compression::zstd(1)), 3, [6; 16]);
    let theirs = write_sample(options(Compression::zstd(1)), 3, [7; 16]);
    let mut mixed = ours.clone();
    mixed[2] = theirs[2].clone();
    let err = open_err(&mixed);
    assert!(
        matches!(&err, Error::Corrupt(m) if m.contains("another archive")),
        "{err}"
    );
    // Same archive id and size, but from another write of it: the footer's index
    // digest is not this index's.
    let mut other_write = ours.clone();
    let shard = &mut other_write[2];
    let at = shard.len() - FOOTER_LEN;
    let mut footer = Footer::decode(&shard[at..], shard.len() as u64, "shard 2").unwrap();
    footer.index_digest[0] ^= 1;
    shard[at..].copy_from_slice(&footer.encode());
    let err = open_err(&other_write);
    assert!(
        matches!(&err, Error::Corrupt(m) if m.contains("different write")),
        "{err}"
    );
}

/// An opener for [`ArchiveReader::open_deferred`] over `shards` that logs which shard it
/// was asked for and fails for `missing`.
fn logging_opener(
    shards: Vec<Vec<u8>>,
    missing: Option<u32>,
) -> (Arc<ShardOpener>, Arc<Mutex<Vec<u32>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let opened = log.clone();
    let opener = move |_: &ShardHeader, i: u32| -> Result<Box<dyn ShardSource>> {
        opened.lock().unwrap().push(i);
        if Some(i) == missing {
            return Err(Error::io(
                format!("opening shard {i}"),
                io::ErrorKind::NotFound.into(),
            ));
        }
        Ok(Box::new(shards[i as usize].clone()))
    };
    (Arc::new(opener), log)
}

#[test]
fn a_deferred_shard_reports_its_problem_on_first_read() {
    let bytes = write_sample(options(Compression::zstd(1)), 3, [8; 16]);
    let (shard, i, c) = chunk_outside_shard_0(&open_in_memory(&bytes).unwrap());

    // Missing: `open` fails at once, `open_deferred` only when the shard is read.
    let (opener, _) = logging_opener(bytes.clone(), Some(shard));
    let err = ArchiveReader::open(Box::new(bytes[0].clone()), |h, k| opener(h, k))
        .err()
        .expect("open succeeded without a shard");
    assert!(
        err.to_string().contains(&format!("opening shard {shard}")),
        "{err}"
    );
    let (opener, log) = logging_opener(bytes.clone(), Some(shard));
    let r = ArchiveReader::open_deferred(Box::new(bytes[0].clone()), opener).unwrap();
    assert!(
        log.lock().unwrap().is_empty(),
        "open_deferred opened shards"
    );
    assert!(r.find(b"d/random").is_some());
    for _ in 0..2 {
        match r.read_chunk(&r.entries()[i], &c) {
            Err(Error::Io { context, source }) => {
                assert_eq!(context, format!("opening shard {shard}"));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("read gave {:?}", other.map(|d| d.len())),
        }
    }
    assert_eq!(
        *log.lock().unwrap(),
        [shard],
        "opened once, and only that shard"
    );

    // Foreign: the check that `open` makes happens at the first read.
    let mut mixed = bytes.clone();
    mixed[shard as usize] =
        write_sample(options(Compression::zstd(1)), 3, [9; 16]).swap_remove(shard as usize);
    let (opener, _) = logging_opener(mixed.clone(), None);
    let r = ArchiveReader::open_deferred(Box::new(mixed[0].clone()), opener).unwrap();
    let err = r.read_chunk(&r.entries()[i], &c).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt(m) if m.contains("another archive")),
        "{err}"
    );
}

#[test]
fn shard_sizes_come_from_the_index() {
    let bytes = write_sample(options(Compression::zstd(1)), 3, [10; 16]);
    let lens: Vec<u64> = bytes.iter().map(|b| b.len() as u64).collect();
    let (opener, log) = logging_opener(bytes.clone(), None);
    let r = ArchiveReader::open_deferred(Box::new(bytes[0].clone()), opener).unwrap();
    assert_eq!(r.shard_sizes().unwrap(), lens);
    assert!(
        log.lock().unwrap().is_empty(),
        "sizes were asked of the shards"
    );
    assert_eq!(r.index().shard_bytes, [0, lens[1], lens[2]]);
}

/// What each shard was told it will read, in the order told.
type Announcements = Arc<Mutex<Vec<(u32, Vec<(u64, u64)>)>>>;

/// A shard in memory that logs what [`ShardSource::will_read`] announces.
struct Announced {
    bytes: Vec<u8>,
    shard: u32,
    log: Announcements,
}

impl ShardSource for Announced {
    fn len(&self) -> io::Result<u64> {
        ShardSource::len(&self.bytes)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.bytes.read_exact_at(offset, buf)
    }
    fn will_read(&self, ranges: &[(u64, u64)]) {
        self.log.lock().unwrap().push((self.shard, ranges.to_vec()));
    }
    fn describe(&self) -> String {
        format!("shard {}", self.shard)
    }
}

#[test]
fn will_read_entry_announces_each_shards_ranges_in_order() {
    let bytes = write_sample(options(Compression::zstd(1)), 3, [11; 16]);
    let log = Announcements::default();
    let source = |i: u32| {
        Box::new(Announced {
            bytes: bytes[i as usize].clone(),
            shard: i,
            log: log.clone(),
        }) as Box<dyn ShardSource>
    };
    let r = ArchiveReader::open(source(0), |_, i| Ok(source(i))).unwrap();
    for path in ["d/random", "d/text", "d/sparse", "d", "empty"] {
        log.lock().unwrap().clear();
        let i = r.find(path.as_bytes()).unwrap();
        r.will_read_entry(i);
        let mut expected = Vec::new();
        for shard in 0..3 {
            let ranges: Vec<(u64, u64)> = r
                .chunks_of(i)
                .iter()
                .filter(|c| c.shard == shard)
                .map(|c| (c.offset, c.stored_len as u64))
                .collect();
            if !ranges.is_empty() {
                expected.push((shard, ranges));
            }
        }
        let mut announced = log.lock().unwrap().clone();
        announced.sort_by_key(|(shard, _)| *shard);
        assert_eq!(announced, expected, "{path}");
    }
    assert!(r.chunks_of(r.find(b"d/random").unwrap()).len() > 1);
}

#[test]
fn the_write_summary_counts_a_shared_frame_once_like_verify() {
    let (sinks, boxed) = MemSink::many(1);
    let mut w = ArchiveWriter::new(boxed, options(Compression::zstd(1)), [30; 16], 0).unwrap();
    let mut bundle = Vec::new();
    for k in 0..4u8 {
        let content = vec![b'a' + k; 3000];
        let id = w
            .add_entry(entry(&format!("small-{k}"), EntryKind::File, 3000))
            .unwrap();
        bundle.push((id, content));
    }
    w.add_bundle(bundle).unwrap();
    let summary = w.finish().unwrap();
    let r = open_in_memory(&[sinks[0].bytes()]).unwrap();
    let report = r.verify(2, &Default::default()).unwrap();
    assert_eq!(
        r.index().chunks.len(),
        4,
        "one chunk per file, one shared frame"
    );
    assert_eq!(summary.stored_bytes, report.stored_bytes);
    assert_eq!(summary.stored_bytes, r.index().summary().stored_bytes);
}

#[test]
fn end_entry_accepts_only_a_streamed_entry_waiting_for_its_size() {
    let (_, boxed) = MemSink::many(1);
    let mut w = ArchiveWriter::new(boxed, options(Compression::NONE), [31; 16], 0).unwrap();
    let plain = w.add_entry(entry("plain", EntryKind::File, 3)).unwrap();
    let mut streamed = entry("streamed", EntryKind::File, 0);
    streamed.flags = crate::index::entry_flags::STREAMED;
    let streamed = w.add_entry(streamed).unwrap();
    for (id, what) in [(plain, "not streamed"), (99, "unknown")] {
        let err = w.end_entry(id, 3).unwrap_err();
        assert!(matches!(err, Error::Usage(_)), "{what}: {err}");
    }
    w.end_entry(streamed, 0).unwrap();
    let err = w.end_entry(streamed, 0).unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "ended twice: {err}");
}

/// The fuzzing bypass of the digest checks must never be in a normal build: a chunk's
/// digest and the index's digest in the footer are compared.
#[test]
fn digests_are_enforced() {
    let digest = *blake3::hash(b"data").as_bytes();
    assert!(crate::reader::verify_digest(b"data", &digest, String::new).is_ok());
    assert!(matches!(
        crate::reader::verify_digest(b"date", &digest, String::new),
        Err(Error::DigestMismatch { .. })
    ));
    let bytes = crate::testutil::craft(vec![(entry("a", EntryKind::File, 0), Some(b"x".to_vec()))]);
    let mut footer = crate::testutil::crafted_footer(&bytes);
    footer.index_digest[31] ^= 1;
    let mut damaged = bytes.clone();
    let at = damaged.len() - FOOTER_LEN;
    damaged[at..].copy_from_slice(&footer.encode());
    let err = open_err(&[damaged]);
    assert!(
        matches!(&err, Error::DigestMismatch { what } if what.contains("index")),
        "{err}"
    );
}

/// A footer may claim an index of up to 1 GiB; the reader allocates what the index
/// decompresses to, not what the footer claims, and refuses the difference.
#[test]
fn an_index_shorter_than_the_footer_claims_is_refused() {
    let bytes = crate::testutil::craft(vec![(entry("a", EntryKind::File, 0), Some(b"x".to_vec()))]);
    let mut footer = crate::testutil::crafted_footer(&bytes);
    let loc = footer.index.as_mut().unwrap();
    loc.raw_len = crate::layout::MAX_INDEX_RAW;
    let mut claimed = bytes.clone();
    let at = claimed.len() - FOOTER_LEN;
    claimed[at..].copy_from_slice(&footer.encode());
    let err = open_err(&[claimed]);
    assert!(
        matches!(&err, Error::DigestMismatch { what } if what.contains("index")),
        "{err}"
    );
    let raw = prost::Message::encode_to_vec(&crate::testutil::read_index(&bytes));
    let decoded =
        super::decompress_index(&zstd::bulk::compress(&raw, 1).unwrap(), 1 << 30).unwrap();
    assert_eq!(decoded, raw);
    assert!(decoded.capacity() <= 1 << 20, "{}", decoded.capacity());
}

mod parents;
mod sealed;
