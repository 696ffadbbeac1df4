//! Errors of the CRIU side.

use std::io;
use std::path::PathBuf;

/// What can go wrong while capturing, serving or running CRIU.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// A socket, pipe or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// CRIU sent something that does not follow the image-streamer protocol.
    #[error("CRIU protocol error: {0}")]
    Protocol(String),
    /// The archive could not be read or written. (Not transparent: the archive error
    /// stays in the source chain, where the binary finds bad-archive errors for exit 3.)
    #[error("{0}")]
    Archive(#[from] ckstream_format::Error),
    /// Applying a rootfs diff failed.
    #[error("applying the rootfs diff onto {}", target.display())]
    Rootfs {
        /// The directory the diff was applied onto.
        target: PathBuf,
        /// The archive or extraction error.
        #[source]
        source: ckstream_format::Error,
    },
    /// CRIU itself failed; the message names its exit status and log.
    #[error("{0}")]
    Criu(String),
    /// Nothing happened for longer than the configured timeout.
    #[error("timed out: {0}")]
    Timeout(String),
    /// SIGINT or SIGTERM arrived.
    #[error("interrupted by a signal")]
    Interrupted,
    /// A dump or restore failed: says what became of the archive or the process, and
    /// where CRIU's log is.
    #[error("{what}; {outcome} (CRIU work dir kept: {})", work_dir.display())]
    Failed {
        /// What failed.
        what: String,
        /// What became of the archive or the process.
        outcome: String,
        /// CRIU's work directory, kept for its log.
        work_dir: PathBuf,
        /// The cause.
        #[source]
        source: Box<CriuError>,
    },
}

impl CriuError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        CriuError::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// Result of the CRIU side.
pub type Result<T, E = CriuError> = std::result::Result<T, E>;
