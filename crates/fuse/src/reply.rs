//! Encoding replies: plain values in, the bytes the kernel expects out. No I/O.

use fuse_abi::linux as abi;
use zerocopy::IntoBytes;

use crate::fs::{Attr, DirEntryOut, StatFs};

pub const OUT_HEADER_SIZE: usize = std::mem::size_of::<abi::fuse_out_header>();

/// How long the kernel may cache entries and attributes. The image never changes, so this is
/// as long as the kernel takes without overflowing (it caps the jiffies itself).
pub const FOREVER_SECS: u64 = 1 << 30;

pub fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER_SIZE] {
    let header = abi::fuse_out_header { len: len as u32, error, unique };
    let mut out = [0u8; OUT_HEADER_SIZE];
    out.copy_from_slice(header.as_bytes());
    out
}

/// Linux `new_encode_dev`, FUSE's `rdev` encoding.
fn encode_dev(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

pub fn fuse_attr(attr: &Attr) -> abi::fuse_attr {
    let mtime = attr.mtime as u64;
    abi::fuse_attr {
        ino: attr.ino,
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        atimensec: attr.mtime_nsec,
        mtimensec: attr.mtime_nsec,
        ctimensec: attr.mtime_nsec,
        mode: attr.mode,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: encode_dev(attr.rdev),
        blksize: 4096,
        flags: 0,
    }
}

pub fn entry_out(attr: &Attr) -> abi::fuse_entry_out {
    abi::fuse_entry_out {
        nodeid: attr.ino,
        generation: 0,
        entry_valid: FOREVER_SECS,
        attr_valid: FOREVER_SECS,
        entry_valid_nsec: 0,
        attr_valid_nsec: 0,
        attr: fuse_attr(attr),
    }
}

/// "No such name", to be remembered as long as the kernel likes (node id 0).
pub fn negative_entry_out() -> abi::fuse_entry_out {
    abi::fuse_entry_out { nodeid: 0, entry_valid: FOREVER_SECS, ..Default::default() }
}

pub fn attr_out(attr: &Attr) -> Vec<u8> {
    abi::fuse_attr_out { attr_valid: FOREVER_SECS, attr_valid_nsec: 0, dummy: 0, attr: fuse_attr(attr) }.as_bytes().to_vec()
}

pub fn statx_out(attr: &Attr) -> Vec<u8> {
    let time = abi::fuse_sx_time { tv_sec: attr.mtime, tv_nsec: attr.mtime_nsec, __reserved: 0 };
    let stat = abi::fuse_statx {
        mask: libc::STATX_BASIC_STATS,
        blksize: 4096,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        mode: attr.mode as u16,
        ino: attr.ino,
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: time,
        ctime: time,
        mtime: time,
        rdev_major: libc::major(attr.rdev),
        rdev_minor: libc::minor(attr.rdev),
        ..Default::default()
    };
    abi::fuse_statx_out { attr_valid: FOREVER_SECS, stat, ..Default::default() }.as_bytes().to_vec()
}

pub fn open_out(open_flags: u32) -> Vec<u8> {
    open_out_with(0, open_flags, 0)
}

pub fn open_out_with(fh: u64, open_flags: u32, backing_id: u32) -> Vec<u8> {
    abi::fuse_open_out { fh, open_flags, backing_id: backing_id as i32 }.as_bytes().to_vec()
}

pub fn statfs_out(s: &StatFs) -> Vec<u8> {
    let st = abi::fuse_kstatfs {
        blocks: s.blocks,
        files: s.files,
        bsize: s.block_size,
        frsize: s.block_size,
        namelen: s.name_max,
        ..Default::default()
    };
    abi::fuse_statfs_out { st }.as_bytes().to_vec()
}

pub fn xattr_size_out(size: u32) -> Vec<u8> {
    abi::fuse_getxattr_out { size, padding: 0 }.as_bytes().to_vec()
}

pub fn lseek_out(offset: u64) -> Vec<u8> {
    abi::fuse_lseek_out { offset }.as_bytes().to_vec()
}

const DIRENT_HEADER: usize = 24;

fn dirent_size(name_len: usize) -> usize {
    (DIRENT_HEADER + name_len).next_multiple_of(8)
}

/// Appends a `fuse_dirent` (or, with `plus`, a `fuse_direntplus`) unless it would take `buf`
/// past `max` bytes; returns whether it did.
pub fn push_dirent(buf: &mut Vec<u8>, max: usize, entry: &DirEntryOut, plus: Option<&Attr>) -> bool {
    let plus_size = if plus.is_some() { std::mem::size_of::<abi::fuse_entry_out>() } else { 0 };
    if buf.len() + plus_size + dirent_size(entry.name.len()) > max {
        return false;
    }
    if let Some(attr) = plus {
        buf.extend_from_slice(entry_out(attr).as_bytes());
    }
    let start = buf.len();
    buf.extend_from_slice(&entry.ino.to_le_bytes());
    buf.extend_from_slice(&entry.next_cookie.to_le_bytes());
    buf.extend_from_slice(&(entry.name.len() as u32).to_le_bytes());
    buf.extend_from_slice(&u32::from(entry.kind).to_le_bytes());
    buf.extend_from_slice(&entry.name);
    buf.resize(start + dirent_size(entry.name.len()), 0);
    true
}

/// `fuse_entry_out` for a READDIRPLUS entry the kernel must not instantiate (`.`, `..`).
pub fn push_dirent_plus_unlooked(buf: &mut Vec<u8>, max: usize, entry: &DirEntryOut) -> bool {
    let plus_size = std::mem::size_of::<abi::fuse_entry_out>();
    if buf.len() + plus_size + dirent_size(entry.name.len()) > max {
        return false;
    }
    buf.extend_from_slice(abi::fuse_entry_out::default().as_bytes());
    push_dirent(buf, max, entry, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirents_are_padded_and_stop_at_the_limit() {
        let entry = DirEntryOut { name: b"abc".to_vec(), ino: 7, kind: libc::DT_REG, next_cookie: 3 };
        let mut buf = Vec::new();
        assert!(push_dirent(&mut buf, 64, &entry, None));
        assert_eq!(buf.len(), 32);
        assert_eq!(&buf[..8], &7u64.to_le_bytes());
        assert_eq!(&buf[8..16], &3u64.to_le_bytes());
        assert_eq!(&buf[16..20], &3u32.to_le_bytes());
        assert_eq!(&buf[24..27], b"abc");
        assert!(push_dirent(&mut buf, 64, &entry, None));
        assert!(!push_dirent(&mut buf, 64, &entry, None), "a third one does not fit in 64 bytes");
        assert_eq!(buf.len(), 64);
    }

    #[test]
    fn header_echoes_the_full_unique() {
        let h = out_header(16, -libc::EIO, 1 << 63 | 5);
        assert_eq!(&h[8..16], &(1u64 << 63 | 5).to_le_bytes());
        assert_eq!(&h[4..8], &(-libc::EIO).to_le_bytes());
    }

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        assert_eq!(encode_dev(libc::makedev(1, 3)), 0x103);
        assert_eq!(encode_dev(libc::makedev(4000, 1_000_000)), (1_000_000 & 0xff) | (4000 << 8) | ((1_000_000 & !0xff) << 12));
    }
}
