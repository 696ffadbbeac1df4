//! The `config.dump` and `spec.dump` files of a podman checkpoint export,
//! produced without podman.
//!
//! An in-place `podman container checkpoint` does not write them; podman 4.3.1
//! writes them only in `prepareCheckpointExport` during `--export`:
//! - `config.dump` is libpod's `ContainerConfig` of the container as JSON. It is
//!   the `config` value of the container's bucket in libpod's BoltDB state
//!   (`ctr/<id>/config`; podman leaves the networks out of it when storing it),
//!   with `newNetworks` set to the container's networks from the DB
//!   (`ctr/<id>/networks`: network name → `PerNetworkOptions` JSON), minus the
//!   alias equal to the short container ID, which would be wrong after a restore
//!   under a new ID. Podman's `c.networks()` returns no networks unless the
//!   network mode is `bridge`, so other modes have no `newNetworks`.
//! - `spec.dump` is the OCI runtime spec: podman parses the bundle's
//!   `config.json` into runtime-spec's Go struct and writes it again. Podman
//!   wrote that `config.json` from the same struct, so the value is the file's
//!   (a field unknown to podman's runtime-spec version, added by another tool,
//!   would be dropped by podman but kept here).
//!
//! Nothing in `config.dump` is set at export time (in 4.3.1 the checkpoint
//! times live in the container *state*, not the config), so the values match
//! podman's exactly. Both are written here as indented JSON like podman's (key
//! order and HTML escaping differ; the JSON values are the same).
//!
//! Podman 5 keeps its state in SQLite by default; this module reads only the
//! BoltDB state that podman 4 uses.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value as Json};

use crate::boltdb::{BoltDb, BoltError, Value};

/// The BoltDB state file inside libpod's static directory.
pub const BOLT_STATE_FILE: &str = "bolt_state.db";

/// Podman's `NetworkMode` for containers attached to (CNI or netavark) networks.
const BRIDGE_NETWORK_MODE: &str = "bridge";
/// Length of the short container ID podman adds as a network alias.
const SHORT_ID_LEN: usize = 12;

