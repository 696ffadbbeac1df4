//! How two checkpoints differ: processes added and gone, command lines, open files and
//! sockets, and memory — pages compared by the digests of their chunks in the two
//! indexes, so no page is read.

use std::collections::{BTreeMap, HashSet};

use ckstream_format::ArchiveReader;
use serde::Serialize;

use crate::inspect::{Inspection, OpenFile, Process};
use crate::IMAGES_PREFIX;

/// A process, briefly.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessBrief {
    /// Process id.
    pub pid: u32,
    /// Kernel name.
    pub comm: String,
    /// Command line, when it was read.
    pub cmdline: Option<Vec<String>>,
}

impl From<&Process> for ProcessBrief {
    fn from(p: &Process) -> Self {
        ProcessBrief {
            pid: p.pid,
            comm: p.comm.clone(),
            cmdline: p.cmdline.clone(),
        }
    }
}

/// What changed in a process present in both checkpoints.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessChange {
    /// Process id.
    pub pid: u32,
    /// Kernel name (in the second checkpoint).
    pub comm: String,
    /// The command line before and after, when it changed.
    pub cmdline: Option<(Vec<String>, Vec<String>)>,
    /// Descriptors opened since (or replaced by another file).
    pub files_added: Vec<OpenFile>,
    /// Descriptors closed since (or replaced).
    pub files_gone: Vec<OpenFile>,
    /// Memory maps (`start-end perms kind file`) added and gone.
    pub maps_added: Vec<String>,
    /// See `maps_added`.
    pub maps_gone: Vec<String>,
    /// Bytes of dumped memory in the first and the second checkpoint.
    pub memory_bytes: (u64, u64),
    /// Bytes of the second checkpoint's memory in chunks the first does not hold
    /// (by digest): an upper bound of the memory that changed, at chunk granularity.
    pub memory_changed_bytes: u64,
}

impl ProcessChange {
    /// True when nothing but unchanged memory was found.
    pub fn is_empty(&self) -> bool {
        self.cmdline.is_none()
            && self.files_added.is_empty()
            && self.files_gone.is_empty()
            && self.maps_added.is_empty()
            && self.maps_gone.is_empty()
            && self.memory_changed_bytes == 0
            && self.memory_bytes.0 == self.memory_bytes.1
    }
}

/// How two checkpoints' process trees differ.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Diff {
    /// In the second only.
    pub processes_added: Vec<ProcessBrief>,
    /// In the first only.
    pub processes_gone: Vec<ProcessBrief>,
    /// In both, with a difference.
    pub processes_changed: Vec<ProcessChange>,
}

/// What identifies an open descriptor across two checkpoints (a file position moving
/// does not make it another file).
fn file_key(f: &OpenFile) -> String {
    let sock = f
        .socket
        .as_ref()
        .map(|s| format!(" {} {} {} {:?}", s.family, s.kind, s.local, s.remote))
        .unwrap_or_default();
    format!(
        "{} {} {}{sock}",
        f.fd,
        f.kind,
        f.path.as_deref().unwrap_or("")
    )
}

fn map_key(v: &crate::inspect::Vma) -> String {
    format!(
        "{:x}-{:x} {} {} {}",
        v.start,
        v.end,
        v.perms,
        v.kind,
        v.file.as_deref().unwrap_or("")
    )
}

/// The digests of the chunks of each process's page image, by pid.
fn page_digests(
    reader: &ArchiveReader,
    inspection: &Inspection,
) -> BTreeMap<u32, Vec<(Vec<u8>, u64)>> {
    let mut out = BTreeMap::new();
    for p in &inspection.processes {
        let Some(image) = &p.memory.pages_image else {
            continue;
        };
        let path = format!("{IMAGES_PREFIX}/{image}");
        if let Some(i) = reader.find(path.as_bytes()) {
            let chunks = reader
                .chunks_of(i)
                .iter()
                .map(|c| (c.digest.clone(), u64::from(c.raw_len)))
                .collect();
            out.insert(p.pid, chunks);
        }
    }
    out
}

/// Compares checkpoint `a` (inspected as `ia`) with `b` (`ib`).
pub fn diff(a: &ArchiveReader, ia: &Inspection, b: &ArchiveReader, ib: &Inspection) -> Diff {
    let by_pid = |i: &Inspection| -> BTreeMap<u32, Process> {
        i.processes.iter().map(|p| (p.pid, p.clone())).collect()
    };
    let (pa, pb) = (by_pid(ia), by_pid(ib));
    let (da, db) = (page_digests(a, ia), page_digests(b, ib));
    let mut out = Diff::default();
    for (pid, p) in &pb {
        let Some(old) = pa.get(pid) else {
            out.processes_added.push(p.into());
            continue;
        };
        let keys = |files: &[OpenFile]| -> BTreeMap<String, OpenFile> {
            files.iter().map(|f| (file_key(f), f.clone())).collect()
        };
        let (fa, fb) = (keys(&old.files), keys(&p.files));
        let maps = |p: &Process| -> Vec<String> { p.memory.vmas.iter().map(map_key).collect() };
        let (ma, mb): (HashSet<String>, Vec<String>) = (maps(old).into_iter().collect(), maps(p));
        let mb_set: HashSet<&String> = mb.iter().collect();
        let old_digests: HashSet<&[u8]> = da
            .get(pid)
            .map(|v| v.iter().map(|(d, _)| d.as_slice()).collect())
            .unwrap_or_default();
        let changed = db.get(pid).map_or(0, |v| {
            v.iter()
                .filter(|(d, _)| !old_digests.contains(d.as_slice()))
                .map(|(_, n)| n)
                .sum()
        });
        let change = ProcessChange {
            pid: *pid,
            comm: p.comm.clone(),
            cmdline: match (&old.cmdline, &p.cmdline) {
                (Some(x), Some(y)) if x != y => Some((x.clone(), y.clone())),
                _ => None,
            },
            files_added: fb
                .iter()
                .filter(|(k, _)| !fa.contains_key(*k))
                .map(|(_, f)| f.clone())
                .collect(),
            files_gone: fa
                .iter()
                .filter(|(k, _)| !fb.contains_key(*k))
                .map(|(_, f)| f.clone())
                .collect(),
            maps_added: mb.iter().filter(|m| !ma.contains(*m)).cloned().collect(),
            maps_gone: maps(old)
                .into_iter()
                .filter(|m| !mb_set.contains(m))
                .collect(),
            memory_bytes: (old.memory.dumped_bytes, p.memory.dumped_bytes),
            memory_changed_bytes: changed,
        };
        if !change.is_empty() {
            out.processes_changed.push(change);
        }
    }
    out.processes_gone = pa
        .iter()
        .filter(|(pid, _)| !pb.contains_key(pid))
        .map(|(_, p)| p.into())
        .collect();
    out
}
