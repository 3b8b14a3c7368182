//! Which files are open in which mode, for passthrough sessions: memory the holder creates and
//! hands to every worker generation, so that a new worker knows what a dead one opened.
//!
//! The kernel (6.9+) puts a FUSE inode in one of two modes while it has open files: cached
//! (reads through the FUSE page cache) or passthrough (reads go to a backing file). An open
//! answered in the other mode, or with a second backing file, fails the application's open(2)
//! with EIO. So for every inode that may be opened in passthrough mode the daemon must know
//! whether it is open cached, and which backing id its passthrough opens use. That is state
//! the image cannot give, and it must survive a worker's SIGKILL at any instruction:
//!
//! - it lives in a sealed memfd, guarded by a robust process-shared mutex: a lock whose owner
//!   died is taken over and the counts are rebuilt from the open slots;
//! - every open of a tracked inode takes a slot whose index is the file handle the kernel
//!   gives back with RELEASE, so a RELEASE resent after a worker died finds its slot already
//!   free and changes nothing;
//! - everything is written before the kernel hears of it, and forgotten before it is undone
//!   (a backing id leaves the table before BACKING_CLOSE): a death in between leaves a count
//!   too high or an id registered for nothing, which costs a passthrough chance or one open
//!   backing file, never a wrong answer.
//!
//! ```text
//! header (magic, version, slot counts) | robust mutex | nodes: [nodeid, cached|passthrough counts, backing id]
//!                                                     | opens: [nodeid | PASSTHROUGH_OPEN]
//! ```

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use thiserror::Error;

const MAGIC: u64 = u64::from_le_bytes(*b"PHXOPENS");
const VERSION: u64 = 1;
/// Magic, version, node slots, open slots; the mutex starts at `MUTEX_AT`.
const MUTEX_AT: usize = 64;
const NODES_AT: usize = 128;
/// Words per node entry.
const NODE_WORDS: usize = 3;
const NODE_SLOTS: usize = 1 << 17;
const OPEN_SLOTS: usize = 1 << 16;
/// In an open slot: the open is in passthrough mode.
const PASSTHROUGH_OPEN: u64 = 1 << 63;
/// In a node's counts: an open that found no free slot was answered in cached mode, so the
/// node stays cached for the connection's life (its RELEASE cannot be told apart).
const CACHED_FOREVER: u64 = 1 << 63;
/// In a node's counts: a passthrough open without a slot; its backing id is never closed.
const PINNED: u64 = 1 << 62;
const COUNT_MASK: u64 = (1 << 31) - 1;

#[derive(Debug, Error)]
#[error("the open-file table: {0}")]
pub struct OpenTableError(String);

/// How to answer an OPEN of a tracked inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Through the FUSE page cache; `fh` is 0 when no slot was free.
    Cached { fh: u64 },
    /// Passthrough to the backing file registered as `backing_id`.
    Passthrough { fh: u64, backing_id: u32 },
}

pub struct OpenTable {
    map: MmapRaw,
}

// SAFETY: every access to the mapping's nodes and opens happens under the process-shared
// mutex, which orders them across threads and processes.
unsafe impl Send for OpenTable {}
unsafe impl Sync for OpenTable {}

fn error(detail: impl Into<String>) -> OpenTableError {
    OpenTableError(detail.into())
}

fn table_len() -> usize {
    NODES_AT + (NODE_SLOTS * NODE_WORDS + OPEN_SLOTS) * 8
}

