//! The reader never trusts an image: truncated, bit-flipped and garbage bootstraps and image
//! files give errors, never panics or endless loops, whether they are opened with
//! `ImageFile::decode` (which proves them) or `ImageFile::from_verified` (which takes the
//! caller's word and leaves every check to the accessors).

use phoenixfs_format::summary::summarize;
use phoenixfs_format::tree::{Attr, FileData, Node, NodeKind, Tree, TreeEntry, Xattr};
use phoenixfs_format::writer::{write_bootstrap, BlobDevice};
use phoenixfs_format::{
    Bootstrap, ChunkEntry, ChunkTable, Compression, Digest, Extent, ExtentTarget, FormatError, ImageFile, ImageId, InodeKind,
};
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
            .map(|i| ChunkEntry::new(Digest::of(&i.to_le_bytes()), 4096, Compression::None, &[0; 4096]))
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
    exercise_bootstrap(&b, &mut |_| {});
}

/// Every bootstrap accessor on every path `b` yields; `on_blob` gets each blob extent.
fn exercise_bootstrap(b: &Bootstrap, on_blob: &mut dyn FnMut(&Extent)) {
    let Ok(paths) = b.walk() else { return };
    for (path, inode) in paths {
        let _ = b.resolve(&path);
        let _ = b.xattrs(&inode);
        match inode.kind {
            InodeKind::Dir => {
                let _ = b.lookup(&inode, b"f0100");
                let _ = b.lookup(&inode, b"zzz");
                let _ = b.for_each_dir_entry(&inode, 5, &mut |_, _| true);
            }
            InodeKind::Symlink => drop(b.read_link(&inode)),
            InodeKind::File => {
                for extent in b.extents(&inode, 0, u64::MAX).unwrap_or_default() {
                    match extent.target {
                        // The daemon slices bootstrap extents without another check.
                        ExtentTarget::Bootstrap { offset } => {
                            assert!(offset.checked_add(extent.len).is_some_and(|end| end <= b.bytes().len() as u64))
                        }
                        ExtentTarget::Blob { .. } => on_blob(&extent),
                        ExtentTarget::Hole => {}
                    }
                }
            }
            _ => {}
        }
    }
}
/// Every image and chunk table accessor, as a daemon uses them, on an opened image.
fn exercise_image(image: &ImageFile) {
    let table = &image.table;
    exercise_bootstrap(&image.bootstrap, &mut |extent| {
        let ExtentTarget::Blob { offset } = extent.target else { return };
        for at in [offset, offset + extent.len - 1] {
            // Opening checked the blob size against the table, and extents against the blob.
            assert!(!matches!(table.locate(at), Err(FormatError::BeyondBlob { .. })), "blob extent at {at} beyond the table");
        }
    });
    let _ = table.entries().collect::<Vec<_>>();
    let _ = table.entry(table.len());
    for offset in [0, table.blob_len().saturating_sub(1), table.blob_len(), u64::MAX] {
        let _ = table.locate(offset);
    }
    let _ = summarize(image);
}

/// `from_verified` on a damaged copy of the sample; errors are fine, panics are not.
fn exercise_unverified(file: Vec<u8>) {
    if let Ok(image) = ImageFile::from_verified(file, ImageId(Digest::of(b"claimed"))) {
        exercise_image(&image);
    }
}

fn sample_file() -> Vec<u8> {
    let (bootstrap, table) = sample();
    ImageFile::encode(&bootstrap, &table)
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// `from_verified` checks no checksum, so flipped bytes reach every accessor.
    #[test]
    fn bit_flipped_image_files_opened_as_verified_never_panic(flips in proptest::collection::vec((any::<usize>(), 0u8..8), 1..4)) {
        let mut file = sample_file();
        for (at, bit) in flips {
            let at = at % file.len();
            file[at] ^= 1 << bit;
        }
        exercise_unverified(file);
    }

    /// The same, with flips only in the metadata blocks and the table, where they hurt most.
    #[test]
    fn flipped_metadata_and_table_bytes_opened_as_verified_never_panic(at in 1024usize..8192, in_table in any::<bool>(), value in any::<u8>()) {
        let mut file = sample_file();
        let (bootstrap, _) = sample();
        let at = if in_table { bootstrap.len() + at % (file.len() - 64 - bootstrap.len()) } else { at };
        file[at] = value;
        exercise_unverified(file);
    }

    #[test]
    fn garbage_windows_in_image_files_opened_as_verified_never_panic(start in any::<usize>(), garbage in proptest::collection::vec(any::<u8>(), 1..12000)) {
        let mut file = sample_file();
        let start = start % file.len();
        let end = (start + garbage.len()).min(file.len());
        file[start..end].copy_from_slice(&garbage[..end - start]);
        exercise_unverified(file);
    }

    #[test]
    fn truncated_and_garbage_image_files_opened_as_verified_never_panic(keep in any::<usize>(), garbage in proptest::collection::vec(any::<u8>(), 0..200)) {
        let file = sample_file();
        exercise_unverified(file[..keep % file.len()].to_vec());
        exercise_unverified(garbage);
    }
}

