//! Errors of the format layer: one for reading untrusted images, one for writing.

use thiserror::Error;

/// A problem found while reading an image, bootstrap or chunk table. The message names the
/// structure at fault so that a user can tell a truncated download from a wrong file.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("truncated {what}: needs bytes {start}..{end}, have {len}")]
    Truncated { what: &'static str, start: u64, end: u64, len: u64 },
    #[error("bad magic in {what}")]
    BadMagic { what: &'static str },
    #[error("unsupported {what}: {value}")]
    Unsupported { what: &'static str, value: u64 },
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("checksum mismatch in {what}")]
    Checksum { what: &'static str },
    #[error("blob offset {offset} is beyond the blob's {blob_len} bytes")]
    BeyondBlob { offset: u64, blob_len: u64 },
    #[error("inode {nid} is not a {expected}")]
    WrongType { nid: u64, expected: &'static str },
    #[error("chunk {digest} is corrupt: {detail}")]
    ChunkCorrupt { digest: String, detail: String },
}

impl FormatError {
    pub(crate) fn corrupt(what: &'static str, detail: impl Into<String>) -> Self {
        FormatError::Corrupt { what, detail: detail.into() }
    }
}

/// A tree that cannot be expressed as an EROFS image.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WriteError {
    #[error("name {name:?} is not valid in a directory (empty, '.', '..', contains '/' or NUL, or longer than 255 bytes)")]
    BadName { name: String },
    #[error("xattr {name:?} has a namespace EROFS cannot store")]
    XattrNamespace { name: String },
    #[error("xattrs of one inode are too large ({bytes} bytes)")]
    XattrTooLarge { bytes: usize },
    #[error("tree is malformed: {0}")]
    Tree(String),
    #[error("image too large: {0}")]
    TooLarge(&'static str),
}
