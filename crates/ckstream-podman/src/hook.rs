//! Applying a `.cka`'s rootfs diff during `podman container restore`, from an OCI
//! prestart hook: runc runs the hook after mounting the new container's root and before
//! CRIU opens any file, so the diff is applied in one pass from the archive (every chunk
//! verified) instead of podman untarring a nested tar.
//!
//! The protocol between the restoring ckstream and the hook is a one-shot *ticket*: a
//! file under [`TICKET_DIR`] naming the archive (and its id, so a replaced archive is
//! refused). The hook consumes the ticket, so a later start of the restored container
//! (whose spec keeps the hook) does nothing, and writes its outcome beside it for the
//! restoring process to read.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ckstream_format::{ArchiveReader, Error};
use ckstream_store::ArchiveLocation;

use crate::error::{PodmanError, Result};
use crate::layout::CKA_ROOTFS_DIR;

/// Where tickets live (root-only).
pub const TICKET_DIR: &str = "/run/ckstream";

/// The shell of ckstream's restore hook.
const HOOK_SHELL: &str = "/bin/sh";
/// The script of ckstream's restore hook: nothing without its ticket (`$0`), else
/// `$1 __podman-rootfs-hook TICKET`.
const HOOK_SCRIPT: &str = "[ -e \"$0\" ] || exit 0; exec \"$1\" __podman-rootfs-hook \"$0\"";

/// True when `hook` (an entry of an OCI spec's `hooks.prestart`) is exactly the hook a
/// ckstream restore adds ([`RootfsTicket::hook`]): `/bin/sh` with ckstream's script, a
/// ticket path of the form ckstream creates under [`TICKET_DIR`] and an absolute
/// ckstream path, nothing else (no environment, no timeout). It stays in the spec of a
/// restored container, so a later checkpoint of that container carries it; without its
/// one-shot ticket (root-only, random name) it does nothing.
pub fn is_own_hook(hook: &serde_json::Value) -> bool {
    let Some(obj) = hook.as_object() else {
        return false;
    };
    if obj.len() != 2 || obj.get("path").and_then(|p| p.as_str()) != Some(HOOK_SHELL) {
        return false;
    }
    let Some(args) = obj.get("args").and_then(|a| a.as_array()) else {
        return false;
    };
    let args: Vec<&str> = args.iter().filter_map(|a| a.as_str()).collect();
    match args[..] {
        ["sh", "-c", script, ticket, exe] => {
            script == HOOK_SCRIPT
                && is_ticket_path(ticket)
                && exe.starts_with('/')
                && !exe.contains('\n')
        }
        _ => false,
    }
}

/// ckstream's hook for `ticket` and `exe`, as [`RootfsTicket::hook`] writes it.
#[cfg(test)]
pub(crate) fn own_hook_for_test(ticket: &str, exe: &str) -> serde_json::Value {
    serde_json::json!({"path": HOOK_SHELL, "args": ["sh", "-c", HOOK_SCRIPT, ticket, exe]})
}

