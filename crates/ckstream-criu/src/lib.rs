//! The CRIU side of ckstream: CRIU's image-streamer protocol, running CRIU, and the
//! two operations built on them, [`dump::dump`] (a live tree into a new archive,
//! committed before CRIU may kill it) and [`restore::restore`].
//!
//! With `criu dump --stream` CRIU connects to `DIR/streamer-capture.sock` and, for each
//! image file, sends a request (u32 little-endian length + protobuf
//! `img_streamer_request_entry{filename}`) followed by the read end of a pipe
//! (SCM_RIGHTS). [`capture`] reads those pipes into an archive writer. With
//! `criu restore --stream` CRIU connects to `DIR/streamer-serve.sock`, asks for files
//! in any order, and gets `img_streamer_reply_entry{exists}` plus, when the file
//! exists, sends the write end of a pipe that [`serve`] fills from the archive —
//! concurrently, in any order, as many times as CRIU asks, never buffering the image.

pub mod capture;
pub mod diff;
pub mod dump;
pub mod error;
pub mod images;
pub mod inspect;
pub mod lazy;
pub mod pages;
pub mod proto;
pub mod restore;
pub mod run;
pub mod serve;
pub mod socket;
pub mod stats;
pub mod workdir;

pub use error::{CriuError, Result};

/// Archive directory under which CRIU image files are stored.
pub const IMAGES_PREFIX: &str = "criu";

/// Archive path of CRIU image file `name`.
pub fn image_path(name: &str) -> Vec<u8> {
    format!("{IMAGES_PREFIX}/{name}").into_bytes()
}

/// CRIU image files that are not memory pages: small, needed first on restore.
pub fn is_metadata_image(name: &str) -> bool {
    !(name.starts_with("pages-") && name.ends_with(".img"))
}
