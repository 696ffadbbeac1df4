//! Tests of the bolt reader against files built here page by page, so branch
//! pages, overflow pages, inline buckets and corrupt variants can be laid out
//! exactly. The real podman database is exercised in `tests/boltdb_fixture.rs`.

use super::*;
use std::collections::BTreeMap;

/// What a leaf element holds.
pub(crate) enum Item {
    Data(Vec<u8>),
    /// A bucket header pointing at a page.
    BucketAt(u64),
    /// An inline bucket with these plain entries.
    InlineBucket(Vec<(Vec<u8>, Vec<u8>)>),
}

/// Builds a bolt file from explicitly placed pages.
pub(crate) struct FileBuilder {
    page_size: usize,
    /// First page of each placed page run, with its bytes (a page-size multiple).
    pages: BTreeMap<u64, Vec<u8>>,
}

impl FileBuilder {
    pub(crate) fn new(page_size: usize) -> Self {
        Self {
            page_size,
            pages: BTreeMap::new(),
        }
    }

    /// Lays out a page: header, element headers, then the packed keys/values.
    /// `elements` are (flags word, key, value) for leaves and (child, key) for branches.
    fn page_bytes(
        pgid: u64,
        flags: u16,
        elements: &[(u64, Vec<u8>, Vec<u8>)],
        leaf: bool,
    ) -> Vec<u8> {
        let mut bytes = vec![0u8; PAGE_HEADER_SIZE + elements.len() * ELEMENT_SIZE];
        bytes[0..8].copy_from_slice(&pgid.to_le_bytes());
        bytes[8..10].copy_from_slice(&flags.to_le_bytes());
        bytes[10..12].copy_from_slice(&(elements.len() as u16).to_le_bytes());
        for (index, (word, key, value)) in elements.iter().enumerate() {
            let element = PAGE_HEADER_SIZE + index * ELEMENT_SIZE;
            let pos = (bytes.len() - element) as u32;
            if leaf {
                bytes[element..element + 4].copy_from_slice(&(*word as u32).to_le_bytes());
                bytes[element + 4..element + 8].copy_from_slice(&pos.to_le_bytes());
                bytes[element + 8..element + 12].copy_from_slice(&(key.len() as u32).to_le_bytes());
                bytes[element + 12..element + 16]
                    .copy_from_slice(&(value.len() as u32).to_le_bytes());
            } else {
                bytes[element..element + 4].copy_from_slice(&pos.to_le_bytes());
                bytes[element + 4..element + 8].copy_from_slice(&(key.len() as u32).to_le_bytes());
                bytes[element + 8..element + 16].copy_from_slice(&word.to_le_bytes());
            }
            bytes.extend_from_slice(key);
            bytes.extend_from_slice(value);
        }
        bytes
    }

    fn leaf_elements(items: Vec<(&[u8], Item)>) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
        items
            .into_iter()
            .map(|(key, item)| match item {
                Item::Data(value) => (0, key.to_vec(), value),
                Item::BucketAt(pgid) => (1, key.to_vec(), bucket_header(pgid)),
                Item::InlineBucket(entries) => {
                    let elements = entries
                        .into_iter()
                        .map(|(key, value)| (0, key, value))
                        .collect::<Vec<_>>();
                    let mut value = bucket_header(0);
                    value.extend(Self::page_bytes(0, PAGE_FLAG_LEAF, &elements, true));
                    (1, key.to_vec(), value)
                }
            })
            .collect()
    }

    /// Places a page at `pgid`, padding to whole pages and setting the overflow count.
    fn place(&mut self, pgid: u64, mut bytes: Vec<u8>) -> &mut Self {
        let pages = bytes.len().div_ceil(self.page_size).max(1);
        bytes[12..16].copy_from_slice(&((pages - 1) as u32).to_le_bytes());
        bytes.resize(pages * self.page_size, 0);
        self.pages.insert(pgid, bytes);
        self
    }

    pub(crate) fn leaf(&mut self, pgid: u64, items: Vec<(&[u8], Item)>) -> &mut Self {
        let bytes = Self::page_bytes(pgid, PAGE_FLAG_LEAF, &Self::leaf_elements(items), true);
        self.place(pgid, bytes)
    }

    fn branch(&mut self, pgid: u64, children: Vec<(&[u8], u64)>) -> &mut Self {
        let elements = children
            .into_iter()
            .map(|(key, child)| (child, key.to_vec(), Vec::new()))
            .collect::<Vec<_>>();
        let bytes = Self::page_bytes(pgid, PAGE_FLAG_BRANCH, &elements, false);
        self.place(pgid, bytes)
    }

    fn meta(&mut self, pgid: u64, root: u64, high_water: u64, txid: u64) -> &mut Self {
        let bytes = meta_page(pgid, self.page_size as u32, root, high_water, txid);
        self.place(pgid, bytes)
    }

    /// Assembles the file, with both metas at `txid` 1 and 2 unless placed already.
    pub(crate) fn build(&mut self, root: u64) -> Vec<u8> {
        let high_water = self.high_water();
        if !self.pages.contains_key(&0) {
            self.meta(0, root, high_water, 1);
        }
        if !self.pages.contains_key(&1) {
            self.meta(1, root, high_water, 2);
        }
        let mut file = vec![0u8; high_water as usize * self.page_size];
        for (pgid, bytes) in &self.pages {
            let start = *pgid as usize * self.page_size;
            file[start..start + bytes.len()].copy_from_slice(bytes);
        }
        file
    }

    fn high_water(&self) -> u64 {
        self.pages
            .iter()
            .map(|(pgid, bytes)| pgid + (bytes.len() / self.page_size) as u64)
            .max()
            .unwrap_or(0)
            .max(2)
    }
}

