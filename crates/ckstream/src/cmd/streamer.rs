//! `capture`, `serve` and `extract`: drop-in replacements for criu-image-streamer's
//! commands (same options, same progress messages), reading and writing `.cka`.
//!
//! Options come before the subcommand (`ckstream -D DIR --shard-fds 10,11 capture`) and
//! the binary also answers to the name `criu-image-streamer`. Shards are the fds given
//! (default stdout for capture, stdin otherwise). Progress lines go to `--progress-fd`
//! (default stderr): capture writes `socket-init`, `checkpoint-start`, then the stats
//! JSON; serve writes the stats JSON, then `socket-init`; extract writes the stats JSON.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ckstream_criu::capture::{capture, CaptureEvent, CaptureOptions};
use ckstream_criu::serve::{serve, stream_entry, ServeOptions};
use ckstream_criu::{socket, IMAGES_PREFIX};
use ckstream_format::{
    ArchiveReader, ArchiveWriter, Compression, EntryKind, ShardSink, ShardSource, WriterOptions,
};
use ckstream_store::{FdSink, FileSource};

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
    compress: String,
}

/// Takes ownership of an inherited fd (duplicated, so closing ours leaves the caller's alone).
fn take_fd(fd: i32, what: &str) -> Result<File> {
    // SAFETY: the fd number comes from the command line; dup gives us our own descriptor.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let owned = rustix::io::fcntl_dupfd_cloexec(borrowed, 3)
        .with_context(|| format!("{what} fd {fd} is not open"))?;
    Ok(File::from(owned))
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
    let compression: Compression = args.compress.parse()?;
    crate::interrupt::install();
    let mut progress = Progress::new(o.progress_fd);
    let fds = if o.shard_fds.is_empty() {
        vec![1]
    } else {
        o.shard_fds.clone()
    };
    let sinks = fds
        .iter()
        .map(|&fd| {
            Ok(
                Box::new(FdSink::new(take_fd(fd, "shard")?, format!("shard fd {fd}")))
                    as Box<dyn ShardSink>,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let ext = ext_files(&o.ext_file_fds)?;
    let started = SystemTime::now();
    let clock = Instant::now();
    let listener = socket::bind(dir, socket::CAPTURE_SOCKET)?;
    // A stale stats file from an earlier dump must not vouch for this one.
    match std::fs::remove_file(dir.join("stats-dump")) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!("removing the stale {}", dir.join("stats-dump").display())
            })
        }
    }
    let now = started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let opts = WriterOptions {
        compression,
        threads: super::default_threads(),
        ..Default::default()
    };
    let mut writer = ArchiveWriter::new(sinks, opts, ckstream_store::new_archive_id(), now)?;
    writer.add_meta("ckstream.version", env!("CARGO_PKG_VERSION"));
    writer.add_meta("ckstream.command", "capture");
    progress.line("socket-init");
    let copts = CaptureOptions {
        ext_files: ext,
        stop: crate::interrupt::requested,
        ..Default::default()
    };
    let result = capture(&listener, &mut writer, copts, None, &mut |e| {
        if e == CaptureEvent::CheckpointStart {
            progress.line("checkpoint-start");
        }
    });
    let _ = std::fs::remove_file(dir.join(socket::CAPTURE_SOCKET));
    if let Err(e) = result {
        writer.abort();
        return Err(anyhow::Error::new(e).context("capture failed; the archive was not committed"));
    }
    // Without running CRIU ourselves, a successful dump is recognised by the stats file
    // CRIU writes to the images dir only when it completes — just after it closes the
    // socket, so give it a moment to appear.
    let stats_file = dir.join("stats-dump");
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while !stats_file.exists() && Instant::now() < deadline && !crate::interrupt::requested() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if !stats_file.exists() {
        writer.abort();
        bail!(
            "CRIU did not complete the dump ({} was not written); the archive was not committed",
            stats_file.display()
        );
    }
    let summary = writer.finish()?;
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

/// Returns `f` itself when it is a regular file; otherwise (a pipe) copies it into an
/// unlinked temporary file in `dir` and returns that, so it can be read at random.
pub fn seekable(mut f: File, dir: &Path, what: &str) -> Result<File> {
    if f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Ok(f);
    }
    let tmp = rustix::fs::open(
        dir,
        rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .with_context(|| format!("creating a spool file in {}", dir.display()))?;
    let mut tmp = File::from(tmp);
    io::copy(&mut f, &mut tmp).with_context(|| format!("reading {what}"))?;
    Ok(tmp)
}

/// Opens the archive from the shard fds: regular files directly, pipes by spooling them
/// into unlinked temporary files in `dir` (the stream must be complete before anything
/// can be trusted: its commit footer comes last).
fn open_from_fds(o: &StreamerOpts, dir: &Path) -> Result<(ArchiveReader, Vec<(u64, u128)>)> {
    let fds = if o.shard_fds.is_empty() {
        vec![0]
    } else {
        o.shard_fds.clone()
    };
    let mut sources: Vec<Option<Box<dyn ShardSource>>> = Vec::new();
    let mut stats = Vec::new();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for fd in fds {
        let t = Instant::now();
        let file = seekable(take_fd(fd, "shard")?, dir, &format!("shard fd {fd}"))?;
        let size = file.metadata()?.len();
        stats.push((size, t.elapsed().as_millis()));
        sources.push(Some(Box::new(FileSource::from_file(
            file,
            format!("shard fd {fd}"),
        ))));
    }
    let reader = ArchiveReader::open(|i| {
        sources
            .get_mut(i as usize)
            .and_then(|s| s.take())
            .ok_or_else(|| {
                ckstream_format::Error::Corrupt(format!(
                    "the archive has more shards than the {} fds given",
                    stats.len()
                ))
            })
    })?;
    if reader.shard_count() as usize != stats.len() {
        bail!(
            "the archive has {} shards but {} shard fds were given",
            reader.shard_count(),
            stats.len()
        );
    }
    Ok((reader, stats))
}

pub fn serve_cmd(o: &StreamerOpts) -> Result<()> {
    let dir = images_dir(o)?;
    crate::interrupt::install();
    let mut progress = Progress::new(o.progress_fd);
    let ext = ext_files(&o.ext_file_fds)?;
    let (reader, stats) = open_from_fds(o, dir)?;
    super::restore::verify_metadata(&reader)?;
    progress.stats(&stats);
    let listener = socket::bind(dir, socket::SERVE_SOCKET)?;
    progress.line("socket-init");
    let opts = ServeOptions {
        ext_files: ext,
        stop: crate::interrupt::requested,
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
    let prefix = format!("{IMAGES_PREFIX}/");
    let counter = std::sync::atomic::AtomicU64::new(0);
    for (i, e) in reader.entries().iter().enumerate() {
        let Some(name) = e.path.strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        if e.entry_kind() != EntryKind::File || name.contains(&b'/') {
            continue;
        }
        let path = dir.join(std::ffi::OsStr::new(
            std::str::from_utf8(name).context("non-UTF-8 image name")?,
        ));
        let out = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        stream_entry(&reader, i, &out, super::default_threads(), &counter)?;
    }
    for (name, fd) in ext {
        let i = reader
            .find(name.as_bytes())
            .with_context(|| format!("external file {name} is not in the archive"))?;
        let out = File::from(fd);
        stream_entry(&reader, i, &out, super::default_threads(), &counter)?;
    }
    Ok(())
}
