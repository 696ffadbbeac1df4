//! Where archive shards live: local files (written with reflinks when the filesystem
//! shares extents, and pushed to disk while they are written), standard output and
//! inherited fds, S3-compatible object stores (cargo feature `s3`, on by default); one
//! [`ArchiveLocation`] type that creates and opens archives in any of them; and the
//! publish step that replaces an archive under its name without ever losing the old one.
//!
//! The format crate talks to this one only through its `ShardSink` and `ShardSource`
//! traits.

pub mod clone;
pub mod failpoint;
pub mod keys;
pub mod local;
pub mod location;
pub mod pipe;
pub mod publish;
#[cfg(feature = "s3")]
pub mod s3;

pub use clone::{clone_or_copy_range, clone_range, CopyMethod};
pub use keys::KeyFiles;
pub use local::{seekable, take_fd, FdSink, FileSink, FileSource, StdoutSink};
pub use location::{
    local_shard_paths, new_archive_id, shard_path, ArchiveLocation, ArchiveSpec, NewArchive,
    ShardNames, Writeback,
};
pub use publish::{
    create_file_atomically, create_private_file, may_be_in_place, AtomicFile, MayBeInPlace,
    PendingArchive,
};
