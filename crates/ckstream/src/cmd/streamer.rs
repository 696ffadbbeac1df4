//! `capture`, `serve` and `extract`: drop-in replacements for criu-image-streamer's
//! commands (same options, same progress messages), reading and writing `.cka`.
//!
//! Options come before the subcommand (`ckstream -D DIR --shard-fds 10,11 capture`) and
//! the binary also answers to the name `criu-image-streamer`. Shards are the fds given
//! (default stdout for capture, stdin otherwise). Progress lines go to `--progress-fd`
//! (default stderr): capture writes `socket-init`, `checkpoint-start`, then the stats
//! JSON; serve writes the stats JSON, then `socket-init`; extract writes the stats JSON.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ckstream_criu::capture::{capture_archive, CaptureEvent, CaptureOptions};
use ckstream_criu::serve::{serve, ServeOptions};
use ckstream_criu::socket;
use ckstream_format::{ArchiveReader, Compression, WriterOptions};
use ckstream_store::{take_fd, ArchiveLocation, ArchiveSpec, Writeback};

/// criu-image-streamer's global options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StreamerOpts {
    /// Images directory where the CRIU UNIX socket is created.
    #[arg(
        short = 'D',
        long = "images-dir",
        global = true,
        help_heading = "criu-image-streamer options"
    )]
    pub images_dir: Option<PathBuf>,
    /// Shard file descriptors, comma separated (default: 1 for capture, 0 otherwise).
    #[arg(
        short = 's',
        long = "shard-fds",
        value_delimiter = ',',
        global = true,
        help_heading = "criu-image-streamer options"
    )]
    pub shard_fds: Vec<i32>,
    /// External files as filename:fd, comma separated.
    #[arg(
        short = 'e',
        long = "ext-file-fds",
        value_delimiter = ',',
        global = true,
        help_heading = "criu-image-streamer options"
    )]
    pub ext_file_fds: Vec<String>,
    /// File descriptor for progress messages (default: stderr).
    #[arg(
        short = 'p',
        long = "progress-fd",
        global = true,
        help_heading = "criu-image-streamer options"
    )]
    pub progress_fd: Option<i32>,
}

#[derive(Debug, clap::Args)]
pub struct CaptureArgs {
    /// Compression inside the archive: none (default, like criu-image-streamer), lz4, zstd, zstd:LEVEL.
    #[arg(short, long, default_value = "none")]
    compress: Compression,
    #[command(flatten)]
    keys: super::key::WriteKeyArgs,
}

fn ext_files(specs: &[String]) -> Result<Vec<(String, OwnedFd)>> {
    specs
        .iter()
        .map(|s| {
            let (name, fd) = s
                .rsplit_once(':')
                .with_context(|| format!("--ext-file-fds wants filename:fd, got {s:?}"))?;
            let fd: i32 = fd.parse().with_context(|| format!("bad fd in {s:?}"))?;
            if name.is_empty() || name.contains('/') {
                bail!("bad external file name {name:?}");
            }
            Ok((
                name.to_string(),
                OwnedFd::from(take_fd(fd, "external file")?),
            ))
        })
        .collect()
}

struct Progress(Option<File>);

impl Progress {
    fn new(fd: Option<i32>) -> Self {
        let f = match fd {
            Some(fd) => take_fd(fd, "progress").ok(),
            None => take_fd(2, "progress").ok(),
        };
        Progress(f)
    }

    fn line(&mut self, msg: &str) {
        // The reader may be gone; progress is best effort, like criu-image-streamer.
        if let Some(f) = self.0.as_mut() {
            let _ = writeln!(f, "{msg}");
        }
    }

    fn stats(&mut self, shards: &[(u64, u128)]) {
        let v = serde_json::json!({
            "shards": shards.iter().map(|(size, ms)| serde_json::json!({"size": size, "transfer_duration_millis": ms})).collect::<Vec<_>>()
        });
        self.line(&v.to_string());
    }
}

fn images_dir(o: &StreamerOpts) -> Result<&Path> {
    o.images_dir
        .as_deref()
        .context("--images-dir (-D) is required")
}

pub fn capture_cmd(o: &StreamerOpts, args: CaptureArgs) -> Result<()> {
    let dir = images_dir(o)?;
    crate::interrupt::install();
    let mut progress = Progress::new(o.progress_fd);
    let fds = if o.shard_fds.is_empty() {
        vec![1]
    } else {
        o.shard_fds.clone()
    };
    let spec = ArchiveSpec {
        shards: u32::try_from(fds.len()).context("too many shard fds")?,
        writer: WriterOptions {
            compression: args.compress,
            keys: args.keys.load()?,
            ..Default::default()
        },
        command: "capture",
        writeback: Writeback::Off,
    };
    let opts = CaptureOptions {
        ext_files: ext_files(&o.ext_file_fds)?,
        stop: crate::interrupt::stop(),
        ..Default::default()
    };
    let clock = Instant::now();
    let summary = capture_archive(
        dir,
        &ArchiveLocation::Fds(fds),
        &spec,
        opts,
        &mut |e| match e {
            CaptureEvent::Listening => progress.line("socket-init"),
            CaptureEvent::CheckpointStart => progress.line("checkpoint-start"),
            _ => {}
        },
    )
    .context("capture failed; the archive was not committed")?;
    let ms = clock.elapsed().as_millis();
    progress.stats(
        &summary
            .shard_sizes
            .iter()
            .map(|&s| (s, ms))
            .collect::<Vec<_>>(),
    );
    Ok(())
}

/// Opens the archive from the shard fds: regular files directly, pipes by spooling them
/// into unlinked temporary files in `dir` (the stream must be complete before anything
/// can be trusted: its commit footer comes last). Returns each shard's size and how
/// long receiving the archive took, for the progress line.
fn open_from_fds(o: &StreamerOpts, dir: &Path) -> Result<(ArchiveReader, Vec<(u64, u128)>)> {
    let fds = if o.shard_fds.is_empty() {
        vec![0]
    } else {
        o.shard_fds.clone()
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let t = Instant::now();
    let reader = ArchiveLocation::Fds(fds).open_keyed(dir, &super::key::read_keys()?)?;
    let ms = t.elapsed().as_millis();
    let stats = reader
        .shard_sizes()?
        .into_iter()
        .map(|size| (size, ms))
        .collect();
    Ok((reader, stats))
}

pub fn serve_cmd(o: &StreamerOpts) -> Result<()> {
    let dir = images_dir(o)?;
    crate::interrupt::install();
    let mut progress = Progress::new(o.progress_fd);
    let ext = ext_files(&o.ext_file_fds)?;
    let (reader, stats) = open_from_fds(o, dir)?;
    ckstream_criu::restore::verify_metadata(&reader)?;
    progress.stats(&stats);
    let listener = socket::bind(dir, socket::SERVE_SOCKET)?;
    progress.line("socket-init");
    let opts = ServeOptions {
        ext_files: ext,
        stop: crate::interrupt::stop(),
        ..Default::default()
    };
    let result = serve(&listener, Arc::new(reader), opts);
    let _ = std::fs::remove_file(dir.join(socket::SERVE_SOCKET));
    result.context("serving the images to CRIU")?;
    Ok(())
}

pub fn extract_cmd(o: &StreamerOpts) -> Result<()> {
    let dir = images_dir(o)?;
    let mut progress = Progress::new(o.progress_fd);
    let ext = ext_files(&o.ext_file_fds)?;
    let (reader, stats) = open_from_fds(o, dir)?;
    progress.stats(&stats);
    ckstream_criu::restore::extract(&reader, dir, ext, super::default_threads())?;
    Ok(())
}
