//! `ckstream cat`.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;

use anyhow::{bail, Result};
use ckstream_format::EntryKind;

#[derive(Debug, clap::Args)]
pub struct Args {
    archive: ckstream_store::ArchiveLocation,
    /// Path of a regular file inside the archive.
    path: OsString,
}

pub fn run(args: Args) -> Result<()> {
    let reader = super::open(&args.archive)?;
    let want = args.path.as_bytes();
    let want = want.strip_prefix(b"/").unwrap_or(want);
    let Some(mut i) = reader.find(want) else {
        bail!("{:?} is not in the archive", args.path);
    };
    let e = &reader.entries()[i];
    match e.entry_kind() {
        EntryKind::File => {}
        EntryKind::Hardlink => i = reader.find(&e.link_target).expect("validated hardlink"),
        k => bail!("{:?} is a {}, not a regular file", args.path, k.name()),
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    reader.copy_entry(i, &mut out)?;
    out.flush()?;
    Ok(())
}
