//! Overlayfs upper directories whose entries do not hold all of their content, and
//! finding the merged mount that does.
//!
//! With `metacopy=on` a chmod/chown (or a rename) of a lower file copies up only its
//! metadata: the upper file carries `trusted.overlay.metacopy` (or `user.overlay.*`
//! with `userxattr`) and its data stays in a lower layer, at the path named by its
//! `overlay.redirect` xattr if it was renamed. With `redirect_dir=on` a renamed lower
//! directory is an upper directory with `overlay.redirect`: its lower contents come
//! from the redirect path, not from its own name. Neither can be applied onto a copy
//! of the lower layers from the upper directory alone, so [`crate::plan_inputs`]
//! reads them through the overlay's merged view (see [`crate::Overlay`]); this module
//! finds that view in `/proc/self/mountinfo` and scans an upper directory for such
//! entries without reading any data.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ckstream_format::{Error, Result};

/// `statfs` magic of overlayfs.
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

/// The name of an overlay-private xattr without its namespace (`trusted.overlay.`
/// or `user.overlay.`), e.g. `Some(b"metacopy")`; `None` for any other xattr.
pub fn overlay_xattr(name: &[u8]) -> Option<&[u8]> {
    name.strip_prefix(b"trusted.overlay.")
        .or_else(|| name.strip_prefix(b"user.overlay."))
}

/// What makes an upper-directory entry incomplete on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indirect {
    /// A metadata-only copy-up (`overlay.metacopy`): the data is in a lower layer.
    Metacopy,
    /// A renamed lower directory (`overlay.redirect`): its lower contents are
    /// found under another path.
    RedirectDir,
}

impl Indirect {
    /// A human description, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Indirect::Metacopy => {
                "an overlayfs metadata-only copy-up (overlay.metacopy: its data is in a lower layer)"
            }
            Indirect::RedirectDir => {
                "an overlayfs renamed directory (overlay.redirect: its lower contents are under another path)"
            }
        }
    }
}

/// An entry of an upper directory that needs the merged view to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndirectEntry {
    /// Its path (the upper directory joined with its relative path).
    pub path: PathBuf,
    /// Which of the two it is.
    pub kind: Indirect,
}

/// What an entry's xattr names say about it (`is_dir`: the entry is a directory;
/// only regular files are metacopy, only directories redirected).
pub(crate) fn indirect_kind<'a>(
    is_dir: bool,
    is_file: bool,
    names: impl IntoIterator<Item = &'a [u8]>,
) -> Option<Indirect> {
    for n in names {
        match overlay_xattr(n) {
            Some(b"metacopy") if is_file => return Some(Indirect::Metacopy),
            Some(b"redirect") if is_dir => return Some(Indirect::RedirectDir),
            _ => {}
        }
    }
    None
}

/// Scans `upper` (an overlayfs upper directory) for the first metacopy file or
/// redirected directory, reading only directory listings and xattr names (one
/// `llistxattr` per file and directory). Returns `None` when every entry is
/// complete in the upper directory itself.
///
/// # Errors
/// I/O errors naming the path that could not be listed or read.
pub fn find_indirect(upper: &Path) -> Result<Option<IndirectEntry>> {
    let mut names = vec![0u8; 4096];
    let mut stack = vec![upper.to_path_buf()];
    if let Some(kind) = scan_one(upper, true, false, &mut names)? {
        return Ok(Some(IndirectEntry {
            path: upper.to_path_buf(),
            kind,
        }));
    }
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
        for child in rd {
            let child =
                child.map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
            let ft = child
                .file_type()
                .map_err(|e| Error::io(format!("cannot read {}", child.path().display()), e))?;
            if !ft.is_dir() && !ft.is_file() {
                continue;
            }
            let path = child.path();
            if let Some(kind) = scan_one(&path, ft.is_dir(), ft.is_file(), &mut names)? {
                return Ok(Some(IndirectEntry { path, kind }));
            }
            if ft.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(None)
}

fn scan_one(
    path: &Path,
    is_dir: bool,
    is_file: bool,
    buf: &mut Vec<u8>,
) -> Result<Option<Indirect>> {
    loop {
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                let names = buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty());
                return Ok(indirect_kind(is_dir, is_file, names));
            }
            Err(rustix::io::Errno::RANGE) => {
                let need = rustix::fs::llistxattr_query(path).map_err(|e| {
                    Error::io(
                        format!("cannot read xattrs of {}", path.display()),
                        e.into(),
                    )
                })?;
                buf.resize(need.max(buf.len()) + 256, 0);
            }
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOENT => {
                return Ok(None)
            }
            Err(e) => {
                return Err(Error::io(
                    format!("cannot read xattrs of {}", path.display()),
                    e.into(),
                ))
            }
        }
    }
}

