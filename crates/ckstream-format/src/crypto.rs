//! Signing and sealing archives (docs/FORMAT.md, "Signatures and encryption").
//!
//! A key is two key pairs: Ed25519 for signatures and X25519 for receiving archive keys.
//! **Sealing**: every archive gets a fresh random 256-bit data key; every record payload
//! (entries and chunks) and the index are sealed with AES-256-GCM under it, the nonce
//! being the record's sequence number (unique within the archive; the index uses
//! `u64::MAX`) and the associated data binding the archive id, that number and how the
//! payload decodes — so a payload moved to another position, shard or archive fails
//! authentication. The data key is wrapped for each recipient: X25519 between a fresh
//! ephemeral key and the recipient's key, a BLAKE3-derived key-encryption key, and
//! AES-256-GCM. **Signing**: an Ed25519 signature over the archive id, the shard count
//! and the BLAKE3 digest of the decoded index (which holds every chunk's digest and every
//! other shard's size) vouches for every byte of the archive.
//!
//! The primitives come from `aws-lc-rs` (AWS-LC, also behind rustls here). Secret bytes
//! never appear in `Debug` output or error messages.

use std::fmt;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey as SigPublicKey, ED25519};
use prost::Message;

use crate::error::{Error, Result};
use crate::layout::RecordKind;

/// Bytes an AEAD tag adds to every sealed payload.
pub const TAG_LEN: usize = 16;
/// The only cipher defined: AES-256-GCM.
pub const CIPHER_AES_256_GCM: u32 = 1;
/// Sequence number whose nonce seals the index (no record has it).
pub const INDEX_SEQ: u64 = u64::MAX;

const SECRET_HEADER: &str = "ckstream-secret-key v1";
const PUBLIC_HEADER: &str = "ckstream-public-key v1";
const WRAP_CONTEXT: &str = "ckstream 2026-12 recipient key wrap v1";
const SIGNATURE_CONTEXT: &[u8] = b"ckstream archive signature v1\0";

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| Error::Usage("the system's random number generator failed".into()))?;
    Ok(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex<const N: usize>(s: &str, what: &str) -> Result<[u8; N]> {
    let bad = || Error::Usage(format!("{what}: expected {} hex digits", N * 2));
    if s.len() != N * 2 {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Reads `name value` lines after a header line; `#` starts a comment.
fn key_lines<'a>(text: &'a str, header: &str, what: &str) -> Result<Vec<(&'a str, &'a str)>> {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    if lines.next() != Some(header) {
        return Err(Error::Usage(format!("{what}: not a `{header}` file")));
    }
    Ok(lines.filter_map(|l| l.split_once(' ')).collect())
}

fn field<'a>(lines: &[(&str, &'a str)], name: &str, what: &str) -> Result<&'a str> {
    lines
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .ok_or_else(|| Error::Usage(format!("{what}: no `{name}` line")))
}

/// A public key: what readers trust and writers encrypt to.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey {
    /// Ed25519 public key, for checking signatures.
    pub signing: [u8; 32],
    /// X25519 public key, for wrapping archive keys.
    pub encryption: [u8; 32],
}

impl PublicKey {
    /// A short id for messages: the first 8 bytes of BLAKE3 of the signing key, in hex
    /// (what `ckstream info` shows for a signed archive's signer).
    pub fn id(&self) -> String {
        signing_key_id(&self.signing)
    }

    /// The text of a `.pub` file.
    pub fn to_text(&self) -> String {
        format!(
            "{PUBLIC_HEADER}\n# key id {}\nsigning {}\nencryption {}\n",
            self.id(),
            hex(&self.signing),
            hex(&self.encryption)
        )
    }

    /// Parses a `.pub` file; `what` names it in errors.
    ///
    /// # Errors
    /// [`Error::Usage`] for anything but a public key file.
    pub fn from_text(text: &str, what: &str) -> Result<Self> {
        let lines = key_lines(text, PUBLIC_HEADER, what)?;
        Ok(PublicKey {
            signing: unhex(field(&lines, "signing", what)?, what)?,
            encryption: unhex(field(&lines, "encryption", what)?, what)?,
        })
    }

    /// The id of the encryption key alone, as recorded for each recipient of an archive.
    fn recipient_id(encryption: &[u8; 32]) -> [u8; 8] {
        blake3::hash(encryption).as_bytes()[..8]
            .try_into()
            .expect("8 bytes")
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

/// A secret key (both secrets and their public keys).
#[derive(Clone)]
pub struct SecretKey {
    signing_seed: [u8; 32],
    encryption_secret: [u8; 32],
    public: PublicKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public.id())
    }
}

