//! The reader never trusts an image: truncated, bit-flipped and garbage bootstraps and image
//! files give errors, never panics or endless loops.

use phoenixfs_format::summary::summarize;
use phoenixfs_format::tree::{Attr, FileData, Node, NodeKind, Tree, TreeEntry, Xattr};
use phoenixfs_format::writer::{write_bootstrap, BlobDevice};
use phoenixfs_format::{Bootstrap, ChunkEntry, ChunkTable, Compression, Digest, ExtentTarget, ImageFile, InodeKind};
use proptest::prelude::*;

fn node(kind: NodeKind) -> Node {
    Node { attr: Attr { mode: 0o755, uid: 1, gid: 2, mtime: 3, mtime_nsec: 4 }, xattrs: Vec::new(), kind }
}

fn entry(name: &str, node: usize) -> TreeEntry {
    TreeEntry { name: name.as_bytes().to_vec(), node }
}

/// A small image using every structure the reader parses.
fn sample() -> (Vec<u8>, ChunkTable) {
    let table = ChunkTable {
        chunk_bits: 12,
        entries: (0..3u32)
            .map(|i| ChunkEntry { digest: Digest::of(&i.to_le_bytes()), length: 4096, stored_length: 4096, compression: Compression::None })
            .collect(),
    };
    let mut tagged = node(NodeKind::File(FileData::Inline(b"inline data".to_vec())));
    tagged.xattrs = vec![Xattr { name: b"user.a".to_vec(), value: b"1".to_vec() }, Xattr { name: b"trusted.b".to_vec(), value: vec![7; 300] }];
    let many: Vec<TreeEntry> = (0..400).map(|i| entry(&format!("f{i:04}"), 7)).collect();
    let tree = Tree {
        nodes: vec![
            node(NodeKind::Dir(vec![entry("big", 1), entry("dir", 2), entry("link", 3), entry("tagged", 4), entry("dev", 5), entry("longlink", 6)])),
            node(NodeKind::File(FileData::Chunked { size: 4 * 4096 + 10, chunks: vec![Some(0), None, Some(1), Some(0), Some(2)] })),
            node(NodeKind::Dir(many)),
            node(NodeKind::Symlink(b"big".to_vec())),
            tagged,
            node(NodeKind::CharDevice(0x103)),
            node(NodeKind::Symlink(vec![b'x'; 4090])),
            node(NodeKind::File(FileData::Inline(Vec::new()))),
        ],
    };
    let blob = BlobDevice { tag: table.blob_tag(), chunk_bits: 12, chunks: 3 };
    (write_bootstrap(&tree, &blob).unwrap(), table)
}

/// Uses every reader entry point on whatever `bytes` is; errors are fine, panics are not.
fn exercise(bytes: Vec<u8>) {
    let Ok(b) = Bootstrap::new(bytes) else { return };
    let Ok(paths) = b.walk() else { return };
    for (path, inode) in paths {
        let _ = b.resolve(&path);
        let _ = b.xattrs(&inode);
        match inode.kind {
            InodeKind::Dir => {
                let _ = b.lookup(&inode, b"f0100");
                let _ = b.lookup(&inode, b"zzz");
            }
            InodeKind::Symlink => drop(b.read_link(&inode)),
            InodeKind::File => drop(b.extents(&inode, 0, u64::MAX)),
            _ => {}
        }
    }
}

#[test]
fn the_sample_reads_back() {
    let (bootstrap, table) = sample();
    let image = ImageFile::decode(ImageFile::encode(&bootstrap, &table)).unwrap();
    let summary = summarize(&image).unwrap();
    assert_eq!(summary.directories, 2);
    assert_eq!(summary.paths, 1 + 6 + 400);
    assert_eq!(summary.chunk_references, 4);
    let b = &image.bootstrap;
    let big = b.resolve(b"big").unwrap().unwrap();
    let extents = b.extents(&big, 4000, 5000).unwrap();
    let targets: Vec<_> = extents.iter().map(|e| (e.file_offset, e.len, e.target)).collect();
    assert_eq!(
        targets,
        [
            (4000, 96, ExtentTarget::Blob { offset: 4000 }),
            (4096, 4096, ExtentTarget::Hole),
            (8192, 808, ExtentTarget::Blob { offset: 4096 }),
        ]
    );
    assert_eq!(b.read_link(&b.resolve(b"longlink").unwrap().unwrap()).unwrap().len(), 4090);
    let tagged = b.resolve(b"tagged").unwrap().unwrap();
    assert_eq!(b.xattrs(&tagged).unwrap().len(), 2);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn bit_flipped_bootstraps_never_panic(flips in proptest::collection::vec((0usize..65536, 0u8..8), 1..4)) {
        let (mut bytes, _) = sample();
        for (at, bit) in flips {
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
        }
        exercise(bytes);
    }

    #[test]
    fn flipped_metadata_bytes_never_panic(at in 1024usize..8192, value in any::<u8>()) {
        let (mut bytes, _) = sample();
        bytes[at] = value;
        exercise(bytes);
    }

    #[test]
    fn truncated_bootstraps_never_panic(keep in 0usize..65536) {
        let (bytes, _) = sample();
        let keep = keep % bytes.len();
        exercise(bytes[..keep].to_vec());
    }

    #[test]
    fn garbage_after_a_valid_superblock_never_panics(garbage in proptest::collection::vec(any::<u8>(), 0..20000)) {
        let (bytes, _) = sample();
        let mut mixed = bytes[..2048].to_vec();
        mixed.extend(garbage);
        exercise(mixed);
    }
}

/// Exhaustive: a flip of any byte, and a cut at any length, is rejected.
#[test]
fn every_damaged_image_file_is_rejected() {
    let (bootstrap, table) = sample();
    let file = ImageFile::encode(&bootstrap, &table);
    for at in 0..file.len() {
        let mut flipped = file.clone();
        flipped[at] ^= 1 << (at % 8);
        assert!(ImageFile::decode(flipped).is_err(), "flip at {at} accepted");
    }
    for cut in 0..file.len() {
        assert!(ImageFile::decode(file[..cut].to_vec()).is_err(), "cut at {cut} accepted");
    }
}
