//! The memory chunk cache that outlives a worker: verified chunks in a shared memory region.
//!
//! Owns: the layout of the region and the protocol every process mapping it follows. The
//! long-lived holder creates the region ([`SharedChunks::create`], a sealed memfd it never maps)
//! and hands the fd to each worker, which maps it ([`SharedChunks::adopt`]); during a hot
//! upgrade two workers read and write it at once. Adopting is O(1): no scan, no index. A
//! chunk's slot is found by its digest alone (set-associative, [`WAYS`] slots per set), and a
//! fresh region is all zero bytes, which reads as all slots empty.
//!
//! Must never: serve bytes a writer did not finish (or that changed since), panic on anything
//! read from the region (another process, alive or killed mid-write, shares it: every field is
//! untrusted input), hold a lock across processes (there is none), or work in proportion to the
//! region's size on adoption.
//!
//! # Layout
//!
//! Every field is little-endian (the region never leaves the host; big-endian hosts are
//! refused at compile time, so the slot words' native order is little-endian too).
//!
//! ```text
//! region header, bytes 0..64, written once by the holder, read with pread:
//!    0..8   magic b"phxchunk"
//!    8..12  version (1)
//!   12..16  ways: slots per set
//!   16..24  slot size: data bytes per slot, a multiple of 8
//!   24..32  slot count: a multiple of ways
//!   32..64  zero
//! slot headers, 64 bytes each from byte 64, one cache line per slot, u64 words used atomically:
//!    0..8   state: bits 0..32 a sequence number (odd while a writer owns the slot),
//!           bits 32..64 the pid of the process that last claimed it
//!    8..16  last used: CLOCK_MONOTONIC nanoseconds of the last put or hit (LRU in the set)
//!   16..24  data length (bits 0..32) and crc32c of the data (bits 32..64)
//!   24..56  digest (sha256 of the data); all zero for an empty slot
//!   56..64  zero
//! slot data: from the first multiple of 4096 after the slot headers, slot size bytes per slot,
//!   stored as u64 words used atomically (the last word zero-padded).
//! ```
//!
//! # Protocol
//!
//! A writer claims a slot by a CAS of its state from the value it read to the next odd
//! sequence with its own pid, writes data, length, crc and digest, then publishes the next
//! (even) sequence with Release. Readers are seqlock readers: they skip odd slots, copy a
//! matching slot's data into a private buffer, and serve it only if the state is unchanged
//! afterwards and the copy's crc32c matches; a stable slot that fails those checks is emptied
//! (claimed and published empty). A slot left odd by a dead process is claimed again by a
//! writer. The crc guards against what the sequence cannot see: a flipped bit, a stray write.
//!
//! Every process mapping a region must share one pid namespace: a writer is judged dead by its
//! pid. A dead writer's pid reused by another process keeps its slot claimed until that one
//! exits too: a slot lost for a while, never a torn one served.

mod layout;
mod slot;

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use phoenixfs_format::Digest;
use tracing::warn;

use self::layout::{Layout, REGION_HEADER_SIZE};
use self::slot::{Read, Slot};
use crate::CacheError;

pub use self::layout::WAYS;

const _: () = assert!(cfg!(target_endian = "little"), "the shared region's words are native-endian, documented as little-endian");

/// One process's mapping of the shared chunk region.
pub struct SharedChunks {
    map: MmapRaw,
    layout: Layout,
    pub stats: SharedStats,
}

#[derive(Debug, Default)]
pub struct SharedStats {
    /// Chunks served from the region.
    pub hits: AtomicU64,
    /// Slots emptied because what they held was torn or corrupt.
    pub discarded: AtomicU64,
}

fn region_error(detail: impl Into<String>) -> CacheError {
    CacheError::SharedRegion { detail: detail.into() }
}

