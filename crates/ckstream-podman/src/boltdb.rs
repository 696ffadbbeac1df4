//! A small, read-only reader for BoltDB (bbolt) files, enough to read podman's
//! `bolt_state.db` without Go.
//!
//! The whole file is read into memory once (under a shared `flock`, the lock bbolt
//! writers take exclusively, so the snapshot is consistent) and then walked:
//! the newer of the two valid meta pages names the root bucket; buckets are B+
//! trees of branch and leaf pages (a page may continue into overflow pages), and
//! small buckets are stored inline in their parent's leaf value.
//!
//! The file is treated as untrusted: every offset and count is bounds-checked,
//! page ids are checked against the high-water mark and against the id stored in
//! the page, tree walks detect pages reached twice (cycles) and overly deep
//! trees, and every problem is reported as a [`BoltError`], never a panic.
//!
//! On-disk layout (little-endian, as written by bbolt on x86-64 and arm64):
//! - page header (16 bytes): page id `u64`, flags `u16` (branch 0x01, leaf 0x02,
//!   meta 0x04, freelist 0x10), element count `u16`, overflow page count `u32`;
//! - meta (after the page header): magic `u32`, version `u32`, page size `u32`,
//!   flags `u32`, root bucket (root page `u64`, sequence `u64`), freelist page `u64`,
//!   high-water page id `u64`, txid `u64`, FNV-1a 64 checksum of the preceding 56 bytes;
//! - leaf element (16 bytes): flags `u32` (0x01 = value is a bucket), `pos`, `ksize`,
//!   `vsize` (`u32` each); the key starts `pos` bytes after the element itself and
//!   the value follows the key;
//! - branch element (16 bytes): `pos` `u32`, `ksize` `u32`, child page id `u64`;
//! - bucket value: root page `u64` and sequence `u64`; a root of 0 means the
//!   bucket is inline and a leaf page follows the header inside the value.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0xED0C_DAED;
const SUPPORTED_VERSION: u32 = 2;
const PAGE_HEADER_SIZE: usize = 16;
/// Leaf and branch elements happen to have the same size.
const ELEMENT_SIZE: usize = 16;
const BUCKET_HEADER_SIZE: usize = 16;
/// The meta fields covered by the checksum (everything before the checksum itself).
const META_CHECKSUMMED_LEN: usize = 56;
const META_SIZE: usize = META_CHECKSUMMED_LEN + 8;

const PAGE_FLAG_BRANCH: u16 = 0x01;
const PAGE_FLAG_LEAF: u16 = 0x02;
const LEAF_FLAG_BUCKET: u32 = 0x01;

/// Page sizes bbolt may have used; tried in this order to find meta page 1 when
/// meta page 0 is unreadable (the page size is only recorded inside the metas).
const CANDIDATE_PAGE_SIZES: [usize; 8] = [4096, 8192, 16384, 32768, 65536, 512, 1024, 2048];
const MIN_PAGE_SIZE: u32 = 512;
const MAX_PAGE_SIZE: u32 = 1 << 20;

/// A B+ tree this deep would need more pages than any real file has; a deeper
/// walk means a corrupt (or hostile) file.
const MAX_TREE_DEPTH: usize = 64;

/// How long [`BoltDb::open`] waits for a writer to release the database.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
const LOCK_RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// Why a meta page was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaProblem {
    /// The file ends before the meta page does.
    #[error("the file ends inside the meta page")]
    Truncated,
    /// The magic number is not bbolt's.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// The format version is not 2.
    #[error("unsupported format version {0}")]
    BadVersion(u32),
    /// The stored checksum does not match the meta's contents.
    #[error("checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    BadChecksum {
        /// Checksum stored in the page.
        stored: u64,
        /// FNV-1a 64 of the meta fields.
        computed: u64,
    },
    /// The recorded page size is implausible or inconsistent with where the meta was found.
    #[error("implausible page size {0}")]
    BadPageSize(u32),
}

