//! Key files: where the keys that sign, seal, open and vouch for archives live.
//!
//! A key pair is two text files (`ckstream key generate -o FILE`): `FILE`, the secret key,
//! created 0600 and refused when group or others may read it (as ssh refuses private keys),
//! and `FILE.pub`, the public key to give to writers (`--encrypt-to`) and readers
//! (`--trusted-key`). Key bytes are never printed; messages name keys by their id.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ckstream_format::crypto::{Keyring, PublicKey, SecretKey};
use ckstream_format::{Error, Result};

/// Key file paths as given on a command line; [`KeyFiles::load`] reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFiles {
    /// Secret keys that may open sealed archives.
    pub secret: Vec<PathBuf>,
    /// Public keys (or key pairs) whose signature is required.
    pub trusted: Vec<PathBuf>,
}

impl KeyFiles {
    /// Reads every key file.
    ///
    /// # Errors
    /// As [`load_secret_key`] and [`load_public_key`].
    pub fn load(&self) -> Result<Keyring> {
        Ok(Keyring {
            secrets: self
                .secret
                .iter()
                .map(|p| load_secret_key(p))
                .collect::<Result<_>>()?,
            trusted: self
                .trusted
                .iter()
                .map(|p| load_public_key(p))
                .collect::<Result<_>>()?,
        })
    }

    /// True when no key file is named.
    pub fn is_empty(&self) -> bool {
        self.secret.is_empty() && self.trusted.is_empty()
    }
}

fn read_key_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("cannot read key file {}", path.display()), e))
}

/// Reads a secret key file.
///
/// # Errors
/// [`Error::Usage`] when group or others may read it, or it is no secret key file;
/// [`Error::Io`] when it cannot be read.
pub fn load_secret_key(path: &Path) -> Result<SecretKey> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("cannot read key file {}", path.display()), e))?;
    if meta.mode() & 0o077 != 0 {
        return Err(Error::Usage(format!(
            "secret key file {} may be read by others (mode {:o}): chmod 600 it",
            path.display(),
            meta.mode() & 0o777
        )));
    }
    SecretKey::from_text(&read_key_file(path)?, &path.display().to_string())
}

/// Reads a public key file; a secret key file stands for its public key.
///
/// # Errors
/// [`Error::Usage`] for a file that holds no key; [`Error::Io`] when it cannot be read.
pub fn load_public_key(path: &Path) -> Result<PublicKey> {
    let text = read_key_file(path)?;
    let what = path.display().to_string();
    PublicKey::from_text(&text, &what).or_else(|public_err| {
        SecretKey::from_text(&text, &what)
            .map(|k| k.public())
            .map_err(|_| public_err)
    })
}

/// The directory of system-wide trusted keys: `$CKSTREAM_CONFIG_DIR/trusted-keys`
/// (default `/etc/ckstream/trusted-keys`).
pub fn trusted_keys_dir() -> PathBuf {
    std::env::var_os("CKSTREAM_CONFIG_DIR")
        .map_or_else(|| PathBuf::from("/etc/ckstream"), PathBuf::from)
        .join("trusted-keys")
}

/// The `*.pub` files of `dir`, sorted; none when it does not exist.
///
/// # Errors
/// [`Error::Io`] when it exists but cannot be listed.
pub fn public_keys_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
    };
    let mut keys = Vec::new();
    for e in entries {
        let path = e
            .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?
            .path();
        if path.extension().is_some_and(|x| x == "pub") {
            keys.push(path);
        }
    }
    keys.sort();
    Ok(keys)
}

/// The public key file beside secret key file `path`: `path.pub`.
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Generates a key pair into `path` (0600) and `path.pub` (0644); neither may exist.
///
/// # Errors
/// [`Error::Io`] when either file exists or cannot be written.
pub fn generate_key_pair(path: &Path) -> Result<PublicKey> {
    let key = SecretKey::generate()?;
    let public = key.public();
    let pub_path = public_key_path(path);
    if pub_path.exists() {
        return Err(Error::Usage(format!(
            "{} exists already",
            pub_path.display()
        )));
    }
    write_new(path, key.to_text().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&pub_path, public.to_text().as_bytes(), 0o644) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(public)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_pairs_load_and_loose_secret_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let public = generate_key_pair(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(load_secret_key(&path).unwrap().public(), public);
        assert_eq!(load_public_key(&public_key_path(&path)).unwrap(), public);
        assert_eq!(load_public_key(&path).unwrap(), public);
        assert!(
            generate_key_pair(&path).is_err(),
            "an existing key is never replaced"
        );
        assert_eq!(
            public_keys_in(dir.path()).unwrap(),
            [public_key_path(&path)]
        );
        assert!(public_keys_in(&dir.path().join("none")).unwrap().is_empty());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_secret_key(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let err = load_secret_key(&public_key_path(&path)).unwrap_err();
        assert!(matches!(err, Error::Usage(_)), "{err}");
    }
}