/// Opening proven bytes in constant time gives the same answers as proving them.
#[test]
fn from_verified_answers_as_decode_does() {
    let decoded = ImageFile::decode(sample_file()).unwrap();
    let opened = ImageFile::from_verified(decoded.bytes().to_vec(), decoded.id).unwrap();
    assert_eq!(opened.id, decoded.id);
    assert_eq!(opened.bytes(), decoded.bytes());
    assert_eq!(opened.bootstrap.bytes(), decoded.bootstrap.bytes());
    assert_eq!(opened.bootstrap.blob(), decoded.bootstrap.blob());
    assert_eq!(opened.bootstrap.superblock(), decoded.bootstrap.superblock());
    assert_eq!(opened.table.chunk_bits(), decoded.table.chunk_bits());
    assert_eq!(opened.table.entries().collect::<Vec<_>>(), decoded.table.entries().collect::<Vec<_>>());
    assert_eq!(opened.table.blob_tag(), decoded.table.blob_tag());
    let (a, b) = (&decoded.bootstrap, &opened.bootstrap);
    let paths = a.walk().unwrap();
    assert_eq!(b.walk().unwrap(), paths);
    for (path, inode) in &paths {
        assert_eq!(b.resolve(path).unwrap().as_ref(), Some(inode));
        assert_eq!(b.inode(inode.nid).unwrap(), *inode);
        assert_eq!(b.xattrs(inode).unwrap(), a.xattrs(inode).unwrap());
        match inode.kind {
            InodeKind::Dir => assert_eq!(b.read_dir(inode).unwrap(), a.read_dir(inode).unwrap()),
            InodeKind::Symlink => assert_eq!(b.read_link(inode).unwrap(), a.read_link(inode).unwrap()),
            InodeKind::File => {
                let extents = a.extents(inode, 0, inode.size()).unwrap();
                assert_eq!(b.extents(inode, 0, inode.size()).unwrap(), extents);
                for extent in extents {
                    if let ExtentTarget::Blob { offset } = extent.target {
                        assert_eq!(opened.table.locate(offset).unwrap(), decoded.table.locate(offset).unwrap());
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(summarize(&opened).unwrap(), summarize(&decoded).unwrap());
}

/// The id `decode` gives is the sha256 of the whole file, as `ImageId::of` computes it.
#[test]
fn decode_names_an_image_by_the_sha256_of_all_its_bytes() {
    let file = sample_file();
    assert_eq!(ImageFile::decode(file.clone()).unwrap().id, ImageId::of(&file));
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

/// Metadata (version 2) reads back, takes part in the id and the checksum, and any damage to
/// it, to its length or to the version is rejected; an image without any stays version 1.
#[test]
fn metadata_reads_back_and_every_damage_to_it_is_rejected() {
    let (bootstrap, table) = sample();
    let metadata = br#"{"manifest_digest":"sha256:00"}"#;
    let file = ImageFile::encode_with_metadata(&bootstrap, &table, metadata).unwrap();
    let image = ImageFile::decode(file.clone()).unwrap();
    assert_eq!(image.metadata(), metadata);
    assert_eq!(ImageFile::from_verified(file.clone(), image.id).unwrap().metadata(), metadata);
    assert_eq!(summarize(&image).unwrap(), summarize(&ImageFile::decode(sample_file()).unwrap()).unwrap());
    assert_ne!(image.id, ImageId::of(&sample_file()));
    assert!(ImageFile::decode(sample_file()).unwrap().metadata().is_empty());
    assert_eq!(ImageFile::encode_with_metadata(&bootstrap, &table, &[]).unwrap(), sample_file());
    let body = file.len() - 64;
    for at in (body - metadata.len()..body).chain(body + 8..body + 16) {
        let mut flipped = file.clone();
        flipped[at] ^= 1;
        assert!(ImageFile::decode(flipped.clone()).is_err(), "flip at {at} accepted");
        exercise_unverified(flipped);
    }
}
