//! Store URLs: how users name a store.
//!
//! ```text
//! /path/to/store, file:///path          a local directory
//! s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME]
//! http://HOST[:PORT][/PATH], https://…  read-only, any static server of a store's files
//! oci://HOST[:PORT]/REPOSITORY           an OCI registry's repository (blobs by digest)
//! ```
//!
//! Remote stores lay objects out as the local one does (`chunks/ab/<hex>`, `images/<id>`), so a
//! local store copied to a bucket or served by a web server is a store as it is.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::StoreError;

const KNOWN: &str = "a local path, file://, s3://, oci://, http:// or https://";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Local(PathBuf),
    S3 {
        bucket: String,
        /// Without leading or trailing slashes; empty for the bucket's root.
        prefix: String,
        /// An S3-compatible server's URL (default: AWS, or `AWS_ENDPOINT_URL`).
        endpoint: Option<String>,
        region: Option<String>,
    },
    /// The base URL, without a trailing slash.
    Http(String),
    /// A registry (`host[:port]`) and a repository in it.
    Oci { host: String, repository: String },
}

impl StoreUrl {
    /// The same URL with a local path made absolute (without touching the file system), so
    /// that it means the same in a daemon started elsewhere.
    pub fn absolute(self) -> Result<Self, StoreError> {
        match self {
            StoreUrl::Local(path) => std::path::absolute(&path)
                .map(StoreUrl::Local)
                .map_err(|e| StoreError::BadUrl { url: path.display().to_string(), detail: e.to_string() }),
            other => Ok(other),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self, StoreUrl::Local(_))
    }
}

impl FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, StoreError> {
        let bad = |detail: String| StoreError::BadUrl { url: text.to_string(), detail };
        let Some((scheme, rest)) = split_scheme(text) else {
            if text.is_empty() {
                return Err(bad("empty store name".into()));
            }
            return Ok(StoreUrl::Local(text.into()));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => match rest {
                path if path.starts_with('/') => Ok(StoreUrl::Local(path.into())),
                _ => Err(bad("a file:// URL needs an absolute path (file:///path)".into())),
            },
            "s3" => {
                let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
                let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket (s3://BUCKET/PREFIX)".into()));
                }
                let (mut endpoint, mut region) = (None, None);
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    match pair.split_once('=') {
                        Some(("endpoint", value)) if !value.is_empty() => endpoint = Some(value.to_string()),
                        Some(("region", value)) if !value.is_empty() => region = Some(value.to_string()),
                        _ => return Err(bad(format!("unknown option {pair:?} (known: endpoint=URL, region=NAME)"))),
                    }
                }
                let prefix = prefix.trim_matches('/').to_string();
                Ok(StoreUrl::S3 { bucket: bucket.to_string(), prefix, endpoint, region })
            }
            "http" | "https" => match rest.split('/').next() {
                Some(host) if !host.is_empty() => Ok(StoreUrl::Http(text.trim_end_matches('/').to_string())),
                _ => Err(bad("no host".into())),
            },
            "oci" => match rest.trim_end_matches('/').split_once('/') {
                Some((host, repository)) if !host.is_empty() && !repository.is_empty() => {
                    let valid = repository.split('/').all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)));
                    match valid {
                        true => Ok(StoreUrl::Oci { host: host.to_string(), repository: repository.to_string() }),
                        false => Err(bad(format!("{repository:?} is not a repository name (lowercase letters, digits, . _ - and /)"))),
                    }
                }
                _ => Err(bad("an OCI store is oci://HOST[:PORT]/REPOSITORY".into())),
            },
            other => Err(bad(format!("unknown scheme {other}://; a store is {KNOWN}"))),
        }
    }
}

/// `scheme` and the rest of `scheme://rest`, when `text` starts like a URL.
fn split_scheme(text: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = text.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    let valid = first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c));
    valid.then_some((scheme, rest))
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Local(path) => write!(f, "{}", path.display()),
            StoreUrl::S3 { bucket, prefix, endpoint, region } => {
                write!(f, "s3://{bucket}")?;
                if !prefix.is_empty() {
                    write!(f, "/{prefix}")?;
                }
                let options: Vec<String> = [("endpoint", endpoint), ("region", region)]
                    .into_iter()
                    .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={v}")))
                    .collect();
                if !options.is_empty() {
                    write!(f, "?{}", options.join("&"))?;
                }
                Ok(())
            }
            StoreUrl::Http(base) => f.write_str(base),
            StoreUrl::Oci { host, repository } => write!(f, "oci://{host}/{repository}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Result<StoreUrl, String> {
        text.parse::<StoreUrl>().map_err(|e| e.to_string())
    }

    #[test]
    fn each_kind_parses_and_prints_back() {
        assert_eq!(parse("store").unwrap(), StoreUrl::Local("store".into()));
        assert_eq!(parse("file:///srv/store").unwrap(), StoreUrl::Local("/srv/store".into()));
        let s3 = parse("s3://bucket/a/b/?region=eu-west-1&endpoint=http://127.0.0.1:8333").unwrap();
        assert_eq!(
            s3,
            StoreUrl::S3 { bucket: "bucket".into(), prefix: "a/b".into(), endpoint: Some("http://127.0.0.1:8333".into()), region: Some("eu-west-1".into()) }
        );
        assert_eq!(s3.to_string(), "s3://bucket/a/b?endpoint=http://127.0.0.1:8333&region=eu-west-1");
        assert_eq!(parse("s3://bucket").unwrap().to_string(), "s3://bucket");
        assert_eq!(parse("http://127.0.0.1:8080/store/").unwrap(), StoreUrl::Http("http://127.0.0.1:8080/store".into()));
        let oci = parse("oci://127.0.0.1:5000/team/images/").unwrap();
        assert_eq!(oci, StoreUrl::Oci { host: "127.0.0.1:5000".into(), repository: "team/images".into() });
        assert_eq!(oci.to_string(), "oci://127.0.0.1:5000/team/images");
    }

    #[test]
    fn unknown_schemes_and_broken_urls_are_named() {
        let err = parse("gs://bucket/x").unwrap_err();
        assert!(err.contains("gs://") && err.contains("s3://") && err.contains("http://"), "{err}");
        assert!(parse("s3:///x").unwrap_err().contains("no bucket"));
        assert!(parse("s3://b/x?color=red").unwrap_err().contains("color=red"));
        assert!(parse("http:///x").unwrap_err().contains("no host"));
        assert!(parse("file://relative").unwrap_err().contains("absolute"));
        assert!(parse("oci://host").unwrap_err().contains("oci://HOST"));
        assert!(parse("oci://host/Upper").unwrap_err().contains("not a repository name"));
        assert!(parse("").is_err());
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_round_trips(text in "\\PC{0,60}") {
            if let Ok(url) = text.parse::<StoreUrl>() {
                let again: StoreUrl = url.to_string().parse().unwrap();
                prop_assert_eq!(again, url);
            }
        }
    }
}
