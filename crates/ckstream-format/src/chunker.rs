//! Content-defined chunk boundaries for memory images.
//!
//! CRIU's `pages-*.img` holds a process's pages in address order, so one page more (a
//! grown heap, a new mapping) shifts every page after it: fixed-size chunks would then
//! all differ from the previous checkpoint's, and an incremental archive would store
//! everything again. [`PageChunker`] cuts where the *content* says so instead — after a
//! page whose sampled words hash below a threshold — and only at page boundaries, so a
//! shifted run of pages is cut the same way wherever it lands, and every uncompressed
//! chunk still starts on a page (reflinks keep working).

/// Bytes per page: chunks are cut only at multiples of it.
pub const PAGE: usize = 4096;

/// Where to cut a stream of pages.
///
/// Cuts are normalised (as in FastCDC): a page rarely ends a chunk shorter than
/// `normal`, and often ends a longer one, so chunk sizes cluster around the average.
/// Dedup against a parent pays for the chunks a change touches, and with sizes that
/// vary less a changed run drags fewer unchanged pages along; the rare cut early in a
/// chunk is what lets the cuts after a shift or a change find the old ones again.
#[derive(Debug, Clone, Copy)]
pub struct PageChunker {
    min: usize,
    /// Chunks up to this long end at a page hashing below `threshold_short`, longer ones
    /// at a page hashing below `threshold_long`.
    normal: usize,
    max: usize,
    threshold_short: u64,
    threshold_long: u64,
}

impl PageChunker {
    /// Chunks of 12 KiB to `max` bytes (a multiple of [`PAGE`]), about 28 KiB on
    /// average: a 128 KiB run of changed pages then costs about 165 KiB in the next
    /// incremental archive, and the index about 1.5 bytes per KiB of memory. With
    /// `aligned` (an archive that pads every uncompressed chunk to the next page) the
    /// chunks are twice as large, so the padding costs 8% instead of 14%.
    pub fn for_memory(max: usize, aligned: bool) -> Self {
        let max = (max / PAGE).max(1) * PAGE;
        // Measured on 512 MiB of noise with 2% rewritten in 128 KiB runs, the second
        // archive stores 2.8% (`zstd`; 64 KiB chunks without normalisation: 3.5%).
        let (min, normal, short, long) = if aligned {
            // 20 KiB to max, 51 KiB on average.
            (16 << 10, 48 << 10, 16, 4)
        } else {
            // Past 8 KiB one page in 8 ends a chunk, past 16 KiB one in 4: 12 KiB to
            // max, 28 KiB on average.
            (8 << 10, 16 << 10, 8, 4)
        };
        PageChunker {
            min: min.min(max),
            normal,
            max,
            threshold_short: u64::MAX / short,
            threshold_long: u64::MAX / long,
        }
    }

    /// The length of the chunk that starts at `data[0]`: a cut point within `data`, or
    /// `None` when `data` holds none yet and more may follow (`at_end` false). At the end
    /// the rest is one chunk (or more, each at most the maximum).
    pub fn next_cut(&self, data: &[u8], at_end: bool) -> Option<usize> {
        if data.is_empty() {
            return None;
        }
        let mut at = self.min;
        while at + PAGE <= data.len().min(self.max) {
            // The page ending at `at + PAGE` decides whether to cut after it.
            let threshold = if at + PAGE <= self.normal {
                self.threshold_short
            } else {
                self.threshold_long
            };
            if page_hash(&data[at..at + PAGE]) < threshold {
                return Some(at + PAGE);
            }
            at += PAGE;
        }
        if data.len() >= self.max {
            return Some(self.max);
        }
        at_end.then_some(data.len())
    }
}

impl PageChunker {
    /// Takes every whole chunk off the front of `buf` (see [`next_cut`](Self::next_cut)),
    /// in order, and moves what is left (no cut in it yet) to the front once, keeping
    /// `buf`'s capacity: each byte is copied once however small the chunks.
    pub fn take_chunks(&self, buf: &mut Vec<u8>, at_end: bool) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        let mut at = 0;
        while let Some(n) = self.next_cut(&buf[at..], at_end) {
            chunks.push(buf[at..at + n].to_vec());
            at += n;
        }
        buf.drain(..at);
        chunks
    }
}

/// A cheap hash of a page from eight sampled words: enough to spread the cut points
/// evenly over real memory, at a sliver of the cost of reading the page.
fn page_hash(page: &[u8]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for k in 0..8 {
        let at = k * (PAGE / 8) + 8 * k;
        let w = u64::from_le_bytes(page[at..at + 8].try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 31;
    }
    h
}

/// True for the image files whose data is process memory (`pages-N.img`), which are
/// chunked by content.
pub fn is_memory_image(path: &[u8]) -> bool {
    let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    name.starts_with(b"pages-") && name.ends_with(b".img")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::noise;

    fn cuts(c: &PageChunker, data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(n) = c.next_cut(&data[at..], true) {
            at += n;
            out.push(at);
        }
        out
    }

    #[test]
    fn chunks_resynchronise_after_inserted_pages_and_stay_page_aligned() {
        let c = PageChunker::for_memory(1 << 20, false);
        let data = noise(1, 8 << 20);
        let a = cuts(&c, &data);
        assert_eq!(*a.last().unwrap(), data.len());
        assert!(a.iter().all(|&x| x % PAGE == 0));
        let sizes: Vec<usize> = a.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            sizes.iter().all(|&s| (12 << 10..=1 << 20).contains(&s)),
            "{sizes:?}"
        );
        let avg = data.len() / a.len();
        assert!((20 << 10..40 << 10).contains(&avg), "average chunk {avg}");
        // Two pages inserted near the start: the cuts after them are the same, shifted.
        let mut shifted = data[..PAGE * 3].to_vec();
        shifted.extend_from_slice(&noise(4, 2 * PAGE));
        shifted.extend_from_slice(&data[PAGE * 3..]);
        let b: std::collections::HashSet<usize> = cuts(&c, &shifted)
            .into_iter()
            .map(|x| x - 2 * PAGE)
            .collect();
        let same = a.iter().filter(|x| b.contains(x)).count();
        assert!(
            same + 3 >= a.len(),
            "{same} of {} cuts survive the shift",
            a.len()
        );
        // Fed piece by piece, the cuts are the same.
        let mut piecewise = Vec::new();
        let (mut buf, mut at, mut end) = (Vec::new(), 0, 0);
        while end < data.len() {
            let next = (end + 300_000).min(data.len());
            buf.extend_from_slice(&data[end..next]);
            end = next;
            for chunk in c.take_chunks(&mut buf, end == data.len()) {
                assert_eq!(chunk, data[at..at + chunk.len()]);
                at += chunk.len();
                piecewise.push(at);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(piecewise, a);
    }

    #[test]
    fn zero_pages_are_cut_at_the_maximum_or_evenly() {
        let c = PageChunker::for_memory(1 << 20, false);
        let zeros = vec![0u8; 4 << 20];
        let z = cuts(&c, &zeros);
        assert!(z.iter().all(|&x| x % PAGE == 0));
        assert_eq!(*z.last().unwrap(), zeros.len());
        assert!(c.next_cut(&[], true).is_none());
        assert_eq!(c.next_cut(&[1, 2, 3], true), Some(3));
        assert_eq!(c.next_cut(&[1, 2, 3], false), None);
        assert!(is_memory_image(b"criu/pages-12.img"));
        assert!(!is_memory_image(b"criu/pagemap-12.img"));
    }
}
