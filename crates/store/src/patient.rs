//! Bounded patience for tools: a store wrapper that asks again after an outage, for a while.
//!
//! Backends never retry on their own (a mount's chunk cache waits forever, by policy); a
//! build or a push should ride out a server restart too, but end with an error one day.

use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenixfs_format::{ChunkEntry, ImageId};
use tracing::debug;

use crate::{ChunkStore, StoreError};

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub struct Patient {
    inner: Arc<dyn ChunkStore>,
    give_up_after: Duration,
}

impl Patient {
    pub fn new(inner: Arc<dyn ChunkStore>, give_up_after: Duration) -> Self {
        Patient { inner, give_up_after }
    }

    fn ask<T>(&self, what: &str, op: impl Fn(&dyn ChunkStore) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            match op(self.inner.as_ref()) {
                Err(e) if !e.is_definite() && started.elapsed() < self.give_up_after => {
                    debug!(store = self.inner.location(), what, error = %e, retry_in_ms = backoff.as_millis() as u64, "store request failed; trying again");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                result => return result,
            }
        }
    }
}

impl ChunkStore for Patient {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn get_chunk(&self, chunk: &ChunkEntry) -> Result<Vec<u8>, StoreError> {
        self.ask("get chunk", |s| s.get_chunk(chunk))
    }

    fn chunk_len(&self, chunk: &ChunkEntry) -> Result<Option<u64>, StoreError> {
        self.ask("check chunk", |s| s.chunk_len(chunk))
    }

    fn put_chunk(&self, chunk: &ChunkEntry, stored: &[u8]) -> Result<(), StoreError> {
        self.ask("put chunk", |s| s.put_chunk(chunk, stored))
    }

    fn get_image(&self, id: &ImageId) -> Result<Vec<u8>, StoreError> {
        self.ask("get image", |s| s.get_image(id))
    }

    fn put_image(&self, id: &ImageId, image_file: &[u8]) -> Result<(), StoreError> {
        self.ask("put image", |s| s.put_image(id, image_file))
    }
}
