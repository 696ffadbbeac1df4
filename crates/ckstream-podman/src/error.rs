//! Errors of the podman side, kept apart from archive errors so that a container
//! ckstream cannot handle, or a `podman` command that fails, is never reported as a
//! bad archive (exit code 3 is for archives alone).

use std::path::PathBuf;

use crate::config_dump::ConfigDumpError;

/// What can go wrong while checkpointing, converting or restoring a podman container.
#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    /// `podman` could not be started or exited non-zero; its own message.
    #[error("podman {args}: {message}")]
    Command {
        /// The arguments given to `podman`.
        args: String,
        /// What podman said (or why it could not run).
        message: String,
    },
    /// The container is in a state or configuration ckstream does not handle.
    #[error("{0}")]
    Unsupported(String),
    /// Reading, writing or converting an archive failed. (Not transparent: the archive
    /// error stays in the source chain, where the binary finds bad archives.)
    #[error("{0}")]
    Archive(#[from] ckstream_format::Error),
    /// Deriving `config.dump` / `spec.dump` from podman's state failed.
    #[error("reading podman's state for container {container}")]
    State {
        /// The container.
        container: String,
        /// What failed.
        #[source]
        source: ConfigDumpError,
    },
    /// A file of the container's bundle could not be written.
    #[error("writing {}", path.display())]
    Bundle {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The archive asks for security-relevant container settings (OCI hooks, privileged
    /// mode, host mounts, added capabilities, devices, host namespaces) and neither a
    /// trusted signature nor `--trust-config` vouches for it. An archive class: the
    /// binary exits 3, as for an unsafe archive.
    #[error("{0}")]
    Untrusted(String),
    /// A step failed; the message says what became of the container.
    #[error("{context}")]
    Step {
        /// What became of the container.
        context: String,
        /// The cause.
        #[source]
        source: Box<PodmanError>,
    },
}

impl PodmanError {
    /// True for [`PodmanError::Untrusted`]: the archive itself was refused (exit code 3).
    pub fn is_untrusted_archive(&self) -> bool {
        matches!(self, PodmanError::Untrusted(_))
    }

    /// Wraps `self` with what it means for the container (e.g. "it keeps running").
    pub fn context(self, context: impl Into<String>) -> Self {
        PodmanError::Step {
            context: context.into(),
            source: Box::new(self),
        }
    }
}

/// Result of the podman side.
pub type Result<T, E = PodmanError> = std::result::Result<T, E>;
