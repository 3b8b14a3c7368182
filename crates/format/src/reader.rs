//! Reads an EROFS bootstrap without trusting it.
//!
//! Every offset, count and length taken from the image is checked against the bytes actually
//! present before use, so a malformed image costs an error, never a panic, and allocations are
//! bounded by the input's size. Directory walks remember the directories they entered, so a
//! directory that contains itself cannot make them loop.

use std::collections::HashSet;

use crate::bytes::ImageBytes;
use crate::error::FormatError;
use crate::layout::{
    self, le16, le32, le64, slice_at, DataLayout, DeviceSlot, InodeCore, SuperBlock, BLOCK_BITS,
    BLOCK_SIZE, CHUNK_FORMAT_BLKBITS_MASK, CHUNK_FORMAT_INDEXES, DEVICE_SLOT_SIZE, DIRENT_SIZE,
    INODE_SLOT_SIZE, MAX_NAME_LEN, NULL_ADDR,
};
use crate::tree::Xattr;

/// An EROFS inode number: its offset in 32-byte slots from the start of the metadata area.
pub type Nid = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InodeKind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// A parsed, validated inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub nid: Nid,
    pub kind: InodeKind,
    core: InodeCore,
    /// Byte offset of the inode in the bootstrap.
    offset: u64,
}

impl Inode {
    /// Full `st_mode`: type and permission bits.
    pub fn mode(&self) -> u16 {
        self.core.mode
    }
    pub fn uid(&self) -> u32 {
        self.core.uid
    }
    pub fn gid(&self) -> u32 {
        self.core.gid
    }
    pub fn size(&self) -> u64 {
        self.core.size
    }
    pub fn nlink(&self) -> u32 {
        self.core.nlink
    }
    pub fn mtime(&self) -> i64 {
        self.core.mtime as i64
    }
    pub fn mtime_nsec(&self) -> u32 {
        self.core.mtime_nsec
    }
    /// Device number in glibc's `makedev` layout, 0 for anything but devices.
    pub fn rdev(&self) -> u64 {
        match self.kind {
            InodeKind::CharDevice | InodeKind::BlockDevice => layout::decode_rdev(self.core.i_u),
            _ => 0,
        }
    }
    fn meta_end(&self) -> u64 {
        self.offset + (self.core.core_size() + self.core.xattr_size()) as u64
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub nid: Nid,
    /// `EROFS_FT_*`
    pub file_type: u8,
}

/// A piece of a regular file and where its bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub file_offset: u64,
    pub len: u64,
    pub target: ExtentTarget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentTarget {
    /// Reads as zeros.
    Hole,
    /// Bytes of the bootstrap itself, at this offset.
    Bootstrap { offset: u64 },
    /// Bytes of the data blob (device 1), at this offset of its uncompressed address space.
    Blob { offset: u64 },
}

/// A bootstrap read in place from shared image bytes (see [`ImageBytes`]).
#[derive(Debug, Clone)]
pub struct Bootstrap {
    data: ImageBytes,
    sb: SuperBlock,
    blob: Option<DeviceSlot>,
}

impl Bootstrap {
    /// Parses the superblock and device table of `data`, and nothing else: opening costs the
    /// same at any size, and every other structure is checked when it is read.
    pub fn new(data: impl Into<ImageBytes>) -> Result<Self, FormatError> {
        let data = data.into();
        let sb = SuperBlock::read_from(&data)?;
        let declared = u64::from(sb.blocks) << BLOCK_BITS;
        if declared > data.len() as u64 {
            return Err(FormatError::Truncated { what: "bootstrap", start: 0, end: declared, len: data.len() as u64 });
        }
        let blob = match sb.extra_devices {
            0 => None,
            1 => {
                let at = u64::from(sb.devt_slotoff) * DEVICE_SLOT_SIZE as u64;
                Some(DeviceSlot::decode(slice_at(&data, at, DEVICE_SLOT_SIZE as u64, "device table")?))
            }
            n => return Err(FormatError::Unsupported { what: "number of extra devices", value: n.into() }),
        };
        Ok(Bootstrap { data, sb, blob })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn superblock(&self) -> &SuperBlock {
        &self.sb
    }

    /// The blob's tag (the hex sha256 of its chunk table) and its size in bytes.
    pub fn blob(&self) -> Option<(&[u8; 64], u64)> {
        self.blob.as_ref().map(|d| (&d.tag, u64::from(d.blocks) << BLOCK_BITS))
    }

    pub fn root_nid(&self) -> Nid {
        self.sb.root_nid.into()
    }

    pub fn inode(&self, nid: Nid) -> Result<Inode, FormatError> {
        let offset = nid
            .checked_mul(INODE_SLOT_SIZE as u64)
            .and_then(|o| o.checked_add(u64::from(self.sb.meta_blkaddr) << BLOCK_BITS))
            .ok_or_else(|| FormatError::corrupt("inode", format!("nid {nid} out of range")))?;
        slice_at(&self.data, offset, 2, "inode")?;
        let core = InodeCore::decode(&self.data[offset as usize..], &self.sb)?;
        let kind = match core.mode & layout::S_IFMT {
            layout::S_IFDIR => InodeKind::Dir,
            layout::S_IFREG => InodeKind::File,
            layout::S_IFLNK => InodeKind::Symlink,
            layout::S_IFCHR => InodeKind::CharDevice,
            layout::S_IFBLK => InodeKind::BlockDevice,
            layout::S_IFIFO => InodeKind::Fifo,
            layout::S_IFSOCK => InodeKind::Socket,
            other => return Err(FormatError::corrupt("inode", format!("nid {nid} has file type {other:#o}"))),
        };
        let inode = Inode { nid, kind, core, offset };
        slice_at(&self.data, offset, inode.meta_end() - offset, "inode xattrs")?;
        if inode.core.layout == DataLayout::ChunkBased && kind != InodeKind::File {
            return Err(FormatError::corrupt("inode", format!("nid {nid} is chunk-based but not a regular file")));
        }
        Ok(inode)
    }

    /// Resolves a `/`-separated path from the root, without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Result<Option<Inode>, FormatError> {
        let mut inode = self.inode(self.root_nid())?;
        for part in path.split(|&c| c == b'/').filter(|p| !p.is_empty()) {
            if inode.kind != InodeKind::Dir {
                return Ok(None);
            }
            match self.lookup(&inode, part)? {
                Some(nid) => inode = self.inode(nid)?,
                None => return Ok(None),
            }
        }
        Ok(Some(inode))
    }

