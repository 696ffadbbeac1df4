//! S3 and S3-compatible object stores (AWS S3, MinIO, Ceph RGW, SeaweedFS, Garage) as
//! shard sinks and sources, through the `object_store` crate.
//!
//! An archive `s3://BUCKET/KEY` keeps shard 0 in object `KEY` and shard `i` in `KEY.i`,
//! as [`crate::shard_path`] names local shards.
//!
//! Writing: every shard is one multipart upload. The writer's shard thread fills
//! [`PART_SIZE`] buffers and each full buffer goes out as a part on a small shared
//! tokio runtime, with at most a few parts in flight per shard (the writer thread
//! waits when the limit is reached, so memory stays bounded). Nothing is visible under
//! the final names until [`S3PendingArchive::publish`] completes the uploads, shards
//! 1.. first and shard 0 last, after the writer has committed; a failure or
//! [`S3PendingArchive::discard`] aborts every upload. Transient errors are retried with
//! exponential backoff by `object_store` ([`RetryConfig`]).
//!
//! Reading: the first use of a shard fetches its tail with one suffix-range GET, which
//! also tells the object's size, and keeps it; the format reader finds the footer and
//! (usually) the whole index there. Other reads are ranged GETs; batched reads
//! ([`ShardSource::read_ranges`]) merge adjacent ranges and run in parallel; after
//! [`ShardSource::expect_sequential`] (restore, verify) reads are served from spans of
//! at most one aligned 1 MiB block, fetched two ahead in the background, a few kept per
//! shard. Once a reader announces what it will read ([`ShardSource::will_read`]: the
//! restore, per image file), spans cover only announced bytes and read-ahead fetches only
//! those; otherwise (verify's front-to-back scan) whole blocks, blindly ahead.
//!
//! Settings come from the standard AWS environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, ...)
//! and, for what the environment leaves out, from the shared config and credentials
//! files (`~/.aws/config`, `~/.aws/credentials`, profile `AWS_PROFILE`). Plain HTTP is
//! allowed for loopback endpoints. Every request is counted in [`stats`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use ckstream_format::{ArchiveReader, Error, Result, ShardSink, ShardSource};
use futures::stream::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, GetOptions, GetRange, MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};

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
/// Sequential reads ([`ShardSource::expect_sequential`]) fetch aligned spans of this size...
pub const READ_AHEAD_SPAN: u64 = 1 << 20;
/// ...this many spans ahead of the one being read...
pub const READ_AHEAD_SPANS: u64 = 2;
/// ...and keep at most this many per shard (12 MiB; spans read whole are dropped first,
/// then the oldest).
pub const READ_AHEAD_KEPT: usize = 12;
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

static STATS: S3Stats = S3Stats {
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

fn count_get(bytes: usize) {
    STATS.get_requests.fetch_add(1, Ordering::Relaxed);
    STATS.get_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
}

fn count_other() {
    STATS.other_requests.fetch_add(1, Ordering::Relaxed);
}

/// True for `s3://...` archive names.
pub fn is_s3_url(s: &str) -> bool {
    s.starts_with("s3://")
}

/// An object named by `s3://BUCKET/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub key: String,
}

