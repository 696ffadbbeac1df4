//! Errors returned by every reader and writer in this crate.

use std::io;

/// Everything that can go wrong while reading or writing a `.cka` archive.
///
/// Variants that describe a damaged or hostile archive carry enough context
/// (shard, offset, path) for a one-line message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error from a shard source or sink.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The bytes are not a `.cka` shard at all (wrong magic).
    #[error("not a ckstream archive: {0}")]
    NotAnArchive(String),
    /// The archive was written by a newer ckstream or needs a feature this one lacks.
    #[error("unsupported archive: {0}")]
    Unsupported(String),
    /// The archive has no valid commit footer: the checkpoint that wrote it did not finish.
    #[error(
        "incomplete archive (no commit footer): {0}; the checkpoint that wrote it did not finish"
    )]
    Incomplete(String),
    /// Structural damage: a checksum, length or cross-reference does not hold.
    #[error("corrupt archive: {0}")]
    Corrupt(String),
    /// A chunk's content does not match the BLAKE3 digest recorded for it.
    #[error("corrupt archive: digest mismatch for {what}")]
    DigestMismatch { what: String },
    /// An entry that could write outside the target or is otherwise unsafe.
    #[error("unsafe entry rejected: {0}")]
    UnsafeEntry(String),
    /// A caller mistake (bad option, entry added twice, and so on).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the error means the archive itself is damaged, incomplete or hostile
    /// (as opposed to an I/O failure of the machine or a usage mistake).
    pub fn is_bad_archive(&self) -> bool {
        matches!(
            self,
            Error::NotAnArchive(_)
                | Error::Incomplete(_)
                | Error::Corrupt(_)
                | Error::DigestMismatch { .. }
                | Error::UnsafeEntry(_)
                | Error::Unsupported(_)
        )
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
