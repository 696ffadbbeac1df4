//! The security-relevant container settings an archive brings with it, and whether to
//! restore them.
//!
//! `podman container restore --import` creates the container from the archive's
//! `config.dump` (libpod's container config) and runs it with the archive's `spec.dump`
//! (the OCI runtime spec) as it is: podman 4.3 only drops its own bind mounts of
//! `/dev/shm`, `/etc/resolv.conf`, `/etc/hostname`, `/etc/hosts`, `/run/.containerenv`
//! and `/run/secrets` (by exact destination), and replaces the root path, the cgroup path
//! and a network namespace it creates itself (`createNetNS`). Whoever wrote the archive
//! therefore chooses the OCI hooks runc runs as root on the host, the capabilities, the
//! host paths mounted into the container and the namespaces it shares with the host.
//!
//! [`check_config`] lists such settings ([`TrustReport`]); [`TrustReport::refusal`]
//! decides. An ordinary container (podman's default capabilities, its own namespaces,
//! podman's own mounts, seccomp on) asks for nothing.

use std::path::{Path, PathBuf};

use ckstream_format::Error;
use serde_json::Value;

use crate::error::{PodmanError, Result};

/// podman 4.3's default capabilities as Debian's and Fedora's `containers.conf` set them
/// (`default_capabilities`).
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// The three more of podman 4.3's built-in default (containers/common 0.50's
/// `DefaultCapabilities`, used when no `containers.conf` sets the list; Docker's default
/// has them too). Not counted as added.
pub const BUILTIN_DEFAULT_CAPABILITIES: &[&str] = &["CAP_AUDIT_WRITE", "CAP_MKNOD", "CAP_NET_RAW"];

/// Mount destinations podman's restore removes from `spec.dump` and sets up itself.
const PODMAN_REPLACED_MOUNTS: &[&str] = &[
    "/dev/shm",
    "/etc/resolv.conf",
    "/etc/hostname",
    "/etc/hosts",
    "/run/.containerenv",
    "/run/secrets",
];

/// Mount destinations podman binds from its own per-container files (`passwd`, `group`,
/// `localtime`, `notify` in the container's `userdata` directory).
const PODMAN_OWN_FILES: &[(&str, &str)] = &[
    ("/etc/passwd", "passwd"),
    ("/etc/group", "group"),
    ("/etc/localtime", "localtime"),
    ("/run/notify", "notify"),
];

/// Filesystem types of a container's own kernel mounts (no host source).
const KERNEL_MOUNTS: &[&str] = &[
    "proc", "tmpfs", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

/// Namespaces an ordinary podman container has of its own; a missing one is the host's.
const OWN_NAMESPACES: &[&str] = &["pid", "network", "ipc", "uts", "mount"];

/// A kind of security-relevant setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Setting {
    /// An OCI hook (runc runs it on the host, as root) other than ckstream's own.
    Hook,
    /// Privileged mode or one of its parts (no seccomp, unconfined LSM, writable /sys, ...).
    Privileged,
    /// A host path mounted into the container (bind mounts, overlay volumes, a host
    /// directory as root filesystem, host mounts podman unmounts on cleanup).
    HostMount,
    /// A capability beyond podman's defaults.
    Capability,
    /// A host device or device-cgroup access.
    Device,
    /// A namespace shared with the host (or joined by path).
    HostNamespace,
}

impl Setting {
    /// Every setting, in report order.
    pub const ALL: [Setting; 6] = [
        Setting::Hook,
        Setting::Privileged,
        Setting::HostMount,
        Setting::Capability,
        Setting::Device,
        Setting::HostNamespace,
    ];

    /// How a refusal names it ("the archive asks for ...").
    pub fn label(self) -> &'static str {
        match self {
            Setting::Hook => "OCI hooks",
            Setting::Privileged => "privileged mode",
            Setting::HostMount => "host mounts",
            Setting::Capability => "added capabilities",
            Setting::Device => "host devices",
            Setting::HostNamespace => "host namespaces",
        }
    }

    /// Its key in the JSON summary.
    pub fn key(self) -> &'static str {
        match self {
            Setting::Hook => "hooks",
            Setting::Privileged => "privileged",
            Setting::HostMount => "host_mounts",
            Setting::Capability => "added_capabilities",
            Setting::Device => "devices",
            Setting::HostNamespace => "host_namespaces",
        }
    }
}

