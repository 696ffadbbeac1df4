//! Converting a podman checkpoint export (tar, or tar.zst as podman writes by
//! default) into a `.cka`, in one sequential pass. Uncompressed input on btrfs/XFS
//! shares its file data with the new archive when the archive is uncompressed too.
//!
//! The input is untrusted: every member path, hard link target and `deleted.files`
//! entry is validated before anything is written, and the archive's own index
//! validation rejects the rest (escaping symlinks, duplicates).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use ckstream_format::index::{validate_path, Xattr};
use ckstream_format::{ArchiveWriter, CodecId, Entry, EntryKind, Error, Result, Stop};

use crate::layout::{cka_name_of, CKA_PODMAN_DIR, CKA_ROOTFS_DIR, DELETED_FILES, ROOTFS_DIFF_TAR};

/// What an import did.
#[derive(Debug, Default, Clone)]
pub struct ImportStats {
    /// Entries added.
    pub entries: u64,
    /// Of them, entries of the rootfs diff.
    pub rootfs_entries: u64,
    /// Paths in `deleted.files`.
    pub deleted_paths: u64,
    /// Bytes of file data.
    pub bytes: u64,
    /// The export was zstd-compressed.
    pub compressed_input: bool,
    /// The container name recorded in `config.dump`.
    pub container_name: Option<String>,
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

fn bad(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

fn read_err(what: &str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        bad(format!("podman archive is truncated ({what})"))
    } else if e.raw_os_error().is_none() {
        // Not from the kernel: the tar or zstd decoder found malformed bytes.
        bad(format!("podman archive is damaged ({what}): {e}"))
    } else {
        Error::io(format!("reading the podman archive ({what})"), e)
    }
}

/// Converts the podman export at `input` into a new `.cka` at `output` (plain `zstd`
/// meaning podman's level 3), committed and published only when complete.
///
/// # Errors
/// As [`import_podman_archive`], and the errors of creating or publishing the archive.
pub fn import(
    input: &Path,
    output: &ckstream_store::ArchiveLocation,
    shards: u32,
    compression: ckstream_format::CompressionArg,
    progress: &ckstream_format::Progress,
    stop: ckstream_format::Stop,
    keys: &ckstream_format::WriteKeys,
) -> Result<(ImportStats, ckstream_format::WriteSummary)> {
    let spec = ckstream_store::ArchiveSpec {
        shards,
        writer: ckstream_format::WriterOptions {
            compression: crate::checkpoint::cka_compression(compression),
            progress: progress.clone(),
            keys: keys.clone(),
            ..Default::default()
        },
        command: "podman import",
        writeback: Default::default(),
    };
    import_as(input, output, &spec, stop)
}

/// Converts the podman export at `input` into an uncompressed, unsigned `.cka` at
/// `output` that is read once and removed: never forced to disk
/// ([`ckstream_store::Writeback::Volatile`]).
///
/// # Errors
/// As [`import`].
pub fn import_temporary(
    input: &Path,
    output: &ckstream_store::ArchiveLocation,
    progress: &ckstream_format::Progress,
    stop: ckstream_format::Stop,
) -> Result<ImportStats> {
    let spec = ckstream_store::ArchiveSpec {
        shards: 1,
        writer: ckstream_format::WriterOptions {
            compression: ckstream_format::Compression::NONE,
            progress: progress.clone(),
            ..Default::default()
        },
        command: "podman restore",
        writeback: ckstream_store::Writeback::Volatile,
    };
    Ok(import_as(input, output, &spec, stop)?.0)
}

fn import_as(
    input: &Path,
    output: &ckstream_store::ArchiveLocation,
    spec: &ckstream_store::ArchiveSpec,
    stop: ckstream_format::Stop,
) -> Result<(ImportStats, ckstream_format::WriteSummary)> {
    let total = std::fs::metadata(input)
        .map_err(|e| Error::io(format!("cannot read {}", input.display()), e))?
        .len();
    spec.writer.progress.set_total(total);
    let mut stats = None;
    let summary = output.write(spec, |w| {
        stats = Some(import_podman_archive(input, w, stop)?);
        Ok(())
    })?;
    Ok((stats.expect("set when the archive was written"), summary))
}

/// Imports the podman export at `path` into `writer`.
///
/// # Errors
/// [`Error::Corrupt`] for a damaged or truncated tar; [`Error::UnsafeEntry`] for
/// member paths or deletions that could leave the target; [`Error::Unsupported`]
/// for gzip input; I/O errors.
pub fn import_podman_archive(
    path: &Path,
    writer: &mut ArchiveWriter,
    stop: Stop,
) -> Result<ImportStats> {
    scan(path, Some(writer), stop, None)
}

/// A podman export read by [`check_podman_archive`]: what a restore decides on.
#[derive(Debug, Default)]
pub struct CheckedArchive {
    /// Counts and the container name.
    pub stats: ImportStats,
    /// `config.dump`.
    pub config_dump: Vec<u8>,
    /// `spec.dump`, if the archive has one.
    pub spec_dump: Option<Vec<u8>>,
    /// The members of `rootfs-diff.tar`, in order.
    pub diff: Vec<crate::symlinks::DiffMember>,
    /// `deleted.files`.
    pub deleted: Vec<String>,
}

/// Reads the whole podman export at `path` and checks everything
/// [`import_podman_archive`] checks, writing nothing: run before handing an archive
/// to podman, whose restore would follow `..` in `deleted.files` (podman ≤ 5.8).
/// Returns what a restore needs to decide further (see [`crate::symlinks`] and
/// [`crate::trust`]).
///
/// # Errors
/// As [`import_podman_archive`].
pub fn check_podman_archive(path: &Path) -> Result<CheckedArchive> {
    let mut checked = CheckedArchive::default();
    checked.stats = scan(path, None, Stop::NEVER, Some(&mut checked))?;
    Ok(checked)
}

fn scan(
    path: &Path,
    writer: Option<&mut ArchiveWriter>,
    stop: Stop,
    collect: Option<&mut CheckedArchive>,
) -> Result<ImportStats> {
    let file =
        File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let mut magic = [0u8; 4];
    // Positional: the decoder or tar reader below starts from offset 0.
    let n = std::os::unix::fs::FileExt::read_at(&file, &mut magic, 0)
        .map_err(|e| read_err("header", e))?;
    let mut stats = ImportStats::default();
    if n >= 4 && magic == ZSTD_MAGIC {
        stats.compressed_input = true;
        let dec = zstd::Decoder::new(file).map_err(|e| read_err("zstd", e))?;
        let mut importer = Importer::new(writer, None, stop);
        importer.collect = collect;
        importer.run(NoSeek(dec), false, stats)
    } else if n >= 2 && magic[..2] == GZIP_MAGIC {
        Err(Error::Unsupported(
            "gzip-compressed podman archives are not supported; decompress it first (gunzip) or export with --compress zstd|none".into(),
        ))
    } else {
        let cloneable = writer
            .as_ref()
            .is_some_and(|w| w.options().compression.codec == CodecId::None);
        let clone = cloneable
            .then(|| file.try_clone().ok())
            .flatten()
            .map(Arc::new);
        // Only checking: read the headers and seek over the data (a 4 GB export is
        // checked in well under a second instead of being read whole).
        let check_only = writer.is_none();
        let mut importer = Importer::new(writer, clone, stop);
        importer.collect = collect;
        if check_only {
            importer.seek_file = Some(file.try_clone().map_err(|e| read_err("tar", e))?);
        }
        importer.run(BufReader::with_capacity(1 << 20, file), check_only, stats)
    }
}

struct Importer<'w> {
    /// `None` when only checking the archive.
    writer: Option<&'w mut ArchiveWriter>,
    /// The uncompressed input file, when chunks may be cloned from it.
    clone: Option<Arc<File>>,
    rootfs_paths: HashSet<Vec<u8>>,
    seen_rootfs_dir: bool,
    stop: Stop,
    /// The uncompressed input, when only checking: the nested tar is walked by seeking.
    seek_file: Option<File>,
    /// Where a check keeps what a restore decides on.
    collect: Option<&'w mut CheckedArchive>,
}