/// Errors reading a BoltDB file.
#[derive(Debug, thiserror::Error)]
pub enum BoltError {
    /// The file could not be opened, locked or read.
    #[error("reading bolt database {path}: {source}")]
    Io {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A writer kept its exclusive lock on the file for too long.
    #[error("bolt database {path} is still locked by a writer after {waited:?}")]
    LockTimeout {
        /// The database file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// Neither meta page is valid.
    #[error("no valid meta page: page 0: {meta0}; page 1: {meta1}")]
    NoValidMeta {
        /// Why meta page 0 was rejected.
        meta0: MetaProblem,
        /// Why meta page 1 was rejected.
        meta1: MetaProblem,
    },
    /// The file is shorter than the pages the meta says were written.
    #[error("file is truncated: {len} bytes, but the meta's high-water mark {high_water} pages of {page_size} bytes needs {needed}")]
    Truncated {
        /// Actual file length.
        len: usize,
        /// High-water page id from the meta.
        high_water: u64,
        /// Page size from the meta.
        page_size: usize,
        /// Bytes the high-water mark requires.
        needed: u128,
    },
    /// A page reference (including its overflow pages) reaches the high-water mark or beyond.
    #[error("page {pgid} (+{overflow} overflow pages) is beyond the high-water mark {high_water}")]
    PageBeyondHighWater {
        /// The referenced page.
        pgid: u64,
        /// Its overflow page count.
        overflow: u32,
        /// High-water page id from the meta.
        high_water: u64,
    },
    /// A page does not carry its own id in its header.
    #[error("page {pgid} says it is page {found}")]
    PageIdMismatch {
        /// The referenced page.
        pgid: u64,
        /// The id in the page header.
        found: u64,
    },
    /// A tree page is neither a branch nor a leaf page, or an inline bucket is not a leaf.
    #[error("{location} has flags {flags:#06x}, expected a branch or leaf page")]
    UnexpectedPageType {
        /// Which page.
        location: PageLocation,
        /// The page flags found.
        flags: u16,
    },
    /// A branch page without elements (bbolt never writes one).
    #[error("{location} is a branch page without elements")]
    EmptyBranch {
        /// Which page.
        location: PageLocation,
    },
    /// An element header, key or value lies outside its page.
    #[error("{location}: element {index} (of {count}) lies outside the page")]
    ElementOutOfBounds {
        /// Which page.
        location: PageLocation,
        /// Element index.
        index: usize,
        /// Element count of the page.
        count: usize,
    },
    /// A bucket value is too short to hold a bucket header (and inline page).
    #[error("{location}: element {index} is flagged as a bucket but its value ({len} bytes) is too short")]
    BadBucketValue {
        /// Which page holds the element.
        location: PageLocation,
        /// Element index.
        index: usize,
        /// Value length.
        len: usize,
    },
    /// A tree walk reached the same page twice: the file has a page cycle or shared pages.
    #[error("page {pgid} is reached twice in one bucket tree (page cycle)")]
    PageCycle {
        /// The page reached twice.
        pgid: u64,
    },
    /// A bucket tree is deeper than any plausible file allows.
    #[error("bucket tree is deeper than {MAX_TREE_DEPTH} levels")]
    TreeTooDeep,
    /// A bucket on the requested path does not exist (or the key is not a bucket).
    #[error("bucket {path} not found")]
    BucketNotFound {
        /// The path up to and including the missing bucket, `/`-separated.
        path: String,
    },
}

/// Where a page was found, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageLocation {
    /// A page of the file.
    Page(u64),
    /// The leaf page stored inline in a bucket value.
    Inline,
}

impl fmt::Display for PageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Page(pgid) => write!(f, "page {pgid}"),
            Self::Inline => f.write_str("inline bucket page"),
        }
    }
}

/// The fields of the meta page that the reader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    page_size: u32,
    root_pgid: u64,
    high_water: u64,
    txid: u64,
}

/// A BoltDB file read into memory, positioned on its newest valid meta page.
pub struct BoltDb {
    data: Vec<u8>,
    page_size: usize,
    meta: Meta,
}

impl fmt::Debug for BoltDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoltDb")
            .field("len", &self.data.len())
            .field("page_size", &self.page_size)
            .field("txid", &self.meta.txid)
            .field("high_water", &self.meta.high_water)
            .finish()
    }
}

