//! Random-access reader: the index first, then only the chunks asked for.
//!
//! [`ArchiveReader::open`] hands out nothing before it has checked the commit: shard 0's
//! footer and the index's digest, the index itself ([`Index::validate`]), and every other
//! shard's header and footer against shard 0 (same archive id, shard count and index
//! digest, the size the index records). With [`ArchiveReader::open_deferred`] those
//! checks of shards 1.. move to each shard's first read, but still come before any of its
//! bytes. Chunk bytes are returned only after their digest matched.
//!
//! The sequential scanner lives in [`crate::scanner`] and the check of every record,
//! [`ArchiveReader::verify`], in its own module; their types are re-exported here so the
//! paths `reader::RecordScanner` and `reader::VerifyReport` keep working.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, OnceLock};

use prost::Message;

use crate::codec::{self, CodecId};
use crate::crypto::{self, ArchiveKey, Keyring, SignatureStatus, INDEX_SEQ};
use crate::error::{Error, Result};
use crate::index::{Chunk, Entry, Index};
use crate::layout::{
    required, Footer, RecordHeader, RecordKind, ShardHeader, FOOTER_LEN, HEADER_LEN, MAX_TRAILER,
    RECORD_HEADER_LEN,
};

pub use crate::scanner::{RecordScanner, ScannedRecord, SourceReader};
pub use crate::verify::VerifyReport;

/// Read side of a shard: a local file, an object, a byte buffer.
///
/// Implementations live in `ckstream-store` (files, S3) and in tests (memory).
#[allow(clippy::len_without_is_empty)]
pub trait ShardSource: Send + Sync {
    /// Total length in bytes.
    ///
    /// # Errors
    /// The I/O error of the size query.
    fn len(&self) -> io::Result<u64>;

    /// Fills `buf` from `offset`.
    ///
    /// # Errors
    /// `UnexpectedEof` when the range passes the end; any other I/O error.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Reads `len` bytes at `offset` into a new buffer.
    ///
    /// # Errors
    /// As [`read_exact_at`](Self::read_exact_at).
    fn read_partial(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(offset, &mut buf)?;
        Ok(buf)
    }

    /// Reads several `(offset, len)` ranges, returning their bytes in the same order.
    /// Sources where every request costs a round trip (object stores) override this to
    /// merge adjacent ranges into one request and to send independent requests in
    /// parallel; the default reads the ranges one after the other.
    ///
    /// # Errors
    /// As [`read_exact_at`](Self::read_exact_at), for the first range that fails.
    fn read_ranges(&self, ranges: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
        ranges
            .iter()
            .map(|&(offset, len)| self.read_partial(offset, len))
            .collect()
    }

    /// True when reads are cheap and local (a file, memory); false for sources with
    /// per-request latency, whose readers should batch and read ahead.
    fn is_local(&self) -> bool {
        true
    }

    /// A hint that most reads from now on go front to back (a restore, a verify):
    /// sources with per-request latency may then fetch large spans ahead of the reads.
    fn expect_sequential(&self) {}

    /// Like [`expect_sequential`](Self::expect_sequential), for a reader that also waits
    /// on single reads out of order (a lazy restore answering page faults while it
    /// pushes every page): sources keep their read-ahead requests small, so that an
    /// urgent read is answered soon and little is held.
    fn expect_sequential_with_urgent_reads(&self) {
        self.expect_sequential();
    }

    /// A hint that the stored ranges `(offset, len)` are about to be read, in this order
    /// (one file being streamed out). Sources that read ahead fetch only what has been
    /// announced, instead of guessing past the end of what a caller needs.
    fn will_read(&self, _ranges: &[(u64, u64)]) {}

    /// The local file behind this shard, when there is one (lets callers reflink out of it).
    fn as_file(&self) -> Option<&File> {
        None
    }

    /// A name for messages.
    fn describe(&self) -> String;
}

impl ShardSource for Vec<u8> {
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > <[u8]>::len(self) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// How much of the tail `open` fetches in one read, hoping the index fits in it.
pub const TAIL_READ: u64 = 256 << 10;

/// Stored bytes [`ArchiveReader::copy_entry`] reads per batch.
pub const COPY_BATCH_BYTES: u64 = 16 << 20;

struct OpenShard {
    source: Box<dyn ShardSource>,
}

/// Opens shard `i` ≥ 1 of the archive whose shard 0 has the given header (which tells
/// how the shards are named: see [`ShardHeader::id_named_shards`]); for
/// [`ArchiveReader::open_deferred`].
pub type ShardOpener = dyn Fn(&ShardHeader, u32) -> Result<Box<dyn ShardSource>> + Send + Sync;

/// [`ShardOpener`] for [`ArchiveReader::open`], called at once for every shard.
type ShardOpenerNow<'a> = dyn FnMut(&ShardHeader, u32) -> Result<Box<dyn ShardSource>> + 'a;

enum OtherShards<'a> {
    Now(&'a mut ShardOpenerNow<'a>),
    OnFirstUse(Arc<ShardOpener>),
}

