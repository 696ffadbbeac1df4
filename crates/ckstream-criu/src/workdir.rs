//! The directory CRIU works in during `dump` and `restore` (sockets, action script,
//! CRIU's log): removed when everything went well, kept for its log otherwise.

use std::path::PathBuf;

use crate::error::{CriuError, Result};

/// A work directory: `--work-dir` as given (never removed), or a fresh one in the
/// temporary directory (removed on drop unless [`WorkDir::keep`] was called).
pub struct WorkDir {
    /// The directory.
    pub path: PathBuf,
    remove: bool,
}

impl WorkDir {
    /// Creates (or takes) the directory.
    ///
    /// # Errors
    /// [`CriuError::Io`] when it cannot be created.
    pub fn new(given: Option<PathBuf>, prefix: &str) -> Result<Self> {
        match given {
            Some(p) => {
                std::fs::create_dir_all(&p)
                    .map_err(|e| CriuError::io(format!("creating {}", p.display()), e))?;
                Ok(WorkDir {
                    path: p,
                    remove: false,
                })
            }
            None => {
                let base = std::env::temp_dir();
                for i in 0..1000u32 {
                    let p = base.join(format!("{prefix}-{}-{i}", std::process::id()));
                    if std::fs::create_dir(&p).is_ok() {
                        return Ok(WorkDir {
                            path: p,
                            remove: true,
                        });
                    }
                }
                Err(CriuError::io(
                    format!("cannot create a work directory in {}", base.display()),
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ))
            }
        }
    }

    /// Keeps the directory (its CRIU log explains a failure).
    pub fn keep(&mut self) {
        self.remove = false;
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