impl OpenTable {
    /// A new, empty table as a sealed memfd (memory is allocated as it is first written).
    pub fn create() -> Result<OwnedFd, OpenTableError> {
        let fd = memfd_create(c"phoenixfs-opens", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)
            .map_err(|e| error(format!("memfd_create: {e}")))?;
        let file = File::from(fd);
        file.set_len(table_len() as u64).map_err(|e| error(format!("sizing it: {e}")))?;
        let mut header = Vec::with_capacity(32);
        for word in [MAGIC, VERSION, NODE_SLOTS as u64, OPEN_SLOTS as u64] {
            header.extend_from_slice(&word.to_le_bytes());
        }
        file.write_all_at(&header, 0).map_err(|e| error(format!("writing its header: {e}")))?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| error(format!("sealing it: {e}")))?;
        let table = OpenTable::map(&file)?;
        // SAFETY: the mutex memory is ours alone until this fd is handed on; the attribute
        // calls only write the attribute object.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            libc::pthread_mutexattr_init(&mut attr);
            libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            let status = libc::pthread_mutex_init(table.mutex(), &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
            if status != 0 {
                return Err(error(format!("initialising its mutex: error {status}")));
            }
        }
        Ok(file.into())
    }

    /// Maps a table made by [`OpenTable::create`], after checking its seals and header.
    pub fn adopt(fd: &OwnedFd) -> Result<OpenTable, OpenTableError> {
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(|e| error(format!("not a sealed memfd: {e}")))?;
        if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
            return Err(error("not sealed against shrinking and growing"));
        }
        let file = File::from(fd.try_clone().map_err(|e| error(format!("duplicating its fd: {e}")))?);
        let mut header = [0u8; 32];
        file.read_exact_at(&mut header, 0).map_err(|e| error(format!("reading its header: {e}")))?;
        let word = |i: usize| u64::from_le_bytes(header[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        if [word(0), word(1), word(2), word(3)] != [MAGIC, VERSION, NODE_SLOTS as u64, OPEN_SLOTS as u64] {
            return Err(error("its header is not this version's (magic, version, slot counts)"));
        }
        OpenTable::map(&file)
    }

    fn map(file: &File) -> Result<OpenTable, OpenTableError> {
        let len = file.metadata().map_err(|e| error(format!("fstat: {e}")))?.len();
        if len != table_len() as u64 {
            return Err(error(format!("{len} bytes, not {}", table_len())));
        }
        let map = MmapOptions::new().len(table_len()).map_raw(file).map_err(|e| error(format!("mmap: {e}")))?;
        Ok(OpenTable { map })
    }

    fn mutex(&self) -> *mut libc::pthread_mutex_t {
        // SAFETY: MUTEX_AT + the mutex's size lies inside the mapping (NODES_AT is past it).
        unsafe { self.map.as_mut_ptr().add(MUTEX_AT).cast() }
    }

    fn lock(&self) -> Locked<'_> {
        // SAFETY: the mutex was initialised by `create` before the fd was handed on.
        let status = unsafe { libc::pthread_mutex_lock(self.mutex()) };
        // SAFETY: NODES_AT.. is the words area, 8-aligned in a page-aligned mapping, and
        // only touched under the mutex, which this thread now holds.
        let words = unsafe {
            std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(NODES_AT).cast::<u64>(), NODE_SLOTS * NODE_WORDS + OPEN_SLOTS)
        };
        let (nodes, opens) = words.split_at_mut(NODE_SLOTS * NODE_WORDS);
        let mut locked = Locked { table: self, nodes, opens };
        if status == libc::EOWNERDEAD {
            locked.rebuild_counts();
            // SAFETY: we hold the mutex after its owner's death, as EOWNERDEAD says.
            unsafe { libc::pthread_mutex_consistent(self.mutex()) };
        }
        locked
    }

    /// Decides how to answer an OPEN of `node`, an inode that may be opened in passthrough
    /// mode, and records it before the answer is sent. `backing` registers the node's backing
    /// file when it has one and none is registered (None: it has none, or registering failed).
    pub fn open(&self, node: u64, backing: impl FnOnce() -> Option<u32>) -> OpenMode {
        let mut table = self.lock();
        let Some(entry) = table.entry(node) else { return OpenMode::Cached { fh: 0 } };
        let counts = table.nodes[entry + 1];
        let mut backing_id = table.nodes[entry + 2] as u32;
        if backing_id == 0 && counts & (CACHED_FOREVER | COUNT_MASK << 32) == 0 {
            backing_id = backing().unwrap_or(0);
            table.nodes[entry + 2] = u64::from(backing_id);
        }
        match (backing_id, table.take_slot(node, backing_id != 0)) {
            (0, Some(fh)) => {
                table.nodes[entry + 1] = counts + (1 << 32);
                OpenMode::Cached { fh }
            }
            (0, None) => {
                table.nodes[entry + 1] = counts | CACHED_FOREVER;
                OpenMode::Cached { fh: 0 }
            }
            (backing_id, Some(fh)) => {
                table.nodes[entry + 1] = counts + 1;
                OpenMode::Passthrough { fh, backing_id }
            }
            (backing_id, None) => {
                table.nodes[entry + 1] = counts | PINNED;
                OpenMode::Passthrough { fh: 0, backing_id }
            }
        }
    }

    /// Records a RELEASE of `fh` (a slot from [`OpenTable::open`]); when it was the node's
    /// last passthrough open, forgets the node's backing id and returns it for closing.
    pub fn release(&self, node: u64, fh: u64) -> Option<u32> {
        let table = self.lock();
        let slot = usize::try_from(fh).ok()?.checked_sub(1).filter(|&slot| slot < OPEN_SLOTS)?;
        let open = table.opens[slot];
        if open & !PASSTHROUGH_OPEN != node {
            // Released already (a RELEASE resent after a worker died), or not ours.
            return None;
        }
        table.opens[slot] = 0;
        let entry = table.find(node)?;
        let counts = table.nodes[entry + 1];
        if open & PASSTHROUGH_OPEN == 0 {
            table.nodes[entry + 1] = counts - (1 << 32);
            return None;
        }
        let counts = counts - 1;
        table.nodes[entry + 1] = counts;
        if counts & (COUNT_MASK | PINNED) != 0 {
            return None;
        }
        let backing_id = table.nodes[entry + 2] as u32;
        table.nodes[entry + 2] = 0;
        (backing_id != 0).then_some(backing_id)
    }
}