/// What shard 0 says every other shard must match.
#[derive(Clone)]
struct ShardExpectation {
    header: ShardHeader,
    index_digest: [u8; 32],
    /// [`Index::shard_bytes`]: empty, or each shard's size.
    shard_bytes: Vec<u64>,
}

impl ShardExpectation {
    /// Checks shard `i`'s header and footer; returns where its data region ends.
    fn check(&self, src: &dyn ShardSource, i: u32) -> Result<u64> {
        let name = src.describe();
        let len = src
            .len()
            .map_err(|e| Error::io(format!("size of {name}"), e))?;
        let h = read_header(src, len)?;
        if h.archive_id != self.header.archive_id
            || h.shard_index != i
            || h.shard_count != self.header.shard_count
        {
            return Err(Error::Corrupt(format!(
                "{name} is not shard {i} of this archive (it is shard {} of {} of another archive)",
                h.shard_index, h.shard_count
            )));
        }
        if len < (HEADER_LEN + FOOTER_LEN) as u64 {
            return Err(Error::Incomplete(format!("{name} ends after {len} bytes")));
        }
        if let Some(&want) = self.shard_bytes.get(i as usize).filter(|&&b| b != 0) {
            if len != want {
                return Err(Error::Corrupt(format!(
                    "{name} is {len} bytes long; the index says {want}"
                )));
            }
        }
        let mut fb = vec![0u8; FOOTER_LEN];
        read_at(src, len - FOOTER_LEN as u64, &mut fb, "footer")?;
        let f = Footer::decode(&fb, len, &name)?;
        check_footer_matches(&f, &self.header, i, &name)?;
        if f.index_digest != self.index_digest {
            return Err(Error::Corrupt(format!(
                "{name} belongs to a different write of this archive"
            )));
        }
        Ok(f.data_end)
    }
}

/// Lowest start and highest end of the chunks the index places in one shard.
#[derive(Clone, Copy)]
struct ChunkExtent {
    start: u64,
    end: Option<u64>,
}

