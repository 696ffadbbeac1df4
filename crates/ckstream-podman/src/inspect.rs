//! What a container checkpoint in a `.cka` says about its container — name, image,
//! runtime, addresses (`podman/config.dump`, `podman/network.status`) — and which
//! paths of the container's file system it changed (`rootfs/`, the overlay upper
//! directory, from the index alone).

use ckstream_format::{ArchiveReader, EntryKind};
use serde::Serialize;
use serde_json::Value;

use crate::layout::{CKA_PODMAN_DIR, CKA_ROOTFS_DIR, CONFIG_DUMP};
use crate::Result;

/// The container a podman checkpoint was taken of.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Container {
    /// Container name.
    pub name: Option<String>,
    /// Container id.
    pub id: Option<String>,
    /// Image name (else its id).
    pub image: Option<String>,
    /// OCI runtime (`runc`, `crun`).
    pub runtime: Option<String>,
    /// When podman created the container (RFC 3339, as podman wrote it).
    pub created: Option<String>,
    /// Its IP addresses with prefix length, from `network.status`.
    pub addresses: Vec<String>,
}

/// Files larger than this under `podman/` are not read for a summary.
const MAX_JSON: u64 = 16 << 20;

/// The bytes of podman's bundle file `name` (`podman/NAME`: `config.dump`,
/// `stats-dump`, ...), when the archive has it and it is not implausibly large.
///
/// # Errors
/// Archive errors reading it.
pub fn bundle_file(reader: &ArchiveReader, name: &str) -> Result<Option<Vec<u8>>> {
    let path = format!("{CKA_PODMAN_DIR}/{name}");
    let Some(i) = reader.find(path.as_bytes()) else {
        return Ok(None);
    };
    if reader.entries()[i].size > MAX_JSON {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    reader.copy_entry(i, &mut bytes)?;
    Ok(Some(bytes))
}

fn read_json(reader: &ArchiveReader, name: &str) -> Result<Option<Value>> {
    Ok(bundle_file(reader, name)?.and_then(|b| serde_json::from_slice(&b).ok()))
}

/// Every `ipnet` string anywhere in `v` (podman 4's network status nests them under
/// network → interfaces → subnets).
fn ipnets(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x.as_str()) {
                    ("ipnet", Some(s)) => out.push(s.to_string()),
                    _ => ipnets(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| ipnets(x, out)),
        _ => {}
    }
}

/// The container of a podman checkpoint; `None` for an archive without
/// `podman/config.dump` (a process dump).
///
/// # Errors
/// Archive errors reading the bundle files.
pub fn container(reader: &ArchiveReader) -> Result<Option<Container>> {
    let Some(config) = read_json(reader, CONFIG_DUMP)? else {
        return Ok(None);
    };
    let s = |k: &str| {
        config[k]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(String::from)
    };
    let mut addresses = Vec::new();
    if let Some(net) = read_json(reader, "network.status")? {
        ipnets(&net, &mut addresses);
    }
    Ok(Some(Container {
        name: s("name"),
        id: s("id"),
        image: s("rootfsImageName").or_else(|| s("rootfsImageID")),
        runtime: s("runtime").or_else(|| s("ociRuntime")),
        created: s("createdTime"),
        addresses,
    }))
}

/// One changed path of the container's file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootfsChange {
    /// Absolute path in the container.
    pub path: String,
    /// `written` (added or modified: the upper layer holds it), `deleted`, or `opaque`
    /// (a directory whose lower content is hidden: deleted and made again).
    pub change: String,
    /// file, dir, symlink, …
    pub kind: String,
    /// Bytes of a written file.
    pub bytes: u64,
}

/// The changes a container checkpoint carries in `rootfs/`, in path order, from the
/// index alone. Empty for an archive without a rootfs diff.
pub fn rootfs_changes(reader: &ArchiveReader) -> Vec<RootfsChange> {
    let prefix = format!("{CKA_ROOTFS_DIR}/");
    reader
        .entries()
        .iter()
        .filter_map(|e| {
            let rel = e.path.strip_prefix(prefix.as_bytes())?;
            let path = format!("/{}", String::from_utf8_lossy(rel));
            let (change, bytes) = if ckstream_fs::is_whiteout(e) {
                ("deleted", 0)
            } else if ckstream_fs::is_opaque(e) {
                ("opaque", 0)
            } else if e.entry_kind() == EntryKind::Dir {
                // A directory of the upper layer that only holds changes below it.
                return None;
            } else {
                ("written", e.size)
            };
            Some(RootfsChange {
                path,
                change: change.into(),
                kind: if change == "deleted" {
                    "whiteout".into()
                } else {
                    e.entry_kind().name().into()
                },
                bytes,
            })
        })
        .collect()
}

/// How the container file system changes of two checkpoints differ.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RootfsDiff {
    /// Changed in the second checkpoint only.
    pub added: Vec<RootfsChange>,
    /// Changed in the first only (the second has the image's own again).
    pub removed: Vec<RootfsChange>,
    /// Changed in both, differently (as the second has it).
    pub modified: Vec<RootfsChange>,
}

/// What identifies a changed path's content: mode, size, link target and the digests of
/// its chunks (from the index: nothing is read).
#[derive(PartialEq)]
struct Fingerprint {
    mode: u32,
    size: u64,
    link_target: Vec<u8>,
    digests: Vec<Vec<u8>>,
}

fn fingerprint(reader: &ArchiveReader, path: &str) -> Option<Fingerprint> {
    let i = reader.find(format!("{CKA_ROOTFS_DIR}{path}").as_bytes())?;
    let e = &reader.entries()[i];
    Some(Fingerprint {
        mode: e.mode,
        size: e.size,
        link_target: e.link_target.clone(),
        digests: reader
            .chunks_of(i)
            .iter()
            .map(|c| c.digest.clone())
            .collect(),
    })
}

/// Compares the rootfs changes of checkpoint `a` with those of `b`.
pub fn rootfs_diff(a: &ArchiveReader, b: &ArchiveReader) -> RootfsDiff {
    use std::collections::BTreeMap;
    let by_path = |r: &ArchiveReader| -> BTreeMap<String, RootfsChange> {
        rootfs_changes(r)
            .into_iter()
            .map(|c| (c.path.clone(), c))
            .collect()
    };
    let (ca, cb) = (by_path(a), by_path(b));
    let mut out = RootfsDiff::default();
    for (path, c) in &cb {
        match ca.get(path) {
            None => out.added.push(c.clone()),
            Some(old) if old.change != c.change || fingerprint(a, path) != fingerprint(b, path) => {
                out.modified.push(c.clone());
            }
            Some(_) => {}
        }
    }
    out.removed = ca
        .into_iter()
        .filter(|(p, _)| !cb.contains_key(p))
        .map(|(_, c)| c)
        .collect();
    out
}