fn bucket_header(root: u64) -> Vec<u8> {
    let mut header = root.to_le_bytes().to_vec();
    header.extend_from_slice(&0u64.to_le_bytes());
    header
}

fn meta_page(pgid: u64, page_size: u32, root: u64, high_water: u64, txid: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_HEADER_SIZE + META_SIZE];
    page[0..8].copy_from_slice(&pgid.to_le_bytes());
    page[8..10].copy_from_slice(&0x04u16.to_le_bytes());
    let meta = &mut page[PAGE_HEADER_SIZE..];
    meta[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    meta[4..8].copy_from_slice(&SUPPORTED_VERSION.to_le_bytes());
    meta[8..12].copy_from_slice(&page_size.to_le_bytes());
    meta[16..24].copy_from_slice(&root.to_le_bytes());
    // The freelist page is never read; any id will do.
    meta[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    meta[40..48].copy_from_slice(&high_water.to_le_bytes());
    meta[48..56].copy_from_slice(&txid.to_le_bytes());
    let checksum = fnv1a64(&meta[..META_CHECKSUMMED_LEN]);
    meta[56..64].copy_from_slice(&checksum.to_le_bytes());
    page
}

fn data(value: &str) -> Item {
    Item::Data(value.as_bytes().to_vec())
}

/// A small database:
/// - root (page 2): `big` → page 3, `inline` (inline bucket), `plain` = "value", `tree` → page 6
/// - `big` (page 3): `huge` = 10 000 bytes spanning overflow pages 4 and 5, `small` = "s"
/// - `tree` (page 6): branch over leaves 7, 8, 9 holding keys k00..k29,
///   and k15 is a nested bucket at page 10 holding `deep` = "bottom"
fn sample_file() -> Vec<u8> {
    let mut builder = FileBuilder::new(4096);
    builder.leaf(
        2,
        vec![
            (b"big", Item::BucketAt(3)),
            (
                b"inline",
                Item::InlineBucket(vec![
                    (b"a".to_vec(), b"1".to_vec()),
                    (b"b".to_vec(), b"2".to_vec()),
                ]),
            ),
            (b"plain", data("value")),
            (b"tree", Item::BucketAt(6)),
        ],
    );
    builder.leaf(
        3,
        vec![(b"huge", Item::Data(huge_value())), (b"small", data("s"))],
    );
    builder.branch(6, vec![(b"k00", 7), (b"k10", 8), (b"k20", 9)]);
    for (leaf, first) in [(7, 0), (8, 10), (9, 20)] {
        let keys: Vec<String> = (first..first + 10).map(|n| format!("k{n:02}")).collect();
        let items = keys
            .iter()
            .map(|key| {
                let item = if key == "k15" {
                    Item::BucketAt(10)
                } else {
                    Item::Data(format!("v-{key}").into_bytes())
                };
                (key.as_bytes(), item)
            })
            .collect();
        builder.leaf(leaf, items);
    }
    builder.leaf(10, vec![(b"deep", data("bottom"))]);
    builder.build(2)
}

fn huge_value() -> Vec<u8> {
    (0..10_000u32).map(|n| (n % 251) as u8).collect()
}

#[test]
fn reads_values_buckets_inline_buckets_and_overflow_pages() {
    let db = BoltDb::from_bytes(sample_file()).unwrap();
    assert_eq!(db.page_size(), 4096);
    assert_eq!(db.txid(), 2);
    let root = db.root();
    assert_eq!(root.get(b"plain").unwrap(), Some(&b"value"[..]));
    assert_eq!(root.get(b"missing").unwrap(), None);
    // A bucket is not a plain value, and a plain value is not a bucket.
    assert_eq!(root.get(b"big").unwrap(), None);
    assert!(root.bucket(b"plain").unwrap().is_none());

    let big = db.bucket(&[b"big"]).unwrap();
    assert_eq!(big.get(b"huge").unwrap(), Some(&huge_value()[..]));
    assert_eq!(big.get(b"small").unwrap(), Some(&b"s"[..]));

    let inline = db.bucket(&[b"inline"]).unwrap();
    assert_eq!(inline.get(b"a").unwrap(), Some(&b"1"[..]));
    assert_eq!(inline.get(b"b").unwrap(), Some(&b"2"[..]));
    assert_eq!(inline.get(b"c").unwrap(), None);
    assert_eq!(inline.keys().unwrap(), vec![&b"a"[..], b"b"]);

    assert_eq!(
        root.keys().unwrap(),
        vec![&b"big"[..], b"inline", b"plain", b"tree"]
    );
}

#[test]
fn descends_branch_pages_for_lookups_and_iteration() {
    let db = BoltDb::from_bytes(sample_file()).unwrap();
    let tree = db.bucket(&[b"tree"]).unwrap();
    for n in 0..30 {
        let key = format!("k{n:02}");
        let expected = if n == 15 {
            None
        } else {
            Some(format!("v-{key}").into_bytes())
        };
        assert_eq!(
            tree.get(key.as_bytes()).unwrap(),
            expected.as_deref(),
            "{key}"
        );
    }
    // Keys before, between and after the stored ones.
    for missing in ["a", "k", "k0", "k095", "k19x", "k30", "zz"] {
        assert_eq!(tree.get(missing.as_bytes()).unwrap(), None, "{missing}");
    }
    let keys: Vec<String> = tree
        .keys()
        .unwrap()
        .into_iter()
        .map(|key| String::from_utf8(key.to_vec()).unwrap())
        .collect();
    let expected: Vec<String> = (0..30).map(|n| format!("k{n:02}")).collect();
    assert_eq!(keys, expected);

    let deep = db.bucket(&[b"tree", b"k15"]).unwrap();
    assert_eq!(deep.get(b"deep").unwrap(), Some(&b"bottom"[..]));
    let entries = tree.entries().unwrap();
    assert!(matches!(entries[15].1, Value::Bucket(_)));
    assert!(matches!(entries[14].1, Value::Data(b"v-k14")));
}

#[test]
fn missing_bucket_path_names_the_missing_part() {
    let db = BoltDb::from_bytes(sample_file()).unwrap();
    let error = db.bucket(&[b"tree", b"nope", b"x"]).unwrap_err();
    assert!(
        matches!(&error, BoltError::BucketNotFound { path } if path == "tree/nope"),
        "{error}"
    );
    // A plain value on the path is not a bucket either.
    assert!(matches!(
        db.bucket(&[b"plain"]),
        Err(BoltError::BucketNotFound { .. })
    ));
}

#[test]
fn uses_the_valid_meta_with_the_highest_txid() {
    // Meta 0 (txid 7) points at root page 2, meta 1 (txid 5) at root page 3.
    let mut builder = FileBuilder::new(4096);
    builder.leaf(2, vec![(b"which", data("newer"))]);
    builder.leaf(3, vec![(b"which", data("older"))]);
    builder.meta(0, 2, 4, 7).meta(1, 3, 4, 5);
    let file = builder.build(2);
    let db = BoltDb::from_bytes(file.clone()).unwrap();
    assert_eq!(db.txid(), 7);
    assert_eq!(db.root().get(b"which").unwrap(), Some(&b"newer"[..]));

    // Corrupt the newer meta's checksum: the older one is used instead.
    let mut corrupt = file.clone();
    corrupt[PAGE_HEADER_SIZE + META_CHECKSUMMED_LEN] ^= 1;
    let db = BoltDb::from_bytes(corrupt).unwrap();
    assert_eq!(db.txid(), 5);
    assert_eq!(db.root().get(b"which").unwrap(), Some(&b"older"[..]));

    // Corrupt meta 0's magic: meta 1 is still found at the default page size.
    let mut corrupt = file;
    corrupt[PAGE_HEADER_SIZE] ^= 0xff;
    let db = BoltDb::from_bytes(corrupt).unwrap();
    assert_eq!(db.root().get(b"which").unwrap(), Some(&b"older"[..]));
}

#[test]
fn rejects_files_without_a_valid_meta() {
    let file = sample_file();
    let mut both_bad_checksums = file.clone();
    both_bad_checksums[PAGE_HEADER_SIZE + 48] ^= 1;
    both_bad_checksums[4096 + PAGE_HEADER_SIZE + 48] ^= 1;
    match BoltDb::from_bytes(both_bad_checksums) {
        Err(BoltError::NoValidMeta {
            meta0: MetaProblem::BadChecksum { .. },
            meta1: MetaProblem::BadChecksum { .. },
        }) => {}
        other => panic!("unexpected {other:?}"),
    }

    let mut bad_version = FileBuilder::new(4096);
    bad_version.leaf(2, vec![]);
    let mut bad_version = bad_version.build(2);
    for meta in [0, 4096] {
        bad_version[meta + PAGE_HEADER_SIZE + 4] = 3;
    }
    assert!(matches!(
        BoltDb::from_bytes(bad_version),
        Err(BoltError::NoValidMeta {
            meta0: MetaProblem::BadVersion(3),
            ..
        })
    ));

    assert!(matches!(
        BoltDb::from_bytes(Vec::new()),
        Err(BoltError::NoValidMeta {
            meta0: MetaProblem::Truncated,
            meta1: MetaProblem::Truncated
        })
    ));
    assert!(matches!(
        BoltDb::from_bytes(vec![0xff; 20_000]),
        Err(BoltError::NoValidMeta { .. })
    ));
}

#[test]
fn rejects_truncated_files() {
    let file = sample_file();
    for len in [file.len() - 1, file.len() - 4096, 3 * 4096, 4096 + 100] {
        let error = BoltDb::from_bytes(file[..len].to_vec()).unwrap_err();
        assert!(
            matches!(error, BoltError::Truncated { .. }),
            "{len}: {error}"
        );
    }
}

#[test]
fn detects_page_cycles() {
    // Branch page 3's second child is page 3 itself.
    let mut builder = FileBuilder::new(1024);
    builder.leaf(2, vec![(b"loop", Item::BucketAt(3))]);
    builder.branch(3, vec![(b"a", 4), (b"m", 3)]);
    builder.leaf(4, vec![(b"a", data("x"))]);
    let db = BoltDb::from_bytes(builder.build(2)).unwrap();
    let bucket = db.bucket(&[b"loop"]).unwrap();
    assert_eq!(bucket.get(b"a").unwrap(), Some(&b"x"[..]));
    assert!(matches!(
        bucket.get(b"z"),
        Err(BoltError::PageCycle { pgid: 3 })
    ));
    assert!(matches!(
        bucket.entries(),
        Err(BoltError::PageCycle { pgid: 3 })
    ));

    // Two branch pages pointing at each other.
    let mut builder = FileBuilder::new(1024);
    builder.leaf(2, vec![(b"loop", Item::BucketAt(3))]);
    builder.branch(3, vec![(b"a", 4)]);
    builder.branch(4, vec![(b"a", 3)]);
    let db = BoltDb::from_bytes(builder.build(2)).unwrap();
    let bucket = db.bucket(&[b"loop"]).unwrap();
    assert!(matches!(bucket.get(b"a"), Err(BoltError::PageCycle { .. })));
    assert!(matches!(bucket.entries(), Err(BoltError::PageCycle { .. })));
}

#[test]
fn rejects_bad_page_references() {
    let mut builder = FileBuilder::new(1024);
    builder.leaf(
        2,
        vec![
            (b"beyond", Item::BucketAt(99)),
            (b"meta", Item::BucketAt(1)),
            (b"wrong-id", Item::BucketAt(3)),
        ],
    );
    let mut page = FileBuilder::page_bytes(4, PAGE_FLAG_LEAF, &[], true);
    page.resize(1024, 0);
    builder.place(3, page);
    let db = BoltDb::from_bytes(builder.build(2)).unwrap();
    let root = db.root();
    let walk = |name: &[u8]| root.bucket(name).unwrap().unwrap().entries().unwrap_err();
    assert!(matches!(
        walk(b"beyond"),
        BoltError::PageBeyondHighWater { pgid: 99, .. }
    ));
    assert!(matches!(
        walk(b"meta"),
        BoltError::UnexpectedPageType { flags: 0x04, .. }
    ));
    assert!(matches!(
        walk(b"wrong-id"),
        BoltError::PageIdMismatch { pgid: 3, found: 4 }
    ));
}

#[test]
fn rejects_elements_outside_their_page() {
    let mut file = sample_file();
    // Leaf page 3 element 0 ("huge"): make its value size reach past the overflow pages.
    let element = 3 * 4096 + PAGE_HEADER_SIZE;
    file[element + 12..element + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    let db = BoltDb::from_bytes(file).unwrap();
    let big = db.bucket(&[b"big"]).unwrap();
    assert!(matches!(
        big.get(b"huge"),
        Err(BoltError::ElementOutOfBounds {
            location: PageLocation::Page(3),
            index: 0,
            ..
        })
    ));
    assert!(big.entries().is_err());

    // An element count larger than the page can hold.
    let mut file = sample_file();
    file[10 * 4096 + 10..10 * 4096 + 12].copy_from_slice(&u16::MAX.to_le_bytes());
    let db = BoltDb::from_bytes(file).unwrap();
    assert!(matches!(
        db.bucket(&[b"tree", b"k15"]).unwrap().get(b"deep"),
        Err(BoltError::ElementOutOfBounds { .. })
    ));
}

#[test]
fn rejects_bad_inline_buckets() {
    let mut builder = FileBuilder::new(1024);
    builder.leaf(2, vec![(b"short", Item::Data(vec![0; 8]))]);
    let mut file = builder.build(2);
    // Flag the 8-byte value as a bucket.
    file[2 * 1024 + PAGE_HEADER_SIZE] = 1;
    let db = BoltDb::from_bytes(file).unwrap();
    assert!(matches!(
        db.root().bucket(b"short"),
        Err(BoltError::BadBucketValue { len: 8, .. })
    ));
}

/// Flips bytes throughout a small file and truncates it everywhere: whatever
/// the damage, reading must fail cleanly or succeed, never panic or loop.
#[test]
fn survives_arbitrary_damage() {
    let mut builder = FileBuilder::new(512);
    builder.leaf(
        2,
        vec![
            (b"b", Item::BucketAt(3)),
            (
                b"i",
                Item::InlineBucket(vec![(b"x".to_vec(), b"y".to_vec())]),
            ),
            (b"v", Item::Data(vec![7; 700])),
        ],
    );
    builder.branch(3, vec![(b"a", 5), (b"n", 6)]);
    builder.leaf(5, vec![(b"a", data("1")), (b"m", Item::BucketAt(7))]);
    builder.leaf(6, vec![(b"n", data("2"))]);
    builder.leaf(7, vec![(b"deep", data("3"))]);
    let file = builder.build(2);

    fn walk(bucket: Bucket<'_>, depth: usize) {
        if depth > 8 {
            return;
        }
        let Ok(entries) = bucket.entries() else {
            return;
        };
        for (key, value) in entries {
            let _ = bucket.lookup(key);
            if let Value::Bucket(nested) = value {
                walk(nested, depth + 1);
            }
        }
    }
    let read = |bytes: Vec<u8>| {
        if let Ok(db) = BoltDb::from_bytes(bytes) {
            walk(db.root(), 0);
            let _ = db.bucket(&[b"b", b"m"]).and_then(|b| b.get(b"deep"));
        }
    };
    read(file.clone());
    for position in 0..file.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut damaged = file.clone();
            damaged[position] ^= flip;
            read(damaged);
        }
    }
    for len in 0..file.len() {
        read(file[..len].to_vec());
    }
}