/// One security-relevant setting found in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What kind of setting.
    pub setting: Setting,
    /// What exactly (e.g. `prestart hook /bin/true`, `CAP_SYS_ADMIN`).
    pub detail: String,
}

/// podman's storage locations on this host, where podman's own bind-mount sources live.
#[derive(Debug, Clone, Default)]
pub struct StorageRoots {
    /// `store.graphRoot` (e.g. `/var/lib/containers/storage`).
    pub graph_root: PathBuf,
    /// `store.runRoot` (e.g. `/run/containers/storage`).
    pub run_root: PathBuf,
}

/// The security-relevant settings of an archive's container.
#[derive(Debug, Clone, Default)]
pub struct TrustReport {
    /// The image (`config.dump` `rootfsImageName`, else its ID).
    pub image: Option<String>,
    /// `uid:gid` the container's process runs as.
    pub user: Option<String>,
    /// What the archive asks for, in report order.
    pub findings: Vec<Finding>,
}

/// Reads the settings of `spec` (`spec.dump`) and `config` (`config.dump`).
///
/// # Errors
/// [`PodmanError::Archive`] ([`Error::Corrupt`]) when either is not a JSON object.
pub fn check_config(spec: &[u8], config: &[u8], roots: &StorageRoots) -> Result<TrustReport> {
    let parse = |what: &str, bytes: &[u8]| -> Result<Value> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(v) if v.is_object() => Ok(v),
            Ok(_) => Err(Error::Corrupt(format!("{what} is not a JSON object")).into()),
            Err(e) => Err(Error::Corrupt(format!("{what} is not JSON: {e}")).into()),
        }
    };
    let spec = parse("spec.dump", spec)?;
    let config = parse("config.dump", config)?;
    let mut c = Checker {
        config: &config,
        roots,
        id: config["id"].as_str().unwrap_or(""),
        findings: Vec::new(),
    };
    c.check_spec(&spec);
    // podman 4.3 replaces config.dump's copy of the spec by spec.dump; another version
    // might not, so it has to pass too.
    if config["spec"].is_object() {
        c.check_spec(&config["spec"]);
    }
    c.check_libpod_config();
    let mut findings = c.findings;
    findings.sort_by_key(|f| f.setting);
    let user = spec["process"]["user"].as_object().map(|u| {
        format!(
            "{}:{}",
            u.get("uid").and_then(Value::as_u64).unwrap_or(0),
            u.get("gid").and_then(Value::as_u64).unwrap_or(0)
        )
    });
    let image = ["rootfsImageName", "rootfsImageID", "rootfs"]
        .iter()
        .find_map(|k| config[*k].as_str().filter(|s| !s.is_empty()))
        .map(String::from);
    Ok(TrustReport {
        image,
        user,
        findings,
    })
}

struct Checker<'a> {
    config: &'a Value,
    roots: &'a StorageRoots,
    /// The container ID the archive's podman paths are named after.
    id: &'a str,
    findings: Vec<Finding>,
}

fn strs(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

/// `CAP_X` for `x`, `X` or `CAP_X`.
fn cap_name(c: &str) -> String {
    let up = c.trim().to_ascii_uppercase();
    if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    }
}

