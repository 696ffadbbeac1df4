//! CRIU's images as ckstream reads them itself: to restore lazily (`pstree.img`, which
//! processes the tree has, and `pagemap-<pid>.img`, where each memory page lives in
//! `pages-<id>.img`) and to inspect a checkpoint ([`crate::inspect`]).
//!
//! An image is a magic (CRIU's common or service magic, then the image's own; only the
//! image's own for `inventory.img`), then entries, each a little-endian u32 length and a
//! protobuf message. The messages are CRIU's own definitions ([`criu_pb`], generated from
//! `proto/criu/*.proto`, MIT): an image from a newer CRIU still decodes (unknown fields
//! are skipped).

use prost::Message;

use crate::error::{CriuError, Result};

#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rustdoc::invalid_html_tags,
    rustdoc::broken_intra_doc_links
)]
pub mod criu_pb;

pub use criu_pb::{PagemapEntry, PagemapHead, PstreeEntry};

/// `IMG_COMMON_MAGIC`: the first word of every per-process image.
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// `IMG_SERVICE_MAGIC`: the first word of CRIU's service files (stats, irmap cache).
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// `INVENTORY_MAGIC`: the only magic word of `inventory.img`.
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;

/// The pages are in the parent image (an incremental dump).
pub const PE_PARENT: u32 = 1;
/// The pages may be restored lazily (private anonymous memory).
pub const PE_LAZY: u32 = 2;
/// The pages are in this dump's `pages-<id>.img`.
pub const PE_PRESENT: u32 = 4;

/// The page size CRIU images count in.
pub const PAGE_SIZE: u64 = 4096;

impl PagemapEntry {
    /// The `PE_*` bits, also for images older than the `flags` field.
    pub fn pe_flags(&self) -> u32 {
        match (self.flags, self.in_parent) {
            (Some(f), _) => f,
            (None, Some(true)) => PE_PARENT,
            (None, _) => PE_PRESENT,
        }
    }

    /// Bytes the entry covers.
    pub fn len(&self) -> u64 {
        u64::from(self.nr_pages) * PAGE_SIZE
    }

    /// True for an entry of no pages.
    pub fn is_empty(&self) -> bool {
        self.nr_pages == 0
    }
}

/// A parsed pagemap image: its magic, head and entries.
#[derive(Debug, Clone)]
pub struct Pagemap {
    magic: [u8; 8],
    /// Which pages file.
    pub head: PagemapHead,
    /// The entries in image order (ascending addresses).
    pub entries: Vec<PagemapEntry>,
}

/// Splits a per-process image into its magic and its length-prefixed messages.
fn messages<'a>(name: &str, bytes: &'a [u8]) -> Result<([u8; 8], Vec<&'a [u8]>)> {
    let bad = |why: &str| CriuError::Protocol(format!("{name}: {why}"));
    if bytes.len() < 8 || u32::from_le_bytes(bytes[..4].try_into().unwrap()) != IMG_COMMON_MAGIC {
        return Err(bad("not a CRIU image (magic)"));
    }
    let magic: [u8; 8] = bytes[..8].try_into().unwrap();
    Ok((magic, entries(name, &bytes[8..])?))
}

/// The image's own magic word and its messages, for any image with a magic: a
/// per-process or service image (two words) or the inventory (one).
///
/// # Errors
/// [`CriuError::Protocol`] naming the image when it has no magic or an entry runs past
/// its end.
pub fn image_messages<'a>(name: &str, bytes: &'a [u8]) -> Result<(u32, Vec<&'a [u8]>)> {
    let word = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let (magic, body) = match (word(0), word(4)) {
        (Some(INVENTORY_MAGIC), _) => (INVENTORY_MAGIC, &bytes[4..]),
        (Some(IMG_COMMON_MAGIC | IMG_SERVICE_MAGIC), Some(own)) => (own, &bytes[8..]),
        _ => {
            return Err(CriuError::Protocol(format!(
                "{name}: not a CRIU image (magic)"
            )))
        }
    };
    Ok((magic, entries(name, body)?))
}

/// Decodes every message of an image as `M`.
///
/// # Errors
/// As [`image_messages`]; [`CriuError::Protocol`] naming the image for a message that
/// does not decode.
pub fn decode_all<M: Message + Default>(name: &str, bytes: &[u8]) -> Result<Vec<M>> {
    let (_, msgs) = image_messages(name, bytes)?;
    msgs.iter().map(|m| decode(name, m)).collect()
}