    /// Finds `name` in `dir` by binary search over blocks, then within the block, as the
    /// kernel does (entries are sorted across the whole directory).
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<Nid>, FormatError> {
        let blocks = self.dir_block_count(dir)?;
        let (mut lo, mut hi) = (0u64, blocks);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let entries = parse_dir_block(self.dir_block(dir, mid)?)?;
            let first = entries.first().map(|e| e.0).unwrap_or_default();
            let last = entries.last().map(|e| e.0).unwrap_or_default();
            if name < first {
                hi = mid;
            } else if name > last {
                lo = mid + 1;
            } else {
                return Ok(entries.binary_search_by(|e| e.0.cmp(name)).ok().map(|i| entries[i].1));
            }
        }
        Ok(None)
    }

    /// All entries of `dir`, including `.` and `..`, in on-disk (sorted) order.
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>, FormatError> {
        let mut out = Vec::new();
        self.for_each_dir_entry(dir, 0, &mut |entry, _| {
            out.push(entry);
            true
        })?;
        Ok(out)
    }

    /// Calls `visit` with each entry of `dir` from position `cookie` on, and the cookie that
    /// resumes after it, until `visit` returns false. A cookie is `block << 12 | index`: it
    /// comes from the image alone, so any process can resume any listing. 0 is the start.
    pub fn for_each_dir_entry(
        &self,
        dir: &Inode,
        cookie: u64,
        visit: &mut dyn FnMut(DirEntry, u64) -> bool,
    ) -> Result<(), FormatError> {
        let (first_block, mut first_index) = (cookie >> BLOCK_BITS, (cookie & (BLOCK_SIZE as u64 - 1)) as usize);
        for block in first_block..self.dir_block_count(dir)? {
            let entries = parse_dir_block(self.dir_block(dir, block)?)?;
            for (index, (name, nid, file_type)) in entries.into_iter().enumerate().skip(first_index) {
                let next = (block << BLOCK_BITS) | (index as u64 + 1);
                if !visit(DirEntry { name: name.to_vec(), nid, file_type }, next) {
                    return Ok(());
                }
            }
            first_index = 0;
        }
        Ok(())
    }

