//! The write side: one multipart upload per shard, completed on publish.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ckstream_format::{Error, Result, ShardSink};
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};

use super::config::connect;
use super::{
    block_on, count_get, count_other, runtime, to_io, S3Url, MIN_PART_SIZE, PART_SIZE, STATS,
};
use crate::failpoint;
use crate::ShardNames;
use ckstream_format::layout::{ShardHeader, HEADER_LEN};

/// Where one shard's multipart upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UploadState {
    /// Parts may still be added.
    Open,
    /// Completed: the object exists.
    Completed,
    /// Aborted: nothing of it exists.
    Aborted,
    /// Completion was asked for but no answer came back: the object may or may not
    /// exist. Nothing may be decided from this upload alone.
    Unknown,
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
    state: UploadState,
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
        if self.state != UploadState::Open {
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

    /// Completes the upload. On an error the state is [`UploadState::Unknown`]: the
    /// store may have completed it and only the answer was lost.
    fn complete(&mut self, failpoint_name: &str) -> io::Result<()> {
        self.finish_parts()?;
        failpoint::hit(failpoint_name)?;
        count_other();
        self.state = UploadState::Unknown;
        block_on(self.upload.complete()).map_err(|e| to_io(e, &self.url))?;
        self.state = UploadState::Completed;
        failpoint::hit(&format!("{failpoint_name}-answer"))
    }

    /// Aborts an open upload (parts in flight are cancelled).
    fn abort(&mut self) -> io::Result<()> {
        if self.state != UploadState::Open {
            return Ok(());
        }
        self.state = UploadState::Aborted;
        self.buf = Vec::new();
        for task in self.in_flight.drain(..) {
            task.abort();
            let _ = block_on(task);
        }
        count_other();
        block_on(self.upload.abort()).map_err(|e| to_io(e, &self.url))
    }

    /// Deletes the object of a completed (or maybe completed) upload.
    fn delete_object(&mut self) -> io::Result<()> {
        count_other();
        match block_on(self.store.delete(&self.url.path())) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                self.state = UploadState::Aborted;
                Ok(())
            }
            Err(e) => Err(to_io(e, &self.url)),
        }
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
///
/// Shards 1.. go to keys named by the new archive's id, which no other archive uses, so
/// completing them changes nothing a reader of the old archive sees. Completing shard 0
/// is the one step that replaces the old archive; the old archive's other shards are
/// deleted only after that.
pub struct S3PendingArchive {
    store: Arc<dyn ObjectStore>,
    base: S3Url,
    archive_id: [u8; 16],
    uploads: Vec<Arc<Mutex<Upload>>>,
    done: bool,
}

