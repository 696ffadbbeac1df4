//! Podman's `deleted.files`: a JSON list of absolute container paths, read from
//! archives that may be hostile.

use ckstream_format::{Error, Result};

/// Most paths we accept in one list (a real diff has far fewer).
const MAX_PATHS: usize = 1 << 20;

/// Parses and validates `deleted.files`: every path must be absolute and free of
/// `.`/`..`/empty components and NUL bytes, so it can only name something inside the
/// container's root.
///
/// # Errors
/// [`Error::Corrupt`] when it is not a JSON list of strings; [`Error::UnsafeEntry`]
/// naming the first unsafe path.
pub fn parse(json: &[u8]) -> Result<Vec<String>> {
    let paths: Vec<String> = serde_json::from_slice(json)
        .map_err(|e| Error::Corrupt(format!("deleted.files is not a JSON list of paths: {e}")))?;
    if paths.len() > MAX_PATHS {
        return Err(Error::Corrupt(format!(
            "deleted.files lists {} paths",
            paths.len()
        )));
    }
    for p in &paths {
        validate(p)?;
    }
    Ok(paths)
}

/// Checks one container path from `deleted.files`.
///
/// # Errors
/// [`Error::UnsafeEntry`] for a relative path or one that could leave the root.
pub fn validate(p: &str) -> Result<()> {
    let rel = p.strip_prefix('/').ok_or_else(|| {
        Error::UnsafeEntry(format!("deleted.files: {p:?} is not an absolute path"))
    })?;
    ckstream_format::index::validate_path(rel.as_bytes())
        .map_err(|e| Error::UnsafeEntry(format!("deleted.files: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_podman_lists_and_rejects_escapes() {
        let ok = parse(br#"["/data/delete-me.txt", "/opt/gone"]"#).unwrap();
        assert_eq!(ok.len(), 2);
        for bad in [
            r#"["/../etc/passwd"]"#,
            r#"["/a/../../b"]"#,
            r#"["relative"]"#,
            r#"["/a//b"]"#,
            r#"["/"]"#,
            r#"["/a/./b"]"#,
        ] {
            assert!(
                matches!(parse(bad.as_bytes()), Err(Error::UnsafeEntry(_))),
                "{bad}"
            );
        }
        assert!(matches!(parse(b"{\"a\":1}"), Err(Error::Corrupt(_))));
    }
}
