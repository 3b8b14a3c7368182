use std::sync::atomic::Ordering;
use std::sync::Arc;

use phoenixfs_format::chunk::encode_chunk;
use phoenixfs_format::{ChunkEntry, Digest};
use phoenixfs_store::{ChunkStore, MemoryStore, StoreError};
use rayon::prelude::*;

use super::*;

fn chunk(store: &MemoryStore, seed: u8, len: usize) -> (ChunkEntry, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed)).collect();
    let (compression, stored) = encode_chunk(&data, 1);
    let entry = ChunkEntry::new(Digest::of(&data), len as u32, compression, &stored);
    store.put_chunk(&entry, &stored).unwrap();
    (entry, data)
}

#[test]
fn concurrent_readers_of_one_chunk_share_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 30, 1 << 30, None).unwrap();
    let store = MemoryStore::new();
    store.read_delay_ms.store(50, Ordering::Relaxed);
    let (entry, data) = chunk(&store, 3, 100_000);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(16).build().unwrap();
    let results: Vec<Arc<[u8]>> = pool.install(|| (0..16).into_par_iter().map(|_| cache.get(&entry, &store).unwrap()).collect());
    assert!(results.iter().all(|r| **r == data[..]));
    assert_eq!(store.chunk_reads.load(Ordering::SeqCst), 1);
}

#[test]
fn the_cache_stays_warm_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let (entry, data) = chunk(&store, 5, 5000);
    assert_eq!(*ChunkCache::open(dir.path(), 1 << 30, 1 << 30, None).unwrap().get(&entry, &store).unwrap(), data[..]);
    let cache = ChunkCache::open(dir.path(), 1 << 30, 1 << 30, None).unwrap();
    assert!(cache.contains(&entry));
    assert_eq!(*cache.get(&entry, &store).unwrap(), data[..]);
    assert_eq!(store.chunk_reads.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats.disk_hits.load(Ordering::Relaxed), 1);
}

#[test]
fn torn_and_flipped_cache_files_are_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let (torn, torn_data) = chunk(&store, 7, 8000);
    let (flipped, flipped_data) = chunk(&store, 9, 8000);
    {
        let cache = ChunkCache::open(dir.path(), 1 << 30, 1 << 30, None).unwrap();
        cache.get(&torn, &store).unwrap();
        cache.get(&flipped, &store).unwrap();
        let path = cache.chunk_path(&torn.cache_key());
        fs::write(&path, &fs::read(&path).unwrap()[..3000]).unwrap();
        let path = cache.chunk_path(&flipped.cache_key());
        let mut bytes = fs::read(&path).unwrap();
        bytes[4000] ^= 0x10;
        fs::write(&path, bytes).unwrap();
    }
    let cache = ChunkCache::open(dir.path(), 1 << 30, 1 << 30, None).unwrap();
    assert_eq!(*cache.get(&torn, &store).unwrap(), torn_data[..]);
    assert_eq!(*cache.get(&flipped, &store).unwrap(), flipped_data[..]);
    assert_eq!(cache.stats.corrupt_discarded.load(Ordering::Relaxed), 2);
    assert_eq!(store.chunk_reads.load(Ordering::SeqCst), 4);
    let repaired = read_cached(&cache.chunk_path(&flipped.cache_key()), flipped_data.len()).unwrap();
    assert_eq!(repaired.as_deref(), Some(&flipped_data[..]), "repaired on disk");
}

#[test]
fn bad_data_from_the_store_stalls_the_reader_until_the_store_is_good() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 30, 1 << 30, None).unwrap();
    let store = MemoryStore::new();
    let (entry, data) = chunk(&store, 11, 3000);
    store.corrupt_reads.store(true, Ordering::Relaxed);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| cache.get(&entry, &store));
        while store.chunk_reads.load(Ordering::SeqCst) < 4 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let during = cache.fetches_in_flight();
        assert_eq!((during.in_flight, during.retrying), (1, 1), "{during:?}");
        assert!(!cache.contains(&entry), "nothing bad is kept");
        store.corrupt_reads.store(false, Ordering::Relaxed);
        assert_eq!(*reader.join().unwrap().unwrap(), data[..]);
    });
    assert!(cache.stats.fetch_retries.load(Ordering::Relaxed) >= 3);
    assert!(cache.stats.fetch_errors.lock().unwrap()["corrupt"] >= 3);
    assert_eq!(cache.fetches_in_flight(), FetchesInFlight::default());
}