impl SecretKey {
    /// A new random key.
    ///
    /// # Errors
    /// [`Error::Usage`] when the random number generator fails.
    pub fn generate() -> Result<Self> {
        Self::from_secrets(random()?, random()?)
    }

    fn from_secrets(signing_seed: [u8; 32], encryption_secret: [u8; 32]) -> Result<Self> {
        let bad = || Error::Usage("not a valid ckstream secret key".into());
        let pair = Ed25519KeyPair::from_seed_unchecked(&signing_seed).map_err(|_| bad())?;
        let signing: [u8; 32] = pair.public_key().as_ref().try_into().map_err(|_| bad())?;
        let private =
            PrivateKey::from_private_key(&X25519, &encryption_secret).map_err(|_| bad())?;
        let encryption: [u8; 32] = private
            .compute_public_key()
            .map_err(|_| bad())?
            .as_ref()
            .try_into()
            .map_err(|_| bad())?;
        Ok(SecretKey {
            signing_seed,
            encryption_secret,
            public: PublicKey {
                signing,
                encryption,
            },
        })
    }

    /// Its public key.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The text of a secret key file (keep it mode 0600).
    pub fn to_text(&self) -> String {
        format!(
            "{SECRET_HEADER}\n# key id {} — keep this file secret\nsigning-seed {}\nencryption-secret {}\n",
            self.public.id(),
            hex(&self.signing_seed),
            hex(&self.encryption_secret)
        )
    }

    /// Parses a secret key file; `what` names it in errors (never its content).
    ///
    /// # Errors
    /// [`Error::Usage`] for anything but a secret key file.
    pub fn from_text(text: &str, what: &str) -> Result<Self> {
        let lines = key_lines(text, SECRET_HEADER, what)?;
        Self::from_secrets(
            unhex(field(&lines, "signing-seed", what)?, what)?,
            unhex(field(&lines, "encryption-secret", what)?, what)?,
        )
    }

    /// Signs archive `archive_id` with `shard_count` shards whose decoded index has
    /// BLAKE3 `index_digest`: the payload of a Signature record.
    ///
    /// # Errors
    /// [`Error::Usage`] when the key cannot be loaded (not for a valid key).
    pub fn sign_archive(
        &self,
        archive_id: &[u8; 16],
        shard_count: u32,
        index_digest: &[u8; 32],
    ) -> Result<Vec<u8>> {
        let pair = Ed25519KeyPair::from_seed_unchecked(&self.signing_seed)
            .map_err(|_| Error::Usage("not a valid signing key".into()))?;
        let sig = pair.sign(&signed_message(archive_id, shard_count, index_digest));
        Ok(SignatureRecord {
            public_key: self.public.signing.to_vec(),
            signature: sig.as_ref().to_vec(),
        }
        .encode_to_vec())
    }

    /// The archive key of a sealed archive, if this key is one of its recipients.
    fn unwrap(&self, sealing: &Sealing, archive_id: &[u8; 16]) -> Option<[u8; 32]> {
        let id = PublicKey::recipient_id(&self.public.encryption);
        let r = sealing
            .recipients
            .iter()
            .find(|r| r.key_id.as_slice() == id)?;
        let private = PrivateKey::from_private_key(&X25519, &self.encryption_secret).ok()?;
        let eph = UnparsedPublicKey::new(&X25519, sealing.ephemeral_public.as_slice());
        let kek = agreement::agree(&private, eph, (), |shared| {
            Ok(wrap_key(
                shared,
                &sealing.ephemeral_public,
                &self.public.encryption,
                archive_id,
            ))
        })
        .ok()?;
        let mut wrapped = r.wrapped_key.clone();
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &kek).ok()?);
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(archive_id),
                &mut wrapped,
            )
            .ok()?;
        plain.try_into().ok()
    }
}

fn wrap_key(
    shared: &[u8],
    ephemeral: &[u8],
    recipient: &[u8; 32],
    archive_id: &[u8; 16],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(WRAP_CONTEXT);
    h.update(shared);
    h.update(ephemeral);
    h.update(recipient);
    h.update(archive_id);
    *h.finalize().as_bytes()
}

