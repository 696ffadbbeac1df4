//! [`ArchiveReader::verify`]: every shard read front to back, every record checked.
//!
//! Opening an archive checks its commit and its index; reading a chunk checks that one
//! chunk. Only `verify` reads everything, so only it can say that the data records and the
//! index match one to one: each Data record is the payload of exactly the index chunks that
//! point at it (one chunk, or every small file of a shared frame), and no index chunk is
//! left without its record. Inline Entry and EntryEnd records must agree with the index
//! entry they name, and the Index record must be where the footer says.
//!
//! One thread scans the shards in order (header checks, padding and footers are the
//! [`RecordScanner`]'s) and matches each record against the index; decoding and hashing
//! payloads, the expensive part, runs on `threads` other threads. The first error wins,
//! the scan's before the checkers' (the scan's is the earliest in file order).

use std::collections::HashMap;
use std::io;
use std::thread::ScopedJoinHandle;

use crossbeam_channel::Sender;
use prost::Message;

use crate::budget::{chunk_cost, Budget, Lease, CHUNK_MEMORY};
use crate::codec::{self, CodecId};
use crate::error::{Error, Result};
use crate::index::{entry_flags, Chunk, Entry, EntryKind};
use crate::layout::{RecordHeader, RecordKind, RECORD_FLAG_SHARED_FRAME};
use crate::reader::{decode_chunk, verify_digest, ArchiveReader};
use crate::scanner::{RecordScanner, ScannedRecord, SourceReader};

/// Result of [`ArchiveReader::verify`].
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    /// Records scanned in every shard.
    pub records: u64,
    /// Chunks checked against the index.
    pub chunks: u64,
    /// Raw bytes of those chunks.
    pub raw_bytes: u64,
    /// Stored bytes read and digest-checked.
    pub stored_bytes: u64,
}

/// The index chunks one Data record must hold, each with its entry's position: one chunk,
/// or for a shared frame the chunks of all the small files in it.
type ChunkGroup<'a> = Vec<(usize, &'a Chunk)>;

/// Every index chunk not yet matched by a Data record, by (shard, payload offset).
type Expected<'a> = HashMap<(u32, u64), ChunkGroup<'a>>;

/// A Data record, matched against the index, whose payload is still to be decoded and
/// hashed (on a checking thread).
struct Payload<'a> {
    group: ChunkGroup<'a>,
    stored: Vec<u8>,
    /// The record header's digest: of the whole frame, for a shared frame.
    frame_digest: [u8; 32],
    /// Its share of [`CHUNK_MEMORY`], given back once it is checked.
    _lease: Lease<'a>,
}

impl ArchiveReader {
    /// Reads every shard front to back and checks every record: header checksums,
    /// padding, every payload's digest, that inline entry records agree with the index,
    /// and that the index's chunk table matches the data records exactly.
    /// `progress` counts the stored bytes as they are checked.
    ///
    /// # Errors
    /// The first problem found.
    pub fn verify(&self, threads: usize, progress: &crate::Progress) -> Result<VerifyReport> {
        // Payloads queued and being checked hold at most this much (with one larger
        // payload alone), however many threads check them and whatever records claim.
        let budget = Budget::new(CHUNK_MEMORY);
        let mut expected = self.expected_records()?;
        let mut report = VerifyReport::default();
        let threads = threads.max(1);
        let (tx, rx) = crossbeam_channel::bounded::<Payload<'_>>(threads * 2);
        std::thread::scope(|scope| {
            let checkers: Vec<_> = (0..threads)
                .map(|_| {
                    let rx = rx.clone();
                    let budget = &budget;
                    scope.spawn(move || -> Result<()> {
                        // However a checker stops, the scan must not wait for the leases
                        // that payloads still queued for it hold.
                        let _close = budget.close_on_drop();
                        for payload in rx {
                            let stored_len = payload.stored.len() as u64;
                            self.check_payload(payload)?;
                            progress.add(stored_len);
                        }
                        Ok(())
                    })
                })
                .collect();
            drop(rx);
            let scanned = self.scan_shards(&mut expected, &mut report, &budget, &tx);
            // Lets the checkers finish what is queued and stop.
            drop(tx);
            first_error(scanned, checkers)
        })?;
        if let Some(((s, o), _)) = expected.into_iter().next() {
            return Err(Error::Corrupt(format!(
                "index chunk at shard {s} offset {o} has no data record"
            )));
        }
        self.verify_referenced(&mut report, progress)?;
        Ok(report)
    }

