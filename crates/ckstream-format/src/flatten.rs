//! Copying an archive into a new one that stands alone: every chunk an incremental
//! archive references in its parents is stored again, checked on the way.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use crate::codec::CodecId;
use crate::error::{Error, Result};
use crate::index::{entry_flags, Entry};
use crate::progress::Stop;
use crate::reader::ArchiveReader;
use crate::writer::ArchiveWriter;

/// Adds every entry of `reader` (with its parents attached) to `writer`, with its data:
/// each chunk read and verified, from whichever archive holds it, and offered for
/// reflinking when its stored bytes are its raw bytes in a local file. The metadata
/// other than ckstream's own and the hot list are kept.
///
/// # Errors
/// The reader's errors (a damaged chunk, a missing parent), the writer's, and
/// [`Error::Usage`] when a chunk is larger than the writer's chunk size.
pub fn copy_archive(reader: &ArchiveReader, writer: &mut ArchiveWriter, stop: Stop) -> Result<()> {
    for m in &reader.index().meta {
        if !m.key.starts_with("ckstream.") {
            writer.add_meta(&m.key, &m.value);
        }
    }
    writer.set_hot_paths(
        reader
            .index()
            .hot_list
            .iter()
            .filter_map(|&id| reader.entries().get(id as usize))
            .map(|e| e.path.clone())
            .collect(),
    );
    let mut files: HashMap<(u32, u32), Arc<File>> = HashMap::new();
    for (i, e) in reader.entries().iter().enumerate() {
        if stop.requested() {
            return Err(Error::interrupted("flattening"));
        }
        let id = writer.add_entry(Entry {
            flags: e.flags & !entry_flags::STREAMED,
            first_chunk: 0,
            chunk_count: 0,
            ..e.clone()
        })?;
        for c in reader.chunks_of(i) {
            let data = reader.read_chunk(e, c)?;
            let raw = c.codec_id() == Some(CodecId::None) && !c.in_shared_frame();
            let clone = match reader.raw_file_of(c).filter(|_| raw) {
                Some(f) => {
                    let key = (c.archive, c.shard);
                    let file = match files.get(&key) {
                        Some(f) => f.clone(),
                        None => {
                            let dup = Arc::new(
                                f.try_clone()
                                    .map_err(|e| Error::io("duplicating a shard file", e))?,
                            );
                            files.insert(key, dup.clone());
                            dup
                        }
                    };
                    Some((file, c.offset))
                }
                None => None,
            };
            writer.add_data(id, c.file_offset, data, clone)?;
        }
    }
    Ok(())
}
