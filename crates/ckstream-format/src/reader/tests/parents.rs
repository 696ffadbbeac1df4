//! Incremental archives in memory: a chain of three generations, each storing only what
//! changed, read back through its parents; parents that are missing, replaced or
//! rewritten are refused.

use std::sync::Arc;

use super::{entry, noise, options, CHUNK};
use crate::codec::Compression;
use crate::error::Error;
use crate::index::EntryKind;
use crate::parents::ParentChunks;
use crate::reader::ArchiveReader;
use crate::testutil::{open_in_memory, MemSink};
use crate::writer::{ArchiveWriter, WriteSummary, WriterOptions};

/// Writes files (path, content) in CHUNK pieces; returns the shard bytes and summary.
fn write(files: &[(&str, Vec<u8>)], opts: WriterOptions, id: u8) -> (Vec<u8>, WriteSummary) {
    let (sinks, boxed) = MemSink::many(1);
    let mut w = ArchiveWriter::new(boxed, opts, [id; 16], 0).unwrap();
    for (path, content) in files {
        let e = w
            .add_entry(entry(path, EntryKind::File, content.len() as u64))
            .unwrap();
        for (k, piece) in content.chunks(CHUNK).enumerate() {
            w.add_data(e, (k * CHUNK) as u64, piece.to_vec(), None)
                .unwrap();
        }
    }
    let summary = w.finish().unwrap();
    (sinks[0].take(), summary)
}

fn with_parent(compression: Compression, parent: &ArchiveReader, name: &str) -> WriterOptions {
    let chunks = ParentChunks::of_parent(parent, name.into(), &|g| Ok(g.to_string())).unwrap();
    WriterOptions {
        parents: Some(Arc::new(chunks)),
        ..options(compression)
    }
}

/// Opens `bytes` with `parents` (readers, in `Index::parents` order) attached.
fn open_chain(bytes: &[u8], parents: Vec<ArchiveReader>) -> crate::Result<ArchiveReader> {
    let mut r = open_in_memory(&[bytes.to_vec()])?;
    let named = parents
        .into_iter()
        .map(|p| (p, "memory".to_string()))
        .collect();
    r.attach_parents(named)?;
    Ok(r)
}

fn err(r: crate::Result<ArchiveReader>) -> Error {
    match r {
        Ok(_) => panic!("opened"),
        Err(e) => e,
    }
}

fn content(r: &ArchiveReader, path: &str) -> Vec<u8> {
    let i = r.find(path.as_bytes()).unwrap();
    let mut out = Vec::new();
    r.copy_entry(i, &mut out).unwrap();
    out
}

