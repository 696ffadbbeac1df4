//! Sequential scanning of one shard, record by record, from any `Read`: a shard read front
//! to back by [`ArchiveReader::verify`](crate::ArchiveReader::verify) (through
//! [`SourceReader`]), or bytes a fuzzer made up.
//!
//! The scanner trusts nothing it has not checked: every record header's check value,
//! zero padding, and at the end the footer (its record count, that nothing follows it).
//! Until that footer has been read the shard counts as uncommitted, so running out of
//! input anywhere before it is [`Error::Incomplete`], never a clean end. Payload digests
//! are left to the caller, which may check them on other threads.

use std::io::{self, Read};

use crate::error::{Error, Result};
use crate::layout::{
    Footer, RecordHeader, RecordKind, ShardHeader, FOOTER_LEN, FOOTER_MAGIC, HEADER_LEN,
    MAX_INDEX_RAW, RECORD_HEADER_LEN, RECORD_MAGIC,
};
use crate::reader::ShardSource;

/// A record found by [`RecordScanner`].
#[derive(Debug)]
pub struct ScannedRecord {
    /// The record's header (checked).
    pub header: RecordHeader,
    /// Offset of the payload in the shard.
    pub payload_offset: u64,
    /// The payload as stored.
    pub stored: Vec<u8>,
}

/// Reads a shard front to back from any `Read` (a file or a pipe), checking every
/// record header and padding. Payload digests are left to the caller, which may
/// check them on other threads.
pub struct RecordScanner<R: Read> {
    r: R,
    pos: u64,
    header: ShardHeader,
    footer: Option<Footer>,
    records: u64,
    what: String,
    /// Largest Index record accepted (see [`RecordScanner::limit_index`]).
    index_limit: u64,
}

/// Reads until `buf` is full or the input ends; returns how much it got. A short count is
/// how the scanner tells a stream cut short from a damaged one.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// First allocation for a payload; it grows (doubling) only as bytes actually arrive.
const FIRST_READ: usize = 1 << 20;

/// Reads up to `len` bytes, until the input ends. The buffer grows as bytes arrive, never
/// past twice what came (nor past `len`): a header that claims more than the input holds
/// cannot make the reader allocate what it claims.
pub(crate) fn read_growing<R: Read>(r: &mut R, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    while buf.len() < len {
        let start = buf.len();
        let want = (len - start).min(start.max(FIRST_READ));
        buf.reserve_exact(want);
        buf.resize(start + want, 0);
        let n = read_full(r, &mut buf[start..])?;
        buf.truncate(start + n);
        if n < want {
            break;
        }
    }
    Ok(buf)
}

impl<R: Read> RecordScanner<R> {
    /// Reads and validates the shard header.
    ///
    /// # Errors
    /// [`Error::NotAnArchive`], [`Error::Incomplete`], [`Error::Unsupported`], I/O errors.
    pub fn new(mut r: R, what: impl Into<String>) -> Result<Self> {
        let what = what.into();
        let mut buf = vec![0u8; HEADER_LEN];
        let n = read_full(&mut r, &mut buf).map_err(|e| Error::io(format!("reading {what}"), e))?;
        let header = ShardHeader::decode(&buf, &what);
        let header = match header {
            Ok(h) if n == HEADER_LEN => h,
            Ok(_) => return Err(Error::Incomplete(format!("{what} ends inside its header"))),
            Err(e) => return Err(e),
        };
        Ok(RecordScanner {
            r,
            pos: HEADER_LEN as u64,
            header,
            footer: None,
            records: 0,
            what,
            index_limit: MAX_INDEX_RAW,
        })
    }

    /// Refuses Index records whose payload is longer than `stored_len`: a verifier that
    /// knows from the footer how long the index is (and that shards other than 0 hold
    /// none) never reads a larger one, whatever a record header claims.
    pub fn limit_index(&mut self, stored_len: u64) {
        self.index_limit = stored_len;
    }

    /// The shard's header (checked).
    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    /// The footer, once [`next_record`](Self::next_record) has returned `None`.
    pub fn footer(&self) -> Option<&Footer> {
        self.footer.as_ref()
    }