/// Errors producing `config.dump`/`spec.dump` or locating podman's state.
#[derive(Debug, thiserror::Error)]
pub enum ConfigDumpError {
    /// Reading the BoltDB state failed.
    #[error(transparent)]
    Bolt(#[from] BoltError),
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// No container has this name, ID or ID prefix.
    #[error("no container with name or ID {0:?} in the podman state")]
    NoSuchContainer(String),
    /// More than one container ID starts with this prefix.
    #[error("{count} containers have IDs starting with {prefix:?}")]
    AmbiguousContainer {
        /// The prefix given.
        prefix: String,
        /// How many IDs match.
        count: usize,
    },
    /// The container bucket has no `config` value.
    #[error("container {0} has no config in the podman state")]
    MissingConfig(String),
    /// A value in the state or a file is not the JSON expected.
    #[error("{what} is not valid JSON: {source}")]
    BadJson {
        /// What was being parsed.
        what: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A JSON value has the wrong shape.
    #[error("{0}")]
    UnexpectedJson(String),
    /// The container uses a layout that podman converts (writing to its DB) on
    /// first use; let podman touch the container first (e.g. `podman inspect`).
    #[error("container {id} has a pre-podman-4 {what} layout that podman has not migrated yet")]
    NotMigrated {
        /// Container ID.
        id: String,
        /// Which part (port mappings, networks).
        what: &'static str,
    },
    /// Podman keeps its state in a database other than BoltDB.
    #[error("podman uses the {0} state database; only BoltDB (podman 4) is supported")]
    UnsupportedDatabase(String),
    /// `podman info` failed or did not report a graph root.
    #[error("asking podman for its storage location: {0}")]
    PodmanInfo(String),
}

/// Result of this module's functions.
pub type Result<T> = std::result::Result<T, ConfigDumpError>;

/// The bytes podman 4.3.1 would write to `config.dump` for `container_id`, read
/// from the BoltDB state at `db_path`.
///
/// # Errors
/// As [`BoltDb::open`] and [`config_dump_from_db`].
pub fn config_dump(db_path: &Path, container_id: &str) -> Result<Vec<u8>> {
    config_dump_from_db(&BoltDb::open(db_path)?, container_id)
}

/// [`config_dump`] on an already-read database.
///
/// # Errors
/// As [`config_dump_value`].
pub fn config_dump_from_db(db: &BoltDb, container_id: &str) -> Result<Vec<u8>> {
    to_indented_json(&config_dump_value(db, container_id)?)
}

/// The JSON value of `config.dump` for the container with full ID `container_id`.
///
/// # Errors
/// [`ConfigDumpError::NoSuchContainer`] if the ID has no container bucket,
/// [`ConfigDumpError::MissingConfig`], [`ConfigDumpError::BadJson`] or
/// [`ConfigDumpError::UnexpectedJson`] for a damaged config or network entry,
/// [`ConfigDumpError::NotMigrated`] for containers created by podman 3 that
/// podman has not converted yet, and bolt errors.
pub fn config_dump_value(db: &BoltDb, container_id: &str) -> Result<Json> {
    let container = container_bucket(db, container_id)?;
    let config_bytes = container
        .get(b"config")?
        .ok_or_else(|| ConfigDumpError::MissingConfig(container_id.to_string()))?;
    let mut config = parse_object(config_bytes, || {
        format!("config of container {container_id}")
    })?;

    // Podman converts old-style port mappings when loading the config; we only
    // know how to copy configs that need no conversion.
    let has = |key: &str| {
        config
            .get(key)
            .and_then(Json::as_array)
            .is_some_and(|ports| !ports.is_empty())
    };
    if has("portMappings") && !has("newPortMappings") {
        return Err(ConfigDumpError::NotMigrated {
            id: container_id.to_string(),
            what: "port mapping",
        });
    }

    let networks = if config.get("networkMode").and_then(Json::as_str) == Some(BRIDGE_NETWORK_MODE)
    {
        container_networks(&container, container_id)?
    } else {
        Map::new()
    };
    // `newNetworks` is `omitempty`: podman writes no key for no networks.
    if networks.is_empty() {
        config.remove("newNetworks");
    } else {
        config.insert("newNetworks".to_string(), Json::Object(networks));
    }
    Ok(Json::Object(config))
}

/// The networks of a bridge-mode container as podman's `prepareCheckpointExport`
/// records them: name → per-network options without the short-ID alias.
fn container_networks(
    container: &crate::boltdb::Bucket<'_>,
    container_id: &str,
) -> Result<Map<String, Json>> {
    let not_migrated = || ConfigDumpError::NotMigrated {
        id: container_id.to_string(),
        what: "network",
    };
    let Some(networks_bucket) = container.bucket(b"networks")? else {
        return Err(not_migrated());
    };
    let short_id = container_id.get(..SHORT_ID_LEN).ok_or_else(|| {
        ConfigDumpError::UnexpectedJson(format!(
            "container ID {container_id:?} is shorter than {SHORT_ID_LEN} characters"
        ))
    })?;
    let mut networks = Map::new();
    for (name, value) in networks_bucket.entries()? {
        let name = String::from_utf8_lossy(name).into_owned();
        let Value::Data(options) = value else {
            return Err(ConfigDumpError::UnexpectedJson(format!(
                "network {name:?} of container {container_id} is a bucket, not options"
            )));
        };
        // Podman 3 stored the container ID as the value; podman 4 rewrites it on first use.
        if options == container_id.as_bytes() {
            return Err(not_migrated());
        }
        let mut options = parse_object(options, || {
            format!("options of network {name:?} of container {container_id}")
        })?;
        let aliases = match options.remove("aliases") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(aliases)) => aliases,
            Some(other) => {
                return Err(ConfigDumpError::UnexpectedJson(format!(
                "aliases of network {name:?} of container {container_id} are not a list: {other}"
            )))
            }
        };
        let kept: Vec<Json> = aliases
            .into_iter()
            .filter(|alias| alias.as_str() != Some(short_id))
            .collect();
        // `aliases` is `omitempty` as well.
        if !kept.is_empty() {
            options.insert("aliases".to_string(), Json::Array(kept));
        }
        networks.insert(name, Json::Object(options));
    }
    Ok(networks)
}