    /// Reads and checks every chunk this archive references in a parent archive.
    fn verify_referenced(
        &self,
        report: &mut VerifyReport,
        progress: &crate::Progress,
    ) -> Result<()> {
        for (ei, e) in self.entries().iter().enumerate() {
            for c in self.chunks_of(ei).iter().filter(|c| c.archive != 0) {
                let stored = self.read_stored(c)?;
                let stored_len = stored.len() as u64;
                decode_chunk(e, c, stored)?;
                report.chunks += 1;
                report.raw_bytes += c.raw_len as u64;
                report.stored_bytes += stored_len;
                progress.add(stored_len);
            }
        }
        Ok(())
    }

    /// Every chunk of the index by where its payload lies. Two chunks may share a place
    /// only if all of them are parts of one shared frame.
    fn expected_records(&self) -> Result<Expected<'_>> {
        let mut expected: Expected<'_> = HashMap::with_capacity(self.index().chunks.len());
        for ei in 0..self.entries().len() {
            for c in self.chunks_of(ei).iter().filter(|c| c.archive == 0) {
                let group = expected.entry((c.shard, c.offset)).or_default();
                // The same bytes used twice in this archive are stored once.
                let again = |o: &Chunk| {
                    !c.in_shared_frame()
                        && !o.in_shared_frame()
                        && o.digest == c.digest
                        && o.raw_len == c.raw_len
                };
                if group.iter().any(|(_, o)| again(o)) {
                    continue;
                }
                let shared = c.in_shared_frame() && group.iter().all(|(_, o)| o.in_shared_frame());
                if !group.is_empty() && !shared {
                    return Err(Error::Corrupt(format!(
                        "two chunks share shard {} offset {}",
                        c.shard, c.offset
                    )));
                }
                group.push((ei, c));
            }
        }
        Ok(expected)
    }

    /// Scans every shard in order and checks each record against the index, sending Data
    /// payloads to the checkers, each with its lease of `budget`. Returns early, without
    /// error, when a checker has stopped (it failed and closed the budget; its error is
    /// collected by the caller).
    fn scan_shards<'a>(
        &'a self,
        expected: &mut Expected<'a>,
        report: &mut VerifyReport,
        budget: &'a Budget,
        checkers: &Sender<Payload<'a>>,
    ) -> Result<()> {
        let index_len = self.footer().index.expect("validated").stored_len;
        for si in 0..self.shard_count() {
            let src = self.shard(si);
            src.expect_sequential();
            let reader = SourceReader::new(src).map_err(|e| Error::io("shard size", e))?;
            let buffer = (1 << 20).min(reader.source_len()).max(1) as usize;
            let mut scanner =
                RecordScanner::new(io::BufReader::with_capacity(buffer, reader), src.describe())?;
            // The index lies in shard 0 only.
            scanner.limit_index(if si == 0 { index_len } else { 0 });
            while let Some(rec) = scanner.next_record()? {
                report.records += 1;
                let at = || format!("{} record at offset {}", src.describe(), rec.payload_offset);
                let h = &rec.header;
                match h.kind {
                    RecordKind::Data => {
                        let group = match_data_record(expected, si, &rec, self.is_sealed(), &at)?;
                        report.chunks += group.len() as u64;
                        report.raw_bytes += h.raw_len as u64;
                        report.stored_bytes += h.stored_len as u64;
                        // The record agrees with its chunks: their cost is what checking
                        // it takes (stored bytes, and the decoded ones if they are a copy).
                        let Some(lease) = budget.take(chunk_cost(group[0].1)) else {
                            return Ok(());
                        };
                        let payload = Payload {
                            group,
                            frame_digest: h.digest,
                            stored: rec.stored,
                            _lease: lease,
                        };
                        if checkers.send(payload).is_err() {
                            return Ok(());
                        }
                    }
                    RecordKind::Entry => self.check_entry_record(&rec, &at)?,
                    RecordKind::EntryEnd => self.check_entry_end(h, &at)?,
                    RecordKind::Index => self.check_index_record(si, &rec, &at)?,
                    // Read and checked when the archive was opened; here only their place.
                    RecordKind::Keys | RecordKind::Signature => {
                        if si != 0 || !self.after_index(&rec) {
                            return Err(Error::Corrupt(format!(
                                "{}: unexpected {:?} record",
                                at(),
                                h.kind
                            )));
                        }
                        verify_digest(&rec.stored, &h.digest, at)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Decodes a Data record's payload and checks every digest it carries.
    fn check_payload(&self, payload: Payload<'_>) -> Result<()> {
        let Payload {
            group,
            stored,
            frame_digest,
            _lease,
        } = payload;
        let sealed = self.is_sealed();
        let stored = if sealed {
            // The header's digest is of the sealed bytes; the tag then authenticates them
            // and the index's digests check what they open to.
            let first = group[0].1;
            let what = || {
                format!(
                    "sealed chunk at shard {} offset {}",
                    first.shard, first.offset
                )
            };
            verify_digest(&stored, &frame_digest, what)?;
            self.read_sealed(first, stored)?
        } else {
            stored
        };
        if group.len() == 1 && !group[0].1.in_shared_frame() {
            let (ei, c) = group[0];
            decode_chunk(&self.entries()[ei], c, stored)?;
            return Ok(());
        }
        let first = group[0].1;
        let what = || {
            format!(
                "shared frame at shard {} offset {}",
                first.shard, first.offset
            )
        };
        let codec = first.codec_id().ok_or_else(|| Error::Unsupported(what()))?;
        let frame = codec::decode(codec, &stored, first.frame_raw_len as usize, &what())?;
        if !sealed {
            verify_digest(&frame, &frame_digest, what)?;
        }
        for (ei, c) in &group {
            let part = &frame[c.frame_offset as usize..(c.frame_offset + c.raw_len) as usize];
            verify_digest(part, &c.digest, || self.entries()[*ei].path_lossy())?;
        }
        Ok(())
    }

    /// An inline Entry record: intact, and the same entry as the index's (but for the
    /// size of a streamed entry, known only at its EntryEnd).
    fn check_entry_record(&self, rec: &ScannedRecord, at: &dyn Fn() -> String) -> Result<()> {
        let h = &rec.header;
        let raw = match self.key() {
            Some(key) => {
                verify_digest(&rec.stored, &h.digest, at)?;
                let opened = key.open_payload(
                    h.seq,
                    h.kind,
                    h.codec as u8,
                    h.raw_len,
                    rec.stored.clone(),
                    at,
                )?;
                codec::decode(h.codec, &opened, h.raw_len as usize, &at())?
            }
            None => {
                let raw = codec::decode(h.codec, &rec.stored, h.raw_len as usize, &at())?;
                verify_digest(&raw, &h.digest, at)?;
                raw
            }
        };
        let inline = Entry::decode(raw.as_slice())
            .map_err(|e| Error::Corrupt(format!("{}: entry does not decode: {e}", at())))?;
        let Some(e) = self.entries().get(h.entry_id as usize) else {
            return Err(Error::Corrupt(format!(
                "{}: entry id {} not in the index",
                at(),
                h.entry_id
            )));
        };
        if !inline_entry_agrees(&inline, e) {
            return Err(Error::Corrupt(format!(
                "{}: entry record disagrees with the index",
                at()
            )));
        }
        Ok(())
    }

    /// An EntryEnd record: names a file entry whose indexed size is the one it carries.
    fn check_entry_end(&self, h: &RecordHeader, at: &dyn Fn() -> String) -> Result<()> {
        let ok = self
            .entries()
            .get(h.entry_id as usize)
            .is_some_and(|e| e.size == h.file_offset && e.entry_kind() == EntryKind::File);
        if !ok {
            return Err(Error::Corrupt(format!(
                "{}: entry end disagrees with the index",
                at()
            )));
        }
        Ok(())
    }

    /// An Index record: only in shard 0, exactly where its footer locates the index.
    fn check_index_record(
        &self,
        shard: u32,
        rec: &ScannedRecord,
        at: &dyn Fn() -> String,
    ) -> Result<()> {
        let loc = self.footer().index.expect("validated");
        if shard != 0 || rec.payload_offset != loc.offset || rec.header.codec != CodecId::Zstd {
            return Err(Error::Corrupt(format!("{}: unexpected index record", at())));
        }
        if self.is_sealed() {
            verify_digest(&rec.stored, &rec.header.digest, at)?;
        }
        Ok(())
    }

    /// A Keys or Signature record lies after the index.
    fn after_index(&self, rec: &ScannedRecord) -> bool {
        self.footer()
            .index
            .is_some_and(|loc| rec.payload_offset > loc.offset)
    }
}

/// Takes the index chunks a Data record holds out of `expected`; the record's header must
/// describe them exactly.
fn match_data_record<'a>(
    expected: &mut Expected<'a>,
    shard: u32,
    rec: &ScannedRecord,
    sealed: bool,
    at: &dyn Fn() -> String,
) -> Result<ChunkGroup<'a>> {
    let group = expected
        .remove(&(shard, rec.payload_offset))
        .ok_or_else(|| Error::Corrupt(format!("{}: data record not in the index", at())))?;
    if !data_record_agrees(&rec.header, &group, sealed) {
        return Err(Error::Corrupt(format!(
            "{}: record disagrees with the index",
            at()
        )));
    }
    Ok(group)
}

/// A shared frame's record agrees with each of its chunks on the frame (lengths, codec);
/// each file's digest is checked once the frame is decoded. Any other record is exactly
/// one chunk, field for field. A sealed record's digest is of its sealed bytes, so it is
/// not compared; its sequence number (the nonce) is.
fn data_record_agrees(h: &RecordHeader, group: &[(usize, &Chunk)], sealed: bool) -> bool {
    if sealed && group.iter().any(|(_, c)| c.seq != h.seq) {
        return false;
    }
    if h.flags & RECORD_FLAG_SHARED_FRAME != 0 {
        group.iter().all(|(_, c)| {
            c.in_shared_frame()
                && c.frame_raw_len == h.raw_len
                && c.stored_len == h.stored_len
                && c.codec == h.codec as u32
        })
    } else {
        let (ei, c) = group[0];
        group.len() == 1
            && !c.in_shared_frame()
            && c.raw_len == h.raw_len
            && c.stored_len == h.stored_len
            && c.codec == h.codec as u32
            && (sealed || c.digest[..] == h.digest)
            && c.file_offset == h.file_offset
            && ei as u64 == h.entry_id
    }
}

/// Every field an inline entry record carries equals the index entry's. The chunk
/// references are the index's alone; a streamed entry's size is 0 inline.
fn inline_entry_agrees(inline: &Entry, e: &Entry) -> bool {
    let streamed = inline.flags & entry_flags::STREAMED != 0;
    inline.path == e.path
        && inline.kind == e.kind
        && inline.mode == e.mode
        && inline.uid == e.uid
        && inline.gid == e.gid
        && inline.mtime_ns == e.mtime_ns
        && inline.link_target == e.link_target
        && inline.xattrs == e.xattrs
        && inline.rdev_major == e.rdev_major
        && inline.rdev_minor == e.rdev_minor
        && (streamed || inline.size == e.size)
}

/// The scan's error if it had one, else the first checking thread's (in spawn order).
fn first_error(scanned: Result<()>, checkers: Vec<ScopedJoinHandle<'_, Result<()>>>) -> Result<()> {
    let mut first = scanned.err();
    for checker in checkers {
        match checker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first.get_or_insert(e);
            }
            Err(_) => {
                first.get_or_insert(Error::Usage("verify thread panicked".into()));
            }
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::codec::Compression;
    use crate::layout::{Footer, FOOTER_LEN};
    use crate::reader::tests::{entry, options, write_sample};
    use crate::testutil::{craft, open_in_memory, read_index, rewrite_index};

    fn verify_err(bytes: Vec<u8>) -> Error {
        open_in_memory(&[bytes])
            .unwrap()
            .verify(2, &Default::default())
            .unwrap_err()
    }

    fn corrupt_with(err: &Error, needle: &str) -> bool {
        matches!(err, Error::Corrupt(m) if m.contains(needle))
    }

    #[test]
    fn a_sound_archive_verifies_with_every_record_counted() {
        for compression in [Compression::NONE, Compression::zstd(1)] {
            let bytes = write_sample(options(compression), 3, [20; 16]);
            let r = open_in_memory(&bytes).unwrap();
            let checked = crate::Progress::new();
            let report = r.verify(2, &checked).unwrap();
            let records: u64 = bytes
                .iter()
                .map(|b| {
                    let at = b.len() - FOOTER_LEN;
                    Footer::decode(&b[at..], b.len() as u64, "s")
                        .unwrap()
                        .record_count
                })
                .sum();
            assert_eq!(report.records, records);
            assert_eq!(report.chunks, r.index().chunks.len() as u64);
            assert_eq!(checked.done(), report.stored_bytes);
            let stored: u64 = r.index().chunks.iter().map(|c| c.stored_share()).sum();
            // Shares of a shared frame are rounded down.
            assert!(report.stored_bytes >= stored && report.stored_bytes < stored + 8);
        }
    }

    /// A crafted archive of two files with one chunk each.
    fn two_files() -> Vec<u8> {
        craft(vec![
            (entry("a", EntryKind::File, 0), Some(b"first file".to_vec())),
            (entry("b", EntryKind::File, 0), Some(b"second".to_vec())),
        ])
    }

    #[test]
    fn a_data_record_the_index_does_not_list_is_refused() {
        let mut bytes = two_files();
        let mut index = read_index(&bytes);
        index.chunks.pop();
        index.entries[1].chunk_count = 0;
        rewrite_index(&mut bytes, &index);
        let err = verify_err(bytes);
        assert!(corrupt_with(&err, "data record not in the index"), "{err}");
    }

    #[test]
    fn an_index_chunk_without_its_record_is_refused() {
        // "b" has no data of its own, but the index gives it a chunk inside "a"'s payload.
        let mut bytes = craft(vec![
            (entry("a", EntryKind::File, 0), Some(b"first file".to_vec())),
            (entry("b", EntryKind::File, 4), None),
        ]);
        let mut index = read_index(&bytes);
        let mut c = index.chunks[0].clone();
        c.offset += 1;
        c.raw_len = 4;
        c.stored_len = 4;
        c.digest = blake3::hash(b"irst").as_bytes().to_vec();
        index.entries[1].first_chunk = 1;
        index.entries[1].chunk_count = 1;
        index.chunks.push(c.clone());
        rewrite_index(&mut bytes, &index);
        // Every read of "b" passes: only a full scan sees that no record holds it.
        let r = open_in_memory(std::slice::from_ref(&bytes)).unwrap();
        assert_eq!(r.read_chunk(&r.entries()[1], &c).unwrap(), b"irst");
        let err = verify_err(bytes);
        let expected = format!(
            "index chunk at shard 0 offset {} has no data record",
            c.offset
        );
        assert!(corrupt_with(&err, &expected), "{err}");
    }

    #[test]
    fn a_record_and_its_chunk_must_agree() {
        let mut bytes = two_files();
        let mut index = read_index(&bytes);
        // The chunk's digest is not the one its record carries.
        index.chunks[1].digest = blake3::hash(b"other").as_bytes().to_vec();
        let at = index.chunks[1].offset;
        rewrite_index(&mut bytes, &index);
        let err = verify_err(bytes);
        let expected = format!("offset {at}: record disagrees with the index");
        assert!(corrupt_with(&err, &expected), "{err}");
    }

    #[test]
    fn an_inline_entry_record_must_agree_with_the_index() {
        let mut bytes = two_files();
        let mut index = read_index(&bytes);
        index.entries[0].mode = 0o600;
        rewrite_index(&mut bytes, &index);
        let err = verify_err(bytes);
        assert!(
            corrupt_with(&err, "entry record disagrees with the index"),
            "{err}"
        );
    }
}