fn chunk_extents(index: &Index, shard_count: u32) -> Vec<ChunkExtent> {
    let mut extents = vec![
        ChunkExtent {
            start: u64::MAX,
            end: Some(0),
        };
        shard_count as usize
    ];
    for c in index.chunks.iter().filter(|c| c.archive == 0) {
        // `Index::validate` has checked that every chunk of its own names an existing
        // shard; a parent's chunks are checked by the parent's reader.
        let x = &mut extents[c.shard as usize];
        x.start = x.start.min(c.offset);
        x.end = match (x.end, c.offset.checked_add(c.stored_len as u64)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    extents
}

fn check_chunk_extents(x: &ChunkExtent, shard: u32, data_end: u64) -> Result<()> {
    if x.start == u64::MAX {
        return Ok(());
    }
    if x.start < (HEADER_LEN + RECORD_HEADER_LEN) as u64 || x.end.is_none_or(|e| e > data_end) {
        return Err(Error::Corrupt(format!(
            "a chunk in shard {shard} lies outside its data region (ends at {:?}, region ends at {data_end})",
            x.end
        )));
    }
    Ok(())
}

/// A shard that is opened and checked on first use (see [`ArchiveReader::open_deferred`]).
/// Its check's error, if any, is returned by every later call, carried in an `io::Error`
/// that [`Error::io`] turns back into the archive error.
struct DeferredShard {
    index: u32,
    open_shard: Arc<ShardOpener>,
    expected: ShardExpectation,
    extent: ChunkExtent,
    opened: OnceLock<Result<Box<dyn ShardSource>>>,
    checked: OnceLock<Result<()>>,
}

impl DeferredShard {
    /// The shard, opened but not necessarily checked (enough for its size).
    fn opened(&self) -> io::Result<&dyn ShardSource> {
        match self
            .opened
            .get_or_init(|| (self.open_shard)(&self.expected.header, self.index))
        {
            Ok(src) => Ok(src.as_ref()),
            Err(e) => Err(e.duplicate().into_io()),
        }
    }

    /// The shard, opened and checked: only then are its bytes handed out.
    fn source(&self) -> io::Result<&dyn ShardSource> {
        let src = self.opened()?;
        let checked = self.checked.get_or_init(|| {
            let data_end = self.expected.check(src, self.index)?;
            check_chunk_extents(&self.extent, self.index, data_end)
        });
        match checked {
            Ok(()) => Ok(src),
            Err(e) => Err(e.duplicate().into_io()),
        }
    }
}

impl ShardSource for DeferredShard {
    fn len(&self) -> io::Result<u64> {
        self.opened()?.len()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.source()?.read_exact_at(offset, buf)
    }
    fn read_partial(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.source()?.read_partial(offset, len)
    }
    fn read_ranges(&self, ranges: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
        self.source()?.read_ranges(ranges)
    }
    fn is_local(&self) -> bool {
        self.opened().map_or(true, |s| s.is_local())
    }
    fn expect_sequential(&self) {
        if let Ok(s) = self.opened() {
            s.expect_sequential();
        }
    }
    fn expect_sequential_with_urgent_reads(&self) {
        if let Ok(s) = self.opened() {
            s.expect_sequential_with_urgent_reads();
        }
    }
    fn will_read(&self, ranges: &[(u64, u64)]) {
        if let Ok(s) = self.opened() {
            s.will_read(ranges);
        }
    }
    fn as_file(&self) -> Option<&File> {
        self.source().ok()?.as_file()
    }
    fn describe(&self) -> String {
        match self.opened.get() {
            Some(Ok(src)) => src.describe(),
            _ => format!("shard {}", self.index),
        }
    }
}

/// An opened, validated, committed archive.
pub struct ArchiveReader {
    header: ShardHeader,
    footer: Footer,
    index: Index,
    by_path: HashMap<Vec<u8>, usize>,
    shards: Vec<OpenShard>,
    /// The archive key of a sealed archive.
    key: Option<Arc<ArchiveKey>>,
    signature: SignatureStatus,
    /// The archives of `Index::parents`, in order, once attached.
    parents: Vec<ArchiveReader>,
}

/// The records shard 0 holds between its index and its footer.
#[derive(Default)]
struct Trailer {
    keys: Option<Vec<u8>>,
    signature: Option<Vec<u8>>,
}

/// Reads the Keys and Signature records between the index and the footer (each at most
/// once, in that order, intact); `tail` holds the shard's bytes from `tail_start`.
fn read_trailer(
    src: &dyn ShardSource,
    tail: &[u8],
    tail_start: u64,
    start: u64,
    end: u64,
) -> Result<Trailer> {
    let name = src.describe();
    if start > end || end - start > MAX_TRAILER {
        return Err(Error::Corrupt(format!(
            "{name}: {} bytes between the index and the footer",
            end as i128 - start as i128
        )));
    }
    let bytes = if start >= tail_start {
        tail[(start - tail_start) as usize..(end - tail_start) as usize].to_vec()
    } else {
        let mut b = vec![0u8; (end - start) as usize];
        read_at(src, start, &mut b, "records after the index")?;
        b
    };
    let mut trailer = Trailer::default();
    let mut rest = bytes.as_slice();
    let mut at = start;
    while !rest.is_empty() {
        let what = format!("{name}: record at offset {at} after the index");
        if rest.len() < RECORD_HEADER_LEN {
            return Err(Error::Corrupt(format!("{what} is cut short")));
        }
        let h = RecordHeader::decode(&rest[..RECORD_HEADER_LEN], &what)?;
        let len = RECORD_HEADER_LEN + h.pad as usize + h.stored_len as usize;
        if rest.len() < len || h.pad != 0 || h.codec != CodecId::None {
            return Err(Error::Corrupt(format!("{what} is malformed")));
        }
        let payload = rest[RECORD_HEADER_LEN..len].to_vec();
        if !digest_matches(&payload, &h.digest) {
            return Err(Error::DigestMismatch { what });
        }
        let slot = match h.kind {
            RecordKind::Keys if trailer.signature.is_none() => &mut trailer.keys,
            RecordKind::Signature => &mut trailer.signature,
            _ => return Err(Error::Corrupt(format!("{what}: unexpected {:?}", h.kind))),
        };
        if slot.replace(payload).is_some() {
            return Err(Error::Corrupt(format!("{what}: {:?} twice", h.kind)));
        }
        rest = &rest[len..];
        at += len as u64;
    }
    Ok(trailer)
}

fn read_at(src: &dyn ShardSource, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
    src.read_exact_at(offset, buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Corrupt(format!(
                "{}: {what} lies past the end of the shard (truncated?)",
                src.describe()
            ))
        } else {
            Error::io(format!("reading {what} from {}", src.describe()), e)
        }
    })
}

fn read_header(src: &dyn ShardSource, len: u64) -> Result<ShardHeader> {
    let name = src.describe();
    let n = len.min(HEADER_LEN as u64) as usize;
    let mut buf = vec![0u8; n];
    read_at(src, 0, &mut buf, "shard header")?;
    if n < HEADER_LEN {
        // Distinguish "not ours" from "ours but cut short" for the message.
        ShardHeader::decode(&[buf.clone(), vec![0; HEADER_LEN - n]].concat(), &name)
            .and_then(|_| Err(Error::Incomplete(format!("{name} is only {len} bytes"))))
    } else {
        ShardHeader::decode(&buf, &name)
    }
}

impl ArchiveReader {
    /// Opens an archive from its shard 0: `open_shard(header, i)` must return shard
    /// `i` ≥ 1, given shard 0's header. Reads shard 0's header, its tail (footer and
    /// usually the whole index in one read), validates the index, then checks every other
    /// shard's header and footer.
    ///
    /// # Errors
    /// [`Error::NotAnArchive`], [`Error::Incomplete`] (no commit footer on any shard),
    /// [`Error::Corrupt`], [`Error::Unsupported`], [`Error::UnsafeEntry`], or the error
    /// of `open_shard` (for example a missing shard file, named in the message).
    pub fn open(
        shard0: Box<dyn ShardSource>,
        open_shard: impl FnMut(&ShardHeader, u32) -> Result<Box<dyn ShardSource>>,
    ) -> Result<Self> {
        Self::open_keyed(shard0, open_shard, &Keyring::default())
    }

