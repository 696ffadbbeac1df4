//! Podman interoperability: reading a container's state straight from podman's
//! storage (bundle, CRIU images, overlay upper dir, libpod database), writing and
//! reading podman's checkpoint archive layout as a block-aligned tar, converting
//! between it and `.cka`, and driving `podman` for checkpoint and restore.

pub mod boltdb;
pub mod config_dump;
pub mod deleted;
pub mod diff;
pub mod export;
pub mod import;
pub mod layout;
pub mod podman;
pub mod tar;
