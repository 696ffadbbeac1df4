//! Writing tar archives whose file data starts on 4 KiB boundaries, so that on
//! btrfs/XFS the data of every file of 4 KiB or more is shared with its source by
//! reflink instead of being copied.
//!
//! The alignment uses only standard POSIX pax: before a file that would start
//! unaligned, a pax extended header carries a `comment` record sized so that the
//! file's data begins on the boundary. Every tar reader (GNU tar, Go's archive/tar
//! as used by podman, libarchive) ignores `comment`, so the archive stays a plain
//! tar. Files smaller than the alignment are left unpadded (as libarchive's `align`
//! option does), and holes in sparse sources stay holes in the archive file.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ckstream_format::EntryKind;
use ckstream_store::{clone_or_copy_range, CopyMethod};

/// Tar's block size: headers and padded data are multiples of it.
pub const BLOCK: u64 = 512;
/// Alignment of file data in uncompressed archives.
pub const DATA_ALIGN: u64 = 4096;

/// One tar member's metadata.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    /// Relative path without a leading `/` (directories without a trailing one).
    pub path: &'a [u8],
    /// What the member is.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Data bytes that follow the header (regular files only).
    pub size: u64,
    /// Symlink target, or the member path a hard link points to.
    pub link_target: &'a [u8],
    /// Device numbers (devices only).
    pub rdev: (u32, u32),
    /// Extended attributes, stored as `SCHILY.xattr.NAME` pax records.
    pub xattrs: Vec<(&'a [u8], &'a [u8])>,
}

/// How many bytes reached the archive, and how.
#[derive(Debug, Default, Clone, Copy)]
pub struct TarStats {
    /// Members written.
    pub members: u64,
    /// File data shared by reflink.
    pub cloned_bytes: u64,
    /// File data copied by copy_file_range (no userspace copy).
    pub kernel_copied_bytes: u64,
    /// Bytes written from memory (headers, small files, compressed output).
    pub written_bytes: u64,
    /// Holes left in the archive file.
    pub hole_bytes: u64,
}

enum Out {
    /// A regular file written positionally; file data may be cloned into it.
    File {
        file: File,
        buf: Vec<u8>,
        block: u64,
    },
    /// Any byte stream (a compressor, a pipe): everything is written.
    Stream(Box<dyn Write + Send>),
    /// Nothing is written: only positions are computed (for sizing a nested tar).
    Count,
}

const BUFFER: usize = 1 << 20;

/// A tar writer that aligns file data and moves it with reflinks where it can.
pub struct TarWriter {
    out: Out,
    pos: u64,
    /// Position the alignment is relative to (the start of a nested tar).
    origin: u64,
    align: u64,
    member_left: u64,
    stats: TarStats,
}

impl TarWriter {
    /// Writes to `file` (empty, positioned anywhere) with 4 KiB data alignment when
    /// `align` is set.
    pub fn to_file(file: File, align: bool) -> Self {
        let block = rustix::fs::fstatfs(&file)
            .map(|s| s.f_bsize as u64)
            .unwrap_or(DATA_ALIGN)
            .max(BLOCK);
        Self::new(
            Out::File {
                file,
                buf: Vec::with_capacity(BUFFER),
                block,
            },
            align,
        )
    }

    /// True when file data is aligned (see the module documentation).
    pub fn is_aligned(&self) -> bool {
        self.align > 1
    }

    /// Writes to a byte stream (no alignment: it would only cost space).
    pub fn to_stream(w: Box<dyn Write + Send>) -> Self {
        Self::new(Out::Stream(w), false)
    }

    /// Computes positions only: used to learn a nested tar's size before writing it.
    pub fn counting(align: bool) -> Self {
        Self::new(Out::Count, align)
    }

