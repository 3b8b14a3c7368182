//! An in-memory store for tests: counts reads, and can be told to corrupt or slow them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use phoenixfs_format::{ChunkEntry, Digest, ImageId};

use crate::{ChunkStore, StoreError};

#[derive(Default)]
pub struct MemoryStore {
    chunks: Mutex<HashMap<Digest, Vec<u8>>>,
    images: Mutex<HashMap<ImageId, Vec<u8>>>,
    /// Chunk reads served so far.
    pub chunk_reads: AtomicU64,
    /// When set, every chunk read returns its bytes with the last one flipped.
    pub corrupt_reads: AtomicBool,
    /// Delay added to every chunk read, in milliseconds.
    pub read_delay_ms: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl ChunkStore for MemoryStore {
    fn location(&self) -> String {
        "memory".into()
    }

    fn get_chunk(&self, chunk: &ChunkEntry) -> Result<Vec<u8>, StoreError> {
        let digest = &chunk.digest;
        self.chunk_reads.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(self.read_delay_ms.load(Ordering::Relaxed)));
        let mut data = self.chunks.lock().expect("not poisoned").get(digest).cloned().ok_or_else(|| StoreError::NotFound {
            store: self.location(),
            what: "chunk",
            key: digest.to_hex(),
        })?;
        if self.corrupt_reads.load(Ordering::Relaxed) {
            if let Some(last) = data.last_mut() {
                *last ^= 1;
            }
        }
        Ok(data)
    }

    fn chunk_len(&self, chunk: &ChunkEntry) -> Result<Option<u64>, StoreError> {
        Ok(self.chunks.lock().expect("not poisoned").get(&chunk.digest).map(|d| d.len() as u64))
    }

    fn put_chunk(&self, chunk: &ChunkEntry, stored: &[u8]) -> Result<(), StoreError> {
        self.chunks.lock().expect("not poisoned").insert(chunk.digest, stored.to_vec());
        Ok(())
    }

    fn get_image(&self, id: &ImageId) -> Result<Vec<u8>, StoreError> {
        self.images.lock().expect("not poisoned").get(id).cloned().ok_or_else(|| StoreError::NotFound {
            store: self.location(),
            what: "image",
            key: id.to_string(),
        })
    }

    fn put_image(&self, id: &ImageId, image_file: &[u8]) -> Result<(), StoreError> {
        self.images.lock().expect("not poisoned").insert(*id, image_file.to_vec());
        Ok(())
    }
}