#[test]
fn a_chain_stores_only_new_chunks_and_reads_back_whole() {
    for compression in [Compression::NONE, Compression::zstd(1)] {
        let base = noise(11, 8 * CHUNK);
        let lib = noise(12, 2 * CHUNK);
        // Generation 1: the same library twice is stored once.
        let g1_files = vec![
            ("mem", base.clone()),
            ("lib-a", lib.clone()),
            ("lib-b", lib.clone()),
        ];
        let (g1, s1) = write(&g1_files, options(compression), 1);
        assert_eq!(s1.referenced_bytes, 2 * CHUNK as u64, "{compression}");
        let r1 = open_in_memory(std::slice::from_ref(&g1)).unwrap();
        assert_eq!(content(&r1, "lib-b"), lib);
        r1.verify(2, &Default::default()).unwrap();

        // Generation 2: one chunk of `mem` changed, a file added.
        let mut mem2 = base.clone();
        mem2[3 * CHUNK..4 * CHUNK].copy_from_slice(&noise(21, CHUNK));
        let g2_files = vec![
            ("mem", mem2.clone()),
            ("lib-a", lib.clone()),
            ("new", noise(22, CHUNK)),
        ];
        let (g2, s2) = write(&g2_files, with_parent(compression, &r1, "g1.cka"), 2);
        assert_eq!(s2.raw_bytes, 11 * CHUNK as u64);
        assert_eq!(s2.referenced_bytes, 9 * CHUNK as u64, "{compression}");
        let r1 = open_in_memory(std::slice::from_ref(&g1)).unwrap();
        let r2 = open_chain(&g2, vec![r1]).unwrap();
        assert_eq!(r2.index().parents.len(), 1);
        assert_eq!(r2.index().parents[0].location, "g1.cka");
        assert_eq!(content(&r2, "mem"), mem2);
        assert_eq!(r2.index().summary().parent_bytes, 9 * CHUNK as u64);
        let report = r2.verify(2, &Default::default()).unwrap();
        assert_eq!(report.raw_bytes, 11 * CHUNK as u64);

        // Generation 3 references both: chunks of g1 name g1 directly (archive 2).
        let mut mem3 = mem2.clone();
        mem3[0..CHUNK].copy_from_slice(&noise(31, CHUNK));
        let g3_files = vec![("mem", mem3.clone()), ("new", noise(22, CHUNK))];
        let (g3, s3) = write(&g3_files, with_parent(compression, &r2, "g2.cka"), 3);
        assert_eq!(s3.referenced_bytes, 8 * CHUNK as u64, "{compression}");
        let chain = |g1: &[u8], g2: &[u8]| {
            vec![
                open_in_memory(&[g2.to_vec()]).unwrap(),
                open_in_memory(&[g1.to_vec()]).unwrap(),
            ]
        };
        let r3 = open_chain(&g3, chain(&g1, &g2)).unwrap();
        let archives: std::collections::BTreeSet<u32> =
            r3.index().chunks.iter().map(|c| c.archive).collect();
        assert_eq!(archives, [0, 1, 2].into(), "{compression}");
        assert_eq!(content(&r3, "mem"), mem3);
        assert_eq!(content(&r3, "new"), noise(22, CHUNK));
        r3.verify(2, &Default::default()).unwrap();

        // Parents in the wrong order, or a parent replaced by another archive: refused.
        let swapped = vec![
            open_in_memory(std::slice::from_ref(&g1)).unwrap(),
            open_in_memory(std::slice::from_ref(&g2)).unwrap(),
        ];
        let e = err(open_chain(&g3, swapped));
        assert!(
            matches!(&e, Error::Corrupt(m) if m.contains("is another archive")),
            "{e}"
        );
        // The same id, rewritten: its index digest differs.
        let (g1_again, _) = write(&g1_files[..1], options(compression), 1);
        let e = err(open_chain(&g2, vec![open_in_memory(&[g1_again]).unwrap()]));
        assert!(
            matches!(&e, Error::Corrupt(m) if m.contains("another index")),
            "{e}"
        );
        // Without its parents a chunk stored there cannot be read.
        let alone = open_in_memory(std::slice::from_ref(&g3)).unwrap();
        let i = alone.find(b"new").unwrap();
        let mut out = Vec::new();
        assert!(alone.copy_entry(i, &mut out).is_err());
    }
}

#[test]
fn an_index_naming_a_parent_it_does_not_list_is_corrupt() {
    let (g1, _) = write(&[("a", noise(1, CHUNK))], options(Compression::NONE), 1);
    let r1 = open_in_memory(&[g1]).unwrap();
    // Written with the id the crafting helpers give their footers.
    let id = crate::testutil::CRAFTED_ID[0];
    let (g2, _) = write(
        &[("a", noise(1, CHUNK))],
        with_parent(Compression::NONE, &r1, "g1"),
        id,
    );
    let mut index = crate::testutil::read_index(&g2);
    assert_eq!(index.chunks[0].archive, 1);
    index.chunks[0].archive = 2;
    let mut bad = g2.clone();
    crate::testutil::rewrite_index(&mut bad, &index);
    let e = err(open_in_memory(&[bad]));
    assert!(
        matches!(&e, Error::Corrupt(m) if m.contains("parent archive 2 of 1")),
        "{e}"
    );
    let mut index = crate::testutil::read_index(&g2);
    index.parents[0].location = "../../etc/passwd".into();
    let mut bad = g2;
    crate::testutil::rewrite_index(&mut bad, &index);
    assert!(matches!(open_in_memory(&[bad]), Err(Error::UnsafeEntry(_))));
}

/// One change between two generations of a random tree.
#[derive(Debug, Clone)]
enum Edit {
    /// Rewrite `len` bytes of file `file` at `at` (both taken modulo its size).
    Overwrite {
        file: usize,
        at: usize,
        len: usize,
        seed: u64,
    },
    /// Append `len` new bytes to file `file`.
    Append { file: usize, len: usize, seed: u64 },
    /// Remove file `file`.
    Delete { file: usize },
    /// Add a new file of `len` bytes.
    Add { len: usize, seed: u64 },
    /// Cut file `file` to `keep` bytes (modulo its size).
    Truncate { file: usize, keep: usize },
}

fn edit_strategy() -> impl proptest::strategy::Strategy<Value = Edit> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..8usize, 0..6 * CHUNK, 1..2 * CHUNK, any::<u64>())
            .prop_map(|(file, at, len, seed)| Edit::Overwrite { file, at, len, seed }),
        1 => (0..8usize, 1..2 * CHUNK, any::<u64>())
            .prop_map(|(file, len, seed)| Edit::Append { file, len, seed }),
        1 => (0..8usize).prop_map(|file| Edit::Delete { file }),
        1 => (0..4 * CHUNK, any::<u64>()).prop_map(|(len, seed)| Edit::Add { len, seed }),
        1 => (0..8usize, 0..6 * CHUNK).prop_map(|(file, keep)| Edit::Truncate { file, keep }),
    ]
}

