//! [`ImageFs`] driven through the [`Filesystem`] trait the FUSE session calls, without a
//! mount: an image built from a small source tree into the in-memory store, and the source
//! tree itself (read with `std::fs`) as the oracle.

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use phoenixfs_builder::{build, BuildOptions};
use phoenixfs_cache::{ChunkCache, FetchPolicy};
use phoenixfs_format::ImageFile;
use phoenixfs_fuse::{Filesystem, Piece, ROOT_NODEID};
use phoenixfs_store::MemoryStore;

use super::ImageFs;

struct Fixture {
    src: tempfile::TempDir,
    _cache: tempfile::TempDir,
    store: Arc<MemoryStore>,
    fs: Arc<ImageFs>,
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A tree with inline, single-chunk, multi-chunk and sparse files, a symlink, a nested
/// directory and an xattr, built with 4 KiB chunks; served with a fetch deadline, so that a
/// store that fails for good ends in an error (as with `mount --fetch-deadline`).
fn fixture() -> Fixture {
    let src = tempfile::tempdir().unwrap();
    let root = src.path();
    fs::write(root.join("tiny"), b"hello").unwrap();
    fs::write(root.join("small"), bytes(1, 3000)).unwrap();
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("dir/sub/many-chunks"), bytes(2, 50_000)).unwrap();
    for i in 0..40 {
        fs::write(root.join(format!("dir/f{i:02}")), bytes(10 + i, i as usize * 300)).unwrap();
    }
    let sparse = fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(1 << 20).unwrap();
    nix::sys::uio::pwrite(&sparse, &bytes(3, 4096), 512 << 10).unwrap();
    symlink("dir/sub/many-chunks", root.join("link")).unwrap();
    xattr::set(root.join("tiny"), "user.colour", b"blue").unwrap();

    let store = Arc::new(MemoryStore::new());
    let built = build(root, store.as_ref(), &BuildOptions { chunk_bits: 12, ..BuildOptions::default() }).unwrap();
    let image = ImageFile::decode(built.image_file).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let policy = FetchPolicy { deadline: Some(Duration::from_millis(300)) };
    let cache = Arc::new(ChunkCache::open(cache_dir.path(), 1 << 30, 1 << 20, None).unwrap().with_policy(policy));
    let fs = ImageFs::new(Arc::new(image), store.clone(), cache, 0, None).unwrap();
    Fixture { src, _cache: cache_dir, store, fs }
}

fn as_trait(fs: &ImageFs) -> &dyn Filesystem {
    fs
}

/// The nodeid of `path` (relative, `/`-separated), looked up name by name from the root.
fn walk(fs: &dyn Filesystem, path: &str) -> Result<u64, Errno> {
    path.split('/').filter(|p| !p.is_empty()).try_fold(ROOT_NODEID, |node, name| fs.lookup(node, name.as_bytes()).map(|e| e.attr.ino))
}

/// The whole file, in READs of `piece` bytes as the kernel sends them.
fn read_all(fs: &dyn Filesystem, node: u64, size: u64, piece: u32) -> Result<Vec<u8>, Errno> {
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        for piece in fs.read(node, out.len() as u64, piece)? {
            match piece {
                Piece::Zeros(n) => out.resize(out.len() + n, 0),
                Piece::Shared { data, start, end } => out.extend_from_slice(&data[start..end]),
                Piece::Owned(v) => out.extend_from_slice(&v),
            }
        }
    }
    Ok(out)
}

fn source_files(dir: &Path, rel: &str, out: &mut Vec<String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = format!("{rel}{}", entry.file_name().to_str().unwrap());
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            source_files(&entry.path(), &format!("{name}/"), out);
        } else if kind.is_file() {
            out.push(name);
        }
    }
}

#[test]
fn every_file_reads_as_the_source_and_stats_as_it() {
    let fixture = fixture();
    let fs = as_trait(&fixture.fs);
    let mut files = Vec::new();
    source_files(fixture.src.path(), "", &mut files);
    assert!(files.len() > 40);
    for rel in files {
        let meta = fs::metadata(fixture.src.path().join(&rel)).unwrap();
        let node = walk(fs, &rel).unwrap();
        let attr = fs.getattr(node).unwrap();
        assert_eq!((attr.size, attr.mode, attr.uid, attr.gid, attr.mtime), (meta.size(), meta.mode(), meta.uid(), meta.gid(), meta.mtime()), "{rel}");
        let expected = fs::read(fixture.src.path().join(&rel)).unwrap();
        for piece in [4096, 128 << 10, 1 << 20] {
            assert!(read_all(fs, node, attr.size, piece).unwrap() == expected, "{rel} read in pieces of {piece}");
        }
    }
}