    /// [`open`](Self::open) with keys: `keys.secrets` to open a sealed archive, and
    /// `keys.trusted`, when not empty, the signers to require.
    ///
    /// # Errors
    /// As [`open`](Self::open); [`Error::Usage`] for a sealed archive none of the keys
    /// opens; [`Error::Untrusted`] for an archive not signed by a trusted key;
    /// [`Error::DigestMismatch`] for a sealed index that does not authenticate.
    pub fn open_keyed(
        shard0: Box<dyn ShardSource>,
        mut open_shard: impl FnMut(&ShardHeader, u32) -> Result<Box<dyn ShardSource>>,
        keys: &Keyring,
    ) -> Result<Self> {
        Self::open_with(shard0, OtherShards::Now(&mut open_shard), keys)
    }

    /// Like [`open`](Self::open), but shards 1.. are opened and checked (header, footer,
    /// chunk extents) only when first read. For object stores: `ls` and `info` then
    /// touch shard 0 only. A problem found later surfaces as the same error `open`
    /// would have returned, from the read that found it.
    ///
    /// # Errors
    /// As [`open`](Self::open), for shard 0.
    pub fn open_deferred(
        shard0: Box<dyn ShardSource>,
        open_shard: Arc<ShardOpener>,
    ) -> Result<Self> {
        Self::open_deferred_keyed(shard0, open_shard, &Keyring::default())
    }

    /// [`open_deferred`](Self::open_deferred) with keys, as [`open_keyed`](Self::open_keyed).
    ///
    /// # Errors
    /// As [`open_keyed`](Self::open_keyed), for shard 0.
    pub fn open_deferred_keyed(
        shard0: Box<dyn ShardSource>,
        open_shard: Arc<ShardOpener>,
        keys: &Keyring,
    ) -> Result<Self> {
        Self::open_with(shard0, OtherShards::OnFirstUse(open_shard), keys)
    }

