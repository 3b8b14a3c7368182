//! Everything observable about a tree, gathered either through the file system (the source,
//! a kernel mount, a phoenixfs mount) or through our own image reader, so that any two can be
//! compared path by path.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use phoenixfs_format::chunk::decode_chunk;
use phoenixfs_format::{ExtentTarget, ImageFile, InodeKind};
use phoenixfs_store::ChunkStore;
use sha2::{Digest as _, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 'd', 'f', 'l', 'c', 'b', 'p', 's'
    pub kind: char,
    /// Full st_mode.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Size of everything but directories (whose size is format-specific).
    pub size: Option<u64>,
    pub mtime: (i64, u32),
    pub symlink_target: Option<Vec<u8>>,
    pub rdev: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub sha256: Option<String>,
    /// For hard-linked files: the first path (in sorted order) of the group.
    pub link_group: Option<String>,
}

/// Path (relative, "" for the root) to entry.
pub type Snapshot = BTreeMap<String, Entry>;

fn hash_reader(mut r: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Sets `link_group` from identity keys: groups of two or more paths share their first path.
fn assign_link_groups<K: std::hash::Hash + Eq>(snapshot: &mut Snapshot, keys: Vec<(String, K)>) {
    let mut groups: HashMap<K, Vec<String>> = HashMap::new();
    for (path, key) in keys {
        groups.entry(key).or_default().push(path);
    }
    for paths in groups.into_values().filter(|p| p.len() > 1) {
        let first = paths.iter().min().expect("non-empty").clone();
        for path in paths {
            snapshot.get_mut(&path).expect("path in snapshot").link_group = Some(first.clone());
        }
    }
}

/// The snapshot as text, one entry a line: trees seen on two machines compare with `diff`.
pub fn snapshot_lines(snapshot: &Snapshot) -> String {
    snapshot.iter().map(|(path, entry)| format!("{path:?}\t{entry:?}\n")).collect()
}

/// Snapshot through the file system (no symlinks followed).
pub fn snapshot_dir(root: &Path) -> Snapshot {
    let mut snapshot = Snapshot::new();
    let mut keys = Vec::new();
    let mut pending = vec![String::new()];
    while let Some(rel) = pending.pop() {
        let path = if rel.is_empty() { root.to_path_buf() } else { root.join(&rel) };
        let meta = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            's'
        };
        let mut xattrs = BTreeMap::new();
        for name in xattr::list(&path).unwrap_or_else(|e| panic!("listxattr {}: {e}", path.display())) {
            let value = xattr::get(&path, &name).expect("getxattr").unwrap_or_default();
            xattrs.insert(name.as_bytes().to_vec(), value);
        }
        let sha256 = (kind == 'f').then(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            hash_reader(file).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        });
        let symlink_target = (kind == 'l').then(|| fs::read_link(&path).expect("readlink").as_os_str().as_bytes().to_vec());
        if kind != 'd' {
            keys.push((rel.clone(), (meta.dev(), meta.ino())));
        }
        snapshot.insert(
            rel.clone(),
            Entry {
                kind,
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                size: (kind != 'd').then(|| meta.size()),
                mtime: (meta.mtime(), meta.mtime_nsec() as u32),
                symlink_target,
                rdev: if matches!(kind, 'c' | 'b') { meta.rdev() } else { 0 },
                xattrs,
                sha256,
                link_group: None,
            },
        );
        if kind == 'd' {
            for entry in fs::read_dir(&path).expect("readdir") {
                let name = entry.expect("dirent").file_name();
                let name = name.to_str().unwrap_or_else(|| panic!("test trees use UTF-8 names: {name:?}"));
                pending.push(if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") });
            }
        }
    }
    assign_link_groups(&mut snapshot, keys);
    snapshot
}