impl SharedChunks {
    /// A new, empty region of about `capacity_bytes` (at least one set) in slots of
    /// `slot_size` bytes, as a sealed memfd: its size can never change, so no process mapping
    /// it can be hit by SIGBUS. Memory is only allocated as slots are first written.
    pub fn create(capacity_bytes: u64, slot_size: usize) -> Result<OwnedFd, CacheError> {
        let slot_size = slot_size as u64;
        let slots = capacity_bytes.checked_div(slot_size).unwrap_or(0).max(1);
        let ways = slots.min(WAYS);
        let layout = Layout::new(slot_size, slots / ways * ways, ways).map_err(region_error)?;
        let fd = memfd_create(c"phoenixfs-chunks", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)
            .map_err(|e| region_error(format!("memfd_create: {e}")))?;
        let file = File::from(fd);
        file.set_len(layout.len as u64).map_err(|e| region_error(format!("sizing it to {} bytes: {e}", layout.len)))?;
        file.write_all_at(&layout.header(), 0).map_err(|e| region_error(format!("writing its header: {e}")))?;
        // Not F_SEAL_WRITE: workers write to it. F_SEAL_SEAL: nobody can add that one later.
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| region_error(format!("sealing it: {e}")))?;
        Ok(file.into())
    }

    /// Maps a region made by [`SharedChunks::create`], after checking that it cannot change
    /// size under the mapping and that its header describes exactly this file.
    pub fn adopt(fd: OwnedFd) -> Result<SharedChunks, CacheError> {
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(|e| region_error(format!("not a sealed memfd: reading its seals: {e}")))?;
        let needed = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
        if !SealFlag::from_bits_truncate(seals).contains(needed) {
            return Err(region_error("not sealed against shrinking and growing (a truncation would crash every process mapping it)"));
        }
        let file = File::from(fd);
        let file_len = file.metadata().map_err(|e| region_error(format!("fstat: {e}")))?.len();
        let mut header = [0u8; REGION_HEADER_SIZE];
        file.read_exact_at(&mut header, 0).map_err(|e| region_error(format!("{file_len} bytes, too short for its header: {e}")))?;
        let layout = Layout::parse(&header, file_len).map_err(region_error)?;
        let map = MmapOptions::new().len(layout.len).map_raw(&file).map_err(|e| region_error(format!("mmap of {} bytes: {e}", layout.len)))?;
        Ok(SharedChunks { map, layout, stats: SharedStats::default() })
    }

    /// Data bytes per slot: the largest chunk the region holds.
    pub fn slot_size(&self) -> usize {
        self.layout.slot_size
    }

    /// Chunk bytes the region can hold.
    pub fn capacity(&self) -> u64 {
        (self.layout.slot_size * self.layout.slot_count) as u64
    }

    /// A private copy of the chunk, if a slot holds exactly its `len` bytes, intact.
    pub fn get(&self, digest: &Digest, len: usize) -> Option<Arc<[u8]>> {
        for slot in self.set_of(digest) {
            match slot.read(digest, len) {
                Read::Hit(data) => {
                    slot.touch(now());
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Some(data);
                }
                Read::Miss => {}
                Read::Bad(state) => {
                    // Whoever wins the claim empties it; if another process got there first,
                    // it has already been dealt with.
                    if let Some(claim) = slot.claim(state) {
                        claim.empty();
                        self.stats.discarded.fetch_add(1, Ordering::Relaxed);
                        warn!(chunk = %digest, "shared memory slot was torn or corrupt; emptied it");
                    }
                }
            }
        }
        None
    }

    /// Whether a stable slot names the chunk (a header peek, no copy: a hint, not a promise).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.set_of(digest).any(|slot| slot.holds(digest))
    }

    /// Puts a verified chunk in its set, over an empty slot, one a dead writer left, or the
    /// least recently used one. False if it is larger than a slot, or every slot of its set is
    /// being written.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> bool {
        if data.len() > self.layout.slot_size {
            return false;
        }
        let now = now();
        if let Some(slot) = self.set_of(digest).find(|slot| slot.holds(digest)) {
            slot.touch(now);
            return true;
        }
        // A lost race for the victim means another writer took it: pick again, a few times.
        for _ in 0..WAYS {
            let Some((slot, state)) = self.victim(digest, now) else { return false };
            if let Some(claim) = slot.claim(state) {
                claim.publish(digest, data, now);
                return true;
            }
        }
        false
    }

    fn victim(&self, digest: &Digest, now: u64) -> Option<(Slot<'_>, u64)> {
        let mut best: Option<(u64, Slot<'_>, u64)> = None;
        for slot in self.set_of(digest) {
            let state = slot.state();
            let rank = if slot::being_written(state) {
                if process_alive(slot::claimer(state)) {
                    continue;
                }
                0
            } else if slot.is_empty() {
                0
            } else {
                // A time from the future is garbage: rank it oldest.
                1 + Some(slot.last_used()).filter(|&used| used <= now).unwrap_or(0)
            };
            if rank == 0 {
                return Some((slot, state));
            }
            if best.as_ref().is_none_or(|(best_rank, ..)| rank < *best_rank) {
                best = Some((rank, slot, state));
            }
        }
        best.map(|(_, slot, state)| (slot, state))
    }

    fn set_of(&self, digest: &Digest) -> impl Iterator<Item = Slot<'_>> {
        let first = self.layout.first_slot_of_set(digest);
        (first..first + self.layout.ways).map(|index| Slot::new(self.words(), &self.layout, index))
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned, `layout.len` bytes long (a multiple of 8,
        // checked by `Layout`), and lives as long as `self`. Its size cannot change (the seals
        // were checked). AtomicU64 has u64's layout and every bit pattern is a valid u64;
        // other mappings and processes write these words concurrently, which atomics allow:
        // every access to the region goes through them.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.layout.len / 8) }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host.
fn now() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// Whether `pid` may be a live process (a writer that may still finish its slot, the owner of
/// a temporary directory, a daemon being waited for). Errs towards alive, never towards dead:
/// a live writer's slot taken from under it would be torn.
pub fn process_alive(pid: u32) -> bool {
    // 0 would signal our own process group; beyond i32 no process can have it: garbage.
    let Some(pid) = i32::try_from(pid).ok().filter(|&pid| pid > 0) else { return false };
    if kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
        return false;
    }
    // A zombie has exited; only its parent has yet to notice. Unreadable: assume alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        // The state follows the parenthesised command name, which may itself hold ") ".
        .map_or(true, |stat| stat.rsplit_once(") ").is_none_or(|(_, rest)| !rest.starts_with('Z')))
}

#[cfg(test)]
mod tests;
