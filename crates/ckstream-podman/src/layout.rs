//! Names in podman's checkpoint export archive and where the same content lives in a
//! `.cka` archive written by `ckstream podman checkpoint`.
//!
//! | podman export (tar)      | `.cka`                        |
//! |--------------------------|-------------------------------|
//! | `checkpoint/NAME`        | `criu/NAME`                   |
//! | `rootfs-diff.tar` (nested tar of changed files) + `deleted.files` | `rootfs/...` (the overlay upper dir as it is: whiteouts, opaque dirs) + `podman/deleted.files` |
//! | every other file (`config.dump`, `spec.dump`, `network.status`, `stats-dump`, `ctr.log`, `devshm-checkpoint.tar`, `artifacts/`) | `podman/NAME` |

/// Podman's directory of CRIU images inside its archive.
pub const PODMAN_CHECKPOINT_DIR: &str = "checkpoint";
/// Podman's nested tar of added and modified files.
pub const ROOTFS_DIFF_TAR: &str = "rootfs-diff.tar";
/// Podman's JSON list of deleted container paths.
pub const DELETED_FILES: &str = "deleted.files";
/// podman's container config in an export.
pub const CONFIG_DUMP: &str = "config.dump";
/// The container's OCI spec in an export.
pub const SPEC_DUMP: &str = "spec.dump";

/// Where CRIU images live in a `.cka` (as `ckstream dump` stores them).
pub const CKA_CRIU_DIR: &str = "criu";
/// Where podman's bundle files live in a `.cka`.
pub const CKA_PODMAN_DIR: &str = "podman";
/// Where the rootfs diff lives in a `.cka`.
pub const CKA_ROOTFS_DIR: &str = "rootfs";

/// Bundle files podman puts in an export, in podman's order, before `checkpoint/`.
/// Missing ones are skipped, as podman does.
pub const BUNDLE_FILES: &[&str] = &[
    "artifacts",
    "devshm-checkpoint.tar",
    CONFIG_DUMP,
    SPEC_DUMP,
    "network.status",
    "stats-dump",
    "ctr.log",
];

/// Container paths podman never carries in a rootfs diff: mount points it sets up
/// itself on every start.
pub const EXCLUDED_PATHS: &[&str] = &[
    "/dev",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/mtab",
    "/proc",
    "/run",
    "/run/notify",
    "/run/.containerenv",
    "/run/secrets",
    "/run/podman-init",
    "/sys",
];

/// True for a container path (relative, no leading `/`) podman leaves out of diffs.
pub fn is_excluded(rel: &[u8]) -> bool {
    EXCLUDED_PATHS.iter().any(|p| p.as_bytes()[1..] == *rel)
}

/// `.cka` path of a podman archive name, `None` for the rootfs diff and deletions
/// (they are translated, not copied).
pub fn cka_name_of(podman_name: &str) -> Option<String> {
    let name = podman_name.trim_end_matches('/');
    if name == ROOTFS_DIFF_TAR {
        return None;
    }
    if name == PODMAN_CHECKPOINT_DIR {
        return Some(CKA_CRIU_DIR.to_string());
    }
    if let Some(rest) = name.strip_prefix("checkpoint/") {
        return Some(format!("{CKA_CRIU_DIR}/{rest}"));
    }
    Some(format!("{CKA_PODMAN_DIR}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            cka_name_of("checkpoint/pages-1.img").unwrap(),
            "criu/pages-1.img"
        );
        assert_eq!(cka_name_of("checkpoint/").unwrap(), "criu");
        assert_eq!(cka_name_of("config.dump").unwrap(), "podman/config.dump");
        assert_eq!(cka_name_of("artifacts/").unwrap(), "podman/artifacts");
        assert!(cka_name_of("rootfs-diff.tar").is_none());
        assert!(is_excluded(b"etc/hosts"));
        assert!(!is_excluded(b"etc/hosts.allow"));
        assert!(!is_excluded(b"run/app"));
    }
}
