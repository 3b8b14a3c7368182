use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};
use phoenixfs_format::Digest;

use super::layout::SLOT_HEADER_SIZE;
use super::*;

const SLOT: usize = 4096;

/// A region of `slots` slots of [`SLOT`] bytes; 8 slots make one set, where every digest lands.
fn region(slots: u64) -> OwnedFd {
    SharedChunks::create(slots * SLOT as u64, SLOT).unwrap()
}

fn adopt(fd: &OwnedFd) -> SharedChunks {
    SharedChunks::adopt(fd.try_clone().unwrap()).unwrap()
}

fn content(seed: u32, len: usize) -> (Digest, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(seed | 1).wrapping_add(seed) as u8).collect();
    (Digest::of(&data), data)
}

/// Writes `bytes` at `offset` of the region behind the mapping's back, as a stray write would.
fn poke(fd: &OwnedFd, offset: usize, bytes: &[u8]) {
    File::from(fd.try_clone().unwrap()).write_all_at(bytes, offset as u64).unwrap();
}

/// The slot holding `digest`.
fn slot_of(shared: &SharedChunks, digest: &Digest) -> usize {
    (0..shared.layout.slot_count).find(|&i| Slot::new(shared.words(), &shared.layout, i).holds(digest)).expect("the chunk is in a slot")
}

fn slot_header_offset(index: usize) -> usize {
    REGION_HEADER_SIZE + index * SLOT_HEADER_SIZE
}

#[test]
fn put_chunks_come_back_whatever_their_length() {
    let shared = adopt(&region(64));
    let chunks: Vec<_> = [1, 7, 8, 9, 100, 4095, SLOT].iter().enumerate().map(|(i, &len)| content(i as u32, len)).collect();
    for (digest, data) in &chunks {
        assert!(shared.put(digest, data));
    }
    for (digest, data) in &chunks {
        assert!(shared.contains(digest));
        assert_eq!(shared.get(digest, data.len()).as_deref(), Some(&data[..]));
    }
    let (unknown, data) = content(99, 10);
    assert!(shared.get(&unknown, data.len()).is_none() && !shared.contains(&unknown));
    assert!(!shared.put(&Digest::of(&[0; SLOT + 1]), &[0; SLOT + 1]), "larger than a slot");
    for bad_slot_size in [0, 12] {
        assert!(SharedChunks::create(1 << 20, bad_slot_size).is_err());
    }
    assert_eq!(shared.stats.hits.load(Ordering::Relaxed), chunks.len() as u64);
}

#[test]
fn a_full_set_gives_up_its_least_recently_used_slot() {
    let shared = adopt(&region(8));
    let chunks: Vec<_> = (0..9).map(|i| content(i, 1000)).collect();
    for (digest, data) in &chunks[..8] {
        assert!(shared.put(digest, data));
    }
    assert!(shared.get(&chunks[0].0, 1000).is_some());
    assert!(shared.put(&chunks[8].0, &chunks[8].1));
    assert!(shared.get(&chunks[1].0, 1000).is_none(), "the least recently used went");
    for (digest, data) in chunks.iter().filter(|(digest, _)| *digest != chunks[1].0) {
        assert_eq!(shared.get(digest, data.len()).as_deref(), Some(&data[..]));
    }
}

fn adopt_error(fd: OwnedFd) -> String {
    SharedChunks::adopt(fd).err().expect("adoption refused").to_string()
}

#[test]
fn damaged_regions_are_refused_naming_the_damage() {
    let fd = region(8);
    poke(&fd, 0, b"X");
    assert!(adopt_error(fd).contains("bad magic"));

    let fd = region(8);
    poke(&fd, 8, &2u32.to_le_bytes());
    assert!(adopt_error(fd).contains("version 2"));

    let fd = region(8);
    poke(&fd, 24, &16u64.to_le_bytes());
    assert!(adopt_error(fd).contains("describes"), "slot count beyond the file");

    let fd = region(8);
    poke(&fd, 16, &4097u64.to_le_bytes());
    assert!(adopt_error(fd).contains("slot size"));

    let fd = region(64);
    poke(&fd, 12, &64u32.to_le_bytes());
    assert!(adopt_error(fd).contains("whole sets"), "a set wider than any lookup should probe");

    let mut header = [0u8; REGION_HEADER_SIZE];
    let valid = region(8);
    File::from(valid.try_clone().unwrap()).read_exact_at(&mut header, 0).unwrap();
    let unsealed = File::from(memfd_create(c"unsealed", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap());
    unsealed.set_len(File::from(valid).metadata().unwrap().len()).unwrap();
    unsealed.write_all_at(&header, 0).unwrap();
    assert!(adopt_error(unsealed.into()).contains("not sealed"));

    let short = File::from(memfd_create(c"short", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap());
    short.set_len(10).unwrap();
    fcntl(short.as_raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW)).unwrap();
    assert!(adopt_error(short.into()).contains("too short"));

    let plain = tempfile::tempfile().unwrap();
    assert!(adopt_error(plain.into()).contains("not a sealed memfd"));
}

#[test]
fn a_flipped_data_byte_is_never_served_and_its_slot_is_emptied() {
    let fd = region(8);
    let shared = adopt(&fd);
    let (digest, data) = content(3, 3000);
    shared.put(&digest, &data);
    let index = slot_of(&shared, &digest);
    poke(&fd, shared.layout.data_offset + index * SLOT + 1234, &[data[1234] ^ 0x40]);
    assert!(shared.get(&digest, data.len()).is_none());
    assert_eq!(shared.stats.discarded.load(Ordering::Relaxed), 1);
    assert!(!shared.contains(&digest), "emptied");
    assert!(shared.put(&digest, &data));
    assert_eq!(shared.get(&digest, data.len()).as_deref(), Some(&data[..]), "a later put repairs it");
}

#[test]
fn a_garbage_length_is_never_served() {
    let fd = region(8);
    let shared = adopt(&fd);
    for (seed, garbage) in [(1, SLOT as u32 + 8), (2, u32::MAX), (3, 5)] {
        let (digest, data) = content(seed, 100);
        shared.put(&digest, &data);
        poke(&fd, slot_header_offset(slot_of(&shared, &digest)) + 16, &garbage.to_le_bytes());
        assert!(shared.get(&digest, data.len()).is_none());
        assert!(!shared.contains(&digest));
    }
    assert_eq!(shared.stats.discarded.load(Ordering::Relaxed), 3);
}

/// Runs `child` in a forked process that then exits at once (no destructors, no atexit), and
/// reaps it; returns its pid, now dead.
fn in_child(child: impl FnOnce() -> bool) -> u32 {
    // SAFETY: after fork only async-signal-safe work is sound in a threaded process: the
    // closures given here touch atomics in the inherited mapping and make plain system calls
    // (getpid, clock_gettime), and the child then exits without unwinding.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let ok = child();
            // SAFETY: _exit ends the process at once; nothing of it runs afterwards.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
            child.as_raw() as u32
        }
    }
}

