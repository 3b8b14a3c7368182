//! Passthrough copies: for a large file whose chunks are all in the cache, one disk file with
//! exactly its bytes, `CACHE/files/<key>`, which the kernel then reads itself (FUSE
//! passthrough) at the speed of the disk file system's page cache (large folios, no daemon).
//!
//! A copy is made in the background, once a file was read and closed (or opened) with every
//! chunk cached, from chunks verified as every read's are; it is fsynced, then renamed into
//! place, so a name always holds a whole, verified copy. The kernel reads a copy without us,
//! so a copy is trusted as the kernel trusts its own disk file systems. The key is the sha256
//! of the file's layout and chunk digests: identical files of any image share one copy.
//! Copies have a size budget of their own; the oldest go first (an open writes nothing: a
//! metadata write on the open path waits behind the disk's journal). Deleting a copy the
//! kernel still reads is harmless: it keeps the file until its last reader closes.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use phoenixfs_cache::ChunkCache;
use phoenixfs_format::{ExtentTarget, ImageFile, Inode, InodeKind};
use phoenixfs_fuse::Opening;
use phoenixfs_store::ChunkStore;
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

use crate::os::lowest_priority_for_this_thread;
use crate::work_queue::WorkQueue;

/// A half-written copy untouched this long was left by a killed process.
const ABANDONED_AFTER: Duration = Duration::from_secs(600);
/// Files waiting for a copy; beyond this, new ones are dropped (a later open asks again).
const MAX_QUEUED: usize = 1024;

pub struct PassthroughConfig {
    /// Smaller files are only read through the page cache.
    pub min_size: u64,
    /// Bytes of copies kept.
    pub budget: u64,
}

struct Shared {
    image: Arc<ImageFile>,
    store: Arc<dyn ChunkStore>,
    cache: Arc<ChunkCache>,
    dir: PathBuf,
    config: PassthroughConfig,
    /// Files to copy, by their copy's key.
    queue: WorkQueue<[u8; 32], Inode>,
}

pub struct PassthroughFiles {
    shared: Arc<Shared>,
}

/// Where a file's copy is (or would be).
struct CopyName {
    key: [u8; 32],
    path: PathBuf,
}

impl PassthroughFiles {
    /// Copies under `cache_dir/files`, made by one background thread.
    pub fn new(image: Arc<ImageFile>, store: Arc<dyn ChunkStore>, cache: Arc<ChunkCache>, config: PassthroughConfig) -> io::Result<Self> {
        let dir = cache.dir().join("files");
        fs::create_dir_all(&dir)?;
        let shared = Arc::new(Shared { image, store, cache, dir, config, queue: WorkQueue::new(MAX_QUEUED) });
        let worker = shared.clone();
        std::thread::Builder::new().name("passthrough-copies".into()).spawn(move || worker.run())?;
        Ok(PassthroughFiles { shared })
    }

    /// How `inode` may be opened: small files and files with data in the image itself only
    /// through the page cache; others in passthrough mode once their copy is there (its
    /// making is asked for when it is not).
    pub fn opening(&self, inode: &Inode) -> Opening {
        let Some(copy) = self.shared.copy_of(inode) else { return Opening::Cached };
        match File::open(&copy.path) {
            Ok(file) => Opening::Passthrough { backing: Some(file) },
            Err(_) => {
                self.shared.ask_for(inode, copy);
                Opening::Passthrough { backing: None }
            }
        }
    }

    /// A file of `inode` was closed: it may have been read whole by now.
    pub fn released(&self, inode: &Inode) {
        if let Some(copy) = self.shared.copy_of(inode) {
            if !copy.path.exists() {
                self.shared.ask_for(inode, copy);
            }
        }
    }
}