impl<'w> Importer<'w> {
    fn new(writer: Option<&'w mut ArchiveWriter>, clone: Option<Arc<File>>, stop: Stop) -> Self {
        Importer {
            writer,
            clone,
            rootfs_paths: HashSet::new(),
            seen_rootfs_dir: false,
            stop,
            seek_file: None,
            collect: None,
        }
    }

    fn run<R: Read + Seek>(
        mut self,
        input: R,
        seek: bool,
        mut stats: ImportStats,
    ) -> Result<ImportStats> {
        let mut ar = tar::Archive::new(input);
        let mut deleted: Option<Vec<String>> = None;
        let mut seen_podman_dir = false;
        let mut seen_config = false;
        let members = if seek {
            ar.entries_with_seek()
        } else {
            ar.entries()
        };
        for member in members.map_err(|e| read_err("tar", e))? {
            let mut member = member.map_err(|e| read_err("tar member", e))?;
            let name = member_path(&member)?;
            let name_str = String::from_utf8(name.clone())
                .map_err(|_| bad("podman archive member name is not UTF-8"))?;
            if name_str == ROOTFS_DIFF_TAR {
                let base = member.raw_file_position();
                self.ensure_dir(CKA_ROOTFS_DIR.as_bytes(), 0o755)?;
                self.import_rootfs(&mut member, base, &mut stats)?;
                continue;
            }
            let mut prefetched = None;
            if name_str == crate::layout::CONFIG_DUMP {
                let mut buf = Vec::new();
                member
                    .by_ref()
                    .take(64 << 20)
                    .read_to_end(&mut buf)
                    .map_err(|e| read_err("config.dump", e))?;
                stats.container_name = container_name(&buf);
                if let Some(c) = self.collect.as_deref_mut() {
                    c.config_dump = buf.clone();
                }
                prefetched = Some(buf);
            }
            if name_str == crate::layout::SPEC_DUMP {
                if let Some(c) = self.collect.as_deref_mut() {
                    let mut buf = Vec::new();
                    member
                        .by_ref()
                        .take(64 << 20)
                        .read_to_end(&mut buf)
                        .map_err(|e| read_err("spec.dump", e))?;
                    c.spec_dump = Some(buf.clone());
                    prefetched = Some(buf);
                }
            }
            if name_str == DELETED_FILES {
                let mut buf = Vec::new();
                member
                    .by_ref()
                    .take(16 << 20)
                    .read_to_end(&mut buf)
                    .map_err(|e| read_err("deleted.files", e))?;
                deleted = Some(crate::deleted::parse(&buf)?);
                prefetched = Some(buf);
            }
            let Some(cka) = cka_name_of(&name_str) else {
                continue;
            };
            if cka.starts_with(CKA_PODMAN_DIR) && !seen_podman_dir {
                self.ensure_dir(CKA_PODMAN_DIR.as_bytes(), 0o700)?;
                seen_podman_dir = true;
            }
            seen_config |= name_str == crate::layout::CONFIG_DUMP;
            let base = member.raw_file_position();
            self.add_member(
                &mut member,
                cka.into_bytes(),
                None,
                base,
                prefetched,
                &mut stats,
            )?;
        }
        if !seen_config {
            return Err(bad(
                "not a podman checkpoint archive: no config.dump (is it a podman export?)",
            ));
        }
        if let Some(paths) = deleted {
            stats.deleted_paths = paths.len() as u64;
            self.add_deletions(&paths)?;
            if let Some(c) = self.collect.as_deref_mut() {
                c.deleted = paths;
            }
        }
        Ok(stats)
    }