/// The bytes podman 4.3.1 would write to `spec.dump`: the OCI spec in the
/// container bundle's `config.json`.
///
/// # Errors
/// [`ConfigDumpError::Io`] if `config.json` cannot be read and
/// [`ConfigDumpError::BadJson`] if it is not JSON.
pub fn spec_dump(bundle_dir: &Path) -> Result<Vec<u8>> {
    let path = bundle_dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|source| ConfigDumpError::Io {
        path: path.clone(),
        source,
    })?;
    let spec: Json = serde_json::from_slice(&bytes).map_err(|source| ConfigDumpError::BadJson {
        what: path.display().to_string(),
        source,
    })?;
    to_indented_json(&spec)
}

/// The container's bundle directory (libpod's per-container static dir,
/// `<graphroot>/overlay-containers/<id>/userdata`), where the in-place
/// checkpoint, `config.json` and the other exported files live.
///
/// # Errors
/// As [`config_dump_value`]'s container lookup, and
/// [`ConfigDumpError::UnexpectedJson`] if the config has no `staticDir`.
pub fn container_bundle_dir(db: &BoltDb, container_id: &str) -> Result<PathBuf> {
    let container = container_bucket(db, container_id)?;
    let config_bytes = container
        .get(b"config")?
        .ok_or_else(|| ConfigDumpError::MissingConfig(container_id.to_string()))?;
    let config = parse_object(config_bytes, || {
        format!("config of container {container_id}")
    })?;
    config
        .get("staticDir")
        .and_then(Json::as_str)
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| {
            ConfigDumpError::UnexpectedJson(format!(
                "config of container {container_id} has no staticDir"
            ))
        })
}

/// Resolves a container name, full ID or unique ID prefix to the full ID, as
/// podman does: a full ID first, then a name from the name registry, then an ID prefix.
///
/// # Errors
/// [`ConfigDumpError::NoSuchContainer`], [`ConfigDumpError::AmbiguousContainer`]
/// and bolt errors.
pub fn resolve_container_id(db: &BoltDb, name_or_id: &str) -> Result<String> {
    let no_such = || ConfigDumpError::NoSuchContainer(name_or_id.to_string());
    if name_or_id.is_empty() {
        return Err(no_such());
    }
    let containers = db.bucket(&[b"ctr"])?;
    if containers.bucket(name_or_id.as_bytes())?.is_some() {
        return Ok(name_or_id.to_string());
    }
    // The name registry holds pod names too; only IDs with a container bucket count.
    if let Some(id) = db.bucket(&[b"name-registry"])?.get(name_or_id.as_bytes())? {
        if containers.bucket(id)?.is_some() {
            return Ok(String::from_utf8_lossy(id).into_owned());
        }
    }
    let matches: Vec<&[u8]> = containers
        .keys()?
        .into_iter()
        .filter(|id| id.starts_with(name_or_id.as_bytes()))
        .collect();
    match matches.as_slice() {
        [] => Err(no_such()),
        [id] => Ok(String::from_utf8_lossy(id).into_owned()),
        _ => Err(ConfigDumpError::AmbiguousContainer {
            prefix: name_or_id.to_string(),
            count: matches.len(),
        }),
    }
}

/// Where podman 4 keeps its BoltDB state for a storage graph root, unless
/// `static_dir` is set in containers.conf (then it is `<static_dir>/bolt_state.db`).
pub fn db_path_for_graph_root(graph_root: &Path) -> PathBuf {
    graph_root.join("libpod").join(BOLT_STATE_FILE)
}

/// The BoltDB state location implied by `podman info --format json` output:
/// `<store.graphRoot>/libpod/bolt_state.db`.
///
/// # Errors
/// [`ConfigDumpError::BadJson`] if the output is not JSON,
/// [`ConfigDumpError::UnsupportedDatabase`] if podman reports a database
/// backend other than BoltDB (podman 5 defaults to SQLite), and
/// [`ConfigDumpError::PodmanInfo`] if `store.graphRoot` is missing.
pub fn db_path_from_podman_info(info_json: &[u8]) -> Result<PathBuf> {
    let info: Json =
        serde_json::from_slice(info_json).map_err(|source| ConfigDumpError::BadJson {
            what: "podman info output".to_string(),
            source,
        })?;
    // Podman 4.3 does not report the backend at all; it only has BoltDB.
    if let Some(backend) = info.pointer("/host/databaseBackend").and_then(Json::as_str) {
        if !backend.is_empty() && backend != "boltdb" {
            return Err(ConfigDumpError::UnsupportedDatabase(backend.to_string()));
        }
    }
    info.pointer("/store/graphRoot")
        .and_then(Json::as_str)
        .filter(|root| !root.is_empty())
        .map(|root| db_path_for_graph_root(Path::new(root)))
        .ok_or_else(|| ConfigDumpError::PodmanInfo("no store.graphRoot in podman info".to_string()))
}