fn apply(files: &mut Vec<(String, Vec<u8>)>, edit: &Edit, names: &mut u32) {
    let pick = |files: &Vec<(String, Vec<u8>)>, file: usize| {
        (!files.is_empty()).then(|| file % files.len())
    };
    match *edit {
        Edit::Overwrite {
            file,
            at,
            len,
            seed,
        } => {
            if let Some(f) = pick(files, file) {
                let data = &mut files[f].1;
                if !data.is_empty() {
                    let at = at % data.len();
                    let len = len.min(data.len() - at);
                    data[at..at + len].copy_from_slice(&noise(seed, len));
                }
            }
        }
        Edit::Append { file, len, seed } => {
            if let Some(f) = pick(files, file) {
                files[f].1.extend_from_slice(&noise(seed, len));
            }
        }
        Edit::Delete { file } => {
            if let Some(f) = pick(files, file) {
                files.remove(f);
            }
        }
        Edit::Add { len, seed } => {
            *names += 1;
            files.push((format!("added-{names}"), noise(seed, len)));
        }
        Edit::Truncate { file, keep } => {
            if let Some(f) = pick(files, file) {
                let data = &mut files[f].1;
                let keep = if data.is_empty() {
                    0
                } else {
                    keep % data.len()
                };
                data.truncate(keep);
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Random trees edited at random over five generations, each written with the one
    /// before as its parent: every generation reads back exactly its own tree through
    /// the whole chain and verifies, a generation with no edits stores no chunk of its
    /// own, and the chunks a generation stores itself are never more than its edits
    /// touched.
    #[test]
    fn random_edits_over_a_five_deep_chain_read_back_exactly(
        sizes in proptest::collection::vec(0..6 * CHUNK, 1..5),
        generations in proptest::collection::vec(
            proptest::collection::vec(edit_strategy(), 0..5), 4),
        zstd in proptest::bool::ANY,
    ) {
        let compression = if zstd { Compression::zstd(1) } else { Compression::NONE };
        let mut files: Vec<(String, Vec<u8>)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("file-{i}"), noise(100 + i as u64, n)))
            .collect();
        let mut names = 0;
        let write_gen = |files: &[(String, Vec<u8>)], opts, id| {
            let refs: Vec<(&str, Vec<u8>)> =
                files.iter().map(|(p, c)| (p.as_str(), c.clone())).collect();
            write(&refs, opts, id)
        };
        let (first, _) = write_gen(&files, options(compression), 1);
        // Oldest first; each generation's parents are the ones before it, newest first.
        let mut chain: Vec<Vec<u8>> = vec![first];
        let open = |chain: &[Vec<u8>]| -> ArchiveReader {
            let (last, older) = chain.split_last().unwrap();
            let parents = older
                .iter()
                .rev()
                .map(|g| open_in_memory(std::slice::from_ref(g)).unwrap())
                .collect();
            open_chain(last, parents).unwrap()
        };
        for (g, edits) in generations.iter().enumerate() {
            let before = files.clone();
            for e in edits {
                apply(&mut files, e, &mut names);
            }
            let parent = open(&chain);
            let opts = with_parent(compression, &parent, &format!("g{}.cka", g + 1));
            let (bytes, summary) = write_gen(&files, opts, g as u8 + 2);
            // The bytes the generation before did not hold, in whole chunks: an upper bound
            // of what this one stores itself (older generations may hold more of them).
            let known: std::collections::HashSet<Vec<u8>> = before
                .iter()
                .flat_map(|(_, c)| c.chunks(CHUNK).map(<[u8]>::to_vec).collect::<Vec<_>>())
                .collect();
            let own = summary.raw_bytes - summary.referenced_bytes;
            let fresh: u64 = files
                .iter()
                .flat_map(|(_, c)| c.chunks(CHUNK))
                .filter(|piece| !known.contains(*piece))
                .map(|piece| piece.len() as u64)
                .sum();
            proptest::prop_assert!(own <= fresh, "stored {own} of its own, {fresh} new");
            if edits.is_empty() {
                proptest::prop_assert_eq!(own, 0);
            }
            chain.push(bytes);
            let r = open(&chain);
            proptest::prop_assert_eq!(r.index().parents.len(), g + 1);
            for (path, data) in &files {
                proptest::prop_assert_eq!(&content(&r, path), data, "{}", path);
            }
            proptest::prop_assert_eq!(r.entries().len(), files.len());
            r.verify(2, &Default::default()).unwrap();
        }
    }
}
