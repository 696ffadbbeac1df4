//! S3 and S3-compatible object stores (AWS S3, MinIO, Ceph RGW, SeaweedFS, Garage) as
//! shard sinks and sources, through the `object_store` crate.
//!
//! An archive `s3://BUCKET/KEY` keeps shard 0 in object `KEY` and shard `i` beside it,
//! named by the archive id as [`crate::shard_path`] names local shards (`KEY.ID.i`;
//! `KEY.i` in archives from before).
//!
//! Writing: every shard is one multipart upload. The writer's shard thread fills
//! [`PART_SIZE`] buffers and each full buffer goes out as a part on a small shared
//! tokio runtime, with at most a few parts in flight per shard (the writer thread
//! waits when the limit is reached, so memory stays bounded). Nothing is visible under
//! the archive's name until [`S3PendingArchive::publish`] completes the uploads, shards
//! 1.. (under keys of their own) first and shard 0 last, after the writer has committed,
//! and only then deletes the replaced archive's other shards; a failure or
//! [`S3PendingArchive::discard`] aborts every upload and leaves the old archive as it
//! was. Transient errors are retried with exponential backoff by `object_store`.
//!
//! Reading: the first use of a shard fetches its tail with one suffix-range GET, which
//! also tells the object's size, and keeps it; the format reader finds the footer and
//! (usually) the whole index there. Other reads are ranged GETs; batched reads
//! ([`ShardSource::read_ranges`]) merge adjacent ranges and run in parallel; after
//! [`ShardSource::expect_sequential`] (restore, verify) reads are served from spans of
//! at most one aligned 4 MiB block, fetched two ahead in the background, a few kept per
//! shard. Once a reader announces what it will read ([`ShardSource::will_read`]: the
//! restore, per image file), spans cover only announced bytes and read-ahead fetches only
//! those; otherwise (verify's front-to-back scan) whole blocks, blindly ahead.
//!
//! Settings come from the standard AWS environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, ...)
//! and, for what the environment leaves out, from the shared config and credentials
//! files (`~/.aws/config`, `~/.aws/credentials`, profile `AWS_PROFILE`). Plain HTTP is
//! allowed for loopback endpoints. Every request is counted in [`stats`].

mod config;
mod source;
mod upload;
mod url;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub use source::{open_archive, S3Source};
pub use upload::{create_archive, S3PendingArchive, S3Sink};
pub use url::S3Url;

/// Size of every multipart part but the last (S3 allows 5 MiB..5 GiB).
pub const PART_SIZE: usize = 8 << 20;
/// S3's smallest part other than the last one.
pub const MIN_PART_SIZE: usize = 5 << 20;
/// Suffix fetched on first use of shard 0: footer and index together, in one request.
/// Above the format reader's tail read, below the 2 MiB a `cat` of a 1 MiB file may cost.
pub const SHARD0_TAIL: u64 = 512 << 10;
/// Suffix fetched on first use of other shards: their footer.
pub const OTHER_TAIL: u64 = 8 << 10;
/// Ranges closer than this are fetched in one request (record headers and alignment
/// padding lie between adjacent chunks).
pub const MERGE_GAP: u64 = 8 << 10;
/// Largest merged request.
pub const MAX_SPAN: u64 = 16 << 20;
/// Parallel GETs of one batched read.
pub const PARALLEL_GETS: usize = 8;
/// Sequential reads ([`ShardSource::expect_sequential`]) fetch aligned spans of this size
/// (SeaweedFS spent 4.8 CPU-s serving a 2 GiB restore in 1 MiB GETs, 2.2 in 4 MiB ones;
/// 8 MiB spans, three kept, thrashed: more GETs than with 4)...
pub const READ_AHEAD_SPAN: u64 = 4 << 20;
/// ...this many spans ahead of the one being read...
pub const READ_AHEAD_SPANS: u64 = 2;
/// ...and keep at most this many per shard (16 MiB; spans read whole are dropped first,
/// then the oldest; small spans of chunks read far from the others are kept among the
/// recent ones instead, so they never push out a span before it is read).
pub const READ_AHEAD_KEPT: usize = 4;
/// Spans and spans kept for a reader that also waits on single reads (a lazy restore
/// answering page faults while it pushes every page): 4 MiB spans made its first page
/// wait 0.6 s instead of 0.23 and its peak RSS 168 MiB instead of 85 (4 GiB, 4 shards).
pub const URGENT_READ_SPAN: u64 = 1 << 20;
/// (12 MiB per shard.)
pub const URGENT_READ_KEPT: usize = 12;
/// Spans read whole of at most this size are kept for reuse ([`RECENT_BYTES`] of them)...
pub const RECENT_SPAN_MAX: u64 = 256 << 10;
/// ...up to this many bytes per shard, least recently used dropped first.
pub const RECENT_BYTES: u64 = 4 << 20;
/// Default for how long a request is retried (`CKSTREAM_S3_RETRY_SECS` overrides it).
pub const DEFAULT_RETRY_SECS: u64 = 120;

