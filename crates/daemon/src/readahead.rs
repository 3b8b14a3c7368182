//! Readahead: when a file is read sequentially, the next chunks are fetched (or loaded from
//! the cache directory and verified) in the background so that the reader finds them in
//! memory. The sequential-read hint (where each file's last read
//! ended) is a performance guess only; losing it with the process loses nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use phoenixfs_cache::ChunkCache;
use phoenixfs_format::{ChunkEntry, ExtentTarget, ImageFile, Inode, Nid};
use phoenixfs_store::ChunkStore;
use tracing::debug;

use crate::work_queue::WorkQueue;

/// Chunks fetched at once: enough to hide a remote store's latency (16 MiB of 1 MiB chunks).
const THREADS: usize = 16;
/// Files whose last read end is remembered; beyond this the hints are dropped.
const MAX_TRACKED_FILES: usize = 4096;

struct Shared {
    image: Arc<ImageFile>,
    store: Arc<dyn ChunkStore>,
    cache: Arc<ChunkCache>,
    window: u64,
    /// Chunks to fetch, by index.
    queue: WorkQueue<usize, ChunkEntry>,
    last_end: Mutex<HashMap<Nid, u64>>,
}

pub struct Readahead {
    shared: Option<Arc<Shared>>,
}

impl Readahead {
    /// `window` bytes ahead of a sequential reader are fetched; 0 turns readahead off.
    pub fn new(image: Arc<ImageFile>, store: Arc<dyn ChunkStore>, cache: Arc<ChunkCache>, window: u64) -> Self {
        if window == 0 {
            return Readahead { shared: None };
        }
        let shared = Arc::new(Shared {
            image,
            store,
            cache,
            window,
            queue: WorkQueue::new(usize::MAX),
            last_end: Mutex::new(HashMap::new()),
        });
        for i in 0..THREADS {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("readahead-{i}"))
                .spawn(move || shared.work())
                .expect("spawning a readahead thread");
        }
        Readahead { shared: Some(shared) }
    }

    pub fn on_read(&self, inode: &Inode, offset: u64, len: u64) {
        if let Some(shared) = &self.shared {
            shared.on_read(inode, offset, len);
        }
    }

    /// For a reader of the blob itself (the kernel's EROFS over fscache, which asks only for
    /// what its cache lacks): the window of the blob after `offset + len`.
    pub fn on_blob_read(&self, offset: u64, len: u64) {
        if let Some(shared) = &self.shared {
            let (start, chunk) = (offset.saturating_add(len), shared.image.table.chunk_size());
            let end = start.saturating_add(shared.window).min(shared.image.table.blob_len());
            shared.enqueue((start..end).step_by(chunk as usize));
        }
    }
}

impl Shared {
    fn on_read(&self, inode: &Inode, offset: u64, len: u64) {
        let end = offset + len;
        let sequential = {
            let mut last = self.last_end.lock().unwrap_or_else(|p| p.into_inner());
            if last.len() >= MAX_TRACKED_FILES {
                last.clear();
            }
            let sequential = offset == 0 || last.get(&inode.nid) == Some(&offset);
            last.insert(inode.nid, end);
            sequential
        };
        if !sequential || end >= inode.size() {
            return;
        }
        let Ok(extents) = self.image.bootstrap.extents(inode, end, self.window) else { return };
        self.enqueue(extents.into_iter().filter_map(|extent| match extent.target {
            ExtentTarget::Blob { offset } => Some(offset),
            _ => None,
        }));
    }

    /// Queues the chunks holding these blob offsets, unless in memory or queued already.
    fn enqueue(&self, blob_offsets: impl Iterator<Item = u64>) {
        for offset in blob_offsets {
            let Ok(chunk) = self.image.table.locate(offset) else { continue };
            if !self.cache.in_memory(&chunk.entry) {
                self.queue.push(chunk.index, chunk.entry);
            }
        }
    }

    fn work(&self) {
        loop {
            let (index, entry) = self.queue.pop();
            if let Err(error) = self.cache.get(&entry, self.store.as_ref()) {
                debug!(chunk = index, %error, "readahead fetch failed; a reader will retry");
            }
            self.queue.done(&index);
        }
    }
}