    fn new(out: Out, align: bool) -> Self {
        TarWriter {
            out,
            pos: 0,
            origin: 0,
            align: if align { DATA_ALIGN } else { 1 },
            member_left: 0,
            stats: TarStats::default(),
        }
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// What was written so far.
    pub fn stats(&self) -> TarStats {
        self.stats
    }

    /// Writes member `m` whose data is a tar written by `body` through this same writer
    /// (podman's nested `rootfs-diff.tar`); `m.size` must be that tar's exact size.
    ///
    /// # Errors
    /// What `body` returns; [`ckstream_format::Error::Io`] when the nested tar's size
    /// differs from `m.size` or the output fails.
    pub fn nested_member(
        &mut self,
        m: &Member,
        body: impl FnOnce(&mut TarWriter) -> ckstream_format::Result<()>,
    ) -> ckstream_format::Result<()> {
        let io_err = |e| ckstream_format::Error::io("writing the nested tar", e);
        self.header(m).map_err(io_err)?;
        let start = self.pos;
        self.member_left = 0;
        let outer_origin = std::mem::replace(&mut self.origin, start);
        let result = body(self);
        self.origin = outer_origin;
        result?;
        if self.pos - start != m.size {
            return Err(io_err(io::Error::other(format!(
                "nested tar is {} bytes, announced {}",
                self.pos - start,
                m.size
            ))));
        }
        self.pad().map_err(io_err)
    }

    /// Writes the header(s) of `m`. Regular files must then get exactly `m.size`
    /// bytes of data before [`end_member`](Self::end_member).
    ///
    /// # Errors
    /// Sockets (tar cannot store them) and output I/O errors.
    pub fn header(&mut self, m: &Member) -> io::Result<()> {
        if self.member_left != 0 {
            return Err(io::Error::other(
                "tar member started before the last one ended",
            ));
        }
        let (ustar, mut records) = ustar_header(m)?;
        let data_len = if m.kind == EntryKind::File { m.size } else { 0 };
        if self.align > 1 && m.kind == EntryKind::File && m.size >= self.align {
            let rel = self.pos - self.origin;
            if !(records.is_empty() && (rel + BLOCK) % self.align == 0) {
                // Data goes after the pax header block, the pax data and the ustar block.
                let after_headers = rel + 2 * BLOCK;
                let need = (self.align - after_headers % self.align) % self.align;
                let mut padded = need;
                while padded < records.len() as u64 + MIN_COMMENT {
                    padded += self.align;
                }
                let comment = padded as usize - records.len();
                records.extend_from_slice(&comment_record(comment));
                debug_assert_eq!(records.len() as u64 % BLOCK, 0);
            }
        }
        if !records.is_empty() {
            let mut x = tar::Header::new_ustar();
            let base = m.path.rsplit(|&b| b == b'/').next().unwrap_or(m.path);
            let mut name = b"PaxHeaders.0/".to_vec();
            name.extend_from_slice(&base[..base.len().min(80)]);
            set_path(&mut x, &name)?;
            x.set_size(records.len() as u64);
            x.set_mode(0o644);
            x.set_mtime(m.mtime_ns.max(0) as u64 / 1_000_000_000);
            x.set_entry_type(tar::EntryType::XHeader);
            x.set_cksum();
            self.write(x.as_bytes())?;
            self.write(&records)?;
            self.pad()?;
        }
        self.write(ustar.as_bytes())?;
        self.member_left = data_len;
        self.stats.members += 1;
        Ok(())
    }

    /// Appends member data from memory.
    ///
    /// # Errors
    /// More data than the header announced; output I/O errors.
    pub fn data_bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.take(b.len() as u64)?;
        self.write(b)?;
        self.stats.written_bytes += b.len() as u64;
        Ok(())
    }