    fn dir_block_count(&self, dir: &Inode) -> Result<u64, FormatError> {
        if dir.kind != InodeKind::Dir {
            return Err(FormatError::WrongType { nid: dir.nid, expected: "directory" });
        }
        Ok(dir.size().div_ceil(BLOCK_SIZE as u64))
    }

    fn dir_block(&self, dir: &Inode, block: u64) -> Result<&[u8], FormatError> {
        let start = block << BLOCK_BITS;
        let len = (dir.size() - start).min(BLOCK_SIZE as u64);
        self.flat_slice(dir, start, len)
    }

    /// `len` bytes at `offset` of a flat (plain or inline) inode's data, as one slice.
    fn flat_slice(&self, inode: &Inode, offset: u64, len: u64) -> Result<&[u8], FormatError> {
        let blocks = inode.size().div_ceil(BLOCK_SIZE as u64);
        let head_blocks = match inode.core.layout {
            DataLayout::FlatPlain => blocks,
            DataLayout::FlatInline => blocks.saturating_sub(1),
            DataLayout::ChunkBased => {
                return Err(FormatError::corrupt("inode", format!("nid {} must be flat", inode.nid)))
            }
        };
        let head_len = head_blocks << BLOCK_BITS;
        if offset < head_len {
            if offset + len > head_len || inode.core.i_u == NULL_ADDR {
                return Err(FormatError::corrupt("inode", format!("nid {} has unmapped or split data", inode.nid)));
            }
            let start = (u64::from(inode.core.i_u) << BLOCK_BITS) + offset;
            slice_at(&self.data, start, len, "inode data blocks")
        } else {
            let tail_start = inode.meta_end();
            let tail_len = inode.size() - head_len;
            if (tail_start % BLOCK_SIZE as u64) + tail_len > BLOCK_SIZE as u64 {
                return Err(FormatError::corrupt("inode", format!("nid {} inline data crosses a block", inode.nid)));
            }
            slice_at(&self.data, tail_start + (offset - head_len), len, "inline data")
        }
    }

    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>, FormatError> {
        if inode.kind != InodeKind::Symlink {
            return Err(FormatError::WrongType { nid: inode.nid, expected: "symlink" });
        }
        if inode.size() == 0 || inode.size() >= BLOCK_SIZE as u64 {
            return Err(FormatError::corrupt("symlink", format!("nid {} has length {}", inode.nid, inode.size())));
        }
        Ok(self.flat_slice(inode, 0, inode.size())?.to_vec())
    }