#[test]
fn a_fetch_deadline_turns_a_long_outage_into_an_error_naming_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let policy = FetchPolicy { deadline: Some(Duration::from_millis(200)) };
    let cache = ChunkCache::open(dir.path(), 1 << 30, 1 << 30, None).unwrap().with_policy(policy);
    let store = MemoryStore::new();
    let (entry, _) = chunk(&store, 12, 3000);
    store.corrupt_reads.store(true, Ordering::Relaxed);
    let err = cache.get(&entry, &store).unwrap_err();
    assert!(matches!(err, CacheError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&entry.digest.to_hex()));
    store.corrupt_reads.store(false, Ordering::Relaxed);
    assert!(cache.get(&entry, &store).is_ok(), "a later read succeeds once the store is good");
}

#[test]
fn a_chunk_the_store_does_not_have_fails_after_a_few_tries() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 30, 1 << 30, None).unwrap();
    let store = MemoryStore::new();
    let (entry, _) = chunk(&MemoryStore::new(), 13, 3000);
    let err = cache.get(&entry, &store).unwrap_err();
    assert!(err.to_string().contains("not in store memory"), "{err}");
    assert_eq!(store.chunk_reads.load(Ordering::SeqCst), u64::from(NOT_FOUND_ATTEMPTS));
    assert_eq!(cache.stats.fetch_errors.lock().unwrap()["not_found"], u64::from(NOT_FOUND_ATTEMPTS));
}

#[test]
fn the_disk_limit_evicts_least_recently_used_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 3 * (10_000 + CRC_SIZE as u64), 0, None).unwrap();
    let store = MemoryStore::new();
    let chunks: Vec<_> = (1..=5u8).map(|s| chunk(&store, s, 10_000)).collect();
    for (entry, _) in &chunks[..3] {
        cache.get(entry, &store).unwrap();
    }
    cache.get(&chunks[0].0, &store).unwrap();
    for (entry, _) in &chunks[3..] {
        cache.get(entry, &store).unwrap();
    }
    let (files, bytes) = cache.disk_usage();
    assert_eq!((files, bytes), (3, 3 * (10_000 + CRC_SIZE as u64)));
    assert!(cache.chunk_path(&chunks[0].0.cache_key()).exists(), "recently used stays");
    assert!(!cache.chunk_path(&chunks[1].0.cache_key()).exists(), "oldest goes");
    assert!(!cache.chunk_path(&chunks[2].0.cache_key()).exists());
}

#[test]
fn a_held_chunk_outlives_its_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 10_000 + CRC_SIZE as u64, 0, None).unwrap();
    let store = MemoryStore::new();
    let (first, first_data) = chunk(&store, 1, 10_000);
    let held = cache.get(&first, &store).unwrap();
    let (second, _) = chunk(&store, 2, 10_000);
    cache.get(&second, &store).unwrap();
    assert!(!cache.chunk_path(&first.cache_key()).exists());
    assert_eq!(*held, first_data[..]);
}

#[test]
fn an_unindexed_cache_serves_what_is_on_disk_and_ranks_it_below_new_uses() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let file_len = 10_000 + CRC_SIZE as u64;
    let chunks: Vec<_> = (1..=3u8).map(|s| chunk(&store, s, 10_000)).collect();
    {
        let cache = ChunkCache::open(dir.path(), 1 << 30, 0, None).unwrap();
        for (entry, _) in &chunks[..2] {
            cache.get(entry, &store).unwrap();
        }
    }
    let cache = ChunkCache::open_unindexed(dir.path(), 2 * file_len, 0, None).unwrap();
    assert_eq!(cache.disk_usage(), (0, 0), "nothing indexed yet");
    // Chunk 1 is found on disk without the index; chunk 3 is new.
    assert_eq!(*cache.get(&chunks[1].0, &store).unwrap(), chunks[1].1[..]);
    cache.get(&chunks[2].0, &store).unwrap();
    assert_eq!(store.chunk_reads.load(Ordering::SeqCst), 3, "only chunk 3 was fetched again");
    cache.index_disk().unwrap();
    // Indexing found chunk 0 (older than any use since opening) and evicted it.
    assert_eq!(cache.disk_usage(), (2, 2 * file_len));
    assert!(!cache.chunk_path(&chunks[0].0.cache_key()).exists());
    assert!(cache.chunk_path(&chunks[1].0.cache_key()).exists() && cache.chunk_path(&chunks[2].0.cache_key()).exists());
}