/// The length-prefixed messages after an image's magic.
fn entries<'a>(name: &str, mut rest: &'a [u8]) -> Result<Vec<&'a [u8]>> {
    let bad = |why: &str| CriuError::Protocol(format!("{name}: {why}"));
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(bad("truncated entry length"));
        }
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        rest = &rest[4..];
        if rest.len() < len {
            return Err(bad("truncated entry"));
        }
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    Ok(out)
}

fn decode<M: Message + Default>(name: &str, msg: &[u8]) -> Result<M> {
    M::decode(msg).map_err(|e| CriuError::Protocol(format!("{name}: {e}")))
}

impl Pagemap {
    /// Parses the bytes of `pagemap-<pid>.img` (`name` is for errors).
    ///
    /// # Errors
    /// [`CriuError::Protocol`] for bytes that are not a pagemap image.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Pagemap> {
        let (magic, msgs) = messages(name, bytes)?;
        let Some((head, rest)) = msgs.split_first() else {
            return Err(CriuError::Protocol(format!("{name}: no pagemap head")));
        };
        Ok(Pagemap {
            magic,
            head: decode(name, head)?,
            entries: rest
                .iter()
                .map(|m| decode(name, m))
                .collect::<Result<_>>()?,
        })
    }

    /// The image bytes again, with `entries` as they are now.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        let mut put = |m: &dyn Fn(&mut Vec<u8>)| {
            let mut buf = Vec::new();
            m(&mut buf);
            out.extend_from_slice(&(buf.len() as u32).to_le_bytes());
            out.extend_from_slice(&buf);
        };
        put(&|b| self.head.encode(b).expect("a Vec grows"));
        for e in &self.entries {
            put(&|b| e.encode(b).expect("a Vec grows"));
        }
        out
    }
}

/// The processes of `pstree.img`.
///
/// # Errors
/// [`CriuError::Protocol`] for bytes that are not a pstree image.
pub fn parse_pstree(bytes: &[u8]) -> Result<Vec<PstreeEntry>> {
    let (_, msgs) = messages("pstree.img", bytes)?;
    msgs.iter().map(|m| decode("pstree.img", m)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(msgs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        out.extend_from_slice(&0x5617_3409u32.to_le_bytes());
        for m in msgs {
            out.extend_from_slice(&(m.len() as u32).to_le_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn a_pagemap_reads_back_and_rewrites_byte_for_byte() {
        let entry = |vaddr, nr_pages, flags| PagemapEntry {
            vaddr,
            nr_pages,
            in_parent: None,
            flags: Some(flags),
        };
        let bytes = image(&[
            PagemapHead { pages_id: 7 }.encode_to_vec(),
            entry(0x1000, 2, PE_PRESENT).encode_to_vec(),
            entry(0x7f00_0000, 300, PE_PRESENT | PE_LAZY).encode_to_vec(),
        ]);
        let map = Pagemap::parse("pagemap-1.img", &bytes).unwrap();
        assert_eq!(map.head.pages_id, 7);
        assert_eq!(map.entries.len(), 2);
        assert_eq!(map.entries[1].pe_flags(), PE_PRESENT | PE_LAZY);
        assert_eq!(map.entries[1].len(), 300 * 4096);
        assert_eq!(map.encode(), bytes);
    }

    #[test]
    fn old_entries_without_flags_and_bad_images() {
        let old = PagemapEntry {
            vaddr: 0,
            nr_pages: 1,
            in_parent: Some(true),
            flags: None,
        };
        assert_eq!(old.pe_flags(), PE_PARENT);
        assert!(Pagemap::parse("x", b"short").is_err());
        let mut bytes = image(&[PagemapHead { pages_id: 1 }.encode_to_vec()]);
        bytes.extend_from_slice(&100u32.to_le_bytes());
        assert!(Pagemap::parse("x", &bytes).is_err(), "truncated entry");
        let pstree = image(&[PstreeEntry {
            pid: 42,
            ppid: 1,
            pgid: 42,
            sid: 42,
            threads: vec![42, 43],
        }
        .encode_to_vec()]);
        let procs = parse_pstree(&pstree).unwrap();
        assert_eq!(procs[0].pid, 42);
        assert_eq!(procs[0].threads, vec![42, 43]);
    }
}
