//! Local files and standard output as shard sinks and sources.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ckstream_format::{ArchiveReader, Error, Result, ShardSink, ShardSource};

use crate::clone::{clone_or_copy_range, CopyMethod};

/// Path of shard `i` of the archive at `base`: shard 0 is `base` itself, shard i is `base.i`.
pub fn shard_path(base: &Path, i: u32) -> PathBuf {
    if i == 0 {
        base.to_path_buf()
    } else {
        let mut s = base.as_os_str().to_owned();
        s.push(format!(".{i}"));
        PathBuf::from(s)
    }
}

/// A shard being written to a regular file. Small writes (record headers, small
/// payloads) are gathered into one buffer and written with one `pwrite`.
pub struct FileSink {
    file: File,
    /// Offset where the next byte goes (buffered bytes included).
    pos: u64,
    buf: Vec<u8>,
    name: String,
    /// Block size for reflinks; 0 disables cloning.
    block: u64,
}

const SINK_BUFFER: usize = 1 << 20;

impl FileSink {
    /// Wraps an open, empty file.
    pub fn new(file: File, name: impl Into<String>) -> Self {
        let block = rustix::fs::fstatfs(&file)
            .map(|s| s.f_bsize as u64)
            .unwrap_or(4096)
            .max(512);
        FileSink {
            file,
            pos: 0,
            buf: Vec::with_capacity(SINK_BUFFER),
            name: name.into(),
            block,
        }
    }

    fn flush_buffer(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let start = self.pos - self.buf.len() as u64;
            self.file.write_all_at(&self.buf, start)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl ShardSink for FileSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.buf.len() + buf.len() > SINK_BUFFER {
            self.flush_buffer()?;
        }
        if buf.len() >= SINK_BUFFER {
            self.file.write_all_at(buf, self.pos)?;
        } else {
            self.buf.extend_from_slice(buf);
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn clone_from(&mut self, src: &File, src_offset: u64, len: u64) -> io::Result<bool> {
        if self.block == 0 || src_offset % self.block != 0 || self.pos % self.block != 0 {
            return Ok(false);
        }
        self.flush_buffer()?;
        // Clone whole blocks; the tail (if any) is written by the caller's bytes
        // only when nothing could be cloned, so copy it here to keep one code path.
        let whole = len - len % self.block;
        if whole == 0 {
            return Ok(false);
        }
        match clone_or_copy_range(src, src_offset, &self.file, self.pos, whole, self.block)? {
            CopyMethod::Cloned => {}
            CopyMethod::KernelCopy => {
                // The bytes are in place, but not shared: later chunks are written from
                // memory (the caller has them anyway) instead of trying again.
                self.block = 0;
            }
            CopyMethod::NotDone => {
                self.block = 0;
                return Ok(false);
            }
        }
        if whole < len {
            let mut tail = vec![0u8; (len - whole) as usize];
            src.read_exact_at(&mut tail, src_offset + whole)?;
            self.file.write_all_at(&tail, self.pos + whole)?;
        }
        self.pos += len;
        Ok(true)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.flush_buffer()?;
        self.file.sync_data()
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// A shard written to standard output (a pipe or a redirected file).
pub struct StdoutSink {
    out: io::Stdout,
}

impl ShardSink for StdoutSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.out.flush()
    }
    fn describe(&self) -> String {
        "stdout".into()
    }
}

/// A shard written to an inherited file descriptor (a pipe to `lz4`, `aws s3 cp`, ...).
pub struct FdSink {
    out: io::BufWriter<File>,
    name: String,
}

impl FdSink {
    pub fn new(file: File, name: impl Into<String>) -> Self {
        FdSink {
            out: io::BufWriter::with_capacity(1 << 20, file),
            name: name.into(),
        }
    }
}

impl ShardSink for FdSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.out.flush()
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// A shard read from a local file with positional reads.
pub struct FileSource {
    file: File,
    name: String,
}

impl FileSource {
    /// Opens `path` for reading.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        Ok(FileSource {
            file,
            name: path.display().to_string(),
        })
    }
}

impl FileSource {
    /// Wraps an open file.
    pub fn from_file(file: File, name: impl Into<String>) -> Self {
        FileSource {
            file,
            name: name.into(),
        }
    }
}

impl ShardSource for FileSource {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn as_file(&self) -> Option<&File> {
        Some(&self.file)
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// Where `create_archive` writes.
#[derive(Debug, Clone)]
pub enum ArchiveTarget {
    /// Standard output (one shard only).
    Stdout,
    /// A local path; shards go to `path`, `path.1`, ...
    Path(PathBuf),
    /// An object store URL `s3://BUCKET/KEY`; shards go to `KEY`, `KEY.1`, ...
    S3(String),
}

impl ArchiveTarget {
    /// Parses a command-line destination (`-` is standard output, `s3://...` an object
    /// store, `file://PATH` or anything else a local path).
    pub fn parse(s: &str) -> Self {
        if s == "-" {
            ArchiveTarget::Stdout
        } else if crate::s3::is_s3_url(s) {
            ArchiveTarget::S3(s.to_string())
        } else {
            ArchiveTarget::Path(PathBuf::from(s.strip_prefix("file://").unwrap_or(s)))
        }
    }
}

/// Shards being written under temporary names (files) or as unfinished multipart
/// uploads (object stores); [`PendingArchive::publish`] puts them in place after the
/// writer committed them, [`PendingArchive::discard`] removes them. A failed write
/// therefore never replaces an earlier archive at the same name.
pub struct PendingArchive {
    renames: Vec<(PathBuf, PathBuf)>,
    uploads: Option<crate::s3::S3PendingArchive>,
}

impl PendingArchive {
    /// Moves committed shards to their final names (shard 0 last), or completes their
    /// uploads (shard 0 last).
    ///
    /// # Errors
    /// [`Error::Io`] naming the shard; the shards not moved yet are removed (so is
    /// every upload, for an object store), and without shard 0 nothing reads as an
    /// archive at the final name.
    pub fn publish(self) -> Result<()> {
        if let Some(uploads) = self.uploads {
            return uploads.publish();
        }
        for (k, (tmp, dst)) in self.renames.iter().enumerate().rev() {
            if let Err(e) = std::fs::rename(tmp, dst) {
                // Shards k, k-1, ..., 0 are still under their temporary names.
                for (left, _) in &self.renames[..=k] {
                    let _ = std::fs::remove_file(left);
                }
                return Err(Error::io(
                    format!("renaming {} to {}", tmp.display(), dst.display()),
                    e,
                ));
            }
        }
        Ok(())
    }

