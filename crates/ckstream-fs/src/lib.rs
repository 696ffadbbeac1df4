//! The filesystem side of ckstream: turning directory trees into archive entries
//! (with sparse maps, hardlinks, xattrs and reflink sources) and extracting
//! archives into a directory without ever writing outside it.
//!
//! Extraction resolves every path relative to an open directory handle with
//! `O_NOFOLLOW` on each component, so neither links inside the archive nor links
//! already present in the target can redirect a write.

pub mod mount;
pub mod overlay;
pub mod pack;
pub mod unpack;
pub mod xattr;

pub use overlay::{check_merged, find_indirect, find_merged, Indirect, IndirectEntry};
pub use pack::{
    pack_inputs, parse_input, plan_inputs, prepare_rootfs_diff, rootfs_diff_input, Overlay,
    PackInput, PackPlan, PackStats, ROOTFS_PREFIX,
};
pub use unpack::{is_opaque, is_whiteout, unpack, verify_unverified, UnpackOptions, UnpackStats};
