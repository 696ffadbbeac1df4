//! `ckstream inspect` and `ckstream diff`: what a checkpoint holds and how two differ,
//! from the index and CRIU's metadata images (see `ckstream_criu::inspect`).

use anyhow::{Context, Result};
use ckstream_criu::inspect::{InspectOptions, Inspection, OpenFile, Pattern, Process};
use ckstream_format::ArchiveReader;
use ckstream_podman::inspect::{Container, RootfsChange};
use serde::Serialize;

use crate::output::{escape_controls, hex, human_bytes, utc_time};

#[derive(Debug, clap::Args)]
pub struct Args {
    archive: ckstream_store::ArchiveLocation,
    /// The process tree with command lines (read from one or two pages of memory each).
    #[arg(long)]
    ps_tree: bool,
    /// With --ps-tree: each process's environment too (it may hold secrets).
    #[arg(long)]
    env: bool,
    /// Open files of each process: fd, kind, mode, path, position.
    #[arg(long)]
    files: bool,
    /// Sockets of each process: family, type, state, addresses.
    #[arg(long)]
    sockets: bool,
    /// Mount points (dumps of a mount namespace).
    #[arg(long)]
    mounts: bool,
    /// Memory maps of each process, and how much of each the checkpoint holds.
    #[arg(long)]
    memory: bool,
    /// CRIU's dump statistics (when the archive holds them).
    #[arg(long)]
    stats: bool,
    /// The container's changed paths (podman checkpoints).
    #[arg(long)]
    rootfs: bool,
    /// Every section (the environment only with --env).
    #[arg(long)]
    all: bool,
    /// Print JSON on stdout (every section, see docs/INSPECT.md).
    #[arg(long)]
    json: bool,
    /// Print LEN bytes of process PID's memory at ADDR (hex with 0x, or decimal) to stdout,
    /// read from the page images (verified) and nothing else.
    #[arg(long, num_args = 3, value_names = ["PID", "ADDR", "LEN"])]
    dump_memory: Option<Vec<String>>,
    /// Print the addresses in process PID's memory where STRING occurs (reading only
    /// that process's page image, every chunk verified).
    #[arg(long, num_args = 2, value_names = ["PID", "STRING"], conflicts_with = "search_regex")]
    search: Option<Vec<String>>,
    /// Like --search, for a regular expression over bytes (matches up to 4 KiB long).
    #[arg(long, num_args = 2, value_names = ["PID", "REGEX"])]
    search_regex: Option<Vec<String>>,
    /// With --search: stop after this many matches.
    #[arg(long, default_value_t = 100)]
    max_matches: usize,
}

/// The archive-level facts of the summary.
#[derive(Debug, Serialize)]
struct Summary {
    archive_id: String,
    created_unix_ns: i64,
    meta: std::collections::BTreeMap<String, String>,
    parents: usize,
    archive_bytes: u64,
    memory_bytes: u64,
    rootfs_bytes: u64,
    criu_metadata_bytes: u64,
    other_bytes: u64,
}

fn summary(reader: &ArchiveReader, inspection: &Inspection) -> Result<Summary> {
    let (mut rootfs, mut criu, mut other) = (0, 0, 0);
    for e in reader.entries() {
        if e.path.starts_with(b"rootfs/") {
            rootfs += e.size;
        } else if e.path.starts_with(b"criu/") {
            criu += e.size;
        } else {
            other += e.size;
        }
    }
    Ok(Summary {
        archive_id: hex(&reader.header().archive_id),
        created_unix_ns: reader.header().created_unix_ns as i64,
        meta: reader
            .index()
            .meta
            .iter()
            .map(|m| (m.key.clone(), m.value.clone()))
            .collect(),
        parents: reader.index().parents.len(),
        archive_bytes: reader.shard_sizes()?.iter().sum(),
        memory_bytes: inspection.memory_bytes,
        rootfs_bytes: rootfs,
        criu_metadata_bytes: criu - inspection.memory_bytes,
        other_bytes: other,
    })
}

fn parse_number(s: &str) -> Result<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .with_context(|| format!("not a number: {s}"))
}

