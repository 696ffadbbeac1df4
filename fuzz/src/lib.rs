//! Shared by the fuzz targets: how a fuzz input becomes a committed archive.
//!
//! Random bytes almost never form an archive: the index is zstd-compressed and every
//! structure carries a check value. Fuzz builds (`cfg(fuzzing)`) of `ckstream-format`
//! accept any check value and digest, and the *structured* targets (`archive`, `unpack`)
//! take the index uncompressed and build the rest themselves, so that a mutation of the
//! index or of a record lands in index validation, `verify` and extraction instead of in
//! a decompressor's error path. Their input is
//!
//! ```text
//! flags: u8              bit 0: INLINE_ENTRIES; bits 1-2: extra shards (0..=3);
//!                        bits 3-7: for the target
//! index_len: u16 LE, then index_len bytes: the protobuf `Index`, uncompressed
//! for each shard but the last: body_len: u16 LE, then body_len bytes
//! the last shard's body: the rest
//! ```
//!
//! where a shard's body is its data region (records, from offset 4096). [`assemble`]
//! adds what a writer would: the shard headers, shard 0's index record (the index zstd
//! compressed), and the footers, whose record counts are what a scan of each body finds.
//! `scripts/fuzz-seeds.py` turns real archives into such inputs for the seed corpora.

use std::alloc::{GlobalAlloc, Layout, System};

use ckstream_format::layout::{
    optional, required, Footer, IndexLocation, RecordHeader, RecordKind, ShardHeader, HASH_BLAKE3,
};
use ckstream_format::{ArchiveReader, CodecId, RecordScanner, ShardSource};

/// Largest single allocation a target may make: more is reported as a crash (abort),
/// whatever the sanitizer (libFuzzer's `-malloc_limit_mb` needs ASan's malloc hooks, and
/// fuzzing without ASan is several times faster). No input of at most `-max_len` bytes
/// should make ckstream allocate anything close to this; `CKSTREAM_FUZZ_MALLOC_LIMIT_MB`
/// changes it.
pub const MALLOC_LIMIT: usize = 256 << 20;

/// The global allocator of every target: the system's, refusing allocations over the
/// limit (see [`MALLOC_LIMIT`]).
pub struct LimitedAlloc;

fn malloc_limit() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static LIMIT: AtomicUsize = AtomicUsize::new(0);
    match LIMIT.load(Ordering::Relaxed) {
        0 => {
            // Parsing the variable allocates: only the first call gets here (an
            // allocation it makes sees the default, being small).
            LIMIT.store(MALLOC_LIMIT, Ordering::Relaxed);
            let limit = std::env::var("CKSTREAM_FUZZ_MALLOC_LIMIT_MB")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(MALLOC_LIMIT, |mb| mb << 20);
            LIMIT.store(limit, Ordering::Relaxed);
            limit
        }
        limit => limit,
    }
}

fn check_size(size: usize) {
    if size > malloc_limit() {
        // Unbuffered stderr does not allocate; the abort is a crash to libFuzzer.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"==ckstream-fuzz== allocation over the limit (CKSTREAM_FUZZ_MALLOC_LIMIT_MB)\n",
        );
        std::process::abort();
    }
}

// SAFETY: every method forwards to `System` with the same arguments, after a size check
// that aborts instead of allocating.
unsafe impl GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check_size(layout.size());
        // SAFETY: the caller's contract is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check_size(layout.size());
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check_size(new_size);
        // SAFETY: as `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LimitedAlloc = LimitedAlloc;

/// Archive id of every assembled archive.
pub const ARCHIVE_ID: [u8; 16] = *b"ckstream-fuzzing";

/// A fuzz input cut into its parts (see the crate documentation).
#[derive(Debug)]
pub struct ArchiveInput<'a> {
    /// The flags byte.
    pub flags: u8,
    /// The uncompressed protobuf index.
    pub index: &'a [u8],
    /// Each shard's data region.
    pub bodies: Vec<&'a [u8]>,
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, rest) = data.split_at(n);
    *data = rest;
    head
}

fn take_len(data: &mut &[u8]) -> usize {
    let b = take(data, 2);
    match b {
        [a, b] => u16::from_le_bytes([*a, *b]) as usize,
        [a] => *a as usize,
        _ => 0,
    }
}

