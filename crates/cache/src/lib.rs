//! The local chunk cache, shared by every image on the host.
//!
//! Owns: chunk files under `DIR/chunks/ab/<key>` (uncompressed, then a crc32c of the data),
//! written under a temporary name and renamed only when complete, so a crash mid-write leaves
//! nothing under a chunk's name. A chunk is verified when it comes from the store, against the
//! digest its image's table gives ([`ChunkEntry::cache_key`]: the BLAKE3 of its stored bytes,
//! or for older images its sha256), and is kept under that digest: bytes under a key were
//! proven by that key whichever image brought them, so no image can plant a chunk another
//! image reads. Every load from the cache directory checks its length and crc32c
//! (hardware-accelerated, a tenth of sha256's cost on the warm read path), and a torn or
//! flipped file is deleted and fetched again. Concurrent readers of one chunk share one fetch
//! (single-flight).
//! A chunk is looked for in four levels, nearest first:
//! 1. a small private memory LRU, so the several READ requests that cover one chunk copy it
//!    once;
//! 2. the shared memory region ([`shared`]), when the worker was handed one: it outlives the
//!    worker, so a worker taking over after a SIGKILL starts warm;
//! 3. the chunk files on disk, bounded too: least recently used files go first, and a chunk a
//!    reader holds lives on in memory whatever happens to its file;
//! 4. the store. A chunk loaded from disk or the store goes into the shared region as well.
//!
//! Fetches follow NFS's hard mount: a store that is down, slow or sends bad bytes is asked
//! again, with capped exponential backoff and jitter, for as long as it takes (readers stall,
//! they never fail), unless a [`FetchPolicy::deadline`] says otherwise. Only a definite
//! answer (a healthy store that does not have the chunk) fails a read, after a few tries.
//!
//! Must never: serve bytes that did not match their digest, hold a lock while fetching, or
//! know about FUSE, images or paths inside images.

mod histogram;
pub mod shared;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use phoenixfs_format::chunk::decode_chunk_owned;
use phoenixfs_format::{ChunkEntry, Digest};
use phoenixfs_store::ChunkStore;
use thiserror::Error;
use tracing::{debug, error, warn};

pub use crate::histogram::{LatencyHistogram, FETCH_BOUNDS_US};
pub use crate::shared::{process_alive, SharedChunks};

/// Tries before a chunk the store says it does not have is given up on (a store being
/// filled, or an eventually consistent one, may have it a moment later).
const NOT_FOUND_ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How long a fetch keeps trying.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Fail a chunk the store cannot deliver after this long; None (the default): never.
    pub deadline: Option<Duration>,
}

#[derive(Debug, Error, Clone)]
pub enum CacheError {
    #[error("chunk {digest}: the store returned bad data {attempts} times: {detail}")]
    Corrupt { digest: Digest, attempts: u32, detail: String },
    #[error("chunk {digest}: {detail}")]
    Store { digest: Digest, detail: String },
    #[error("chunk {digest}: gave up after {waited:?} (the fetch deadline): {detail}")]
    Deadline { digest: Digest, waited: Duration, detail: String },
    #[error("cache directory {}: {detail}", path.display())]
    Io { path: PathBuf, detail: String },
    #[error("chunk {digest}: loading it panicked")]
    LoadPanicked { digest: Digest },
    #[error("shared chunk region: {detail}")]
    SharedRegion { detail: String },
}

#[derive(Debug, Default)]
pub struct CacheStats {
    /// Served from memory.
    pub memory_hits: AtomicU64,
    /// Loaded and verified from the cache directory.
    pub disk_hits: AtomicU64,
    /// Fetched from the store.
    pub fetches: AtomicU64,
    pub fetched_bytes: AtomicU64,
    /// Cache files that failed verification and were deleted.
    pub corrupt_discarded: AtomicU64,
    /// Chunk files removed to stay under the size limit.
    pub evictions: AtomicU64,
    /// Fetches that failed and were tried again.
    pub fetch_retries: AtomicU64,
    /// Failed fetches by kind ([`phoenixfs_store::StoreError::kind`], or "corrupt" for bad bytes).
    pub fetch_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// How long the successful fetches took, retries included (one per `fetches`).
    pub fetch_durations: LatencyHistogram,
}

/// The fetches from the store under way now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FetchesInFlight {
    pub in_flight: u64,
    /// Those that failed at least once and are being tried again.
    pub retrying: u64,
    /// How long the oldest has been going.
    pub oldest: Option<Duration>,
}

