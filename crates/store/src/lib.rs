//! Chunk stores: where chunk objects and image files live.
//!
//! Owns: the [`ChunkStore`] trait (a few self-describing, idempotent operations keyed by
//! digest, so that any process can repeat any request), the store URLs users name stores by
//! ([`StoreUrl`]), and the backends: the local directory, S3 and plain HTTP (through
//! `object_store`), OCI registries, and mirrors of one store tried in turn. Also the check that a store holds
//! every chunk of an image, verified.
//!
//! Every failure says whether asking again may help ([`StoreError::is_definite`]): a store
//! that is down, slow or answering garbage is an outage the caller waits out, a healthy
//! store's "no such object" is an answer.
//!
//! Must never: hand out a chunk it has not verified when asked to verify, leave a partly
//! written object under its final name, retry inside a backend (the caller owns the retry policy),
//! or know about mounts, FUSE or cachefiles. (A tool that wants bounded patience wraps a
//! store in [`Patient`].)

mod image;
mod local;
mod transport;
mod memory;
mod mirrors;
mod oci;
mod patient;
mod remote;
mod url;
mod verify;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use phoenixfs_format::{ChunkEntry, ImageId};
use thiserror::Error;

pub use image::{load_image, ImageLoadError};
pub use local::LocalStore;
pub use memory::MemoryStore;
pub use mirrors::Mirrors;
pub use oci::{BlobStream, OciStore};
pub use patient::Patient;
pub use remote::RemoteStore;
pub use url::StoreUrl;
pub use verify::{verify_chunks, ChunkProblem};

/// Why a store could not answer; each kind is counted apart in a mount's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Nobody answered: connection refused or reset, DNS, a local directory that is gone.
    Unreachable,
    /// A request took longer than its timeout.
    Timeout,
    /// The server answered 5xx.
    ServerError,
    /// The server asked us to slow down (429, 503 SlowDown).
    Throttled,
    /// The answer ended early or could not be read.
    Truncated,
    /// Anything else the store may get over (a local I/O error, an unexpected status).
    Other,
}

impl Outage {
    pub fn name(self) -> &'static str {
        match self {
            Outage::Unreachable => "unreachable",
            Outage::Timeout => "timeout",
            Outage::ServerError => "server_error",
            Outage::Throttled => "throttled",
            Outage::Truncated => "truncated",
            Outage::Other => "other",
        }
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{what} {key} is not in store {store}")]
    NotFound { store: String, what: &'static str, key: String },
    #[error("{action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("store {store}: {detail}")]
    Unavailable { store: String, outage: Outage, detail: String },
    #[error("store {store} is read-only ({why})")]
    ReadOnly { store: String, why: &'static str },
    #[error("store {url}: {detail}")]
    BadUrl { url: String, detail: String },
    /// The store refused us (credentials), or cannot hold what was asked.
    #[error("store {store}: {detail}")]
    Denied { store: String, detail: String },
}

impl StoreError {
    /// True when asking again cannot change the answer: a healthy store's "not there", a
    /// read-only store, a bad URL. Everything else is an outage to wait out.
    pub fn is_definite(&self) -> bool {
        matches!(self, StoreError::NotFound { .. } | StoreError::ReadOnly { .. } | StoreError::BadUrl { .. } | StoreError::Denied { .. })
    }

    /// A short name of the kind of failure, for counters.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::Io { .. } => "io",
            StoreError::Unavailable { outage, .. } => outage.name(),
            StoreError::ReadOnly { .. } => "read_only",
            StoreError::BadUrl { .. } => "bad_url",
            StoreError::Denied { .. } => "denied",
        }
    }
}

/// A content-addressed store of chunk objects and image files. Every operation names its
/// object completely; puts are idempotent (same key, same content).
pub trait ChunkStore: Send + Sync {
    /// A human-readable location, for messages.
    fn location(&self) -> String;
    /// The stored bytes of a chunk, as written by `put_chunk` (not decoded, not verified).
    /// A store finds it by the chunk's digest, or (one that names objects by content) by
    /// the digest of its stored bytes.
    fn get_chunk(&self, chunk: &ChunkEntry) -> Result<Vec<u8>, StoreError>;
    /// The stored length of a chunk, or None when the store does not have it.
    fn chunk_len(&self, chunk: &ChunkEntry) -> Result<Option<u64>, StoreError>;
    fn put_chunk(&self, chunk: &ChunkEntry, stored: &[u8]) -> Result<(), StoreError>;
    fn get_image(&self, id: &ImageId) -> Result<Vec<u8>, StoreError>;
    /// Stores an image file durably; chunks put before are durable first.
    fn put_image(&self, id: &ImageId, image_file: &[u8]) -> Result<(), StoreError>;
}

/// Opens the store `url` names, without touching it: a store that is down now is an outage
/// the first request waits out, not a failure to start. (`StoreUrl::parse` checked the URL.)
pub fn open(url: &StoreUrl) -> Result<Arc<dyn ChunkStore>, StoreError> {
    Ok(match url {
        StoreUrl::Local(root) => Arc::new(LocalStore::at(root)),
        StoreUrl::Oci { host, repository } => Arc::new(OciStore::open(&url.to_string(), host, repository)?),
        remote => Arc::new(RemoteStore::open(remote)?),
    })
}

/// Opens a store and its mirrors: reads try each in turn, writes go to the first.
pub fn open_all(urls: &[StoreUrl]) -> Result<Arc<dyn ChunkStore>, StoreError> {
    match urls {
        [one] => open(one),
        _ => Ok(Arc::new(Mirrors::new(urls.iter().map(open).collect::<Result<_, _>>()?))),
    }
}
