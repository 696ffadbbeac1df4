//! Where an archive is: one type, parsed once from the command line, that both creates
//! and opens archives, and the rule that names the shards of one archive.
//!
//! Shard 0 carries the name the user gave; shards 1.. lie beside it. Archives written
//! by this version name them by the archive id (`NAME.<first 8 id bytes in hex>.i`,
//! [`ShardNames::ById`]), so a new archive never writes over the shards of the one it
//! replaces, and replacing shard 0 (a rename, or completing one upload) is the single
//! step that switches from the old archive to the new one. Older archives used
//! `NAME.i` ([`ShardNames::Indexed`]); shard 0's header tells readers which rule applies.

use std::fmt;
use std::fs::File;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use ckstream_format::crypto::Keyring;
use ckstream_format::layout::{ShardHeader, HEADER_LEN};
use ckstream_format::{
    ArchiveReader, ArchiveWriter, Error, Result, ShardSink, WriteSummary, WriterOptions,
};

use crate::local::{self, FdSink, FileSource, StdoutSink};
use crate::publish::{FilePublish, PendingArchive};

/// Where an archive is read from or written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveLocation {
    /// `-`: standard output when creating, standard input when opening (one shard).
    Std,
    /// Inherited file descriptors, one per shard (criu-image-streamer's `--shard-fds`).
    Fds(Vec<RawFd>),
    /// A local file (a `file://` prefix is accepted); shards 1.. lie beside it.
    Path(PathBuf),
    /// An object `s3://BUCKET/KEY`; shards 1.. are objects beside it.
    #[cfg(feature = "s3")]
    S3(crate::s3::S3Url),
}