/// One line of `/proc/self/mountinfo`: the fields ckstream uses, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// `major:minor` of the mounted filesystem (`st_dev` of its root).
    pub dev: (u32, u32),
    /// The directory of the filesystem mounted here (`/` unless a bind mount of a subtree).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type (`overlay`, ...).
    pub fs_type: String,
    /// Superblock options (`upperdir=...` for overlayfs): name and value, unescaped.
    pub super_options: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl MountInfo {
    /// The value of superblock option `key`.
    pub fn option(&self, key: &str) -> Option<&[u8]> {
        self.super_options
            .iter()
            .find(|(k, _)| k == key.as_bytes())
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\011` tab, `\012`
/// newline, `\134` backslash, `\054` comma in option values). Anything else is kept
/// as it is.
pub fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 4 <= field.len() {
            let d = &field[i + 1..i + 4];
            if d.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = u32::from(d[0] - b'0') * 64
                    + u32::from(d[1] - b'0') * 8
                    + u32::from(d[2] - b'0');
                if v <= 0xff {
                    out.push(v as u8);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Parses `/proc/self/mountinfo` text; lines that do not parse are skipped.
pub fn parse_mountinfo(text: &[u8]) -> Vec<MountInfo> {
    text.split(|&b| b == b'\n')
        .filter_map(parse_mountinfo_line)
        .collect()
}

fn parse_mountinfo_line(line: &[u8]) -> Option<MountInfo> {
    // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let sep = fields.iter().position(|f| *f == b"-")?;
    if sep < 6 || fields.len() < sep + 4 {
        return None;
    }
    let dev = std::str::from_utf8(fields[2]).ok()?;
    let (maj, min) = dev.split_once(':')?;
    let dev = (maj.parse().ok()?, min.parse().ok()?);
    let path = |f: &[u8]| PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(f)));
    let super_options = fields[sep + 3]
        .split(|&b| b == b',')
        .filter(|o| !o.is_empty())
        .map(|o| match o.iter().position(|&b| b == b'=') {
            Some(i) => (
                unescape_mountinfo(&o[..i]),
                Some(unescape_mountinfo(&o[i + 1..])),
            ),
            None => (unescape_mountinfo(o), None),
        })
        .collect();
    Some(MountInfo {
        dev,
        root: path(fields[3]),
        mount_point: path(fields[4]),
        fs_type: String::from_utf8_lossy(&unescape_mountinfo(fields[sep + 1])).into_owned(),
        super_options,
    })
}

fn read_mountinfo() -> Result<Vec<u8>> {
    std::fs::read("/proc/self/mountinfo")
        .map_err(|e| Error::io("cannot read /proc/self/mountinfo", e))
}

// `f_type`'s integer type differs between architectures.
#[allow(clippy::unnecessary_cast)]
fn is_overlayfs(s: &rustix::fs::StatFs) -> bool {
    s.f_type as i64 == OVERLAYFS_SUPER_MAGIC
}

fn dev_of(m: &std::fs::Metadata) -> (u32, u32) {
    (rustix::fs::major(m.dev()), rustix::fs::minor(m.dev()))
}

/// True when `mount_point` shows the root of the overlay described by `m` (not
/// shadowed by a later mount, and an overlay at all).
fn usable_root(m: &MountInfo) -> bool {
    m.fs_type == "overlay"
        && m.root == Path::new("/")
        && std::fs::metadata(&m.mount_point).is_ok_and(|st| st.is_dir() && dev_of(&st) == m.dev)
        && rustix::fs::statfs(&m.mount_point).is_ok_and(|s| is_overlayfs(&s))
}

/// How `upperdir` of a mount relates to the upper directory we look for.
#[derive(Debug, PartialEq, Eq)]
enum UpperMatch {
    Same,
    Different,
    /// A relative `upperdir` (relative to the mounting process's working directory,
    /// which is gone): it names the same directory only if `upper` ends with it.
    Maybe,
}

fn upper_match(upperdir: &[u8], upper_canon: &Path, upper_meta: &std::fs::Metadata) -> UpperMatch {
    let p = Path::new(OsStr::from_bytes(upperdir));
    if p.is_absolute() {
        let same = std::fs::canonicalize(p).is_ok_and(|c| c == upper_canon)
            || std::fs::metadata(p)
                .is_ok_and(|m| m.dev() == upper_meta.dev() && m.ino() == upper_meta.ino());
        return if same {
            UpperMatch::Same
        } else {
            UpperMatch::Different
        };
    }
    let rel: Vec<_> = p
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect();
    if rel.is_empty()
        || rel
            .iter()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return UpperMatch::Different;
    }
    let full: Vec<_> = upper_canon.components().collect();
    if full.len() >= rel.len() && full[full.len() - rel.len()..] == rel[..] {
        UpperMatch::Maybe
    } else {
        UpperMatch::Different
    }
}

/// Same type, mode, owner and nanosecond mtime (and size, for files): what the merged
/// view shows of an entry the upper directory has.
fn same_attrs(u: &std::fs::Metadata, m: &std::fs::Metadata) -> bool {
    u.file_type() == m.file_type()
        && u.mode() == m.mode()
        && u.uid() == m.uid()
        && u.gid() == m.gid()
        && u.mtime() == m.mtime()
        && u.mtime_nsec() == m.mtime_nsec()
        && (!u.is_file() || u.len() == m.len())
}

/// True when the top level of `merged` looks like the merged view of `upper`: the
/// roots and every top-level upper entry have the same attributes there (the merged
/// view shows an upper entry's own metadata), and no whiteout's name is visible.
/// Nanosecond mtimes make a match between unrelated trees implausible.
fn top_level_agrees(upper: &Path, merged: &Path) -> bool {
    let (Ok(ur), Ok(mr)) = (std::fs::metadata(upper), std::fs::metadata(merged)) else {
        return false;
    };
    if !same_attrs(&ur, &mr) {
        return false;
    }
    let Ok(rd) = std::fs::read_dir(upper) else {
        return false;
    };
    for child in rd {
        let Ok((name, um)) = child.and_then(|c| Ok((c.file_name(), c.metadata()?))) else {
            return false;
        };
        let whiteout = {
            use std::os::unix::fs::FileTypeExt;
            um.file_type().is_char_device() && um.rdev() == 0
        };
        let ok = match std::fs::symlink_metadata(merged.join(name)) {
            Ok(mm) => !whiteout && same_attrs(&um, &mm),
            Err(e) => whiteout && e.kind() == io::ErrorKind::NotFound,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Finds the merged mount of the overlay whose upper directory is `upper`, from
/// `/proc/self/mountinfo`: an overlay mount (of its root, not shadowed) whose
/// `upperdir=` names `upper` (compared as canonical paths and by device/inode, so
/// symlinks and `..` do not matter). A relative `upperdir` (relative to the mounting
/// process's directory, e.g. podman's storage with many layers) is accepted when
/// `upper` ends with it and the merged root shows the attributes (type, mode, owner,
/// nanosecond mtime, size) of the upper root and its top-level entries.
///
/// # Errors
/// I/O errors reading `upper` or mountinfo; [`Error::Usage`] when several different
/// overlays qualify.
pub fn find_merged(upper: &Path) -> Result<Option<PathBuf>> {
    find_merged_in(upper, &read_mountinfo()?)
}

/// As [`find_merged`], from the given mountinfo text.
///
/// # Errors
/// As [`find_merged`].
pub fn find_merged_in(upper: &Path, mountinfo: &[u8]) -> Result<Option<PathBuf>> {
    let upper_canon = std::fs::canonicalize(upper)
        .map_err(|e| Error::io(format!("cannot resolve {}", upper.display()), e))?;
    let upper_meta = std::fs::metadata(&upper_canon)
        .map_err(|e| Error::io(format!("cannot read {}", upper.display()), e))?;
    let mut found: Vec<MountInfo> = Vec::new();
    for m in parse_mountinfo(mountinfo) {
        if m.fs_type != "overlay" {
            continue;
        }
        let Some(ud) = m.option("upperdir") else {
            continue;
        };
        let ok = match upper_match(ud, &upper_canon, &upper_meta) {
            UpperMatch::Same => usable_root(&m),
            UpperMatch::Maybe => usable_root(&m) && top_level_agrees(&upper_canon, &m.mount_point),
            UpperMatch::Different => false,
        };
        if ok && !found.iter().any(|f| f.dev == m.dev) {
            found.push(m);
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|m| m.mount_point)),
        _ => Err(Error::Usage(format!(
            "several overlay mounts may have {} as their upper directory ({}); name the merged one",
            upper.display(),
            found
                .iter()
                .map(|m| m.mount_point.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Checks that `merged` is the root of a mounted overlay and, as far as
/// `/proc/self/mountinfo` tells (an absolute `upperdir=`), that its upper directory
/// is `upper`.
///
/// # Errors
/// [`Error::Usage`] naming what does not hold; I/O errors reading either path.
pub fn check_merged(upper: &Path, merged: &Path) -> Result<()> {
    check_merged_in(upper, merged, &read_mountinfo()?)
}

fn check_merged_in(upper: &Path, merged: &Path, mountinfo: &[u8]) -> Result<()> {
    let st = std::fs::metadata(merged)
        .map_err(|e| Error::io(format!("cannot read {}", merged.display()), e))?;
    let is_overlay = rustix::fs::statfs(merged).is_ok_and(|s| is_overlayfs(&s));
    if !st.is_dir() || !is_overlay {
        return Err(Error::Usage(format!(
            "{} is not a mounted overlayfs (the merged view of {})",
            merged.display(),
            upper.display()
        )));
    }
    let canon = std::fs::canonicalize(merged)
        .map_err(|e| Error::io(format!("cannot resolve {}", merged.display()), e))?;
    let upper_canon = std::fs::canonicalize(upper)
        .map_err(|e| Error::io(format!("cannot resolve {}", upper.display()), e))?;
    let upper_meta = std::fs::metadata(&upper_canon)
        .map_err(|e| Error::io(format!("cannot read {}", upper.display()), e))?;
    let mounts: Vec<MountInfo> = parse_mountinfo(mountinfo)
        .into_iter()
        .filter(|m| m.fs_type == "overlay" && m.dev == dev_of(&st))
        .collect();
    let Some(m) = mounts
        .iter()
        .find(|m| std::fs::canonicalize(&m.mount_point).is_ok_and(|c| c == canon))
    else {
        return Err(Error::Usage(format!(
            "{} is not the root of an overlay mount (the merged view of {})",
            merged.display(),
            upper.display()
        )));
    };
    if m.root != Path::new("/") {
        return Err(Error::Usage(format!(
            "{} is a bind mount of {} inside an overlay, not its merged root",
            merged.display(),
            m.root.display()
        )));
    }
    if let Some(ud) = m.option("upperdir") {
        if upper_match(ud, &upper_canon, &upper_meta) == UpperMatch::Different {
            return Err(Error::Usage(format!(
                "the overlay mounted at {} has upperdir={}, not {}",
                merged.display(),
                String::from_utf8_lossy(ud),
                upper.display()
            )));
        }
    } else {
        return Err(Error::Usage(format!(
            "the overlay mounted at {} has no upper directory",
            merged.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal_sequences() {
        assert_eq!(unescape_mountinfo(br"/a\040b"), b"/a b");
        assert_eq!(
            unescape_mountinfo(br"t\011n\012b\134c\054d"),
            b"t\tn\nb\\c,d"
        );
        // Not an escape: kept as it is.
        assert_eq!(unescape_mountinfo(br"\x41\09"), br"\x41\09");
        assert_eq!(unescape_mountinfo(br"end\04"), br"end\04");
        assert_eq!(unescape_mountinfo(br"\"), br"\");
        assert_eq!(unescape_mountinfo(br"\777"), br"\777");
    }

    #[test]
    fn parses_overlay_lines_with_escapes_and_optional_fields() {
        let text = concat!(
            "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n",
            r"44 27 0:39 / /tmp/ov\040t,e=s\134t/merged rw,relatime shared:7 master:2 - overlay overlay rw,lowerdir=/l\054x:/l2,upperdir=/tmp/a\040b/up\054per,workdir=/tmp/w,redirect_dir=on,uuid=on,metacopy=on",
            "\n",
            "45 27 0:40 /sub /mnt/bind rw - overlay overlay rw,lowerdir=l,upperdir=rel/diff,workdir=rel/work\n",
            "garbage line\n",
        );
        let all = parse_mountinfo(text.as_bytes());
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].fs_type, "ext4");
        assert_eq!(all[0].dev, (8, 1));
        let o = &all[1];
        assert_eq!(o.dev, (0, 39));
        assert_eq!(o.fs_type, "overlay");
        assert_eq!(o.root, Path::new("/"));
        assert_eq!(o.mount_point, Path::new("/tmp/ov t,e=s\\t/merged"));
        assert_eq!(o.option("upperdir"), Some(&b"/tmp/a b/up,per"[..]));
        assert_eq!(o.option("lowerdir"), Some(&b"/l,x:/l2"[..]));
        assert_eq!(o.option("metacopy"), Some(&b"on"[..]));
        assert_eq!(o.option("rw"), None);
        assert!(o
            .super_options
            .iter()
            .any(|(k, v)| k == b"rw" && v.is_none()));
        assert_eq!(all[2].root, Path::new("/sub"));
        assert_eq!(all[2].option("upperdir"), Some(&b"rel/diff"[..]));
    }

    #[test]
    fn relative_upperdirs_match_only_as_a_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("ID/diff");
        std::fs::create_dir_all(&upper).unwrap();
        let canon = std::fs::canonicalize(&upper).unwrap();
        let meta = std::fs::metadata(&canon).unwrap();
        assert_eq!(upper_match(b"ID/diff", &canon, &meta), UpperMatch::Maybe);
        assert_eq!(upper_match(b"./ID/diff", &canon, &meta), UpperMatch::Maybe);
        assert_eq!(
            upper_match(b"OTHER/diff", &canon, &meta),
            UpperMatch::Different
        );
        assert_eq!(
            upper_match(b"../ID/diff", &canon, &meta),
            UpperMatch::Different
        );
        // An absolute upperdir through a symlink is the same directory.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("ID"), &link).unwrap();
        let via_link = link.join("diff");
        assert_eq!(
            upper_match(via_link.as_os_str().as_bytes(), &canon, &meta),
            UpperMatch::Same
        );
        assert_eq!(
            upper_match(dir.path().as_os_str().as_bytes(), &canon, &meta),
            UpperMatch::Different
        );
    }

    #[test]
    fn no_overlay_means_no_merged_view() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "44 27 0:39 / /nonexistent/merged rw - overlay overlay rw,lowerdir=/l,upperdir={},workdir=/w\n",
            dir.path().display()
        );
        // The mount point does not exist (not usable): nothing is found.
        assert_eq!(find_merged_in(dir.path(), text.as_bytes()).unwrap(), None);
    }

    /// The cost of the metadata-only pre-scan on an upper dir of 50,000 files in 500
    /// directories (a tenth with a user xattr), against the walk `plan_inputs` does
    /// anyway. Run with `--ignored --nocapture`; `CKSTREAM_PRESCAN_UPPER=DIR` times an
    /// existing tree of that shape instead (e.g. on a freshly mounted filesystem, for
    /// cold-cache numbers: the first round).
    #[test]
    #[ignore]
    fn prescan_cost_on_50k_files() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let given = std::env::var_os("CKSTREAM_PRESCAN_UPPER").map(std::path::PathBuf::from);
        let upper = given.clone().unwrap_or_else(|| dir.path().join("upper"));
        for d in 0..if given.is_some() { 0 } else { 500 } {
            let sub = upper.join(format!("d{d:03}"));
            std::fs::create_dir_all(&sub).unwrap();
            for f in 0..100 {
                let p = sub.join(format!("f{f:03}"));
                std::fs::write(&p, b"x").unwrap();
                if f % 10 == 0 {
                    let _ =
                        rustix::fs::setxattr(&p, "user.k", b"v", rustix::fs::XattrFlags::empty());
                }
            }
        }
        for round in 0..3 {
            let t = std::time::Instant::now();
            assert_eq!(find_indirect(&upper).unwrap(), None);
            let scan = t.elapsed();
            let t = std::time::Instant::now();
            let plan =
                crate::plan_inputs(&[crate::PackInput::new(b"rootfs".to_vec(), &upper)]).unwrap();
            let walk = t.elapsed();
            assert_eq!(plan.entries.len(), 50_501);
            eprintln!("round {round}: pre-scan {scan:?}, plan_inputs walk {walk:?}");
        }
    }

    #[test]
    fn scan_finds_metacopy_and_redirect_xattr_names() {
        let names: [&[u8]; 2] = [b"trusted.overlay.origin", b"trusted.overlay.metacopy"];
        assert_eq!(indirect_kind(false, true, names), Some(Indirect::Metacopy));
        assert_eq!(indirect_kind(true, false, names), None);
        let names: [&[u8]; 1] = [b"user.overlay.redirect"];
        assert_eq!(
            indirect_kind(true, false, names),
            Some(Indirect::RedirectDir)
        );
        let names: [&[u8]; 1] = [b"user.overlayx.redirect"];
        assert_eq!(indirect_kind(true, false, names), None);
    }
}