/// Snapshot through phoenixfs's own image reader, file data fetched from `store`.
pub fn snapshot_image(image: &ImageFile, store: &dyn ChunkStore) -> Snapshot {
    let bootstrap = &image.bootstrap;
    let mut chunks: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut snapshot = Snapshot::new();
    let mut keys = Vec::new();
    for (path, inode) in bootstrap.walk().expect("walk image") {
        let rel = String::from_utf8(path).expect("utf-8 path").trim_start_matches('/').to_string();
        let kind = match inode.kind {
            InodeKind::Dir => 'd',
            InodeKind::File => 'f',
            InodeKind::Symlink => 'l',
            InodeKind::CharDevice => 'c',
            InodeKind::BlockDevice => 'b',
            InodeKind::Fifo => 'p',
            InodeKind::Socket => 's',
        };
        let sha256 = (kind == 'f').then(|| {
            let mut hasher = Sha256::new();
            for extent in bootstrap.extents(&inode, 0, inode.size()).expect("extents") {
                match extent.target {
                    ExtentTarget::Hole => hasher.update(vec![0u8; extent.len as usize]),
                    ExtentTarget::Bootstrap { offset } => {
                        hasher.update(&bootstrap.bytes()[offset as usize..(offset + extent.len) as usize])
                    }
                    ExtentTarget::Blob { offset } => {
                        let chunk = image.table.locate(offset).expect("blob offset in the chunk table");
                        let data = chunks.entry(chunk.index).or_insert_with(|| {
                            let stored = store.get_chunk(&chunk.entry).expect("chunk in store");
                            decode_chunk(&chunk.entry, &stored).expect("chunk verifies")
                        });
                        let within = chunk.within;
                        let mut piece = data[within..data.len().min(within + extent.len as usize)].to_vec();
                        piece.resize(extent.len as usize, 0);
                        hasher.update(piece);
                    }
                }
            }
            hex::encode(hasher.finalize())
        });
        if kind != 'd' {
            keys.push((rel.clone(), inode.nid));
        }
        let xattrs = bootstrap.xattrs(&inode).expect("xattrs").into_iter().map(|x| (x.name, x.value)).collect();
        snapshot.insert(
            rel,
            Entry {
                kind,
                mode: inode.mode().into(),
                uid: inode.uid(),
                gid: inode.gid(),
                size: (kind != 'd').then(|| inode.size()),
                mtime: (inode.mtime(), inode.mtime_nsec()),
                symlink_target: (kind == 'l').then(|| bootstrap.read_link(&inode).expect("readlink")),
                rdev: inode.rdev(),
                xattrs,
                sha256,
                link_group: None,
            },
        );
    }
    assign_link_groups(&mut snapshot, keys);
    snapshot
}

/// Human-readable differences between two snapshots; empty when they are equal.
pub fn differences(expected: &Snapshot, actual: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (path, want) in expected {
        match actual.get(path) {
            None => out.push(format!("missing: {path:?}")),
            Some(got) if got != want => out.push(format!("differs: {path:?}\n  expected {want:?}\n  actual   {got:?}")),
            Some(_) => {}
        }
    }
    for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
        out.push(format!("unexpected: {path:?}"));
    }
    out
}

/// Panics with the first differences when the snapshots differ.
pub fn assert_same(expected: &Snapshot, actual: &Snapshot, what: &str) {
    let diffs = differences(expected, actual);
    assert!(diffs.is_empty(), "{what}: {} differences, first ones:\n{}", diffs.len(), diffs.iter().take(10).cloned().collect::<Vec<_>>().join("\n"));
}

/// sha256 of a file read through a shared, read-only memory map (an empty file hashes as "").
pub fn sha256_via_mmap(path: &Path) -> std::io::Result<String> {
    use std::os::fd::AsRawFd;
    let file = File::open(path)?;
    let len = file.metadata()?.len() as usize;
    if len == 0 {
        return Ok(hex::encode(Sha256::digest(b"")));
    }
    // SAFETY: a fresh shared mapping of a file we keep open; unmapped before returning, and
    // the file system is read-only, so the bytes cannot change underneath.
    unsafe {
        let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let digest = hex::encode(Sha256::digest(std::slice::from_raw_parts(addr as *const u8, len)));
        libc::munmap(addr, len);
        Ok(digest)
    }
}