impl S3Url {
    /// Parses `s3://BUCKET/KEY`.
    ///
    /// # Errors
    /// [`Error::Usage`] when the bucket or key is missing or the key is not a valid
    /// object path (empty segments, a trailing `/`).
    pub fn parse(s: &str) -> Result<Self> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| Error::Usage(format!("{s}: not an s3:// URL")))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || key.is_empty() || key.ends_with('/') {
            return Err(Error::Usage(format!(
                "{s}: expected s3://BUCKET/NAME (with an object name after the bucket)"
            )));
        }
        ObjectPath::parse(key)
            .map_err(|e| Error::Usage(format!("{s}: not a valid object name: {e}")))?;
        Ok(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The object of shard `i` (shard 0 is the object itself, shard i is `KEY.i`).
    pub fn shard(&self, i: u32) -> S3Url {
        let key = if i == 0 {
            self.key.clone()
        } else {
            format!("{}.{i}", self.key)
        };
        S3Url {
            bucket: self.bucket.clone(),
            key,
        }
    }

    fn path(&self) -> ObjectPath {
        ObjectPath::parse(&self.key).expect("validated in S3Url::parse")
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// The runtime every S3 request runs on; the sync trait methods block on it.
fn runtime() -> &'static tokio::runtime::Runtime {
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

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// An `object_store` error as an `io::Error` naming the object. The message never holds
/// credentials (object_store does not put them in errors); a refusal gets a hint.
fn to_io(e: object_store::Error, url: &S3Url) -> io::Error {
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

/// Settings of one profile from `~/.aws/credentials` and `~/.aws/config` (or the files
/// named by `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`).
fn profile_settings() -> HashMap<String, String> {
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let file = |var: &str, name: &str| {
        std::env::var_os(var)
            .map(std::path::PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    let mut out = HashMap::new();
    // The config file names sections `[profile NAME]` (but `[default]`); the
    // credentials file `[NAME]`. Credentials win, as in the AWS CLI.
    let config_section = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    for (path, section) in [
        (file("AWS_CONFIG_FILE", "config"), config_section),
        (
            file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            profile.clone(),
        ),
    ] {
        let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
            continue;
        };
        let mut inside = false;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                inside = name.trim() == section;
                continue;
            }
            if inside {
                if let Some((k, v)) = line.split_once('=') {
                    out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
        }
    }
    out
}

fn env_set(names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| std::env::var_os(n).is_some_and(|v| !v.is_empty()))
}

/// Resolves the endpoint the store will use, for the loopback check.
fn endpoint(profile: &HashMap<String, String>) -> Option<String> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        .or_else(|| profile.get("endpoint_url").cloned())
}

fn is_loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    host == "localhost" || host == "[::1]" || host.starts_with("127.")
}

/// A client for `bucket`, configured from the environment and the AWS config files.
///
/// # Errors
/// [`Error::Usage`] for an incomplete or invalid configuration.
fn connect(bucket: &str) -> Result<Arc<AmazonS3>> {
    let profile = profile_settings();
    let has_credentials = env_set(&[
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_SKIP_SIGNATURE",
        "CKSTREAM_S3_USE_IMDS",
    ]) || profile.contains_key("aws_access_key_id");
    if !has_credentials {
        // Without this check object_store would ask the EC2 instance metadata service,
        // which off EC2 means a confusing error after a request to a link-local address.
        return Err(Error::Usage(format!(
            "no S3 credentials for bucket {bucket}: set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with ~/.aws/credentials); on EC2, set \
             CKSTREAM_S3_USE_IMDS=1 to use the instance role"
        )));
    }
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if !env_set(&["AWS_ACCESS_KEY_ID"]) {
        if let (Some(id), Some(secret)) = (
            profile.get("aws_access_key_id"),
            profile.get("aws_secret_access_key"),
        ) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
            if let Some(token) = profile.get("aws_session_token") {
                builder = builder.with_token(token);
            }
        }
    }
    if !env_set(&["AWS_REGION", "AWS_DEFAULT_REGION"]) {
        if let Some(region) = profile.get("region") {
            builder = builder.with_region(region);
        }
    }
    let endpoint = endpoint(&profile);
    if let Some(url) = &endpoint {
        if !env_set(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]) {
            builder = builder.with_endpoint(url);
        }
        if is_loopback_http(url) {
            builder = builder.with_allow_http(true);
        }
    }
    if !env_set(&["AWS_UNSIGNED_PAYLOAD"]) {
        // No SHA-256 pass over every part for the signature: TLS protects the bytes in
        // transit, and every chunk carries a BLAKE3 digest that readers check anyway.
        builder = builder.with_unsigned_payload(true);
    }
    let retry_secs = std::env::var("CKSTREAM_S3_RETRY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RETRY_SECS);
    builder = builder.with_retry(RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(retry_secs),
    });
    let store = builder
        .build()
        .map_err(|e| Error::Usage(format!("S3 configuration for bucket {bucket}: {e}")))?;
    Ok(Arc::new(store))
}

