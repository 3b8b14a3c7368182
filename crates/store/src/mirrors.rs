//! Several copies of one store: reads (and existence checks) go to the one that answered last
//! and move on to the next when it fails; writes go to the first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use phoenixfs_format::{ChunkEntry, ImageId};

use crate::{ChunkStore, StoreError};

pub struct Mirrors {
    stores: Vec<Arc<dyn ChunkStore>>,
    /// The mirror that answered last: tried first.
    preferred: AtomicUsize,
}

impl Mirrors {
    pub fn new(stores: Vec<Arc<dyn ChunkStore>>) -> Self {
        assert!(!stores.is_empty(), "mirrors of no store");
        Mirrors { stores, preferred: AtomicUsize::new(0) }
    }

    /// Asks each mirror in turn, from the preferred one. "Not there" is the answer only when
    /// every mirror gives it; otherwise the last outage is.
    fn read<T>(&self, op: impl Fn(&dyn ChunkStore) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let start = self.preferred.load(Ordering::Relaxed);
        let mut not_found = None;
        let mut outage = None;
        for step in 0..self.stores.len() {
            let index = (start + step) % self.stores.len();
            match op(self.stores[index].as_ref()) {
                Ok(value) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(e @ StoreError::NotFound { .. }) => not_found = Some(e),
                Err(e) => outage = Some(e),
            }
        }
        Err(outage.or(not_found).expect("at least one mirror"))
    }
}

impl ChunkStore for Mirrors {
    fn location(&self) -> String {
        self.stores.iter().map(|s| s.location()).collect::<Vec<_>>().join(" | ")
    }

    fn get_chunk(&self, chunk: &ChunkEntry) -> Result<Vec<u8>, StoreError> {
        self.read(|store| store.get_chunk(chunk))
    }

    fn chunk_len(&self, chunk: &ChunkEntry) -> Result<Option<u64>, StoreError> {
        self.read(|store| match store.chunk_len(chunk) {
            Ok(Some(len)) => Ok(len),
            // Absent from one mirror is not absent from all: ask the next.
            Ok(None) => Err(StoreError::NotFound { store: store.location(), what: "chunk", key: chunk.digest.to_hex() }),
            Err(e) => Err(e),
        })
        .map(Some)
        .or_else(|e| match e {
            StoreError::NotFound { .. } => Ok(None),
            outage => Err(outage),
        })
    }

    fn put_chunk(&self, chunk: &ChunkEntry, stored: &[u8]) -> Result<(), StoreError> {
        self.stores[0].put_chunk(chunk, stored)
    }

    fn get_image(&self, id: &ImageId) -> Result<Vec<u8>, StoreError> {
        self.read(|store| store.get_image(id))
    }

    fn put_image(&self, id: &ImageId, image_file: &[u8]) -> Result<(), StoreError> {
        self.stores[0].put_image(id, image_file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::raw_chunk;
    use crate::{LocalStore, MemoryStore};

    #[test]
    fn a_mirror_that_is_down_is_passed_over_and_only_all_of_them_can_say_not_there() {
        let dir = tempfile::tempdir().unwrap();
        let down = Arc::new(LocalStore::at(&dir.path().join("missing")));
        let up = Arc::new(MemoryStore::new());
        let digest = raw_chunk(b"abc");
        up.put_chunk(&digest, b"abc").unwrap();
        let mirrors = Mirrors::new(vec![down, up.clone()]);
        assert_eq!(mirrors.get_chunk(&digest).unwrap(), b"abc");
        assert_eq!(mirrors.preferred.load(Ordering::Relaxed), 1);
        let absent = raw_chunk(b"xyz");
        let err = mirrors.get_chunk(&absent).unwrap_err();
        assert!(!err.is_definite(), "one mirror is down, so this is no answer: {err}");
        assert!(mirrors.chunk_len(&absent).is_err(), "one mirror is down: no answer");
        assert_eq!(mirrors.chunk_len(&digest).unwrap(), Some(3));
        let both_up = Mirrors::new(vec![up.clone(), up]);
        assert!(both_up.get_chunk(&absent).unwrap_err().is_definite());
        assert_eq!(both_up.chunk_len(&absent).unwrap(), None);
    }
}
