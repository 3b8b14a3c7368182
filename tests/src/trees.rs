//! Source trees for the tests: one that holds every case the format must carry, and a real
//! one copied from the system.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::fcntl::AtFlags;
use nix::unistd::{fchownat, mkfifo, Gid, Uid};

use crate::run_ok;

/// Deterministic pseudo-random bytes (xorshift), incompressible enough to be stored raw.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown(path: &Path, uid: u32, gid: u32) {
    fchownat(None, path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), AtFlags::AT_SYMLINK_NOFOLLOW).expect("lchown");
}

fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let t = TimeSpec::new(sec, nsec);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).expect("utimensat");
}

/// A valid `security.capability` value (VFS_CAP_REVISION_2, effective, cap_net_bind_service).
fn capability_value() -> Vec<u8> {
    let mut v = Vec::new();
    for word in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}

/// Size of the large sparse file in the all-cases tree.
pub const SPARSE_SIZE: u64 = 5 << 30;
/// Entries in the big directory of the all-cases tree.
pub const BIG_DIR_ENTRIES: usize = 100_000;

/// Fills `root` with every file type and attribute phoenixfs must carry; see the issue list
/// in the README. Needs root (devices, owners, trusted.* xattrs).
pub fn all_cases(root: &Path) {
    let files = root.join("files");
    fs::create_dir_all(&files).unwrap();
    write(&files.join("empty"), b"");
    write(&files.join("tiny"), b"hello\n");
    write(&files.join("inline-max"), &noise(1, 4096 - 64));
    write(&files.join("just-over-inline"), &noise(2, 4096 - 63));
    write(&files.join("one-chunk"), &noise(3, 1 << 20));
    write(&files.join("chunk-plus-one"), &noise(4, (1 << 20) + 1));
    write(&files.join("many-chunks"), &noise(5, (7 << 20) + 12345));
    write(&files.join("many-chunks-copy"), &noise(5, (7 << 20) + 12345));
    write(&files.join("compressible"), &b"phoenixfs compresses text well. ".repeat(100_000));
    write(&files.join("zeros"), &vec![0u8; 3 << 20]);
    let sparse = File::create(files.join("sparse")).unwrap();
    sparse.set_len(SPARSE_SIZE).unwrap();
    sparse.write_all_at(b"start", 0).unwrap();
    sparse.write_all_at(&noise(6, 300_000), 2 << 30).unwrap();
    sparse.write_all_at(b"end", SPARSE_SIZE - 3).unwrap();
    drop(sparse);
    let mut appended = OpenOptions::new().create(true).append(true).open(files.join("names with spaces & ünïcödé")).unwrap();
    appended.write_all(b"odd name\n").unwrap();
    write(&files.join("n".repeat(255)), b"longest name\n");
    write(&files.join("-sorts-before-dot"), b"x");

    let modes = root.join("modes");
    fs::create_dir_all(&modes).unwrap();
    for (name, mode) in [("setuid", 0o4755), ("setgid", 0o2755), ("none", 0o000), ("private", 0o600), ("all", 0o7777)] {
        write(&modes.join(name), name.as_bytes());
        chmod(&modes.join(name), mode);
    }
    fs::create_dir(modes.join("sticky")).unwrap();
    chmod(&modes.join("sticky"), 0o1777);
    fs::create_dir(modes.join("setgid-dir")).unwrap();
    chmod(&modes.join("setgid-dir"), 0o2775);
    write(&modes.join("owned"), b"owned");
    chown(&modes.join("owned"), 1234, 5678);
    fs::create_dir(modes.join("owned-dir")).unwrap();
    chown(&modes.join("owned-dir"), 4_000_000_000, 70_000);

    let links = root.join("links");
    fs::create_dir_all(links.join("sub")).unwrap();
    symlink("../files/tiny", links.join("relative")).unwrap();
    symlink("/nowhere/at/all", links.join("dangling")).unwrap();
    symlink("t".repeat(4095), links.join("longest-target")).unwrap();
    symlink("x".repeat(4096 - 64 - 1), links.join("not-inline-target")).unwrap();
    chown(&links.join("relative"), 42, 43);
    write(&links.join("hard"), &noise(7, 200_000));
    fs::hard_link(links.join("hard"), links.join("sub/hard-2")).unwrap();
    fs::hard_link(links.join("hard"), root.join("hard-3")).unwrap();
    write(&links.join("small-hard"), b"small and linked");
    fs::hard_link(links.join("small-hard"), links.join("sub/small-hard-2")).unwrap();

    let special = root.join("special");
    fs::create_dir_all(&special).unwrap();
    mknod(&special.join("null"), SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), nix::sys::stat::makedev(1, 3)).unwrap();
    mknod(&special.join("big-numbers"), SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), nix::sys::stat::makedev(4000, 1_000_000)).unwrap();
    mknod(&special.join("loop7"), SFlag::S_IFBLK, Mode::from_bits_truncate(0o660), nix::sys::stat::makedev(7, 7)).unwrap();
    mkfifo(&special.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    drop(std::os::unix::net::UnixListener::bind(special.join("socket")).unwrap());

    let xattrs = root.join("xattrs");
    fs::create_dir_all(&xattrs).unwrap();
    let tagged = xattrs.join("tagged");
    write(&tagged, b"tagged");
    xattr::set(&tagged, "user.color", b"blue").unwrap();
    xattr::set(&tagged, "user.empty", b"").unwrap();
    xattr::set(&tagged, "trusted.secret", b"\x00\x01binary\xff").unwrap();
    xattr::set(&tagged, "user.big", &noise(8, 3000)).unwrap();
    let capable = xattrs.join("capable");
    write(&capable, b"#!/bin/sh\n");
    chmod(&capable, 0o755);
    xattr::set(&capable, "security.capability", &capability_value()).unwrap();
    let big_and_tagged = xattrs.join("chunked-with-xattrs");
    write(&big_and_tagged, &noise(9, 50_000));
    xattr::set(&big_and_tagged, "user.many", &noise(10, 2000)).unwrap();
    xattr::set(&xattrs, "user.on-a-dir", b"yes").unwrap();
    symlink("tagged", xattrs.join("tagged-link")).unwrap();
    xattr::set(xattrs.join("tagged-link"), "trusted.on-a-link", b"yes").unwrap();

    let big_dir = root.join("big-dir");
    fs::create_dir_all(&big_dir).unwrap();
    for i in 0..BIG_DIR_ENTRIES {
        File::create(big_dir.join(format!("entry-{i:06}"))).unwrap();
    }

    let deep = (0..40).fold(root.join("deep"), |p, i| p.join(format!("level{i}")));
    fs::create_dir_all(&deep).unwrap();
    write(&deep.join("bottom"), b"bottom");

    // Times last: creating entries changes directory mtimes.
    for (n, path) in (1..).zip(walk_paths(root)) {
        set_mtime(&path, 1_600_000_000 + n * 7, (n * 123_456_789) % 1_000_000_000);
    }
    set_mtime(&files.join("tiny"), -1, 5);
}

/// Every path under `root` (root included), deepest first so that setting a directory's time
/// comes after its children.
fn walk_paths(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                pending.push(entry.unwrap().path());
            }
        }
        out.push(path);
    }
    out.reverse();
    out
}

/// Copies parts of /usr (and Python's library) into `root` until it holds at least
/// `min_entries` entries; returns how many it holds.
pub fn real_tree(root: &Path, min_entries: usize) -> usize {
    let candidates = ["/usr/share/man", "/usr/include", "/usr/share/locale", "/usr/share/doc", "/usr/lib/python3", "/usr/share/perl"];
    let mut count = 0;
    for source in candidates.iter().map(Path::new).filter(|p| p.is_dir()) {
        if count >= min_entries {
            break;
        }
        let target = root.join(source.strip_prefix("/").unwrap());
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        run_ok(Command::new("cp").arg("-a").arg(source).arg(&target));
        count += walk_paths(&target).len();
    }
    assert!(count >= min_entries, "only {count} entries found under /usr to copy");
    count
}
