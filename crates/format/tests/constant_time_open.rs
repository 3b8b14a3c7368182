//! `ImageFile::from_verified` costs the same at any image size: it reads the footer, block 0
//! (superblock and device slot) and the chunk table header, and no other byte; a table entry
//! is read when it is asked for, and only it.
//!
//! Timing would be noisy, so this proves it by access instead: the image lives in an anonymous
//! mapping whose pages are all PROT_NONE except those a step may read. A read of any other
//! page kills this test binary with SIGSEGV, which fails the test. (Each test file is its own
//! binary, so such a crash names this file.)

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use phoenixfs_format::tree::{Attr, FileData, Node, NodeKind, Tree, TreeEntry};
use phoenixfs_format::writer::{write_bootstrap, BlobDevice};
use phoenixfs_format::{ChunkEntry, ChunkTable, Compression, Digest, ImageBytes, ImageFile};

const CHUNKS: u32 = 1000;
const FOOTER_SIZE: usize = 64;
const TABLE_HEADER_SIZE: usize = 16;
const TABLE_ENTRY_SIZE: usize = 112;

/// Image file bytes in a private anonymous mapping, every page unreadable until allowed.
struct GuardedImage {
    base: *mut u8,
    mapped: usize,
    len: usize,
    page: usize,
    /// Indexes of the pages made readable so far.
    readable: Mutex<BTreeSet<usize>>,
}

// SAFETY: the mapping is written only in `new`, before the value can be shared; afterwards
// only its protection changes, and a read of a protected page traps, never returns other bytes.
unsafe impl Send for GuardedImage {}
// SAFETY: as for Send: nothing writes the bytes once they are shared.
unsafe impl Sync for GuardedImage {}

impl GuardedImage {
    fn new(file: &[u8]) -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
        let mapped = file.len().next_multiple_of(page);
        // SAFETY: a fresh private anonymous mapping; it aliases nothing.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), mapped, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        let base = base.cast::<u8>();
        // SAFETY: `base` is writable for `mapped >= file.len()` bytes and cannot overlap `file`.
        unsafe { std::ptr::copy_nonoverlapping(file.as_ptr(), base, file.len()) };
        let guarded = GuardedImage { base, mapped, len: file.len(), page, readable: Mutex::default() };
        guarded.protect(0..mapped, libc::PROT_NONE);
        guarded
    }

    /// Makes the pages holding `bytes` readable.
    fn allow(&self, bytes: Range<usize>) {
        let pages = bytes.start / self.page..bytes.end.div_ceil(self.page);
        self.protect(pages.start * self.page..pages.end * self.page, libc::PROT_READ);
        self.readable.lock().unwrap().extend(pages);
    }

    fn protect(&self, pages: Range<usize>, protection: libc::c_int) {
        assert!(pages.end <= self.mapped);
        // SAFETY: a page-aligned range inside our own mapping; no Rust value lives in it except
        // the slices `as_ref` hands out, which only read.
        let rc = unsafe { libc::mprotect(self.base.add(pages.start).cast(), pages.len(), protection) };
        assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
    }

    fn readable_pages(&self) -> usize {
        self.readable.lock().unwrap().len()
    }
}

impl AsRef<[u8]> for GuardedImage {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `base` points to `len` bytes mapped for the life of `self` and never written
        // again; pages that are not allowed trap on reading, which is what this test detects.
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }
}

impl Drop for GuardedImage {
    fn drop(&mut self) {
        // SAFETY: our own mapping; every slice of it borrowed `self`, so none outlives this.
        unsafe { libc::munmap(self.base.cast(), self.mapped) };
    }
}

/// An image of one file of CHUNKS blob chunks and a directory of 300 names: many pages of
/// inodes, chunk indexes, directory blocks and table entries that opening must not touch.
fn large_image() -> (Vec<u8>, ChunkTable, usize) {
    let node = |kind| Node { attr: Attr { mode: 0o644, uid: 0, gid: 0, mtime: 0, mtime_nsec: 0 }, xattrs: Vec::new(), kind };
    let table = ChunkTable {
        chunk_bits: 12,
        entries: (0..CHUNKS)
            .map(|i| ChunkEntry::new(Digest::of(&i.to_le_bytes()), 4096, Compression::None, &[0; 4096]))
            .collect(),
    };
    let names = (0..300).map(|i| TreeEntry { name: format!("name-{i:04}").into_bytes(), node: 2 }).collect();
    let tree = Tree {
        nodes: vec![
            node(NodeKind::Dir(vec![TreeEntry { name: b"big".to_vec(), node: 1 }, TreeEntry { name: b"many".to_vec(), node: 3 }])),
            node(NodeKind::File(FileData::Chunked { size: u64::from(CHUNKS) * 4096, chunks: (0..CHUNKS).map(Some).collect() })),
            node(NodeKind::File(FileData::Inline(b"x".to_vec()))),
            node(NodeKind::Dir(names)),
        ],
    };
    let blob = BlobDevice { tag: table.blob_tag(), chunk_bits: 12, chunks: CHUNKS };
    let bootstrap = write_bootstrap(&tree, &blob).unwrap();
    let bootstrap_len = bootstrap.len();
    (ImageFile::encode(&bootstrap, &table), table, bootstrap_len)
}

#[test]
fn from_verified_reads_only_the_footer_block_0_and_the_table_header() {
    let (file, table, bootstrap_len) = large_image();
    let id = ImageFile::decode(file.clone()).unwrap().id;
    let guarded = Arc::new(GuardedImage::new(&file));
    guarded.allow(0..4096);
    guarded.allow(bootstrap_len..bootstrap_len + TABLE_HEADER_SIZE);
    guarded.allow(file.len() - FOOTER_SIZE..file.len());
    let readable = guarded.readable_pages();
    let pages = file.len().div_ceil(guarded.page);
    assert!(readable * 4 < pages, "only {readable} of {pages} pages may be read; the rest must be guarded");

    let image = ImageFile::from_verified(ImageBytes::new(guarded.clone()), id).unwrap();
    assert_eq!(image.id, id);
    assert_eq!(image.table.len(), CHUNKS as usize);
    assert_eq!(image.table.blob_len(), u64::from(CHUNKS) << 12);
    assert_eq!(image.bootstrap.blob().map(|(tag, len)| (*tag, len)), Some((table.blob_tag(), u64::from(CHUNKS) << 12)));

    // One entry read lazily touches that entry and nothing else.
    let index = 700;
    let entry_at = bootstrap_len + TABLE_HEADER_SIZE + index * TABLE_ENTRY_SIZE;
    guarded.allow(entry_at..entry_at + TABLE_ENTRY_SIZE);
    let location = image.table.locate((index as u64) << 12 | 5).unwrap();
    assert_eq!((location.index, location.within, location.entry), (index, 5, table.entries[index]));
    assert!(guarded.readable_pages() * 4 < pages);
}