    /// A directory entry the podman layout implies but does not store.
    fn ensure_dir(&mut self, path: &[u8], mode: u32) -> Result<()> {
        if path == CKA_ROOTFS_DIR.as_bytes() {
            if self.seen_rootfs_dir {
                return Ok(());
            }
            self.seen_rootfs_dir = true;
        }
        self.add_entry(Entry {
            path: path.to_vec(),
            kind: EntryKind::Dir as i32,
            mode,
            ..Default::default()
        })?;
        Ok(())
    }

    fn add_entry(&mut self, entry: Entry) -> Result<u64> {
        match self.writer.as_deref_mut() {
            Some(w) => w.add_entry(entry),
            None => Ok(0),
        }
    }

    fn import_rootfs(
        &mut self,
        outer: &mut tar::Entry<impl Read>,
        base: u64,
        stats: &mut ImportStats,
    ) -> Result<()> {
        match self.seek_file.as_ref().map(File::try_clone) {
            Some(file) => {
                let region = Region {
                    file: file.map_err(|e| read_err("rootfs-diff.tar", e))?,
                    start: base,
                    len: outer.size(),
                    pos: 0,
                };
                self.walk_rootfs(tar::Archive::new(BufReader::new(region)), true, base, stats)
            }
            None => self.walk_rootfs(tar::Archive::new(NoSeek(outer)), false, base, stats),
        }
    }

