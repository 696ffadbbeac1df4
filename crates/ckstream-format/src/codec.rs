//! Payload codecs: none, LZ4 (block) and zstd (one frame per chunk).
//!
//! Each compressed chunk is independent, so chunks compress and decompress on
//! any thread and can be read at random.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Codec id stored in record headers and the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CodecId {
    /// Stored as is.
    None = 0,
    /// An LZ4 block (no frame header; the raw length is in the record).
    Lz4 = 1,
    /// One zstd frame.
    Zstd = 2,
}

impl CodecId {
    /// Maps a stored byte back to a codec.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => CodecId::None,
            1 => CodecId::Lz4,
            2 => CodecId::Zstd,
            _ => return None,
        })
    }

    /// Lower-case name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            CodecId::None => "none",
            CodecId::Lz4 => "lz4",
            CodecId::Zstd => "zstd",
        }
    }
}

/// What the writer does to chunks: a codec and, for zstd, a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// The codec.
    pub codec: CodecId,
    /// zstd level (0 for the other codecs).
    pub level: i32,
}

impl Compression {
    /// Stored as it is.
    pub const NONE: Compression = Compression {
        codec: CodecId::None,
        level: 0,
    };
    /// LZ4 blocks.
    pub const LZ4: Compression = Compression {
        codec: CodecId::Lz4,
        level: 0,
    };

    /// zstd at `level` (1..=19 are sensible; negative levels are fast modes).
    pub fn zstd(level: i32) -> Self {
        Compression {
            codec: CodecId::Zstd,
            level,
        }
    }
}

impl Default for Compression {
    /// zstd level 1: on CRIU page images it keeps ~95% of level 3's ratio at ~1.3x its speed,
    /// and two cores then compress faster than a local disk writes.
    fn default() -> Self {
        Compression::zstd(1)
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.codec {
            CodecId::Zstd => write!(f, "zstd:{}", self.level),
            c => f.write_str(c.name()),
        }
    }
}

/// A compression as written on a command line, before defaults: `zstd` without a level
/// leaves the level to the command (`pack` and `dump` use 1, the podman commands 3,
/// podman's own level), so that choice is made by type, not by the spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressionArg {
    codec: CodecId,
    level: Option<i32>,
}

impl CompressionArg {
    /// The compression, with `zstd_level` where no zstd level was given.
    pub fn with_zstd_default(self, zstd_level: i32) -> Compression {
        match self.codec {
            CodecId::Zstd => Compression::zstd(self.level.unwrap_or(zstd_level)),
            CodecId::Lz4 => Compression::LZ4,
            CodecId::None => Compression::NONE,
        }
    }
}

impl FromStr for CompressionArg {
    type Err = Error;

    /// Parses `none`, `lz4`, `zstd` or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Self> {
        let (name, level) = match s.split_once(':') {
            Some((n, l)) => (n, Some(l)),
            None => (s, None),
        };
        let arg = |codec, level| CompressionArg { codec, level };
        match (name, level) {
            ("none" | "raw", None) => Ok(arg(CodecId::None, None)),
            ("lz4", None) => Ok(arg(CodecId::Lz4, None)),
            ("zstd", None) => Ok(arg(CodecId::Zstd, None)),
            ("zstd", Some(l)) => {
                let level: i32 = l
                    .parse()
                    .map_err(|_| Error::Usage(format!("bad zstd level {l:?}")))?;
                if !(-7..=22).contains(&level) || level == 0 {
                    return Err(Error::Usage(format!(
                        "zstd level {level} is out of range (-7..=22, not 0)"
                    )));
                }
                Ok(arg(CodecId::Zstd, Some(level)))
            }
            _ => Err(Error::Usage(format!(
                "unknown compression {s:?} (use none, lz4, zstd or zstd:LEVEL)"
            ))),
        }
    }
}

impl FromStr for Compression {
    type Err = Error;

    /// Parses `none`, `lz4`, `zstd` (level 1) or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Self> {
        Ok(s.parse::<CompressionArg>()?.with_zstd_default(1))
    }
}