    /// The inode's xattrs (inline and shared) with full names. Entries of namespaces this
    /// reader does not know are skipped, as the kernel's listxattr skips them.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>, FormatError> {
        let size = inode.core.xattr_size();
        if size == 0 {
            return Ok(Vec::new());
        }
        let body_start = inode.offset + inode.core.core_size() as u64;
        let body = slice_at(&self.data, body_start, size as u64, "xattr area")?;
        let shared = usize::from(body[4]);
        let mut pos = layout::XATTR_IBODY_HEADER_SIZE + shared * 4;
        if pos > body.len() {
            return Err(FormatError::corrupt("xattr area", format!("nid {} shared count {shared}", inode.nid)));
        }
        let mut out = Vec::new();
        for i in 0..shared {
            let id = le32(body, layout::XATTR_IBODY_HEADER_SIZE + i * 4);
            let at = (u64::from(self.sb.xattr_blkaddr) << BLOCK_BITS) + u64::from(id) * 4;
            slice_at(&self.data, at, 0, "shared xattr")?;
            out.extend(parse_xattr_entry(&self.data[at as usize..])?.0);
        }
        while pos < body.len() {
            let (xattr, used) = parse_xattr_entry(&body[pos..])?;
            out.extend(xattr);
            pos += used;
        }
        Ok(out)
    }

    /// Where the bytes `offset..offset+len` of regular file `inode` live, clipped to its size.
    pub fn extents(&self, inode: &Inode, offset: u64, len: u64) -> Result<Vec<Extent>, FormatError> {
        if inode.kind != InodeKind::File {
            return Err(FormatError::WrongType { nid: inode.nid, expected: "regular file" });
        }
        let end = offset.saturating_add(len).min(inode.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        match inode.core.layout {
            DataLayout::ChunkBased => self.chunk_extents(inode, offset, end),
            DataLayout::FlatPlain | DataLayout::FlatInline => self.flat_extents(inode, offset, end),
        }
    }

    fn flat_extents(&self, inode: &Inode, offset: u64, end: u64) -> Result<Vec<Extent>, FormatError> {
        let blocks = inode.size().div_ceil(BLOCK_SIZE as u64);
        let head_len = match inode.core.layout {
            DataLayout::FlatInline => blocks.saturating_sub(1) << BLOCK_BITS,
            _ => inode.size(),
        };
        let mut out = Vec::new();
        if offset < head_len {
            let piece_end = end.min(head_len);
            let target = if inode.core.i_u == NULL_ADDR {
                ExtentTarget::Hole
            } else {
                let at = (u64::from(inode.core.i_u) << BLOCK_BITS) + offset;
                slice_at(&self.data, at, piece_end - offset, "file data blocks")?;
                ExtentTarget::Bootstrap { offset: at }
            };
            out.push(Extent { file_offset: offset, len: piece_end - offset, target });
        }
        if end > head_len {
            let from = offset.max(head_len);
            self.flat_slice(inode, from, end - from)?;
            let at = inode.meta_end() + (from - head_len);
            out.push(Extent { file_offset: from, len: end - from, target: ExtentTarget::Bootstrap { offset: at } });
        }
        Ok(out)
    }

    fn chunk_extents(&self, inode: &Inode, offset: u64, end: u64) -> Result<Vec<Extent>, FormatError> {
        let format = inode.core.i_u as u16;
        let chunk_bits = u32::from(BLOCK_BITS) + u32::from(format & CHUNK_FORMAT_BLKBITS_MASK);
        let unit: u64 = if format & CHUNK_FORMAT_INDEXES != 0 { 8 } else { 4 };
        let chunks = inode.size().div_ceil(1u64 << chunk_bits);
        let table_start = inode.meta_end().next_multiple_of(unit);
        let table_len = chunks
            .checked_mul(unit)
            .ok_or_else(|| FormatError::corrupt("chunk indexes", format!("nid {} size {}", inode.nid, inode.size())))?;
        let table = slice_at(&self.data, table_start, table_len, "chunk indexes")?;
        let device_mask = (self.sb.extra_devices + 1).next_power_of_two() - 1;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let chunk = pos >> chunk_bits;
            let within = pos - (chunk << chunk_bits);
            let piece_end = ((chunk + 1) << chunk_bits).min(end);
            let len = piece_end - pos;
            let entry = chunk as usize * unit as usize;
            let (device, start_block) = if unit == 8 {
                (le16(table, entry + 2) & device_mask, le32(table, entry + 4))
            } else {
                (0, le32(table, entry))
            };
            let target = if start_block == NULL_ADDR {
                ExtentTarget::Hole
            } else {
                let at = (u64::from(start_block) << BLOCK_BITS) + within;
                match device {
                    0 => {
                        slice_at(&self.data, at, len, "chunk data in bootstrap")?;
                        ExtentTarget::Bootstrap { offset: at }
                    }
                    _ => {
                        let blob_len = self.blob().map_or(0, |(_, l)| l);
                        if at.checked_add(len).is_none_or(|e| e > blob_len) {
                            return Err(FormatError::corrupt("chunk index", format!("nid {} points beyond the blob", inode.nid)));
                        }
                        ExtentTarget::Blob { offset: at }
                    }
                }
            };
            out.push(Extent { file_offset: pos, len, target });
            pos = piece_end;
        }
        Ok(out)
    }

    /// Every path in the image with its inode, depth first in on-disk order. Each directory
    /// is entered once; a directory met twice is reported as corruption.
    pub fn walk(&self) -> Result<Vec<(Vec<u8>, Inode)>, FormatError> {
        let root = self.inode(self.root_nid())?;
        let mut seen_dirs = HashSet::from([root.nid]);
        let mut out = vec![(b"/".to_vec(), root.clone())];
        let mut stack = vec![(Vec::new(), root)];
        while let Some((path, dir)) = stack.pop() {
            let mut subdirs = Vec::new();
            for entry in self.read_dir(&dir)? {
                if entry.name == b"." || entry.name == b".." {
                    continue;
                }
                let mut child_path = path.clone();
                child_path.push(b'/');
                child_path.extend_from_slice(&entry.name);
                let child = self.inode(entry.nid)?;
                if child.kind == InodeKind::Dir {
                    if !seen_dirs.insert(child.nid) {
                        return Err(FormatError::corrupt("directory tree", format!("directory nid {} is linked twice", child.nid)));
                    }
                    subdirs.push((child_path.clone(), child.clone()));
                }
                out.push((child_path, child));
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(out)
    }
}

/// One parsed dirent: (name, nid, file type).
type RawDirEntry<'a> = (&'a [u8], Nid, u8);

