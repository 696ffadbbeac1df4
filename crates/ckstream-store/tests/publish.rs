//! Publishing local archives over older ones (real files in a temporary directory):
//! the old archive stays whole until the new one replaces it, its other shards are
//! removed afterwards (only those its header names and that carry its id), and archives
//! with the old `NAME.i` shard names still read.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ckstream_format::{ArchiveWriter, Compression, Entry, EntryKind, ShardSink, WriterOptions};
use ckstream_store::{
    local_shard_paths, shard_path, ArchiveLocation, ArchiveSpec, FileSink, ShardNames, Writeback,
};

fn small_chunks() -> WriterOptions {
    WriterOptions {
        compression: Compression::NONE,
        chunk_size: 64 << 10,
        threads: 2,
        ..Default::default()
    }
}

/// One file entry `f` of `len` bytes of `fill`, spread over the shards.
fn add_file(writer: &mut ArchiveWriter, fill: u8, len: usize) {
    let id = writer
        .add_entry(Entry {
            path: b"f".to_vec(),
            kind: EntryKind::File as i32,
            mode: 0o644,
            size: len as u64,
            ..Default::default()
        })
        .unwrap();
    for (k, piece) in vec![fill; len].chunks(64 << 10).enumerate() {
        writer
            .add_data(id, (k * (64 << 10)) as u64, piece.to_vec(), None)
            .unwrap();
    }
}

fn pack(dst: &Path, shards: u32, fill: u8) -> [u8; 16] {
    let mut archive = ArchiveLocation::Path(dst.to_path_buf())
        .create(&ArchiveSpec {
            shards,
            writer: small_chunks(),
            command: "test",
            writeback: Writeback::default(),
        })
        .unwrap();
    add_file(&mut archive.writer, fill, 1 << 20);
    archive.finish().unwrap().archive_id
}

/// Reads entry `f` back, which checks every digest on the way.
fn content(dst: &Path) -> Vec<u8> {
    let reader = ArchiveLocation::Path(dst.to_path_buf())
        .open(Path::new("/tmp"))
        .unwrap();
    let mut out = Vec::new();
    reader
        .copy_entry(reader.find(b"f").unwrap(), &mut out)
        .unwrap();
    out
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Writes a 3-shard archive the way ckstream did before shards were named by id:
/// `NAME`, `NAME.1`, `NAME.2`, no `ID_NAMED_SHARDS` bit.
fn pack_with_indexed_names(dst: &Path, fill: u8) {
    let sinks: Vec<Box<dyn ShardSink>> = (0..3)
        .map(|i| {
            let p = shard_path(dst, ShardNames::Indexed, i);
            let f = OpenOptions::new()
                .create_new(true)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&p)
                .unwrap();
            Box::new(FileSink::new(f, p.display().to_string(), Writeback::Off))
                as Box<dyn ShardSink>
        })
        .collect();
    let mut w = ArchiveWriter::new(sinks, small_chunks(), [7; 16], 0).unwrap();
    add_file(&mut w, fill, 1 << 20);
    w.finish().unwrap();
}

#[test]
fn shards_are_named_by_the_archive_id_and_created_private() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("a.cka");
    let id = pack(&dst, 3, 1);
    let paths = local_shard_paths(&dst).unwrap();
    assert_eq!(paths.len(), 3);
    assert_eq!(paths[0], dst);
    for (i, p) in paths.iter().enumerate().skip(1) {
        assert_eq!(*p, shard_path(&dst, ShardNames::ById(id), i as u32));
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
    assert_eq!(listing(dir.path()), paths);
    assert_eq!(content(&dst), vec![1u8; 1 << 20]);
}

#[test]
fn a_new_archive_replaces_the_old_one_and_removes_only_its_shards() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("a.cka");
    pack(&dst, 4, 1);
    let old_paths = local_shard_paths(&dst).unwrap();
    // Files that look like shards but are not the old archive's must survive.
    let stranger = dir.path().join("a.cka.1");
    std::fs::write(&stranger, b"not a shard").unwrap();
    let other = dir.path().join("b.cka");
    pack(&other, 2, 9);
    let other_paths = local_shard_paths(&other).unwrap();
    // Fewer shards than before: the old shards 1..3 must all go.
    pack(&dst, 2, 2);
    assert_eq!(content(&dst), vec![2u8; 1 << 20]);
    let new_paths = local_shard_paths(&dst).unwrap();
    for p in &old_paths[1..] {
        assert!(!p.exists(), "old shard {} left behind", p.display());
    }
    let mut expected: Vec<PathBuf> = new_paths
        .iter()
        .chain(&other_paths)
        .cloned()
        .chain([stranger])
        .collect();
    expected.sort();
    assert_eq!(listing(dir.path()), expected);
    assert_eq!(content(&other), vec![9u8; 1 << 20]);
}