impl ArchiveLocation {
    /// Parses a command-line archive name: `-` is standard input/output, `s3://BUCKET/KEY`
    /// an object, `file://PATH` or anything else a local path.
    ///
    /// # Errors
    /// [`Error::Usage`] for an empty name or a malformed `s3://` URL (or any `s3://` URL
    /// when this build has no S3 support).
    pub fn parse(s: &str) -> Result<Self> {
        if s == "-" {
            return Ok(ArchiveLocation::Std);
        }
        if s.starts_with("s3://") {
            #[cfg(feature = "s3")]
            return Ok(ArchiveLocation::S3(crate::s3::S3Url::parse(s)?));
            #[cfg(not(feature = "s3"))]
            return Err(Error::Usage(format!(
                "{s}: this ckstream was built without S3 support (cargo feature `s3`)"
            )));
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        if path.is_empty() {
            return Err(Error::Usage("an archive name cannot be empty".into()));
        }
        Ok(ArchiveLocation::Path(PathBuf::from(path)))
    }

    /// True where every request has network latency (object stores): readers should
    /// batch, read ahead and decode on more threads.
    pub fn is_remote(&self) -> bool {
        match self {
            ArchiveLocation::Std | ArchiveLocation::Fds(_) | ArchiveLocation::Path(_) => false,
            #[cfg(feature = "s3")]
            ArchiveLocation::S3(_) => true,
        }
    }

    /// True for a stream (standard input/output, fds) rather than a named archive.
    pub fn is_stream(&self) -> bool {
        matches!(self, ArchiveLocation::Std | ArchiveLocation::Fds(_))
    }

    /// The local path, for a local file.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            ArchiveLocation::Path(p) => Some(p),
            _ => None,
        }
    }

    /// Starts a new archive here: opens one sink per shard (temporary names, or uploads
    /// not completed yet), generates the archive id, writes the shard headers and records
    /// the tool version and `spec.command` in the index metadata. Nothing is visible
    /// under the final name until [`NewArchive::finish`] (or [`PendingArchive::publish`])
    /// succeeds.
    ///
    /// # Errors
    /// [`Error::Usage`] for several shards on standard output, or a shard count that
    /// does not match the fds given; [`Error::Io`] when a file cannot be created or an
    /// upload cannot be started.
    pub fn create(&self, spec: &ArchiveSpec) -> Result<NewArchive> {
        let archive_id = new_archive_id();
        let names = if spec.shards > 1 {
            ShardNames::ById(archive_id)
        } else {
            ShardNames::Indexed
        };
        let (sinks, pending): (Vec<Box<dyn ShardSink>>, PendingArchive) = match self {
            ArchiveLocation::Std => {
                if spec.shards != 1 {
                    return Err(Error::Usage(
                        "standard output can carry only one shard".into(),
                    ));
                }
                (vec![Box::new(StdoutSink::new()?)], PendingArchive::Stream)
            }
            ArchiveLocation::Fds(fds) => {
                if fds.len() != spec.shards as usize {
                    return Err(Error::Usage(format!(
                        "{} shards need as many fds, {} given",
                        spec.shards,
                        fds.len()
                    )));
                }
                let sinks = fds
                    .iter()
                    .map(|&fd| {
                        let file = local::take_fd(fd, "shard")?;
                        Ok(Box::new(FdSink::new(file, format!("shard fd {fd}")))
                            as Box<dyn ShardSink>)
                    })
                    .collect::<Result<Vec<_>>>()?;
                (sinks, PendingArchive::Stream)
            }
            ArchiveLocation::Path(base) => {
                let (sinks, files) =
                    FilePublish::create(base, archive_id, names, spec.shards, spec.writeback)?;
                (sinks, PendingArchive::Files(files))
            }
            #[cfg(feature = "s3")]
            ArchiveLocation::S3(url) => {
                let (sinks, uploads) =
                    crate::s3::create_archive(url, archive_id, names, spec.shards)?;
                (sinks, PendingArchive::S3(uploads))
            }
        };
        let opts = WriterOptions {
            id_named_shards: matches!(names, ShardNames::ById(_)),
            ..spec.writer.clone()
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut writer = match ArchiveWriter::new(sinks, opts, archive_id, now) {
            Ok(w) => w,
            Err(e) => {
                pending.discard();
                return Err(e);
            }
        };
        writer.add_meta("ckstream.version", env!("CARGO_PKG_VERSION"));
        writer.add_meta("ckstream.command", spec.command);
        Ok(NewArchive { writer, pending })
    }

    /// Creates an archive here ([`create`](Self::create)), lets `fill` add its entries,
    /// and commits and publishes it only when `fill` succeeded; otherwise nothing is
    /// published and an earlier archive of the same name stays as it was.
    ///
    /// # Errors
    /// The errors of [`create`](Self::create), of `fill`, and of
    /// [`NewArchive::finish`].
    pub fn write(
        &self,
        spec: &ArchiveSpec,
        fill: impl FnOnce(&mut ArchiveWriter) -> Result<()>,
    ) -> Result<WriteSummary> {
        let mut archive = self.create(spec)?;
        match fill(&mut archive.writer) {
            Ok(()) => archive.finish(),
            Err(e) => {
                archive.abort();
                Err(e)
            }
        }
    }

    /// Opens the archive here. A stream (standard input, pipes on fds) is first spooled
    /// into unlinked temporary files in `spool_dir` (its commit footer comes last); other
    /// shards of a local archive are found beside shard 0 ([`shard_path`]); remote shards
    /// 1.. are opened when first read.
    ///
    /// # Errors
    /// Everything [`ArchiveReader::open`] reports; a missing shard is an
    /// [`Error::Corrupt`] naming it; a stream with more shards than given is refused.
    pub fn open(&self, spool_dir: &Path) -> Result<ArchiveReader> {
        self.open_keyed(spool_dir, &Keyring::default())
    }

    /// [`open`](Self::open) with keys to open a sealed archive and signers to require
    /// ([`ArchiveReader::open_keyed`]).
    ///
    /// # Errors
    /// As [`open`](Self::open) and [`ArchiveReader::open_keyed`].
    pub fn open_keyed(&self, spool_dir: &Path, keys: &Keyring) -> Result<ArchiveReader> {
        let mut reader = self.open_one(spool_dir, keys)?;
        if !reader.index().parents.is_empty() {
            let mut parents = Vec::new();
            for p in &reader.index().parents {
                let at = self.beside(&p.location)?;
                // A parent is never sealed and is vouched for by the child's index (id
                // and index digest, under the child's signature when it has one).
                let parent = at
                    .open_one(spool_dir, &Keyring::default())
                    .map_err(|e| match e {
                        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                            Error::Corrupt(format!(
                                "parent archive {at} is missing: the archive references chunks stored there (deleting a parent breaks its children; `ckstream flatten` makes a child self-contained)"
                            ))
                        }
                        Error::NotAnArchive(m) | Error::Incomplete(m) => {
                            Error::Corrupt(format!("parent archive {at} is not a complete archive: {m}"))
                        }
                        e => e,
                    })?;
                parents.push((parent, at.to_string()));
            }
            reader.attach_parents(parents)?;
        }
        Ok(reader)
    }

    /// The archive at `location`, relative to this one's directory (a parent archive's
    /// location as an index records it: validated as a relative path without `..`).
    ///
    /// # Errors
    /// [`Error::Usage`] for a stream, which has no directory.
    pub fn beside(&self, location: &str) -> Result<ArchiveLocation> {
        ckstream_format::index::validate_path(location.as_bytes())?;
        match self {
            ArchiveLocation::Path(base) => Ok(ArchiveLocation::Path(
                base.parent().unwrap_or(Path::new("")).join(location),
            )),
            #[cfg(feature = "s3")]
            ArchiveLocation::S3(url) => {
                let dir = url.key.rsplit_once('/').map_or("", |(d, _)| d);
                let key = if dir.is_empty() {
                    location.to_string()
                } else {
                    format!("{dir}/{location}")
                };
                Ok(ArchiveLocation::S3(crate::s3::S3Url::parse(&format!(
                    "s3://{}/{key}",
                    url.bucket
                ))?))
            }
            _ => Err(Error::Usage(format!(
                "an incremental archive read from {self} needs its parent {location}, which a stream has no place for: read it from a file or object"
            ))),
        }
    }

    /// Where a new archive here finds `parent`: its location relative to this one's
    /// directory (both local, or both in one bucket).
    ///
    /// # Errors
    /// [`Error::Usage`] when there is none without `..` (the parent must lie in the new
    /// archive's directory or below it) or the two are not of the same kind.
    pub fn relative_location_of(&self, parent: &ArchiveLocation) -> Result<String> {
        let refuse = || {
            Error::Usage(format!(
                "the parent {parent} must lie beside the new archive {self} (in its directory or below it)"
            ))
        };
        let rel = match (self, parent) {
            (ArchiveLocation::Path(child), ArchiveLocation::Path(p)) => {
                let dir = child
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let dir = absolute(dir)?;
                let p = absolute(p)?;
                p.strip_prefix(&dir)
                    .map_err(|_| refuse())?
                    .to_str()
                    .ok_or_else(refuse)?
                    .to_string()
            }
            #[cfg(feature = "s3")]
            (ArchiveLocation::S3(child), ArchiveLocation::S3(p)) if child.bucket == p.bucket => {
                match child.key.rsplit_once('/') {
                    None => p.key.clone(),
                    Some((dir, _)) => p
                        .key
                        .strip_prefix(&format!("{dir}/"))
                        .ok_or_else(refuse)?
                        .to_string(),
                }
            }
            _ => return Err(refuse()),
        };
        ckstream_format::index::validate_path(rel.as_bytes()).map_err(|_| refuse())?;
        Ok(rel)
    }

    /// What a new archive here with parent `parent` (opened from `at`) may reference.
    ///
    /// # Errors
    /// As [`relative_location_of`](Self::relative_location_of) and
    /// [`ckstream_format::ParentChunks::of_parent`].
    pub fn parent_chunks(
        &self,
        parent: &ArchiveReader,
        at: &ArchiveLocation,
    ) -> Result<ckstream_format::ParentChunks> {
        let location = self.relative_location_of(at)?;
        ckstream_format::ParentChunks::of_parent(parent, location, &|grand| {
            self.relative_location_of(&at.beside(grand)?)
        })
    }

    fn open_one(&self, spool_dir: &Path, keys: &Keyring) -> Result<ArchiveReader> {
        match self {
            ArchiveLocation::Std => {
                let stdin = local::take_fd(0, "standard input")?;
                open_streams(vec![(stdin, "stdin".to_string())], spool_dir, keys)
            }
            ArchiveLocation::Fds(fds) => {
                let files = fds
                    .iter()
                    .map(|&fd| Ok((local::take_fd(fd, "shard")?, format!("shard fd {fd}"))))
                    .collect::<Result<Vec<_>>>()?;
                open_streams(files, spool_dir, keys)
            }
            ArchiveLocation::Path(base) => {
                let s0 = FileSource::open(base)?;
                ArchiveReader::open_keyed(
                    Box::new(s0),
                    |header, i| {
                        let p = shard_path(base, ShardNames::of(header), i);
                        let src = FileSource::open(&p).map_err(|e| match e {
                            Error::Io { source, .. }
                                if source.kind() == std::io::ErrorKind::NotFound =>
                            {
                                Error::Corrupt(format!(
                                    "shard {i} of the archive is missing: {} does not exist",
                                    p.display()
                                ))
                            }
                            e => e,
                        })?;
                        Ok(Box::new(src) as Box<dyn ckstream_format::ShardSource>)
                    },
                    keys,
                )
            }
            #[cfg(feature = "s3")]
            ArchiveLocation::S3(url) => crate::s3::open_archive(url, keys),
        }
    }
}