    fn open_with(
        s0: Box<dyn ShardSource>,
        open_other_shards: OtherShards<'_>,
        keys: &Keyring,
    ) -> Result<Self> {
        let name0 = s0.describe();
        let len0 = s0
            .len()
            .map_err(|e| Error::io(format!("size of {name0}"), e))?;
        let header = read_header(s0.as_ref(), len0)?;
        if header.shard_index != 0 {
            return Err(Error::Usage(format!(
                "{name0} is shard {} of {}; open the archive by its first shard",
                header.shard_index, header.shard_count
            )));
        }
        if len0 < (HEADER_LEN + FOOTER_LEN) as u64 {
            return Err(Error::Incomplete(format!(
                "{name0} ends after {len0} bytes"
            )));
        }
        let tail_len = TAIL_READ.min(len0 - HEADER_LEN as u64);
        let tail_start = len0 - tail_len;
        let tail = {
            let mut b = vec![0u8; tail_len as usize];
            read_at(s0.as_ref(), tail_start, &mut b, "archive tail")?;
            b
        };
        let footer = Footer::decode(&tail[tail.len() - FOOTER_LEN..], len0, &name0)?;
        check_footer_matches(&footer, &header, 0, &name0)?;
        let loc = footer
            .index
            .ok_or_else(|| Error::Corrupt(format!("{name0}: shard 0 footer has no index")))?;
        let stored = if loc.offset >= tail_start {
            let s = (loc.offset - tail_start) as usize;
            tail[s..s + loc.stored_len as usize].to_vec()
        } else {
            let mut b = vec![0u8; loc.stored_len as usize];
            read_at(s0.as_ref(), loc.offset, &mut b, "index")?;
            b
        };
        let sealed = header.required_features & required::SEALED != 0;
        let trailer = read_trailer(
            s0.as_ref(),
            &tail,
            tail_start,
            loc.offset.saturating_add(loc.stored_len),
            footer.data_end,
        )?;
        let key = match (sealed, &trailer.keys) {
            (false, None) => None,
            (true, Some(keys_record)) => Some(Arc::new(ArchiveKey::open(
                header.archive_id,
                keys_record,
                &keys.secrets,
            )?)),
            (true, None) => {
                return Err(Error::Corrupt(format!(
                    "{name0}: the archive is sealed but has no Keys record"
                )))
            }
            (false, Some(_)) => {
                return Err(Error::Corrupt(format!(
                    "{name0}: a Keys record in an archive that is not sealed"
                )))
            }
        };
        let stored = match &key {
            Some(key) => {
                let raw_len = u32::try_from(loc.raw_len)
                    .map_err(|_| Error::Corrupt(format!("{name0}: index too large")))?;
                key.open_payload(
                    INDEX_SEQ,
                    RecordKind::Index,
                    CodecId::Zstd as u8,
                    raw_len,
                    stored,
                    || format!("the index of {name0}"),
                )?
            }
            None => stored,
        };
        let raw = decompress_index(&stored, loc.raw_len)
            .map_err(|e| Error::Corrupt(format!("{name0}: index does not decompress: {e}")))?;
        if raw.len() as u64 != loc.raw_len || !digest_matches(&raw, &footer.index_digest) {
            return Err(Error::DigestMismatch {
                what: format!("the index of {name0}"),
            });
        }
        let index = Index::decode(raw.as_slice())
            .map_err(|e| Error::Corrupt(format!("{name0}: index does not decode: {e}")))?;
        let by_path = index.validate_for(header.shard_count, sealed)?;
        let signature = match (&trailer.signature, keys.trusted.is_empty()) {
            (None, true) => SignatureStatus::Unsigned,
            (None, false) => {
                return Err(Error::Untrusted(format!(
                    "{name0} is not signed, and trusted keys were given"
                )))
            }
            (Some(record), true) => SignatureStatus::NotChecked(crypto::signer_id(record)?),
            (Some(record), false) => SignatureStatus::Verified(
                crypto::check_signature(
                    record,
                    &header.archive_id,
                    header.shard_count,
                    &footer.index_digest,
                    &keys.trusted,
                )
                .map_err(|e| match e {
                    Error::Untrusted(why) => Error::Untrusted(format!("{name0}: {why}")),
                    other => other,
                })?,
            ),
        };

        let mut shards = vec![OpenShard { source: s0 }];
        let extents = chunk_extents(&index, header.shard_count);
        let expected = ShardExpectation {
            header: header.clone(),
            index_digest: footer.index_digest,
            shard_bytes: index.shard_bytes.clone(),
        };
        check_chunk_extents(&extents[0], 0, footer.data_end)?;
        match open_other_shards {
            OtherShards::Now(open_shard) => {
                for i in 1..header.shard_count {
                    let src = open_shard(&header, i)?;
                    let data_end = expected.check(src.as_ref(), i)?;
                    check_chunk_extents(&extents[i as usize], i, data_end)?;
                    shards.push(OpenShard { source: src });
                }
            }
            OtherShards::OnFirstUse(open_shard) => {
                for i in 1..header.shard_count {
                    shards.push(OpenShard {
                        source: Box::new(DeferredShard {
                            index: i,
                            open_shard: open_shard.clone(),
                            expected: expected.clone(),
                            extent: extents[i as usize],
                            opened: OnceLock::new(),
                            checked: OnceLock::new(),
                        }),
                    });
                }
            }
        }
        Ok(ArchiveReader {
            header,
            footer,
            index,
            by_path,
            shards,
            key,
            signature,
            parents: Vec::new(),
        })
    }

    /// Attaches the archives an incremental archive references (`Index::parents`, in
    /// order), each checked to be the very archive the index names. `names` name them in
    /// messages.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming a parent that is another archive, was rewritten, or is
    /// encrypted; [`Error::Usage`] for the wrong number of parents.
    pub fn attach_parents(&mut self, parents: Vec<(ArchiveReader, String)>) -> Result<()> {
        if parents.len() != self.index.parents.len() {
            return Err(Error::Usage(format!(
                "the archive has {} parent archives, {} were given",
                self.index.parents.len(),
                parents.len()
            )));
        }
        let mut readers = Vec::with_capacity(parents.len());
        for ((reader, name), expected) in parents.into_iter().zip(&self.index.parents) {
            crate::parents::check_parent(&reader, expected, &name)?;
            readers.push(reader);
        }
        self.parents = readers;
        Ok(())
    }

    /// The archives this one references, as attached.
    pub fn parents(&self) -> &[ArchiveReader] {
        &self.parents
    }

    /// For a chunk stored in a parent archive (`c.archive` > 0): that parent, and the
    /// chunk as the parent itself records it (in one of its own shards).
    ///
    /// # Errors
    /// [`Error::Usage`] when the parent was not attached; [`Error::Corrupt`] for a shard
    /// the parent does not have.
    fn in_parent(&self, c: &Chunk) -> Result<(&ArchiveReader, Chunk)> {
        let n = c.archive as usize - 1;
        let holder = self.parents.get(n).ok_or_else(|| {
            Error::Usage(format!(
                "the chunk is stored in parent archive {}, which was not opened",
                self.index
                    .parents
                    .get(n)
                    .map_or("?", |p| p.location.as_str())
            ))
        })?;
        if c.shard >= holder.shard_count() {
            return Err(Error::Corrupt(format!(
                "a chunk in shard {} of parent archive {} of {} shards",
                c.shard,
                c.archive,
                holder.shard_count()
            )));
        }
        Ok((
            holder,
            Chunk {
                archive: 0,
                ..c.clone()
            },
        ))
    }

