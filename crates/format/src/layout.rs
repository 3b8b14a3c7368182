//! EROFS on-disk structures (Linux `fs/erofs/erofs_fs.h`), little-endian, read and written with
//! `from_le_bytes`/`to_le_bytes` at fixed offsets, no `unsafe`.
//!
//! Only what phoenixfs writes or must read is here: 4 KiB blocks, compact and extended inodes,
//! inline xattrs, flat and chunk-based data, the device table. Compressed layouts are refused.

use crate::error::FormatError;

pub const BLOCK_BITS: u8 = 12;
pub const BLOCK_SIZE: usize = 1 << BLOCK_BITS;
pub const SUPER_OFFSET: usize = 1024;
pub const SUPER_SIZE: usize = 128;
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
pub const DEVICE_SLOT_SIZE: usize = 128;
/// Where phoenixfs puts its one device slot, right after the superblock (slot number 9).
pub const DEVICE_SLOT_OFFSET: usize = SUPER_OFFSET + SUPER_SIZE;
pub const INODE_SLOT_SIZE: usize = 32;
pub const INODE_COMPACT_SIZE: usize = 32;
pub const INODE_EXTENDED_SIZE: usize = 64;
pub const DIRENT_SIZE: usize = 12;
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
pub const XATTR_ENTRY_HEADER_SIZE: usize = 4;
pub const CHUNK_INDEX_SIZE: usize = 8;
pub const BLOCK_MAP_ENTRY_SIZE: usize = 4;
pub const NULL_ADDR: u32 = u32::MAX;
pub const MAX_NAME_LEN: usize = 255;

pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
pub const FEATURE_COMPAT_MTIME: u32 = 0x2;
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// Incompatible features this reader understands; any other bit makes the image unreadable.
pub const FEATURE_INCOMPAT_SUPPORTED: u32 =
    FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE;

pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;

pub const S_IFMT: u16 = 0o170000;
pub const S_IFSOCK: u16 = 0o140000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFIFO: u16 = 0o010000;

/// `i_format` bits 1..3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    FlatPlain = 0,
    FlatInline = 2,
    ChunkBased = 4,
}

impl DataLayout {
    fn from_raw(raw: u16) -> Result<Self, FormatError> {
        match raw {
            0 => Ok(DataLayout::FlatPlain),
            2 => Ok(DataLayout::FlatInline),
            4 => Ok(DataLayout::ChunkBased),
            other => Err(FormatError::Unsupported { what: "inode data layout", value: other.into() }),
        }
    }
}

/// Directory entry file types (`EROFS_FT_*`).
pub fn file_type_of_mode(mode: u16) -> u8 {
    match mode & S_IFMT {
        S_IFREG => 1,
        S_IFDIR => 2,
        S_IFCHR => 3,
        S_IFBLK => 4,
        S_IFIFO => 5,
        S_IFSOCK => 6,
        S_IFLNK => 7,
        _ => 0,
    }
}

/// Bounds-checked view of `len` bytes at `start`.
pub fn slice_at<'a>(
    buf: &'a [u8],
    start: u64,
    len: u64,
    what: &'static str,
) -> Result<&'a [u8], FormatError> {
    let end = start.checked_add(len);
    match end {
        Some(end) if end <= buf.len() as u64 => Ok(&buf[start as usize..end as usize]),
        _ => Err(FormatError::Truncated {
            what,
            start,
            end: end.unwrap_or(u64::MAX),
            len: buf.len() as u64,
        }),
    }
}

pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// `struct erofs_super_block`, the fields phoenixfs uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SuperBlock {
    pub feature_compat: u32,
    pub blkszbits: u8,
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub build_time_nsec: u32,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: u32,
    pub extra_devices: u16,
    pub devt_slotoff: u16,
}