/// `p` made absolute against the current directory, `.` and `..` resolved lexically
/// (the files need not exist yet).
fn absolute(p: &Path) -> Result<PathBuf> {
    let joined =
        std::path::absolute(p).map_err(|e| Error::io(format!("resolving {}", p.display()), e))?;
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Opens an archive whose shards are the given streams, in order (spooling pipes).
fn open_streams(
    files: Vec<(File, String)>,
    spool_dir: &Path,
    keys: &Keyring,
) -> Result<ArchiveReader> {
    let given = files.len();
    let mut sources = Vec::new();
    for (file, name) in files {
        let file = local::seekable(file, spool_dir, &name)?;
        sources
            .push(Some(Box::new(FileSource::from_file(file, name))
                as Box<dyn ckstream_format::ShardSource>));
    }
    let mut sources = sources.into_iter();
    let s0 = sources
        .next()
        .flatten()
        .ok_or_else(|| Error::Usage("no shard given".into()))?;
    let mut rest: Vec<_> = sources.collect();
    let reader = ArchiveReader::open_keyed(
        s0,
        |_, i| {
            rest.get_mut(i as usize - 1)
            .and_then(Option::take)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "the archive has more shards than the {given} stream{} given (needs shard {i}); read it from files",
                    if given == 1 { "" } else { "s" }
                ))
            })
        },
        keys,
    )?;
    if reader.shard_count() as usize != given {
        return Err(Error::Usage(format!(
            "the archive has {} shards but {given} streams were given",
            reader.shard_count()
        )));
    }
    Ok(reader)
}

