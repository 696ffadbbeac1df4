//! Sharing extents between files: FICLONERANGE, then copy_file_range, then the caller copies.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// How a range ended up in the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Extents shared (reflink).
    Cloned,
    /// Copied in the kernel by copy_file_range (which may itself share extents).
    KernelCopy,
    /// Nothing done: the caller must copy the bytes.
    NotDone,
}

#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

// _IOW(0x94, 13, struct file_clone_range)
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

/// Shares `len` bytes of `src` at `src_off` into `dst` at `dst_off`.
///
/// # Errors
/// The raw OS error: EXDEV, EOPNOTSUPP, EINVAL (unaligned) and so on.
pub fn ficlonerange(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<()> {
    let arg = FileCloneRange {
        src_fd: src.as_raw_fd() as i64,
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    // SAFETY: FICLONERANGE reads a properly laid out struct file_clone_range.
    let r = unsafe {
        libc::ioctl(
            dst.as_raw_fd(),
            FICLONERANGE as _,
            &arg as *const FileCloneRange,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EXDEV
                | libc::EOPNOTSUPP
                | libc::EINVAL
                | libc::ENOSYS
                | libc::ETXTBSY
                | libc::EBADF
                | libc::EPERM
                | libc::ENOTTY
        )
    )
}

/// Shares `len` block-aligned bytes of `src` at `src_off` into `dst` at `dst_off` by
/// reflink: true when shared, false when this filesystem (or this pair of files) cannot,
/// with nothing written.
///
/// # Errors
/// I/O errors other than "not possible here".
pub fn clone_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<bool> {
    match ficlonerange(src, src_off, dst, dst_off, len) {
        Ok(()) => Ok(true),
        Err(e) if is_unsupported(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Places `len` bytes of `src` at `src_off` into `dst` at `dst_off`: by reflink when
/// offsets and length are block-aligned (`block`) and the filesystem shares extents,
/// else by copy_file_range, else reports [`CopyMethod::NotDone`].
///
/// # Errors
/// I/O errors other than "not possible here".
pub fn clone_or_copy_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
    block: u64,
) -> io::Result<CopyMethod> {
    if len == 0 {
        return Ok(CopyMethod::Cloned);
    }
    let aligned = src_off % block == 0 && dst_off % block == 0 && len % block == 0;
    if aligned {
        match ficlonerange(src, src_off, dst, dst_off, len) {
            Ok(()) => return Ok(CopyMethod::Cloned),
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let mut done = 0u64;
    while done < len {
        let mut so = src_off + done;
        let mut doff = dst_off + done;
        match rustix::fs::copy_file_range(
            src,
            Some(&mut so),
            dst,
            Some(&mut doff),
            (len - done) as usize,
        ) {
            Ok(0) => break,
            Ok(n) => done += n as u64,
            Err(e) => {
                let e = io::Error::from(e);
                if done == 0 && is_unsupported(&e) {
                    return Ok(CopyMethod::NotDone);
                }
                return Err(e);
            }
        }
    }
    if done < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "source shorter than the range to copy",
        ));
    }
    Ok(CopyMethod::KernelCopy)
}
