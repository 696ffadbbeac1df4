//! `ckstream ls`.

use std::io::Write;

use anyhow::Result;
use ckstream_format::EntryKind;

use crate::output::{escape_controls, mode_string, utc_time};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Long listing: type, mode, owner, size, mtime (UTC), path, link target.
    #[arg(short = 'l')]
    long: bool,
    /// One JSON array of entries on stdout.
    #[arg(long)]
    json: bool,
    archive: ckstream_store::ArchiveLocation,
}

pub fn run(args: Args) -> Result<()> {
    let reader = super::open(&args.archive)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.json {
        let list: Vec<_> = reader
            .entries()
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let chunks = reader.chunks_of(i);
                serde_json::json!({
                    "path": e.path_lossy(),
                    "type": e.entry_kind().name(),
                    "mode": format!("{:04o}", e.mode),
                    "uid": e.uid,
                    "gid": e.gid,
                    "size": e.size,
                    "mtime_ns": e.mtime_ns,
                    "link_target": (!e.link_target.is_empty()).then(|| String::from_utf8_lossy(&e.link_target).into_owned()),
                    "rdev": matches!(e.entry_kind(), EntryKind::CharDevice | EntryKind::BlockDevice).then(|| format!("{},{}", e.rdev_major, e.rdev_minor)),
                    "xattrs": e.xattrs.iter().map(|x| String::from_utf8_lossy(&x.name).into_owned()).collect::<Vec<_>>(),
                    "chunks": chunks.len(),
                    "stored_bytes": chunks.iter().map(|c| c.stored_share()).sum::<u64>(),
                })
            })
            .collect();
        serde_json::to_writer(&mut out, &list)?;
        writeln!(out)?;
    } else {
        // Names are the archive's: their control characters are escaped (JSON output
        // escapes them its own way).
        for e in reader.entries() {
            let kind = e.entry_kind();
            let path = e.path_lossy();
            let path = escape_controls(&path);
            if args.long {
                let size = match kind {
                    EntryKind::CharDevice | EntryKind::BlockDevice => {
                        format!("{},{}", e.rdev_major, e.rdev_minor)
                    }
                    _ => e.size.to_string(),
                };
                let link = match kind {
                    EntryKind::Symlink => {
                        format!(
                            " -> {}",
                            escape_controls(&String::from_utf8_lossy(&e.link_target))
                        )
                    }
                    EntryKind::Hardlink => {
                        format!(
                            " link to {}",
                            escape_controls(&String::from_utf8_lossy(&e.link_target))
                        )
                    }
                    _ => String::new(),
                };
                writeln!(
                    out,
                    "{} {:>5}/{:<5} {:>12} {} {}{}",
                    mode_string(kind.type_char(), e.mode),
                    e.uid,
                    e.gid,
                    size,
                    utc_time(e.mtime_ns),
                    path,
                    link
                )?;
            } else if kind == EntryKind::Dir {
                writeln!(out, "{path}/")?;
            } else {
                writeln!(out, "{path}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