/// Locates podman's BoltDB state by running `podman info --format json`
/// (pass global podman options such as `--root` in `podman_args`).
///
/// # Errors
/// [`ConfigDumpError::PodmanInfo`] if podman cannot be run, fails, or reports
/// no graph root, or if there is no state file where it should be (a
/// `static_dir` set in containers.conf moves it); the errors of
/// [`db_path_from_podman_info`].
pub fn find_db_path(podman_args: &[&str]) -> Result<PathBuf> {
    let output = Command::new("podman")
        .args(podman_args)
        .args(["info", "--format", "json"])
        .output()
        .map_err(|error| ConfigDumpError::PodmanInfo(format!("running podman: {error}")))?;
    if !output.status.success() {
        return Err(ConfigDumpError::PodmanInfo(format!(
            "podman info failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let path = db_path_from_podman_info(&output.stdout)?;
    if !path.is_file() {
        return Err(ConfigDumpError::PodmanInfo(format!(
            "no podman state at {} (is static_dir set in containers.conf?)",
            path.display()
        )));
    }
    Ok(path)
}

fn container_bucket<'db>(
    db: &'db BoltDb,
    container_id: &str,
) -> Result<crate::boltdb::Bucket<'db>> {
    db.bucket(&[b"ctr"])?
        .bucket(container_id.as_bytes())?
        .ok_or_else(|| ConfigDumpError::NoSuchContainer(container_id.to_string()))
}

/// Indented like podman's `json.MarshalIndent(v, "", "  ")`.
fn to_indented_json(value: &Json) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|source| ConfigDumpError::BadJson {
        what: "the dump being written".to_string(),
        source,
    })
}

