//! Command-line definition and one module per subcommand.

mod cat;
mod dump;
mod flatten;
mod info;
mod inspect;
pub mod key;
mod ls;
mod mount;
mod pack;
mod podman;
mod restore;
mod streamer;
mod unpack;
mod verify;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Fast, verified checkpoint archives for CRIU processes and containers.
#[derive(Debug, Parser)]
#[command(name = "ckstream", version, about)]
pub struct Cli {
    /// No progress bars or summaries on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(flatten)]
    pub streamer: streamer::StreamerOpts,

    #[command(flatten)]
    pub keys: key::ReadKeyArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pack files and directories (a CRIU image dir, a rootfs, anything) into an archive.
    Pack(pack::Args),
    /// Extract an archive (or some paths of it) into a directory.
    Unpack(unpack::Args),
    /// List the entries of an archive.
    Ls(ls::Args),
    /// Write one file of an archive to stdout, reading only its chunks.
    Cat(cat::Args),
    /// Check every record and digest of an archive.
    Verify(verify::Args),
    /// Show sizes, counts, codecs and shards of an archive.
    Info(info::Args),
    /// What a checkpoint holds: processes, files, sockets, memory, mounts, rootfs changes.
    Inspect(inspect::Args),
    /// How two checkpoints differ: processes, files, sockets, memory, rootfs, meta.
    Diff(inspect::DiffArgs),
    /// Write an incremental archive's content into a new archive that needs no parent.
    Flatten(flatten::Args),
    /// Mount an archive read-only (FUSE), fetching file data only when it is read.
    Mount(mount::Args),
    /// Checkpoint a live process tree with CRIU straight into an archive.
    Dump(dump::Args),
    /// Restore a process tree from an archive, streaming images to CRIU.
    Restore(restore::Args),
    /// Key pairs for signed and encrypted archives.
    #[command(subcommand)]
    Key(key::Command),
    /// Podman containers: checkpoint into `.cka` or podman's format, convert, restore.
    #[command(subcommand)]
    Podman(podman::Command),
    /// criu-image-streamer compatible: capture CRIU's image stream into an archive on the shard fds.
    Capture(streamer::CaptureArgs),
    /// criu-image-streamer compatible: serve an archive from the shard fds to `criu restore --stream`.
    Serve,
    /// criu-image-streamer compatible: extract an archive from the shard fds into --images-dir.
    Extract,
    /// OCI prestart hook of `ckstream podman restore` (internal).
    #[command(name = "__podman-rootfs-hook", hide = true)]
    PodmanRootfsHook { ticket: PathBuf },
    /// Cleans up after a `ckstream podman restore` that died half-way (internal).
    #[command(name = "__podman-restore-guard", hide = true)]
    PodmanRestoreGuard {
        podman_pid: u32,
        fifo: PathBuf,
        remove: Option<String>,
    },
    /// Action script CRIU runs during `ckstream dump` (internal).
    #[command(name = "__criu-hook", hide = true)]
    CriuHook,
}

pub fn run(cli: Cli) -> Result<()> {
    key::set_read_keys(&cli.keys)?;
    match cli.command {
        Command::Key(c) => key::run(c),
        Command::Pack(a) => pack::run(a, cli.quiet),
        Command::Unpack(a) => unpack::run(a, cli.quiet),
        Command::Ls(a) => ls::run(a),
        Command::Cat(a) => cat::run(a),
        Command::Verify(a) => verify::run(a, cli.quiet),
        Command::Info(a) => info::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Diff(a) => inspect::diff(a),
        Command::Flatten(a) => flatten::run(a, cli.quiet),
        Command::Mount(a) => mount::run(a, cli.quiet),
        Command::Dump(a) => dump::run(a, cli.quiet),
        Command::Restore(a) => restore::run(a, cli.quiet),
        Command::Podman(c) => podman::run(c, cli.quiet),
        Command::Capture(a) => streamer::capture_cmd(&cli.streamer, a),
        Command::Serve => streamer::serve_cmd(&cli.streamer),
        Command::Extract => streamer::extract_cmd(&cli.streamer),
        Command::PodmanRootfsHook { ticket } => podman::rootfs_hook(&ticket),
        Command::PodmanRestoreGuard {
            podman_pid,
            fifo,
            remove,
        } => std::process::exit(ckstream_podman::place::guard(
            podman_pid,
            &fifo,
            remove.as_deref(),
            std::io::stdin().lock(),
        )),
        Command::CriuHook => std::process::exit(ckstream_criu::run::hook_client()),
    }
}

/// Opens an archive given on the command line (standard input is spooled to an
/// unlinked file in the temporary directory first: its commit footer comes last).
pub fn open(location: &ckstream_store::ArchiveLocation) -> Result<ckstream_format::ArchiveReader> {
    let keys = key::read_keys()?;
    location
        .open_keyed(&std::env::temp_dir(), &keys)
        .map_err(|e| {
            let what = match location {
                ckstream_store::ArchiveLocation::Std => "the archive on stdin".to_string(),
                other => other.to_string(),
            };
            anyhow::Error::new(e).context(format!("cannot read {what}"))
        })
}

/// Default number of worker threads: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// `--parent` and `--max-chain` of the commands that write checkpoints.
#[derive(Debug, clap::Args)]
pub struct ParentArgs {
    /// Store only the chunks that are not in this archive already (nor in its own
    /// parents): an incremental archive, which needs them to be read. It must lie beside
    /// the new archive (its directory or below; the same bucket for s3://).
    #[arg(long, value_name = "ARCHIVE")]
    parent: Option<ckstream_store::ArchiveLocation>,
    /// Longest chain of archives behind a new one: when --parent would make it longer,
    /// the new archive is stored in full instead.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64), requires = "parent")]
    max_chain: u32,
}

impl ParentArgs {
    /// What an archive written to `output` may reference: `None` without `--parent` or
    /// when the chain would grow past `--max-chain`.
    pub fn load(
        &self,
        output: &ckstream_store::ArchiveLocation,
        quiet: bool,
    ) -> Result<Option<std::sync::Arc<ckstream_format::ParentChunks>>> {
        let Some(at) = &self.parent else {
            return Ok(None);
        };
        let parent = open(at).map_err(|e| e.context("cannot use it as --parent"))?;
        let depth = parent.index().parents.len() + 1;
        if depth > self.max_chain as usize {
            if !quiet {
                eprintln!(
                    "ckstream: {at} already ends a chain of {depth} archives (--max-chain {}): storing the new archive in full",
                    self.max_chain
                );
            }
            return Ok(None);
        }
        let chunks = output.parent_chunks(&parent, at)?;
        Ok(Some(std::sync::Arc::new(chunks)))
    }
}
