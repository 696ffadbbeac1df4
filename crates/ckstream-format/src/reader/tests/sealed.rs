//! Sealed (encrypted) and signed archives, written and read in memory: they read back
//! whole, hold no plaintext, open only with a recipient's key, and refuse every change
//! an attacker without the keys can make.

use prost::Message;

use super::{noise, options, sample_files, write_sample};
use crate::codec::Compression;
use crate::crypto::{Keyring, SecretKey, SignatureStatus, WriteKeys};
use crate::error::Error;
use crate::index::Index;
use crate::layout::{
    Footer, IndexLocation, RecordHeader, RecordKind, FOOTER_LEN, RECORD_HEADER_LEN,
};
use crate::reader::{ArchiveReader, ShardSource};
use crate::writer::WriterOptions;

fn keyring(secrets: &[&SecretKey], trusted: &[&SecretKey]) -> Keyring {
    Keyring {
        secrets: secrets.iter().map(|k| (*k).clone()).collect(),
        trusted: trusted.iter().map(|k| k.public()).collect(),
    }
}

fn open(shards: &[Vec<u8>], keys: &Keyring) -> crate::Result<ArchiveReader> {
    ArchiveReader::open_keyed(
        Box::new(shards[0].clone()),
        |_, i| Ok(Box::new(shards[i as usize].clone()) as Box<dyn ShardSource>),
        keys,
    )
}

fn open_err(shards: &[Vec<u8>], keys: &Keyring) -> Error {
    match open(shards, keys) {
        Ok(_) => panic!("opened"),
        Err(e) => e,
    }
}

struct Keys {
    alice: SecretKey,
    bob: SecretKey,
    mallory: SecretKey,
}

fn keys() -> Keys {
    Keys {
        alice: SecretKey::generate().unwrap(),
        bob: SecretKey::generate().unwrap(),
        mallory: SecretKey::generate().unwrap(),
    }
}

