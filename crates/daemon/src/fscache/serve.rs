//! Answers the kernel's requests: OPEN resolves a cookie to an image's bootstrap (cookie =
//! fsid) or blob (cookie = device tag) and keeps the object's anonymous fd; READ fills the
//! whole page-aligned range from the image bytes or from verified chunks and completes it;
//! CLOSE drops the fd. A chunk that cannot be fetched is tried again until it can: a READ
//! completed with data missing would be an error the application cannot retry.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use phoenixfs_cache::ChunkCache;
use phoenixfs_cachefiles::{page_span, AlignedPages, Device, DeviceError, Message, Object, Request};
use phoenixfs_format::{ImageFile, ImageId};
use phoenixfs_store::ChunkStore;
use tracing::{debug, info, warn};

use super::control::WorkerStats;
use super::ImageMemfds;
use super::registry::{self, Registration};
use crate::image_memory;
use crate::spec::open_store;
use crate::readahead::Readahead;

/// Chunks this worker keeps in memory; the kernel's page cache and cache files do the rest.
const MEMORY_CACHE: u64 = 64 << 20;

/// How far ahead of a READ of the blob chunks are fetched in the background.
const READAHEAD: u64 = 16 << 20;

/// How long an OPEN of an unknown cookie waits for its image to be handed over (a mount
/// registers its image, then mounts: the kernel's OPEN can overtake the hand-over).
const IMAGE_HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// How long a write to a full cache directory is tried again before the READ fails.
const CACHE_FULL_PATIENCE: Duration = Duration::from_secs(30);

/// One registered image, opened.
struct Served {
    registration: Registration,
    image: Arc<ImageFile>,
    /// The sealed memfd the image is mapped from, to hand a new holder.
    memfd: OwnedFd,
    store: Arc<dyn ChunkStore>,
    cache: Arc<ChunkCache>,
    readahead: Readahead,
}

impl Served {
    /// Maps the image from its sealed memfd, verified by the `mount` that registered it: in
    /// constant time, whatever its size.
    fn open(registration: Registration, memfd: OwnedFd) -> Result<Served, String> {
        let id: ImageId = registration.fsid.parse().map_err(|_| format!("the registration names no image id ({:?})", registration.fsid))?;
        let image = Arc::new(image_memory::map(&memfd, id).map_err(|e| e.to_string())?);
        let store = open_store(&registration.store, &registration.mirrors).map_err(|e| e.to_string())?;
        let cache = Arc::new(ChunkCache::open_unindexed(&registration.cache_dir, registration.cache_limit, MEMORY_CACHE, None).map_err(|e| e.to_string())?);
        let readahead = Readahead::new(image.clone(), store.clone(), cache.clone(), READAHEAD);
        Ok(Served { registration, image, memfd, store, cache, readahead })
    }

    fn blob_tag(&self) -> Option<String> {
        self.image.bootstrap.blob().map(|(tag, _)| String::from_utf8_lossy(tag).into_owned())
    }
}

/// What a cache object holds.
#[derive(Clone)]
enum Content {
    /// The image file itself: the kernel reads the EROFS bootstrap at its start.
    Bootstrap(Arc<Served>),
    /// The image's data blob, as many bytes as its device-table slot says.
    Blob(Arc<Served>, u64),
}

impl Content {
    fn size(&self) -> u64 {
        match self {
            Content::Bootstrap(served) => served.image.bytes().len() as u64,
            Content::Blob(_, size) => *size,
        }
    }
}

struct OpenObject {
    object: Object,
    content: Content,
}

/// The registered images, by mountpoint.
#[derive(Default)]
struct Catalog {
    images: HashMap<PathBuf, Arc<Served>>,
}

impl Catalog {
    fn add(&mut self, mountpoint: PathBuf, memfd: OwnedFd) {
        let Some(registration) = registry::find(&mountpoint) else {
            return warn!(mountpoint = %mountpoint.display(), "an image handed over without its registration; not served");
        };
        match Served::open(registration, memfd) {
            Ok(served) => {
                info!(mountpoint = %mountpoint.display(), fsid = served.registration.fsid, "serving image");
                self.images.insert(mountpoint, Arc::new(served));
            }
            Err(error) => warn!(mountpoint = %mountpoint.display(), error, "cannot serve a registered image"),
        }
    }

    fn resolve(&self, volume_key: &[u8], cookie_key: &[u8]) -> Option<Content> {
        let in_volume = || self.images.values().filter(|s| s.registration.volume_key().as_bytes() == volume_key);
        if let Some(served) = in_volume().find(|s| s.registration.fsid.as_bytes() == cookie_key) {
            return Some(Content::Bootstrap(served.clone()));
        }
        in_volume().find(|s| s.blob_tag().is_some_and(|tag| tag.as_bytes() == cookie_key)).map(|served| {
            let size = served.image.bootstrap.blob().map_or(0, |(_, size)| size);
            Content::Blob(served.clone(), size)
        })
    }
}