#[test]
fn a_slot_left_half_written_by_a_dead_process_is_skipped_then_reclaimed() {
    let shared = adopt(&region(8));
    let (old, old_data) = content(50, 2000);
    shared.put(&old, &old_data);
    let index = slot_of(&shared, &old);
    let dead_pid = in_child(|| {
        let slot = Slot::new(shared.words(), &shared.layout, index);
        let Some(claim) = slot.claim(slot.state()) else { return false };
        // Overwrites half the old chunk's data with a new one, then dies before publishing.
        for word in &shared.words()[shared.layout.data_word(index)..][..125] {
            word.store(0xdead_beef, Ordering::Relaxed);
        }
        std::mem::forget(claim);
        true
    });
    let slot = Slot::new(shared.words(), &shared.layout, index);
    assert!(slot::being_written(slot.state()) && slot::claimer(slot.state()) == dead_pid);
    assert!(shared.get(&old, old_data.len()).is_none() && !shared.contains(&old), "its digest still names the old chunk");
    let chunks: Vec<_> = (0..8).map(|i| content(i, 500)).collect();
    for (digest, data) in &chunks {
        assert!(shared.put(digest, data));
    }
    for (digest, data) in &chunks {
        assert_eq!(shared.get(digest, data.len()).as_deref(), Some(&data[..]), "all eight fit: the dead writer's slot was reclaimed");
    }
    assert_eq!(shared.stats.discarded.load(Ordering::Relaxed), 0);
}

#[test]
fn two_mappings_and_a_forked_child_see_each_others_puts() {
    let fd = region(64);
    let (old_worker, new_worker) = (adopt(&fd), adopt(&fd));
    let (first, first_data) = content(1, 700);
    let (second, second_data) = content(2, 900);
    old_worker.put(&first, &first_data);
    new_worker.put(&second, &second_data);
    assert_eq!(new_worker.get(&first, first_data.len()).as_deref(), Some(&first_data[..]));
    assert_eq!(old_worker.get(&second, second_data.len()).as_deref(), Some(&second_data[..]));
    drop(old_worker);
    assert!(new_worker.contains(&first), "outlives the mapping that wrote it");

    let (third, third_data) = content(3, 1100);
    in_child(|| new_worker.put(&third, &third_data));
    assert_eq!(new_worker.get(&third, third_data.len()).as_deref(), Some(&third_data[..]));
}

#[test]
fn concurrent_puts_and_gets_on_two_mappings_never_return_wrong_bytes() {
    let fd = region(16);
    let mappings = [adopt(&fd), adopt(&fd)];
    // More chunks than slots, of many lengths, so slots are rewritten under readers all along.
    let chunks: Vec<_> = (0..40).map(|i| content(i, 1 + (i as usize * 997) % SLOT)).collect();
    std::thread::scope(|scope| {
        for thread in 0..4u64 {
            let (shared, chunks) = (&mappings[thread as usize % 2], &chunks);
            scope.spawn(move || {
                let mut random = thread.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..5000 {
                    // xorshift64: reproducible, no dependency.
                    random ^= random << 13;
                    random ^= random >> 7;
                    random ^= random << 17;
                    let (digest, data) = &chunks[(random >> 8) as usize % chunks.len()];
                    if random & 1 == 0 {
                        shared.put(digest, data);
                    } else if let Some(got) = shared.get(digest, data.len()) {
                        assert_eq!(&got[..], &data[..], "wrong bytes for {digest}");
                    }
                }
            });
        }
    });
    for shared in &mappings {
        assert!(shared.stats.hits.load(Ordering::Relaxed) > 0);
        assert_eq!(shared.stats.discarded.load(Ordering::Relaxed), 0, "live writers never leave a slot torn");
    }
}
