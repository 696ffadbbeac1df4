//! CRIU's own timing of a dump: the `stats-dump` image it writes at the end.
//!
//! CRIU measures how long it took to freeze the tree (`freezing_time`) and how long the
//! tree then stayed frozen (`frozen_time`, which ends only after the post-dump hook,
//! when the tree is killed or resumed), in microseconds. Their sum is the application's
//! freeze, measured by the one program that knows when it began and ended.

use std::path::Path;

use prost::Message;

use crate::error::{CriuError, Result};

use crate::images::criu_pb::StatsEntry;
use crate::images::IMG_SERVICE_MAGIC;

/// `STATS_MAGIC`: the second word of `stats-dump` and `stats-restore`.
const STATS_MAGIC: u32 = 0x5709_3306;

/// CRIU's `dump_stats_entry` (images/stats.proto).
pub use crate::images::criu_pb::DumpStatsEntry as DumpStats;

impl DumpStats {
    /// How long the application was frozen: freezing plus frozen time, in seconds.
    pub fn freeze_seconds(&self) -> f64 {
        (u64::from(self.freezing_time) + u64::from(self.frozen_time)) as f64 / 1e6
    }
}

/// Parses the bytes of a `stats-dump` image.
///
/// # Errors
/// [`CriuError::Protocol`] when they are not a stats image holding dump statistics.
pub fn parse_dump_stats(bytes: &[u8]) -> Result<DumpStats> {
    let bad = |why: &str| CriuError::Protocol(format!("stats-dump: {why}"));
    let word = |at: usize| -> Result<u32> {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| bad("too short"))
    };
    if word(0)? != IMG_SERVICE_MAGIC || word(4)? != STATS_MAGIC {
        return Err(bad("not a CRIU stats image"));
    }
    let len = word(8)? as usize;
    let body = bytes
        .get(12..12 + len)
        .ok_or_else(|| bad("entry runs past the end"))?;
    StatsEntry::decode(body)
        .map_err(|e| bad(&format!("does not decode: {e}")))?
        .dump
        .ok_or_else(|| bad("holds no dump statistics"))
}

/// Reads `DIR/stats-dump`, which CRIU writes when a dump succeeded.
///
/// # Errors
/// [`CriuError::Io`] when it cannot be read; as [`parse_dump_stats`].
pub fn read_dump_stats(images_dir: &Path) -> Result<DumpStats> {
    let path = images_dir.join("stats-dump");
    let bytes = std::fs::read(&path)
        .map_err(|e| CriuError::io(format!("reading {}", path.display()), e))?;
    parse_dump_stats(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(stats: &DumpStats) -> Vec<u8> {
        let body = StatsEntry {
            dump: Some(*stats),
            restore: None,
        }
        .encode_to_vec();
        let mut b = Vec::new();
        b.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
        b.extend_from_slice(&STATS_MAGIC.to_le_bytes());
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(&body);
        b
    }

    #[test]
    fn reads_the_freeze_from_a_stats_image() {
        let stats = DumpStats {
            freezing_time: 1_500,
            frozen_time: 998_500,
            memdump_time: 10,
            memwrite_time: 20,
            pages_scanned: 3,
            pages_skipped_parent: 0,
            pages_written: 3,
            ..Default::default()
        };
        let got = parse_dump_stats(&image(&stats)).unwrap();
        assert_eq!(got, stats);
        assert!((got.freeze_seconds() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn refuses_what_is_not_a_stats_image() {
        let mut b = image(&DumpStats::default());
        assert!(parse_dump_stats(&b[..10]).is_err());
        b[4] ^= 1;
        assert!(parse_dump_stats(&b).is_err());
        let mut b = image(&DumpStats::default());
        b[8] = 200;
        assert!(parse_dump_stats(&b).is_err());
    }
}