#[derive(Default)]
struct Counters {
    opens: AtomicU64,
    opens_refused: AtomicU64,
    reads: AtomicU64,
    bytes_written: AtomicU64,
    fetch_retries: AtomicU64,
    fill_retries: AtomicU64,
    errors: AtomicU64,
}

/// Everything a worker's serving threads share.
pub(super) struct Server {
    device: Device,
    catalog: Mutex<Catalog>,
    /// Signalled when an image is added: an OPEN may race its image's hand-over.
    catalog_grew: Condvar,
    objects: Mutex<HashMap<u32, Arc<OpenObject>>>,
    counters: Counters,
}

fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Server {
    /// A server for the images handed over (mountpoint, sealed memfd).
    pub(super) fn new(device: Device, images: ImageMemfds) -> Server {
        let mut catalog = Catalog::default();
        for (mountpoint, memfd) in images {
            catalog.add(mountpoint, memfd);
        }
        Server { device, catalog: Mutex::new(catalog), catalog_grew: Condvar::new(), objects: Mutex::new(HashMap::new()), counters: Counters::default() }
    }

    pub(super) fn add_image(&self, mountpoint: PathBuf, memfd: OwnedFd) {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner()).add(mountpoint, memfd);
        self.catalog_grew.notify_all();
    }

    /// Forgets an unmounted image; objects still open keep it until closed.
    pub(super) fn remove_image(&self, mountpoint: &std::path::Path) {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner()).images.remove(mountpoint);
    }

    /// The images' mountpoints and memfds, to hand a new holder.
    pub(super) fn image_fds(&self) -> Vec<(PathBuf, RawFd)> {
        let catalog = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        catalog.images.iter().map(|(mountpoint, served)| (mountpoint.clone(), served.memfd.as_raw_fd())).collect()
    }

    pub(super) fn device(&self) -> &Device {
        &self.device
    }

    pub(super) fn stats(&self) -> WorkerStats {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        // The chunk caches ask a failing store again by themselves; their retries count too.
        let cache_retries: u64 = self.catalog.lock().unwrap_or_else(|p| p.into_inner()).images.values().map(|s| get(&s.cache.stats.fetch_retries)).sum();
        WorkerStats {
            pid: std::process::id(),
            opens: get(&c.opens),
            opens_refused: get(&c.opens_refused),
            objects_open: self.objects.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
            reads: get(&c.reads),
            bytes_written: get(&c.bytes_written),
            fetch_retries: get(&c.fetch_retries) + cache_retries,
            fill_retries: get(&c.fill_retries),
            errors: get(&c.errors),
        }
    }

    /// Answers one request from the kernel.
    pub(super) fn handle(&self, message: Message) {
        match message.request {
            Request::Open { volume_key, cookie_key, fd, .. } => {
                // SAFETY: the kernel installed `fd` in this process for this OPEN; nobody
                // else has taken it.
                let object = unsafe { Object::from_open(message.object_id, fd) };
                self.open(message.msg_id, object, &volume_key, &cookie_key);
            }
            Request::Close => {
                self.objects.lock().unwrap_or_else(|p| p.into_inner()).remove(&message.object_id);
            }
            Request::Read { offset, len } => self.read(message.msg_id, message.object_id, offset, len),
        }
    }

    fn open(&self, msg_id: u32, object: Object, volume_key: &[u8], cookie_key: &[u8]) {
        count(&self.counters.opens, 1);
        let content = {
            let deadline = Instant::now() + IMAGE_HANDOVER_WAIT;
            let mut catalog = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let content = catalog.resolve(volume_key, cookie_key);
                let left = deadline.saturating_duration_since(Instant::now());
                if content.is_some() || left.is_zero() {
                    break content;
                }
                catalog = self.catalog_grew.wait_timeout(catalog, left).unwrap_or_else(|p| p.into_inner()).0;
            }
        };
        let Some(content) = content else {
            count(&self.counters.opens_refused, 1);
            warn!(volume = %String::from_utf8_lossy(volume_key), cookie = %String::from_utf8_lossy(cookie_key), "OPEN of a cookie no registered image has");
            if let Err(error) = self.device.copen(msg_id, Err(Errno::ENOENT)) {
                warn!(%error, "refusing an OPEN");
            }
            return;
        };
        let size = content.size();
        let object_id = object.object_id;
        self.objects.lock().unwrap_or_else(|p| p.into_inner()).insert(object_id, Arc::new(OpenObject { object, content }));
        if let Err(error) = self.device.copen(msg_id, Ok(size)) {
            count(&self.counters.errors, 1);
            warn!(%error, object_id, "answering an OPEN");
            self.objects.lock().unwrap_or_else(|p| p.into_inner()).remove(&object_id);
        }
        debug!(object_id, size, "opened");
    }

    fn read(&self, msg_id: u32, object_id: u32, offset: u64, len: u64) {
        count(&self.counters.reads, 1);
        let open = self.objects.lock().unwrap_or_else(|p| p.into_inner()).get(&object_id).cloned();
        let Some(open) = open else {
            // The kernel re-opens an object before it delivers READs for it to a new
            // daemon, so this is not expected; without the fd there is nothing to answer on.
            count(&self.counters.errors, 1);
            return warn!(object_id, msg_id, "READ of an object this worker never opened");
        };
        let (start, span) = page_span(offset, len);
        let mut pages = AlignedPages::zeroed(span as usize);
        self.fill(&open.content, start, pages.as_mut_slice());
        let done = self.write_pages(&open.object, start, &pages).and_then(|()| open.object.complete(msg_id));
        match done {
            Ok(()) => count(&self.counters.bytes_written, span),
            Err(error) => {
                count(&self.counters.errors, 1);
                warn!(%error, object_id, offset, len, "answering a READ");
            }
        }
    }

    /// Writes the pages to the cache file. A full cache directory (ENOBUFS, ENOSPC) may drain
    /// (an unmount frees its objects), so it is tried again for a while; after that the READ
    /// fails rather than hang its reader for good.
    fn write_pages(&self, object: &Object, start: u64, pages: &AlignedPages) -> Result<(), DeviceError> {
        let give_up = Instant::now() + CACHE_FULL_PATIENCE;
        let mut delay = Duration::from_millis(20);
        loop {
            match object.fill(start, pages) {
                Err(DeviceError::Fill { errno: Errno::ENOBUFS | Errno::ENOSPC, .. }) if Instant::now() < give_up => {
                    count(&self.counters.fill_retries, 1);
                    warn!(object_id = object.object_id, retry_in_ms = delay.as_millis() as u64, "the cache directory is full; trying the write again");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    /// Copies the object's bytes at `start` into `out`; what lies past its end stays zero.
    fn fill(&self, content: &Content, start: u64, out: &mut [u8]) {
        match content {
            Content::Bootstrap(served) => copy_overlap(served.image.bytes(), 0, start, out),
            Content::Blob(served, _) => {
                // Chunks further on are fetched meanwhile, in parallel with this one.
                served.readahead.on_blob_read(start, out.len() as u64);
                let table = &served.image.table;
                let chunk_size = table.chunk_size();
                let end = start + out.len() as u64;
                let first = start / chunk_size;
                let last = end.div_ceil(chunk_size).min(table.len() as u64);
                for index in first..last {
                    let data = self.chunk(served, index as usize);
                    copy_overlap(&data, index * chunk_size, start, out);
                }
            }
        }
    }

    /// The verified bytes of blob chunk `index`, fetched until the store gives them.
    fn chunk(&self, served: &Served, index: usize) -> Arc<[u8]> {
        let mut delay = Duration::from_millis(20);
        loop {
            let result = served.image.table.entry(index).map_err(|e| e.to_string()).and_then(|entry| served.cache.get(&entry, served.store.as_ref()).map_err(|e| e.to_string()));
            match result {
                Ok(data) => return data,
                Err(error) => {
                    count(&self.counters.fetch_retries, 1);
                    warn!(fsid = served.registration.fsid, chunk = index, error, retry_in_ms = delay.as_millis() as u64, "fetching a chunk failed; trying again");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// Copies into `out` (which stands for bytes `start..` of an object) the part of `data`
/// (bytes `data_at..` of the same object) that overlaps it.
fn copy_overlap(data: &[u8], data_at: u64, start: u64, out: &mut [u8]) {
    let from = start.max(data_at);
    let to = (start + out.len() as u64).min(data_at + data.len() as u64);
    if from >= to {
        return;
    }
    let (from, to) = (from as usize, to as usize);
    let (data_at, start) = (data_at as usize, start as usize);
    out[from - start..to - start].copy_from_slice(&data[from - data_at..to - data_at]);
}

#[cfg(test)]
mod tests {
    use super::copy_overlap;

    #[test]
    fn overlaps_are_copied_where_they_belong() {
        let mut out = [0u8; 8];
        copy_overlap(&[1, 2, 3, 4], 6, 4, &mut out);
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 0, 0]);
        let mut out = [0u8; 4];
        copy_overlap(&[1, 2, 3, 4, 5, 6], 0, 4, &mut out);
        assert_eq!(out, [5, 6, 0, 0]);
        let mut out = [9u8; 2];
        copy_overlap(&[1], 10, 0, &mut out);
        assert_eq!(out, [9, 9]);
    }
}