/// `TICKET_DIR/rootfs-PID-HEX16.json`, as [`RootfsTicket::create`] names tickets.
fn is_ticket_path(p: &str) -> bool {
    let Some(rest) = p
        .strip_prefix(TICKET_DIR)
        .and_then(|r| r.strip_prefix("/rootfs-"))
        .and_then(|r| r.strip_suffix(".json"))
    else {
        return false;
    };
    let Some((pid, id)) = rest.split_once('-') else {
        return false;
    };
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && id.len() == 16
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A one-shot permission for the hook to apply one archive's rootfs diff; removed
/// (with its outcome) on drop.
pub struct RootfsTicket {
    path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TicketData {
    archive: PathBuf,
    archive_id: String,
    /// Secret key files that open the archive when it is encrypted.
    #[serde(default)]
    keys: Vec<PathBuf>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TicketOutcome {
    ok: bool,
    error: Option<String>,
    /// The error was damage in the archive (exit code 3 for the restore too).
    bad_archive: bool,
    seconds: f64,
}

/// What became of a ticket.
#[derive(Debug)]
pub enum HookOutcome {
    /// The runtime never ran the hook: the container would run without its changes.
    NotRun,
    /// The diff was applied, taking this long.
    Applied {
        /// How long applying took.
        seconds: f64,
    },
    /// Applying failed; `bad_archive` when the archive itself was at fault.
    Failed {
        /// The hook's error.
        message: String,
        /// The archive itself was at fault.
        bad_archive: bool,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl RootfsTicket {
    /// Issues a ticket for the local archive `archive` (open in `reader`).
    ///
    /// # Errors
    /// [`PodmanError::Archive`] (an I/O error) when the ticket cannot be written.
    pub fn create(archive: &Path, reader: &ArchiveReader, keys: &[PathBuf]) -> Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let io = |what: String, e| PodmanError::Archive(Error::io(what, e));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(TICKET_DIR)
            .map_err(|e| io(format!("cannot create {TICKET_DIR}"), e))?;
        let path = PathBuf::from(format!(
            "{TICKET_DIR}/rootfs-{}-{}.json",
            std::process::id(),
            hex(&ckstream_store::new_archive_id()[..8])
        ));
        let data = TicketData {
            archive: std::fs::canonicalize(archive)
                .map_err(|e| io(format!("cannot resolve {}", archive.display()), e))?,
            archive_id: hex(&reader.header().archive_id),
            keys: if reader.is_sealed() {
                keys.iter()
                    .map(|k| {
                        std::fs::canonicalize(k)
                            .map_err(|e| io(format!("cannot resolve {}", k.display()), e))
                    })
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            },
        };
        let json = serde_json::to_vec(&data).expect("a ticket serializes");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .and_then(|mut f| f.write_all(&json))
            .map_err(|e| io(format!("cannot create {}", path.display()), e))?;
        Ok(RootfsTicket { path })
    }

    fn result_path(ticket: &Path) -> PathBuf {
        ticket.with_extension("result")
    }

    /// The OCI prestart hook for `spec.dump`: `sh` checks for the ticket (so a later
    /// start of the restored container, or a missing ckstream, is harmless) and hands
    /// over to `exe __podman-rootfs-hook TICKET`.
    pub fn hook(&self, exe: &Path) -> serde_json::Value {
        serde_json::json!({
            "path": HOOK_SHELL,
            "args": ["sh", "-c", HOOK_SCRIPT, self.path, exe],
        })
    }

    /// What the hook did with the ticket.
    pub fn outcome(&self) -> HookOutcome {
        let Ok(bytes) = std::fs::read(Self::result_path(&self.path)) else {
            return HookOutcome::NotRun;
        };
        match serde_json::from_slice::<TicketOutcome>(&bytes) {
            Ok(o) if o.ok => HookOutcome::Applied { seconds: o.seconds },
            Ok(o) => HookOutcome::Failed {
                message: o.error.unwrap_or_else(|| "unknown error".into()),
                bad_archive: o.bad_archive,
            },
            Err(e) => HookOutcome::Failed {
                message: format!("unreadable hook result: {e}"),
                bad_archive: false,
            },
        }
    }
}

impl Drop for RootfsTicket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(Self::result_path(&self.path));
    }
}

/// The hook itself (`ckstream __podman-rootfs-hook TICKET`): consumes the ticket,
/// applies its archive's rootfs diff onto the container root named by the OCI state
/// (`state`, runc's stdin) and the bundle's `config.json`, and records the outcome for
/// the restoring process. Without a ticket it does nothing.
///
/// # Errors
/// Whatever failed, also recorded in the outcome.
pub fn run_hook(ticket: &Path, state: impl Read) -> Result<()> {
    let Ok(bytes) = std::fs::read(ticket) else {
        return Ok(());
    };
    // One shot: a later start of this container must not apply the diff again.
    let _ = std::fs::remove_file(ticket);
    let started = Instant::now();
    let applied = apply(&bytes, state);
    let outcome = TicketOutcome {
        ok: applied.is_ok(),
        error: applied.as_ref().err().map(|e| one_line(e)),
        bad_archive: applied.as_ref().err().is_some_and(is_bad_archive),
        seconds: started.elapsed().as_secs_f64(),
    };
    ckstream_store::create_private_file(&RootfsTicket::result_path(ticket))
        .and_then(|mut f| {
            std::io::Write::write_all(
                &mut f,
                &serde_json::to_vec(&outcome).expect("an outcome serializes"),
            )
        })
        .map_err(|e| PodmanError::Archive(Error::io("recording the hook's outcome", e)))?;
    applied
}

/// An error and its causes on one line, each cause once.
fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !msg.contains(&s) {
            msg.push_str(": ");
            msg.push_str(&s);
        }
        cur = c.source();
    }
    msg
}

