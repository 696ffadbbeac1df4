//! What a checkpoint holds — processes, command lines, open files and sockets, mounts,
//! memory maps, CRIU's statistics — read from the archive's index and CRIU's small
//! metadata images alone, never from the page images (except the few pages holding a
//! command line or environment, when asked for, or the memory asked for).
//!
//! [`inspect`] decodes `criu/*.img` with CRIU's own definitions ([`crate::images`]);
//! an image it does not decode is listed by name and size. An image that does not
//! decode is a corrupt archive ([`ckstream_format::Error::Corrupt`], naming it).

use std::collections::{BTreeMap, HashMap};

use ckstream_format::ArchiveReader;
use prost::Message;
use serde::Serialize;

use crate::error::{CriuError, Result};
use crate::images::criu_pb::{
    CoreEntry, FdTypes, FdinfoEntry, FileEntry, FsEntry, InetSkEntry, InventoryEntry, MmEntry,
    MntEntry, PagemapEntry, PagemapHead, PstreeEntry, TaskKobjIdsEntry, UnixSkEntry, VmaEntry,
};
use crate::images::{image_messages, PE_LAZY, PE_PARENT, PE_PRESENT};
use crate::stats::DumpStats;
use crate::IMAGES_PREFIX;

/// What to read beyond the metadata images.
#[derive(Debug, Clone, Copy, Default)]
pub struct InspectOptions {
    /// Read each process's command line from its memory (one or two pages).
    pub cmdline: bool,
    /// Read each process's environment from its memory.
    pub environment: bool,
}

/// A checkpoint's CRIU side, as [`inspect`] found it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Inspection {
    /// Every CRIU image: name, size, and whether ckstream decoded it.
    pub images: Vec<ImageSummary>,
    /// `inventory.img`.
    pub inventory: Option<Inventory>,
    /// The process tree, in `pstree.img` order (the root first).
    pub processes: Vec<Process>,
    /// The mount points (`mountpoints-*.img`, dumps of a mount namespace only).
    pub mounts: Vec<Mount>,
    /// CRIU's `stats-dump`, when the archive holds it (podman checkpoints do).
    pub stats: Option<Stats>,
    /// Bytes of memory pages in the page images.
    pub memory_bytes: u64,
}

/// One CRIU image file.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    /// File name (`core-42.img`).
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// False for an image ckstream lists but does not decode.
    pub decoded: bool,
}

/// `inventory.img`: what CRIU made the dump with.
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    /// CRIU's image format version.
    pub image_version: u32,
    /// The host's uptime at dump time, in microseconds (CRIU's `dump_uptime`).
    pub dump_uptime_us: Option<u64>,
    /// The Linux security module CRIU saw (`none`, `selinux`, `apparmor`).
    pub lsm: Option<String>,
    /// CRIU's id of the dump run.
    pub criu_run_id: Option<String>,
    /// The network was locked with this method (iptables, nftables, skip).
    pub network_lock: Option<String>,
}

/// One process of the tree.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Process {
    /// Process id (restored unchanged).
    pub pid: u32,
    /// Parent's pid (0 for the root).
    pub ppid: u32,
    /// Process group.
    pub pgid: u32,
    /// Session.
    pub sid: u32,
    /// Thread ids (the first is the pid).
    pub threads: Vec<u32>,
    /// The kernel's name of the process (`comm`, at most 15 bytes).
    pub comm: String,
    /// alive, stopped, zombie, dead, helper.
    pub state: String,
    /// The command line, from the process's memory (with [`InspectOptions::cmdline`]).
    pub cmdline: Option<Vec<String>>,
    /// The environment, from the process's memory (with [`InspectOptions::environment`]).
    pub environment: Option<Vec<String>>,
    /// The executable.
    pub exe: Option<String>,
    /// Working directory.
    pub cwd: Option<String>,
    /// Root directory.
    pub root: Option<String>,
    /// Open file descriptors, by fd.
    pub files: Vec<OpenFile>,
    /// Memory maps and how many pages of each the checkpoint holds.
    pub memory: Memory,
}

/// One open file descriptor.
#[derive(Debug, Clone, Serialize)]
pub struct OpenFile {
    /// The descriptor number.
    pub fd: u32,
    /// file, pipe, fifo, unix, inet, eventfd, eventpoll, signalfd, tty, memfd, …
    pub kind: String,
    /// Path (files, fifos, memfds, a unix socket's bound name) or a description.
    pub path: Option<String>,
    /// r, w or rw, from the open flags.
    pub mode: Option<String>,
    /// File position (regular files).
    pub position: Option<u64>,
    /// For a pipe: the pipe's id (both ends share it).
    pub pipe_id: Option<u32>,
    /// For a socket: its addresses and state.
    pub socket: Option<Socket>,
}