impl SuperBlock {
    /// Encodes into `block0` (the first block of the image) without the checksum.
    pub fn write_to(&self, block0: &mut [u8]) {
        let b = &mut block0[SUPER_OFFSET..SUPER_OFFSET + SUPER_SIZE];
        b.fill(0);
        put32(b, 0, SUPER_MAGIC);
        put32(b, 8, self.feature_compat);
        b[12] = self.blkszbits;
        put16(b, 14, self.root_nid);
        put64(b, 16, self.inos);
        put64(b, 24, self.build_time);
        put32(b, 32, self.build_time_nsec);
        put32(b, 36, self.blocks);
        put32(b, 40, self.meta_blkaddr);
        put32(b, 44, self.xattr_blkaddr);
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        put32(b, 80, self.feature_incompat);
        put16(b, 86, self.extra_devices);
        put16(b, 88, self.devt_slotoff);
    }

    /// Parses and validates the superblock of `image`.
    pub fn read_from(image: &[u8]) -> Result<Self, FormatError> {
        let b = slice_at(image, SUPER_OFFSET as u64, SUPER_SIZE as u64, "superblock")?;
        if le32(b, 0) != SUPER_MAGIC {
            return Err(FormatError::BadMagic { what: "EROFS superblock" });
        }
        let sb = SuperBlock {
            feature_compat: le32(b, 8),
            blkszbits: b[12],
            root_nid: le16(b, 14),
            inos: le64(b, 16),
            build_time: le64(b, 24),
            build_time_nsec: le32(b, 32),
            blocks: le32(b, 36),
            meta_blkaddr: le32(b, 40),
            xattr_blkaddr: le32(b, 44),
            uuid: b[48..64].try_into().expect("16 bytes"),
            volume_name: b[64..80].try_into().expect("16 bytes"),
            feature_incompat: le32(b, 80),
            extra_devices: le16(b, 86),
            devt_slotoff: le16(b, 88),
        };
        if sb.blkszbits != BLOCK_BITS {
            return Err(FormatError::Unsupported { what: "block size bits", value: sb.blkszbits.into() });
        }
        let unknown = sb.feature_incompat & !FEATURE_INCOMPAT_SUPPORTED;
        if unknown != 0 {
            return Err(FormatError::Unsupported { what: "incompatible feature bits", value: unknown.into() });
        }
        if b[13] != 0 {
            return Err(FormatError::Unsupported { what: "superblock extension slots", value: b[13].into() });
        }
        if sb.feature_compat & FEATURE_COMPAT_SB_CHKSUM != 0 {
            let block0 = slice_at(image, 0, BLOCK_SIZE as u64, "superblock block")?;
            if superblock_checksum(block0) != le32(b, 4) {
                return Err(FormatError::Checksum { what: "EROFS superblock" });
            }
        }
        Ok(sb)
    }
}

/// The kernel's superblock checksum: crc32c over the rest of block 0 from the superblock on,
/// with the checksum field zeroed, seeded with !0 and not inverted at the end.
pub fn superblock_checksum(block0: &[u8]) -> u32 {
    let mut copy = block0[SUPER_OFFSET..BLOCK_SIZE].to_vec();
    copy[4..8].fill(0);
    !crc32c::crc32c(&copy)
}

pub fn set_superblock_checksum(block0: &mut [u8]) {
    let sum = superblock_checksum(block0);
    put32(block0, SUPER_OFFSET + 4, sum);
}

/// `struct erofs_deviceslot`: a tag (the blob id) and the device's size in blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    pub tag: [u8; 64],
    pub blocks: u32,
    pub mapped_blkaddr: u32,
}

impl DeviceSlot {
    pub fn encode(&self) -> [u8; DEVICE_SLOT_SIZE] {
        let mut b = [0u8; DEVICE_SLOT_SIZE];
        b[..64].copy_from_slice(&self.tag);
        put32(&mut b, 64, self.blocks);
        put32(&mut b, 68, self.mapped_blkaddr);
        b
    }

    pub fn decode(b: &[u8]) -> Self {
        DeviceSlot {
            tag: b[..64].try_into().expect("64 bytes"),
            blocks: le32(b, 64),
            mapped_blkaddr: le32(b, 68),
        }
    }
}