    /// The next record, or `None` after a valid footer that ends the shard.
    ///
    /// # Errors
    /// [`Error::Incomplete`] when the input ends before a footer; [`Error::Corrupt`]
    /// for damaged headers, non-zero padding, trailing bytes or a wrong record count.
    pub fn next_record(&mut self) -> Result<Option<ScannedRecord>> {
        if self.footer.is_some() {
            return Ok(None);
        }
        let at = format!("{} at offset {}", self.what, self.pos);
        let mut hb = [0u8; RECORD_HEADER_LEN];
        let n =
            read_full(&mut self.r, &mut hb).map_err(|e| Error::io(format!("reading {at}"), e))?;
        if n >= 8 && hb[0..8] == FOOTER_MAGIC {
            let mut fb = [0u8; FOOTER_LEN];
            fb[..n].copy_from_slice(&hb[..n]);
            let m = read_full(&mut self.r, &mut fb[n..])
                .map_err(|e| Error::io(format!("reading {at}"), e))?;
            if n + m < FOOTER_LEN {
                return Err(Error::Incomplete(format!(
                    "{} ends inside its footer",
                    self.what
                )));
            }
            let footer = Footer::decode(&fb, self.pos + FOOTER_LEN as u64, &self.what)?;
            if footer.archive_id != self.header.archive_id
                || footer.shard_index != self.header.shard_index
            {
                return Err(Error::Corrupt(format!(
                    "{}: footer belongs to another shard",
                    self.what
                )));
            }
            if footer.record_count != self.records {
                return Err(Error::Corrupt(format!(
                    "{}: footer counts {} records, found {}",
                    self.what, footer.record_count, self.records
                )));
            }
            let mut extra = [0u8; 1];
            if read_full(&mut self.r, &mut extra)
                .map_err(|e| Error::io(format!("reading {at}"), e))?
                != 0
            {
                return Err(Error::Corrupt(format!(
                    "{}: bytes after the footer",
                    self.what
                )));
            }
            self.footer = Some(footer);
            return Ok(None);
        }
        if n < RECORD_HEADER_LEN {
            // Cut inside a record header, or inside the footer's magic: incomplete.
            let cut_short = |magic: &[u8]| hb[..n.min(magic.len())] == magic[..n.min(magic.len())];
            if n == 0 || cut_short(&RECORD_MAGIC) || cut_short(&FOOTER_MAGIC) {
                return Err(Error::Incomplete(format!(
                    "{} ends after {} bytes without a commit footer",
                    self.what,
                    self.pos + n as u64
                )));
            }
            return Err(Error::Corrupt(format!("{at}: garbage instead of a record")));
        }
        if hb[0..4] != RECORD_MAGIC {
            return Err(Error::Corrupt(format!("{at}: garbage instead of a record")));
        }
        let header = RecordHeader::decode(&hb, &at)?;
        if header.kind == RecordKind::Index && u64::from(header.stored_len) > self.index_limit {
            return Err(Error::Corrupt(format!(
                "{at}: index record of {} bytes, the index is {}",
                header.stored_len, self.index_limit
            )));
        }
        let mut pad = vec![0u8; header.pad as usize];
        let short = |got: usize, want: usize, this: &Self| {
            if got < want {
                Err(Error::Incomplete(format!(
                    "{} ends inside a record at offset {} without a commit footer",
                    this.what, this.pos
                )))
            } else {
                Ok(())
            }
        };
        let got =
            read_full(&mut self.r, &mut pad).map_err(|e| Error::io(format!("reading {at}"), e))?;
        short(got, pad.len(), self)?;
        if pad.iter().any(|&b| b != 0) {
            return Err(Error::Corrupt(format!("{at}: non-zero padding")));
        }
        let stored = read_growing(&mut self.r, header.stored_len as usize)
            .map_err(|e| Error::io(format!("reading {at}"), e))?;
        short(stored.len(), header.stored_len as usize, self)?;
        let payload_offset = self.pos + RECORD_HEADER_LEN as u64 + header.pad as u64;
        self.pos = payload_offset + header.stored_len as u64;
        self.records += 1;
        Ok(Some(ScannedRecord {
            header,
            payload_offset,
            stored,
        }))
    }
}

/// Adapts a [`ShardSource`] to `Read` for sequential scans.
pub struct SourceReader<'a> {
    src: &'a dyn ShardSource,
    pos: u64,
    len: u64,
}

impl<'a> SourceReader<'a> {
    /// A reader from offset 0 to the source's length as it is now.
    ///
    /// # Errors
    /// The I/O error of the size query.
    pub fn new(src: &'a dyn ShardSource) -> io::Result<Self> {
        Ok(SourceReader {
            len: src.len()?,
            src,
            pos: 0,
        })
    }

    /// The source's length when the reader was made: where reading ends.
    pub fn source_len(&self) -> u64 {
        self.len
    }
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.src.read_exact_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::EntryKind;
    use crate::reader::tests::entry;
    use crate::testutil::{append_index, craft, index_location, read_index};

    /// A crafted archive: a directory, then two files with one chunk each.
    fn crafted() -> Vec<u8> {
        craft(vec![
            (entry("d", EntryKind::Dir, 0), None),
            (
                entry("d/a", EntryKind::File, 0),
                Some(b"first file".to_vec()),
            ),
            (entry("d/b", EntryKind::File, 0), Some(b"second".to_vec())),
        ])
    }

    fn scan_all(bytes: &[u8]) -> (Vec<ScannedRecord>, Result<Option<Footer>>) {
        let mut scanner = RecordScanner::new(bytes, "crafted").unwrap();
        let mut records = Vec::new();
        loop {
            match scanner.next_record() {
                Ok(Some(rec)) => records.push(rec),
                Ok(None) => return (records, Ok(scanner.footer().cloned())),
                Err(e) => return (records, Err(e)),
            }
        }
    }

