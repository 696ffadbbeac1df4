//! The command line of `ckstream podman`: what each subcommand takes.

use std::path::PathBuf;

use ckstream_format::CompressionArg;
use ckstream_store::ArchiveLocation;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Checkpoint a running container (podman drives CRIU in place) and write its
    /// CRIU images, rootfs changes and podman metadata in one pass.
    Checkpoint(CheckpointArgs),
    /// Convert a podman export (`podman container checkpoint -e`, tar or tar.zst) to `.cka`.
    Import(ImportArgs),
    /// Convert a `.cka` made by `ckstream podman checkpoint|import` to podman's export format.
    Export(ExportArgs),
    /// Restore a container through `podman container restore --import` from either format.
    Restore(RestoreArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// ckstream's archive: indexed, checksummed, shardable.
    Cka,
    /// podman's export layout, readable by `podman container restore --import` and GNU tar.
    Podman,
}

#[derive(Debug, clap::Args)]
pub struct CheckpointArgs {
    /// Container name or ID.
    pub(super) container: String,
    /// Output archive (`-` for stdout; `s3://BUCKET/KEY` for the cka format).
    #[arg(short, long)]
    pub(super) output: ArchiveLocation,
    #[arg(long, value_enum, default_value = "cka")]
    pub(super) format: Format,
    /// none (reflinks on btrfs/XFS), lz4 (cka only), zstd (level 3, as podman) or zstd:LEVEL.
    #[arg(short, long, default_value = "none")]
    pub(super) compress: CompressionArg,
    /// Keep the container running after the checkpoint.
    #[arg(long)]
    pub(super) leave_running: bool,
    /// Shards for the cka format.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub(super) shards: u32,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub(super) json: bool,
    #[command(flatten)]
    pub(super) keys: crate::cmd::key::WriteKeyArgs,
    #[command(flatten)]
    pub(super) parent: crate::cmd::ParentArgs,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// podman export archive (tar or tar.zst).
    pub(super) input: PathBuf,
    #[arg(short, long)]
    pub(super) output: ArchiveLocation,
    #[arg(short, long, default_value = "none")]
    pub(super) compress: CompressionArg,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub(super) shards: u32,
    #[arg(long)]
    pub(super) json: bool,
    #[command(flatten)]
    pub(super) keys: crate::cmd::key::WriteKeyArgs,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// `.cka` archive.
    pub(super) input: ArchiveLocation,
    /// podman archive to write (`-` for stdout).
    #[arg(short, long)]
    pub(super) output: ArchiveLocation,
    /// none or zstd[:LEVEL] (podman reads both).
    #[arg(short, long, default_value = "none")]
    pub(super) compress: CompressionArg,
    #[arg(long)]
    pub(super) json: bool,
}

/// Who applies the rootfs diff of a `.cka` on restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ApplyDiff {
    /// ckstream, into the new container's overlay upper directory before podman mounts
    /// it, with the CRIU images placed in its bundle: reflinked from an uncompressed
    /// archive on the same filesystem, never through a tar or the overlay (podman's
    /// kernel overlay storage).
    Storage,
    /// ckstream, from the archive, in a one-shot OCI prestart hook that runc runs after
    /// mounting the new container's root and before CRIU opens files.
    #[value(alias = "ckstream")]
    Hook,
    /// podman, from a `rootfs-diff.tar` in the converted archive (its own code path).
    Podman,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// `.cka` or podman export archive.
    pub(super) input: ArchiveLocation,
    /// Restore under a new name (podman then also drops the static IP/MAC).
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Where the temporary podman archive goes when restoring a `.cka`
    /// (default: beside the archive, so its data can be reflinked).
    #[arg(long)]
    pub(super) temp_dir: Option<PathBuf>,
    /// Who applies a `.cka`'s rootfs diff (default: storage on podman's kernel overlay
    /// storage; otherwise the hook for local archives and podman for object-store ones,
    /// whose credentials the hook would not have).
    #[arg(long, value_enum)]
    pub(super) apply_diff: Option<ApplyDiff>,
    /// With `--apply-diff storage`: share the uncompressed rootfs diff's files by reflink
    /// without reading them first, so the container runs sooner, and check them against
    /// their digests while it runs (their extents are the archive's own: only the archive
    /// can have rotted). A mismatch fails the command (exit 3) naming the files; the
    /// container is left running. The CRIU images are always verified before CRIU starts.
    #[arg(long)]
    pub(super) verify_rootfs_after_start: bool,
    /// Restore even if the archive's container config asks for OCI hooks, privileged
    /// mode, host mounts, added capabilities or devices, or host namespaces (shown on
    /// every restore; refused otherwise). Only for archives whose origin you trust.
    #[arg(long)]
    pub(super) trust_config: bool,
    #[arg(long)]
    pub(super) json: bool,
}