/// A socket's family, type, state and addresses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Socket {
    /// unix, inet, inet6.
    pub family: String,
    /// stream, dgram, seqpacket, raw.
    pub kind: String,
    /// listen, established, close, … (TCP states; unix sockets' own).
    pub state: String,
    /// Local address (`127.0.0.1:8080`, a unix path, `@abstract`).
    pub local: String,
    /// Remote address for connected sockets.
    pub remote: Option<String>,
    /// Listen backlog.
    pub backlog: Option<u32>,
}

/// A process's memory.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// Memory maps in address order.
    pub vmas: Vec<Vma>,
    /// Bytes of pages the checkpoint holds for the process (in its page image).
    pub dumped_bytes: u64,
    /// Of those, bytes a lazy restore may bring in after the process runs.
    pub lazy_bytes: u64,
    /// Bytes CRIU recorded as held by a parent image (`criu dump --prev-images-dir`).
    pub parent_bytes: u64,
    /// The page image holding them (`pages-<id>.img`).
    pub pages_image: Option<String>,
}

/// One memory map.
#[derive(Debug, Clone, Serialize)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `rwxp` / `rw-s` as in /proc/PID/maps.
    pub perms: String,
    /// anon, file, heap, stack, vdso, vvar, vsyscall, sysvipc, socket, memfd, aio.
    pub kind: String,
    /// The mapped file, for file maps.
    pub file: Option<String>,
    /// Bytes of this map's pages the checkpoint holds.
    pub dumped_bytes: u64,
}

/// One mount point.
#[derive(Debug, Clone, Serialize)]
pub struct Mount {
    /// CRIU's mount id.
    pub id: u32,
    /// Parent mount id.
    pub parent: u32,
    /// Where it is mounted.
    pub mountpoint: String,
    /// Root of the mount within its file system.
    pub root: String,
    /// Source (device, or what the file system reports).
    pub source: String,
    /// File system type name (as recorded; CRIU's number when it has no name).
    pub fstype: String,
    /// Mount options.
    pub options: String,
}

/// CRIU's own statistics of the dump (`stats-dump`), times in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Freezing the tree.
    pub freezing_time_us: u32,
    /// The tree stayed frozen.
    pub frozen_time_us: u32,
    /// Collecting memory.
    pub memdump_time_us: u32,
    /// Writing memory.
    pub memwrite_time_us: u32,
    /// Pages scanned.
    pub pages_scanned: u64,
    /// Pages skipped as in a parent image.
    pub pages_skipped_parent: u64,
    /// Pages written.
    pub pages_written: u64,
    /// Pages left for a lazy restore.
    pub pages_lazy: u64,
}

impl From<&DumpStats> for Stats {
    fn from(s: &DumpStats) -> Self {
        Stats {
            freezing_time_us: s.freezing_time,
            frozen_time_us: s.frozen_time,
            memdump_time_us: s.memdump_time,
            memwrite_time_us: s.memwrite_time,
            pages_scanned: s.pages_scanned,
            pages_skipped_parent: s.pages_skipped_parent,
            pages_written: s.pages_written,
            pages_lazy: s.pages_lazy,
        }
    }
}

/// The CRIU images of an archive: name (without the `criu/` prefix) → entry index.
fn criu_images(reader: &ArchiveReader) -> BTreeMap<String, usize> {
    let prefix = format!("{IMAGES_PREFIX}/");
    reader
        .entries()
        .iter()
        .enumerate()
        .filter(|(_, e)| e.entry_kind() == ckstream_format::EntryKind::File)
        .filter_map(|(i, e)| {
            let name = e.path.strip_prefix(prefix.as_bytes())?;
            (!name.contains(&b'/')).then(|| (String::from_utf8_lossy(name).into_owned(), i))
        })
        .collect()
}

/// The CRIU images of an archive by name, with the bytes of those read ahead.
struct Images<'r> {
    reader: &'r ArchiveReader,
    by_name: BTreeMap<String, usize>,
    fetched: HashMap<usize, Vec<u8>>,
}

/// Metadata read ahead in one batch at most (more is read image by image).
const PREFETCH_LIMIT: u64 = 64 << 20;

impl<'r> Images<'r> {
    fn new(reader: &'r ArchiveReader) -> Self {
        Images {
            reader,
            by_name: criu_images(reader),
            fetched: HashMap::new(),
        }
    }