fn signed_message(archive_id: &[u8; 16], shard_count: u32, index_digest: &[u8; 32]) -> Vec<u8> {
    let mut m = SIGNATURE_CONTEXT.to_vec();
    m.extend_from_slice(archive_id);
    m.extend_from_slice(&shard_count.to_le_bytes());
    m.extend_from_slice(index_digest);
    m
}

/// The payload of a Keys record: how the archive key is wrapped for each recipient.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sealing {
    /// [`CIPHER_AES_256_GCM`].
    #[prost(uint32, tag = "1")]
    pub cipher: u32,
    /// The X25519 public key of the archive's ephemeral key.
    #[prost(bytes = "vec", tag = "2")]
    pub ephemeral_public: Vec<u8>,
    /// One wrapped archive key per recipient.
    #[prost(message, repeated, tag = "3")]
    pub recipients: Vec<Recipient>,
}

/// The archive key wrapped for one recipient.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Recipient {
    /// First 8 bytes of BLAKE3 of the recipient's X25519 public key.
    #[prost(bytes = "vec", tag = "1")]
    pub key_id: Vec<u8>,
    /// The archive key sealed with AES-256-GCM under the key-encryption key (48 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub wrapped_key: Vec<u8>,
}

/// The payload of a Signature record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignatureRecord {
    /// The signer's Ed25519 public key.
    #[prost(bytes = "vec", tag = "1")]
    pub public_key: Vec<u8>,
    /// Ed25519 signature of the signed message.
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
}

/// An archive's data key, ready to seal and open payloads.
pub struct ArchiveKey {
    key: LessSafeKey,
    archive_id: [u8; 16],
}

impl fmt::Debug for ArchiveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ArchiveKey(..)")
    }
}

