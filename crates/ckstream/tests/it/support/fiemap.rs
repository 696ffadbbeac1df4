//! FIEMAP: which of a file's extents are shared with another file (reflinks).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

#[repr(C)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; 512],
}

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 1;
const FIEMAP_EXTENT_LAST: u32 = 1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;

/// (shared bytes, total mapped bytes) of a file, from FIEMAP.
pub fn shared_bytes(path: &Path) -> (u64, u64) {
    let f = File::open(path).unwrap();
    let mut shared = 0;
    let mut total = 0;
    let mut start = 0u64;
    loop {
        // SAFETY: an all-zero Fiemap is a valid value of this plain C struct.
        let mut fm: Box<Fiemap> = Box::new(unsafe { std::mem::zeroed() });
        fm.start = start;
        fm.length = u64::MAX - start;
        fm.flags = FIEMAP_FLAG_SYNC;
        fm.extent_count = 512;
        // SAFETY: FIEMAP fills the struct it is given, sized for `extent_count` extents.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *fm as *mut Fiemap) };
        assert_eq!(r, 0, "FIEMAP failed: {}", std::io::Error::last_os_error());
        if fm.mapped_extents == 0 {
            break;
        }
        let mut last = false;
        for e in &fm.extents[..fm.mapped_extents as usize] {
            total += e.length;
            if e.flags & FIEMAP_EXTENT_SHARED != 0 {
                shared += e.length;
            }
            start = e.logical + e.length;
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            break;
        }
    }
    (shared, total)
}