pub fn run(args: Args) -> Result<()> {
    let reader = super::open(&args.archive)?;
    if let Some(v) = &args.dump_memory {
        let pid = parse_number(&v[0])? as u32;
        let (addr, len) = (parse_number(&v[1])?, parse_number(&v[2])?);
        let bytes = ckstream_criu::inspect::read_memory(&reader, pid, addr, len)?;
        std::io::Write::write_all(&mut std::io::stdout().lock(), &bytes)?;
        return Ok(());
    }
    let search = match (&args.search, &args.search_regex) {
        (Some(v), _) => Some((&v[0], Pattern::Bytes(v[1].as_bytes().to_vec()))),
        (None, Some(v)) => {
            let re = regex::bytes::Regex::new(&v[1])
                .with_context(|| format!("not a regular expression: {}", v[1]))?;
            Some((&v[0], Pattern::Regex(re)))
        }
        (None, None) => None,
    };
    if let Some((pid, pattern)) = search {
        let pid = parse_number(pid)? as u32;
        let hits = ckstream_criu::inspect::search_memory(&reader, pid, &pattern, args.max_matches)?;
        if args.json {
            println!("{}", serde_json::json!({ "pid": pid, "addresses": hits }));
        } else {
            for a in &hits {
                println!("{a:#014x}");
            }
        }
        return Ok(());
    }
    let all = args.all || args.json;
    let opts = InspectOptions {
        cmdline: args.ps_tree || all,
        environment: args.env,
    };
    let mut inspection = ckstream_criu::inspect::inspect(&reader, opts)?;
    let container = ckstream_podman::inspect::container(&reader)?;
    if inspection.stats.is_none() {
        // Podman keeps CRIU's statistics with its bundle files.
        if let Some(b) = ckstream_podman::inspect::bundle_file(&reader, "stats-dump")? {
            let stats = ckstream_criu::stats::parse_dump_stats(&b)
                .map_err(|e| ckstream_format::Error::Corrupt(format!("podman/stats-dump: {e}")))?;
            inspection.stats = Some((&stats).into());
        }
    }
    let rootfs = ckstream_podman::inspect::rootfs_changes(&reader);
    let summary = summary(&reader, &inspection)?;
    if args.json {
        let v = serde_json::json!({
            "summary": summary,
            "container": container,
            "criu": inspection,
            "rootfs": rootfs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_summary(
        &args.archive.to_string(),
        &summary,
        &inspection,
        container.as_ref(),
        &rootfs,
    );
    let procs = &inspection.processes;
    if args.ps_tree || all {
        println!("\nprocess tree:");
        print_tree(procs, args.env);
    }
    if args.files || all {
        println!("\nopen files:");
        for p in procs {
            println!("  {} {}", p.pid, escape_controls(&p.comm));
            for f in p.files.iter().filter(|f| f.socket.is_none()) {
                println!("    {}", file_line(f));
            }
        }
    }
    if args.sockets || all {
        println!("\nsockets:");
        for p in procs {
            for f in p.files.iter().filter(|f| f.socket.is_some()) {
                println!("  {} {} {}", p.pid, escape_controls(&p.comm), file_line(f));
            }
        }
    }
    if args.memory || all {
        println!("\nmemory:");
        for p in procs {
            let m = &p.memory;
            println!(
                "  {} {}: {} dumped ({} may follow lazily), {} maps",
                p.pid,
                escape_controls(&p.comm),
                human_bytes(m.dumped_bytes),
                human_bytes(m.lazy_bytes),
                m.vmas.len()
            );
            for v in &m.vmas {
                println!(
                    "    {:012x}-{:012x} {} {:<8} {:>10} {}",
                    v.start,
                    v.end,
                    v.perms,
                    v.kind,
                    human_bytes(v.dumped_bytes),
                    escape_controls(v.file.as_deref().unwrap_or(""))
                );
            }
        }
    }
    if args.mounts || all {
        println!("\nmounts:");
        if inspection.mounts.is_empty() {
            println!("  (none recorded: not a mount namespace dump)");
        }
        for m in &inspection.mounts {
            println!(
                "  {} {} {} {} ({})",
                m.id,
                escape_controls(&m.mountpoint),
                m.fstype,
                escape_controls(&m.source),
                escape_controls(&m.options)
            );
        }
    }
    if args.stats || all {
        println!("\nCRIU statistics:");
        match &inspection.stats {
            None => println!("  (not in the archive)"),
            Some(s) => {
                let ms = |us: u32| f64::from(us) / 1000.0;
                println!(
                    "  freezing {:.1} ms, frozen {:.1} ms, memdump {:.1} ms, memwrite {:.1} ms",
                    ms(s.freezing_time_us),
                    ms(s.frozen_time_us),
                    ms(s.memdump_time_us),
                    ms(s.memwrite_time_us)
                );
                println!(
                    "  pages scanned {}, written {}, lazy {}, skipped (in parent) {}",
                    s.pages_scanned, s.pages_written, s.pages_lazy, s.pages_skipped_parent
                );
            }
        }
    }
    if args.rootfs || all {
        println!("\nrootfs changes:");
        if rootfs.is_empty() {
            println!("  (none)");
        }
        for c in &rootfs {
            println!("  {}", change_line(c));
        }
    }
    Ok(())
}

fn print_summary(
    location: &str,
    s: &Summary,
    inspection: &Inspection,
    container: Option<&Container>,
    rootfs: &[RootfsChange],
) {
    println!(
        "archive:    {} (id {})",
        escape_controls(location),
        s.archive_id
    );
    println!("created:    {}", utc_time(s.created_unix_ns));
    let meta = |k: &str| s.meta.get(k).map(String::as_str);
    if let Some(v) = meta("ckstream.version") {
        println!(
            "made by:    ckstream {v} ({})",
            meta("ckstream.command").unwrap_or("?")
        );
    }
    if let Some(inv) = &inspection.inventory {
        println!(
            "CRIU:       image version {}{}",
            inv.image_version,
            inv.lsm
                .as_ref()
                .map(|l| format!(", LSM {l}"))
                .unwrap_or_default()
        );
    }
    for (k, v) in &s.meta {
        if k.starts_with("criu.") || k.starts_with("kernel") || k.starts_with("podman.") {
            println!("meta:       {k} = {}", escape_controls(v));
        }
    }
    if s.parents > 0 {
        println!("chain:      {} parent archive(s)", s.parents);
    }
    if let Some(c) = container {
        println!(
            "container:  {} ({}), image {}, runtime {}{}",
            escape_controls(c.name.as_deref().unwrap_or("?")),
            c.id.as_deref().map_or("?", |i| &i[..i.len().min(12)]),
            escape_controls(c.image.as_deref().unwrap_or("?")),
            c.runtime.as_deref().unwrap_or("?"),
            if c.addresses.is_empty() {
                String::new()
            } else {
                format!(", addresses {}", c.addresses.join(" "))
            }
        );
    }
    println!(
        "sizes:      memory {}, rootfs diff {} ({} changes), CRIU metadata {}, other {}; archive {}",
        human_bytes(s.memory_bytes),
        human_bytes(s.rootfs_bytes),
        rootfs.len(),
        human_bytes(s.criu_metadata_bytes),
        human_bytes(s.other_bytes),
        human_bytes(s.archive_bytes)
    );
    let files: usize = inspection.processes.iter().map(|p| p.files.len()).sum();
    println!(
        "processes:  {} ({} open files, {} unrecognised images)",
        inspection.processes.len(),
        files,
        inspection
            .images
            .iter()
            .filter(|i| !i.decoded && !i.name.starts_with("pages-"))
            .count()
    );
}

fn print_tree(procs: &[Process], env: bool) {
    fn walk(procs: &[Process], p: &Process, depth: usize, env: bool) {
        let indent = "  ".repeat(depth + 1);
        let cmd = p
            .cmdline
            .as_ref()
            .map(|c| escape_controls(&c.join(" ")).into_owned())
            .unwrap_or_else(|| "(command line not in the checkpoint)".into());
        println!(
            "{indent}{} {} [{}] {cmd}",
            p.pid,
            escape_controls(&p.comm),
            p.state
        );
        if env {
            for e in p.environment.iter().flatten() {
                println!("{indent}    {}", escape_controls(e));
            }
        }
        for c in procs.iter().filter(|c| c.ppid == p.pid && c.pid != p.pid) {
            walk(procs, c, depth + 1, env);
        }
    }
    let pids: std::collections::HashSet<u32> = procs.iter().map(|p| p.pid).collect();
    for root in procs.iter().filter(|p| !pids.contains(&p.ppid)) {
        walk(procs, root, 0, env);
    }
}

fn file_line(f: &OpenFile) -> String {
    let mut s = format!(
        "fd {:<3} {:<9} {:<2}",
        f.fd,
        f.kind,
        f.mode.as_deref().unwrap_or("")
    );
    if let Some(sock) = &f.socket {
        s += &format!(
            " {} {} {}",
            sock.kind,
            sock.state,
            escape_controls(&sock.local)
        );
        if let Some(r) = &sock.remote {
            s += &format!(" -> {}", escape_controls(r));
        }
        if let Some(b) = sock.backlog {
            s += &format!(" (backlog {b})");
        }
    } else if let Some(p) = &f.path {
        s += &format!(" {}", escape_controls(p));
    }
    if let Some(pos) = f.position.filter(|&p| p > 0) {
        s += &format!(" (pos {pos})");
    }
    s
}

fn change_line(c: &RootfsChange) -> String {
    let mark = match c.change.as_str() {
        "deleted" => "D",
        "opaque" => "O",
        _ => "W",
    };
    if c.change == "written" && c.kind == "file" {
        format!(
            "{mark} {} ({})",
            escape_controls(&c.path),
            human_bytes(c.bytes)
        )
    } else {
        format!("{mark} {} [{}]", escape_controls(&c.path), c.kind)
    }
}

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// The older checkpoint.
    a: ckstream_store::ArchiveLocation,
    /// The newer checkpoint.
    b: ckstream_store::ArchiveLocation,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn diff(args: DiffArgs) -> Result<()> {
    let (a, b) = (super::open(&args.a)?, super::open(&args.b)?);
    let opts = InspectOptions {
        cmdline: true,
        environment: false,
    };
    let (ia, ib) = (
        ckstream_criu::inspect::inspect(&a, opts)?,
        ckstream_criu::inspect::inspect(&b, opts)?,
    );
    let procs = ckstream_criu::diff::diff(&a, &ia, &b, &ib);
    let rootfs = ckstream_podman::inspect::rootfs_diff(&a, &b);
    let (sa, sb) = (summary(&a, &ia)?, summary(&b, &ib)?);
    let meta: Vec<(String, Option<String>, Option<String>)> = sa
        .meta
        .keys()
        .chain(sb.meta.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| sa.meta.get(*k) != sb.meta.get(*k))
        .map(|k| (k.clone(), sa.meta.get(k).cloned(), sb.meta.get(k).cloned()))
        .collect();
    if args.json {
        let v = serde_json::json!({
            "processes": procs,
            "rootfs": rootfs,
            "meta": meta.iter().map(|(k, x, y)| serde_json::json!({"key": k, "a": x, "b": y})).collect::<Vec<_>>(),
            "memory_bytes": [sa.memory_bytes, sb.memory_bytes],
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let brief = |p: &ckstream_criu::diff::ProcessBrief| {
        format!(
            "{} {} {}",
            p.pid,
            escape_controls(&p.comm),
            escape_controls(&p.cmdline.as_ref().map(|c| c.join(" ")).unwrap_or_default())
        )
    };
    for p in &procs.processes_added {
        println!("+ process {}", brief(p));
    }
    for p in &procs.processes_gone {
        println!("- process {}", brief(p));
    }
    for c in &procs.processes_changed {
        println!("~ process {} {}", c.pid, escape_controls(&c.comm));
        if let Some((x, y)) = &c.cmdline {
            println!(
                "    command line: {} -> {}",
                escape_controls(&x.join(" ")),
                escape_controls(&y.join(" "))
            );
        }
        for f in &c.files_added {
            println!("    + {}", file_line(f));
        }
        for f in &c.files_gone {
            println!("    - {}", file_line(f));
        }
        for m in &c.maps_added {
            println!("    + map {}", escape_controls(m));
        }
        for m in &c.maps_gone {
            println!("    - map {}", escape_controls(m));
        }
        println!(
            "    memory: {} -> {}, {} in chunks the first checkpoint does not hold",
            human_bytes(c.memory_bytes.0),
            human_bytes(c.memory_bytes.1),
            human_bytes(c.memory_changed_bytes)
        );
    }
    for c in &rootfs.added {
        println!("+ rootfs {}", change_line(c));
    }
    for c in &rootfs.removed {
        println!("- rootfs {}", change_line(c));
    }
    for c in &rootfs.modified {
        println!("~ rootfs {}", change_line(c));
    }
    for (k, x, y) in &meta {
        println!(
            "~ meta {k}: {} -> {}",
            escape_controls(x.as_deref().unwrap_or("(none)")),
            escape_controls(y.as_deref().unwrap_or("(none)"))
        );
    }
    Ok(())
}