/// What binds a sealed payload to its place: its sequence number and how it decodes.
fn aad(archive_id: &[u8; 16], seq: u64, kind: RecordKind, codec: u8, raw_len: u32) -> [u8; 38] {
    let mut a = [0u8; 38];
    a[..8].copy_from_slice(b"ckstrrec");
    a[8..24].copy_from_slice(archive_id);
    a[24..32].copy_from_slice(&seq.to_le_bytes());
    a[32] = kind as u8;
    a[33] = codec;
    a[34..38].copy_from_slice(&raw_len.to_le_bytes());
    a
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&seq.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

impl ArchiveKey {
    /// A fresh random key for archive `archive_id`, wrapped for every recipient: the key
    /// and the payload of the archive's Keys record.
    ///
    /// # Errors
    /// [`Error::Usage`] for no recipients or a recipient key that is not X25519.
    pub fn generate(archive_id: [u8; 16], recipients: &[PublicKey]) -> Result<(Self, Vec<u8>)> {
        if recipients.is_empty() {
            return Err(Error::Usage(
                "encryption needs at least one recipient".into(),
            ));
        }
        let dek: [u8; 32] = random()?;
        let eph_secret: [u8; 32] = random()?;
        let eph = PrivateKey::from_private_key(&X25519, &eph_secret)
            .map_err(|_| Error::Usage("cannot make an ephemeral X25519 key".into()))?;
        let eph_public = eph
            .compute_public_key()
            .map_err(|_| Error::Usage("cannot make an ephemeral X25519 key".into()))?
            .as_ref()
            .to_vec();
        let mut sealing = Sealing {
            cipher: CIPHER_AES_256_GCM,
            ephemeral_public: eph_public.clone(),
            recipients: Vec::new(),
        };
        for r in recipients {
            let peer = UnparsedPublicKey::new(&X25519, r.encryption);
            let kek = agreement::agree(&eph, peer, (), |shared| {
                Ok(wrap_key(shared, &eph_public, &r.encryption, &archive_id))
            })
            .map_err(|()| Error::Usage(format!("recipient {} is not a valid key", r.id())))?;
            let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &kek).expect("a 32-byte key"));
            let mut wrapped = dek.to_vec();
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(&archive_id),
                &mut wrapped,
            )
            .map_err(|_| Error::Usage("sealing the archive key failed".into()))?;
            sealing.recipients.push(Recipient {
                key_id: PublicKey::recipient_id(&r.encryption).to_vec(),
                wrapped_key: wrapped,
            });
        }
        Ok((Self::from_bytes(dek, archive_id), sealing.encode_to_vec()))
    }

    fn from_bytes(dek: [u8; 32], archive_id: [u8; 16]) -> Self {
        ArchiveKey {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &dek).expect("a 32-byte key")),
            archive_id,
        }
    }

    /// The archive key from a Keys record payload, with the first of `keys` that is one
    /// of its recipients.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a Keys record that does not decode or names another cipher;
    /// [`Error::Usage`] when no key is given or none of them is a recipient.
    pub fn open(archive_id: [u8; 16], keys_record: &[u8], keys: &[SecretKey]) -> Result<Self> {
        let sealing = Sealing::decode(keys_record)
            .map_err(|e| Error::Corrupt(format!("the Keys record does not decode: {e}")))?;
        if sealing.cipher != CIPHER_AES_256_GCM || sealing.ephemeral_public.len() != 32 {
            return Err(Error::Unsupported(format!(
                "the archive is sealed with unknown cipher {}",
                sealing.cipher
            )));
        }
        if keys.is_empty() {
            return Err(Error::Usage(
                "the archive is encrypted: give a key that can open it (--key KEYFILE or CKSTREAM_KEY)".into(),
            ));
        }
        keys.iter()
            .find_map(|k| k.unwrap(&sealing, &archive_id))
            .map(|dek| Self::from_bytes(dek, archive_id))
            .ok_or_else(|| {
                let ids: Vec<String> = sealing.recipients.iter().map(|r| hex(&r.key_id)).collect();
                Error::Usage(format!(
                    "none of the given keys can open this archive (it is encrypted to encryption keys {})",
                    ids.join(", ")
                ))
            })
    }

    /// Seals a payload in place (appending the tag).
    ///
    /// # Errors
    /// [`Error::Usage`] when the cipher fails (it does not for valid input).
    pub fn seal(
        &self,
        seq: u64,
        kind: RecordKind,
        codec: u8,
        raw_len: u32,
        payload: &mut Vec<u8>,
    ) -> Result<()> {
        self.key
            .seal_in_place_append_tag(
                nonce(seq),
                Aad::from(aad(&self.archive_id, seq, kind, codec, raw_len)),
                payload,
            )
            .map_err(|_| Error::Usage("sealing a payload failed".into()))
    }

    /// Opens a sealed payload in place (dropping the tag); `what` names it in errors.
    ///
    /// # Errors
    /// [`Error::DigestMismatch`] when authentication fails: the payload was changed, or
    /// moved from another place, shard or archive.
    pub fn open_payload(
        &self,
        seq: u64,
        kind: RecordKind,
        codec: u8,
        raw_len: u32,
        mut payload: Vec<u8>,
        what: impl FnOnce() -> String,
    ) -> Result<Vec<u8>> {
        let n = self
            .key
            .open_in_place(
                nonce(seq),
                Aad::from(aad(&self.archive_id, seq, kind, codec, raw_len)),
                &mut payload,
            )
            .map_err(|_| Error::DigestMismatch {
                what: format!("{} (authentication failed)", what()),
            })?
            .len();
        payload.truncate(n);
        Ok(payload)
    }
}

/// The id [`PublicKey::id`] gives the key pair with this signing key.
pub fn signing_key_id(signing: &[u8]) -> String {
    hex(&blake3::hash(signing).as_bytes()[..8])
}

/// The keys a writer seals and signs an archive with.
#[derive(Clone, Default, Debug)]
pub struct WriteKeys {
    /// Seal every payload and the index for these recipients (empty: not sealed).
    /// Sealed payloads are never reflinked.
    pub seal_to: Vec<PublicKey>,
    /// Sign the archive with this key.
    pub sign_with: Option<SecretKey>,
}

/// The keys a reader opens archives with.
#[derive(Clone, Default, Debug)]
pub struct Keyring {
    /// Keys that may open a sealed archive (the first recipient among them is used).
    pub secrets: Vec<SecretKey>,
    /// Signing keys to require: when not empty, an archive opens only if one of them
    /// signed it.
    pub trusted: Vec<PublicKey>,
}

/// What an opened archive's signature says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureStatus {
    /// No Signature record.
    Unsigned,
    /// Signed by the key with this id, but no trusted keys were given, so the
    /// signature was not checked.
    NotChecked(String),
    /// Signed by this trusted key, and the signature verified.
    Verified(PublicKey),
}

/// The id of the key that made a Signature record, without checking it.
///
/// # Errors
/// [`Error::Corrupt`] for a Signature record that does not decode.
pub fn signer_id(record: &[u8]) -> Result<String> {
    let sig = SignatureRecord::decode(record)
        .map_err(|e| Error::Corrupt(format!("the Signature record does not decode: {e}")))?;
    Ok(signing_key_id(&sig.public_key))
}

