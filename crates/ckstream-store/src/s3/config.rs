//! Client configuration: the AWS environment variables and shared config files.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ckstream_format::{Error, Result};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{BackoffConfig, RetryConfig};

use super::DEFAULT_RETRY_SECS;

/// Settings of one profile from `~/.aws/credentials` and `~/.aws/config` (or the files
/// named by `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`).
fn profile_settings() -> HashMap<String, String> {
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let file = |var: &str, name: &str| {
        std::env::var_os(var)
            .map(std::path::PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    let mut out = HashMap::new();
    // The config file names sections `[profile NAME]` (but `[default]`); the
    // credentials file `[NAME]`. Credentials win, as in the AWS CLI.
    let config_section = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    for (path, section) in [
        (file("AWS_CONFIG_FILE", "config"), config_section),
        (
            file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            profile.clone(),
        ),
    ] {
        let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
            continue;
        };
        let mut inside = false;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                inside = name.trim() == section;
                continue;
            }
            if inside {
                if let Some((k, v)) = line.split_once('=') {
                    out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
        }
    }
    out
}

fn env_set(names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| std::env::var_os(n).is_some_and(|v| !v.is_empty()))
}

/// Resolves the endpoint the store will use, for the loopback check.
fn endpoint(profile: &HashMap<String, String>) -> Option<String> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        .or_else(|| profile.get("endpoint_url").cloned())
}

/// True for a plain-HTTP endpoint on this machine: `localhost`, or a host that parses as
/// a loopback IP address (`127.0.0.0/8`, `[::1]`, `[::ffff:127.x.y.z]`), with an optional
/// port. Anything else, `http://127.evil.example` included, must use HTTPS.
fn is_loopback_http(url: &str) -> bool {
    let Some(scheme) = url.get(..7).filter(|s| s.eq_ignore_ascii_case("http://")) else {
        return false;
    };
    let rest = &url[scheme.len()..];
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // user:password@host: the host is after the last '@'.
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, port)) => (addr, port),
            None => return false,
        },
        // The port keeps its ':' (as after an IPv6 address's ']').
        None => match host_port.find(':') {
            Some(colon) => host_port.split_at(colon),
            None => (host_port, ""),
        },
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    if !port_ok {
        return false;
    }
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let is_v6 = host_port.starts_with('[');
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => !is_v6 && ip.is_loopback(),
        Ok(std::net::IpAddr::V6(ip)) => {
            is_v6 && (ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
        }
        Err(_) => false,
    }
}

/// A client for `bucket`, configured from the environment and the AWS config files.
///
/// # Errors
/// [`Error::Usage`] for an incomplete or invalid configuration.
pub(super) fn connect(bucket: &str) -> Result<Arc<AmazonS3>> {
    let profile = profile_settings();
    let has_credentials = env_set(&[
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_SKIP_SIGNATURE",
        "CKSTREAM_S3_USE_IMDS",
    ]) || profile.contains_key("aws_access_key_id");
    if !has_credentials {
        // Without this check object_store would ask the EC2 instance metadata service,
        // which off EC2 means a confusing error after a request to a link-local address.
        return Err(Error::Usage(format!(
            "no S3 credentials for bucket {bucket}: set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with ~/.aws/credentials); on EC2, set \
             CKSTREAM_S3_USE_IMDS=1 to use the instance role"
        )));
    }
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if !env_set(&["AWS_ACCESS_KEY_ID"]) {
        if let (Some(id), Some(secret)) = (
            profile.get("aws_access_key_id"),
            profile.get("aws_secret_access_key"),
        ) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
            if let Some(token) = profile.get("aws_session_token") {
                builder = builder.with_token(token);
            }
        }
    }
    if !env_set(&["AWS_REGION", "AWS_DEFAULT_REGION"]) {
        if let Some(region) = profile.get("region") {
            builder = builder.with_region(region);
        }
    }
    let endpoint = endpoint(&profile);
    if let Some(url) = &endpoint {
        if !env_set(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]) {
            builder = builder.with_endpoint(url);
        }
        if is_loopback_http(url) {
            builder = builder.with_allow_http(true);
        }
    }
    if !env_set(&["AWS_UNSIGNED_PAYLOAD"]) {
        // No SHA-256 pass over every part for the signature: TLS protects the bytes in
        // transit, and every chunk carries a BLAKE3 digest that readers check anyway.
        builder = builder.with_unsigned_payload(true);
    }
    let retry_secs = std::env::var("CKSTREAM_S3_RETRY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RETRY_SECS);
    builder = builder.with_retry(RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(retry_secs),
    });
    let store = builder
        .build()
        .map_err(|e| Error::Usage(format!("S3 configuration for bucket {bucket}: {e}")))?;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_endpoints_may_use_plain_http() {
        for url in [
            "http://127.0.0.1:8333",
            "http://127.0.0.1",
            "http://127.1.2.3:9000/bucket",
            "http://localhost:9000/",
            "http://LOCALHOST",
            "HTTP://127.0.0.1:8333",
            "http://[::1]",
            "http://[::1]:8333/",
            "http://[::ffff:127.0.0.1]:8333",
            "http://user:secret@127.0.0.1:8333",
        ] {
            assert!(is_loopback_http(url), "{url}");
        }
        for url in [
            "https://127.0.0.1:8333",
            "http://s3.example.com",
            "http://127.evil.example",
            "http://127.evil.example:8333",
            "http://127.0.0.1.evil.example",
            "http://localhost.evil.example",
            "http://127.0.0.1@evil.example",
            "http://[::1].evil.example",
            "http://[::1",
            "http://[::2]:8333",
            "http://10.0.0.1:8333",
            "http://127.0.0.1:port",
            "http://127.0.0.1:",
            "http://127.0.0.1:99999",
            "http://[127.0.0.1]",
            "http://::1",
            "http://0x7f.0.0.1",
            "http://2130706433",
            "http://",
        ] {
            assert!(!is_loopback_http(url), "{url}");
        }
    }
}