fn parse_object(bytes: &[u8], what: impl Fn() -> String) -> Result<Map<String, Json>> {
    match serde_json::from_slice(bytes) {
        Ok(Json::Object(object)) => Ok(object),
        Ok(_) => Err(ConfigDumpError::UnexpectedJson(format!(
            "{} is not a JSON object",
            what()
        ))),
        Err(source) => Err(ConfigDumpError::BadJson {
            what: what(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boltdb::tests::{FileBuilder, Item};
    use serde_json::json;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const SHORT_ID: &str = "0123456789ab";

    /// A state with one container `web` (ID [`ID`]) holding `config` and, if
    /// given, a `networks` bucket with these (name, options) entries.
    fn state(config: Json, networks: Option<Vec<(&str, Vec<u8>)>>) -> BoltDb {
        let mut builder = FileBuilder::new(4096);
        builder.leaf(
            2,
            vec![
                (b"ctr", Item::BucketAt(3)),
                (
                    b"name-registry",
                    Item::InlineBucket(vec![(b"web".to_vec(), ID.as_bytes().to_vec())]),
                ),
            ],
        );
        builder.leaf(3, vec![(ID.as_bytes(), Item::BucketAt(4))]);
        let mut container = vec![(&b"config"[..], Item::Data(config.to_string().into_bytes()))];
        if let Some(networks) = networks {
            let entries = networks
                .into_iter()
                .map(|(name, options)| (name.as_bytes().to_vec(), options))
                .collect();
            container.push((b"networks", Item::InlineBucket(entries)));
        }
        builder.leaf(4, container);
        BoltDb::from_bytes(builder.build(2)).unwrap()
    }

    fn dump(db: &BoltDb) -> Result<Json> {
        let bytes = config_dump_from_db(db, ID)?;
        Ok(serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn bridge_networks_come_from_the_db_without_the_short_id_alias() {
        let db = state(
            json!({"id": ID, "networkMode": "bridge", "newNetworks": {"stale": {}}}),
            Some(vec![
                (
                    "front",
                    json!({"aliases": ["web", SHORT_ID, "db"], "interface_name": "eth0"})
                        .to_string()
                        .into_bytes(),
                ),
                (
                    "back",
                    json!({"aliases": [SHORT_ID], "interface_name": "eth1",
                           "static_ips": ["10.1.2.3"], "static_mac": "92:d0:c6:0a:29:33"})
                    .to_string()
                    .into_bytes(),
                ),
            ]),
        );
        assert_eq!(
            dump(&db).unwrap(),
            json!({
                "id": ID,
                "networkMode": "bridge",
                "newNetworks": {
                    "front": {"aliases": ["web", "db"], "interface_name": "eth0"},
                    "back": {"interface_name": "eth1", "static_ips": ["10.1.2.3"],
                             "static_mac": "92:d0:c6:0a:29:33"}
                }
            })
        );
        assert_eq!(resolve_container_id(&db, "web").unwrap(), ID);
    }

    #[test]
    fn other_network_modes_have_no_networks() {
        for mode in ["none", "host", "slirp4netns", "ns:/run/netns/x"] {
            let db = state(
                json!({"id": ID, "networkMode": mode, "newNetworks": {"x": {}}}),
                Some(vec![("podman", b"{}".to_vec())]),
            );
            assert_eq!(
                dump(&db).unwrap(),
                json!({"id": ID, "networkMode": mode}),
                "{mode}"
            );
        }
    }

    #[test]
    fn unmigrated_podman_3_layouts_are_refused() {
        let bridge = json!({"id": ID, "networkMode": "bridge"});
        let cases = [
            state(bridge.clone(), None),
            state(
                bridge.clone(),
                Some(vec![("podman", ID.as_bytes().to_vec())]),
            ),
            state(
                json!({"id": ID, "networkMode": "none",
                       "portMappings": [{"hostPort": 80, "containerPort": 80}]}),
                None,
            ),
        ];
        for db in cases {
            assert!(matches!(
                dump(&db),
                Err(ConfigDumpError::NotMigrated { .. })
            ));
        }
    }

    #[test]
    fn damaged_entries_are_reported() {
        let bridge = json!({"id": ID, "networkMode": "bridge"});
        let db = state(
            bridge.clone(),
            Some(vec![("podman", b"{not json".to_vec())]),
        );
        assert!(matches!(dump(&db), Err(ConfigDumpError::BadJson { .. })));
        let db = state(
            bridge,
            Some(vec![("podman", br#"{"aliases": "web"}"#.to_vec())]),
        );
        assert!(matches!(dump(&db), Err(ConfigDumpError::UnexpectedJson(_))));
        let db = state(json!(["not", "an", "object"]), None);
        assert!(matches!(dump(&db), Err(ConfigDumpError::UnexpectedJson(_))));
        assert!(matches!(
            container_bundle_dir(&state(json!({"id": ID}), None), ID),
            Err(ConfigDumpError::UnexpectedJson(_))
        ));
    }

    #[test]
    fn db_path_comes_from_podman_info() {
        let podman4 = br#"{"host": {}, "store": {"graphRoot": "/srv/storage"}}"#;
        assert_eq!(
            db_path_from_podman_info(podman4).unwrap(),
            Path::new("/srv/storage/libpod/bolt_state.db")
        );
        let podman5 = br#"{"host": {"databaseBackend": "sqlite"}, "store": {"graphRoot": "/x"}}"#;
        assert!(matches!(
            db_path_from_podman_info(podman5),
            Err(ConfigDumpError::UnsupportedDatabase(backend)) if backend == "sqlite"
        ));
        let bolt5 = br#"{"host": {"databaseBackend": "boltdb"}, "store": {"graphRoot": "/x"}}"#;
        assert!(db_path_from_podman_info(bolt5).is_ok());
        assert!(matches!(
            db_path_from_podman_info(br#"{"store": {}}"#),
            Err(ConfigDumpError::PodmanInfo(_))
        ));
        assert!(matches!(
            db_path_from_podman_info(b"nope"),
            Err(ConfigDumpError::BadJson { .. })
        ));
    }
}