/// Entries of one directory block.
fn parse_dir_block(block: &[u8]) -> Result<Vec<RawDirEntry<'_>>, FormatError> {
    let bad = |detail: String| FormatError::corrupt("directory block", detail);
    if block.len() < DIRENT_SIZE {
        return Err(bad(format!("{} bytes", block.len())));
    }
    let first_name = usize::from(le16(block, 8));
    if first_name < DIRENT_SIZE || first_name % DIRENT_SIZE != 0 || first_name > block.len() {
        return Err(bad(format!("first name offset {first_name}")));
    }
    let count = first_name / DIRENT_SIZE;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let d = i * DIRENT_SIZE;
        let name_off = usize::from(le16(block, d + 8));
        let name_end = if i + 1 < count {
            usize::from(le16(block, d + DIRENT_SIZE + 8))
        } else {
            let tail = block.get(name_off..).unwrap_or_default();
            name_off + tail.iter().position(|&c| c == 0).unwrap_or(tail.len())
        };
        if name_off < first_name || name_end <= name_off || name_end > block.len() || name_end - name_off > MAX_NAME_LEN {
            return Err(bad(format!("name {i} at {name_off}..{name_end}")));
        }
        out.push((&block[name_off..name_end], le64(block, d), block[d + 10]));
    }
    if out.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(bad("names not sorted".into()));
    }
    Ok(out)
}

/// One xattr entry at the start of `b`: the xattr (None for an unknown namespace) and the
/// padded size it takes.
fn parse_xattr_entry(b: &[u8]) -> Result<(Option<Xattr>, usize), FormatError> {
    let header = slice_at(b, 0, layout::XATTR_ENTRY_HEADER_SIZE as u64, "xattr entry")?;
    let (name_len, index, value_len) = (usize::from(header[0]), header[1], usize::from(le16(header, 2)));
    let used = layout::xattr_entry_size(name_len, value_len);
    let entry = slice_at(b, 0, used as u64, "xattr entry")?;
    let suffix = &entry[4..4 + name_len];
    let value = &entry[4 + name_len..4 + name_len + value_len];
    let xattr = layout::xattr_prefix(index).map(|prefix| Xattr { name: [prefix, suffix].concat(), value: value.to_vec() });
    Ok((xattr, used))
}