impl BoltDb {
    /// Reads the database at `path`, holding a shared `flock` while reading so a
    /// bbolt writer (which holds the lock exclusively while the database is open)
    /// cannot change it underneath.
    ///
    /// # Errors
    /// [`BoltError::Io`] if the file cannot be opened, locked or read,
    /// [`BoltError::LockTimeout`] if a writer keeps it locked for 10 s, and the
    /// errors of [`BoltDb::from_bytes`].
    pub fn open(path: &Path) -> Result<Self, BoltError> {
        let io_error = |source| BoltError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io_error)?;
        let started = Instant::now();
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) | Err(rustix::io::Errno::INTR) => {
                    if started.elapsed() >= LOCK_TIMEOUT {
                        return Err(BoltError::LockTimeout {
                            path: path.to_path_buf(),
                            waited: started.elapsed(),
                        });
                    }
                    std::thread::sleep(LOCK_RETRY_INTERVAL);
                }
                Err(errno) => return Err(io_error(errno.into())),
            }
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io_error)?;
        // Closing the file releases the lock.
        drop(file);
        Self::from_bytes(data)
    }

    /// Interprets `data` as a BoltDB file.
    ///
    /// # Errors
    /// [`BoltError::NoValidMeta`] if neither meta page has the right magic,
    /// version, page size and checksum; [`BoltError::Truncated`] if the file is
    /// shorter than the newest valid meta's high-water mark says.
    pub fn from_bytes(data: Vec<u8>) -> Result<Self, BoltError> {
        let meta0 = parse_meta(&data, 0, None);
        let page_size = match &meta0 {
            Ok(meta) => meta.page_size as usize,
            Err(_) => CANDIDATE_PAGE_SIZES
                .iter()
                .copied()
                .find(|&size| parse_meta(&data, size, Some(size)).is_ok())
                .unwrap_or(CANDIDATE_PAGE_SIZES[0]),
        };
        let meta1 = parse_meta(&data, page_size, Some(page_size));
        let meta = match (meta0, meta1) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Ok(a), Err(_)) => a,
            (Err(_), Ok(b)) => b,
            (Err(meta0), Err(meta1)) => return Err(BoltError::NoValidMeta { meta0, meta1 }),
        };
        let needed = u128::from(meta.high_water) * page_size as u128;
        if (data.len() as u128) < needed {
            return Err(BoltError::Truncated {
                len: data.len(),
                high_water: meta.high_water,
                page_size,
                needed,
            });
        }
        Ok(Self {
            data,
            page_size,
            meta,
        })
    }

    /// The page size recorded in the meta page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The transaction id of the meta page in use (the newest valid one).
    pub fn txid(&self) -> u64 {
        self.meta.txid
    }

    /// The root bucket, whose entries are the top-level buckets.
    pub fn root(&self) -> Bucket<'_> {
        Bucket {
            db: self,
            root: BucketRoot::Page(self.meta.root_pgid),
        }
    }

    /// Follows `path` from the root bucket through nested buckets, e.g.
    /// `db.bucket(&[b"ctr", id])`.
    ///
    /// # Errors
    /// [`BoltError::BucketNotFound`] if a name on the path is missing or names a
    /// plain value, and any page error met on the way.
    pub fn bucket(&self, path: &[&[u8]]) -> Result<Bucket<'_>, BoltError> {
        let mut bucket = self.root();
        for (depth, name) in path.iter().enumerate() {
            bucket = bucket
                .bucket(name)?
                .ok_or_else(|| BoltError::BucketNotFound {
                    path: display_path(&path[..=depth]),
                })?;
        }
        Ok(bucket)
    }

    /// Returns the page `pgid` with its overflow pages, checked to be a branch or leaf page.
    fn tree_page(&self, pgid: u64) -> Result<Node<'_>, BoltError> {
        let beyond = |overflow| BoltError::PageBeyondHighWater {
            pgid,
            overflow,
            high_water: self.meta.high_water,
        };
        if pgid >= self.meta.high_water {
            return Err(beyond(0));
        }
        // `from_bytes` checked that every page below the high-water mark is in the file.
        let start = usize::try_from(pgid)
            .ok()
            .and_then(|pgid| pgid.checked_mul(self.page_size))
            .ok_or_else(|| beyond(0))?;
        let header = &self.data[start..start + PAGE_HEADER_SIZE];
        let found = read_u64(header, 0);
        let overflow = read_u32(header, 12);
        if pgid + u64::from(overflow) >= self.meta.high_water {
            return Err(beyond(overflow));
        }
        if found != pgid {
            return Err(BoltError::PageIdMismatch { pgid, found });
        }
        let len = (overflow as usize + 1) * self.page_size;
        Node::parse(&self.data[start..start + len], PageLocation::Page(pgid))
    }
}

