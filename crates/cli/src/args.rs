//! Arguments several commands share: an `IMAGE` (a path to an image file, or an image id in a
//! store), a `--store` URL, a duration.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use phoenixfs_format::ImageFile;
use phoenixfs_store::{load_image, ChunkStore, LocalStore, Patient, StoreError, StoreUrl};

/// How long a command rides out a store outage before it gives up.
const COMMAND_PATIENCE: Duration = Duration::from_secs(120);

pub fn load(image: &str, store: Option<&dyn ChunkStore>) -> Result<ImageFile> {
    Ok(load_image(image, store)?)
}

/// A `--store` value: a URL whose scheme phoenixfs knows, a local path made absolute.
pub fn parse_store(text: &str) -> Result<StoreUrl, String> {
    text.parse::<StoreUrl>().and_then(StoreUrl::absolute).map_err(|e| e.to_string())
}

/// Opens a store to read: a local one must exist. Requests ride out outages for a while.
pub fn open_store(url: &StoreUrl) -> Result<Arc<dyn ChunkStore>> {
    patient(url, LocalStore::open)
}

/// Opens a store to write: a local one is created when missing.
pub fn create_store(url: &StoreUrl) -> Result<Arc<dyn ChunkStore>> {
    patient(url, LocalStore::create)
}

fn patient(url: &StoreUrl, open_local: fn(&Path) -> Result<LocalStore, StoreError>) -> Result<Arc<dyn ChunkStore>> {
    let store: Arc<dyn ChunkStore> = match url {
        StoreUrl::Local(root) => Arc::new(open_local(root)?),
        remote => phoenixfs_store::open(remote)?,
    };
    Ok(Arc::new(Patient::new(store, COMMAND_PATIENCE)))
}

/// A duration: a number with a unit, ms, s, m or h ("30s", "500ms", "2m").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration (like 30s, 500ms, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{text:?} is not a duration (like 30s, 500ms, 2m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_stores_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_store("s3://bucket/x").is_ok());
        let err = parse_store("gs://bucket/x").unwrap_err();
        assert!(err.contains("unknown scheme gs://"), "{err}");
        assert!(matches!(parse_store("rel").unwrap(), StoreUrl::Local(p) if p.is_absolute()));
    }
}