impl Checker<'_> {
    fn add(&mut self, setting: Setting, detail: impl Into<String>) {
        let f = Finding {
            setting,
            detail: detail.into(),
        };
        if !self.findings.contains(&f) {
            self.findings.push(f);
        }
    }

    fn check_spec(&mut self, spec: &Value) {
        self.check_hooks(&spec["hooks"]);
        let process = &spec["process"];
        let linux = &spec["linux"];
        // Capabilities: every set counts (bounding limits what the process can regain).
        let mut added: Vec<String> = [
            "bounding",
            "effective",
            "inheritable",
            "permitted",
            "ambient",
        ]
        .iter()
        .flat_map(|set| strs(&process["capabilities"][*set]))
        .map(cap_name)
        .filter(|c| {
            !DEFAULT_CAPABILITIES.contains(&c.as_str())
                && !BUILTIN_DEFAULT_CAPABILITIES.contains(&c.as_str())
        })
        .collect();
        added.sort();
        added.dedup();
        for c in added {
            self.add(Setting::Capability, c);
        }
        // Privileged mode, piece by piece.
        if linux["seccomp"].is_null() {
            self.add(Setting::Privileged, "no seccomp filter");
        }
        if process["apparmorProfile"].as_str() == Some("unconfined") {
            self.add(Setting::Privileged, "AppArmor unconfined");
        }
        if let Some(label) = process["selinuxLabel"].as_str() {
            if label.contains(":spc_t") || label.contains(":unconfined_t") {
                self.add(Setting::Privileged, format!("SELinux label {label}"));
            }
        }
        let empty = |v: &Value| v.as_array().is_none_or(Vec::is_empty);
        if empty(&linux["maskedPaths"]) && empty(&linux["readonlyPaths"]) {
            self.add(Setting::Privileged, "/proc and /sys paths not masked");
        }
        // Devices.
        for d in linux["devices"].as_array().into_iter().flatten() {
            self.add(Setting::Device, device(d));
        }
        for rule in linux["resources"]["devices"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if rule["allow"].as_bool() == Some(true) {
                let kind = rule["type"].as_str().unwrap_or("a");
                let num = |k: &str| rule[k].as_i64().map_or("*".to_string(), |n| n.to_string());
                let what = if kind == "a" && rule["major"].is_null() {
                    "all devices".to_string()
                } else {
                    format!("{kind} {}:{}", num("major"), num("minor"))
                };
                self.add(
                    Setting::Device,
                    format!(
                        "device cgroup allows {what} ({})",
                        rule["access"].as_str().unwrap_or("rwm")
                    ),
                );
            }
        }
        // Namespaces.
        let namespaces: Vec<&Value> = linux["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        for ns in OWN_NAMESPACES {
            if !namespaces.iter().any(|n| n["type"].as_str() == Some(ns)) {
                self.add(Setting::HostNamespace, format!("host {ns} namespace"));
            }
        }
        for n in &namespaces {
            let kind = n["type"].as_str().unwrap_or("?");
            let Some(path) = n["path"].as_str().filter(|p| !p.is_empty()) else {
                continue;
            };
            // podman puts the network namespace it creates in place of this one.
            if kind == "network" && self.config["createNetNS"].as_bool() == Some(true) {
                continue;
            }
            self.add(
                Setting::HostNamespace,
                format!("{kind} namespace joined at {path}"),
            );
        }
        // Mounts.
        for m in spec["mounts"].as_array().into_iter().flatten() {
            self.check_mount(m);
        }
    }

    fn check_hooks(&mut self, hooks: &Value) {
        match hooks {
            Value::Null => {}
            Value::Object(stages) => {
                for (stage, list) in stages {
                    let Some(list) = list.as_array() else {
                        self.add(Setting::Hook, format!("{stage} hooks (malformed)"));
                        continue;
                    };
                    for h in list {
                        if stage == "prestart" && crate::hook::is_own_hook(h) {
                            continue;
                        }
                        let mut cmd = h["path"].as_str().unwrap_or("?").to_string();
                        for a in strs(&h["args"]).skip(1) {
                            cmd.push(' ');
                            cmd.push_str(a);
                        }
                        if cmd.len() > 120 {
                            let mut end = 117;
                            while !cmd.is_char_boundary(end) {
                                end -= 1;
                            }
                            cmd.truncate(end);
                            cmd.push_str("...");
                        }
                        self.add(Setting::Hook, format!("{stage} hook {cmd}"));
                    }
                }
            }
            _ => self.add(Setting::Hook, "hooks (malformed)"),
        }
    }

    fn check_mount(&mut self, m: &Value) {
        let dest = m["destination"].as_str().unwrap_or("?");
        let kind = m["type"].as_str().unwrap_or("");
        let source = m["source"].as_str().unwrap_or("");
        let options: Vec<&str> = strs(&m["options"]).collect();
        let bind = kind == "bind" || options.iter().any(|o| *o == "bind" || *o == "rbind");
        if PODMAN_REPLACED_MOUNTS.contains(&dest) {
            return;
        }
        if bind {
            if !self.podman_own_source(dest, source) {
                self.add(Setting::HostMount, format!("{source} at {dest} (bind)"));
            }
            return;
        }
        if !KERNEL_MOUNTS.contains(&kind) {
            self.add(
                Setting::HostMount,
                format!(
                    "{} mount of {source} at {dest}",
                    if kind.is_empty() { "untyped" } else { kind }
                ),
            );
            return;
        }
        let writable = !options.contains(&"ro");
        if kind == "sysfs" && writable {
            self.add(Setting::Privileged, format!("writable {dest}"));
        }
        if (kind == "cgroup" || kind == "cgroup2") && writable {
            self.add(Setting::Privileged, format!("writable {dest}"));
        }
    }

    /// `<graph or run root>/overlay-containers/<id>/userdata/<file>`.
    fn userdata_file(&self, source: &Path, file: &str) -> bool {
        !self.id.is_empty()
            && [&self.roots.graph_root, &self.roots.run_root]
                .iter()
                .filter(|r| !r.as_os_str().is_empty())
                .any(|r| {
                    source
                        == r.join("overlay-containers")
                            .join(self.id)
                            .join("userdata")
                            .join(file)
                })
    }

    /// A bind-mount source podman itself provides for this container: its per-container
    /// files, or the data directory of a named volume it recreates.
    fn podman_own_source(&self, dest: &str, source: &str) -> bool {
        let source = Path::new(source);
        if !source.is_absolute()
            || source.components().any(|c| {
                !matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::RootDir
                )
            })
            || source
                .as_os_str()
                .as_encoded_bytes()
                .windows(2)
                .any(|w| w == b"//")
        {
            return false;
        }
        if let Some((_, file)) = PODMAN_OWN_FILES.iter().find(|(d, _)| *d == dest) {
            return self.userdata_file(source, file);
        }
        let volumes = self.roots.graph_root.join("volumes");
        self.config["namedVolumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["volumeName"].as_str())
            .filter(|n| !n.is_empty() && !n.contains('/') && *n != "." && *n != "..")
            .any(|n| {
                !self.roots.graph_root.as_os_str().is_empty()
                    && source == volumes.join(n).join("_data")
            })
    }

    fn check_libpod_config(&mut self) {
        let config = self.config;
        if config["privileged"].as_bool() == Some(true) {
            self.add(Setting::Privileged, "privileged: true in config.dump");
        }
        if config["mountAllDevices"].as_bool() == Some(true) {
            self.add(Setting::Privileged, "all host devices (mountAllDevices)");
        }
        if let Some(root) = config["rootfs"].as_str().filter(|r| !r.is_empty()) {
            self.add(
                Setting::HostMount,
                format!("host directory {root} as the root filesystem"),
            );
        }
        // Host paths podman unmounts when the container stops or is removed: only the
        // container's own /dev/shm belongs there.
        for m in strs(&config["mounts"]) {
            if !self.userdata_file(Path::new(m), "shm") {
                self.add(
                    Setting::HostMount,
                    format!("{m} (config.dump mounts: podman unmounts it on cleanup)"),
                );
            }
        }
        for v in config["overlayVolumes"].as_array().into_iter().flatten() {
            self.add(
                Setting::HostMount,
                format!(
                    "{} at {} (overlay volume)",
                    v["source"].as_str().unwrap_or("?"),
                    v["dest"].as_str().unwrap_or("?")
                ),
            );
        }
        for d in config["device_host_src"].as_array().into_iter().flatten() {
            self.add(Setting::Device, device(d));
        }
        for d in strs(&config["cdiDevices"]) {
            self.add(Setting::Device, format!("CDI device {d}"));
        }
    }
}

