//! What a mount is: the image, store, cache and options a worker serves it with. Handed from
//! process to process (holder, workers, replacement holders), so it is plain serialisable data.

use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use phoenixfs_cache::FetchPolicy;

use crate::passthrough::PassthroughConfig;
use phoenixfs_store::{ChunkStore, StoreError, StoreUrl};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prefetch {
    Nothing,
    All,
    /// Paths inside the image.
    Paths(Vec<String>),
}

/// Everything a worker needs to serve a mount, from the holder: serialisable, so a new
/// process (a restarted worker, a new binary) can be given it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// An image file path or an image id in `store` (see `phoenixfs_store::load_image`).
    pub image: String,
    /// The store's URL (a `phoenixfs_store::StoreUrl`; a local one absolute).
    pub store: String,
    /// Copies of the store, tried in turn when it fails.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Fail a read whose chunk the store cannot deliver for this long (None: wait forever).
    #[serde(default)]
    pub fetch_deadline_ms: Option<u64>,
    pub cache_dir: PathBuf,
    pub cache_limit: u64,
    /// Bytes of chunk memory shared by the mount's worker generations (0: none).
    pub memory_limit: u64,
    pub mountpoint: PathBuf,
    pub threads: usize,
    pub readahead: u64,
    pub prefetch: Prefetch,
    pub allow_other: bool,
    /// Show a prefetch progress line on stderr.
    pub progress: bool,
    /// The uid that mounted: it (and root) may use the mount's sockets.
    pub owner_uid: u32,
    /// How many -v the daemon's processes log with.
    pub log_level: u8,
    /// Files at least this large are read in passthrough mode once cached (0: never).
    #[serde(default)]
    pub passthrough_min: u64,
    /// Bytes of passthrough copies kept in the cache directory (0: no passthrough).
    #[serde(default)]
    pub passthrough_budget: u64,
    /// Passthrough only if the image's files are mostly large (decided when mounting).
    #[serde(default)]
    pub passthrough_auto: bool,
}

impl MountSpec {
    /// The store and its mirrors, opened without a request.
    pub fn open_store(&self) -> Result<Arc<dyn ChunkStore>, StoreError> {
        open_store(&self.store, &self.mirrors)
    }

    /// Whether to ask the kernel for passthrough opens, and for which files.
    pub fn passthrough(&self) -> Option<PassthroughConfig> {
        (self.passthrough_min > 0 && self.passthrough_budget > 0).then_some(PassthroughConfig { min_size: self.passthrough_min, budget: self.passthrough_budget })
    }

    pub fn fetch_policy(&self) -> FetchPolicy {
        FetchPolicy { deadline: self.fetch_deadline_ms.map(Duration::from_millis) }
    }
}

/// Opens the store `store` names, with its mirrors.
pub fn open_store(store: &str, mirrors: &[String]) -> Result<Arc<dyn ChunkStore>, StoreError> {
    let urls = std::iter::once(store).chain(mirrors.iter().map(String::as_str)).map(str::parse).collect::<Result<Vec<StoreUrl>, _>>()?;
    phoenixfs_store::open_all(&urls)
}

#[cfg(test)]
impl MountSpec {
    pub(crate) fn for_tests() -> Self {
        MountSpec {
            image: "image.phx".into(),
            store: "/store".into(),
            mirrors: vec!["http://127.0.0.1:1/store".into()],
            fetch_deadline_ms: Some(30_000),
            cache_dir: "/cache".into(),
            cache_limit: 1 << 30,
            memory_limit: 1 << 20,
            mountpoint: "/mnt".into(),
            threads: 4,
            readahead: 1 << 20,
            prefetch: Prefetch::Paths(vec!["a".into()]),
            allow_other: true,
            progress: false,
            owner_uid: 0,
            log_level: 1,
            passthrough_min: 1 << 20,
            passthrough_budget: 1 << 30,
            passthrough_auto: false,
        }
    }
}
