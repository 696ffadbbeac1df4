//! `s3://BUCKET/KEY` names.

use std::fmt;

use ckstream_format::{Error, Result};

use crate::ShardNames;
use object_store::path::Path as ObjectPath;

/// An object named by `s3://BUCKET/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// Bucket name.
    pub bucket: String,
    /// Object key of shard 0.
    pub key: String,
}

impl S3Url {
    /// Parses `s3://BUCKET/KEY`.
    ///
    /// # Errors
    /// [`Error::Usage`] when the bucket or key is missing or the key is not a valid
    /// object path (empty segments, a trailing `/`).
    pub fn parse(s: &str) -> Result<Self> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| Error::Usage(format!("{s}: not an s3:// URL")))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || key.is_empty() || key.ends_with('/') {
            return Err(Error::Usage(format!(
                "{s}: expected s3://BUCKET/NAME (with an object name after the bucket)"
            )));
        }
        ObjectPath::parse(key)
            .map_err(|e| Error::Usage(format!("{s}: not a valid object name: {e}")))?;
        Ok(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The object of shard `i`, named as local shards are ([`crate::shard_path`]): shard 0
    /// is the object itself.
    pub fn shard(&self, names: ShardNames, i: u32) -> S3Url {
        S3Url {
            bucket: self.bucket.clone(),
            key: format!("{}{}", self.key, names.suffix(i)),
        }
    }

    pub(crate) fn path(&self) -> ObjectPath {
        ObjectPath::parse(&self.key).expect("validated in S3Url::parse")
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = S3Url::parse("s3://bucket/dir/ckpt.cka").unwrap();
        assert_eq!(u.bucket, "bucket");
        assert_eq!(u.key, "dir/ckpt.cka");
        assert_eq!(
            u.shard(ShardNames::Indexed, 0).to_string(),
            "s3://bucket/dir/ckpt.cka"
        );
        assert_eq!(
            u.shard(ShardNames::Indexed, 3).to_string(),
            "s3://bucket/dir/ckpt.cka.3"
        );
        assert_eq!(
            u.shard(ShardNames::ById([0x11; 16]), 3).to_string(),
            "s3://bucket/dir/ckpt.cka.1111111111111111.3"
        );
        for bad in [
            "s3://",
            "s3://bucket",
            "s3://bucket/",
            "s3:///key",
            "s3://b/dir/",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
    }
}