fn sealed_options(k: &Keys, compression: Compression, sign: bool) -> WriterOptions {
    WriterOptions {
        keys: WriteKeys {
            seal_to: vec![k.alice.public(), k.bob.public()],
            sign_with: sign.then(|| k.alice.clone()),
        },
        ..options(compression)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn sealed_archives_read_back_whole_for_every_recipient_and_hold_no_plaintext() {
    let k = keys();
    for compression in [Compression::NONE, Compression::LZ4, Compression::zstd(3)] {
        for shards in [1, 3] {
            let case = format!("{:?}, {shards} shards", compression.codec);
            let bytes = write_sample(sealed_options(&k, compression, true), shards, [3; 16]);
            for shard in &bytes {
                assert!(!contains(shard, &noise(1, 200_000)[5000..5064]), "{case}");
                assert!(!contains(shard, b"small file 1 small"), "{case}");
                assert!(!contains(shard, b"d/random"), "{case}: a path in clear");
            }
            for reader_key in [&k.alice, &k.bob] {
                let r = open(&bytes, &keyring(&[reader_key], &[&k.alice])).unwrap();
                assert!(r.is_sealed(), "{case}");
                assert_eq!(r.signature(), &SignatureStatus::Verified(k.alice.public()));
                assert!(r.raw_file(0).is_none());
                for (path, content) in sample_files() {
                    let i = r.find(path.as_bytes()).expect(&path);
                    let mut out = Vec::new();
                    r.copy_entry(i, &mut out).unwrap();
                    assert!(out == content, "{case}: {path} read back differently");
                    for c in r.chunks_of(i) {
                        let data = r.read_chunk(&r.entries()[i], c).unwrap();
                        assert!(data == content[c.file_offset as usize..c.file_end() as usize]);
                    }
                }
                let report = r.verify(2, &Default::default()).unwrap();
                assert!(report.chunks > 0, "{case}");
            }
        }
    }
}

#[test]
fn a_sealed_archive_needs_a_recipients_key() {
    let k = keys();
    let bytes = write_sample(sealed_options(&k, Compression::zstd(3), false), 2, [4; 16]);
    let err = open_err(&bytes, &Keyring::default());
    assert!(
        matches!(&err, Error::Usage(m) if m.contains("encrypted")),
        "{err}"
    );
    let err = open_err(&bytes, &keyring(&[&k.mallory], &[]));
    assert!(
        matches!(&err, Error::Usage(m) if m.contains("none of the given keys")),
        "{err}"
    );
    // Mallory among other keys does not stand in the way of Bob's.
    let r = open(&bytes, &keyring(&[&k.mallory, &k.bob], &[])).unwrap();
    assert_eq!(r.signature(), &SignatureStatus::Unsigned);
}

#[test]
fn trusted_keys_require_a_signature_by_one_of_them() {
    let k = keys();
    let signed = write_sample(
        WriterOptions {
            keys: WriteKeys {
                sign_with: Some(k.alice.clone()),
                ..Default::default()
            },
            ..options(Compression::LZ4)
        },
        2,
        [5; 16],
    );
    let unsigned = write_sample(options(Compression::LZ4), 2, [5; 16]);
    // Without trusted keys, a signature is reported, not checked.
    let r = open(&signed, &Keyring::default()).unwrap();
    assert_eq!(
        r.signature(),
        &SignatureStatus::NotChecked(k.alice.public().id())
    );
    assert!(!r.is_sealed());
    assert!(r.raw_file(0).is_none(), "memory shards are no files");
    r.verify(2, &Default::default()).unwrap();
    let r = open(&signed, &keyring(&[], &[&k.mallory, &k.alice])).unwrap();
    assert_eq!(r.signature(), &SignatureStatus::Verified(k.alice.public()));
    let err = open_err(&signed, &keyring(&[], &[&k.mallory]));
    assert!(
        matches!(&err, Error::Untrusted(m) if m.contains("not among the trusted")),
        "{err}"
    );
    let err = open_err(&unsigned, &keyring(&[], &[&k.alice]));
    assert!(
        matches!(&err, Error::Untrusted(m) if m.contains("not signed")),
        "{err}"
    );
}

/// Shard 0 with its index replaced by `change(index)`, recompressed, and the records
/// after the index (Keys, Signature) and the footer rewritten to match: what someone
/// who can write the archive but holds no key can do.
fn rewrite_index(shard0: &[u8], change: impl FnOnce(&mut Index)) -> Vec<u8> {
    let footer = Footer::decode(
        &shard0[shard0.len() - FOOTER_LEN..],
        shard0.len() as u64,
        "s0",
    )
    .unwrap();
    let loc = footer.index.unwrap();
    let index_start = loc.offset as usize;
    let index_end = index_start + loc.stored_len as usize;
    let trailer = &shard0[index_end..footer.data_end as usize];
    let old_header =
        RecordHeader::decode(&shard0[index_start - RECORD_HEADER_LEN..index_start], "i").unwrap();
    let raw =
        zstd::bulk::decompress(&shard0[index_start..index_end], loc.raw_len as usize).unwrap();
    let mut index = Index::decode(raw.as_slice()).unwrap();
    change(&mut index);
    let raw = index.encode_to_vec();
    let stored = zstd::bulk::compress(&raw, 3).unwrap();
    let header = RecordHeader {
        raw_len: raw.len() as u32,
        stored_len: stored.len() as u32,
        digest: *blake3::hash(&raw).as_bytes(),
        ..old_header
    };
    let mut out = shard0[..index_start - RECORD_HEADER_LEN].to_vec();
    out.extend_from_slice(&header.encode());
    let offset = out.len() as u64;
    out.extend_from_slice(&stored);
    out.extend_from_slice(trailer);
    let footer = Footer {
        index: Some(IndexLocation {
            offset,
            stored_len: stored.len() as u64,
            raw_len: raw.len() as u64,
        }),
        index_digest: *blake3::hash(&raw).as_bytes(),
        data_end: out.len() as u64,
        ..footer
    };
    out.extend_from_slice(&footer.encode());
    out
}

#[test]
fn a_signed_archive_changed_after_signing_is_refused() {
    let k = keys();
    let mut bytes = write_sample(
        WriterOptions {
            keys: WriteKeys {
                sign_with: Some(k.alice.clone()),
                ..Default::default()
            },
            ..options(Compression::zstd(3))
        },
        1,
        [6; 16],
    );
    // A consistent archive: a setuid bit added and the footer rewritten. Only the
    // signature can tell.
    bytes[0] = rewrite_index(&bytes[0], |index| index.entries[1].mode |= 0o4000);
    let r = open(&bytes, &Keyring::default()).unwrap();
    assert_eq!(r.entries()[1].mode & 0o4000, 0o4000);
    let err = open_err(&bytes, &keyring(&[], &[&k.alice]));
    assert!(
        matches!(&err, Error::Untrusted(m) if m.contains("does not verify")),
        "{err}"
    );
}

#[test]
fn changed_sealed_bytes_are_refused() {
    let k = keys();
    let bytes = write_sample(sealed_options(&k, Compression::NONE, true), 1, [7; 16]);
    let ring = keyring(&[&k.bob], &[&k.alice]);
    let r = open(&bytes, &ring).unwrap();
    let i = r.find(b"d/random").unwrap();
    let c = r.chunks_of(i)[1].clone();
    drop(r);

    // One bit of a chunk: its read and verify fail, other chunks still read.
    let mut flipped = bytes.clone();
    flipped[0][c.offset as usize + 100] ^= 1;
    let r = open(&flipped, &ring).unwrap();
    let err = r.read_chunk(&r.entries()[i], &c).unwrap_err();
    assert!(matches!(&err, Error::DigestMismatch { .. }), "{err}");
    assert!(r.verify(2, &Default::default()).is_err());
    let first = r.chunks_of(i)[0].clone();
    r.read_chunk(&r.entries()[i], &first).unwrap();

    // Two chunks of the same length swapped: each authenticates only in its own place.
    let other = r.chunks_of(i)[0].clone();
    assert_eq!(other.stored_len, c.stored_len);
    let mut swapped = bytes.clone();
    let (a, b) = (other.offset as usize, c.offset as usize);
    let len = c.stored_len as usize;
    let chunk_a = swapped[0][a..a + len].to_vec();
    let chunk_b = swapped[0][b..b + len].to_vec();
    swapped[0][a..a + len].copy_from_slice(&chunk_b);
    swapped[0][b..b + len].copy_from_slice(&chunk_a);
    let r = open(&swapped, &ring).unwrap();
    assert!(r.read_chunk(&r.entries()[i], &c).is_err());
    assert!(r.read_chunk(&r.entries()[i], &other).is_err());

    // One bit of the sealed index.
    let footer = Footer::decode(
        &bytes[0][bytes[0].len() - FOOTER_LEN..],
        bytes[0].len() as u64,
        "s0",
    )
    .unwrap();
    let mut index_flipped = bytes.clone();
    index_flipped[0][footer.index.unwrap().offset as usize + 3] ^= 1;
    let err = open_err(&index_flipped, &ring);
    assert!(matches!(&err, Error::DigestMismatch { .. }), "{err}");

    // The Keys record removed (and the footer fixed up): refused as corrupt.
    let loc = footer.index.unwrap();
    let end = (loc.offset + loc.stored_len) as usize;
    let keys_header = RecordHeader::decode(&bytes[0][end..end + RECORD_HEADER_LEN], "k").unwrap();
    assert_eq!(keys_header.kind, RecordKind::Keys);
    let keys_len = RECORD_HEADER_LEN + keys_header.stored_len as usize;
    let mut stripped = bytes[0][..end].to_vec();
    stripped.extend_from_slice(&bytes[0][end + keys_len..footer.data_end as usize]);
    let f = Footer {
        data_end: stripped.len() as u64,
        record_count: footer.record_count - 1,
        ..footer
    };
    stripped.extend_from_slice(&f.encode());
    let err = open_err(&[stripped], &ring);
    assert!(
        matches!(&err, Error::Corrupt(m) if m.contains("no Keys record")),
        "{err}"
    );
}

/// Each part of a signed archive an attacker could change — a chunk, the index (with the
/// footer made consistent), the footer alone, the signature, a shard swapped in from
/// another archive signed by the same key — and the archive no longer reads as trusted.
#[test]
fn every_part_of_a_signed_archive_is_covered() {
    let k = keys();
    let signed = |id: u8| {
        write_sample(
            WriterOptions {
                keys: WriteKeys {
                    sign_with: Some(k.alice.clone()),
                    ..Default::default()
                },
                ..options(Compression::zstd(3))
            },
            3,
            [id; 16],
        )
    };
    let (a, b) = (signed(10), signed(11));
    let trusted = keyring(&[], &[&k.alice]);
    let r = open(&a, &trusted).unwrap();
    let (ei, c) = (0..r.entries().len())
        .flat_map(|i| r.chunks_of(i).iter().map(move |c| (i, c.clone())))
        .find(|(_, c)| c.shard == 0)
        .unwrap();
    drop(r);

    // A chunk: its digest is in the signed index.
    let mut chunk = a.clone();
    chunk[0][c.offset as usize + 1] ^= 1;
    let r = open(&chunk, &trusted).unwrap();
    let err = r.read_chunk(&r.entries()[ei], &c).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(r.verify(2, &Default::default()).is_err());

    // The index, rewritten with a consistent footer: the signature no longer verifies.
    let mut index = a.clone();
    index[0] = rewrite_index(&a[0], |i| i.entries[0].uid = 4242);
    let err = open_err(&index, &trusted);
    assert!(
        matches!(&err, Error::Untrusted(m) if m.contains("does not verify")),
        "{err}"
    );

    // The footer alone, with a valid check value: it no longer matches the index.
    let len = a[0].len();
    let mut footer = Footer::decode(&a[0][len - FOOTER_LEN..], len as u64, "s0").unwrap();
    footer.index_digest[0] ^= 1;
    let mut bad_footer = a.clone();
    bad_footer[0][len - FOOTER_LEN..].copy_from_slice(&footer.encode());
    assert!(open(&bad_footer, &trusted).is_err());

    // The Signature record's payload (its header's digest no longer matches).
    let mut sig = a.clone();
    let at = footer.data_end as usize - 10;
    sig[0][at] ^= 1;
    assert!(open(&sig, &trusted).is_err());

    // Shard 1 of another archive signed by the same key.
    let mut swapped = a.clone();
    swapped[1] = b[1].clone();
    let err = open_err(&swapped, &trusted);
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
}