    /// Reads every image [`inspect`] decodes with one batch of reads (an object store
    /// then serves neighbouring chunks in one request, and the rest in parallel),
    /// every chunk verified.
    fn prefetch(&mut self) -> Result<()> {
        let reader = self.reader;
        let wanted: Vec<usize> = self
            .by_name
            .iter()
            .filter(|(name, _)| is_decoded(name))
            .map(|(_, &i)| i)
            .collect();
        let total: u64 = wanted.iter().map(|&i| reader.entries()[i].size).sum();
        if total > PREFETCH_LIMIT {
            return Ok(());
        }
        let chunks: Vec<ckstream_format::Chunk> = wanted
            .iter()
            .flat_map(|&i| reader.chunks_of(i).iter().cloned())
            .collect();
        let mut stored = reader.read_stored_many(&chunks)?.into_iter();
        for &i in &wanted {
            let e = &reader.entries()[i];
            let mut bytes = vec![0u8; e.size as usize];
            for c in reader.chunks_of(i) {
                let data = ckstream_format::reader::decode_chunk(
                    e,
                    c,
                    stored.next().expect("one per chunk"),
                )?;
                let place = bytes
                    .get_mut(c.file_offset as usize..c.file_end() as usize)
                    .filter(|p| p.len() == data.len())
                    .ok_or_else(|| {
                        ckstream_format::Error::Corrupt(format!(
                            "{}: a chunk outside the file",
                            e.path_lossy()
                        ))
                    })?;
                place.copy_from_slice(&data);
            }
            self.fetched.insert(i, bytes);
        }
        Ok(())
    }

    /// The entry of image `name`.
    fn entry(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The bytes of image `name` (verified), if the archive has it.
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let Some(i) = self.entry(name) else {
            return Ok(None);
        };
        match self.fetched.get(&i) {
            Some(b) => Ok(Some(b.clone())),
            None => read_image(self.reader, name, i).map(Some),
        }
    }
}

/// A corrupt CRIU image inside an archive whose chunks all verified: a bad archive.
fn bad_image(name: &str, why: impl std::fmt::Display) -> CriuError {
    CriuError::Archive(ckstream_format::Error::Corrupt(format!(
        "CRIU image {name}: {why}"
    )))
}

/// Metadata images larger than this are refused rather than read into memory (CRIU's
/// own are kilobytes; a hostile index may claim anything).
const MAX_METADATA_IMAGE: u64 = 256 << 20;

/// The decoded messages of one image.
fn messages_of<M: Message + Default>(name: &str, bytes: &[u8]) -> Result<Vec<M>> {
    let (_, msgs) = image_messages(name, bytes).map_err(|e| bad_image(name, e))?;
    msgs.iter()
        .map(|m| M::decode(*m).map_err(|e| bad_image(name, e)))
        .collect()
}

fn one_message<M: Message + Default>(name: &str, bytes: &[u8]) -> Result<M> {
    messages_of::<M>(name, bytes)?
        .into_iter()
        .next()
        .ok_or_else(|| bad_image(name, "holds no entry"))
}

/// Reads the whole content of entry `i` (verified), refusing implausibly large images.
fn read_image(reader: &ArchiveReader, name: &str, i: usize) -> Result<Vec<u8>> {
    let size = reader.entries()[i].size;
    if size > MAX_METADATA_IMAGE {
        return Err(bad_image(
            name,
            format!("{size} bytes is not a metadata image"),
        ));
    }
    let mut out = Vec::with_capacity(size as usize);
    reader.copy_entry(i, &mut out)?;
    Ok(out)
}