/// The value stored under a key: plain bytes or a nested bucket.
#[derive(Debug, Clone, Copy)]
pub enum Value<'db> {
    /// A plain value.
    Data(&'db [u8]),
    /// A nested bucket.
    Bucket(Bucket<'db>),
}

/// A bucket (a key/value B+ tree) of a [`BoltDb`].
#[derive(Clone, Copy)]
pub struct Bucket<'db> {
    db: &'db BoltDb,
    root: BucketRoot<'db>,
}

impl fmt::Debug for Bucket<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.root {
            BucketRoot::Page(pgid) => write!(f, "Bucket(page {pgid})"),
            BucketRoot::Inline(bytes) => write!(f, "Bucket(inline, {} bytes)", bytes.len()),
        }
    }
}

#[derive(Clone, Copy)]
enum BucketRoot<'db> {
    Page(u64),
    /// The inline leaf page (the bucket value after its header).
    Inline(&'db [u8]),
}

impl<'db> Bucket<'db> {
    /// The plain value stored under `key`; `None` if the key is missing or holds
    /// a nested bucket (as bbolt's `Get`).
    ///
    /// # Errors
    /// Any page error met while descending the tree.
    pub fn get(&self, key: &[u8]) -> Result<Option<&'db [u8]>, BoltError> {
        Ok(match self.lookup(key)? {
            Some(Value::Data(value)) => Some(value),
            _ => None,
        })
    }

    /// The nested bucket named `name`; `None` if the key is missing or holds a plain value.
    ///
    /// # Errors
    /// Any page error met while descending the tree, and [`BoltError::BadBucketValue`].
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket<'db>>, BoltError> {
        Ok(match self.lookup(name)? {
            Some(Value::Bucket(bucket)) => Some(bucket),
            _ => None,
        })
    }

    /// The value stored under `key`, plain or bucket.
    ///
    /// # Errors
    /// Any page error met while descending the tree.
    pub fn lookup(&self, key: &[u8]) -> Result<Option<Value<'db>>, BoltError> {
        let mut node = self.root_node()?;
        let mut path = Vec::new();
        loop {
            if path.len() >= MAX_TREE_DEPTH {
                return Err(BoltError::TreeTooDeep);
            }
            let (index, exact) = node.search(key)?;
            if node.is_branch {
                // The child covering `key` is the last one whose first key is <= key.
                let index = if exact {
                    index
                } else {
                    index.saturating_sub(1)
                };
                let child = node.branch_child(index)?;
                if let PageLocation::Page(pgid) = node.location {
                    path.push(pgid);
                }
                if path.contains(&child) {
                    return Err(BoltError::PageCycle { pgid: child });
                }
                node = self.db.tree_page(child)?;
            } else {
                if !exact {
                    return Ok(None);
                }
                let (_, value) = node.leaf_entry(index, self.db)?;
                return Ok(Some(value));
            }
        }
    }

    /// All entries of the bucket in key order.
    ///
    /// # Errors
    /// Any page error met while walking the tree, including [`BoltError::PageCycle`].
    pub fn entries(&self) -> Result<Vec<(&'db [u8], Value<'db>)>, BoltError> {
        let mut entries = Vec::new();
        let mut visited = HashSet::new();
        let root = self.root_node()?;
        self.collect(root, 0, &mut visited, &mut entries)?;
        Ok(entries)
    }

    /// All keys of the bucket in key order (plain values and nested buckets alike).
    ///
    /// # Errors
    /// As [`Bucket::entries`].
    pub fn keys(&self) -> Result<Vec<&'db [u8]>, BoltError> {
        Ok(self.entries()?.into_iter().map(|(key, _)| key).collect())
    }

    fn root_node(&self) -> Result<Node<'db>, BoltError> {
        match self.root {
            BucketRoot::Page(pgid) => self.db.tree_page(pgid),
            BucketRoot::Inline(bytes) => {
                let node = Node::parse(bytes, PageLocation::Inline)?;
                if node.is_branch {
                    return Err(BoltError::UnexpectedPageType {
                        location: PageLocation::Inline,
                        flags: PAGE_FLAG_BRANCH,
                    });
                }
                Ok(node)
            }
        }
    }

    fn collect(
        &self,
        node: Node<'db>,
        depth: usize,
        visited: &mut HashSet<u64>,
        entries: &mut Vec<(&'db [u8], Value<'db>)>,
    ) -> Result<(), BoltError> {
        if depth >= MAX_TREE_DEPTH {
            return Err(BoltError::TreeTooDeep);
        }
        if let PageLocation::Page(pgid) = node.location {
            if !visited.insert(pgid) {
                return Err(BoltError::PageCycle { pgid });
            }
        }
        for index in 0..node.count {
            if node.is_branch {
                let child = node.branch_child(index)?;
                if visited.contains(&child) {
                    return Err(BoltError::PageCycle { pgid: child });
                }
                let child = self.db.tree_page(child)?;
                self.collect(child, depth + 1, visited, entries)?;
            } else {
                entries.push(node.leaf_entry(index, self.db)?);
            }
        }
        Ok(())
    }
}

