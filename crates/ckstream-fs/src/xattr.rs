//! Extended attributes: listing and reading without following symlinks.

use std::io;
use std::path::Path;

use ckstream_format::Xattr;

/// All xattrs of `path` (not following a final symlink), sorted by name; none where
/// the filesystem has no xattrs.
///
/// # Errors
/// The errors of listing or reading them.
pub fn read_all(path: &Path) -> io::Result<Vec<Xattr>> {
    let size = match rustix::fs::llistxattr_query(path) {
        Ok(n) => n,
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOTSUP => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e.into()),
    };
    if size == 0 {
        return Ok(Vec::new());
    }
    let mut names = vec![0u8; size + 256];
    let n = rustix::fs::llistxattr(path, &mut names[..])?;
    names.truncate(n);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::OsStr::from_bytes_compat(name);
        let vsize = match rustix::fs::lgetxattr_query(path, cname) {
            Ok(n) => n,
            Err(e) if e == rustix::io::Errno::NODATA => continue,
            Err(e) => return Err(e.into()),
        };
        let mut value = vec![0u8; vsize];
        let got = rustix::fs::lgetxattr(path, cname, &mut value[..])?;
        value.truncate(got);
        out.push(Xattr {
            name: name.to_vec(),
            value,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

trait FromBytesCompat {
    fn from_bytes_compat(b: &[u8]) -> &std::ffi::OsStr;
}

impl FromBytesCompat for std::ffi::OsStr {
    fn from_bytes_compat(b: &[u8]) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_user_xattrs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        rustix::fs::setxattr(&p, "user.k", b"v1", rustix::fs::XattrFlags::empty()).unwrap();
        let got = super::read_all(&p).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, b"user.k");
        assert_eq!(got[0].value, b"v1");
    }
}