/// Reads `len` bytes at `offset` of entry `i` (verified chunks only; holes as zeros).
///
/// # Errors
/// Archive errors; [`ckstream_format::Error::Corrupt`] for a range past the entry's end.
pub fn read_entry_range(
    reader: &ArchiveReader,
    i: usize,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>> {
    let entry = &reader.entries()[i];
    let end = offset
        .checked_add(len as u64)
        .filter(|&e| e <= entry.size)
        .ok_or_else(|| {
            ckstream_format::Error::Corrupt(format!(
                "{}: {len} bytes at {offset} lie past its end ({} bytes)",
                entry.path_lossy(),
                entry.size
            ))
        })?;
    let mut out = vec![0u8; len];
    for c in reader.chunks_of(i) {
        let (c_start, c_end) = (c.file_offset, c.file_end());
        if c_end <= offset || c_start >= end {
            continue;
        }
        let data = reader.read_chunk(entry, c)?;
        let from = offset.max(c_start);
        let to = end.min(c_end);
        out[(from - offset) as usize..(to - offset) as usize]
            .copy_from_slice(&data[(from - c_start) as usize..(to - c_start) as usize]);
    }
    Ok(out)
}

/// A process's pagemap: which page image holds its pages and where each run lies in it.
struct PageLayout {
    pages_id: u32,
    /// (first address, length in bytes, offset in the page image or None, flags).
    runs: Vec<(u64, u64, Option<u64>, u32)>,
}

impl PageLayout {
    fn parse(name: &str, bytes: &[u8]) -> Result<PageLayout> {
        let (_, msgs) = image_messages(name, bytes).map_err(|e| bad_image(name, e))?;
        let (head, entries) = msgs
            .split_first()
            .ok_or_else(|| bad_image(name, "no pagemap head"))?;
        let head = PagemapHead::decode(*head).map_err(|e| bad_image(name, e))?;
        let mut runs = Vec::with_capacity(entries.len());
        let mut at = 0u64;
        for m in entries {
            let e = PagemapEntry::decode(*m).map_err(|e| bad_image(name, e))?;
            let flags = e.pe_flags();
            let len = e.len();
            let offset = (flags & PE_PRESENT != 0).then_some(at);
            if offset.is_some() {
                at = at
                    .checked_add(len)
                    .ok_or_else(|| bad_image(name, "page runs overflow"))?;
            }
            runs.push((e.vaddr, len, offset, flags));
        }
        Ok(PageLayout {
            pages_id: head.pages_id,
            runs,
        })
    }

    /// Where `[addr, addr + len)` lies in the page image, when one present run holds it.
    fn locate(&self, addr: u64, len: u64) -> Option<u64> {
        self.runs.iter().find_map(|&(start, run_len, offset, _)| {
            let end = start.checked_add(run_len)?;
            (addr >= start && addr.checked_add(len)? <= end)
                .then(|| offset.map(|o| o + addr - start))?
        })
    }

    /// Bytes of pages within `[start, end)`, by where they are.
    fn bytes_in(&self, start: u64, end: u64) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.2.is_some())
            .map(|&(s, len, _, _)| overlap(s, s.saturating_add(len), start, end))
            .sum()
    }
}

fn overlap(a0: u64, a1: u64, b0: u64, b1: u64) -> u64 {
    a1.min(b1).saturating_sub(a0.max(b0))
}

/// A process's pagemap and the entry of the page image it points into (`None` when the
/// archive lacks that image: reading memory then fails, the rest is still inspected).
struct ProcessPages {
    layout: PageLayout,
    pages: Option<usize>,
}

impl ProcessPages {
    /// The pages of process `pid`; `None` when the checkpoint has no pagemap for it.
    fn of(images: &Images<'_>, pid: u32) -> Result<Option<ProcessPages>> {
        let Some(layout) = page_layout(images, pid)? else {
            return Ok(None);
        };
        let pages = images.entry(&format!("pages-{}.img", layout.pages_id));
        Ok(Some(ProcessPages { layout, pages }))
    }

    /// As [`ProcessPages::of`], an error when the process has no pagemap.
    fn required(images: &Images<'_>, pid: u32) -> Result<ProcessPages> {
        Self::of(images, pid)?.ok_or_else(|| {
            CriuError::Criu(format!("process {pid} has no pagemap in the checkpoint"))
        })
    }

    /// Reads `len` bytes of the process's memory at `addr`, run by run (a range may
    /// span several).
    fn read(&self, reader: &ArchiveReader, pid: u32, addr: u64, len: u64) -> Result<Vec<u8>> {
        let pages = self.pages()?;
        let mut out = Vec::with_capacity(len.min(1 << 30) as usize);
        let mut at = addr;
        let end = addr
            .checked_add(len)
            .ok_or_else(|| CriuError::Criu("address range overflows".into()))?;
        while at < end {
            let run = self
                .layout
                .runs
                .iter()
                .find(|&&(s, l, off, _)| off.is_some() && at >= s && at < s.saturating_add(l))
                .ok_or_else(|| {
                    CriuError::Criu(format!(
                        "address {at:#x} of process {pid} is not in the checkpoint's memory"
                    ))
                })?;
            let take = (run.0 + run.1).min(end) - at;
            let offset = self.layout.locate(at, take).expect("inside a present run");
            out.extend(read_entry_range(reader, pages, offset, take as usize)?);
            at += take;
        }
        Ok(out)
    }

    /// The entry of the page image.
    fn pages(&self) -> Result<usize> {
        self.pages
            .ok_or_else(|| bad_image(&format!("pages-{}.img", self.layout.pages_id), "missing"))
    }