/// A parsed branch or leaf page (a file page with its overflow, or an inline bucket page).
#[derive(Clone, Copy)]
struct Node<'db> {
    bytes: &'db [u8],
    location: PageLocation,
    is_branch: bool,
    count: usize,
}

impl<'db> Node<'db> {
    fn parse(bytes: &'db [u8], location: PageLocation) -> Result<Self, BoltError> {
        if bytes.len() < PAGE_HEADER_SIZE {
            return Err(BoltError::ElementOutOfBounds {
                location,
                index: 0,
                count: 0,
            });
        }
        let flags = read_u16(bytes, 8);
        let count = read_u16(bytes, 10) as usize;
        let is_branch = match flags {
            PAGE_FLAG_BRANCH => true,
            PAGE_FLAG_LEAF => false,
            _ => return Err(BoltError::UnexpectedPageType { location, flags }),
        };
        if is_branch && count == 0 {
            return Err(BoltError::EmptyBranch { location });
        }
        if PAGE_HEADER_SIZE + count * ELEMENT_SIZE > bytes.len() {
            return Err(BoltError::ElementOutOfBounds {
                location,
                index: count.saturating_sub(1),
                count,
            });
        }
        Ok(Self {
            bytes,
            location,
            is_branch,
            count,
        })
    }

    fn out_of_bounds(&self, index: usize) -> BoltError {
        BoltError::ElementOutOfBounds {
            location: self.location,
            index,
            count: self.count,
        }
    }

    /// Byte offset of element `index`'s header (in bounds: checked in `parse`).
    fn element_offset(&self, index: usize) -> usize {
        PAGE_HEADER_SIZE + index * ELEMENT_SIZE
    }

