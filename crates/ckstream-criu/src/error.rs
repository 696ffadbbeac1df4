//! Errors of the CRIU side.

use std::io;

/// What can go wrong while capturing, serving or running CRIU.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// A socket, pipe or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// CRIU sent something that does not follow the image-streamer protocol.
    #[error("CRIU protocol error: {0}")]
    Protocol(String),
    /// The archive could not be read or written.
    #[error(transparent)]
    Archive(#[from] ckstream_format::Error),
    /// CRIU itself failed; the message names its exit status and log.
    #[error("{0}")]
    Criu(String),
    /// Nothing happened for longer than the configured timeout.
    #[error("timed out: {0}")]
    Timeout(String),
    /// SIGINT or SIGTERM arrived.
    #[error("interrupted by a signal")]
    Interrupted,
}

impl CriuError {
    pub fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        CriuError::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

pub type Result<T, E = CriuError> = std::result::Result<T, E>;