    /// The range `[start, end)` as NUL-separated strings (a command line or an
    /// environment); `None` when its pages are not in the checkpoint (a lazy dump) or
    /// the range is empty or implausibly long.
    fn strings(
        &self,
        reader: &ArchiveReader,
        pid: u32,
        start: u64,
        end: u64,
    ) -> Option<Vec<String>> {
        if end <= start || end - start > 1 << 20 {
            return None;
        }
        self.read(reader, pid, start, end - start)
            .ok()
            .map(|b| split_nul(&b))
    }
}

/// Reads `len` bytes of process memory at `addr` from the checkpoint.
///
/// # Errors
/// [`CriuError::Criu`] when the process or the address is not in the checkpoint's page
/// images; archive errors.
pub fn read_memory(reader: &ArchiveReader, pid: u32, addr: u64, len: u64) -> Result<Vec<u8>> {
    ProcessPages::required(&Images::new(reader), pid)?.read(reader, pid, addr, len)
}

/// What [`search_memory`] looks for.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// These bytes.
    Bytes(Vec<u8>),
    /// A regular expression over bytes; a match is found when it is at most
    /// [`REGEX_SPAN`] bytes long.
    Regex(regex::bytes::Regex),
}

/// The longest match [`Pattern::Regex`] is sure to find (memory is searched in pieces
/// that overlap by this much).
pub const REGEX_SPAN: usize = 4096;

impl Pattern {
    /// Bytes a match can span: pieces overlap by this much less one.
    fn span(&self) -> usize {
        match self {
            Pattern::Bytes(b) => b.len().max(1),
            Pattern::Regex(_) => REGEX_SPAN,
        }
    }

    /// Offsets in `hay` where a match starts.
    fn starts(&self, hay: &[u8]) -> Vec<usize> {
        match self {
            Pattern::Bytes(needle) if needle.is_empty() => Vec::new(),
            Pattern::Bytes(needle) => hay
                .windows(needle.len())
                .enumerate()
                .filter(|(_, w)| w == needle)
                .map(|(k, _)| k)
                .collect(),
            Pattern::Regex(re) => re.find_iter(hay).map(|m| m.start()).collect(),
        }
    }
}

/// Addresses in process `pid`'s dumped memory where `pattern` matches (at most `limit`,
/// in address order), reading its page image run by run (every chunk verified).
///
/// # Errors
/// As [`read_memory`].
pub fn search_memory(
    reader: &ArchiveReader,
    pid: u32,
    pattern: &Pattern,
    limit: usize,
) -> Result<Vec<u64>> {
    const PIECE: u64 = 4 << 20;
    let process = ProcessPages::required(&Images::new(reader), pid)?;
    let (layout, pages) = (&process.layout, process.pages()?);
    let mut found = Vec::new();
    let overlap = pattern.span() as u64 - 1;
    for &(start, len, offset, _) in &layout.runs {
        let Some(offset) = offset else { continue };
        // Pieces overlap so that a match across two is seen; it counts in the piece
        // where it starts.
        let mut at = 0u64;
        while at < len {
            let take = (len - at).min(PIECE + overlap);
            let bytes = read_entry_range(reader, pages, offset + at, take as usize)?;
            let last = at + PIECE >= len;
            for k in pattern.starts(&bytes) {
                if !last && k as u64 >= PIECE {
                    break;
                }
                found.push(start + at + k as u64);
                if found.len() >= limit {
                    return Ok(found);
                }
            }
            at += PIECE;
        }
    }
    Ok(found)
}

fn page_layout(images: &Images<'_>, pid: u32) -> Result<Option<PageLayout>> {
    let name = format!("pagemap-{pid}.img");
    let Some(bytes) = images.read(&name)? else {
        return Ok(None);
    };
    PageLayout::parse(&name, &bytes).map(Some)
}

/// NUL-separated strings (a command line or an environment block).
fn split_nul(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn task_state(state: u32) -> &'static str {
    match state {
        1 => "alive",
        2 => "dead",
        3 => "stopped",
        4 => "helper",
        6 => "zombie",
        _ => "unknown",
    }
}

fn mode(flags: u32) -> String {
    match flags & 3 {
        0 => "r",
        1 => "w",
        _ => "rw",
    }
    .to_string()
}

fn socket_kind(t: u32) -> &'static str {
    match t {
        1 => "stream",
        2 => "dgram",
        3 => "raw",
        5 => "seqpacket",
        _ => "other",
    }
}