impl fmt::Display for ArchiveLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArchiveLocation::Std => f.write_str("-"),
            ArchiveLocation::Fds(fds) => {
                let list: Vec<String> = fds.iter().map(|fd| fd.to_string()).collect();
                write!(f, "shard fds {}", list.join(","))
            }
            ArchiveLocation::Path(p) => write!(f, "{}", p.display()),
            #[cfg(feature = "s3")]
            ArchiveLocation::S3(url) => write!(f, "{url}"),
        }
    }
}

impl std::str::FromStr for ArchiveLocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ArchiveLocation::parse(s)
    }
}

/// How a new archive is written.
#[derive(Debug, Clone)]
pub struct ArchiveSpec<'a> {
    /// Number of shards (1..=4096).
    pub shards: u32,
    /// How the writer encodes (compression, chunk size, threads, progress).
    pub writer: WriterOptions,
    /// Recorded as index metadata `ckstream.command` (`pack`, `dump`, ...).
    pub command: &'a str,
    /// How local shard files are written back to disk while the archive is written.
    pub writeback: Writeback,
}

/// How much written but not yet durable data a local shard file may hold.
///
/// Every [`Writeback::WINDOW`] of new data, the shard starts writing it to disk
/// (`sync_file_range`), so the fsync that commits the archive finds little left to do:
/// a checkpoint's freeze then ends about when the disk has the data, not a whole
/// archive's write later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writeback {
    /// Start writing back each window, and wait whenever more than this many bytes are
    /// under way (bounds dirty memory and the final fsync; the writer slows to the
    /// disk's pace).
    Bounded(u64),
    /// Leave it to the kernel; all data is written at the commit's fsync. For a
    /// checkpoint that leaves the process running: its freeze should end as soon as
    /// CRIU handed over the data, and starting writeback can block on a busy disk
    /// queue (the data then reaches the disk after the process runs again).
    Off,
    /// Never forced to disk, not even at the commit: for a temporary archive that is
    /// read once and removed (a podman export being restored), which a crash may lose.
    Volatile,
}

impl Writeback {
    /// New data accumulated before writeback of it is started.
    pub const WINDOW: u64 = 8 << 20;
    /// Default bound on data under writeback.
    pub const DEFAULT_BOUND: u64 = 256 << 20;
}

impl Default for Writeback {
    fn default() -> Self {
        Writeback::Bounded(Writeback::DEFAULT_BOUND)
    }
}

/// A new archive: its writer, and what makes it visible once the writer committed.
pub struct NewArchive {
    /// Adds entries and commits.
    pub writer: ArchiveWriter,
    /// Makes the committed archive visible under its name.
    pub pending: PendingArchive,
}

