//! The `.cka` archive format of ckstream.
//!
//! An archive is 1..N shards. Each shard is a 4 KiB header, a data region of
//! records (inline entry metadata and content chunks, uncompressed chunks aligned
//! for reflinks, compressed chunks as independent zstd frames or LZ4 blocks), and,
//! once the archive is committed, a 128-byte footer. Shard 0 also holds the index
//! (every entry and every chunk with its BLAKE3 digest) just before its footer.
//! `docs/FORMAT.md` is the specification; this crate is its reference.
//!
//! The crate does no I/O of its own beyond the [`ShardSink`] / [`ShardSource`]
//! traits (writes, positional reads), so it can be fuzzed and reused; files,
//! pipes and object stores live in `ckstream-store`.

pub mod budget;
pub mod chunker;
pub mod codec;
pub mod crypto;
pub mod error;
pub mod flatten;
pub mod index;
pub mod layout;
pub mod parents;
pub mod progress;
pub mod reader;
pub mod scanner;
#[cfg(any(test, feature = "testutil"))]
pub mod testutil;
mod verify;
pub mod window;
pub mod writer;

pub use codec::{CodecId, Compression, CompressionArg};
pub use crypto::{ArchiveKey, Keyring, PublicKey, SecretKey, SignatureStatus, WriteKeys};
pub use error::{escape_controls, Error, Result};
pub use index::{Chunk, Entry, EntryKind, Index, ParentArchive, Xattr};
pub use parents::ParentChunks;
pub use progress::{Progress, Stop};
pub use reader::{ArchiveReader, RecordScanner, ShardSource, VerifyReport};
pub use writer::{ArchiveWriter, ShardSink, WriteSummary, WriterOptions};