/// The kernel's TCP states (`include/net/tcp_states.h`); unix sockets use the same.
fn socket_state(s: u32) -> &'static str {
    match s {
        1 => "established",
        2 => "syn-sent",
        3 => "syn-recv",
        4 => "fin-wait1",
        5 => "fin-wait2",
        6 => "time-wait",
        7 => "close",
        8 => "close-wait",
        9 => "last-ack",
        10 => "listen",
        11 => "closing",
        _ => "unknown",
    }
}

fn inet_address(family: u32, words: &[u32], port: u32) -> String {
    const AF_INET6: u32 = 10;
    if family == AF_INET6 && words.len() == 4 {
        let mut b = [0u8; 16];
        for (k, w) in words.iter().enumerate() {
            b[4 * k..4 * k + 4].copy_from_slice(&w.to_ne_bytes());
        }
        format!("[{}]:{port}", std::net::Ipv6Addr::from(b))
    } else {
        let w = words.first().copied().unwrap_or(0);
        format!("{}:{port}", std::net::Ipv4Addr::from(w.to_ne_bytes()))
    }
}

fn inet_socket(s: &InetSkEntry) -> Socket {
    const AF_INET6: u32 = 10;
    let connected = s.dst_port != 0 || s.dst_addr.iter().any(|&w| w != 0);
    Socket {
        family: if s.family == AF_INET6 {
            "inet6"
        } else {
            "inet"
        }
        .into(),
        kind: socket_kind(s.r#type).into(),
        state: socket_state(s.state).into(),
        local: inet_address(s.family, &s.src_addr, s.src_port),
        remote: connected.then(|| inet_address(s.family, &s.dst_addr, s.dst_port)),
        backlog: (s.state == 10).then_some(s.backlog),
    }
}

fn unix_name(name: &[u8]) -> String {
    match name.split_first() {
        None => String::new(),
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
        Some(_) => String::from_utf8_lossy(name).into_owned(),
    }
}

fn unix_socket(s: &UnixSkEntry, peers: &HashMap<u32, UnixSkEntry>) -> Socket {
    // A unix socket's peer is named by inode: its bound name, if it has one.
    let remote = (s.peer != 0).then(|| {
        peers
            .get(&s.peer)
            .map(|p| unix_name(&p.name))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("socket:[{}]", s.peer))
    });
    Socket {
        family: "unix".into(),
        kind: socket_kind(s.r#type).into(),
        state: socket_state(s.state).into(),
        local: unix_name(&s.name),
        remote,
        backlog: (s.state == 10).then_some(s.backlog),
    }
}

/// Open files by CRIU's file id, as `files.img` records them.
struct Files {
    by_id: HashMap<u32, FileEntry>,
    unix_by_ino: HashMap<u32, UnixSkEntry>,
}

impl Files {
    fn path(&self, id: u32) -> Option<String> {
        let f = self.by_id.get(&id)?;
        f.reg.as_ref().map(|r| r.name.clone())
    }

    fn open_file(&self, fd: &FdinfoEntry) -> OpenFile {
        let kind = FdTypes::try_from(fd.r#type).unwrap_or(FdTypes::Und);
        let f = self.by_id.get(&fd.id);
        let mut out = OpenFile {
            fd: fd.fd,
            kind: kind_name(kind).into(),
            path: None,
            mode: None,
            position: None,
            pipe_id: None,
            socket: None,
        };
        let Some(f) = f else {
            return out;
        };
        if let Some(r) = &f.reg {
            out.path = Some(r.name.clone());
            out.mode = Some(mode(r.flags));
            out.position = Some(r.pos);
        }
        if let Some(p) = &f.pipe {
            out.pipe_id = Some(p.pipe_id);
            out.mode = Some(mode(p.flags));
            out.path = Some(format!("pipe:[{}]", p.pipe_id));
        }
        if let Some(p) = &f.fifo {
            out.pipe_id = Some(p.pipe_id);
            out.path = p.regf_id.and_then(|id| self.path(id));
        }
        if let Some(s) = &f.isk {
            out.socket = Some(inet_socket(s));
        }
        if let Some(s) = &f.usk {
            let sock = unix_socket(s, &self.unix_by_ino);
            out.path = (!sock.local.is_empty()).then(|| sock.local.clone());
            out.socket = Some(sock);
        }
        if let Some(t) = &f.tty {
            out.path = t.regf_id.and_then(|id| self.path(id));
            out.mode = Some(mode(t.flags));
        }
        if let Some(m) = &f.memfd {
            out.mode = Some(mode(m.flags));
            out.position = Some(m.pos);
        }
        out
    }
}

fn kind_name(t: FdTypes) -> &'static str {
    match t {
        FdTypes::Reg => "file",
        FdTypes::Pipe => "pipe",
        FdTypes::Fifo => "fifo",
        FdTypes::Inetsk => "inet",
        FdTypes::Unixsk => "unix",
        FdTypes::Eventfd => "eventfd",
        FdTypes::Eventpoll => "eventpoll",
        FdTypes::Inotify => "inotify",
        FdTypes::Signalfd => "signalfd",
        FdTypes::Packetsk => "packet",
        FdTypes::Tty => "tty",
        FdTypes::Fanotify => "fanotify",
        FdTypes::Netlinksk => "netlink",
        FdTypes::Ns => "namespace",
        FdTypes::Tunf => "tun",
        FdTypes::Ext => "external",
        FdTypes::Timerfd => "timerfd",
        FdTypes::Memfd => "memfd",
        FdTypes::Bpfmap => "bpfmap",
        FdTypes::Pidfd => "pidfd",
        _ => "other",
    }
}

fn vma_kind(v: &VmaEntry) -> &'static str {
    const REGULAR_KINDS: [(u32, &str); 12] = [
        (1 << 1, "stack"),
        (1 << 2, "vsyscall"),
        (1 << 3, "vdso"),
        (1 << 12, "vvar"),
        (1 << 5, "heap"),
        (1 << 10, "sysvipc"),
        (1 << 11, "socket"),
        (1 << 13, "aio"),
        (1 << 14, "memfd"),
        (1 << 6, "file"),
        (1 << 7, "file"),
        (1 << 8, "anon shared"),
    ];
    REGULAR_KINDS
        .iter()
        .find(|(bit, _)| v.status & bit != 0)
        .map_or("anon", |&(_, k)| k)
}