impl NewArchive {
    /// Commits the archive (index, footers, sync) and publishes it under its name.
    /// On any failure nothing is published and the earlier archive of that name, if
    /// any, is left as it was.
    ///
    /// # Errors
    /// The writer's or the publish step's error.
    pub fn finish(self) -> Result<WriteSummary> {
        let NewArchive { writer, pending } = self;
        match writer.finish() {
            Ok(summary) => {
                pending.publish()?;
                Ok(summary)
            }
            Err(e) => {
                pending.discard();
                Err(e)
            }
        }
    }

    /// Stops without committing and removes whatever was written.
    pub fn abort(self) {
        self.writer.abort();
        self.pending.discard();
    }
}

/// How shards 1.. of an archive are named beside shard 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardNames {
    /// `NAME.i`: archives from before shards were named by id.
    Indexed,
    /// `NAME.<hex of the first 8 bytes of the archive id>.i`.
    ById([u8; 16]),
}

impl ShardNames {
    /// The rule the archive whose shard 0 has this header follows.
    pub fn of(header: &ShardHeader) -> Self {
        if header.id_named_shards() {
            ShardNames::ById(header.archive_id)
        } else {
            ShardNames::Indexed
        }
    }

    /// What is appended to shard 0's name to name shard `i` (nothing for shard 0).
    pub fn suffix(&self, i: u32) -> String {
        match (i, self) {
            (0, _) => String::new(),
            (_, ShardNames::Indexed) => format!(".{i}"),
            (_, ShardNames::ById(id)) => {
                let hex: String = id[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!(".{hex}.{i}")
            }
        }
    }
}

/// Path of shard `i` of the local archive whose shard 0 is `base`.
pub fn shard_path(base: &Path, names: ShardNames, i: u32) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(names.suffix(i));
    PathBuf::from(s)
}

/// The paths of every shard of the local archive whose shard 0 is `base`, as its header
/// names them (the shards themselves need not exist).
///
/// # Errors
/// [`Error::Io`] when `base` cannot be read, [`Error::NotAnArchive`] when it is no shard 0.
pub fn local_shard_paths(base: &Path) -> Result<Vec<PathBuf>> {
    let header = read_shard_header(base)?;
    let names = ShardNames::of(&header);
    Ok((0..header.shard_count)
        .map(|i| shard_path(base, names, i))
        .collect())
}

/// Reads and checks the header of the shard file at `path`.
pub(crate) fn read_shard_header(path: &Path) -> Result<ShardHeader> {
    use std::os::unix::fs::FileExt;
    let file =
        File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let mut buf = vec![0u8; HEADER_LEN];
    file.read_exact_at(&mut buf, 0).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::NotAnArchive(format!("{} is shorter than a shard header", path.display()))
        } else {
            Error::io(format!("reading {}", path.display()), e)
        }
    })?;
    ShardHeader::decode(&buf, &path.display().to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_of_location() {
        assert_eq!(ArchiveLocation::parse("-").unwrap(), ArchiveLocation::Std);
        assert_eq!(
            ArchiveLocation::parse("file:///tmp/a.cka").unwrap(),
            ArchiveLocation::Path("/tmp/a.cka".into())
        );
        assert_eq!(
            ArchiveLocation::parse("rel/a.cka").unwrap(),
            ArchiveLocation::Path("rel/a.cka".into())
        );
        assert!(ArchiveLocation::parse("").is_err());
        assert!(ArchiveLocation::parse("file://").is_err());
        #[cfg(feature = "s3")]
        {
            let s3 = ArchiveLocation::parse("s3://b/k.cka").unwrap();
            assert!(s3.is_remote());
            assert_eq!(s3.to_string(), "s3://b/k.cka");
            assert!(ArchiveLocation::parse("s3://bucket").is_err());
        }
        assert!(!ArchiveLocation::parse("a.cka").unwrap().is_remote());
    }

    #[test]
    fn shards_are_named_by_id_or_by_index() {
        let base = Path::new("/x/ckpt.cka");
        let mut id = [0u8; 16];
        id[0] = 0xab;
        id[7] = 0x01;
        id[8] = 0xff; // beyond the 8 bytes used in names
        assert_eq!(shard_path(base, ShardNames::ById(id), 0), base);
        assert_eq!(
            shard_path(base, ShardNames::ById(id), 3),
            Path::new("/x/ckpt.cka.ab00000000000001.3")
        );
        assert_eq!(
            shard_path(base, ShardNames::Indexed, 2),
            Path::new("/x/ckpt.cka.2")
        );
    }
}