/// Per-thread compression state (zstd contexts are reused between chunks).
pub struct Encoder {
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Encoder {
    /// An encoder for `compression`.
    ///
    /// # Errors
    /// [`Error::Io`] when zstd cannot create a compression context.
    pub fn new(compression: Compression) -> Result<Self> {
        let zstd = match compression.codec {
            CodecId::Zstd => Some(
                zstd::bulk::Compressor::new(compression.level)
                    .map_err(|e| Error::io("creating zstd compressor", e))?,
            ),
            _ => None,
        };
        Ok(Encoder { compression, zstd })
    }

    /// Compresses `raw`. Returns `None` when compression is off or does not make the
    /// chunk smaller, in which case the caller stores it raw.
    ///
    /// # Errors
    /// [`Error::Io`] when the compressor fails.
    pub fn encode(&mut self, raw: &[u8]) -> Result<Option<(CodecId, Vec<u8>)>> {
        if self.compression.codec == CodecId::None || self.looks_incompressible(raw)? {
            return Ok(None);
        }
        let out = self.compress(raw)?;
        if out.len() >= raw.len() {
            return Ok(None);
        }
        Ok(Some((self.compression.codec, out)))
    }

    fn compress(&mut self, raw: &[u8]) -> Result<Vec<u8>> {
        Ok(match self.compression.codec {
            CodecId::None => raw.to_vec(),
            CodecId::Lz4 => lz4_flex::block::compress(raw),
            CodecId::Zstd => self
                .zstd
                .as_mut()
                .expect("zstd encoder")
                .compress(raw)
                .map_err(|e| Error::io("zstd compression", e))?,
        })
    }

    /// Compresses eight 4 KiB samples spread over a large chunk; when together they do not shrink by 3 %,
    /// the chunk is stored raw without compressing it whole. Random memory pages (keys,
    /// encrypted or already compressed data) then cost almost nothing to store.
    fn looks_incompressible(&mut self, raw: &[u8]) -> Result<bool> {
        const SAMPLE: usize = 4 << 10;
        const SAMPLES: usize = 8;
        if raw.len() < 64 * SAMPLE {
            return Ok(false);
        }
        let mut sampled = 0usize;
        let mut packed = 0usize;
        for i in 0..SAMPLES {
            let start = i * (raw.len() - SAMPLE) / (SAMPLES - 1);
            let sample = &raw[start..start + SAMPLE];
            sampled += SAMPLE;
            packed += self.compress(sample)?.len();
        }
        Ok(packed * 100 >= sampled * 97)
    }
}

thread_local! {
    /// One decompression context per thread: creating one per chunk cost ~3 % of a
    /// restore's CPU (28 KiB chunks).
    static ZSTD_CONTEXT: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_decompress(stored: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    ZSTD_CONTEXT.with_borrow_mut(|context| {
        let context = match context {
            Some(c) => c,
            None => context.insert(zstd::bulk::Decompressor::new()?),
        };
        context.decompress(stored, raw_len)
    })
}

/// Decodes a stored payload into exactly `raw_len` bytes.
///
/// # Errors
/// [`Error::Corrupt`] when the payload does not decode to exactly `raw_len` bytes.
pub fn decode(codec: CodecId, stored: &[u8], raw_len: usize, what: &str) -> Result<Vec<u8>> {
    let out = match codec {
        CodecId::None => {
            if stored.len() != raw_len {
                return Err(Error::Corrupt(format!(
                    "{what}: stored length {} differs from raw length {raw_len}",
                    stored.len()
                )));
            }
            stored.to_vec()
        }
        CodecId::Lz4 => lz4_flex::block::decompress(stored, raw_len)
            .map_err(|e| Error::Corrupt(format!("{what}: lz4 data does not decode: {e}")))?,
        CodecId::Zstd => zstd_decompress(stored, raw_len)
            .map_err(|e| Error::Corrupt(format!("{what}: zstd data does not decode: {e}")))?,
    };
    if out.len() != raw_len {
        return Err(Error::Corrupt(format!(
            "{what}: decoded {} bytes, expected {raw_len}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_compression() {
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::zstd(1));
        assert_eq!(
            "zstd:5".parse::<Compression>().unwrap(),
            Compression::zstd(5)
        );
        assert_eq!("lz4".parse::<Compression>().unwrap(), Compression::LZ4);
        assert!("zstd:99".parse::<Compression>().is_err());
        assert!("gzip".parse::<Compression>().is_err());
    }

    #[test]
    fn round_trip_each_codec() {
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for c in [Compression::LZ4, Compression::zstd(3)] {
            let mut e = Encoder::new(c).unwrap();
            let (id, stored) = e.encode(&raw).unwrap().unwrap();
            assert_eq!(decode(id, &stored, raw.len(), "t").unwrap(), raw);
            assert!(decode(id, &stored, raw.len() + 1, "t").is_err());
        }
    }

    #[test]
    fn mostly_compressible_chunks_are_not_mistaken_for_random() {
        // Random bytes at the sample points only would fool a one-sample probe; text in
        // between must still get the chunk compressed.
        let mut raw: Vec<u8> = (0..(1 << 20)).map(|i| b"text log line "[i % 14]).collect();
        let mut x = 1u64;
        for b in raw[..8192].iter_mut() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 33) as u8;
        }
        for c in [Compression::LZ4, Compression::zstd(1)] {
            assert!(Encoder::new(c).unwrap().encode(&raw).unwrap().is_some());
        }
    }

    #[test]
    fn large_random_chunks_skip_compression() {
        let mut x = 7u64;
        let raw: Vec<u8> = (0..(1 << 20))
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) as u8
            })
            .collect();
        for c in [Compression::LZ4, Compression::zstd(1)] {
            assert!(Encoder::new(c).unwrap().encode(&raw).unwrap().is_none());
        }
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let mut x = 0x9E3779B97F4A7C15u64;
        let raw: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut e = Encoder::new(Compression::zstd(1)).unwrap();
        assert!(e.encode(&raw).unwrap().is_none());
    }
}