/// Request and byte counters of this process, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct S3Stats {
    /// GET requests (ranged or suffix).
    pub get_requests: AtomicU64,
    /// Bytes received by GETs.
    pub get_bytes: AtomicU64,
    /// Part uploads.
    pub put_requests: AtomicU64,
    /// Bytes sent in parts.
    pub put_bytes: AtomicU64,
    /// Everything else: create, complete and abort of multipart uploads, HEAD, DELETE.
    pub other_requests: AtomicU64,
}

pub(crate) static STATS: S3Stats = S3Stats {
    get_requests: AtomicU64::new(0),
    get_bytes: AtomicU64::new(0),
    put_requests: AtomicU64::new(0),
    put_bytes: AtomicU64::new(0),
    other_requests: AtomicU64::new(0),
};

/// The counters of every S3 request this process made (retries of one request count once).
pub fn stats() -> &'static S3Stats {
    &STATS
}

impl S3Stats {
    /// The counters as `(name, value)` pairs, for JSON output.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("get_requests", self.get_requests.load(Ordering::Relaxed)),
            ("get_bytes", self.get_bytes.load(Ordering::Relaxed)),
            ("put_requests", self.put_requests.load(Ordering::Relaxed)),
            ("put_bytes", self.put_bytes.load(Ordering::Relaxed)),
            (
                "other_requests",
                self.other_requests.load(Ordering::Relaxed),
            ),
        ]
    }
}

pub(crate) fn count_get(bytes: usize) {
    STATS.get_requests.fetch_add(1, Ordering::Relaxed);
    STATS.get_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
}

pub(crate) fn count_other() {
    STATS.other_requests.fetch_add(1, Ordering::Relaxed);
}

/// The runtime every S3 request runs on; the sync trait methods block on it.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ckstream-s3")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime for S3")
    })
}

pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// An `object_store` error as an `io::Error` naming the object. The message never holds
/// credentials (object_store does not put them in errors); a refusal gets a hint.
pub(crate) fn to_io(e: object_store::Error, url: &S3Url) -> io::Error {
    let text = e.to_string();
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        _ if text.contains("403 Forbidden") || text.contains("401 Unauthorized") => {
            io::ErrorKind::PermissionDenied
        }
        _ => io::ErrorKind::Other,
    };
    let hint = if kind == io::ErrorKind::PermissionDenied {
        " (the object store refused the credentials or the request: check AWS_ACCESS_KEY_ID, \
         AWS_SECRET_ACCESS_KEY, AWS_PROFILE and the bucket policy)"
    } else {
        ""
    };
    io::Error::new(kind, format!("{url}: {}{hint}", one_line(&text)))
}

/// Long server answers (XML bodies) on one line, cut to a readable length.
fn one_line(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 600 {
        let cut: String = s.chars().take(600).collect();
        format!("{cut}...")
    } else {
        s
    }
}