    fn walk_rootfs<R: Read + Seek>(
        &mut self,
        mut inner: tar::Archive<R>,
        seek: bool,
        base: u64,
        stats: &mut ImportStats,
    ) -> Result<()> {
        let members = if seek {
            inner.entries_with_seek()
        } else {
            inner.entries()
        };
        for member in members.map_err(|e| read_err("rootfs-diff.tar", e))? {
            let mut member = member.map_err(|e| read_err("rootfs-diff.tar member", e))?;
            let rel = member_path(&member)?;
            let path = [CKA_ROOTFS_DIR.as_bytes(), b"/", &rel].concat();
            let pos = base + member.raw_file_position();
            if let Some(c) = self.collect.as_deref_mut() {
                let kind = match member.header().entry_type() {
                    tar::EntryType::Directory => EntryKind::Dir,
                    tar::EntryType::Symlink => EntryKind::Symlink,
                    tar::EntryType::Link => EntryKind::Hardlink,
                    _ => EntryKind::File,
                };
                let target = member.link_name_bytes().unwrap_or_default();
                c.diff.push(crate::symlinks::DiffMember {
                    path: rel.clone(),
                    kind,
                    link_target: if kind == EntryKind::Hardlink {
                        trim_dir_slash(&target)
                    } else {
                        target.into_owned()
                    },
                });
            }
            self.rootfs_paths.insert(rel);
            self.add_member(
                &mut member,
                path,
                Some(CKA_ROOTFS_DIR.as_bytes()),
                pos,
                None,
                stats,
            )?;
            stats.rootfs_entries += 1;
        }
        Ok(())
    }

    /// Turns podman's deletions into overlay whiteouts under `rootfs/`; a deleted
    /// directory that the diff fills again becomes an opaque directory (podman's own
    /// restore would delete the new contents; the user meant to replace the old ones).
    fn add_deletions(&mut self, paths: &[String]) -> Result<()> {
        self.ensure_dir(CKA_ROOTFS_DIR.as_bytes(), 0o755)?;
        for p in paths {
            let rel = p.trim_start_matches('/').as_bytes().to_vec();
            if self.rootfs_paths.contains(&rel) {
                continue; // the diff itself provides this path; nothing to express
            }
            let mut inside = rel.clone();
            inside.push(b'/');
            let refilled = self.rootfs_paths.iter().any(|q| q.starts_with(&inside));
            let path = [CKA_ROOTFS_DIR.as_bytes(), b"/", &rel].concat();
            let entry = if refilled {
                Entry {
                    path,
                    kind: EntryKind::Dir as i32,
                    mode: 0o755,
                    xattrs: vec![Xattr {
                        name: b"trusted.overlay.opaque".to_vec(),
                        value: b"y".to_vec(),
                    }],
                    ..Default::default()
                }
            } else {
                Entry {
                    path,
                    kind: EntryKind::CharDevice as i32,
                    ..Default::default()
                }
            };
            self.rootfs_paths.insert(rel);
            self.add_entry(entry)?;
        }
        Ok(())
    }

