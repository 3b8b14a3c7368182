//! Writes a [`Tree`] as an EROFS bootstrap.
//!
//! Layout (see the crate docs): block 0 holds the superblock and the device slot, inodes follow
//! in node order, each 32-byte aligned; an inode with inline data never crosses a block
//! boundary (the kernel refuses that), and no inode core does. Data blocks of directories and
//! symlinks too large to inline come after the inodes. The output depends only on the tree,
//! so the same tree always gives the same bytes.

use crate::error::WriteError;
use crate::layout::{
    self, file_type_of_mode, DataLayout, DeviceSlot, InodeCore, SuperBlock, BLOCK_BITS, BLOCK_SIZE,
    CHUNK_FORMAT_INDEXES, CHUNK_INDEX_SIZE, DEVICE_SLOT_OFFSET, DEVICE_SLOT_SIZE, DIRENT_SIZE,
    INODE_EXTENDED_SIZE, INODE_SLOT_SIZE, MAX_NAME_LEN, NULL_ADDR,
};
use crate::tree::{FileData, NodeKind, Tree};

/// The data blob the bootstrap's chunk-based files point into (device 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobDevice {
    /// The blob id: hex sha256 of the chunk table.
    pub tag: [u8; 64],
    pub chunk_bits: u8,
    pub chunks: u32,
}

impl BlobDevice {
    fn blocks_per_chunk_bits(&self) -> u8 {
        self.chunk_bits - BLOCK_BITS
    }
}

/// Where an inode's data goes.
enum Payload {
    None,
    /// After the inode, in the same block.
    Inline(Vec<u8>),
    /// In whole blocks of the data area.
    Plain(Vec<u8>),
    /// A chunk index per file chunk.
    Chunks(Vec<Option<u32>>),
}

struct Planned {
    mode: u16,
    size: u64,
    nlink: u32,
    xattrs: Vec<u8>,
    payload: Payload,
    /// For directories: entries in on-disk order (name, node); filled with nids when written.
    dir_entries: Vec<(Vec<u8>, usize)>,
    offset: u64,
    start_block: u32,
}

/// Builds the bootstrap for `tree`; `blob` describes the data blob its chunk-based files use.
pub fn write_bootstrap(tree: &Tree, blob: &BlobDevice) -> Result<Vec<u8>, WriteError> {
    if !(BLOCK_BITS..=BLOCK_BITS + layout::CHUNK_FORMAT_BLKBITS_MASK as u8).contains(&blob.chunk_bits) {
        return Err(WriteError::Tree(format!("chunk size 2^{} is not supported", blob.chunk_bits)));
    }
    let parents = parents_of(tree)?;
    let nlinks = link_counts(tree);
    let mut plans = Vec::with_capacity(tree.nodes.len());
    let mut any_chunked = false;
    for (index, node) in tree.nodes.iter().enumerate() {
        let xattrs = encode_xattrs(&node.xattrs)?;
        let mut dir_entries = Vec::new();
        let (size, payload) = match &node.kind {
            NodeKind::Dir(entries) => {
                dir_entries.push((b".".to_vec(), index));
                dir_entries.push((b"..".to_vec(), parents[index]));
                for entry in entries {
                    check_name(&entry.name)?;
                    dir_entries.push((entry.name.clone(), entry.node));
                }
                dir_entries.sort_by(|a, b| a.0.cmp(&b.0));
                if dir_entries.windows(2).any(|w| w[0].0 == w[1].0) {
                    return Err(WriteError::Tree("a directory has two entries of the same name".into()));
                }
                let size = dir_size(&dir_entries);
                (size, placeholder_payload(size, xattrs.len()))
            }
            NodeKind::File(FileData::Inline(data)) => (data.len() as u64, data_payload(data, xattrs.len())),
            NodeKind::File(FileData::Chunked { size, chunks }) => {
                any_chunked = true;
                check_chunks(*size, chunks, blob)?;
                (*size, Payload::Chunks(chunks.clone()))
            }
            NodeKind::Symlink(target) => {
                if target.is_empty() || target.len() >= BLOCK_SIZE || target.contains(&0) {
                    return Err(WriteError::Tree("symlink target is empty, too long or has a NUL".into()));
                }
                (target.len() as u64, data_payload(target, xattrs.len()))
            }
            NodeKind::CharDevice(_) | NodeKind::BlockDevice(_) | NodeKind::Fifo | NodeKind::Socket => {
                (0, Payload::None)
            }
        };
        plans.push(Planned {
            mode: node.kind.type_bits() | (node.attr.mode & 0o7777),
            size,
            nlink: nlinks[index],
            xattrs,
            payload,
            dir_entries,
            offset: 0,
            start_block: NULL_ADDR,
        });
    }

    let with_device = blob.chunks > 0;
    let meta_end = place_inodes(&mut plans, with_device)?;
    let total_blocks = place_data_blocks(&mut plans, meta_end)?;

    let nids: Vec<u64> = plans.iter().map(|p| p.offset / INODE_SLOT_SIZE as u64).collect();
    let root_nid = u16::try_from(nids[0]).map_err(|_| WriteError::TooLarge("root inode beyond nid 65535"))?;
    for plan in &mut plans {
        if !plan.dir_entries.is_empty() {
            let content = dir_content(&plan.dir_entries, &nids, tree);
            match &mut plan.payload {
                Payload::Inline(data) | Payload::Plain(data) => *data = content,
                Payload::None | Payload::Chunks(_) => unreachable!("directories are inline or plain"),
            }
        }
    }

    let mut image = vec![0u8; total_blocks as usize * BLOCK_SIZE];
    for (index, (plan, node)) in plans.iter().zip(&tree.nodes).enumerate() {
        write_inode(&mut image, plan, node, index, blob);
    }
    let mut feature_incompat = 0;
    if any_chunked {
        feature_incompat |= layout::FEATURE_INCOMPAT_CHUNKED_FILE;
    }
    if with_device {
        feature_incompat |= layout::FEATURE_INCOMPAT_DEVICE_TABLE;
        let slot = DeviceSlot {
            tag: blob.tag,
            blocks: blob.chunks << blob.blocks_per_chunk_bits(),
            mapped_blkaddr: 0,
        };
        image[DEVICE_SLOT_OFFSET..DEVICE_SLOT_OFFSET + DEVICE_SLOT_SIZE].copy_from_slice(&slot.encode());
    }
    let mut volume_name = [0u8; 16];
    volume_name[..9].copy_from_slice(b"phoenixfs");
    let sb = SuperBlock {
        feature_compat: layout::FEATURE_COMPAT_SB_CHKSUM,
        blkszbits: BLOCK_BITS,
        root_nid,
        inos: tree.nodes.len() as u64,
        blocks: total_blocks,
        volume_name,
        feature_incompat,
        extra_devices: u16::from(with_device),
        devt_slotoff: (DEVICE_SLOT_OFFSET / DEVICE_SLOT_SIZE) as u16,
        ..Default::default()
    };
    sb.write_to(&mut image);
    layout::set_superblock_checksum(&mut image);
    Ok(image)
}

