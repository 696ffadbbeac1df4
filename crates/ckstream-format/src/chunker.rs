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
#[derive(Debug, Clone, Copy)]
pub struct PageChunker {
    min: usize,
    max: usize,
    /// A page whose hash is below this ends a chunk (once `min` is reached).
    threshold: u64,
}

impl PageChunker {
    /// Chunks of 16 KiB to `max` bytes (a multiple of [`PAGE`]), 64 KiB on average: a
    /// 128 KiB run of changed pages then costs about 200 KiB in the next incremental
    /// archive.
    pub fn for_memory(max: usize) -> Self {
        let max = (max / PAGE).max(1) * PAGE;
        PageChunker {
            min: (16 << 10).min(max),
            max,
            // One page in 12 ends a chunk: 16 KiB + 12 pages ≈ 64 KiB.
            threshold: u64::MAX / 12,
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
            if page_hash(&data[at..at + PAGE]) < self.threshold {
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
    /// Takes the next chunk off the front of `buf` (see [`next_cut`](Self::next_cut)),
    /// leaving the rest there with room for a whole chunk more; `None` while `buf` holds
    /// no cut yet.
    pub fn take_chunk(&self, buf: &mut Vec<u8>, at_end: bool) -> Option<Vec<u8>> {
        let n = self.next_cut(buf, at_end)?;
        let mut rest = Vec::with_capacity(self.max);
        rest.extend_from_slice(&buf[n..]);
        buf.truncate(n);
        Some(std::mem::replace(buf, rest))
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
        let c = PageChunker::for_memory(1 << 20);
        let data = noise(1, 8 << 20);
        let a = cuts(&c, &data);
        assert_eq!(*a.last().unwrap(), data.len());
        assert!(a.iter().all(|&x| x % PAGE == 0));
        let sizes: Vec<usize> = a.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            sizes.iter().all(|&s| (16 << 10..=1 << 20).contains(&s)),
            "{sizes:?}"
        );
        let avg = data.len() / a.len();
        assert!((40 << 10..100 << 10).contains(&avg), "average chunk {avg}");
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
            while let Some(chunk) = c.take_chunk(&mut buf, end == data.len()) {
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
        let c = PageChunker::for_memory(1 << 20);
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