    /// Tells every shard, of this archive and of its parents, that it will be read front
    /// to back (see [`ShardSource::expect_sequential`]).
    pub fn expect_sequential(&self) {
        self.every_source(|s| s.expect_sequential());
    }

    /// Tells every shard, of this archive and of its parents, that it will be read front
    /// to back with urgent reads out of order between (see
    /// [`ShardSource::expect_sequential_with_urgent_reads`]).
    pub fn expect_sequential_with_urgent_reads(&self) {
        self.every_source(|s| s.expect_sequential_with_urgent_reads());
    }

    fn every_source(&self, f: impl Fn(&dyn ShardSource)) {
        for r in std::iter::once(self).chain(&self.parents) {
            for s in &r.shards {
                f(s.source.as_ref());
            }
        }
    }

    /// The local file holding chunk `c`'s bytes unsealed, for reflinking or splicing out
    /// of it: a file of this archive or of the parent that stores it.
    pub fn raw_file_of(&self, c: &Chunk) -> Option<&File> {
        if c.archive == 0 {
            return self.raw_file(c.shard);
        }
        let (holder, own) = self.in_parent(c).ok()?;
        holder.raw_file(own.shard)
    }

    /// True for a sealed (encrypted) archive: chunks are opened with its key as they are
    /// read, and never reflinked.
    pub fn is_sealed(&self) -> bool {
        self.key.is_some()
    }

    /// Whether and by whom the archive is signed, and whether that was checked.
    pub fn signature(&self) -> &SignatureStatus {
        &self.signature
    }

    /// The local file behind shard `i` when its stored bytes are the chunks' bytes (an
    /// unsealed archive), for reflinking or splicing out of it.
    pub fn raw_file(&self, i: u32) -> Option<&File> {
        if self.key.is_some() {
            return None;
        }
        self.shard(i).as_file()
    }

    /// The archive key of a sealed archive.
    pub(crate) fn key(&self) -> Option<&ArchiveKey> {
        self.key.as_deref()
    }

    /// Opens a sealed chunk's stored bytes (for verify, which reads them itself).
    pub(crate) fn read_sealed(&self, c: &Chunk, stored: Vec<u8>) -> Result<Vec<u8>> {
        self.unseal(c, stored)
    }

    /// Opens a sealed chunk's stored bytes; unsealed bytes pass through.
    fn unseal(&self, c: &Chunk, stored: Vec<u8>) -> Result<Vec<u8>> {
        let Some(key) = &self.key else {
            return Ok(stored);
        };
        key.open_payload(
            c.seq,
            RecordKind::Data,
            c.codec as u8,
            c.decoded_len(),
            stored,
            || format!("the chunk at shard {} offset {}", c.shard, c.offset),
        )
    }

    /// Shard 0's header.
    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    /// Shard 0's footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The validated index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Every entry, by id.
    pub fn entries(&self) -> &[Entry] {
        &self.index.entries
    }

    /// Position of the entry with this path.
    pub fn find(&self, path: &[u8]) -> Option<usize> {
        self.by_path.get(path).copied()
    }

    /// The chunks of entry `i`, sorted by file offset.
    pub fn chunks_of(&self, i: usize) -> &[Chunk] {
        let e = &self.index.entries[i];
        &self.index.chunks[e.first_chunk as usize..(e.first_chunk + e.chunk_count) as usize]
    }

    /// Number of shards.
    pub fn shard_count(&self) -> u32 {
        self.header.shard_count
    }

    /// The source of shard `i`.
    pub fn shard(&self, i: u32) -> &dyn ShardSource {
        self.shards[i as usize].source.as_ref()
    }

