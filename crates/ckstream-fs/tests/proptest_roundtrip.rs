//! Property test: for random trees (files with random content and holes, directories,
//! symlinks, hard links), any codec, chunk size and shard count, pack → unpack gives
//! back the same tree. Runs through the library with in-memory shards (a fake sink and
//! source, for speed); the real-file path is covered by the CLI tests.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use ckstream_format::testutil::{open_in_memory, MemSink};
use ckstream_format::{ArchiveWriter, Compression, WriterOptions};
use ckstream_fs::{pack_inputs, plan_inputs, unpack, PackInput, UnpackOptions, UnpackStats};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Node {
    File {
        segments: Vec<(u32, u16, u8)>,
        size_extra: u32,
        mode: u32,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: String,
    },
    Hardlink {
        to: usize,
    },
}

fn node() -> impl Strategy<Value = Node> {
    prop_oneof![
        4 => (prop::collection::vec((0u32..3_000_000, 1u16..40_000, any::<u8>()), 0..4), 0u32..200_000, prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o4755, 0o444]))
            .prop_map(|(segments, size_extra, mode)| Node::File { segments, size_extra, mode }),
        1 => prop::sample::select(vec![0o755u32, 0o700, 0o2775, 0o555]).prop_map(|mode| Node::Dir { mode }),
        1 => "[a-c]{1,2}(/[a-c]{1,2})?".prop_map(|target| Node::Symlink { target }),
        1 => (0usize..16).prop_map(|to| Node::Hardlink { to }),
    ]
}

fn tree() -> impl Strategy<Value = Vec<(String, Node)>> {
    prop::collection::vec(("[a-c]{1,2}(/[a-c]{1,2}){0,2}", node()), 1..16)
}

fn materialize(root: &Path, items: &[(String, Node)]) {
    fs::create_dir_all(root).unwrap();
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    let mut dir_modes = Vec::new();
    for (path, node) in items {
        let p = root.join(path);
        if p.symlink_metadata().is_ok() {
            continue;
        }
        if fs::create_dir_all(p.parent().unwrap()).is_err() {
            continue;
        }
        match node {
            Node::File {
                segments,
                size_extra,
                mode,
            } => {
                use std::os::unix::fs::FileExt;
                let Ok(f) = fs::File::create(&p) else {
                    continue;
                };
                let mut end = 0u64;
                for &(off, len, byte) in segments {
                    let data: Vec<u8> = (0..len as u32)
                        .map(|i| byte.wrapping_add((i % 7) as u8))
                        .collect();
                    f.write_all_at(&data, off as u64).unwrap();
                    end = end.max(off as u64 + len as u64);
                }
                f.set_len(end + *size_extra as u64).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
                files.push(p);
            }
            Node::Dir { mode } => {
                if fs::create_dir(&p).is_ok() {
                    dir_modes.push((p, *mode));
                }
            }
            Node::Symlink { target } => {
                let _ = std::os::unix::fs::symlink(target, &p);
            }
            Node::Hardlink { to } => {
                if let Some(t) = files.get(*to % files.len().max(1)) {
                    let _ = fs::hard_link(t, &p);
                }
            }
        }
    }
    for (p, mode) in dir_modes {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
}

type Manifest = BTreeMap<String, (String, u32, u64, Option<Vec<u8>>, Option<String>, u64)>;

fn manifest(root: &Path) -> Manifest {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut inode_names: BTreeMap<u64, String> = BTreeMap::new();
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let kind = if m.is_dir() {
                "dir"
            } else if m.file_type().is_symlink() {
                "symlink"
            } else {
                "file"
            };
            let content = m.is_file().then(|| fs::read(&p).unwrap());
            let link = m
                .file_type()
                .is_symlink()
                .then(|| fs::read_link(&p).unwrap().to_string_lossy().into_owned());
            // Hard links: record the smallest name sharing the inode (as a hash of the name).
            let group = if m.is_file() && m.nlink() > 1 {
                let first = inode_names
                    .entry(m.ino())
                    .or_insert_with(|| rel.clone())
                    .clone();
                first.len() as u64 + 1
            } else {
                0
            };
            let mode = if kind == "symlink" {
                0
            } else {
                m.mode() & 0o7777
            };
            out.insert(
                rel,
                (
                    kind.to_string(),
                    mode,
                    m.mtime() as u64,
                    content,
                    link,
                    group.min(1),
                ),
            );
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn pack_unpack_round_trip(items in tree(), codec in prop::sample::select(vec!["none", "lz4", "zstd:1", "zstd:6"]), shards in 1usize..4, chunk_kib in prop::sample::select(vec![64u32, 256, 1024])) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        materialize(&src, &items);
        let (sinks, boxed) = MemSink::many(shards);
        let opts = WriterOptions { compression: codec.parse::<Compression>().unwrap(), chunk_size: chunk_kib * 1024, threads: 2, ..Default::default() };
        let mut writer = ArchiveWriter::new(boxed, opts, [1; 16], 0).unwrap();
        let plan = plan_inputs(&[PackInput::new(Vec::new(), src.clone())]).unwrap();
        pack_inputs(&mut writer, plan, Default::default()).unwrap();
        writer.finish().unwrap();

        let bytes: Vec<Vec<u8>> = sinks.iter().map(MemSink::take).collect();
        let reader = open_in_memory(&bytes).unwrap();
        reader.verify(2, &Default::default()).unwrap();
        // The index records every shard's size but shard 0's.
        let sizes: Vec<u64> = bytes.iter().map(|b| b.len() as u64).collect();
        prop_assert_eq!(reader.shard_sizes().unwrap(), sizes.clone());
        let mut recorded = sizes;
        recorded[0] = 0;
        prop_assert_eq!(&reader.index().shard_bytes, &recorded);
        let out = tmp.path().join("out");
        unpack(&reader, &out, &[], &UnpackOptions::default(), &UnpackStats::default()).unwrap();
        prop_assert_eq!(manifest(&src), manifest(&out));
    }
}
