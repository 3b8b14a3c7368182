//! The read-only file system interface the session serves, in plain values.

use std::fs::File;
use std::sync::Arc;

use nix::errno::Errno;

/// What `stat` shows. `ino` is also the nodeid handed to the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub attr: Attr,
}

/// One directory entry for READDIR(PLUS); `next_cookie` resumes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntryOut {
    pub name: Vec<u8>,
    pub ino: u64,
    /// `DT_*` type.
    pub kind: u8,
    pub next_cookie: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub files: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// A piece of READ data, written to the kernel without copying it into a reply buffer.
#[derive(Debug, Clone)]
pub enum Piece {
    Zeros(usize),
    Shared { data: Arc<[u8]>, start: usize, end: usize },
    Owned(Vec<u8>),
}

impl Piece {
    pub fn len(&self) -> usize {
        match self {
            Piece::Zeros(n) => *n,
            Piece::Shared { start, end, .. } => end - start,
            Piece::Owned(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a file may be opened.
#[derive(Debug)]
pub enum Opening {
    /// Through the FUSE page cache only.
    Cached,
    /// In passthrough mode when the session can, to `backing` (a file holding exactly this
    /// file's bytes) when it is ready; else through the page cache until it is.
    Passthrough { backing: Option<File> },
}

/// A read-only file system, addressed by nodeid. Every method answers from what the nodeid
/// names; nothing may depend on an earlier call (no open-file or lookup state).
pub trait Filesystem: Send + Sync {
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, Errno>;
    fn getattr(&self, node: u64) -> Result<Attr, Errno>;
    fn readlink(&self, node: u64) -> Result<Vec<u8>, Errno>;
    /// Checks that `node` can be opened for reading, and says how.
    fn open(&self, node: u64) -> Result<Opening, Errno>;
    /// The kernel closed a file of `node` (passthrough sessions only; nothing to answer).
    fn released(&self, _node: u64) {}
    fn read(&self, node: u64, offset: u64, size: u32) -> Result<Vec<Piece>, Errno>;
    /// Calls `add` for entries from `cookie` on until it returns false. A cookie comes from
    /// an earlier entry's `next_cookie` (0 is the start) and must mean the same position in
    /// any process.
    fn readdir(&self, node: u64, cookie: u64, add: &mut dyn FnMut(DirEntryOut) -> bool) -> Result<(), Errno>;
    fn statfs(&self) -> StatFs;
    fn getxattr(&self, node: u64, name: &[u8]) -> Result<Vec<u8>, Errno>;
    /// Names, each followed by a NUL.
    fn listxattr(&self, node: u64) -> Result<Vec<u8>, Errno>;
    /// SEEK_DATA / SEEK_HOLE.
    fn lseek(&self, node: u64, offset: u64, whence: u32) -> Result<u64, Errno>;
}