/// An inode's on-disk core, compact or extended, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InodeCore {
    pub extended: bool,
    pub layout: DataLayout,
    pub xattr_icount: u16,
    pub mode: u16,
    pub size: u64,
    /// `i_u`: start block, rdev, or chunk format, depending on type and layout.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
    pub nlink: u32,
}

impl InodeCore {
    pub fn core_size(&self) -> usize {
        if self.extended {
            INODE_EXTENDED_SIZE
        } else {
            INODE_COMPACT_SIZE
        }
    }

    /// Size of the inline xattr area that follows the core.
    pub fn xattr_size(&self) -> usize {
        xattr_size_of_icount(self.xattr_icount)
    }

    /// Extended encoding, the only one phoenixfs writes.
    pub fn encode_extended(&self) -> [u8; INODE_EXTENDED_SIZE] {
        let mut b = [0u8; INODE_EXTENDED_SIZE];
        put16(&mut b, 0, 1 | ((self.layout as u16) << 1));
        put16(&mut b, 2, self.xattr_icount);
        put16(&mut b, 4, self.mode);
        put64(&mut b, 8, self.size);
        put32(&mut b, 16, self.i_u);
        put32(&mut b, 20, self.ino);
        put32(&mut b, 24, self.uid);
        put32(&mut b, 28, self.gid);
        put64(&mut b, 32, self.mtime);
        put32(&mut b, 40, self.mtime_nsec);
        put32(&mut b, 44, self.nlink);
        b
    }

    /// Decodes the inode at `b` (which holds at least the core). Compact inodes take their
    /// mtime from the superblock, as the kernel does.
    pub fn decode(b: &[u8], sb: &SuperBlock) -> Result<Self, FormatError> {
        let format = le16(slice_at(b, 0, 2, "inode")?, 0);
        let extended = format & 1 == 1;
        if format >> 4 != 0 {
            return Err(FormatError::Unsupported { what: "inode format bits", value: format.into() });
        }
        let layout = DataLayout::from_raw((format >> 1) & 7)?;
        if extended {
            let b = slice_at(b, 0, INODE_EXTENDED_SIZE as u64, "extended inode")?;
            Ok(InodeCore {
                extended,
                layout,
                xattr_icount: le16(b, 2),
                mode: le16(b, 4),
                size: le64(b, 8),
                i_u: le32(b, 16),
                ino: le32(b, 20),
                uid: le32(b, 24),
                gid: le32(b, 28),
                mtime: le64(b, 32),
                mtime_nsec: le32(b, 40),
                nlink: le32(b, 44),
            })
        } else {
            let b = slice_at(b, 0, INODE_COMPACT_SIZE as u64, "compact inode")?;
            let mtime = if sb.feature_compat & FEATURE_COMPAT_MTIME != 0 {
                sb.build_time.wrapping_add(le32(b, 28).into())
            } else {
                sb.build_time
            };
            Ok(InodeCore {
                extended,
                layout,
                xattr_icount: le16(b, 2),
                mode: le16(b, 4),
                nlink: le16(b, 6).into(),
                size: le32(b, 8).into(),
                i_u: le32(b, 16),
                ino: le32(b, 20),
                uid: le16(b, 24).into(),
                gid: le16(b, 26).into(),
                mtime,
                mtime_nsec: sb.build_time_nsec,
            })
        }
    }
}

/// Whether `data_len` bytes of inline data fit in one block with an extended inode and an
/// xattr area of `xattr_len` bytes: the kernel refuses inline data that crosses a block.
pub fn fits_inline(xattr_len: usize, data_len: u64) -> bool {
    (INODE_EXTENDED_SIZE + xattr_len) as u64 + data_len <= BLOCK_SIZE as u64
}

pub fn xattr_size_of_icount(icount: u16) -> usize {
    if icount == 0 {
        0
    } else {
        XATTR_IBODY_HEADER_SIZE + (usize::from(icount) - 1) * 4
    }
}

