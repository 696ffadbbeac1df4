//! The read side: ranged GETs, the cached tail, read-ahead spans.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use ckstream_format::layout::ShardHeader;
use ckstream_format::{ArchiveReader, Error, Result, ShardSource};
use futures::stream::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use super::config::connect;
use super::{
    block_on, count_get, runtime, to_io, S3Url, MAX_SPAN, MERGE_GAP, OTHER_TAIL, PARALLEL_GETS,
    READ_AHEAD_KEPT, READ_AHEAD_SPAN, READ_AHEAD_SPANS, RECENT_BYTES, RECENT_SPAN_MAX, SHARD0_TAIL,
    URGENT_READ_KEPT, URGENT_READ_SPAN,
};
use crate::ShardNames;

/// The cached tail of an object, and its size.
struct Tail {
    size: u64,
    start: u64,
    bytes: Bytes,
}

/// Bytes `start..start + len` of an object, fetched in the background: at most one
/// [`READ_AHEAD_SPAN`]-aligned span, or the announced part of one.
struct Span {
    start: u64,
    len: u64,
    /// Bytes copied out so far; a span read (almost) whole is dropped first.
    consumed: AtomicU64,
    bytes: Mutex<Option<std::result::Result<Bytes, (io::ErrorKind, String)>>>,
    ready: Condvar,
}

impl Span {
    fn end(&self) -> u64 {
        self.start + self.len
    }

    fn covers(&self, from: u64, to: u64) -> bool {
        self.start <= from && to <= self.end()
    }

    /// Read (almost) whole: record headers and alignment padding between the chunks
    /// are never asked for, so "whole" allows for an eighth of the span.
    fn used_up(&self) -> bool {
        self.consumed.load(Ordering::Relaxed) >= self.len - self.len / 8
    }

