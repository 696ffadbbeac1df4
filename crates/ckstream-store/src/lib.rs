//! Where archive shards live: local files (written with reflinks when the
//! filesystem shares extents), standard output as a pipe, S3-compatible object
//! stores, and the naming rule that ties the shards of one archive together.
//!
//! The format crate talks to this one only through its `ShardSink` and
//! `ShardSource` traits, so other backends (object stores) slot in beside these.

pub mod clone;
pub mod local;
pub mod s3;

pub use clone::{clone_or_copy_range, CopyMethod};
pub use local::{
    create_archive, create_file_atomically, new_archive_id, open_archive, shard_path,
    ArchiveTarget, FdSink, FileSink, FileSource, NewArchive, PendingArchive,
};