/// Inline when the data fits in one block with its inode, plain blocks otherwise.
fn data_payload(data: &[u8], xattr_len: usize) -> Payload {
    if data.is_empty() {
        Payload::None
    } else if layout::fits_inline(xattr_len, data.len() as u64) {
        Payload::Inline(data.to_vec())
    } else {
        Payload::Plain(data.to_vec())
    }
}

/// A directory's payload before nids are known: only its size matters for placement.
fn placeholder_payload(size: u64, xattr_len: usize) -> Payload {
    data_payload(&vec![0u8; size as usize], xattr_len)
}

fn check_name(name: &[u8]) -> Result<(), WriteError> {
    let bad = name.is_empty()
        || name == b"."
        || name == b".."
        || name.len() > MAX_NAME_LEN
        || name.iter().any(|&c| c == b'/' || c == 0);
    if bad {
        return Err(WriteError::BadName { name: String::from_utf8_lossy(name).into_owned() });
    }
    Ok(())
}

fn check_chunks(size: u64, chunks: &[Option<u32>], blob: &BlobDevice) -> Result<(), WriteError> {
    let expected = size.div_ceil(1u64 << blob.chunk_bits);
    if chunks.len() as u64 != expected {
        return Err(WriteError::Tree(format!("file of {size} bytes has {} chunks, needs {expected}", chunks.len())));
    }
    if chunks.iter().flatten().any(|&c| c >= blob.chunks) {
        return Err(WriteError::Tree("chunk index beyond the blob".into()));
    }
    if u64::from(blob.chunks) << blob.blocks_per_chunk_bits() >= u64::from(NULL_ADDR) {
        return Err(WriteError::TooLarge("blob beyond 2^32 blocks"));
    }
    Ok(())
}

