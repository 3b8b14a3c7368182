//! The in-memory description of a file tree that the writer turns into a bootstrap.
//!
//! The builder fills it from a source directory; tests can fill it by hand. Node 0 is the root
//! directory. A node reached through several directory entries is a hard link.

use crate::layout;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub attr: Attr,
    pub xattrs: Vec<Xattr>,
    pub kind: NodeKind,
}

/// Ownership, permissions and time of an inode. `mode` holds only the permission bits
/// (`0o7777`); the file type comes from [`NodeKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Dir(Vec<TreeEntry>),
    File(FileData),
    Symlink(Vec<u8>),
    CharDevice(u64),
    BlockDevice(u64),
    Fifo,
    Socket,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub name: Vec<u8>,
    pub node: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// Stored in the bootstrap, right after the inode.
    Inline(Vec<u8>),
    /// Stored in the blob: one entry per chunk of the file, the blob chunk index or `None`
    /// for a hole (all zeros).
    Chunked { size: u64, chunks: Vec<Option<u32>> },
}

impl NodeKind {
    pub fn type_bits(&self) -> u16 {
        match self {
            NodeKind::Dir(_) => layout::S_IFDIR,
            NodeKind::File(_) => layout::S_IFREG,
            NodeKind::Symlink(_) => layout::S_IFLNK,
            NodeKind::CharDevice(_) => layout::S_IFCHR,
            NodeKind::BlockDevice(_) => layout::S_IFBLK,
            NodeKind::Fifo => layout::S_IFIFO,
            NodeKind::Socket => layout::S_IFSOCK,
        }
    }
}

/// Bytes the inline xattr area takes for these xattrs (0 when there are none).
pub fn xattr_area_size(xattrs: &[Xattr]) -> usize {
    if xattrs.is_empty() {
        return 0;
    }
    layout::XATTR_IBODY_HEADER_SIZE
        + xattrs
            .iter()
            .map(|x| {
                let suffix = layout::split_xattr_name(&x.name).map_or(x.name.len(), |(_, s)| s.len());
                layout::xattr_entry_size(suffix, x.value.len())
            })
            .sum::<usize>()
}

/// Whether data of `size` bytes fits in the same block as its inode and xattrs, which is
/// what inline data needs. Decides between inline and chunked regular files.
pub fn fits_inline(size: u64, xattrs: &[Xattr]) -> bool {
    layout::fits_inline(xattr_area_size(xattrs), size)
}
