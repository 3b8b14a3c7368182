//! The phoenixfs image format.
//!
//! Owns: the EROFS bootstrap (writer and reader), the chunk table that maps the data blob's
//! chunks to content digests, chunk encoding (zstd or raw, verified by sha256), and the image
//! file that joins bootstrap and chunk table under one id. Everything here is pure: bytes in,
//! bytes out, no I/O beyond what a caller hands in.
//!
//! A reader's image is one shared, immutable buffer ([`ImageBytes`]: a `Vec`, or a mapping
//! the caller owns); the [`Bootstrap`] and the [`ChunkTableView`] are views of it, read in
//! place, never copied out. Opening one is O(1) apart from the proof [`ImageFile::decode`]
//! does once (see [`image`]); structures are checked when they are read.
//!
//! Must never: trust its input (every offset, length, count and name read from an image is
//! bounds-checked, and a malformed image yields an error, never a panic, a loop or an allocation
//! larger than the input), or know about stores, caches, FUSE or cachefiles.
//!
//! # Layout of an image file
//!
//! ```text
//! 0                      bootstrap: a complete EROFS image, 4 KiB blocks
//!                          block 0: superblock at 1024, device slot at 1152, then inodes
//!                          inodes: extended (64 bytes), inline xattrs, then either inline
//!                          data (small files, symlinks, directories) or chunk indexes
//!                          data blocks: directories and symlinks too big to inline
//! bootstrap_len          chunk table (see [`chunk`])
//! bootstrap_len+table    footer, 64 bytes (see [`image`])
//! ```
//!
//! Chunk-based files point into device 1, the *blob*: a virtual, uncompressed address space of
//! fixed-size chunks (chunk i starts at byte i << chunk_bits). Blob chunk i is entry i of the
//! chunk table; [`ChunkTableView::locate`] is the one place that arithmetic is written. The
//! device slot's tag is the hex sha256 of the chunk table, so a bootstrap names the only table
//! it fits. An all-zero chunk is a hole and is not in the blob at all.
//!
//! Because the bootstrap comes first, an image file can be mounted by the kernel's own EROFS
//! as it is (`mount -t erofs -o device=BLOB IMAGE DIR`) and checked by `fsck.erofs`.

pub mod bytes;
pub mod chunk;
pub mod error;
pub mod image;
pub mod layout;
pub mod reader;
pub mod summary;
pub mod tree;
pub mod writer;

pub use bytes::ImageBytes;
pub use chunk::{ChunkEntry, ChunkLocation, ChunkTable, ChunkTableView, Compression, Digest};
pub use error::{FormatError, WriteError};
pub use image::{ImageFile, ImageId};
pub use reader::{Bootstrap, DirEntry, Extent, ExtentTarget, Inode, InodeKind, Nid};
pub use tree::{Attr, FileData, Node, NodeKind, Tree, TreeEntry, Xattr};