    /// Appends `len` zero bytes (a hole): left as a hole in a file output.
    ///
    /// # Errors
    /// More data than the header announced; output I/O errors.
    pub fn data_zeros(&mut self, len: u64) -> io::Result<()> {
        self.take(len)?;
        match &mut self.out {
            Out::File { file, buf, .. } => {
                flush_buf(file, buf, self.pos)?;
                self.pos += len;
                self.stats.hole_bytes += len;
            }
            Out::Stream(_) => {
                let zeros = vec![0u8; (len as usize).min(BUFFER)];
                let mut left = len;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    self.write(&zeros[..n])?;
                    left -= n as u64;
                }
                self.stats.written_bytes += len;
            }
            Out::Count => self.pos += len,
        }
        Ok(())
    }

    /// Appends `len` bytes of `src` from `offset`: shared by reflink when both sides
    /// are block-aligned and the filesystem allows it, else copied in the kernel, else
    /// read and written.
    ///
    /// # Errors
    /// More data than the header announced; read errors of `src` (a source shorter
    /// than `offset + len` is `UnexpectedEof`); output I/O errors.
    pub fn data_from_file(&mut self, src: &File, offset: u64, len: u64) -> io::Result<()> {
        self.take(len)?;
        let mut done = 0u64;
        if let Out::File { file, buf, block } = &mut self.out {
            flush_buf(file, buf, self.pos)?;
            let whole = if *block > 0 && offset % *block == 0 && self.pos % *block == 0 {
                len - len % *block
            } else {
                0
            };
            let kernel_len = if whole > 0 { whole } else { len };
            match clone_or_copy_range(src, offset, file, self.pos, kernel_len, (*block).max(1))? {
                CopyMethod::Cloned => {
                    self.stats.cloned_bytes += kernel_len;
                    done = kernel_len;
                }
                CopyMethod::KernelCopy => {
                    self.stats.kernel_copied_bytes += kernel_len;
                    done = kernel_len;
                }
                CopyMethod::NotDone => {}
            }
            self.pos += done;
        } else if let Out::Count = self.out {
            self.pos += len;
            return Ok(());
        }
        let mut chunk = vec![0u8; (len - done).min(BUFFER as u64) as usize];
        while done < len {
            let n = ((len - done) as usize).min(chunk.len());
            src.read_exact_at(&mut chunk[..n], offset + done)?;
            self.write(&chunk[..n])?;
            self.stats.written_bytes += n as u64;
            done += n as u64;
        }
        Ok(())
    }

    /// Ends the current member: pads its data to the block size.
    ///
    /// # Errors
    /// Fewer data bytes than the header announced; output I/O errors.
    pub fn end_member(&mut self) -> io::Result<()> {
        if self.member_left != 0 {
            return Err(io::Error::other(format!(
                "tar member is {} bytes short of its announced size",
                self.member_left
            )));
        }
        self.pad()
    }

    /// Writes the end-of-archive marker (two zero blocks).
    ///
    /// # Errors
    /// Output I/O errors.
    pub fn finish_archive(&mut self) -> io::Result<()> {
        self.write(&[0u8; 2 * BLOCK as usize])
    }

    /// Flushes everything and returns the output file (None for streams and counting).
    ///
    /// # Errors
    /// Output I/O errors.
    pub fn into_file(self) -> io::Result<Option<File>> {
        match self.out {
            Out::File { file, mut buf, .. } => {
                flush_buf(&file, &mut buf, self.pos)?;
                // Trailing holes do not extend a file by themselves.
                if file.metadata()?.len() < self.pos {
                    file.set_len(self.pos)?;
                }
                Ok(Some(file))
            }
            Out::Stream(mut w) => {
                w.flush()?;
                drop(w);
                Ok(None)
            }
            Out::Count => Ok(None),
        }
    }

    fn take(&mut self, n: u64) -> io::Result<()> {
        if n > self.member_left {
            return Err(io::Error::other("more data than the tar header announced"));
        }
        self.member_left -= n;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = self.pos % BLOCK;
        if rem != 0 {
            self.write(&[0u8; BLOCK as usize][..(BLOCK - rem) as usize])?;
        }
        Ok(())
    }

    fn write(&mut self, b: &[u8]) -> io::Result<()> {
        match &mut self.out {
            Out::File { file, buf, .. } => {
                if buf.len() + b.len() > BUFFER {
                    flush_buf(file, buf, self.pos)?;
                }
                if b.len() >= BUFFER {
                    file.write_all_at(b, self.pos)?;
                } else {
                    buf.extend_from_slice(b);
                }
            }
            Out::Stream(w) => w.write_all(b)?,
            Out::Count => {}
        }
        self.pos += b.len() as u64;
        Ok(())
    }
}