    #[test]
    fn records_come_in_order_then_the_footer_ends_the_shard() {
        let bytes = crafted();
        let (records, end) = scan_all(&bytes);
        let footer = end.unwrap().expect("no footer after the last record");
        let kinds: Vec<RecordKind> = records.iter().map(|r| r.header.kind).collect();
        use RecordKind::*;
        assert_eq!(kinds, [Entry, Entry, Data, Entry, Data, Index]);
        let seqs: Vec<u64> = records.iter().map(|r| r.header.seq).collect();
        assert_eq!(seqs[..5], [0, 1, 2, 3, 4]);
        assert_eq!(footer.record_count, records.len() as u64);
        // Payload offsets are where the index found them.
        let index = read_index(&bytes);
        let data: Vec<u64> = records
            .iter()
            .filter(|r| r.header.kind == Data)
            .map(|r| r.payload_offset)
            .collect();
        let chunks: Vec<u64> = index.chunks.iter().map(|c| c.offset).collect();
        assert_eq!(data, chunks);
        assert_eq!(records[2].stored, b"first file");
        assert_eq!(records[5].payload_offset, index_location(&bytes).offset);
    }

    #[test]
    fn a_damaged_record_header_stops_the_scan() {
        let mut bytes = crafted();
        let second_data = read_index(&bytes).chunks[1].offset as usize;
        // The kind byte of the second file's Data record.
        bytes[second_data - RECORD_HEADER_LEN + 4] ^= 1;
        let (records, end) = scan_all(&bytes);
        assert_eq!(records.len(), 4, "records before the damage are returned");
        let err = end.unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt(m) if m.contains("record header checksum mismatch")),
            "{err}"
        );
    }

    #[test]
    fn input_that_ends_before_the_footer_is_incomplete() {
        let bytes = crafted();
        let n = bytes.len();
        let second_data = read_index(&bytes).chunks[1].offset as usize;
        // The footer starts at n - 128: cuts 3..7 bytes into its magic are incomplete
        // too, not "garbage".
        let footer = n - FOOTER_LEN;
        for cut in [
            HEADER_LEN,
            HEADER_LEN + 10,
            second_data - 1,
            n - 100,
            n - 1,
            footer + 3,
            footer + 7,
        ] {
            let (_, end) = scan_all(&bytes[..cut]);
            let err = end.unwrap_err();
            assert!(matches!(err, Error::Incomplete(_)), "cut at {cut}: {err}");
        }
        let err = RecordScanner::new(&bytes[..100], "crafted").err().unwrap();
        assert!(matches!(err, Error::Incomplete(_)), "{err}");
    }

    #[test]
    fn the_footer_must_count_the_records_and_end_the_input() {
        let bytes = crafted();
        let mut longer = bytes.clone();
        longer.push(0);
        let err = scan_all(&longer).1.unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt(m) if m.contains("bytes after the footer")),
            "{err}"
        );
        let loc = index_location(&bytes);
        let mut miscounted = bytes[..loc.offset as usize - RECORD_HEADER_LEN].to_vec();
        append_index(&mut miscounted, &read_index(&bytes), 99);
        let err = scan_all(&miscounted).1.unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt(m) if m.contains("footer counts 99 records, found 6")),
            "{err}"
        );
    }

    /// A `Read` that remembers the largest buffer it was asked to fill.
    struct Probe<'a> {
        bytes: &'a [u8],
        largest: usize,
    }

    impl Read for Probe<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            self.bytes.read(buf)
        }
    }

    #[test]
    fn a_record_claiming_more_than_the_input_holds_allocates_what_arrives() {
        let bytes = crafted();
        let first_data = read_index(&bytes).chunks[0].offset as usize;
        let at = first_data - RECORD_HEADER_LEN;
        let mut h = RecordHeader::decode(&bytes[at..first_data], "h").unwrap();
        h.raw_len = 60 << 20;
        h.stored_len = 60 << 20;
        let mut cut = bytes[..at].to_vec();
        cut.extend_from_slice(&h.encode());
        cut.extend_from_slice(&[7; 100]);
        let mut probe = Probe {
            bytes: &cut,
            largest: 0,
        };
        let mut scanner = RecordScanner::new(&mut probe, "cut").unwrap();
        let err = loop {
            match scanner.next_record() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("no footer here"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, Error::Incomplete(_)), "{err}");
        drop(scanner);
        assert!(
            probe.largest <= FIRST_READ,
            "asked for {} bytes",
            probe.largest
        );
    }

    #[test]
    fn an_index_record_longer_than_the_index_is_refused() {
        let bytes = crafted();
        let stored = index_location(&bytes).stored_len;
        let scan = |limit: u64| {
            let mut scanner = RecordScanner::new(&bytes[..], "crafted").unwrap();
            scanner.limit_index(limit);
            while scanner.next_record()?.is_some() {}
            Ok::<_, Error>(())
        };
        scan(stored).unwrap();
        let err = scan(stored - 1).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt(m) if m.contains("index record of")),
            "{err}"
        );
    }
}