    fn add_member(
        &mut self,
        member: &mut tar::Entry<impl Read>,
        path: Vec<u8>,
        link_prefix: Option<&[u8]>,
        data_pos: u64,
        prefetched: Option<Vec<u8>>,
        stats: &mut ImportStats,
    ) -> Result<()> {
        if self.stop.requested() {
            return Err(Error::interrupted("importing"));
        }
        let h = member.header();
        let kind = match h.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => EntryKind::Hardlink,
            tar::EntryType::Char => EntryKind::CharDevice,
            tar::EntryType::Block => EntryKind::BlockDevice,
            tar::EntryType::Fifo => EntryKind::Fifo,
            // Podman's tars hold nothing else; pax/GNU extensions are consumed by the reader.
            other => {
                return Err(bad(format!(
                    "{}: unsupported tar member type {:?}",
                    String::from_utf8_lossy(&path),
                    other
                )))
            }
        };
        if link_prefix.is_none() && !matches!(kind, EntryKind::File | EntryKind::Dir) {
            // podman extracts these members into the container's bundle directory,
            // where a link would redirect what podman later writes or bind-mounts there.
            return Err(Error::UnsafeEntry(format!(
                "podman archive member {} is a {}; podman exports hold only files and directories outside rootfs-diff.tar",
                String::from_utf8_lossy(&path),
                kind.name()
            )));
        }
        let size = member.size();
        let mut entry = Entry {
            path: path.clone(),
            kind: kind as i32,
            mode: h.mode().map_err(|e| read_err("mode", e))? & 0o7777,
            uid: h
                .uid()
                .map_err(|e| read_err("uid", e))?
                .try_into()
                .unwrap_or(u32::MAX),
            gid: h
                .gid()
                .map_err(|e| read_err("gid", e))?
                .try_into()
                .unwrap_or(u32::MAX),
            mtime_ns: (h.mtime().map_err(|e| read_err("mtime", e))? as i64)
                .saturating_mul(1_000_000_000),
            size: if kind == EntryKind::File { size } else { 0 },
            ..Default::default()
        };
        if matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
            entry.rdev_major = h.device_major().ok().flatten().unwrap_or(0);
            entry.rdev_minor = h.device_minor().ok().flatten().unwrap_or(0);
        }
        if matches!(kind, EntryKind::Symlink | EntryKind::Hardlink) {
            let target = member
                .link_name_bytes()
                .ok_or_else(|| {
                    bad(format!(
                        "{}: link without a target",
                        String::from_utf8_lossy(&path)
                    ))
                })?
                .into_owned();
            entry.link_target = if kind == EntryKind::Hardlink {
                let target = trim_dir_slash(&target);
                validate_path(&target)?;
                match link_prefix {
                    Some(prefix) => [prefix, b"/", &target].concat(),
                    None => cka_name_of(&String::from_utf8_lossy(&target))
                        .map(String::into_bytes)
                        .ok_or_else(|| bad("hard link to rootfs-diff.tar"))?,
                }
            } else {
                target
            };
        }
        if let Some(exts) = member
            .pax_extensions()
            .map_err(|e| read_err("pax header", e))?
        {
            for ext in exts {
                let ext = ext.map_err(|e| read_err("pax record", e))?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    entry.xattrs.push(Xattr {
                        name: name.to_vec(),
                        value: ext.value_bytes().to_vec(),
                    });
                } else if key == b"mtime" {
                    if let Some(ns) = parse_pax_time(ext.value_bytes()) {
                        entry.mtime_ns = ns;
                    }
                }
            }
        }
        let id = self.add_entry(entry)?;
        stats.entries += 1;
        let Some(writer) = self.writer.as_deref_mut() else {
            return Ok(()); // checking only: the tar reader skips the data
        };
        if kind != EntryKind::File || size == 0 {
            return Ok(());
        }
        if let Some(data) = prefetched {
            writer.add_data(id, 0, data, None)?;
            stats.bytes += size;
            return Ok(());
        }
        let chunk = writer.options().chunk_size as u64;
        let mut off = 0u64;
        while off < size {
            if self.stop.requested() {
                return Err(Error::interrupted("importing"));
            }
            let len = chunk.min(size - off) as usize;
            let mut buf = vec![0u8; len];
            member
                .read_exact(&mut buf)
                .map_err(|e| read_err(&String::from_utf8_lossy(&path), e))?;
            let clone = self.clone.as_ref().map(|f| (f.clone(), data_pos + off));
            writer.add_data(id, off, buf, clone)?;
            off += len as u64;
        }
        stats.bytes += size;
        Ok(())
    }
}

