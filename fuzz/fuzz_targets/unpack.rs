//! Extracts an archive assembled from a structured input (see the `ckstream_fuzz` crate
//! docs) into a fresh directory, and checks that nothing outside it changed.
//!
//! Layout, under one directory per process (in `$TMPDIR`, best a tmpfs):
//!
//! ```text
//! outside/file            must stay exactly as it is, and `outside` hold nothing else
//! dest/                   the target, created for every run, removed after it
//! dest/link -> ../outside     symlinks an extraction must never write through
//! dest/flink -> ../outside/file
//! dest/abs -> ROOT/outside
//! ```
//!
//! and the per-process directory must hold nothing but `outside` and `dest`. Flag bits
//! (of the input's first byte): 3 overlay mode, 4 strip the first entry's path, 5 extract
//! only the last entry, 6 two threads, 7 overlay upper mode (without 3).
#![no_main]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ckstream_format::EntryKind;
use ckstream_fs::{unpack, UnpackOptions, UnpackStats};
use ckstream_fuzz::{assemble, decoded_bytes, open, ArchiveInput};
use libfuzzer_sys::fuzz_target;

/// Most bytes one run may decode and write.
const MAX_DECODED: u64 = 4 << 20;
/// Most entries one run may create.
const MAX_ENTRIES: usize = 2000;
const OUTSIDE_CONTENT: &[u8] = b"outside the target\n";

struct Root {
    dir: tempfile::TempDir,
    file_meta: (u32, u32, u64, i64),
}

fn names(dir: &Path) -> BTreeSet<Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect()
}

fn meta(p: &Path) -> (u32, u32, u64, i64) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.mode(), m.uid(), m.size(), m.mtime())
}

fn root() -> &'static Root {
    static ROOT: OnceLock<Root> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("ckstream-fuzz-unpack.")
            .tempdir()
            .unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("file"), OUTSIDE_CONTENT).unwrap();
        let file_meta = meta(&outside.join("file"));
        Root { dir, file_meta }
    })
}

fn check_outside(root: &Root) {
    let base = root.dir.path();
    let expected: BTreeSet<Vec<u8>> = [b"dest".to_vec(), b"outside".to_vec()].into();
    let found = names(base);
    assert!(
        found.is_subset(&expected),
        "created beside the target: {found:?}"
    );
    let outside = base.join("outside");
    assert_eq!(names(&outside), [b"file".to_vec()].into());
    assert_eq!(fs::read(outside.join("file")).unwrap(), OUTSIDE_CONTENT);
    assert_eq!(meta(&outside.join("file")), root.file_meta);
    assert!(fs::symlink_metadata(&outside).unwrap().is_dir());
}

fn prepare(root: &Root) -> PathBuf {
    let dest = root.dir.path().join("dest");
    fs::create_dir(&dest).unwrap();
    std::os::unix::fs::symlink("../outside", dest.join("link")).unwrap();
    std::os::unix::fs::symlink("../outside/file", dest.join("flink")).unwrap();
    std::os::unix::fs::symlink(root.dir.path().join("outside"), dest.join("abs")).unwrap();
    dest
}

fuzz_target!(|data: &[u8]| {
    let input = ArchiveInput::parse(data);
    let shards = assemble(&input);
    let Ok(reader) = open(&shards) else {
        return;
    };
    if decoded_bytes(&reader) > MAX_DECODED || reader.entries().len() > MAX_ENTRIES {
        return;
    }
    let entries = reader.entries();
    let flags = input.flags;
    let opts = UnpackOptions {
        same_owner: true,
        threads: 1 + usize::from((flags >> 6) & 1),
        reflink: false,
        strip_prefix: (flags & 0x10 != 0)
            .then(|| entries.first().map(|e| e.path.clone()))
            .flatten(),
        overlay_apply: flags & 0x08 != 0,
        // An overlay upper directory (whiteouts as 0:0 devices, opaque xattrs) instead.
        overlay_upper: flags & 0x08 == 0 && flags & 0x80 != 0,
        // Both need reflinks, which the fuzzed archive (in memory) never allows.
        defer_verify_cloned: false,
        verify_from_output: false,
        stop: ckstream_format::Stop::NEVER,
    };
    let selection: Vec<Vec<u8>> = match entries.last() {
        Some(e) if flags & 0x20 != 0 && opts.strip_prefix.is_none() => vec![e.path.clone()],
        _ => Vec::new(),
    };
    let root = root();
    let dest = prepare(root);
    let result = unpack(&reader, &dest, &selection, &opts, &UnpackStats::default());
    check_outside(root);
    if result.is_ok() && selection.is_empty() && opts.strip_prefix.is_none() && !opts.overlay_apply
    {
        // Every file is there, at its size, as a regular file (not written through a
        // symlink that was in the target).
        for e in entries {
            let size = match e.entry_kind() {
                EntryKind::File => e.size,
                EntryKind::Hardlink => entries[reader.find(&e.link_target).unwrap()].size,
                _ => continue,
            };
            let m = fs::symlink_metadata(dest.join(OsStr::from_bytes(&e.path))).unwrap();
            assert!(
                m.file_type().is_file() && m.size() == size,
                "{:?}",
                e.path_lossy()
            );
        }
    }
    fs::remove_dir_all(&dest).unwrap();
    check_outside(root);
});