/// True when an archive error anywhere in `e`'s chain says the archive is bad.
pub fn is_bad_archive(e: &PodmanError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<Error>().is_some_and(Error::is_bad_archive) {
            return true;
        }
        cur = c.source();
    }
    false
}

fn apply(ticket: &[u8], state: impl Read) -> Result<()> {
    let bad = |what: &str, e: String| PodmanError::Unsupported(format!("{what}: {e}"));
    let t: TicketData =
        serde_json::from_slice(ticket).map_err(|e| bad("reading the ticket", e.to_string()))?;
    let state: serde_json::Value = serde_json::from_reader(state)
        .map_err(|e| bad("reading the OCI state on stdin", e.to_string()))?;
    let bundle = state["bundle"]
        .as_str()
        .ok_or_else(|| bad("the OCI state", "has no bundle".into()))?;
    let config_path = Path::new(bundle).join("config.json");
    let config: serde_json::Value = std::fs::read(&config_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| bad(&format!("reading {}", config_path.display()), e))?;
    let root = config["root"]["path"]
        .as_str()
        .ok_or_else(|| bad("config.json", "has no root.path".into()))?;
    let root = Path::new(bundle).join(root);
    let keys = ckstream_store::KeyFiles {
        secret: t.keys.clone(),
        trusted: Vec::new(),
    }
    .load()?;
    let reader =
        ArchiveLocation::Path(t.archive.clone()).open_keyed(&std::env::temp_dir(), &keys)?;
    if hex(&reader.header().archive_id) != t.archive_id {
        return Err(PodmanError::Archive(Error::Corrupt(format!(
            "{} is not the archive the restore started with",
            t.archive.display()
        ))));
    }
    let opts = ckstream_fs::UnpackOptions {
        strip_prefix: Some(CKA_ROOTFS_DIR.as_bytes().to_vec()),
        overlay_apply: true,
        ..Default::default()
    };
    ckstream_fs::unpack(&reader, &root, &[], &opts, &Default::default()).map_err(|e| {
        PodmanError::Archive(e).context(format!("applying the rootfs diff onto {}", root.display()))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(ticket: &str, exe: &str) -> serde_json::Value {
        own_hook_for_test(ticket, exe)
    }

    #[test]
    fn recognises_exactly_its_own_hook() {
        let t = "/run/ckstream/rootfs-4242-0123456789abcdef.json";
        assert!(is_own_hook(&own(t, "/usr/local/bin/ckstream")));
        for bad in [
            own("/run/ckstream/rootfs-4242-0123456789abcdeg.json", "/x"),
            own("/tmp/rootfs-4242-0123456789abcdef.json", "/x"),
            own("/run/ckstream/rootfs--0123456789abcdef.json", "/x"),
            own("/run/ckstream/../rootfs-1-0123456789abcdef.json", "/x"),
            own(t, "relative/ckstream"),
            serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", "true", t, "/x"]}),
            serde_json::json!({"path": "/bin/bash", "args": ["sh", "-c", HOOK_SCRIPT, t, "/x"]}),
            serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", HOOK_SCRIPT, t, "/x", "more"]}),
            serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", HOOK_SCRIPT, t, "/x"], "env": ["LD_PRELOAD=/x.so"]}),
        ] {
            assert!(!is_own_hook(&bad), "{bad}");
        }
        // What create() writes is recognised.
        let ticket = RootfsTicket {
            path: PathBuf::from(format!("{TICKET_DIR}/rootfs-7-{}.json", hex(&[0xab; 8]))),
        };
        assert!(is_own_hook(&ticket.hook(Path::new("/usr/bin/ckstream"))));
        std::mem::forget(ticket);
    }
}