    /// Removes the temporary shards, or aborts the uploads.
    pub fn discard(self) {
        if let Some(uploads) = self.uploads {
            uploads.discard();
        }
        for (tmp, _) in &self.renames {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// A fresh random archive id.
pub fn new_archive_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        // No entropy source: time and pid still make the id unique on this machine.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id[..12].copy_from_slice(&t.to_le_bytes()[..12]);
        id[12..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    id
}

fn random_suffix() -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Creates the temporary file that will become `dst`: `.NAME.SUFFIX.partial` beside it.
fn create_partial(dst: &Path, suffix: &str) -> Result<(File, PathBuf)> {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dst.with_file_name(format!(".{name}.{suffix}.partial"));
    let file = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
    Ok((file, tmp))
}

/// A new single file (not an archive: a podman export, say) written under a temporary
/// name beside `dst`; publishing the returned [`PendingArchive`] renames it to `dst`,
/// discarding it removes it, so a failed write never replaces an earlier file.
///
/// # Errors
/// [`Error::Io`] when the temporary file cannot be created.
pub fn create_file_atomically(dst: &Path) -> Result<(File, PendingArchive)> {
    let (file, tmp) = create_partial(dst, &random_suffix())?;
    let pending = PendingArchive {
        renames: vec![(tmp, dst.to_path_buf())],
        uploads: None,
    };
    Ok((file, pending))
}

/// Sinks for a new archive, and the temporary files to publish once it is committed.
pub struct NewArchive {
    pub sinks: Vec<Box<dyn ShardSink>>,
    /// `None` for standard output.
    pub pending: Option<PendingArchive>,
}

/// Opens `shards` sinks for a new archive at `target`.
///
/// # Errors
/// [`Error::Usage`] for several shards on stdout or a bad `s3://` URL or configuration;
/// [`Error::Io`] when a file cannot be created or an upload cannot be started.
pub fn create_archive(target: &ArchiveTarget, shards: u32) -> Result<NewArchive> {
    match target {
        ArchiveTarget::S3(url) => {
            let (sinks, uploads) = crate::s3::create_archive(url, shards)?;
            Ok(NewArchive {
                sinks,
                pending: Some(PendingArchive {
                    renames: Vec::new(),
                    uploads: Some(uploads),
                }),
            })
        }
        ArchiveTarget::Stdout => {
            if shards != 1 {
                return Err(Error::Usage(
                    "standard output can carry only one shard".into(),
                ));
            }
            Ok(NewArchive {
                sinks: vec![Box::new(StdoutSink { out: io::stdout() })],
                pending: None,
            })
        }
        ArchiveTarget::Path(base) => {
            let suffix = random_suffix();
            let mut sinks: Vec<Box<dyn ShardSink>> = Vec::new();
            let mut renames = Vec::new();
            for i in 0..shards {
                let dst = shard_path(base, i);
                let (file, tmp) = match create_partial(&dst, &suffix) {
                    Ok(created) => created,
                    Err(e) => {
                        PendingArchive {
                            renames,
                            uploads: None,
                        }
                        .discard();
                        return Err(e);
                    }
                };
                renames.push((tmp, dst.clone()));
                sinks.push(Box::new(FileSink::new(file, dst.display().to_string())));
            }
            Ok(NewArchive {
                sinks,
                pending: Some(PendingArchive {
                    renames,
                    uploads: None,
                }),
            })
        }
    }
}

/// Opens the archive whose first shard is at `path` (its other shards are found by
/// [`shard_path`]); `s3://BUCKET/KEY` opens an archive in an object store
/// ([`crate::s3::open_archive`]).
///
/// # Errors
/// Everything [`ArchiveReader::open`] reports; a missing shard is named in the message.
pub fn open_archive(path: &Path) -> Result<ArchiveReader> {
    if let Some(url) = path.to_str().filter(|p| crate::s3::is_s3_url(p)) {
        return crate::s3::open_archive(url);
    }
    ArchiveReader::open(|i| {
        let p = shard_path(path, i);
        let src = FileSource::open(&p).map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound && i > 0 => {
                Error::Corrupt(format!(
                    "shard {i} of the archive is missing: {} does not exist",
                    p.display()
                ))
            }
            e => e,
        })?;
        Ok(Box::new(src) as Box<dyn ShardSource>)
    })
}