#[test]
fn directories_list_as_the_source_from_any_cookie() {
    let fixture = fixture();
    let fs = as_trait(&fixture.fs);
    let node = walk(fs, "dir").unwrap();
    let expected: BTreeSet<Vec<u8>> =
        fs::read_dir(fixture.src.path().join("dir")).unwrap().map(|e| e.unwrap().file_name().into_encoded_bytes()).chain([b".".to_vec(), b"..".to_vec()]).collect();
    let mut listing = Vec::new();
    fs.readdir(node, 0, &mut |entry| {
        listing.push((entry.name, entry.next_cookie));
        true
    })
    .unwrap();
    assert_eq!(listing.iter().map(|(name, _)| name.clone()).collect::<BTreeSet<_>>(), expected);
    assert_eq!(listing.len(), expected.len(), "no duplicates");
    // Resuming from the cookie after entry i lists exactly the entries after it.
    for (i, (_, cookie)) in listing.iter().enumerate() {
        let mut rest = Vec::new();
        fs.readdir(node, *cookie, &mut |entry| {
            rest.push(entry.name);
            true
        })
        .unwrap();
        assert_eq!(rest, listing[i + 1..].iter().map(|(name, _)| name.clone()).collect::<Vec<_>>());
    }
}

#[test]
fn symlinks_xattrs_and_holes_answer_as_the_source() {
    let fixture = fixture();
    let fs = as_trait(&fixture.fs);
    let link = walk(fs, "link").unwrap();
    assert_eq!(fs.readlink(link).unwrap(), fs::read_link(fixture.src.path().join("link")).unwrap().into_os_string().into_encoded_bytes());
    let tiny = walk(fs, "tiny").unwrap();
    assert_eq!(fs.getxattr(tiny, b"user.colour").unwrap(), b"blue");
    assert!(fs.listxattr(tiny).unwrap().split(|&c| c == 0).any(|name| name == b"user.colour"));
    let sparse = walk(fs, "sparse").unwrap();
    let source = fs::File::open(fixture.src.path().join("sparse")).unwrap();
    for (offset, whence, mode) in [
        (0, libc::SEEK_DATA, Whence::SeekData),
        (0, libc::SEEK_HOLE, Whence::SeekHole),
        (600 << 10, libc::SEEK_HOLE, Whence::SeekHole),
        (300 << 10, libc::SEEK_DATA, Whence::SeekData),
    ] {
        let expected = lseek(source.as_raw_fd(), offset, mode).map(|at| at as u64);
        assert_eq!(fs.lseek(sparse, offset as u64, whence as u32), expected, "lseek({offset}, {whence})");
    }
    assert_eq!(fs.lseek(sparse, 2 << 20, libc::SEEK_DATA as u32), Err(Errno::ENXIO));
}

#[test]
fn questions_without_an_answer_get_the_errno_a_kernel_file_system_gives() {
    let fixture = fixture();
    let fs = as_trait(&fixture.fs);
    let (file, dir) = (walk(fs, "tiny").unwrap(), walk(fs, "dir").unwrap());
    assert_eq!(walk(fs, "no-such-name"), Err(Errno::ENOENT));
    assert_eq!(fs.lookup(file, b"x").unwrap_err(), Errno::ENOTDIR);
    assert_eq!(fs.open(dir).unwrap_err(), Errno::EISDIR);
    assert!(fs.open(file).is_ok());
    assert_eq!(fs.read(dir, 0, 10).unwrap_err(), Errno::EINVAL);
    assert_eq!(fs.readlink(file).unwrap_err(), Errno::EINVAL);
    assert_eq!(fs.getxattr(file, b"user.none").unwrap_err(), Errno::ENODATA);
    assert_eq!(fs.getattr(0).unwrap_err(), Errno::EINVAL);
    assert_eq!(fs.lseek(file, 0, 99).unwrap_err(), Errno::EINVAL);
    assert_eq!(fixture.fs.stats.errors.load(Ordering::Relaxed), 0, "answers, not faults");
}

#[test]
fn a_chunk_the_store_keeps_corrupting_past_the_deadline_is_an_error_counted_once_per_read() {
    let fixture = fixture();
    let fs = as_trait(&fixture.fs);
    let node = walk(fs, "dir/sub/many-chunks").unwrap();
    fixture.store.corrupt_reads.store(true, Ordering::Relaxed);
    assert_eq!(fs.read(node, 0, 4096).unwrap_err(), Errno::EIO);
    assert_eq!(fixture.fs.stats.errors.load(Ordering::Relaxed), 1);
    // Inline data needs no chunk and still reads.
    let tiny = walk(fs, "tiny").unwrap();
    assert_eq!(read_all(fs, tiny, 5, 4096).unwrap(), b"hello");
    fixture.store.corrupt_reads.store(false, Ordering::Relaxed);
    assert!(read_all(fs, node, 50_000, 4096).unwrap() == bytes(2, 50_000));
}