/// Shard 0's header of the archive at `url`, read with one ranged GET: `Ok(None)` when
/// there is no such object or it is no archive.
fn read_header(store: &Arc<dyn ObjectStore>, url: &S3Url) -> io::Result<Option<ShardHeader>> {
    match block_on(store.get_range(&url.path(), 0..HEADER_LEN as u64)) {
        Ok(bytes) => {
            count_get(bytes.len());
            if bytes.len() < HEADER_LEN {
                return Ok(None);
            }
            Ok(ShardHeader::decode(&bytes, &url.to_string()).ok())
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => {
            let e = to_io(e, url);
            // A range past the end of a short object: not an archive either.
            if e.to_string().contains("416") || e.to_string().contains("InvalidRange") {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

impl S3PendingArchive {
    /// Sends every shard's last part, completes shards 1.., then shard 0, then deletes
    /// the shards of the archive shard 0 replaced.
    ///
    /// # Errors
    /// [`Error::Io`] naming the shard whose upload failed. Every upload not completed is
    /// aborted and every new shard object deleted again, so the archive that had the name
    /// before is untouched. Only if completing shard 0 failed and the store could not
    /// then be asked whether it happened are the new objects left, and named.
    pub fn publish(mut self) -> Result<()> {
        self.done = true;
        let n = self.uploads.len();
        let upload_err = |u: &Upload, e: io::Error| Error::io(format!("uploading {}", u.url), e);
        let result = self
            .each(0..n, |u| u.finish_parts().map_err(|e| upload_err(u, e)))
            .and_then(|()| {
                self.each(1..n, |u| {
                    u.complete("s3.complete").map_err(|e| upload_err(u, e))
                })
            });
        if let Err(e) = result {
            self.remove_new();
            return Err(e);
        }
        let old = match read_header(&self.store, &self.base) {
            Ok(h) => h.filter(|h| h.shard_index == 0 && h.archive_id != self.archive_id),
            Err(e) => {
                eprintln!(
                    "ckstream: warning: cannot read the archive being replaced at {}, so its other shards (if any) will be left: {e}",
                    self.base
                );
                None
            }
        };
        let completed = {
            let mut u0 = self.uploads[0].lock().unwrap();
            u0.complete("s3.complete-0").map_err(|e| upload_err(&u0, e))
        };
        if let Err(e) = completed {
            // The answer may have been lost after the store completed the upload: ask
            // the store which archive the name holds now.
            match read_header(&self.store, &self.base) {
                Ok(Some(h)) if h.archive_id == self.archive_id => {}
                Ok(_) => {
                    self.remove_new();
                    return Err(e);
                }
                Err(check) => {
                    let keys: Vec<String> = (1..n)
                        .map(|i| self.uploads[i].lock().unwrap().url.to_string())
                        .collect();
                    return Err(Error::io(
                        format!(
                            "{e}; whether {} now holds the new archive is unknown (asking failed: {check});                              left in place: {} (the old archive's shards are untouched)",
                            self.base,
                            if keys.is_empty() { "nothing else".into() } else { keys.join(", ") }
                        ),
                        crate::publish::MayBeInPlace::wrap(io::Error::other(
                            "completion unknown",
                        )),
                    ));
                }
            }
        }
        if let Some(old) = old {
            self.remove_old(&old);
        }
        Ok(())
    }

    /// Runs `f` on the uploads in `range` in parallel; the first error wins.
    fn each(
        &self,
        range: std::ops::Range<usize>,
        f: impl Fn(&mut Upload) -> Result<()> + Sync,
    ) -> Result<()> {
        std::thread::scope(|s| {
            let handles: Vec<_> = self.uploads[range]
                .iter()
                .map(|u| {
                    let f = &f;
                    s.spawn(move || f(&mut u.lock().unwrap()))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Usage("upload thread panicked".into())))
                })
                .collect::<Result<Vec<()>>>()
                .map(|_| ())
        })
    }

    /// Deletes the shards 1.. of the replaced archive `old` (best effort: a failure only
    /// leaves unreferenced objects, named in a warning). Shards named by an archive id
    /// belong to that archive alone; an old-style `KEY.i` is deleted only when its
    /// header says it is `old`'s.
    fn remove_old(&self, old: &ShardHeader) {
        let names = ShardNames::of(old);
        for i in 1..old.shard_count {
            let url = self.base.shard(names, i);
            if names == ShardNames::Indexed {
                match read_header(&self.store, &url) {
                    Ok(Some(h)) if h.archive_id == old.archive_id => {}
                    _ => continue,
                }
            }
            count_other();
            match block_on(self.store.delete(&url.path())) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => eprintln!(
                    "ckstream: warning: could not delete {url}, a shard of the archive replaced: {}",
                    to_io(e, &url)
                ),
            }
        }
    }

    /// Aborts every upload still open and deletes every shard 1.. already completed.
    /// Never deletes shard 0's object, which (unless completed by this archive, and
    /// then `publish` succeeded) is the old archive's. A failure to abort (the store is
    /// unreachable) is reported on stderr, since those parts keep using space until a
    /// lifecycle rule (`AbortIncompleteMultipartUpload`) removes them.
    fn remove_new(&self) {
        for (i, u) in self.uploads.iter().enumerate() {
            let mut u = u.lock().unwrap();
            let result = match u.state {
                UploadState::Open => u.abort(),
                UploadState::Completed | UploadState::Unknown if i > 0 => u.delete_object(),
                _ => Ok(()),
            };
            if let Err(e) = result {
                eprintln!(
                    "ckstream: warning: could not remove the upload of {}: {e}",
                    u.url
                );
            }
        }
    }

    /// Aborts every upload; nothing under the name changes.
    pub fn discard(mut self) {
        self.done = true;
        self.remove_new();
    }
}

impl Drop for S3PendingArchive {
    fn drop(&mut self) {
        if !self.done {
            self.remove_new();
        }
    }
}

/// Starts one multipart upload per shard of the new archive `archive_id` at `base`,
/// shards 1.. named by `names`.
///
/// # Errors
/// [`Error::Usage`] for a bad configuration; [`Error::Io`] when an upload cannot be
/// started (unreachable store, wrong credentials, missing bucket).
pub fn create_archive(
    base: &S3Url,
    archive_id: [u8; 16],
    names: ShardNames,
    shards: u32,
) -> Result<(Vec<Box<dyn ShardSink>>, S3PendingArchive)> {
    let store: Arc<dyn ObjectStore> = connect(&base.bucket)?;
    // Parts in flight per shard: more for few shards, so one shard still keeps the
    // link busy; fewer for many, to bound memory (about (1 + this) * PART_SIZE each).
    let max_in_flight = (8 / shards.max(1) as usize).clamp(2, 4);
    let mut pending = S3PendingArchive {
        store: store.clone(),
        base: base.clone(),
        archive_id,
        uploads: Vec::new(),
        done: false,
    };
    let mut sinks: Vec<Box<dyn ShardSink>> = Vec::new();
    for i in 0..shards {
        let url = base.shard(names, i);
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
            state: UploadState::Open,
        }));
        pending.uploads.push(upload.clone());
        sinks.push(Box::new(S3Sink {
            upload,
            name: url.to_string(),
        }));
    }
    Ok((sinks, pending))
}