/// The parent directory of every directory; also proves the tree is a tree: every node
/// reachable from the root, every directory reached exactly once, entries in range.
fn parents_of(tree: &Tree) -> Result<Vec<usize>, WriteError> {
    let n = tree.nodes.len();
    if n == 0 || !matches!(tree.nodes[0].kind, NodeKind::Dir(_)) {
        return Err(WriteError::Tree("node 0 must be the root directory".into()));
    }
    let mut parents = vec![usize::MAX; n];
    let mut reached = vec![false; n];
    parents[0] = 0;
    reached[0] = true;
    let mut queue = std::collections::VecDeque::from([0usize]);
    while let Some(dir) = queue.pop_front() {
        let NodeKind::Dir(entries) = &tree.nodes[dir].kind else { continue };
        for entry in entries {
            let child = entry.node;
            if child >= n {
                return Err(WriteError::Tree(format!("entry points to node {child} of {n}")));
            }
            let child_is_dir = matches!(tree.nodes[child].kind, NodeKind::Dir(_));
            if child_is_dir {
                if reached[child] {
                    return Err(WriteError::Tree("a directory is linked twice".into()));
                }
                parents[child] = dir;
                queue.push_back(child);
            }
            reached[child] = true;
        }
    }
    if reached.iter().any(|r| !r) {
        return Err(WriteError::Tree("a node is not reachable from the root".into()));
    }
    Ok(parents)
}

fn link_counts(tree: &Tree) -> Vec<u32> {
    let mut nlinks = vec![0u32; tree.nodes.len()];
    for node in &tree.nodes {
        if let NodeKind::Dir(entries) = &node.kind {
            for entry in entries {
                if !matches!(tree.nodes[entry.node].kind, NodeKind::Dir(_)) {
                    nlinks[entry.node] = nlinks[entry.node].saturating_add(1);
                }
            }
        }
    }
    for (index, node) in tree.nodes.iter().enumerate() {
        if let NodeKind::Dir(entries) = &node.kind {
            let subdirs = entries.iter().filter(|e| matches!(tree.nodes[e.node].kind, NodeKind::Dir(_))).count();
            nlinks[index] = 2u32.saturating_add(subdirs as u32);
        }
    }
    nlinks
}

/// Inline xattr area: header, then entries sorted by (prefix index, suffix).
fn encode_xattrs(xattrs: &[crate::tree::Xattr]) -> Result<Vec<u8>, WriteError> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut entries = Vec::with_capacity(xattrs.len());
    for x in xattrs {
        let lossy = || String::from_utf8_lossy(&x.name).into_owned();
        let (index, suffix) = layout::split_xattr_name(&x.name).ok_or_else(|| WriteError::XattrNamespace { name: lossy() })?;
        if suffix.len() > 255 || x.value.len() > usize::from(u16::MAX) {
            return Err(WriteError::XattrNamespace { name: lossy() });
        }
        entries.push((index, suffix, &x.value));
    }
    entries.sort();
    let mut out = vec![0u8; layout::XATTR_IBODY_HEADER_SIZE];
    for (index, suffix, value) in entries {
        let start = out.len();
        out.push(suffix.len() as u8);
        out.push(index);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(value);
        out.resize(start + layout::xattr_entry_size(suffix.len(), value.len()), 0);
    }
    if (out.len() - layout::XATTR_IBODY_HEADER_SIZE) / 4 + 1 > usize::from(u16::MAX) {
        return Err(WriteError::XattrTooLarge { bytes: out.len() });
    }
    Ok(out)
}

/// Splits sorted directory entries into blocks: how many entries go in each block.
fn dir_block_counts(entries: &[(Vec<u8>, usize)]) -> Vec<usize> {
    let mut counts = Vec::new();
    let (mut count, mut used) = (0usize, 0usize);
    for (name, _) in entries {
        let need = DIRENT_SIZE + name.len();
        if used + need > BLOCK_SIZE {
            counts.push(count);
            (count, used) = (0, 0);
        }
        count += 1;
        used += need;
    }
    counts.push(count);
    counts
}

fn dir_size(entries: &[(Vec<u8>, usize)]) -> u64 {
    let counts = dir_block_counts(entries);
    let last = counts.last().copied().unwrap_or(0);
    let last_start = entries.len() - last;
    let last_used: usize = entries[last_start..].iter().map(|(n, _)| DIRENT_SIZE + n.len()).sum();
    ((counts.len() - 1) * BLOCK_SIZE + last_used) as u64
}

/// Directory blocks: dirents first, then the names they point to; the last block is cut at
/// the end of its last name, the others padded with zeros.
fn dir_content(entries: &[(Vec<u8>, usize)], nids: &[u64], tree: &Tree) -> Vec<u8> {
    let mut out = Vec::with_capacity(dir_size(entries) as usize);
    let mut rest = entries;
    for count in dir_block_counts(entries) {
        let (block, tail) = rest.split_at(count);
        rest = tail;
        out.resize(out.len().next_multiple_of(BLOCK_SIZE), 0);
        let base = out.len();
        let mut name_off = count * DIRENT_SIZE;
        for (name, node) in block {
            out.extend_from_slice(&nids[*node].to_le_bytes());
            out.extend_from_slice(&(name_off as u16).to_le_bytes());
            out.push(file_type_of_mode(tree.nodes[*node].kind.type_bits()));
            out.push(0);
            name_off += name.len();
        }
        for (name, _) in block {
            out.extend_from_slice(name);
        }
        debug_assert!(out.len() - base <= BLOCK_SIZE);
    }
    out
}