/// The key that signed an archive, once its signature was checked.
///
/// # Errors
/// [`Error::Corrupt`] for a Signature record that does not decode; [`Error::Untrusted`]
/// when the signature does not verify or its key is not among `trusted`.
pub fn check_signature(
    record: &[u8],
    archive_id: &[u8; 16],
    shard_count: u32,
    index_digest: &[u8; 32],
    trusted: &[PublicKey],
) -> Result<PublicKey> {
    let sig = SignatureRecord::decode(record)
        .map_err(|e| Error::Corrupt(format!("the Signature record does not decode: {e}")))?;
    let Some(key) = trusted
        .iter()
        .find(|k| k.signing.as_slice() == sig.public_key.as_slice())
    else {
        return Err(Error::Untrusted(format!(
            "it is signed by key {}, which is not among the trusted keys",
            signing_key_id(&sig.public_key)
        )));
    };
    SigPublicKey::new(&ED25519, &key.signing)
        .verify(&signed_message(archive_id, shard_count, index_digest), &sig.signature)
        .map_err(|_| {
            Error::Untrusted(format!(
                "its signature by key {} does not verify: the archive was changed after it was signed",
                key.id()
            ))
        })?;
    Ok(*key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_never_show_secrets() {
        let k = SecretKey::generate().unwrap();
        let text = k.to_text();
        let back = SecretKey::from_text(&text, "k").unwrap();
        assert_eq!(back.public(), k.public());
        let p = PublicKey::from_text(&k.public().to_text(), "p").unwrap();
        assert_eq!(p, k.public());
        assert!(!format!("{k:?}").contains(&hex(&k.signing_seed)));
        assert!(SecretKey::from_text(&k.public().to_text(), "p").is_err());
        assert!(PublicKey::from_text("nonsense", "x").is_err());
    }

    #[test]
    fn only_recipients_open_and_payloads_are_bound_to_their_place() {
        let (a, b, c) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let id = [7u8; 16];
        let (key, record) = ArchiveKey::generate(id, &[a.public(), b.public()]).unwrap();
        let mut sealed = b"memory pages".to_vec();
        key.seal(5, RecordKind::Data, 0, 12, &mut sealed).unwrap();
        assert_eq!(sealed.len(), 12 + TAG_LEN);
        for k in [&a, &b] {
            let opened = ArchiveKey::open(id, &record, std::slice::from_ref(k)).unwrap();
            let plain = opened
                .open_payload(5, RecordKind::Data, 0, 12, sealed.clone(), String::new)
                .unwrap();
            assert_eq!(plain, b"memory pages");
            // Another position, another decoding, another archive: refused.
            assert!(opened
                .open_payload(6, RecordKind::Data, 0, 12, sealed.clone(), String::new)
                .is_err());
            assert!(opened
                .open_payload(5, RecordKind::Entry, 0, 12, sealed.clone(), String::new)
                .is_err());
        }
        assert!(ArchiveKey::open(id, &record, std::slice::from_ref(&c)).is_err());
        assert!(ArchiveKey::open([8; 16], &record, std::slice::from_ref(&a)).is_err());
        assert!(ArchiveKey::open(id, &record, &[]).is_err());
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        let opened = ArchiveKey::open(id, &record, &[a]).unwrap();
        assert!(matches!(
            opened.open_payload(5, RecordKind::Data, 0, 12, flipped, String::new),
            Err(Error::DigestMismatch { .. })
        ));
    }

    #[test]
    fn signatures_verify_only_for_the_same_archive_and_a_trusted_key() {
        let k = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let (id, digest) = ([1u8; 16], [2u8; 32]);
        let rec = k.sign_archive(&id, 3, &digest).unwrap();
        assert_eq!(
            check_signature(&rec, &id, 3, &digest, &[other.public(), k.public()]).unwrap(),
            k.public()
        );
        assert!(check_signature(&rec, &id, 3, &digest, &[other.public()]).is_err());
        assert!(check_signature(&rec, &id, 4, &digest, &[k.public()]).is_err());
        assert!(check_signature(&rec, &[9; 16], 3, &digest, &[k.public()]).is_err());
        assert!(check_signature(&rec, &id, 3, &[3; 32], &[k.public()]).is_err());
    }
}
