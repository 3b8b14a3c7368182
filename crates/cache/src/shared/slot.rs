//! One slot of the region: its state word, the seqlock read and the claim that owns a write.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use phoenixfs_format::Digest;

use super::layout::Layout;

// Words of a slot header.
const STATE: usize = 0;
const LAST_USED: usize = 1;
const LENGTH_CRC: usize = 2;
const DIGEST: usize = 3;
const DIGEST_WORDS: usize = 4;
const SEQUENCE_MASK: u64 = u32::MAX as u64;

pub fn being_written(state: u64) -> bool {
    state & 1 == 1
}

/// The pid of the process that last claimed the slot.
pub fn claimer(state: u64) -> u32 {
    (state >> 32) as u32
}

fn digest_words(digest: &Digest) -> [u64; DIGEST_WORDS] {
    std::array::from_fn(|i| u64::from_le_bytes(digest.0[i * 8..i * 8 + 8].try_into().expect("8 bytes")))
}

#[derive(Clone, Copy)]
pub struct Slot<'a> {
    header: &'a [AtomicU64],
    data: &'a [AtomicU64],
}

/// What a seqlock read of one slot found.
pub enum Read {
    /// The chunk, intact, in a private buffer.
    Hit(Arc<[u8]>),
    /// Another chunk, an empty slot, or one changing under the reader.
    Miss,
    /// The chunk's slot, stable in this state, but torn or corrupt: to be emptied.
    Bad(u64),
}

impl<'a> Slot<'a> {
    pub fn new(words: &'a [AtomicU64], layout: &Layout, index: usize) -> Slot<'a> {
        let header = layout.header_word(index);
        let data = layout.data_word(index);
        Slot { header: &words[header..header + 8], data: &words[data..data + layout.slot_size / 8] }
    }

    pub fn state(&self) -> u64 {
        self.header[STATE].load(Ordering::Acquire)
    }

    pub fn last_used(&self) -> u64 {
        self.header[LAST_USED].load(Ordering::Relaxed)
    }

    /// A hint for the LRU: a lost race with another toucher or a writer costs nothing.
    pub fn touch(&self, now: u64) {
        self.header[LAST_USED].store(now, Ordering::Relaxed);
    }

    fn digest_is(&self, words: &[u64; DIGEST_WORDS]) -> bool {
        self.header[DIGEST..DIGEST + DIGEST_WORDS].iter().zip(words).all(|(word, want)| word.load(Ordering::Relaxed) == *want)
    }

    /// Stable and empty (its state read before).
    pub fn is_empty(&self) -> bool {
        self.digest_is(&[0; DIGEST_WORDS])
    }

    /// Stable and naming `digest` before and after the peek.
    pub fn holds(&self, digest: &Digest) -> bool {
        let before = self.state();
        let named = !being_written(before) && self.digest_is(&digest_words(digest));
        fence(Ordering::Acquire);
        named && self.header[STATE].load(Ordering::Relaxed) == before
    }

    /// The seqlock read of `digest`'s `len` bytes: a copy is trusted only if the state did not
    /// change while it was taken and its crc32c matches.
    pub fn read(&self, digest: &Digest, len: usize) -> Read {
        let before = self.state();
        if being_written(before) || !self.digest_is(&digest_words(digest)) {
            return Read::Miss;
        }
        let length_crc = self.header[LENGTH_CRC].load(Ordering::Relaxed);
        let (stored_len, crc) = (length_crc as u32 as usize, (length_crc >> 32) as u32);
        // One digest has one length: any other length is damage, and so is one beyond the slot.
        let copy = (stored_len == len && len <= self.data.len() * 8).then(|| self.copy(len));
        // Orders the copy's loads before the state's reload (the seqlock's read side).
        fence(Ordering::Acquire);
        if self.header[STATE].load(Ordering::Relaxed) != before {
            return Read::Miss;
        }
        match copy {
            Some(data) if crc32c::crc32c(&data) == crc => Read::Hit(data),
            _ => Read::Bad(before),
        }
    }

    fn copy(&self, len: usize) -> Arc<[u8]> {
        assert!(len <= self.data.len() * 8, "the caller checked the length against the slot");
        // SAFETY: all-zero bytes are valid u8s.
        let mut data = unsafe { Arc::<[u8]>::new_zeroed_slice(len).assume_init() };
        let buf = Arc::get_mut(&mut data).expect("just allocated, not shared");
        // SAFETY: the source is `len` bytes inside this slot's data (asserted above), in a
        // mapping that stays mapped while `self` lives, and `buf` is a fresh allocation, so
        // the two do not overlap. Another process may write these bytes meanwhile (this is
        // the read side of a seqlock): the copy may then be torn, and the state's reload and
        // the crc32c reject it. A plain copy, not word by word, keeps a hit at memcpy speed.
        unsafe { std::ptr::copy_nonoverlapping(self.data.as_ptr().cast::<u8>(), buf.as_mut_ptr(), len) };
        data
    }

    /// Owns the slot for writing if its state is still `observed` (stable, or claimed by a
    /// dead process): the next odd sequence, with this process's pid.
    pub fn claim(&self, observed: u64) -> Option<Claim<'a>> {
        let step = if being_written(observed) { 2 } else { 1 };
        let claimed = (u64::from(std::process::id()) << 32) | (observed.wrapping_add(step) & SEQUENCE_MASK);
        self.header[STATE].compare_exchange(observed, claimed, Ordering::Acquire, Ordering::Relaxed).ok()?;
        // Readers that see any of the writes below must then see the claim (and miss).
        fence(Ordering::Release);
        Some(Claim { slot: *self, claimed, published: false })
    }
}

