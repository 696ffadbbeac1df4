//! Opens arbitrary bytes as a one-shard sealed and signed archive with the recipient's
//! key and the signer trusted: the records after the index (Keys, Signature), the key
//! unwrapping and the opening of the index and chunks take hostile input. Seeds are real
//! archives sealed to and signed by `FUZZ_SECRET_KEY`; any mutation of sealed bytes must
//! fail authentication, and nothing may panic, hang or allocate without bound.
#![no_main]

use std::sync::OnceLock;

use ckstream_format::crypto::{check_signature, signer_id, ArchiveKey};
use ckstream_format::{ArchiveReader, Keyring, SecretKey, ShardSource};
use libfuzzer_sys::fuzz_target;

fn keyring() -> &'static Keyring {
    static KEYS: OnceLock<Keyring> = OnceLock::new();
    KEYS.get_or_init(|| {
        let key = SecretKey::from_text(ckstream_fuzz::FUZZ_SECRET_KEY, "fuzz key").unwrap();
        Keyring {
            trusted: vec![key.public()],
            secrets: vec![key],
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let keys = keyring();
    // The record payloads on their own.
    let _ = ArchiveKey::open([7; 16], data, &keys.secrets);
    let _ = signer_id(data);
    let _ = check_signature(data, &[7; 16], 1, &[0; 32], &keys.trusted);
    let bytes = data.to_vec();
    let Ok(reader) = ArchiveReader::open_keyed(
        Box::new(bytes.clone()),
        |_, _| Ok(Box::new(bytes.clone()) as Box<dyn ShardSource>),
        keys,
    ) else {
        return;
    };
    if ckstream_fuzz::decoded_bytes(&reader) > 16 << 20 {
        return;
    }
    for (i, e) in reader.entries().iter().enumerate() {
        if e.size <= 1 << 20 {
            let _ = reader.copy_entry(i, &mut std::io::sink());
        }
    }
    let _ = reader.verify(1, &Default::default());
});
