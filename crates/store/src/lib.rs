//! Chunk stores: where chunk objects and image files live.
//!
//! Owns: the [`ChunkStore`] trait (a few self-describing, idempotent operations keyed by
//! digest, so that any process can repeat any request) and its backends, for now the local
//! directory store. Also the check that a store holds every chunk of an image, verified.
//!
//! Must never: hand out a chunk it has not verified when asked to verify, leave a partly
//! written object under its final name, or know about mounts, FUSE or cachefiles.

mod image;
mod local;
mod memory;
mod verify;

use std::io;
use std::path::PathBuf;

use phoenixfs_format::{Digest, ImageId};
use thiserror::Error;

pub use image::{load_image, ImageLoadError};
pub use local::LocalStore;
pub use memory::MemoryStore;
pub use verify::{verify_chunks, ChunkProblem};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{what} {key} is not in store {store}")]
    NotFound { store: String, what: &'static str, key: String },
    #[error("{action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
}

/// A content-addressed store of chunk objects and image files. Every operation names its
/// object completely; puts are idempotent (same key, same content).
pub trait ChunkStore: Send + Sync {
    /// A human-readable location, for messages.
    fn location(&self) -> String;
    /// The stored bytes of a chunk, as written by `put_chunk` (not decoded, not verified).
    fn get_chunk(&self, digest: &Digest) -> Result<Vec<u8>, StoreError>;
    /// The stored length of a chunk, or None when the store does not have it.
    fn chunk_len(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;
    fn put_chunk(&self, digest: &Digest, stored: &[u8]) -> Result<(), StoreError>;
    fn get_image(&self, id: &ImageId) -> Result<Vec<u8>, StoreError>;
    /// Stores an image file durably; chunks put before are durable first.
    fn put_image(&self, id: &ImageId, image_file: &[u8]) -> Result<(), StoreError>;
}
