//! Podman interoperability: reading a container's state straight from podman's
//! storage (bundle, CRIU images, overlay upper dir, libpod database), writing and
//! reading podman's checkpoint archive layout as a block-aligned tar, converting
//! between it and `.cka`, and driving `podman`. The operations the CLI maps its
//! commands onto are [`checkpoint::checkpoint`], [`restore::restore`],
//! [`import::import`] and [`export::write_podman_archive`] (with
//! [`export::plan_from_cka`]); [`hook::run_hook`] is the OCI prestart hook of a
//! restore; [`trust`] and [`symlinks`] are what a restore checks in an archive it cannot
//! trust (the container settings it asks for, rootfs changes through symlinks).

pub mod boltdb;
pub mod checkpoint;
pub mod config_dump;
pub mod deleted;
pub mod diff;
pub mod error;
pub mod export;
pub mod hook;
pub mod import;
pub mod inspect;
pub mod layers;
pub mod layout;
pub mod place;
pub mod podman;
pub mod restore;
pub mod symlinks;
pub mod tar;
pub mod trust;

pub use error::{PodmanError, Result};