/// One shard's multipart upload: the part being filled and the parts in flight.
struct Upload {
    url: S3Url,
    store: Arc<dyn ObjectStore>,
    upload: Box<dyn MultipartUpload>,
    buf: Vec<u8>,
    in_flight: VecDeque<tokio::task::JoinHandle<object_store::Result<()>>>,
    max_in_flight: usize,
    parts: u64,
    /// Set once completed or aborted; later calls do nothing.
    finished: bool,
}

impl Upload {
    fn send_part(&mut self, data: Vec<u8>) -> io::Result<()> {
        while self.in_flight.len() >= self.max_in_flight {
            self.wait_oldest()?;
        }
        let len = data.len();
        let _guard = runtime().enter();
        let part = self.upload.put_part(PutPayload::from(Bytes::from(data)));
        STATS.put_requests.fetch_add(1, Ordering::Relaxed);
        STATS.put_bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.in_flight.push_back(runtime().spawn(part));
        self.parts += 1;
        Ok(())
    }

    fn wait_oldest(&mut self) -> io::Result<()> {
        let Some(task) = self.in_flight.pop_front() else {
            return Ok(());
        };
        match block_on(task) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(to_io(e, &self.url)),
            Err(e) => Err(io::Error::other(format!(
                "{}: part upload stopped: {e}",
                self.url
            ))),
        }
    }

    fn wait_all(&mut self) -> io::Result<()> {
        while !self.in_flight.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }

    fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.finished {
            return Err(io::Error::other(format!(
                "{}: upload already ended",
                self.url
            )));
        }
        while !data.is_empty() {
            let take = (PART_SIZE - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == PART_SIZE {
                let part = std::mem::replace(&mut self.buf, Vec::with_capacity(PART_SIZE));
                self.send_part(part)?;
            }
        }
        Ok(())
    }

    /// Uploads what can go out as a part now and waits for every part in flight. Less
    /// than [`MIN_PART_SIZE`] may stay buffered: only the last part may be that small.
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.len() >= MIN_PART_SIZE {
            let part = std::mem::take(&mut self.buf);
            self.send_part(part)?;
        }
        self.wait_all()
    }

    /// Sends the last part and waits for all parts; does not complete the upload.
    fn finish_parts(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() || self.parts == 0 {
            let part = std::mem::take(&mut self.buf);
            self.send_part(part)?;
        }
        self.wait_all()
    }

    fn complete(&mut self) -> io::Result<()> {
        self.finish_parts()?;
        count_other();
        let result = block_on(self.upload.complete());
        self.finished = true;
        result.map(|_| ()).map_err(|e| to_io(e, &self.url))
    }

    fn abort(&mut self) -> io::Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.buf = Vec::new();
        for task in self.in_flight.drain(..) {
            task.abort();
            let _ = block_on(task);
        }
        count_other();
        block_on(self.upload.abort()).map_err(|e| to_io(e, &self.url))
    }
}

/// A shard being written as a multipart upload (see the module documentation).
pub struct S3Sink {
    upload: Arc<Mutex<Upload>>,
    name: String,
}