impl Shared {
    fn copy_of(&self, inode: &Inode) -> Option<CopyName> {
        if inode.kind != InodeKind::File || inode.size() < self.config.min_size.max(1) || inode.size() > self.config.budget {
            return None;
        }
        let extents = self.image.bootstrap.extents(inode, 0, inode.size()).ok()?;
        let mut hash = Sha256::new();
        hash.update(inode.size().to_le_bytes());
        for extent in extents {
            hash.update(extent.file_offset.to_le_bytes());
            hash.update(extent.len.to_le_bytes());
            match extent.target {
                ExtentTarget::Hole => hash.update([0]),
                // Bytes of this image only: not worth a copy.
                ExtentTarget::Bootstrap { .. } => return None,
                ExtentTarget::Blob { offset } => {
                    let chunk = self.image.table.locate(offset).ok()?;
                    hash.update([1]);
                    hash.update(chunk.entry.cache_key().0);
                    hash.update((chunk.within as u64).to_le_bytes());
                }
            }
        }
        let key: [u8; 32] = hash.finalize().into();
        Some(CopyName { key, path: self.dir.join(hex::encode(key)) })
    }

    fn ask_for(&self, inode: &Inode, copy: CopyName) {
        self.queue.push(copy.key, inode.clone());
    }

    fn run(&self) {
        lowest_priority_for_this_thread();
        remove_abandoned_copies(&self.dir);
        loop {
            let (key, inode) = self.queue.pop();
            let Some(copy) = self.copy_of(&inode) else {
                self.queue.done(&key);
                continue;
            };
            match self.make(&inode, &copy.path) {
                Ok(true) => {
                    debug!(nid = inode.nid, size = inode.size(), copy = %copy.path.display(), "passthrough copy made");
                    self.keep_budget(&copy.path);
                }
                Ok(false) => {}
                Err(error) => warn!(nid = inode.nid, %error, "cannot make a passthrough copy"),
            }
            self.queue.done(&key);
        }
    }

    /// Writes the copy when every chunk of the file is cached (else false: it is not read yet).
    fn make(&self, inode: &Inode, path: &Path) -> io::Result<bool> {
        if path.exists() {
            return Ok(false);
        }
        let extents = self.image.bootstrap.extents(inode, 0, inode.size()).map_err(io::Error::other)?;
        let table = &self.image.table;
        let mut pieces = Vec::new();
        for extent in &extents {
            let ExtentTarget::Blob { offset } = extent.target else { continue };
            let mut done = 0;
            while done < extent.len {
                let chunk = table.locate(offset + done).map_err(io::Error::other)?;
                if !self.cache.contains(&chunk.entry) {
                    return Ok(false);
                }
                let len = (table.chunk_size() - chunk.within as u64).min(extent.len - done);
                pieces.push((extent.file_offset + done, chunk, len));
                done += len;
            }
        }
        let temporary = self.dir.join(format!(".{}.{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("copy"), std::process::id()));
        let file = File::create(&temporary)?;
        let written = (|| {
            for (file_offset, chunk, len) in pieces {
                let data = self.cache.get(&chunk.entry, self.store.as_ref()).map_err(io::Error::other)?;
                // A chunk shorter than the file says reads as zeros there, as in a READ.
                let end = (chunk.within + len as usize).min(data.len());
                if chunk.within < end {
                    file.write_all_at(&data[chunk.within..end], file_offset)?;
                }
            }
            file.set_len(inode.size())?;
            file.sync_all()?;
            fs::rename(&temporary, path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        written.map(|()| true)
    }

    /// Removes the oldest copies (never `keep`) until the rest fit the budget.
    fn keep_budget(&self, keep: &Path) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        let mut copies: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|entry| {
                let meta = entry.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), entry.path()))
            })
            .collect();
        let mut total: u64 = copies.iter().map(|(_, len, _)| len).sum();
        copies.sort();
        for (_, len, path) in copies {
            if total <= self.config.budget {
                break;
            }
            if path != keep && fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

/// Half-written copies of killed processes (their names start with a dot).
fn remove_abandoned_copies(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        let abandoned = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > ABANDONED_AFTER);
        if entry.file_name().to_string_lossy().starts_with('.') && abandoned {
            let _ = fs::remove_file(entry.path());
        }
    }
}