    fn wait(&self) -> io::Result<Bytes> {
        let mut slot = self.bytes.lock().unwrap();
        while slot.is_none() {
            slot = self.ready.wait(slot).unwrap();
        }
        match slot.as_ref().expect("filled") {
            Ok(b) => Ok(b.clone()),
            Err((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
        }
    }
}

/// Per aligned span index, the hull `(from, to)` of the bytes announced by
/// [`ShardSource::will_read`] and not fetched yet.
type Planned = BTreeMap<u64, (u64, u64)>;

/// A shard read from an object with ranged GETs (see the module documentation).
pub struct S3Source {
    store: Arc<dyn ObjectStore>,
    url: S3Url,
    path: ObjectPath,
    tail_len: u64,
    tail: Mutex<Option<Arc<Tail>>>,
    /// Set by [`ShardSource::expect_sequential`]: reads go through `spans`.
    sequential: AtomicBool,
    /// The spans fetched or being fetched, oldest first (at most `kept_spans()`).
    spans: Mutex<VecDeque<Arc<Span>>>,
    /// Set by [`ShardSource::expect_sequential_with_urgent_reads`]: spans are the smaller
    /// [`URGENT_READ_SPAN`] and [`URGENT_READ_KEPT`] instead of [`READ_AHEAD_SPAN`] and
    /// [`READ_AHEAD_KEPT`].
    urgent_reads: AtomicBool,
    /// Small spans already read, least recently used first (at most [`RECENT_BYTES`]): a
    /// chunk stored once and used in many places (identical pages of several processes,
    /// deduplicated by the writer) is read again and again, far from where it lies, long
    /// after the read-ahead span that held it is gone.
    recent: Mutex<VecDeque<Arc<Span>>>,
    /// Once anything is announced, spans hold only announced bytes and read-ahead
    /// fetches only announced spans, so bytes between two files that are read far
    /// apart in time are not fetched twice. `None`: whole spans, read ahead blindly.
    planned: Mutex<Option<Planned>>,
    /// GET requests and bytes of this source (the process-wide ones are in [`stats`]).
    get_requests: Arc<AtomicU64>,
    get_bytes: Arc<AtomicU64>,
}

impl S3Source {
    /// A source for the object at `url`; nothing is fetched until the first read.
    fn new(store: Arc<dyn ObjectStore>, url: S3Url, tail_len: u64) -> Self {
        S3Source {
            store,
            path: url.path(),
            url,
            tail_len,
            tail: Mutex::new(None),
            sequential: AtomicBool::new(false),
            spans: Mutex::new(VecDeque::new()),
            urgent_reads: AtomicBool::new(false),
            recent: Mutex::new(VecDeque::new()),
            planned: Mutex::new(None),
            get_requests: Arc::new(AtomicU64::new(0)),
            get_bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    fn span_len(&self) -> u64 {
        if self.urgent_reads.load(Ordering::Relaxed) {
            URGENT_READ_SPAN
        } else {
            READ_AHEAD_SPAN
        }
    }

    fn kept_spans(&self) -> usize {
        if self.urgent_reads.load(Ordering::Relaxed) {
            URGENT_READ_KEPT
        } else {
            READ_AHEAD_KEPT
        }
    }

    fn count(&self, bytes: usize) {
        count_get(bytes);
        self.get_requests.fetch_add(1, Ordering::Relaxed);
        self.get_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Starts fetching `start..end` in the background and caches it, evicting spans read
    /// whole, then the oldest.
    fn start_span(&self, start: u64, end: u64) -> Arc<Span> {
        let span = Arc::new(Span {
            start,
            len: end - start,
            consumed: AtomicU64::new(0),
            bytes: Mutex::new(None),
            ready: Condvar::new(),
        });
        {
            let mut spans = self.spans.lock().unwrap();
            let mut recent = self.recent.lock().unwrap();
            // A small span (a chunk read far from the others, e.g. one stored once and
            // used in many places) must not push read-ahead spans out before they are
            // read: it goes straight among the recent ones.
            if span.len <= RECENT_SPAN_MAX {
                recent.push_back(span.clone());
            } else {
                // Spans read (almost) whole go first, but only when room is needed: a
                // decoder a few chunks behind the others may still want the last one.
                if spans.len() >= self.kept_spans() {
                    spans.retain(|s| !s.used_up());
                }
                while spans.len() >= self.kept_spans() {
                    spans.pop_front();
                }
                spans.push_back(span.clone());
            }
            let mut kept: u64 = recent.iter().map(|s| s.len).sum();
            while kept > RECENT_BYTES {
                kept -= recent.pop_front().map_or(0, |s| s.len);
            }
        }
        if std::env::var_os("CKSTREAM_S3_DEBUG").is_some() {
            eprintln!("s3: span {} {start}..{end}", self.url);
        }
        let (store, path, url, slot) = (
            self.store.clone(),
            self.path.clone(),
            self.url.clone(),
            span.clone(),
        );
        let (requests, bytes) = (self.get_requests.clone(), self.get_bytes.clone());
        runtime().spawn(async move {
            let got = store.get_range(&path, start..end).await;
            let result = match got {
                Ok(b) if b.len() as u64 == end - start => {
                    count_get(b.len());
                    requests.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Ok(b)
                }
                Ok(_) => Err((io::ErrorKind::UnexpectedEof, format!("{url}: short read"))),
                Err(e) => {
                    let e = to_io(e, &url);
                    Err((e.kind(), e.to_string()))
                }
            };
            *slot.bytes.lock().unwrap() = Some(result);
            slot.ready.notify_all();
        });
        span
    }

    /// The span holding `from..to` (inside one aligned span, below the tail): cached, or
    /// started now over the announced bytes around it (the whole aligned span when
    /// nothing was announced).
    fn span_for(&self, from: u64, to: u64, tail: &Tail) -> Arc<Span> {
        let index = from / self.span_len();
        let mut planned = self.planned.lock().unwrap();
        let hull = planned.as_ref().and_then(|p| p.get(&index).copied());
        if let Some(s) = self
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.covers(from, to))
        {
            if let (Some(p), Some((lo, hi))) = (planned.as_mut(), hull) {
                if s.covers(lo, hi) {
                    p.remove(&index);
                }
            }
            return s.clone();
        }
        if let Some(s) = self.recent_span(from, to) {
            return s;
        }
        let (start, end) = match (planned.as_mut(), hull) {
            (Some(p), Some((lo, hi))) => {
                p.remove(&index);
                (lo.min(from), hi.max(to))
            }
            // Announced reads elsewhere, none here: fetch just what is asked for.
            (Some(_), None) => (from, to),
            (None, _) => (
                index * self.span_len(),
                ((index + 1) * self.span_len()).min(tail.start),
            ),
        };
        drop(planned);
        self.start_span(start, end)
    }

    /// A small span read before that holds `from..to`, now the most recently used.
    fn recent_span(&self, from: u64, to: u64) -> Option<Arc<Span>> {
        let mut recent = self.recent.lock().unwrap();
        let at = recent.iter().position(|s| s.covers(from, to))?;
        let span = recent.remove(at)?;
        recent.push_back(span.clone());
        Some(span)
    }

    /// Starts the spans after aligned span `last`: the announced ones, or (nothing
    /// announced) the next [`READ_AHEAD_SPANS`] aligned spans not cached yet.
    fn read_ahead(&self, last: u64, tail: &Tail) {
        let window = last + 1..=last + READ_AHEAD_SPANS;
        let ranges: Vec<(u64, u64)> = match self.planned.lock().unwrap().as_mut() {
            Some(p) => {
                let due: Vec<u64> = p.range(window).map(|(&i, _)| i).collect();
                due.iter().filter_map(|i| p.remove(i)).collect()
            }
            None => window
                .map(|i| {
                    (
                        i * self.span_len(),
                        ((i + 1) * self.span_len()).min(tail.start),
                    )
                })
                .filter(|(start, end)| start < end)
                .collect(),
        };
        for (start, end) in ranges {
            let cached = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.covers(start, end));
            if !cached {
                self.start_span(start, end);
            }
        }
    }

    /// Sequential mode: copies `[offset, offset + buf.len())` (below the tail) out of
    /// spans, and starts fetching the spans after it.
    fn read_spans(&self, offset: u64, buf: &mut [u8], tail: &Tail) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let first = offset / self.span_len();
        let last = (end - 1) / self.span_len();
        // The spans needed now first, so starting the ones ahead cannot evict them.
        let needed: Vec<(u64, u64, Arc<Span>)> = (first..=last)
            .map(|index| {
                let from = offset.max(index * self.span_len());
                let to = end.min((index + 1) * self.span_len());
                (from, to, self.span_for(from, to, tail))
            })
            .collect();
        self.read_ahead(last, tail);
        for (from, to, span) in needed {
            let bytes = span.wait()?;
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&bytes[(from - span.start) as usize..(to - span.start) as usize]);
            span.consumed.fetch_add(to - from, Ordering::Relaxed);
        }
        Ok(())
    }

    fn tail(&self) -> io::Result<Arc<Tail>> {
        let mut slot = self.tail.lock().unwrap();
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let options = GetOptions {
            range: Some(GetRange::Suffix(self.tail_len)),
            ..Default::default()
        };
        let (size, start, bytes) = block_on(async {
            let got = self.store.get_opts(&self.path, options).await?;
            let size = got.meta.size;
            let start = got.range.start;
            let bytes = got.bytes().await?;
            Ok::<_, object_store::Error>((size, start, bytes))
        })
        .map_err(|e| to_io(e, &self.url))?;
        self.count(bytes.len());
        if start + bytes.len() as u64 != size {
            return Err(io::Error::other(format!(
                "{}: the store answered the suffix request with bytes {start}..{} of {size}",
                self.url,
                start + bytes.len() as u64
            )));
        }
        let tail = Arc::new(Tail { size, start, bytes });
        *slot = Some(tail.clone());
        Ok(tail)
    }

    fn get_range(&self, start: u64, end: u64) -> io::Result<Bytes> {
        let bytes = block_on(self.store.get_range(&self.path, start..end))
            .map_err(|e| to_io(e, &self.url))?;
        self.count(bytes.len());
        if bytes.len() as u64 != end - start {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(bytes)
    }
}

impl ShardSource for S3Source {
    fn len(&self) -> io::Result<u64> {
        Ok(self.tail()?.size)
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let tail = self.tail()?;
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > tail.size {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if buf.is_empty() {
            return Ok(());
        }
        if offset >= tail.start {
            let s = (offset - tail.start) as usize;
            buf.copy_from_slice(&tail.bytes[s..s + buf.len()]);
            return Ok(());
        }
        if end > tail.start {
            // Straddles the cached tail: fetch the part before it only.
            let head = (tail.start - offset) as usize;
            let (before, cached) = buf.split_at_mut(head);
            cached.copy_from_slice(&tail.bytes[..cached.len()]);
            return self.read_exact_at(offset, before);
        }
        if self.sequential.load(Ordering::Relaxed) {
            return self.read_spans(offset, buf, &tail);
        }
        buf.copy_from_slice(&self.get_range(offset, end)?);
        Ok(())
    }

    fn expect_sequential(&self) {
        self.sequential.store(true, Ordering::Relaxed);
    }

    fn expect_sequential_with_urgent_reads(&self) {
        self.urgent_reads.store(true, Ordering::Relaxed);
        self.expect_sequential();
    }

    fn will_read(&self, ranges: &[(u64, u64)]) {
        if !self.sequential.load(Ordering::Relaxed) {
            return;
        }
        // Bytes in the cached tail are never fetched: plan only what lies before it.
        let Ok(tail) = self.tail() else { return };
        let mut planned = self.planned.lock().unwrap();
        let planned = planned.get_or_insert_with(BTreeMap::new);
        for &(offset, len) in ranges.iter() {
            let end = offset.saturating_add(len).min(tail.start);
            if offset >= end {
                continue;
            }
            for index in offset / self.span_len()..=(end - 1) / self.span_len() {
                let from = offset.max(index * self.span_len());
                let to = end.min((index + 1) * self.span_len());
                let hull = planned.entry(index).or_insert((from, to));
                *hull = (hull.0.min(from), hull.1.max(to));
            }
        }
    }

    fn read_ranges(&self, ranges: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
        let tail = self.tail()?;
        let mut out: Vec<Option<Vec<u8>>> = vec![None; ranges.len()];
        // Spans to fetch: (start, end, members), built from ranges sorted by offset.
        let mut order: Vec<usize> = Vec::new();
        for (k, &(offset, len)) in ranges.iter().enumerate() {
            let end = offset
                .checked_add(len as u64)
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            if end > tail.size {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if offset >= tail.start {
                let s = (offset - tail.start) as usize;
                out[k] = Some(tail.bytes[s..s + len].to_vec());
            } else {
                order.push(k);
            }
        }
        order.sort_by_key(|&k| ranges[k].0);
        let mut spans: Vec<(u64, u64, Vec<usize>)> = Vec::new();
        for k in order {
            let (offset, len) = ranges[k];
            let end = offset + len as u64;
            match spans.last_mut() {
                Some((start, span_end, members))
                    if offset <= *span_end + MERGE_GAP
                        && end.max(*span_end) - *start <= MAX_SPAN =>
                {
                    *span_end = (*span_end).max(end);
                    members.push(k);
                }
                _ => spans.push((offset, end, vec![k])),
            }
        }
        let fetched: Vec<Bytes> = block_on(
            futures::stream::iter(spans.iter().map(|(start, end, _)| {
                let store = self.store.clone();
                let path = self.path.clone();
                let range = *start..*end;
                async move { store.get_range(&path, range).await }
            }))
            .buffered(PARALLEL_GETS)
            .try_collect(),
        )
        .map_err(|e| to_io(e, &self.url))?;
        for ((start, end, members), bytes) in spans.iter().zip(fetched) {
            self.count(bytes.len());
            if bytes.len() as u64 != end - start {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            for &k in members {
                let (offset, len) = ranges[k];
                let s = (offset - start) as usize;
                out[k] = Some(bytes[s..s + len].to_vec());
            }
        }
        Ok(out
            .into_iter()
            .map(|b| b.expect("every range filled"))
            .collect())
    }

    fn is_local(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        self.url.to_string()
    }
}

/// Opens the archive whose shard 0 is `base`. Only shard 0 is read here (its tail in one
/// request, its header in at most one more); other shards are opened and checked when
/// first read.
///
/// # Errors
/// [`Error::Usage`] for a bad configuration; [`Error::Io`] when shard 0 cannot be read
/// (missing object, refused credentials); everything [`ArchiveReader::open`] reports. A
/// missing shard 1.. is an [`Error::Corrupt`] naming its object, from the first read
/// that needs it.
pub fn open_archive(
    base: &S3Url,
    keys: &ckstream_format::crypto::Keyring,
) -> Result<ArchiveReader> {
    let store: Arc<dyn ObjectStore> = connect(&base.bucket)?;
    let open = {
        let (store, base) = (store.clone(), base.clone());
        move |header: Option<&ShardHeader>, i: u32| -> Result<Box<dyn ShardSource>> {
            let names = header.map_or(ShardNames::Indexed, ShardNames::of);
            let shard = base.shard(names, i);
            let src = S3Source::new(
                store.clone(),
                shard.clone(),
                if i == 0 { SHARD0_TAIL } else { OTHER_TAIL },
            );
            // Fetch the tail now so a missing object is reported as such, by name.
            src.tail().map_err(|e| match e.kind() {
                io::ErrorKind::NotFound if i > 0 => Error::Corrupt(format!(
                    "shard {i} of the archive is missing: {shard} does not exist"
                )),
                io::ErrorKind::NotFound => Error::io(format!("cannot open {shard}"), e),
                _ => Error::io(format!("cannot read {shard}"), e),
            })?;
            Ok(Box::new(src))
        }
    };
    let shard0 = open(None, 0)?;
    ArchiveReader::open_deferred_keyed(shard0, Arc::new(move |h, i| open(Some(h), i)), keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::PutPayload;

    /// An object of `len` patterned bytes in an in-memory store, and a source for it.
    fn memory_source(len: usize, tail: u64) -> (S3Source, Vec<u8>) {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let url = S3Url::parse("s3://bucket/dir/a.cka").unwrap();
        block_on(store.put(&url.path(), PutPayload::from(data.clone()))).unwrap();
        (S3Source::new(store, url, tail), data)
    }

    fn requests(src: &S3Source) -> u64 {
        src.get_requests.load(Ordering::Relaxed)
    }

    #[test]
    fn one_suffix_request_gives_the_size_and_the_tail() {
        let (src, data) = memory_source(3 << 20, 512 << 10);
        assert_eq!(src.len().unwrap(), 3 << 20);
        assert_eq!(requests(&src), 1);
        let mut footer = [0u8; 128];
        src.read_exact_at((3 << 20) - 128, &mut footer).unwrap();
        assert_eq!(footer[..], data[data.len() - 128..]);
        assert_eq!(requests(&src), 1, "the tail is cached");
        let mut header = vec![0u8; 4096];
        src.read_exact_at(0, &mut header).unwrap();
        assert_eq!(header, data[..4096]);
        assert_eq!(requests(&src), 2);
        // Straddling the cached tail: only the part before it is fetched.
        let at = (3 << 20) - (512 << 10) - 100;
        let mut both = vec![0u8; 200];
        src.read_exact_at(at as u64, &mut both).unwrap();
        assert_eq!(both, data[at..at + 200]);
        assert_eq!(requests(&src), 3);
        let mut past = [0u8; 2];
        let err = src.read_exact_at((3 << 20) - 1, &mut past).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn batched_reads_merge_adjacent_ranges() {
        let (src, data) = memory_source(8 << 20, 64 << 10);
        src.len().unwrap();
        // Three ranges 96 bytes apart (record headers between chunks), one far away,
        // one in the cached tail; given out of order.
        let ranges = [
            (5 << 20, 1000usize),
            (1096, 1000),
            (0, 1000),
            ((8 << 20) - 100, 50),
            (2192, 500),
        ];
        let got = src.read_ranges(&ranges).unwrap();
        for ((offset, len), bytes) in ranges.iter().zip(&got) {
            assert_eq!(bytes[..], data[*offset as usize..*offset as usize + len]);
        }
        assert_eq!(
            requests(&src),
            1 + 2,
            "tail, one merged span, the far range"
        );
        // Spans are capped at MAX_SPAN.
        let (src, _) = memory_source(40 << 20, 64 << 10);
        let ranges: Vec<(u64, usize)> = (0..36).map(|i| (i << 20, 1 << 20)).collect();
        let got = src.read_ranges(&ranges).unwrap();
        assert_eq!(got.len(), 36);
        assert_eq!(requests(&src), 1 + 3, "36 MiB in spans of at most 16 MiB");
    }

    #[test]
    fn sequential_reads_come_from_read_ahead_spans() {
        let (src, data) = memory_source(9 << 20, 512 << 10);
        src.expect_sequential();
        let mut pos = 0usize;
        let end = data.len() - (512 << 10);
        while pos < end {
            let n = (300 << 10).min(end - pos);
            let mut buf = vec![0u8; n];
            src.read_exact_at(pos as u64, &mut buf).unwrap();
            assert_eq!(buf, data[pos..pos + n], "at {pos}");
            pos += n;
        }
        let spans = (end as u64).div_ceil(READ_AHEAD_SPAN);
        // The tail, then every span once (one more may still be in flight).
        let n = requests(&src);
        assert!(
            n >= 1 + spans - 1 && n <= 1 + spans,
            "{n} requests for {spans} spans"
        );
    }

    /// Reads `from..to` front to back in 300 KiB pieces, announcing it first.
    fn read_announced(src: &S3Source, data: &[u8], from: usize, to: usize) {
        src.will_read(&[(from as u64, (to - from) as u64)]);
        let mut pos = from;
        while pos < to {
            let n = (300 << 10).min(to - pos);
            let mut buf = vec![0u8; n];
            src.read_exact_at(pos as u64, &mut buf).unwrap();
            assert_eq!(buf, data[pos..pos + n], "at {pos}");
            pos += n;
        }
    }

    #[test]
    fn announced_reads_fetch_each_byte_once() {
        let tail = 512 << 10;
        let (src, data) = memory_source(30 << 20, tail);
        src.expect_sequential();
        src.len().unwrap();
        // Two files meeting inside one aligned span, read with 15 MiB of another file
        // in between: far more than the spans kept, so an aligned span fetched for the
        // first file would be gone, and fetched again, for the second.
        let mib = 1usize << 20;
        let (a, b, c) = (
            (0, 5 * mib / 2),
            (5 * mib / 2, 5 * mib),
            (10 * mib, 25 * mib),
        );
        read_announced(&src, &data, a.0, a.1);
        read_announced(&src, &data, c.0, c.1);
        read_announced(&src, &data, b.0, b.1);
        let fetched = src.get_bytes.load(Ordering::Relaxed);
        let wanted = (a.1 - a.0 + b.1 - b.0 + c.1 - c.0) as u64 + tail;
        assert_eq!(
            fetched, wanted,
            "bytes fetched vs bytes asked for (and the tail)"
        );
        // Unannounced reads in between fetch only what they ask for.
        let mut buf = vec![0u8; 1000];
        src.read_exact_at(7 << 20, &mut buf).unwrap();
        assert_eq!(buf, data[7 << 20..(7 << 20) + 1000]);
        assert_eq!(src.get_bytes.load(Ordering::Relaxed), wanted + 1000);
    }

    #[test]
    fn a_chunk_used_in_many_places_is_fetched_once() {
        let mib = 1usize << 20;
        let (src, data) = memory_source(40 * mib, 512 << 10);
        src.expect_sequential();
        src.len().unwrap();
        // A file read front to back whose every eighth "chunk" is a reference to one
        // chunk stored near the start, as the writer stores identical pages once.
        let shared = (100_000usize, 28 << 10);
        let chunk = 28 << 10;
        let mut ranges = Vec::new();
        let mut pos = 2 * mib;
        while pos + chunk <= 30 * mib {
            ranges.push((pos, chunk));
            pos += chunk;
        }
        let announced: Vec<(u64, u64)> = ranges
            .iter()
            .map(|&(o, l)| (o as u64, l as u64))
            .chain(std::iter::once((shared.0 as u64, shared.1 as u64)))
            .collect();
        src.will_read(&announced);
        let before = requests(&src);
        let mut reads = 0;
        for (k, &(offset, len)) in ranges.iter().enumerate() {
            let (offset, len) = if k % 8 == 7 { shared } else { (offset, len) };
            let mut buf = vec![0u8; len];
            src.read_exact_at(offset as u64, &mut buf).unwrap();
            assert!(buf == data[offset..offset + len], "at {offset}");
            reads += 1;
        }
        let spans = (30 * mib as u64 - 1) / READ_AHEAD_SPAN + 1 + 1;
        let made = requests(&src) - before;
        assert!(
            made <= spans + 2,
            "{made} requests for {reads} reads of {spans} spans and one shared chunk"
        );
    }

    #[test]
    fn chunks_read_again_far_behind_do_not_push_out_the_read_ahead() {
        let mib = 1usize << 20;
        let (src, data) = memory_source(40 * mib, 512 << 10);
        src.expect_sequential();
        src.len().unwrap();
        let chunk = 28 << 10;
        let ranges: Vec<(usize, usize)> = (2 * mib..30 * mib - chunk)
            .step_by(chunk)
            .map(|o| (o, chunk))
            .collect();
        let announced: Vec<(u64, u64)> =
            ranges.iter().map(|&(o, l)| (o as u64, l as u64)).collect();
        src.will_read(&announced);
        let before = requests(&src);
        // Every fourth read is a chunk of the first megabytes again (as a chunk stored
        // once and used in many places is), a different one each time: a GET of its
        // own, which must not evict the spans fetched ahead.
        let mut again = 0;
        for (k, &(offset, len)) in ranges.iter().enumerate() {
            if k % 4 == 3 && k > 300 {
                let (o, l) = ranges[again];
                again += 1;
                let mut buf = vec![0u8; l];
                src.read_exact_at(o as u64, &mut buf).unwrap();
                assert!(buf == data[o..o + l], "again at {o}");
            }
            let mut buf = vec![0u8; len];
            src.read_exact_at(offset as u64, &mut buf).unwrap();
            assert!(buf == data[offset..offset + len], "at {offset}");
        }
        let spans = (30 * mib as u64 - 1) / READ_AHEAD_SPAN + 1;
        let made = requests(&src) - before;
        assert!(
            made <= spans + again as u64 + 2,
            "{made} requests for {spans} spans and {again} chunks read again"
        );
    }

    #[test]
    fn announced_ranges_reaching_into_the_cached_tail_are_not_fetched_again() {
        let mib = 1usize << 20;
        let tail = 3 * mib as u64 / 2;
        let (src, data) = memory_source(4 * mib, tail);
        src.expect_sequential();
        src.len().unwrap();
        // The file's last chunks lie in the tail already fetched with the footer (the
        // tail starts at 2.5 MiB): only 2 MiB..2.5 MiB may be fetched for it.
        read_announced(&src, &data, 2 * mib, 7 * mib / 2);
        assert_eq!(
            src.get_bytes.load(Ordering::Relaxed),
            tail + (mib as u64) / 2
        );
    }
}