impl<'a> ArchiveInput<'a> {
    /// Cuts `data` into flags, index and shard bodies; missing parts are empty.
    pub fn parse(mut data: &'a [u8]) -> Self {
        let flags = take(&mut data, 1).first().copied().unwrap_or(0);
        let n = take_len(&mut data);
        let index = take(&mut data, n);
        let shards = 1 + ((flags >> 1) & 3) as usize;
        let mut bodies = Vec::with_capacity(shards);
        for _ in 1..shards {
            let n = take_len(&mut data);
            bodies.push(take(&mut data, n));
        }
        bodies.push(data);
        ArchiveInput {
            flags,
            index,
            bodies,
        }
    }
}

fn header(flags: u8, shard_index: u32, shard_count: u32) -> Vec<u8> {
    ShardHeader {
        alignment_log2: 12,
        hash_algo: HASH_BLAKE3,
        required_features: if shard_count > 1 {
            required::ID_NAMED_SHARDS
        } else {
            0
        },
        optional_features: if flags & 1 != 0 {
            optional::INLINE_ENTRIES
        } else {
            0
        },
        archive_id: ARCHIVE_ID,
        shard_index,
        shard_count,
        created_unix_ns: 0,
    }
    .encode()
}

/// Records a scan of `shard` (header and body, no footer yet) finds before it stops.
fn count_records(shard: &[u8]) -> u64 {
    let Ok(mut scanner) = RecordScanner::new(shard, "fuzz") else {
        return 0;
    };
    let mut n = 0;
    while let Ok(Some(_)) = scanner.next_record() {
        n += 1;
    }
    n
}

/// The shards of the archive `input` describes, each committed.
pub fn assemble(input: &ArchiveInput) -> Vec<Vec<u8>> {
    let count = input.bodies.len() as u32;
    let index_digest = *blake3::hash(input.index).as_bytes();
    let mut shards = Vec::with_capacity(input.bodies.len());
    for (i, body) in input.bodies.iter().enumerate() {
        let mut shard = header(input.flags, i as u32, count);
        shard.extend_from_slice(body);
        let mut records = count_records(&shard);
        let mut index = None;
        if i == 0 {
            let stored = zstd::bulk::compress(input.index, 1).expect("zstd compresses");
            let h = RecordHeader {
                kind: RecordKind::Index,
                codec: CodecId::Zstd,
                flags: 0,
                seq: records,
                entry_id: 0,
                file_offset: 0,
                raw_len: input.index.len() as u32,
                stored_len: stored.len() as u32,
                pad: 0,
                digest: index_digest,
            };
            shard.extend_from_slice(&h.encode());
            index = Some(IndexLocation {
                offset: shard.len() as u64,
                stored_len: stored.len() as u64,
                raw_len: input.index.len() as u64,
            });
            shard.extend_from_slice(&stored);
            records += 1;
        }
        let footer = Footer {
            archive_id: ARCHIVE_ID,
            shard_index: i as u32,
            shard_count: count,
            index,
            index_digest,
            data_end: shard.len() as u64,
            record_count: records,
        };
        shard.extend_from_slice(&footer.encode());
        shards.push(shard);
    }
    shards
}

/// Opens assembled shards as an archive.
///
/// # Errors
/// As [`ArchiveReader::open`].
pub fn open(shards: &[Vec<u8>]) -> ckstream_format::Result<ArchiveReader> {
    ArchiveReader::open(Box::new(shards[0].clone()), |_, i| {
        Ok(Box::new(shards[i as usize].clone()) as Box<dyn ShardSource>)
    })
}

/// Total bytes that reading every chunk of `reader` decodes (shared frames counted per
/// chunk): the harnesses skip archives that would decode or write more than they can
/// afford per run (several chunks may point at one zstd bomb).
pub fn decoded_bytes(reader: &ArchiveReader) -> u64 {
    reader
        .index()
        .chunks
        .iter()
        .map(|c| c.decoded_len() as u64)
        .sum()
}

/// A fixed key pair for the `sealed` target and its seeds (scripts/fuzz-seeds.py writes
/// the same text to a key file): a test key, it protects nothing.
pub const FUZZ_SECRET_KEY: &str = "ckstream-secret-key v1\n# key id f23e97553d16d495 — keep this file secret\nsigning-seed 2734a7f27b9839e751c01de9e982313ec2d45e81edae7d13782f15b8e7914e01\nencryption-secret 50e116f7112f709627723c2fb682fc48f6aeb5847bedf4e6157554af97a6f62a\n";