    /// Sizes of every shard in bytes: shard 0's own, the others' as the index records
    /// them (each one is checked against it when first opened), or asked of each shard
    /// for archives whose index does not record them.
    ///
    /// # Errors
    /// The I/O error of a size query.
    pub fn shard_sizes(&self) -> Result<Vec<u64>> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| match self.index.shard_bytes.get(i) {
                Some(&recorded) if i > 0 => Ok(recorded),
                _ => s.source.len().map_err(|e| Error::io("shard size", e)),
            })
            .collect()
    }

    /// Tells each shard which stored ranges reading entry `index` front to back will need
    /// (see [`ShardSource::will_read`]).
    pub fn will_read_entry(&self, index: usize) {
        let mut ranges: std::collections::BTreeMap<(u32, u32), Vec<(u64, u64)>> =
            Default::default();
        for c in self.chunks_of(index) {
            ranges
                .entry((c.archive, c.shard))
                .or_default()
                .push((c.offset, c.stored_len as u64));
        }
        for ((archive, shard), ranges) in ranges {
            let holder = if archive == 0 {
                Some(self)
            } else {
                self.parents.get(archive as usize - 1)
            };
            if let Some(h) = holder.filter(|h| shard < h.shard_count()) {
                h.shards[shard as usize].source.will_read(&ranges);
            }
        }
    }

    /// Reads a chunk's stored bytes without decoding them (for a sealed archive, opened
    /// with its key: the codec's bytes, without the tag).
    ///
    /// # Errors
    /// I/O errors and truncation; [`Error::DigestMismatch`] for sealed bytes that do not
    /// authenticate.
    pub fn read_stored(&self, c: &Chunk) -> Result<Vec<u8>> {
        if c.archive != 0 {
            let (holder, own) = self.in_parent(c)?;
            return holder.read_stored(&own);
        }
        let mut buf = vec![0u8; c.stored_len as usize];
        read_at(self.shard(c.shard), c.offset, &mut buf, "chunk")?;
        self.unseal(c, buf)
    }

    /// Reads the stored bytes of chunk `c` of an unsealed archive into `buf` (exactly
    /// `stored_len` long): a buffer the caller reuses, where [`Self::read_stored`] would
    /// allocate one per chunk. Nothing is decoded or verified.
    ///
    /// # Errors
    /// [`Error::Usage`] for a sealed archive or a `buf` of the wrong length; I/O errors
    /// and truncation.
    pub fn read_stored_into(&self, c: &Chunk, buf: &mut [u8]) -> Result<()> {
        if c.archive != 0 {
            let (holder, own) = self.in_parent(c)?;
            return holder.read_stored_into(&own, buf);
        }
        if self.key.is_some() || buf.len() != c.stored_len as usize {
            return Err(Error::Usage(
                "read_stored_into: a sealed archive, or a buffer of the wrong length".into(),
            ));
        }
        read_at(self.shard(c.shard), c.offset, buf, "chunk")
    }

    /// Reads, decodes and verifies one chunk of `entry`.
    ///
    /// # Errors
    /// [`Error::DigestMismatch`] when the bytes are not what the index recorded;
    /// [`Error::Corrupt`] when they do not decode; I/O errors.
    pub fn read_chunk(&self, entry: &Entry, c: &Chunk) -> Result<Vec<u8>> {
        let stored = self.read_stored(c)?;
        decode_chunk(entry, c, stored)
    }

    /// Reads the stored bytes of several chunks with one [`ShardSource::read_ranges`] call
    /// per shard (shards in parallel), so object stores can merge adjacent chunks into one
    /// request. Bytes are not decoded or verified here (sealed ones are opened).
    ///
    /// # Errors
    /// I/O errors and truncation; sealed bytes that do not authenticate.
    pub fn read_stored_many(&self, chunks: &[Chunk]) -> Result<Vec<Vec<u8>>> {
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); self.shards.len()];
        let mut out = vec![Vec::new(); chunks.len()];
        // Chunks stored in parent archives: one batch per parent, as its own.
        let mut by_parent: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for (k, c) in chunks.iter().enumerate() {
            if c.archive == 0 {
                by_shard[c.shard as usize].push(k);
            } else {
                by_parent.entry(c.archive).or_default().push(k);
            }
        }
        for members in by_parent.values() {
            let (holder, _) = self.in_parent(&chunks[members[0]])?;
            let own: Vec<Chunk> = members
                .iter()
                .map(|&k| self.in_parent(&chunks[k]).map(|(_, own)| own))
                .collect::<Result<_>>()?;
            for (&k, bytes) in members.iter().zip(holder.read_stored_many(&own)?) {
                out[k] = bytes;
            }
        }
        let read_shard = |shard: usize, members: &[usize]| -> Result<Vec<Vec<u8>>> {
            let src = self.shards[shard].source.as_ref();
            let ranges: Vec<(u64, usize)> = members
                .iter()
                .map(|&k| (chunks[k].offset, chunks[k].stored_len as usize))
                .collect();
            src.read_ranges(&ranges).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    Error::Corrupt(format!(
                        "{}: chunk lies past the end of the shard (truncated?)",
                        src.describe()
                    ))
                } else {
                    Error::io(format!("reading chunks from {}", src.describe()), e)
                }
            })
        };
        let busy: Vec<usize> = (0..by_shard.len())
            .filter(|&s| !by_shard[s].is_empty())
            .collect();
        let results: Vec<Result<Vec<Vec<u8>>>> = if busy.len() <= 1 {
            busy.iter().map(|&s| read_shard(s, &by_shard[s])).collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = busy
                    .iter()
                    .map(|&s| {
                        let members = &by_shard[s];
                        scope.spawn(move || read_shard(s, members))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(Error::Usage("read thread panicked".into())))
                    })
                    .collect()
            })
        };
        for (&s, bufs) in busy.iter().zip(results) {
            for (&k, buf) in by_shard[s].iter().zip(bufs?) {
                out[k] = self.unseal(&chunks[k], buf)?;
            }
        }
        Ok(out)
    }

    /// Writes the whole content of entry `i` (holes as zeros) to `out`. Chunks are read
    /// in batches of up to [`COPY_BATCH_BYTES`] stored bytes (one
    /// [`read_stored_many`](Self::read_stored_many) call each), and every chunk is
    /// verified before any of its bytes are written.
    ///
    /// # Errors
    /// As [`read_chunk`](Self::read_chunk), plus write errors on `out`.
    pub fn copy_entry(&self, i: usize, out: &mut dyn io::Write) -> Result<()> {
        let e = &self.index.entries[i];
        let mut pos = 0u64;
        let zeros = vec![0u8; 1 << 16];
        let write_zeros = |out: &mut dyn io::Write, mut n: u64| -> Result<()> {
            while n > 0 {
                let k = n.min(zeros.len() as u64) as usize;
                out.write_all(&zeros[..k])
                    .map_err(|e| Error::io("writing output", e))?;
                n -= k as u64;
            }
            Ok(())
        };
        let chunks = self.chunks_of(i);
        let mut next = 0;
        while next < chunks.len() {
            let mut end = next + 1;
            let mut batch_bytes = chunks[next].stored_len as u64;
            while end < chunks.len()
                && batch_bytes + chunks[end].stored_len as u64 <= COPY_BATCH_BYTES
            {
                batch_bytes += chunks[end].stored_len as u64;
                end += 1;
            }
            let batch = &chunks[next..end];
            let stored = self.read_stored_many(batch)?;
            for (c, stored) in batch.iter().zip(stored) {
                let data = decode_chunk(e, c, stored)?;
                write_zeros(out, c.file_offset - pos)?;
                out.write_all(&data)
                    .map_err(|e| Error::io("writing output", e))?;
                pos = c.file_end();
            }
            next = end;
        }
        write_zeros(out, e.size - pos)
    }
}

