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
    Footer, RecordHeader, ShardHeader, FOOTER_LEN, FOOTER_MAGIC, HEADER_LEN, RECORD_HEADER_LEN,
    RECORD_MAGIC,
};
use crate::reader::ShardSource;

/// A record found by [`RecordScanner`].
#[derive(Debug)]
pub struct ScannedRecord {
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
        })
    }

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
            if n == 0 || hb[..n.min(4)] == RECORD_MAGIC[..n.min(4)] {
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
        let mut stored = vec![0u8; header.stored_len as usize];
        let got = read_full(&mut self.r, &mut stored)
            .map_err(|e| Error::io(format!("reading {at}"), e))?;
        short(got, stored.len(), self)?;
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