/// Size of one inline xattr entry, padded to 4 bytes.
pub fn xattr_entry_size(name_len: usize, value_len: usize) -> usize {
    (XATTR_ENTRY_HEADER_SIZE + name_len + value_len).next_multiple_of(4)
}

/// The short-name prefixes EROFS encodes as an index (`EROFS_XATTR_INDEX_*`). Whole names
/// (the POSIX ACLs) come first so that they are matched before a shorter prefix.
pub const XATTR_PREFIXES: &[(u8, &[u8])] = &[
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (1, b"user."),
    (4, b"trusted."),
    (5, b"lustre."),
    (6, b"security."),
];

/// Splits a full xattr name into its EROFS prefix index and the stored suffix.
pub fn split_xattr_name(name: &[u8]) -> Option<(u8, &[u8])> {
    XATTR_PREFIXES.iter().find_map(|(index, prefix)| {
        let suffix = name.strip_prefix(*prefix)?;
        let whole_name = matches!(index, 2 | 3);
        (!whole_name || suffix.is_empty()).then_some((*index, suffix))
    })
}

pub fn xattr_prefix(index: u8) -> Option<&'static [u8]> {
    XATTR_PREFIXES.iter().find(|(i, _)| *i == index).map(|(_, p)| *p)
}

/// Linux `new_encode_dev`, the encoding EROFS keeps in `i_u` of device inodes.
pub fn encode_rdev(rdev: u64) -> u32 {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    ((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)) as u32
}

/// Linux `new_decode_dev`, returned in glibc's `makedev` layout.
pub fn decode_rdev(raw: u32) -> u64 {
    let raw = u64::from(raw);
    let major = (raw & 0xfff00) >> 8;
    let minor = (raw & 0xff) | ((raw >> 12) & 0xfff00);
    ((major & 0xffff_f000) << 32) | ((major & 0xfff) << 8) | ((minor & 0xffff_ff00) << 12) | (minor & 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_with_checksum() {
        let sb = SuperBlock {
            feature_compat: FEATURE_COMPAT_SB_CHKSUM,
            blkszbits: BLOCK_BITS,
            root_nid: 40,
            inos: 7,
            blocks: 3,
            feature_incompat: FEATURE_INCOMPAT_CHUNKED_FILE,
            ..Default::default()
        };
        let mut block0 = vec![0u8; BLOCK_SIZE];
        sb.write_to(&mut block0);
        set_superblock_checksum(&mut block0);
        assert_eq!(SuperBlock::read_from(&block0).unwrap(), sb);
        block0[SUPER_OFFSET + 20] ^= 1;
        assert_eq!(SuperBlock::read_from(&block0), Err(FormatError::Checksum { what: "EROFS superblock" }));
    }

    #[test]
    fn xattr_names_split_into_index_and_suffix() {
        assert_eq!(split_xattr_name(b"user.foo"), Some((1, &b"foo"[..])));
        assert_eq!(split_xattr_name(b"security.capability"), Some((6, &b"capability"[..])));
        assert_eq!(split_xattr_name(b"system.posix_acl_access"), Some((2, &b""[..])));
        assert_eq!(split_xattr_name(b"system.posix_acl_accessx"), None);
        assert_eq!(split_xattr_name(b"system.nfs4_acl"), None);
    }

    #[test]
    fn rdev_encoding_matches_the_kernel() {
        for (major, minor) in [(1u64, 3u64), (8, 0), (259, 65536), (4095, 1048575)] {
            let dev = libc_makedev(major, minor);
            assert_eq!(decode_rdev(encode_rdev(dev)), dev);
        }
        // /dev/null is (1, 3): new_encode_dev gives 0x103.
        assert_eq!(encode_rdev(libc_makedev(1, 3)), 0x103);
    }

    fn libc_makedev(major: u64, minor: u64) -> u64 {
        ((major & 0xffff_f000) << 32) | ((major & 0xfff) << 8) | ((minor & 0xffff_ff00) << 12) | (minor & 0xff)
    }
}
