//! The file system's one error type, and the one place where an error becomes an errno.

use nix::errno::Errno;
use phoenixfs_cache::CacheError;
use phoenixfs_format::{Digest, FormatError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum FsError {
    #[error("no such entry")]
    NotFound,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("not a symbolic link")]
    NotASymlink,
    #[error("not a regular file")]
    NotAFile,
    #[error("node id 0 names nothing")]
    NoSuchNode,
    #[error("no such extended attribute")]
    NoSuchAttribute,
    /// SEEK_DATA or SEEK_HOLE from the end of the file or beyond, or SEEK_DATA with only a
    /// hole after the offset.
    #[error("no data or hole there")]
    NothingThere,
    #[error("unknown seek mode {0}")]
    BadWhence(u32),
    #[error("the image is corrupt: {0}")]
    Corrupt(#[from] FormatError),
    #[error("blob chunk {index}: {source}")]
    Chunk { index: u64, digest: Digest, source: CacheError },
}

impl FsError {
    /// What the kernel (and so the application) gets.
    pub fn errno(&self) -> Errno {
        match self {
            FsError::NotFound => Errno::ENOENT,
            FsError::NotADirectory => Errno::ENOTDIR,
            FsError::IsADirectory => Errno::EISDIR,
            FsError::NotASymlink | FsError::NotAFile | FsError::NoSuchNode | FsError::BadWhence(_) => Errno::EINVAL,
            FsError::NoSuchAttribute => Errno::ENODATA,
            FsError::NothingThere => Errno::ENXIO,
            FsError::Corrupt(_) | FsError::Chunk { .. } => Errno::EIO,
        }
    }
}