/// `PATH (TYPE MAJOR:MINOR)` of an OCI `LinuxDevice`.
fn device(d: &Value) -> String {
    format!(
        "{} ({} {}:{})",
        d["path"].as_str().unwrap_or("?"),
        d["type"].as_str().unwrap_or("?"),
        d["major"].as_i64().unwrap_or(-1),
        d["minor"].as_i64().unwrap_or(-1)
    )
}

/// Why a restore goes ahead despite findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The archive asks for nothing.
    NotNeeded,
    /// The archive is signed by a trusted key.
    Signature,
    /// The user passed `--trust-config`.
    TrustConfig,
}

impl Trust {
    /// As the summary shows it.
    pub fn name(self) -> &'static str {
        match self {
            Trust::NotNeeded => "not needed",
            Trust::Signature => "trusted signature",
            Trust::TrustConfig => "--trust-config",
        }
    }
}

impl TrustReport {
    /// The archive asks for nothing security-relevant.
    pub fn is_ordinary(&self) -> bool {
        self.findings.is_empty()
    }

    /// The findings of one kind.
    pub fn of(&self, setting: Setting) -> impl Iterator<Item = &str> {
        self.findings
            .iter()
            .filter(move |f| f.setting == setting)
            .map(|f| f.detail.as_str())
    }