fn perms(v: &VmaEntry) -> String {
    const PROT_READ: u32 = 1;
    const PROT_WRITE: u32 = 2;
    const PROT_EXEC: u32 = 4;
    const MAP_SHARED: u32 = 1;
    let bit = |b: bool, c: char| if b { c } else { '-' };
    [
        bit(v.prot & PROT_READ != 0, 'r'),
        bit(v.prot & PROT_WRITE != 0, 'w'),
        bit(v.prot & PROT_EXEC != 0, 'x'),
        if v.flags & MAP_SHARED != 0 { 's' } else { 'p' },
    ]
    .iter()
    .collect()
}

/// Reads what a checkpoint holds (see the module documentation).
///
/// # Errors
/// [`ckstream_format::Error::Corrupt`] (inside [`CriuError::Archive`]) for a CRIU image
/// that does not decode, naming it; archive errors reading the images.
pub fn inspect(reader: &ArchiveReader, opts: InspectOptions) -> Result<Inspection> {
    let mut images = Images::new(reader);
    images.prefetch()?;
    let read = |name: &str| images.read(name);
    let mut out = Inspection::default();
    for (name, &i) in &images.by_name {
        let bytes = reader.entries()[i].size;
        if name.starts_with("pages-") {
            out.memory_bytes += bytes;
        }
        out.images.push(ImageSummary {
            name: name.clone(),
            bytes,
            decoded: is_decoded(name),
        });
    }
    if let Some(b) = read("inventory.img")? {
        let inv: InventoryEntry = one_message("inventory.img", &b)?;
        out.inventory = Some(Inventory {
            image_version: inv.img_version,
            dump_uptime_us: inv.dump_uptime,
            lsm: inv.lsmtype.map(|t| {
                match t {
                    0 => "none",
                    1 => "selinux",
                    2 => "apparmor",
                    _ => "other",
                }
                .to_string()
            }),
            criu_run_id: inv.dump_criu_run_id,
            network_lock: inv.network_lock_method.map(|m| {
                match m {
                    1 => "iptables",
                    2 => "nftables",
                    3 => "skip",
                    _ => "other",
                }
                .to_string()
            }),
        });
    }
    if let Some(b) = read("stats-dump")? {
        let stats: crate::images::criu_pb::StatsEntry = one_message("stats-dump", &b)?;
        out.stats = stats.dump.as_ref().map(Stats::from);
    }
    let files = match read("files.img")? {
        Some(b) => {
            let entries: Vec<FileEntry> = messages_of("files.img", &b)?;
            let unix_by_ino = entries
                .iter()
                .filter_map(|f| f.usk.as_ref().map(|u| (u.ino, u.clone())))
                .collect();
            Files {
                by_id: entries.into_iter().map(|f| (f.id, f)).collect(),
                unix_by_ino,
            }
        }
        None => Files {
            by_id: HashMap::new(),
            unix_by_ino: HashMap::new(),
        },
    };
    for name in images
        .by_name
        .keys()
        .filter(|n| n.starts_with("mountpoints-"))
    {
        let bytes = images.read(name)?.unwrap_or_default();
        for m in messages_of::<MntEntry>(name, &bytes)? {
            out.mounts.push(Mount {
                id: m.mnt_id,
                parent: m.parent_mnt_id,
                mountpoint: m.mountpoint,
                root: m.root,
                source: m.source,
                fstype: m.fsname.unwrap_or_else(|| format!("type {}", m.fstype)),
                options: m.options,
            });
        }
    }
    let tree: Vec<PstreeEntry> = match read("pstree.img")? {
        Some(b) => messages_of("pstree.img", &b)?,
        None => Vec::new(),
    };
    for p in tree {
        out.processes.push(process(&images, &files, &p, opts)?);
    }
    Ok(out)
}