/// Assigns each inode its byte offset; returns the end of the inode area.
fn place_inodes(plans: &mut [Planned], with_device: bool) -> Result<u64, WriteError> {
    let block = BLOCK_SIZE as u64;
    let mut cursor = (DEVICE_SLOT_OFFSET + if with_device { DEVICE_SLOT_SIZE } else { 0 }) as u64;
    for plan in plans.iter_mut() {
        cursor = cursor.next_multiple_of(INODE_SLOT_SIZE as u64);
        let head = (INODE_EXTENDED_SIZE + plan.xattrs.len()) as u64;
        let record = match &plan.payload {
            Payload::Inline(data) => head + data.len() as u64,
            Payload::Chunks(chunks) => head.next_multiple_of(CHUNK_INDEX_SIZE as u64) + (chunks.len() * CHUNK_INDEX_SIZE) as u64,
            Payload::None | Payload::Plain(_) => head,
        };
        let must_fit = match &plan.payload {
            Payload::Inline(data) => head + data.len() as u64,
            _ => head.min(block),
        };
        if cursor % block + must_fit > block {
            cursor = cursor.next_multiple_of(block);
        }
        plan.offset = cursor;
        cursor += record;
    }
    Ok(cursor)
}

/// Gives plain payloads their blocks after the inode area; returns the image's block count.
fn place_data_blocks(plans: &mut [Planned], meta_end: u64) -> Result<u32, WriteError> {
    let mut next = meta_end.div_ceil(BLOCK_SIZE as u64);
    for plan in plans.iter_mut() {
        if let Payload::Plain(data) = &plan.payload {
            plan.start_block = u32::try_from(next).map_err(|_| WriteError::TooLarge("bootstrap beyond 2^32 blocks"))?;
            next += (data.len() as u64).div_ceil(BLOCK_SIZE as u64);
        }
    }
    u32::try_from(next).map_err(|_| WriteError::TooLarge("bootstrap beyond 2^32 blocks"))
}

fn write_inode(image: &mut [u8], plan: &Planned, node: &crate::tree::Node, index: usize, blob: &BlobDevice) {
    let (layout, i_u) = match (&plan.payload, &node.kind) {
        (_, NodeKind::CharDevice(rdev) | NodeKind::BlockDevice(rdev)) => (DataLayout::FlatPlain, layout::encode_rdev(*rdev)),
        (Payload::None, _) => (DataLayout::FlatPlain, NULL_ADDR),
        (Payload::Inline(_), _) => (DataLayout::FlatInline, NULL_ADDR),
        (Payload::Plain(_), _) => (DataLayout::FlatPlain, plan.start_block),
        (Payload::Chunks(_), _) => (
            DataLayout::ChunkBased,
            u32::from(CHUNK_FORMAT_INDEXES | u16::from(blob.blocks_per_chunk_bits())),
        ),
    };
    let xattr_icount = if plan.xattrs.is_empty() {
        0
    } else {
        ((plan.xattrs.len() - layout::XATTR_IBODY_HEADER_SIZE) / 4 + 1) as u16
    };
    let core = InodeCore {
        extended: true,
        layout,
        xattr_icount,
        mode: plan.mode,
        size: plan.size,
        i_u,
        ino: (index as u32).wrapping_add(1),
        uid: node.attr.uid,
        gid: node.attr.gid,
        mtime: node.attr.mtime as u64,
        mtime_nsec: node.attr.mtime_nsec,
        nlink: plan.nlink,
    };
    let at = plan.offset as usize;
    image[at..at + INODE_EXTENDED_SIZE].copy_from_slice(&core.encode_extended());
    let mut pos = at + INODE_EXTENDED_SIZE;
    image[pos..pos + plan.xattrs.len()].copy_from_slice(&plan.xattrs);
    pos += plan.xattrs.len();
    match &plan.payload {
        Payload::None => {}
        Payload::Inline(data) => image[pos..pos + data.len()].copy_from_slice(data),
        Payload::Plain(data) => {
            let start = plan.start_block as usize * BLOCK_SIZE;
            image[start..start + data.len()].copy_from_slice(data);
        }
        Payload::Chunks(chunks) => {
            pos = pos.next_multiple_of(CHUNK_INDEX_SIZE);
            for chunk in chunks {
                let (device, start) = match chunk {
                    Some(c) => (1u16, c << blob.blocks_per_chunk_bits()),
                    None => (0u16, NULL_ADDR),
                };
                image[pos + 2..pos + 4].copy_from_slice(&device.to_le_bytes());
                image[pos + 4..pos + 8].copy_from_slice(&start.to_le_bytes());
                pos += CHUNK_INDEX_SIZE;
            }
        }
    }
}