#[test]
fn a_chunk_one_worker_fetched_is_served_to_the_next_from_shared_memory() {
    let region = SharedChunks::create(1 << 20, 1 << 16).unwrap();
    let adopt = || Some(SharedChunks::adopt(region.try_clone().unwrap()).unwrap());
    let store = MemoryStore::new();
    let (entry, data) = chunk(&store, 13, 50_000);
    let (first_dir, second_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = ChunkCache::open(first_dir.path(), 1 << 30, 1 << 20, adopt()).unwrap();
    assert_eq!(*first.get(&entry, &store).unwrap(), data[..]);
    drop(first);
    // Another cache directory: only the shared region can serve it.
    let second = ChunkCache::open(second_dir.path(), 1 << 30, 1 << 20, adopt()).unwrap();
    assert!(second.in_memory(&entry) && second.contains(&entry));
    assert_eq!(*second.get(&entry, &store).unwrap(), data[..]);
    assert_eq!(store.chunk_reads.load(Ordering::SeqCst), 1, "fetched once, by the first");
    assert_eq!(second.shared().unwrap().stats.hits.load(Ordering::Relaxed), 1);
    assert_eq!(second.stats.disk_hits.load(Ordering::Relaxed), 0);
    assert!(!second.chunk_path(&entry.cache_key()).exists());
}

#[test]
fn a_chunk_loaded_from_disk_goes_into_shared_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let (entry, data) = chunk(&store, 17, 20_000);
    ChunkCache::open(dir.path(), 1 << 30, 1 << 20, None).unwrap().get(&entry, &store).unwrap();
    let region = SharedChunks::create(1 << 20, 1 << 16).unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 30, 1 << 20, Some(SharedChunks::adopt(region.try_clone().unwrap()).unwrap())).unwrap();
    cache.get(&entry, &store).unwrap();
    assert_eq!(cache.stats.disk_hits.load(Ordering::Relaxed), 1);
    let other = SharedChunks::adopt(region).unwrap();
    assert_eq!(other.get(&entry.cache_key(), data.len()).as_deref(), Some(&data[..]));
}

/// A store whose `get_chunk` waits until `gathered` says so, then panics.
struct PanickingStore<'a> {
    gathered: &'a (dyn Fn() -> bool + Sync),
}

impl ChunkStore for PanickingStore<'_> {
    fn location(&self) -> String {
        "panicking".into()
    }
    fn get_chunk(&self, _: &ChunkEntry) -> Result<Vec<u8>, StoreError> {
        while !(self.gathered)() {
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the store double panics");
    }
    fn chunk_len(&self, _: &ChunkEntry) -> Result<Option<u64>, StoreError> {
        unreachable!()
    }
    fn put_chunk(&self, _: &ChunkEntry, _: &[u8]) -> Result<(), StoreError> {
        unreachable!()
    }
    fn get_image(&self, _: &phoenixfs_format::ImageId) -> Result<Vec<u8>, StoreError> {
        unreachable!()
    }
    fn put_image(&self, _: &phoenixfs_format::ImageId, _: &[u8]) -> Result<(), StoreError> {
        unreachable!()
    }
}

#[test]
fn waiters_of_a_leader_that_panics_get_an_error_and_a_later_get_works() {
    const WAITERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 30, 1 << 30, None).unwrap();
    let good = MemoryStore::new();
    let (entry, data) = chunk(&good, 19, 10_000);
    // The flights map holds one reference, each waiter another.
    let gathered = || cache.lock().flights.get(&entry.cache_key()).is_some_and(|flight| Arc::strong_count(flight) == 1 + WAITERS);
    let panicking = PanickingStore { gathered: &gathered };
    let results: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..=WAITERS).map(|_| scope.spawn(|| cache.get(&entry, &panicking))).collect();
        threads.into_iter().map(|thread| thread.join()).collect()
    });
    assert_eq!(results.iter().filter(|result| result.is_err()).count(), 1, "one leader, which panicked");
    for result in results.into_iter().flatten() {
        let err = result.unwrap_err();
        assert!(matches!(err, CacheError::LoadPanicked { digest } if digest == entry.digest), "{err}");
    }
    assert!(cache.lock().flights.is_empty());
    assert_eq!(*cache.get(&entry, &good).unwrap(), data[..]);
}
