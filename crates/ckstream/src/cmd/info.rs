//! `ckstream info`.

use std::collections::BTreeMap;

use anyhow::Result;
use ckstream_format::layout::FORMAT_VERSION;
use ckstream_format::SignatureStatus;

use crate::output::{escape_controls, hex, human_bytes, utc_time};

#[derive(Debug, clap::Args)]
pub struct Args {
    archive: ckstream_store::ArchiveLocation,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let reader = super::open(&args.archive)?;
    let index = reader.index();
    let header = reader.header();
    let summary = index.summary();
    let (kinds, logical, raw, stored) = (
        &summary.kinds,
        summary.logical_bytes,
        summary.raw_bytes,
        summary.stored_bytes,
    );
    let shard_sizes = reader.shard_sizes()?;
    let archive_bytes: u64 = shard_sizes.iter().sum();
    let ratio = if archive_bytes > 0 {
        logical as f64 / archive_bytes as f64
    } else {
        0.0
    };
    let index_bytes = reader.footer().index.map(|l| l.stored_len).unwrap_or(0);
    // Validated: every id names an entry.
    let hot_paths: Vec<String> = index
        .hot_list
        .iter()
        .map(|&id| index.entries[id as usize].path_lossy())
        .collect();
    let (signature, signer, signature_checked) = match reader.signature() {
        SignatureStatus::Unsigned => ("unsigned".to_string(), None, false),
        SignatureStatus::NotChecked(id) => (
            format!("signed by key {id} (not checked: no --trusted-key given)"),
            Some(id.clone()),
            false,
        ),
        SignatureStatus::Verified(k) => (
            format!("signed by trusted key {}, verified", k.id()),
            Some(k.id()),
            true,
        ),
    };
    let encryption = if reader.is_sealed() {
        "encrypted (AES-256-GCM; never reflinked)"
    } else {
        "none"
    };
    if args.json {
        let v = serde_json::json!({
            "encrypted": reader.is_sealed(),
            "signed_by": signer,
            "signature_verified": signature_checked,
            "archive_id": hex(&header.archive_id),
            "format_version": FORMAT_VERSION,
            "created_unix_ns": header.created_unix_ns,
            "alignment": header.alignment(),
            "shards": shard_sizes.len(),
            "shard_bytes": shard_sizes,
            "archive_bytes": archive_bytes,
            "entries": index.entries.len(),
            "entry_kinds": kinds,
            "chunks": index.chunks.len(),
            "chunk_size": index.chunk_size,
            "logical_bytes": logical,
            "raw_bytes": raw,
            "stored_bytes": stored,
            "index_bytes": index_bytes,
            "ratio": ratio,
            "codecs": summary.codecs.iter().map(|(k, t)| (k.to_string(), serde_json::json!({"chunks": t.chunks, "raw_bytes": t.raw_bytes, "stored_bytes": t.stored_bytes}))).collect::<BTreeMap<_, _>>(),
            "meta": index.meta.iter().map(|m| (m.key.clone(), m.value.clone())).collect::<BTreeMap<_, _>>(),
            "hot_list": hot_paths,
            "referenced_bytes": summary.referenced_bytes,
            "parent_bytes": summary.parent_bytes,
            "parents": index.parents.iter().map(|p| serde_json::json!({
                "archive_id": hex(&p.archive_id),
                "location": p.location,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    println!("archive id:   {}", hex(&header.archive_id));
    println!(
        "format:       .cka version {FORMAT_VERSION}, alignment {} bytes, BLAKE3 digests",
        header.alignment()
    );
    println!("encryption:   {encryption}");
    println!("signature:    {signature}");
    println!(
        "created:      {} UTC",
        utc_time(header.created_unix_ns as i64)
    );
    println!(
        "shards:       {} ({})",
        shard_sizes.len(),
        shard_sizes
            .iter()
            .map(|s| human_bytes(*s))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "entries:      {} ({})",
        index.entries.len(),
        kinds
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "data:         {} logical, {} in chunks, {} stored",
        human_bytes(logical),
        human_bytes(raw),
        human_bytes(stored)
    );
    if summary.referenced_bytes > 0 {
        println!(
            "references:   {} stored once already ({} in parent archives)",
            human_bytes(summary.referenced_bytes),
            human_bytes(summary.parent_bytes)
        );
    }
    for (n, p) in index.parents.iter().enumerate() {
        println!(
            "parent {}:     {} (id {}){}",
            n + 1,
            escape_controls(&p.location),
            hex(&p.archive_id),
            if n == 0 {
                ""
            } else {
                ", through the one above"
            }
        );
    }
    println!(
        "archive size: {} (ratio {ratio:.2})",
        human_bytes(archive_bytes)
    );
    println!(
        "chunks:       {} of up to {}",
        index.chunks.len(),
        human_bytes(index.chunk_size as u64)
    );
    for (k, t) in &summary.codecs {
        println!(
            "  {k:<5} {} chunks, {} -> {}",
            t.chunks,
            human_bytes(t.raw_bytes),
            human_bytes(t.stored_bytes)
        );
    }
    println!("index:        {}", human_bytes(index_bytes));
    // The archive's own text: control characters escaped.
    for p in &hot_paths {
        println!("hot:          {}", escape_controls(p));
    }
    for m in &index.meta {
        println!(
            "meta:         {} = {}",
            escape_controls(&m.key),
            escape_controls(&m.value)
        );
    }
    Ok(())
}
