//! Errors returned by every reader and writer in this crate, and the error policy of
//! the whole workspace.
//!
//! # Error policy
//!
//! - **Each crate owns its errors.** `ckstream_format::Error` describes archives and the
//!   I/O around them; `ckstream-store`, `ckstream-fs` (both move archive bytes) return it
//!   too. `ckstream-criu` has `CriuError` (CRIU, its protocol, its process) and
//!   `ckstream-podman` has `PodmanError` (podman, containers); both wrap an archive error
//!   as a *source* (never `transparent`), so it stays visible in the error chain.
//! - **Archive classes are for archives only.** `NotAnArchive`, `Incomplete`, `Corrupt`,
//!   `DigestMismatch`, `UnsafeEntry` and `Unsupported` (a newer format or feature) mean the
//!   archive is bad ([`Error::is_bad_archive`]); a container or machine ckstream cannot
//!   handle uses its own crate's error, never these.
//! - **Exit codes** (the binary, `main.rs`): 0 success (also when the reader of stdout
//!   went away); 3 when any error in the chain is a bad archive (or `ckstream-podman`'s
//!   refusal of an archive's untrusted container settings); 1 for every other
//!   failure; 2 for a command line the argument parser refused (bad option values are
//!   parsed into typed values there, so they exit 2 too).
//! - **I/O errors say what was being done** (`Error::io(context, e)`); an archive error
//!   that had to travel through an `io::Error` (a `ShardSource` method) comes back
//!   unchanged through [`Error::into_io`] / [`Error::io`].
//! - **Libraries never print errors and never exit**; warnings about leftovers that
//!   cannot be cleaned up (an upload that could not be aborted) go to stderr, naming the
//!   object.

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
        /// What was being done.
        context: String,
        /// The I/O error.
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
    DigestMismatch {
        /// The chunk (entry path and offset) or structure that failed.
        what: String,
    },
    /// An entry that could write outside the target or is otherwise unsafe.
    #[error("unsafe entry rejected: {0}")]
    UnsafeEntry(String),
    /// The archive is not signed by a key the reader trusts, or its signature does not
    /// verify.
    #[error("untrusted archive: {0}")]
    Untrusted(String),
    /// A caller mistake (bad option, entry added twice, and so on).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// The error of work stopped by SIGINT/SIGTERM (an `Interrupted` I/O error), e.g.
    /// `Error::interrupted("packing")`.
    pub fn interrupted(context: impl Into<String>) -> Self {
        Error::io(
            context,
            io::Error::new(io::ErrorKind::Interrupted, "interrupted by a signal"),
        )
    }

    /// Wraps an I/O error with a description of what was being done.
    ///
    /// A source that had to report an archive error through an `io::Error` (see
    /// [`Error::into_io`]) gets that error back unchanged, so it keeps its kind
    /// (and exit code) instead of turning into an I/O failure.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        if source.get_ref().is_some_and(|e| e.is::<Error>()) {
            if let Some(Ok(inner)) = source.into_inner().map(|e| e.downcast::<Error>()) {
                return *inner;
            }
            unreachable!("checked above that the io::Error wraps an archive error");
        }
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Carries this error through an `io::Error` (for [`crate::ShardSource`] methods);
    /// [`Error::io`] unwraps it again.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            Error::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }

    /// A copy of this error (`io::Error` is not `Clone`; its kind and message are kept).
    pub fn duplicate(&self) -> Self {
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::NotAnArchive(m) => Error::NotAnArchive(m.clone()),
            Error::Unsupported(m) => Error::Unsupported(m.clone()),
            Error::Incomplete(m) => Error::Incomplete(m.clone()),
            Error::Corrupt(m) => Error::Corrupt(m.clone()),
            Error::DigestMismatch { what } => Error::DigestMismatch { what: what.clone() },
            Error::UnsafeEntry(m) => Error::UnsafeEntry(m.clone()),
            Error::Untrusted(m) => Error::Untrusted(m.clone()),
            Error::Usage(m) => Error::Usage(m.clone()),
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
                | Error::Untrusted(_)
        )
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `s` with every control character (C0, DEL, C1) and every bidirectional-text control
/// escaped (`\n`, `\t`, `\r`, else `\u{1b}`), for printing text an archive holds (paths,
/// link targets, metadata, messages that name them) to a terminal or a log: a name
/// cannot move the cursor, recolour, clear or rewrite what is around it, or make one
/// line look like two. Everything else is left as it is.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    fn escaped(c: char) -> bool {
        c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(escaped) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if escaped(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("plain/päth\\x"), "plain/päth\\x");
        assert_eq!(
            escape_controls("a\nb\tc\rd\u{1b}[2J\u{7f}\u{9b}e"),
            "a\\nb\\tc\\rd\\u{1b}[2J\\u{7f}\\u{9b}e"
        );
        assert_eq!(escape_controls("x\u{202e}gpj.exe"), "x\\u{202e}gpj.exe");
    }
}