/// The table's words, while this thread holds its mutex.
struct Locked<'a> {
    table: &'a OpenTable,
    nodes: &'a mut [u64],
    opens: &'a mut [u64],
}

impl Locked<'_> {
    fn home(node: u64) -> usize {
        (node.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 47) as usize % NODE_SLOTS
    }

    /// The index of `node`'s entry, if it has one.
    fn find(&self, node: u64) -> Option<usize> {
        let mut slot = Self::home(node);
        for _ in 0..NODE_SLOTS {
            match self.nodes[slot * NODE_WORDS] {
                0 => return None,
                key if key == node => return Some(slot * NODE_WORDS),
                _ => slot = (slot + 1) % NODE_SLOTS,
            }
        }
        None
    }

    /// `node`'s entry, made if need be; None when the table is full (entries are never removed,
    /// so a node without one can never have been opened in passthrough mode).
    fn entry(&mut self, node: u64) -> Option<usize> {
        let mut slot = Self::home(node);
        for _ in 0..NODE_SLOTS {
            match self.nodes[slot * NODE_WORDS] {
                0 => {
                    self.nodes[slot * NODE_WORDS] = node;
                    return Some(slot * NODE_WORDS);
                }
                key if key == node => return Some(slot * NODE_WORDS),
                _ => slot = (slot + 1) % NODE_SLOTS,
            }
        }
        None
    }

    /// A free open slot, taken for `node`: its index + 1 is the file handle.
    fn take_slot(&mut self, node: u64, passthrough: bool) -> Option<u64> {
        let start = (node as usize).wrapping_mul(31) % OPEN_SLOTS;
        let slot = (0..OPEN_SLOTS).map(|i| (start + i) % OPEN_SLOTS).find(|&slot| self.opens[slot] == 0)?;
        self.opens[slot] = node | if passthrough { PASSTHROUGH_OPEN } else { 0 };
        Some(slot as u64 + 1)
    }

    /// After a holder of the lock died mid-change: the counts again from the slots, which are
    /// written first; the sticky marks stay.
    fn rebuild_counts(&mut self) {
        for entry in self.nodes.chunks_exact_mut(NODE_WORDS) {
            entry[1] &= CACHED_FOREVER | PINNED;
        }
        for slot in 0..OPEN_SLOTS {
            let open = self.opens[slot];
            if open == 0 {
                continue;
            }
            if let Some(entry) = self.find(open & !PASSTHROUGH_OPEN) {
                self.nodes[entry + 1] += if open & PASSTHROUGH_OPEN != 0 { 1 } else { 1 << 32 };
            }
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: this thread holds the mutex (taken in `lock`).
        unsafe { libc::pthread_mutex_unlock(self.table.mutex()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> OpenTable {
        OpenTable::adopt(&OpenTable::create().unwrap()).unwrap()
    }

    #[test]
    fn a_node_open_cached_is_never_opened_in_passthrough_mode_until_released() {
        let table = table();
        let OpenMode::Cached { fh } = table.open(10, || None) else { panic!("no backing file: cached") };
        assert_eq!(table.open(10, || Some(7)), OpenMode::Cached { fh: fh + 1 }, "a cached open is still there");
        assert_eq!(table.release(10, fh), None);
        assert_eq!(table.release(10, fh), None, "a resent RELEASE changes nothing");
        assert_eq!(table.release(10, fh + 1), None);
        assert!(matches!(table.open(10, || Some(7)), OpenMode::Passthrough { backing_id: 7, .. }));
    }

    #[test]
    fn passthrough_opens_share_one_backing_id_closed_after_the_last() {
        let table = table();
        let OpenMode::Passthrough { fh: first, backing_id: 5 } = table.open(3, || Some(5)) else { panic!() };
        let OpenMode::Passthrough { fh: second, backing_id: 5 } = table.open(3, || panic!("registered already")) else { panic!() };
        assert_eq!(table.release(3, first), None);
        assert_eq!(table.release(3, first), None, "a resent RELEASE changes nothing");
        assert_eq!(table.release(3, second), Some(5), "the last one closes the id");
        assert!(matches!(table.open(3, || Some(9)), OpenMode::Passthrough { backing_id: 9, .. }));
    }

    #[test]
    fn a_release_of_another_nodes_slot_or_a_wild_handle_changes_nothing() {
        let table = table();
        let OpenMode::Passthrough { fh, .. } = table.open(3, || Some(5)) else { panic!() };
        assert_eq!(table.release(4, fh), None);
        assert_eq!(table.release(3, 0), None);
        assert_eq!(table.release(3, u64::MAX), None);
        assert_eq!(table.release(3, fh), Some(5));
    }

    #[test]
    fn a_second_mapping_sees_the_first_ones_opens() {
        let fd = OpenTable::create().unwrap();
        let (one, two) = (OpenTable::adopt(&fd).unwrap(), OpenTable::adopt(&fd).unwrap());
        let OpenMode::Cached { fh } = one.open(8, || None) else { panic!() };
        assert!(matches!(two.open(8, || Some(1)), OpenMode::Cached { .. }), "the other process's cached open counts");
        two.release(8, fh);
    }

    #[test]
    fn counts_are_rebuilt_from_the_slots_when_a_lock_holder_died() {
        let fd = OpenTable::create().unwrap();
        let table = OpenTable::adopt(&fd).unwrap();
        let OpenMode::Cached { fh } = table.open(8, || None) else { panic!() };
        // A thread that takes the lock and dies with it, after scribbling on the counts.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let locked = table.lock();
                let entry = locked.find(8).unwrap();
                locked.nodes[entry + 1] = 0;
                std::mem::forget(locked);
            });
        });
        assert!(matches!(table.open(8, || Some(1)), OpenMode::Cached { .. }), "the cached open was counted again");
        table.release(8, fh);
    }

    #[test]
    fn a_table_of_another_shape_is_refused() {
        let fd = OpenTable::create().unwrap();
        File::from(fd.try_clone().unwrap()).write_all_at(&2u64.to_le_bytes(), 8).unwrap();
        assert!(OpenTable::adopt(&fd).is_err());
    }
}