    /// What the archive asks for, e.g. `OCI hooks (prestart hook /bin/true), added
    /// capabilities (CAP_SYS_ADMIN)`; empty when nothing.
    pub fn asks_for(&self) -> String {
        Setting::ALL
            .iter()
            .filter_map(|&s| {
                let items: Vec<&str> = self.of(s).collect();
                if items.is_empty() {
                    return None;
                }
                let mut list = items.iter().take(6).copied().collect::<Vec<_>>().join(", ");
                if items.len() > 6 {
                    list.push_str(&format!(" and {} more", items.len() - 6));
                }
                Some(format!("{} ({list})", s.label()))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One line for the user, shown on every restore.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "container config: image {}, user {}",
            self.image.as_deref().unwrap_or("?"),
            self.user.as_deref().unwrap_or("?")
        );
        if self.is_ordinary() {
            s.push_str(
                "; podman's default capabilities, own namespaces, no host mounts, devices or hooks, not privileged",
            );
        } else {
            s.push_str("; asks for ");
            s.push_str(&self.asks_for());
        }
        s
    }

    /// The summary as JSON: image, user and one list per [`Setting::key`].
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("image".into(), self.image.clone().into());
        m.insert("user".into(), self.user.clone().into());
        for s in Setting::ALL {
            m.insert(
                s.key().into(),
                self.of(s).map(String::from).collect::<Vec<_>>().into(),
            );
        }
        Value::Object(m)
    }

    /// Whether the restore may go ahead: `Ok` with the reason, or the refusal
    /// ([`PodmanError::Untrusted`]) when the archive asks for anything and neither a
    /// trusted signature nor `--trust-config` vouches for it.
    ///
    /// # Errors
    /// [`PodmanError::Untrusted`], naming what the archive asks for.
    pub fn decide(&self, trusted_signature: bool, trust_config: bool) -> Result<Trust> {
        match self.refusal(trusted_signature, trust_config) {
            Some(e) => Err(e),
            None if self.is_ordinary() => Ok(Trust::NotNeeded),
            None if trusted_signature => Ok(Trust::Signature),
            None => Ok(Trust::TrustConfig),
        }
    }