/// True for the images [`inspect`] decodes.
fn is_decoded(name: &str) -> bool {
    let per_process = [
        "core-",
        "mm-",
        "ids-",
        "fs-",
        "pagemap-",
        "fdinfo-",
        "mountpoints-",
    ];
    matches!(
        name,
        "inventory.img" | "pstree.img" | "files.img" | "stats-dump"
    ) || (name.ends_with(".img")
        && per_process.iter().any(|p| name.starts_with(p))
        && !name.starts_with("pagemap-shmem-"))
}

fn process(
    images: &Images<'_>,
    files: &Files,
    p: &PstreeEntry,
    opts: InspectOptions,
) -> Result<Process> {
    let reader = images.reader;
    let read = |name: String| -> Result<Option<(String, Vec<u8>)>> {
        Ok(images.read(&name)?.map(|b| (name, b)))
    };
    let mut out = Process {
        pid: p.pid,
        ppid: p.ppid,
        pgid: p.pgid,
        sid: p.sid,
        threads: p.threads.clone(),
        ..Default::default()
    };
    let core = read(format!("core-{}.img", p.pid))?
        .map(|(n, b)| one_message::<CoreEntry>(&n, &b))
        .transpose()?;
    if let Some(tc) = core.as_ref().and_then(|c| c.tc.as_ref()) {
        out.comm = tc.comm.clone();
        out.state = task_state(tc.task_state).into();
    }
    let ids = match read(format!("ids-{}.img", p.pid))? {
        Some((n, b)) => Some(one_message::<TaskKobjIdsEntry>(&n, &b)?),
        None => core.as_ref().and_then(|c| c.ids),
    };
    if let Some((n, b)) = read(format!("fs-{}.img", p.pid))? {
        let fs: FsEntry = one_message(&n, &b)?;
        out.cwd = files.path(fs.cwd_id);
        out.root = files.path(fs.root_id);
    }
    if let Some(ids) = &ids {
        if let Some((n, b)) = read(format!("fdinfo-{}.img", ids.files_id))? {
            let mut fds: Vec<FdinfoEntry> = messages_of(&n, &b)?;
            fds.sort_by_key(|f| f.fd);
            out.files = fds.iter().map(|f| files.open_file(f)).collect();
        }
    }
    let pages = ProcessPages::of(images, p.pid)?;
    let layout = pages.as_ref().map(|p| &p.layout);
    if let Some((n, b)) = read(format!("mm-{}.img", p.pid))? {
        let mm: MmEntry = one_message(&n, &b)?;
        out.exe = files.path(mm.exe_file_id);
        for v in &mm.vmas {
            let file = (v.status & ((1 << 6) | (1 << 7)) != 0)
                .then(|| files.path(v.shmid as u32))
                .flatten();
            out.memory.vmas.push(Vma {
                start: v.start,
                end: v.end,
                perms: perms(v),
                kind: vma_kind(v).into(),
                file,
                dumped_bytes: layout.map_or(0, |l| l.bytes_in(v.start, v.end)),
            });
        }
        if let Some(pages) = &pages {
            if opts.cmdline {
                out.cmdline = pages.strings(reader, p.pid, mm.mm_arg_start, mm.mm_arg_end);
            }
            if opts.environment {
                out.environment = pages.strings(reader, p.pid, mm.mm_env_start, mm.mm_env_end);
            }
        }
    }
    if let Some(l) = layout {
        out.memory.pages_image = Some(format!("pages-{}.img", l.pages_id));
        for &(_, len, offset, flags) in &l.runs {
            if offset.is_some() {
                out.memory.dumped_bytes += len;
                if flags & PE_LAZY != 0 {
                    out.memory.lazy_bytes += len;
                }
            }
            if flags & PE_PARENT != 0 {
                out.memory.parent_bytes += len;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
