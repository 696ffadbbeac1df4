//! The write side: one multipart upload per shard, completed on publish.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ckstream_format::{Error, Result, ShardSink};
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};

use super::config::connect;
use super::{block_on, count_other, runtime, to_io, S3Url, MIN_PART_SIZE, PART_SIZE, STATS};

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