    /// The refusal, if the restore must not go ahead (see [`TrustReport::decide`]).
    pub fn refusal(&self, trusted_signature: bool, trust_config: bool) -> Option<PodmanError> {
        if self.is_ordinary() || trusted_signature || trust_config {
            return None;
        }
        Some(PodmanError::Untrusted(format!(
            "refusing to restore: the archive asks for {}; pass --trust-config if you trust its origin",
            self.asks_for()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "3469b1d68f42b25c2b479005f607e8da67731498773ce05646c8cca053a2ad77";

    fn roots() -> StorageRoots {
        StorageRoots {
            graph_root: "/var/lib/containers/storage".into(),
            run_root: "/run/containers/storage".into(),
        }
    }

    fn caps() -> Value {
        json!(DEFAULT_CAPABILITIES)
    }

    /// What podman 4.3.1 exports for `podman run --network none IMAGE` (abridged).
    fn ordinary() -> (Value, Value) {
        let run = format!("/run/containers/storage/overlay-containers/{ID}/userdata");
        let lib = format!("/var/lib/containers/storage/overlay-containers/{ID}/userdata");
        let spec = json!({
            "process": {
                "user": {"uid": 0, "gid": 0},
                "capabilities": {"bounding": caps(), "effective": caps(), "permitted": caps()},
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "ro"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
                {"destination": "/etc/hostname", "type": "bind", "source": format!("{run}/hostname"), "options": ["bind", "rprivate"]},
                {"destination": "/etc/hosts", "type": "bind", "source": format!("{run}/hosts"), "options": ["bind"]},
                {"destination": "/dev/shm", "type": "bind", "source": format!("{lib}/shm"), "options": ["bind"]},
                {"destination": "/run/.containerenv", "type": "bind", "source": format!("{run}/.containerenv"), "options": ["bind"]},
                {"destination": "/etc/passwd", "type": "bind", "source": format!("{lib}/passwd"), "options": ["bind"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
            ],
            "linux": {
                "resources": {"devices": [{"allow": false, "access": "rwm"}]},
                "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
                "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"},
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"],
            },
        });
        let config = json!({
            "id": ID,
            "rootfsImageName": "localhost/ckstream-memtest:latest",
            "mounts": [format!("{lib}/shm")],
            "privileged": false,
            "createNetNS": false,
            "spec": {"process": spec["process"].clone(), "linux": spec["linux"].clone()},
        });
        (spec, config)
    }

    fn check(spec: &Value, config: &Value) -> TrustReport {
        check_config(
            &serde_json::to_vec(spec).unwrap(),
            &serde_json::to_vec(config).unwrap(),
            &roots(),
        )
        .unwrap()
    }

    fn details(r: &TrustReport, s: Setting) -> Vec<String> {
        r.of(s).map(String::from).collect()
    }

    #[test]
    fn an_ordinary_container_asks_for_nothing() {
        let (spec, config) = ordinary();
        let r = check(&spec, &config);
        assert!(r.is_ordinary(), "{:?}", r.findings);
        assert_eq!(r.decide(false, false).unwrap(), Trust::NotNeeded);
        assert_eq!(
            r.image.as_deref(),
            Some("localhost/ckstream-memtest:latest")
        );
        assert_eq!(r.user.as_deref(), Some("0:0"));
        assert!(r.summary().contains("no host mounts"), "{}", r.summary());
        // A bridge network: podman replaces the namespace path it created.
        let (mut spec, mut config) = ordinary();
        spec["linux"]["namespaces"][1]["path"] = json!("/run/netns/cni-1234");
        config["createNetNS"] = json!(true);
        assert!(check(&spec, &config).is_ordinary());
        // podman's built-in defaults (no containers.conf) are defaults too.
        let (mut spec, config) = ordinary();
        spec["process"]["capabilities"]["bounding"]
            .as_array_mut()
            .unwrap()
            .extend([
                json!("CAP_NET_RAW"),
                json!("CAP_MKNOD"),
                json!("CAP_AUDIT_WRITE"),
            ]);
        assert!(check(&spec, &config).is_ordinary());
    }

    #[test]
    fn ckstreams_own_hook_is_not_a_finding_but_any_other_is() {
        let (mut spec, config) = ordinary();
        let own = crate::hook::own_hook_for_test(
            "/run/ckstream/rootfs-1-0123456789abcdef.json",
            "/usr/bin/ckstream",
        );
        spec["hooks"] = json!({"prestart": [own.clone()]});
        assert!(check(&spec, &config).is_ordinary());
        spec["hooks"] =
            json!({"prestart": [own.clone(), {"path": "/bin/true", "args": ["true", "x"]}]});
        let r = check(&spec, &config);
        assert_eq!(details(&r, Setting::Hook), ["prestart hook /bin/true x"]);
        // ckstream's hook at another stage, or altered, is not ckstream's.
        spec["hooks"] = json!({"poststart": [own.clone()]});
        assert_eq!(details(&check(&spec, &config), Setting::Hook).len(), 1);
        let mut altered = own;
        altered["env"] = json!(["LD_PRELOAD=/tmp/x.so"]);
        spec["hooks"] = json!({"prestart": [altered]});
        assert_eq!(details(&check(&spec, &config), Setting::Hook).len(), 1);
        spec["hooks"] = json!("nonsense");
        assert_eq!(details(&check(&spec, &config), Setting::Hook).len(), 1);
    }

    #[test]
    fn privileged_and_its_parts_are_found() {
        let (spec, mut config) = ordinary();
        config["privileged"] = json!(true);
        let r = check(&spec, &config);
        assert_eq!(
            details(&r, Setting::Privileged),
            ["privileged: true in config.dump"]
        );
        let (mut spec, config) = ordinary();
        spec["linux"].as_object_mut().unwrap().remove("seccomp");
        spec["linux"]["maskedPaths"] = json!([]);
        spec["linux"]["readonlyPaths"] = json!([]);
        spec["process"]["apparmorProfile"] = json!("unconfined");
        spec["mounts"][2]["options"] = json!(["nosuid", "rw"]);
        let r = check(&spec, &config);
        assert_eq!(
            details(&r, Setting::Privileged),
            [
                "no seccomp filter",
                "AppArmor unconfined",
                "/proc and /sys paths not masked",
                "writable /sys"
            ]
        );
    }

    #[test]
    fn host_mounts_capabilities_devices_and_namespaces_are_found() {
        let (mut spec, mut config) = ordinary();
        let mounts = spec["mounts"].as_array_mut().unwrap();
        mounts.push(json!({"destination": "/mnt", "type": "bind", "source": "/srv/data", "options": ["rbind"]}));
        mounts.push(json!({"destination": "/x", "source": "/etc", "options": ["rbind", "ro"]}));
        mounts.push(json!({"destination": "/disk", "type": "ext4", "source": "/dev/sda1"}));
        // podman's own file names, but not this container's or not podman's storage.
        mounts.push(json!({"destination": "/etc/group", "type": "bind", "source": "/etc/shadow"}));
        mounts.push(json!({"destination": "/etc/localtime", "type": "bind",
            "source": format!("/var/lib/containers/storage/overlay-containers/{ID}/userdata/../../../../../etc/shadow")}));
        // Dropped by podman's restore whatever its source.
        mounts.push(json!({"destination": "/etc/hosts", "type": "bind", "source": "/etc/shadow"}));
        spec["process"]["capabilities"]["bounding"]
            .as_array_mut()
            .unwrap()
            .push(json!("CAP_SYS_ADMIN"));
        spec["process"]["capabilities"]["ambient"] = json!(["sys_ptrace"]);
        spec["linux"]["devices"] =
            json!([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]);
        spec["linux"]["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(json!({"allow": true, "access": "rwm"}));
        spec["linux"]["namespaces"] = json!([{"type": "pid", "path": "/proc/1/ns/pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
        config["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!("/home"));
        config["overlayVolumes"] = json!([{"source": "/srv/o", "dest": "/o"}]);
        config["rootfs"] = json!("/");
        let r = check(&spec, &config);
        assert_eq!(
            details(&r, Setting::HostMount),
            [
                "/srv/data at /mnt (bind)",
                "/etc at /x (bind)",
                "ext4 mount of /dev/sda1 at /disk",
                "/etc/shadow at /etc/group (bind)",
                &format!("/var/lib/containers/storage/overlay-containers/{ID}/userdata/../../../../../etc/shadow at /etc/localtime (bind)"),
                "host directory / as the root filesystem",
                "/home (config.dump mounts: podman unmounts it on cleanup)",
                "/srv/o at /o (overlay volume)",
            ]
        );
        assert_eq!(
            details(&r, Setting::Capability),
            ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]
        );
        assert_eq!(
            details(&r, Setting::Device),
            ["/dev/sda (b 8:0)", "device cgroup allows all devices (rwm)"]
        );
        assert_eq!(
            details(&r, Setting::HostNamespace),
            [
                "host network namespace",
                "pid namespace joined at /proc/1/ns/pid"
            ]
        );
        let refusal = r.refusal(false, false).unwrap().to_string();
        assert!(
            refusal.starts_with(
                "refusing to restore: the archive asks for host mounts (/srv/data at /mnt (bind)"
            ),
            "{refusal}"
        );
        assert!(
            refusal.contains("added capabilities (CAP_SYS_ADMIN, CAP_SYS_PTRACE)"),
            "{refusal}"
        );
        assert!(
            refusal.ends_with("; pass --trust-config if you trust its origin"),
            "{refusal}"
        );
        assert!(r.refusal(false, false).unwrap().is_untrusted_archive());
        assert_eq!(r.decide(false, true).unwrap(), Trust::TrustConfig);
        assert_eq!(r.decide(true, false).unwrap(), Trust::Signature);
        let j = r.to_json();
        assert_eq!(
            j["added_capabilities"],
            json!(["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"])
        );
        assert_eq!(j["hooks"], json!([]));
    }

    #[test]
    fn named_volumes_bind_from_podmans_volume_directory() {
        let (mut spec, mut config) = ordinary();
        config["namedVolumes"] = json!([{"volumeName": "data", "dest": "/data"}]);
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/data", "type": "bind",
            "source": "/var/lib/containers/storage/volumes/data/_data", "options": ["rbind"]}));
        assert!(check(&spec, &config).is_ordinary());
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/other", "type": "bind",
            "source": "/var/lib/containers/storage/volumes/other/_data", "options": ["rbind"]}));
        assert_eq!(check(&spec, &config).findings.len(), 1);
    }

    #[test]
    fn malformed_dumps_are_corrupt() {
        let (spec, _) = ordinary();
        let spec = serde_json::to_vec(&spec).unwrap();
        for bad in [&b"[]"[..], b"not json"] {
            let e = check_config(&spec, bad, &roots()).unwrap_err();
            assert!(matches!(e, PodmanError::Archive(Error::Corrupt(_))), "{e}");
        }
    }
}