#[test]
fn archives_with_indexed_shard_names_still_read_and_are_replaced_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("old.cka");
    pack_with_indexed_names(&dst, 5);
    assert_eq!(
        local_shard_paths(&dst).unwrap(),
        (0..3)
            .map(|i| shard_path(&dst, ShardNames::Indexed, i))
            .collect::<Vec<_>>()
    );
    assert_eq!(content(&dst), vec![5u8; 1 << 20]);
    pack(&dst, 1, 6);
    assert_eq!(content(&dst), vec![6u8; 1 << 20]);
    assert_eq!(listing(dir.path()), vec![dst]);
}

#[test]
fn a_failed_publish_leaves_the_old_archive_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("a.cka");
    pack(&dst, 2, 3);
    let before: Vec<(PathBuf, Vec<u8>)> = listing(dir.path())
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    let mut archive = ArchiveLocation::Path(dst.clone())
        .create(&ArchiveSpec {
            shards: 3,
            writer: small_chunks(),
            command: "test",
            writeback: Writeback::default(),
        })
        .unwrap();
    add_file(&mut archive.writer, 4, 1 << 20);
    // Once committed, shard 0's temporary file is swapped for a non-empty directory, so
    // renaming it onto the old shard 0 fails (ENOTDIR) at the very last step.
    let tmp0 = listing(dir.path())
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(".partial"))
        .unwrap();
    let summary = archive.writer.finish().unwrap();
    std::fs::remove_file(&tmp0).unwrap();
    std::fs::create_dir(&tmp0).unwrap();
    File::create(tmp0.join("x")).unwrap();
    let err = archive.pending.publish().unwrap_err();
    assert!(err.to_string().contains("renaming"), "{err}");
    std::fs::remove_dir_all(&tmp0).unwrap();
    let after: Vec<(PathBuf, Vec<u8>)> = listing(dir.path())
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    assert_eq!(
        before, after,
        "the old archive changed, or new shards were left"
    );
    assert_ne!(summary.archive_id, [0; 16]);
    assert_eq!(content(&dst), vec![3u8; 1 << 20]);
}

#[test]
fn an_aborted_archive_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("a.cka");
    let mut archive = ArchiveLocation::Path(dst)
        .create(&ArchiveSpec {
            shards: 3,
            writer: small_chunks(),
            command: "test",
            writeback: Writeback::Bounded(1 << 20),
        })
        .unwrap();
    add_file(&mut archive.writer, 4, 4 << 20);
    archive.abort();
    assert!(listing(dir.path()).is_empty());
}

#[test]
fn files_left_by_a_writer_that_died_are_swept_by_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("a.cka");
    pack(&dst, 3, 1);
    let current = local_shard_paths(&dst).unwrap();
    // A writer that died: its temporary shard 0 and one id-named shard, unlocked.
    let dead_partial = dir.path().join(".a.cka.0123456789ab.partial");
    let dead_shard = dir.path().join("a.cka.00112233445566ff.1");
    std::fs::write(&dead_partial, b"half an archive").unwrap();
    std::fs::write(&dead_shard, b"").unwrap();
    // A writer still at work: its files are locked.
    let live_partial = dir.path().join(".a.cka.abcdefabcdef.partial");
    let live = File::create(&live_partial).unwrap();
    rustix::fs::flock(&live, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    // Not ours at all.
    let stranger = dir.path().join("a.cka.notes");
    std::fs::write(&stranger, b"keep me").unwrap();
    pack(&dst, 2, 2);
    assert!(!dead_partial.exists(), "a dead writer's partial was left");
    assert!(!dead_shard.exists(), "a dead writer's shard was left");
    assert!(live_partial.exists(), "a living writer's file was removed");
    assert!(stranger.exists());
    for p in &current[1..] {
        assert!(
            !p.exists(),
            "the replaced archive's shard {} was left",
            p.display()
        );
    }
    assert_eq!(content(&dst), vec![2u8; 1 << 20]);
}