/// A slot this process owns for writing. Dropped unpublished (emptied, or unwinding), it
/// publishes the slot empty, so no owner outlives its process's interest in the slot.
pub struct Claim<'a> {
    slot: Slot<'a>,
    claimed: u64,
    published: bool,
}

impl Claim<'_> {
    /// Writes the chunk (at most the slot's size) and makes it visible.
    pub fn publish(mut self, digest: &Digest, data: &[u8], now: u64) {
        let len = data.len().min(self.slot.data.len() * 8);
        // SAFETY: the destination is `len` bytes inside this slot's data, in a mapping that
        // stays mapped while the slot lives, and this process owns the slot for writing (its
        // claim): other processes only read it, and reject what they read while the state is
        // odd. `data` is the caller's own buffer, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.slot.data.as_ptr().cast::<u8>().cast_mut(), len) };
        let header = self.slot.header;
        header[LENGTH_CRC].store(data.len() as u64 | (u64::from(crc32c::crc32c(data)) << 32), Ordering::Relaxed);
        header[LAST_USED].store(now, Ordering::Relaxed);
        for (word, value) in header[DIGEST..DIGEST + DIGEST_WORDS].iter().zip(digest_words(digest)) {
            word.store(value, Ordering::Relaxed);
        }
        self.release();
    }

    /// Publishes the slot empty.
    pub fn empty(self) {}

    /// The next even sequence, with Release: readers that see it see everything written.
    fn release(&mut self) {
        self.published = true;
        let stable = (self.claimed & !SEQUENCE_MASK) | (self.claimed.wrapping_add(1) & SEQUENCE_MASK);
        // Failing means another process took the slot believing this one dead; it is its now.
        let _ = self.slot.header[STATE].compare_exchange(self.claimed, stable, Ordering::Release, Ordering::Relaxed);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.published {
            let header = self.slot.header;
            for word in &header[DIGEST..DIGEST + DIGEST_WORDS] {
                word.store(0, Ordering::Relaxed);
            }
            header[LENGTH_CRC].store(0, Ordering::Relaxed);
            self.release();
        }
    }
}