/// A reader that cannot seek, for the tar reader's non-seeking path.
struct NoSeek<R>(R);

impl<R: Read> Read for NoSeek<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R> Seek for NoSeek<R> {
    fn seek(&mut self, _: SeekFrom) -> io::Result<u64> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "not seekable"))
    }
}

/// `len` bytes of `file` from `start` (a nested tar), readable and seekable on its own.
struct Region {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for Region {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got =
            std::os::unix::fs::FileExt::read_at(&self.file, &mut buf[..n], self.start + self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for Region {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

fn trim_dir_slash(p: &[u8]) -> Vec<u8> {
    p.strip_suffix(b"/").unwrap_or(p).to_vec()
}

/// The member's path, validated: relative, no `..`, `.` or empty components.
fn member_path(member: &tar::Entry<impl Read>) -> Result<Vec<u8>> {
    let raw = member.path_bytes();
    let p = trim_dir_slash(raw.strip_prefix(b"./").unwrap_or(&raw));
    validate_path(&p).map_err(|e| match e {
        Error::UnsafeEntry(m) => Error::UnsafeEntry(format!("podman archive: {m}")),
        other => other,
    })?;
    Ok(p)
}

/// A pax time `SECS[.FRACTION]` in nanoseconds.
fn parse_pax_time(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nanos: i64 = digits.parse().ok()?;
    // A time past the nanosecond range is refused, not wrapped (found by the
    // podman_import fuzz target: `9223372036854775807.5` overflowed).
    secs.checked_mul(1_000_000_000)?
        .checked_add(if secs < 0 { -nanos } else { nanos })
}

/// The `name` field of a podman `config.dump`.
pub fn container_name(config_dump: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(config_dump)
        .ok()?
        .get("name")?
        .as_str()
        .map(String::from)
}

/// The container ID in a podman `config.dump` (64 hex digits), if it has one.
pub fn container_id(config_dump: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(config_dump)
        .ok()?
        .get("id")?
        .as_str()
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::parse_pax_time;

    #[test]
    fn pax_times_parse_and_refuse_what_does_not_fit() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some(1_700_000_000_500_000_000)
        );
        assert_eq!(parse_pax_time(b"-1.25"), Some(-1_250_000_000));
        assert_eq!(parse_pax_time(b"42"), Some(42_000_000_000));
        // Found by the podman_import fuzz target: an add that overflowed.
        assert_eq!(parse_pax_time(b"9223372036854775807.5"), None);
        assert_eq!(parse_pax_time(b"-9223372036854775808.5"), None);
        assert_eq!(parse_pax_time(b"1.-5"), None);
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