/// One fetch under way: when it began and whether it has failed yet.
struct Fetching {
    started: Instant,
    retrying: bool,
}

/// Registers a fetch as under way, and unregisters it however the fetch ends.
struct FetchingGuard<'a> {
    cache: &'a ChunkCache,
    key: Digest,
}

impl<'a> FetchingGuard<'a> {
    fn begin(cache: &'a ChunkCache, key: Digest, started: Instant) -> Self {
        cache.fetching.lock().unwrap_or_else(|p| p.into_inner()).insert(key, Fetching { started, retrying: false });
        FetchingGuard { cache, key }
    }
}

impl Drop for FetchingGuard<'_> {
    fn drop(&mut self) {
        self.cache.fetching.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// Sleeps between half and all of `backoff`, so that readers who failed together do not all
/// come back at once.
fn continue_after(backoff: Duration) {
    std::thread::sleep(backoff.mul_f64(rand::random_range(0.5..=1.0)));
}

struct Flight {
    result: Mutex<Option<Result<Arc<[u8]>, CacheError>>>,
    done: Condvar,
}

#[derive(Default)]
struct Inner {
    tick: u64,
    memory: HashMap<Digest, (Arc<[u8]>, u64)>,
    memory_bytes: u64,
    disk: HashMap<Digest, (u64, u64)>,
    disk_bytes: u64,
    flights: HashMap<Digest, Arc<Flight>>,
}

pub struct ChunkCache {
    dir: PathBuf,
    /// This process's directory for chunks being written.
    tmp: PathBuf,
    disk_limit: u64,
    memory_limit: u64,
    shared: Option<SharedChunks>,
    inner: Mutex<Inner>,
    fetching: Mutex<HashMap<Digest, Fetching>>,
    policy: FetchPolicy,
    pub stats: CacheStats,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |e| CacheError::Io { path: path.to_path_buf(), detail: e.to_string() }
}

impl ChunkCache {
    /// Opens (creating when needed) the cache in `dir`, indexes the chunks already there, and
    /// removes leftovers of interrupted writes. Several processes may share one cache: each
    /// writes under `tmp/<pid>/`, and only the directories of dead processes are removed.
    /// `memory_limit` bounds the private memory level; `shared` is the shared one, if any.
    pub fn open(dir: &Path, disk_limit: u64, memory_limit: u64, shared: Option<SharedChunks>) -> Result<Self, CacheError> {
        let cache = Self::open_unindexed(dir, disk_limit, memory_limit, shared)?;
        cache.index_disk()?;
        Ok(cache)
    }

    /// [`ChunkCache::open`] without indexing the chunks already on disk: ready at once however
    /// many there are (a worker taking over must not stall readers for a directory scan).
    /// Chunks on disk are found and served all the same; only the size accounting waits
    /// for [`ChunkCache::index_disk`].
    pub fn open_unindexed(dir: &Path, disk_limit: u64, memory_limit: u64, shared: Option<SharedChunks>) -> Result<Self, CacheError> {
        let chunks = dir.join("chunks");
        fs::create_dir_all(&chunks).map_err(io_error(&chunks))?;
        let tmp_root = dir.join("tmp");
        fs::create_dir_all(&tmp_root).map_err(io_error(&tmp_root))?;
        for entry in fs::read_dir(&tmp_root).map_err(io_error(&tmp_root))? {
            let path = entry.map_err(io_error(&tmp_root))?.path();
            let owner_alive = path.file_name().and_then(|n| n.to_str()).and_then(|pid| pid.parse().ok()).is_some_and(process_alive);
            if !owner_alive {
                let _ = fs::remove_dir_all(&path);
            }
        }
        let tmp = tmp_root.join(std::process::id().to_string());
        fs::create_dir_all(&tmp).map_err(io_error(&tmp))?;
        // Uses from now on rank above every file found by `index_disk`, whenever it runs.
        let inner = Inner { tick: FIRST_LIVE_TICK, ..Inner::default() };
        Ok(ChunkCache {
            dir: dir.to_path_buf(),
            tmp,
            disk_limit,
            memory_limit,
            shared,
            inner: Mutex::new(inner),
            fetching: Mutex::new(HashMap::new()),
            policy: FetchPolicy::default(),
            stats: CacheStats::default(),
        })
    }

    /// The same cache with fetches following `policy`.
    pub fn with_policy(self, policy: FetchPolicy) -> Self {
        ChunkCache { policy, ..self }
    }

    /// The fetches from the store under way now, for status.
    pub fn fetches_in_flight(&self) -> FetchesInFlight {
        let fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        FetchesInFlight {
            in_flight: fetching.len() as u64,
            retrying: fetching.values().filter(|f| f.retrying).count() as u64,
            oldest: fetching.values().map(|f| f.started.elapsed()).max(),
        }
    }

    /// Indexes the chunk files on disk (oldest first by mtime, older than any use since
    /// opening), then evicts down to the limit.
    pub fn index_disk(&self) -> Result<(), CacheError> {
        let chunks = self.dir.join("chunks");
        let mut found = Vec::new();
        for sub in fs::read_dir(&chunks).map_err(io_error(&chunks))? {
            let sub = sub.map_err(io_error(&chunks))?.path();
            for file in fs::read_dir(&sub).map_err(io_error(&sub))? {
                let file = file.map_err(io_error(&sub))?;
                let Some(digest) = file.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) else { continue };
                let Ok(meta) = file.metadata() else { continue };
                found.push((meta.modified().ok(), digest, meta.len()));
            }
        }
        found.sort();
        {
            let mut inner = self.lock();
            for (age, (_, digest, len)) in found.into_iter().enumerate() {
                if let std::collections::hash_map::Entry::Vacant(slot) = inner.disk.entry(digest) {
                    slot.insert((len, age as u64));
                    inner.disk_bytes += len;
                }
            }
        }
        self.evict_disk(None);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// (chunk files, bytes) on disk.
    pub fn disk_usage(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.disk.len() as u64, inner.disk_bytes)
    }

    /// The cache file of the chunk whose [`ChunkEntry::cache_key`] is `key`.
    pub fn chunk_path(&self, key: &Digest) -> PathBuf {
        let hex = key.to_hex();
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    /// The shared memory level, if this cache was given one.
    pub fn shared(&self) -> Option<&SharedChunks> {
        self.shared.as_ref()
    }

    /// Whether the chunk is verified and in memory (private or shared), ready to serve
    /// without I/O.
    pub fn in_memory(&self, entry: &ChunkEntry) -> bool {
        let key = entry.cache_key();
        let private = self.lock().memory.contains_key(&key);
        private || self.shared.as_ref().is_some_and(|shared| shared.contains(&key))
    }

    /// Whether the chunk is cached (in memory or on disk).
    pub fn contains(&self, entry: &ChunkEntry) -> bool {
        let key = entry.cache_key();
        let cached = {
            let inner = self.lock();
            inner.memory.contains_key(&key) || inner.disk.contains_key(&key)
        };
        cached || self.shared.as_ref().is_some_and(|shared| shared.contains(&key))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The verified content of `entry`'s chunk: from memory, from disk, or fetched from
    /// `store`, with every concurrent caller of one chunk waiting on one load.
    pub fn get(&self, entry: &ChunkEntry, store: &dyn ChunkStore) -> Result<Arc<[u8]>, CacheError> {
        let key = entry.cache_key();
        let flight = {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            if let Some((data, used)) = inner.memory.get_mut(&key) {
                *used = tick;
                self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(data.clone());
            }
            match inner.flights.get(&key) {
                Some(flight) => Some(flight.clone()),
                None => {
                    let flight = Arc::new(Flight { result: Mutex::new(None), done: Condvar::new() });
                    inner.flights.insert(key, flight);
                    None
                }
            }
        };
        if let Some(flight) = flight {
            let mut result = flight.result.lock().unwrap_or_else(|p| p.into_inner());
            while result.is_none() {
                result = flight.done.wait(result).unwrap_or_else(|p| p.into_inner());
            }
            return result.clone().expect("set before notify");
        }
        let mut leader = FlightLeader { cache: self, key, digest: entry.digest, result: None };
        let result = self.load_or_fetch(entry, store);
        leader.result = Some(result.clone());
        drop(leader);
        result
    }

    /// Ends the flight of a chunk: keeps a good result in memory and hands it to the waiters.
    fn land(&self, key: &Digest, result: Result<Arc<[u8]>, CacheError>) {
        let flight = {
            let mut inner = self.lock();
            if let Ok(data) = &result {
                inner.tick += 1;
                let tick = inner.tick;
                if inner.memory.insert(*key, (data.clone(), tick)).is_none() {
                    inner.memory_bytes += data.len() as u64;
                }
                self.evict_memory(&mut inner);
            }
            inner.flights.remove(key).expect("the leader's flight")
        };
        *flight.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        flight.done.notify_all();
    }

    fn load_or_fetch(&self, entry: &ChunkEntry, store: &dyn ChunkStore) -> Result<Arc<[u8]>, CacheError> {
        let key = entry.cache_key();
        if let Some(data) = self.shared.as_ref().and_then(|shared| shared.get(&key, entry.length as usize)) {
            return Ok(data);
        }
        let path = self.chunk_path(&key);
        // Look on disk even when the index does not list the chunk: it may not be built yet,
        // or another process sharing the cache may have written it.
        match read_cached(&path, entry.length as usize) {
            Ok(Some(data)) => {
                self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                self.touch_disk(&key, (data.len() + CRC_SIZE) as u64);
                self.put_shared(&key, &data);
                return Ok(data);
            }
            Ok(None) => {
                warn!(chunk = %entry.digest, "cached chunk is corrupt; discarding it and fetching again");
                self.stats.corrupt_discarded.fetch_add(1, Ordering::Relaxed);
                self.forget_disk(&key);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(chunk = %entry.digest, error = %e, "cached chunk unreadable; fetching again");
                self.forget_disk(&key);
            }
        }
        let data = self.fetch(entry, store)?;
        self.put_shared(&key, &data);
        if let Err(e) = self.store_on_disk(&key, &data) {
            warn!(chunk = %entry.digest, error = %e, "cannot write chunk to the cache; serving it from memory");
        }
        Ok(data.into())
    }

    fn put_shared(&self, digest: &Digest, data: &[u8]) {
        if let Some(shared) = &self.shared {
            shared.put(digest, data);
        }
    }

    /// Fetches and verifies a chunk, asking again after any failure but a definite "not
    /// there" (bounded) or the policy's deadline.
    fn fetch(&self, entry: &ChunkEntry, store: &dyn ChunkStore) -> Result<Vec<u8>, CacheError> {
        let digest = entry.digest;
        let started = Instant::now();
        let _fetching = FetchingGuard::begin(self, entry.cache_key(), started);
        let mut backoff = FIRST_BACKOFF;
        let mut not_found = 0;
        for attempt in 1u32.. {
            let (kind, detail, corrupt) = match store.get_chunk(entry) {
                Ok(stored) => match decode_chunk_owned(entry, stored) {
                    Ok(data) => {
                        let took = started.elapsed();
                        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
                        self.stats.fetch_durations.observe(took);
                        self.stats.fetched_bytes.fetch_add(u64::from(entry.stored_length), Ordering::Relaxed);
                        debug!(chunk = %digest, bytes = entry.stored_length, attempt, took_us = took.as_micros() as u64, "fetched");
                        return Ok(data);
                    }
                    Err(e) => ("corrupt", e.to_string(), true),
                },
                Err(e) if e.is_definite() => {
                    self.count_error(e.kind());
                    not_found += 1;
                    if not_found >= NOT_FOUND_ATTEMPTS {
                        error!(chunk = %digest, store = store.location(), error = %e, "the store does not have a chunk the image needs");
                        return Err(CacheError::Store { digest, detail: e.to_string() });
                    }
                    continue_after(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                Err(e) => (e.kind(), e.to_string(), false),
            };
            self.count_error(kind);
            warn!(chunk = %digest, store = store.location(), attempt, kind, error = %detail, retry_in_ms = backoff.as_millis() as u64, "fetch failed; trying again");
            if let Some(deadline) = self.policy.deadline.filter(|d| started.elapsed() >= *d) {
                error!(chunk = %digest, store = store.location(), waited_ms = deadline.as_millis() as u64, error = %detail, "fetch deadline passed; failing the read");
                return Err(match corrupt {
                    true => CacheError::Corrupt { digest, attempts: attempt, detail },
                    false => CacheError::Deadline { digest, waited: started.elapsed(), detail },
                });
            }
            self.stats.fetch_retries.fetch_add(1, Ordering::Relaxed);
            self.fetching.lock().unwrap_or_else(|p| p.into_inner()).entry(entry.cache_key()).and_modify(|f| f.retrying = true);
            continue_after(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        unreachable!("the loop only ends by returning")
    }

    fn count_error(&self, kind: &'static str) {
        *self.stats.fetch_errors.lock().unwrap_or_else(|p| p.into_inner()).entry(kind).or_default() += 1;
    }

    fn store_on_disk(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        let path = self.chunk_path(digest);
        let mut tmp = tempfile::NamedTempFile::new_in(&self.tmp).map_err(io_error(&self.tmp))?;
        tmp.write_all(data).map_err(io_error(&path))?;
        tmp.write_all(&crc32c::crc32c(data).to_le_bytes()).map_err(io_error(&path))?;
        let parent = path.parent().expect("chunk files live in a subdirectory");
        fs::create_dir_all(parent).map_err(io_error(parent))?;
        tmp.persist(&path).map_err(|e| CacheError::Io { path: path.clone(), detail: e.error.to_string() })?;
        {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            let file_len = (data.len() + CRC_SIZE) as u64;
            if inner.disk.insert(*digest, (file_len, tick)).is_none() {
                inner.disk_bytes += file_len;
            }
        }
        self.evict_disk(Some(digest));
        Ok(())
    }

    fn touch_disk(&self, digest: &Digest, file_len: u64) {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        if inner.disk.insert(*digest, (file_len, tick)).is_none() {
            inner.disk_bytes += file_len;
        }
    }

    fn forget_disk(&self, digest: &Digest) {
        let mut inner = self.lock();
        if let Some((len, _)) = inner.disk.remove(digest) {
            inner.disk_bytes -= len;
        }
        let _ = fs::remove_file(self.chunk_path(digest));
    }

    /// Deletes least recently used chunk files until the cache fits its limit; `keep` is the
    /// chunk just written.
    fn evict_disk(&self, keep: Option<&Digest>) {
        let victims = {
            let mut inner = self.lock();
            if inner.disk_bytes <= self.disk_limit {
                return;
            }
            let mut by_age: Vec<_> = inner.disk.iter().filter(|(d, _)| Some(*d) != keep).map(|(d, (len, used))| (*used, *d, *len)).collect();
            by_age.sort_unstable();
            let mut victims = Vec::new();
            for (_, digest, len) in by_age {
                if inner.disk_bytes <= self.disk_limit {
                    break;
                }
                inner.disk.remove(&digest);
                inner.disk_bytes -= len;
                victims.push(digest);
            }
            victims
        };
        for digest in victims {
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            let _ = fs::remove_file(self.chunk_path(&digest));
        }
    }

    fn evict_memory(&self, inner: &mut Inner) {
        if inner.memory_bytes <= self.memory_limit {
            return;
        }
        let mut by_age: Vec<_> = inner.memory.iter().map(|(d, (data, used))| (*used, *d, data.len() as u64)).collect();
        by_age.sort_unstable();
        for (_, digest, len) in by_age {
            if inner.memory_bytes <= self.memory_limit / 2 {
                break;
            }
            inner.memory.remove(&digest);
            inner.memory_bytes -= len;
        }
    }
}

/// The one loader of a chunk. However the load ends, returning or unwinding, dropping this
/// ends the flight, so waiters never wait for a leader that is gone.
struct FlightLeader<'a> {
    cache: &'a ChunkCache,
    key: Digest,
    /// The chunk's name, for the error if the load unwinds.
    digest: Digest,
    /// None until the load returns: a leader dropped without one unwound.
    result: Option<Result<Arc<[u8]>, CacheError>>,
}

impl Drop for FlightLeader<'_> {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or(Err(CacheError::LoadPanicked { digest: self.digest }));
        self.cache.land(&self.key, result);
    }
}

const CRC_SIZE: usize = 4;
/// Ticks of uses after opening start here; files found by `index_disk` get smaller ones.
const FIRST_LIVE_TICK: u64 = 1 << 48;

/// The `len` bytes of data in a cache file if it holds exactly them followed by their crc32c
/// (`None` if it does not). Read straight into the shared buffer readers will get: one copy
/// from the page cache, no more.
fn read_cached(path: &Path, len: usize) -> io::Result<Option<Arc<[u8]>>> {
    let mut file = fs::File::open(path)?;
    if file.metadata()?.len() != (len + CRC_SIZE) as u64 {
        return Ok(None);
    }
    // SAFETY: all-zero bytes are valid u8s.
    let mut data = unsafe { Arc::<[u8]>::new_zeroed_slice(len).assume_init() };
    let buf = Arc::get_mut(&mut data).expect("just allocated, not shared");
    let mut crc = [0u8; CRC_SIZE];
    match file.read_exact(buf).and_then(|()| file.read_exact(&mut crc)) {
        Ok(()) if crc == crc32c::crc32c(buf).to_le_bytes() => Ok(Some(data)),
        Ok(()) => Ok(None),
        // Shorter than it said: torn under us.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
