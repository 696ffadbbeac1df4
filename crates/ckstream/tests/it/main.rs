//! Integration tests of the `ckstream` binary, one binary for every area, run with real
//! components: the real CLI, real CRIU dumping and restoring live process trees whose
//! memory is checked afterwards, real podman and runc, loopback btrfs/XFS/ext4 for
//! reflinks and power-cut copies, real FUSE mounts, and a local S3 server (SeaweedFS).
//! Tests that need root or a tool skip on a developer laptop and fail instead when
//! `CKSTREAM_REQUIRE_PRIVILEGED=1` (as in CI).

#[macro_use]
mod support;

// Archives of files.
mod bad_input;
mod incremental;
mod keys;
mod mount;
mod reflink;
mod roundtrip;
mod s3;

// Checkpoints of processes and containers.
mod criu;
mod faults;
mod inspect;
mod lazy;
mod podman;
mod rootfs;
mod soak;