impl ShardSink for S3Sink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.upload.lock().unwrap().write(buf)
    }

    /// Uploads every full part and waits for them: what the writer has synced is in the
    /// object store, except up to [`MIN_PART_SIZE`] bytes that wait for the last part.
    fn sync(&mut self) -> io::Result<()> {
        self.upload.lock().unwrap().flush()
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// The multipart uploads of a new archive, completed by [`publish`](Self::publish) once
/// the writer has committed, or aborted by [`discard`](Self::discard) (or on drop).
pub struct S3PendingArchive {
    uploads: Vec<Arc<Mutex<Upload>>>,
    done: bool,
}

impl S3PendingArchive {
    /// Sends every shard's last part, then completes shards 1.. and finally shard 0, so
    /// the archive reads as complete only when all of it is in place. On failure every
    /// upload not yet completed is aborted and completed shards are deleted again.
    ///
    /// # Errors
    /// [`Error::Io`] naming the shard whose upload failed.
    pub fn publish(mut self) -> Result<()> {
        self.done = true;
        let result = self.publish_inner();
        if result.is_err() {
            self.abort_all();
        }
        result
    }

    fn publish_inner(&self) -> Result<()> {
        let each = |range: std::ops::Range<usize>, f: fn(&mut Upload) -> io::Result<()>| {
            std::thread::scope(|s| {
                let handles: Vec<_> = self.uploads[range]
                    .iter()
                    .map(|u| {
                        s.spawn(move || {
                            let mut u = u.lock().unwrap();
                            f(&mut u).map_err(|e| Error::io(format!("uploading {}", u.url), e))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(Error::Usage("upload thread panicked".into())))
                    })
                    .collect::<Result<Vec<()>>>()
            })
        };
        let n = self.uploads.len();
        each(0..n, Upload::finish_parts)?;
        each(1..n, Upload::complete)?;
        each(0..1, Upload::complete)?;
        Ok(())
    }

    /// Aborts every multipart upload; a failure to abort (the store is unreachable) is
    /// reported on stderr, since those parts keep using space until a lifecycle rule
    /// (`AbortIncompleteMultipartUpload`) removes them.
    pub fn discard(mut self) {
        self.done = true;
        self.abort_all();
    }

    fn abort_all(&self) {
        for u in &self.uploads {
            let mut u = u.lock().unwrap();
            let completed = u.finished;
            if completed {
                // Completed before a later shard failed: remove it again, best effort.
                if u.parts > 0 {
                    count_other();
                    let path = u.url.path();
                    let _ = block_on(u.store.delete(&path));
                    u.parts = 0;
                }
                continue;
            }
            if let Err(e) = u.abort() {
                eprintln!(
                    "ckstream: warning: could not abort the multipart upload of {}: {e}",
                    u.url
                );
            }
        }
    }
}

impl Drop for S3PendingArchive {
    fn drop(&mut self) {
        if !self.done {
            self.abort_all();
        }
    }
}

/// Starts one multipart upload per shard of the archive at `url`.
///
/// # Errors
/// [`Error::Usage`] for a bad URL or configuration; [`Error::Io`] when an upload cannot
/// be started (unreachable store, wrong credentials, missing bucket).
pub fn create_archive(
    url: &str,
    shards: u32,
) -> Result<(Vec<Box<dyn ShardSink>>, S3PendingArchive)> {
    let base = S3Url::parse(url)?;
    let store: Arc<dyn ObjectStore> = connect(&base.bucket)?;
    // Parts in flight per shard: more for few shards, so one shard still keeps the
    // link busy; fewer for many, to bound memory (about (1 + this) * PART_SIZE each).
    let max_in_flight = (8 / shards.max(1) as usize).clamp(2, 4);
    let mut pending = S3PendingArchive {
        uploads: Vec::new(),
        done: false,
    };
    let mut sinks: Vec<Box<dyn ShardSink>> = Vec::new();
    for i in 0..shards {
        let url = base.shard(i);
        count_other();
        let upload = block_on(store.put_multipart(&url.path()))
            .map_err(|e| Error::io(format!("cannot start uploading {url}"), to_io(e, &url)))?;
        let upload = Arc::new(Mutex::new(Upload {
            url: url.clone(),
            store: store.clone(),
            upload,
            buf: Vec::with_capacity(PART_SIZE),
            in_flight: VecDeque::new(),
            max_in_flight,
            parts: 0,
            finished: false,
        }));
        pending.uploads.push(upload.clone());
        sinks.push(Box::new(S3Sink {
            upload,
            name: url.to_string(),
        }));
    }
    Ok((sinks, pending))
}

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
    /// The spans fetched or being fetched, oldest first (at most [`READ_AHEAD_KEPT`]).
    spans: Mutex<VecDeque<Arc<Span>>>,
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
            planned: Mutex::new(None),
            get_requests: Arc::new(AtomicU64::new(0)),
            get_bytes: Arc::new(AtomicU64::new(0)),
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
            spans.retain(|s| !s.used_up());
            while spans.len() >= READ_AHEAD_KEPT {
                spans.pop_front();
            }
            spans.push_back(span.clone());
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
        let index = from / READ_AHEAD_SPAN;
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
        let (start, end) = match (planned.as_mut(), hull) {
            (Some(p), Some((lo, hi))) => {
                p.remove(&index);
                (lo.min(from), hi.max(to))
            }
            // Announced reads elsewhere, none here: fetch just what is asked for.
            (Some(_), None) => (from, to),
            (None, _) => (
                index * READ_AHEAD_SPAN,
                ((index + 1) * READ_AHEAD_SPAN).min(tail.start),
            ),
        };
        drop(planned);
        self.start_span(start, end)
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
                        i * READ_AHEAD_SPAN,
                        ((i + 1) * READ_AHEAD_SPAN).min(tail.start),
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
        let first = offset / READ_AHEAD_SPAN;
        let last = (end - 1) / READ_AHEAD_SPAN;
        // The spans needed now first, so starting the ones ahead cannot evict them.
        let needed: Vec<(u64, u64, Arc<Span>)> = (first..=last)
            .map(|index| {
                let from = offset.max(index * READ_AHEAD_SPAN);
                let to = end.min((index + 1) * READ_AHEAD_SPAN);
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
            for index in offset / READ_AHEAD_SPAN..=(end - 1) / READ_AHEAD_SPAN {
                let from = offset.max(index * READ_AHEAD_SPAN);
                let to = end.min((index + 1) * READ_AHEAD_SPAN);
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

/// Opens the archive whose shard 0 is `url`. Only shard 0 is read here (its tail in one
/// request, its header in at most one more); other shards are opened and checked when
/// first read.
///
/// # Errors
/// [`Error::Usage`] for a bad URL or configuration; [`Error::Io`] when shard 0 cannot be
/// read (missing object, refused credentials); everything [`ArchiveReader::open`]
/// reports. A missing shard 1.. is an [`Error::Corrupt`] naming its object, from the
/// first read that needs it.
pub fn open_archive(url: &str) -> Result<ArchiveReader> {
    let base = S3Url::parse(url)?;
    let store: Arc<dyn ObjectStore> = connect(&base.bucket)?;
    ArchiveReader::open_deferred(Arc::new(move |i| {
        let shard = base.shard(i);
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
        Ok(Box::new(src) as Box<dyn ShardSource>)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = S3Url::parse("s3://bucket/dir/ckpt.cka").unwrap();
        assert_eq!(u.bucket, "bucket");
        assert_eq!(u.key, "dir/ckpt.cka");
        assert_eq!(u.shard(0).to_string(), "s3://bucket/dir/ckpt.cka");
        assert_eq!(u.shard(3).to_string(), "s3://bucket/dir/ckpt.cka.3");
        for bad in [
            "s3://",
            "s3://bucket",
            "s3://bucket/",
            "s3:///key",
            "s3://b/dir/",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
        assert!(is_loopback_http("http://127.0.0.1:8333"));
        assert!(is_loopback_http("http://localhost:9000/"));
        assert!(!is_loopback_http("https://127.0.0.1:8333"));
        assert!(!is_loopback_http("http://s3.example.com"));
    }

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