/// Writes the buffered bytes, which end at `end`.
fn flush_buf(file: &File, buf: &mut Vec<u8>, end: u64) -> io::Result<()> {
    if !buf.is_empty() {
        file.write_all_at(buf, end - buf.len() as u64)?;
        buf.clear();
    }
    Ok(())
}

/// Smallest `comment` record we emit (`NN comment=` plus a few bytes).
const MIN_COMMENT: u64 = 16;

/// A pax `comment` record of exactly `len` bytes (len ≥ [`MIN_COMMENT`]).
fn comment_record(len: usize) -> Vec<u8> {
    let digits = len.to_string().len();
    let value = len - digits - " comment=\n".len();
    let mut r = format!("{len} comment=").into_bytes();
    r.resize(r.len() + value, b'0');
    r.push(b'\n');
    debug_assert_eq!(r.len(), len);
    r
}

/// A pax record `"LEN key=value\n"`, where LEN counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

const USTAR_ID_MAX: u32 = 0o7777777;
const USTAR_SIZE_MAX: u64 = 0o77777777777;

fn set_path(h: &mut tar::Header, p: &[u8]) -> io::Result<()> {
    h.set_path(Path::new(OsStr::from_bytes(p)))
}

/// The ustar header of `m`, and the pax records it needs for what ustar cannot hold.
fn ustar_header(m: &Member) -> io::Result<(tar::Header, Vec<u8>)> {
    let mut h = tar::Header::new_ustar();
    let mut pax = Vec::new();
    let ty = match m.kind {
        EntryKind::File => tar::EntryType::Regular,
        EntryKind::Dir => tar::EntryType::Directory,
        EntryKind::Symlink => tar::EntryType::Symlink,
        EntryKind::Hardlink => tar::EntryType::Link,
        EntryKind::CharDevice => tar::EntryType::Char,
        EntryKind::BlockDevice => tar::EntryType::Block,
        EntryKind::Fifo => tar::EntryType::Fifo,
        EntryKind::Socket | EntryKind::Unspecified => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: tar cannot store a socket",
                    String::from_utf8_lossy(m.path)
                ),
            ))
        }
    };
    h.set_entry_type(ty);
    let mut path = m.path.to_vec();
    if m.kind == EntryKind::Dir {
        path.push(b'/');
    }
    if set_path(&mut h, &path).is_err() || std::str::from_utf8(&path).is_err() {
        pax_record(&mut pax, b"path", &path);
        let tail = &path[path.len().saturating_sub(99)..];
        let safe: Vec<u8> = tail
            .iter()
            .map(|&b| if b.is_ascii() && b != 0 { b } else { b'_' })
            .collect();
        let safe = safe.strip_prefix(b"/").unwrap_or(&safe).to_vec();
        set_path(&mut h, &safe)?;
    }
    if !m.link_target.is_empty() {
        if m.link_target.len() > 100 || std::str::from_utf8(m.link_target).is_err() {
            pax_record(&mut pax, b"linkpath", m.link_target);
        } else {
            h.set_link_name(Path::new(OsStr::from_bytes(m.link_target)))?;
        }
    }
    h.set_mode(m.mode & 0o7777);
    if m.uid > USTAR_ID_MAX {
        pax_record(&mut pax, b"uid", m.uid.to_string().as_bytes());
        h.set_uid(0);
    } else {
        h.set_uid(m.uid.into());
    }
    if m.gid > USTAR_ID_MAX {
        pax_record(&mut pax, b"gid", m.gid.to_string().as_bytes());
        h.set_gid(0);
    } else {
        h.set_gid(m.gid.into());
    }
    let size = if m.kind == EntryKind::File { m.size } else { 0 };
    if size > USTAR_SIZE_MAX {
        pax_record(&mut pax, b"size", size.to_string().as_bytes());
    }
    h.set_size(size.min(USTAR_SIZE_MAX));
    let secs = m.mtime_ns.div_euclid(1_000_000_000);
    let nanos = m.mtime_ns.rem_euclid(1_000_000_000);
    h.set_mtime(secs.max(0) as u64);
    if matches!(m.kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
        h.set_device_major(m.rdev.0)?;
        h.set_device_minor(m.rdev.1)?;
    }
    for (name, value) in &m.xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name);
        pax_record(&mut pax, &key, value);
    }
    if !pax.is_empty() && nanos != 0 {
        // Keep the exact time whenever a pax header is written anyway.
        pax_record(&mut pax, b"mtime", format!("{secs}.{nanos:09}").as_bytes());
    }
    h.set_cksum();
    Ok((h, pax))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        for vlen in [0usize, 1, 5, 86, 87, 88, 95, 96, 990, 995, 9990] {
            let mut out = Vec::new();
            pax_record(&mut out, b"path", &vec![b'a'; vlen]);
            let sp = out.iter().position(|&b| b == b' ').unwrap();
            let n: usize = std::str::from_utf8(&out[..sp]).unwrap().parse().unwrap();
            assert_eq!(n, out.len(), "value length {vlen}");
        }
    }

    #[test]
    fn comment_record_has_exact_length() {
        for len in [16usize, 99, 100, 101, 512, 999, 1000, 4096, 8191] {
            assert_eq!(comment_record(len).len(), len);
        }
    }

    fn file_member(path: &[u8], size: u64) -> Member<'_> {
        Member {
            path,
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 1_700_000_000_123_456_789,
            size,
            link_target: b"",
            rdev: (0, 0),
            xattrs: vec![],
        }
    }

    /// Unit test on an in-memory stream reader (the `tar` crate): alignment holds and
    /// every byte reads back.
    #[test]
    fn large_files_start_aligned_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tar");
        let mut w = TarWriter::to_file(File::create(&path).unwrap(), true);
        let sizes = [5u64, 4096, 10_000, 1, 70_000, 0, 4095, 123_457];
        let long_name = vec![b'n'; 150];
        for (i, &size) in sizes.iter().enumerate() {
            let name = if i == 3 {
                long_name.clone()
            } else {
                format!("dir/f{i}").into_bytes()
            };
            let data: Vec<u8> = (0..size)
                .map(|b| (b as u8).wrapping_mul(i as u8 + 1))
                .collect();
            w.header(&file_member(&name, size)).unwrap();
            w.data_bytes(&data).unwrap();
            w.end_member().unwrap();
        }
        w.finish_archive().unwrap();
        w.into_file().unwrap();
        let mut ar = tar::Archive::new(File::open(&path).unwrap());
        for (i, e) in ar.entries().unwrap().enumerate() {
            let mut e = e.unwrap();
            let size = sizes[i];
            assert_eq!(e.header().size().unwrap(), size);
            if size >= DATA_ALIGN {
                assert_eq!(e.raw_file_position() % DATA_ALIGN, 0, "member {i}");
            }
            if i == 3 {
                assert_eq!(&*e.path_bytes(), &long_name[..]);
            }
            let mut got = Vec::new();
            io::Read::read_to_end(&mut e, &mut got).unwrap();
            let want: Vec<u8> = (0..size)
                .map(|b| (b as u8).wrapping_mul(i as u8 + 1))
                .collect();
            assert_eq!(got, want, "member {i}");
        }
    }

    #[test]
    fn counting_matches_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = TarWriter::counting(true);
        let mut w = TarWriter::to_file(File::create(dir.path().join("t.tar")).unwrap(), true);
        for t in [&mut c, &mut w] {
            for size in [9000u64, 3, 40_000] {
                t.header(&file_member(b"x", size)).unwrap();
                t.data_zeros(size).unwrap();
                t.end_member().unwrap();
            }
            t.finish_archive().unwrap();
        }
        assert_eq!(c.position(), w.position());
    }

    #[test]
    fn short_member_is_an_error() {
        let mut c = TarWriter::counting(false);
        c.header(&file_member(b"x", 10)).unwrap();
        c.data_zeros(5).unwrap();
        assert!(c.end_member().is_err());
        assert!(c.data_zeros(6).is_err());
    }
}