    /// The slice `len` bytes long starting `pos` bytes after element `index`'s header.
    fn element_slice(&self, index: usize, pos: u32, len: u32) -> Result<&'db [u8], BoltError> {
        let start = self
            .element_offset(index)
            .checked_add(pos as usize)
            .ok_or_else(|| self.out_of_bounds(index))?;
        let end = start
            .checked_add(len as usize)
            .ok_or_else(|| self.out_of_bounds(index))?;
        self.bytes
            .get(start..end)
            .ok_or_else(|| self.out_of_bounds(index))
    }

    fn key(&self, index: usize) -> Result<&'db [u8], BoltError> {
        let offset = self.element_offset(index);
        // Branch: pos at 0, ksize at 4. Leaf: pos at 4, ksize at 8.
        let (pos, ksize) = if self.is_branch {
            (
                read_u32(self.bytes, offset),
                read_u32(self.bytes, offset + 4),
            )
        } else {
            (
                read_u32(self.bytes, offset + 4),
                read_u32(self.bytes, offset + 8),
            )
        };
        self.element_slice(index, pos, ksize)
    }

    /// Index of the first element whose key is >= `key`, and whether it is equal.
    fn search(&self, key: &[u8]) -> Result<(usize, bool), BoltError> {
        let (mut low, mut high) = (0, self.count);
        while low < high {
            let middle = low + (high - low) / 2;
            if self.key(middle)? < key {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        let exact = low < self.count && self.key(low)? == key;
        Ok((low, exact))
    }

    fn branch_child(&self, index: usize) -> Result<u64, BoltError> {
        if index >= self.count {
            return Err(self.out_of_bounds(index));
        }
        // Validate the key too, so a corrupt element is reported here, not skipped.
        self.key(index)?;
        Ok(read_u64(self.bytes, self.element_offset(index) + 8))
    }

    fn leaf_entry(
        &self,
        index: usize,
        db: &'db BoltDb,
    ) -> Result<(&'db [u8], Value<'db>), BoltError> {
        if index >= self.count {
            return Err(self.out_of_bounds(index));
        }
        let offset = self.element_offset(index);
        let flags = read_u32(self.bytes, offset);
        let pos = read_u32(self.bytes, offset + 4);
        let ksize = read_u32(self.bytes, offset + 8);
        let vsize = read_u32(self.bytes, offset + 12);
        let key_and_value = self.element_slice(
            index,
            pos,
            ksize
                .checked_add(vsize)
                .ok_or_else(|| self.out_of_bounds(index))?,
        )?;
        let (key, value) = key_and_value.split_at(ksize as usize);
        if flags & LEAF_FLAG_BUCKET == 0 {
            return Ok((key, Value::Data(value)));
        }
        let bad_bucket = || BoltError::BadBucketValue {
            location: self.location,
            index,
            len: value.len(),
        };
        if value.len() < BUCKET_HEADER_SIZE {
            return Err(bad_bucket());
        }
        let root_pgid = read_u64(value, 0);
        let root = if root_pgid == 0 {
            let inline = &value[BUCKET_HEADER_SIZE..];
            if inline.len() < PAGE_HEADER_SIZE {
                return Err(bad_bucket());
            }
            BucketRoot::Inline(inline)
        } else {
            BucketRoot::Page(root_pgid)
        };
        Ok((key, Value::Bucket(Bucket { db, root })))
    }
}

/// Parses and validates the meta page at byte `offset`. With `expected_page_size`,
/// the meta must record that page size (it is where we looked for it).
fn parse_meta(
    data: &[u8],
    offset: usize,
    expected_page_size: Option<usize>,
) -> Result<Meta, MetaProblem> {
    let meta = offset
        .checked_add(PAGE_HEADER_SIZE)
        .and_then(|start| data.get(start..start.checked_add(META_SIZE)?))
        .ok_or(MetaProblem::Truncated)?;
    let magic = read_u32(meta, 0);
    if magic != MAGIC {
        return Err(MetaProblem::BadMagic(magic));
    }
    let version = read_u32(meta, 4);
    if version != SUPPORTED_VERSION {
        return Err(MetaProblem::BadVersion(version));
    }
    let stored = read_u64(meta, META_CHECKSUMMED_LEN);
    let computed = fnv1a64(&meta[..META_CHECKSUMMED_LEN]);
    if stored != computed {
        return Err(MetaProblem::BadChecksum { stored, computed });
    }
    let page_size = read_u32(meta, 8);
    let plausible =
        page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size);
    if !plausible || expected_page_size.is_some_and(|expected| expected != page_size as usize) {
        return Err(MetaProblem::BadPageSize(page_size));
    }
    Ok(Meta {
        page_size,
        root_pgid: read_u64(meta, 16),
        high_water: read_u64(meta, 40),
        txid: read_u64(meta, 48),
    })
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// Callers guarantee `offset + 2 <= bytes.len()`.
fn read_u16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

/// Callers guarantee `offset + 4 <= bytes.len()`.
fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(word)
}

/// Callers guarantee `offset + 8 <= bytes.len()`.
fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

fn display_path(path: &[&[u8]]) -> String {
    path.iter()
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Also used by other modules' tests to build bolt files.
#[cfg(test)]
pub(crate) mod tests;