/// Decodes a chunk's stored bytes and checks its digest.
///
/// # Errors
/// [`Error::Corrupt`] or [`Error::DigestMismatch`], naming the entry and offset.
pub fn decode_chunk(entry: &Entry, c: &Chunk, stored: Vec<u8>) -> Result<Vec<u8>> {
    let what = || format!("{:?} at offset {}", entry.path_lossy(), c.file_offset);
    let codec = c
        .codec_id()
        .ok_or_else(|| Error::Unsupported(format!("{}: codec {}", what(), c.codec)))?;
    if stored_as_raw(c) {
        // Stored bytes are the raw bytes: no copy.
        check_stored_raw(entry, c, &stored)?;
        return Ok(stored);
    }
    let frame = codec::decode(codec, &stored, c.decoded_len() as usize, &what())?;
    let raw = if c.in_shared_frame() {
        let start = c.frame_offset as usize;
        frame[start..start + c.raw_len as usize].to_vec()
    } else {
        frame
    };
    verify_digest(&raw, &c.digest, what)?;
    Ok(raw)
}

/// True when chunk `c`'s stored bytes are its raw bytes (uncompressed, a frame of its
/// own), so [`check_stored_raw`] can check them where they were read.
pub fn stored_as_raw(c: &Chunk) -> bool {
    c.codec_id() == Some(CodecId::None) && !c.in_shared_frame()
}

/// Checks the stored bytes of a chunk stored as raw ([`stored_as_raw`]): their length
/// and digest.
///
/// # Errors
/// [`Error::Corrupt`] or [`Error::DigestMismatch`], naming the entry and offset.
pub fn check_stored_raw(entry: &Entry, c: &Chunk, stored: &[u8]) -> Result<()> {
    let what = || format!("{:?} at offset {}", entry.path_lossy(), c.file_offset);
    if stored.len() != c.raw_len as usize {
        return Err(Error::Corrupt(format!(
            "{}: stored length differs from raw length",
            what()
        )));
    }
    verify_digest(stored, &c.digest, what)
}

/// Checks `data` against a BLAKE3 digest.
///
/// # Errors
/// [`Error::DigestMismatch`] naming `what()`.
pub fn verify_digest(data: &[u8], digest: &[u8], what: impl FnOnce() -> String) -> Result<()> {
    if !digest_matches(data, digest) {
        return Err(Error::DigestMismatch { what: what() });
    }
    Ok(())
}

/// Decompresses the index, allocating as the bytes come out (and at most one byte more
/// than `raw_len`, to see that there are more): a footer that puts a large `raw_len` in
/// front of a small index costs no more memory than the index.
fn decompress_index(stored: &[u8], raw_len: u64) -> io::Result<Vec<u8>> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(stored)?;
    crate::scanner::read_growing(&mut decoder, raw_len as usize + 1)
}

/// True when `digest` is the BLAKE3 digest of `data`. A fuzzing build (`cfg(fuzzing)`,
/// which only cargo-fuzz sets) accepts any digest, so that fuzzed content reaches the
/// decoders, the index validation and extraction behind the digest checks; every other
/// build compares (see the test `digests_are_enforced`).
fn digest_matches(data: &[u8], digest: &[u8]) -> bool {
    cfg!(fuzzing) || blake3::hash(data).as_bytes()[..] == digest[..]
}

fn check_footer_matches(f: &Footer, h: &ShardHeader, i: u32, name: &str) -> Result<()> {
    if f.archive_id != h.archive_id || f.shard_index != i || f.shard_count != h.shard_count {
        return Err(Error::Corrupt(format!(
            "{name}: footer does not match the shard header"
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
