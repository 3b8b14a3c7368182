//! [`ImageFs`]: the image as a read-only file system. Its answers are plain values and
//! [`FsError`]s; the [`Filesystem`] trait the FUSE session calls is a thin adapter over them,
//! where an error becomes an errno (in one place, [`FsError::errno`]) and faults are logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod error;
#[cfg(test)]
mod tests;

use nix::errno::Errno;
use phoenixfs_cache::ChunkCache;
use phoenixfs_format::{ExtentTarget, ImageFile, Inode, InodeKind, Nid};
use phoenixfs_fuse::{Attr, DirEntryOut, Entry, Filesystem, Opening, Piece, StatFs, ROOT_NODEID};
use phoenixfs_store::ChunkStore;
use tracing::error;

pub use self::error::FsError;
use crate::passthrough::{PassthroughConfig, PassthroughFiles};
use crate::readahead::Readahead;

#[derive(Debug, Default)]
pub struct FsStats {
    pub requests: AtomicU64,
    pub bytes_served: AtomicU64,
    pub errors: AtomicU64,
}

pub struct ImageFs {
    pub image: Arc<ImageFile>,
    pub store: Arc<dyn ChunkStore>,
    pub cache: Arc<ChunkCache>,
    pub stats: FsStats,
    readahead: Readahead,
    passthrough: Option<PassthroughFiles>,
}

impl ImageFs {
    /// With `passthrough`, large files whose chunks are all cached are opened in passthrough
    /// mode (when the session negotiated it) to copies made in the cache directory.
    pub fn new(image: Arc<ImageFile>, store: Arc<dyn ChunkStore>, cache: Arc<ChunkCache>, readahead_bytes: u64, passthrough: Option<PassthroughConfig>) -> std::io::Result<Arc<Self>> {
        let passthrough = passthrough.map(|config| PassthroughFiles::new(image.clone(), store.clone(), cache.clone(), config)).transpose()?;
        let readahead = Readahead::new(image.clone(), store.clone(), cache.clone(), readahead_bytes);
        Ok(Arc::new(ImageFs { image, store, cache, stats: FsStats::default(), readahead, passthrough }))
    }

    fn root_nid(&self) -> Nid {
        self.image.bootstrap.root_nid()
    }

    /// The nodeid the kernel knows an inode by: derived from the nid, so any process can
    /// translate it back without a table.
    pub fn nodeid(&self, nid: Nid) -> u64 {
        if nid == self.root_nid() {
            ROOT_NODEID
        } else {
            nid + 2
        }
    }

    fn nid(&self, node: u64) -> Result<Nid, FsError> {
        match node {
            ROOT_NODEID => Ok(self.root_nid()),
            0 => Err(FsError::NoSuchNode),
            n => Ok(n - 2),
        }
    }

    /// The errno for an answer; faults are counted and logged with the image they concern.
    fn answer<T>(&self, result: Result<T, FsError>) -> Result<T, Errno> {
        result.map_err(|e| {
            match &e {
                FsError::Chunk { index, digest, source } => error!(image = %self.image.id, chunk = index, %digest, error = %source, "cannot read chunk"),
                FsError::Corrupt(error) => error!(image = %self.image.id, %error, "image is corrupt"),
                _ => return e.errno(),
            }
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            e.errno()
        })
    }

    fn inode(&self, node: u64) -> Result<Inode, FsError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        Ok(self.image.bootstrap.inode(self.nid(node)?)?)
    }

    fn inode_of_kind(&self, node: u64, kind: InodeKind) -> Result<Inode, FsError> {
        let inode = self.inode(node)?;
        if inode.kind == kind {
            return Ok(inode);
        }
        Err(match kind {
            InodeKind::Dir => FsError::NotADirectory,
            InodeKind::Symlink => FsError::NotASymlink,
            _ => FsError::NotAFile,
        })
    }

    fn attr(&self, inode: &Inode) -> Attr {
        Attr {
            ino: self.nodeid(inode.nid),
            size: inode.size(),
            mode: inode.mode().into(),
            nlink: inode.nlink(),
            uid: inode.uid(),
            gid: inode.gid(),
            rdev: inode.rdev(),
            mtime: inode.mtime(),
            mtime_nsec: inode.mtime_nsec(),
        }
    }

    /// The chunk at blob `offset`, verified, from the cache, and where `offset` falls in it.
    fn blob_chunk(&self, offset: u64) -> Result<(Arc<[u8]>, usize), FsError> {
        let chunk = self.image.table.locate(offset)?;
        let data = self
            .cache
            .get(&chunk.entry, self.store.as_ref())
            .map_err(|source| FsError::Chunk { index: chunk.index as u64, digest: chunk.entry.digest, source })?;
        Ok((data, chunk.within))
    }

    pub fn lookup_child(&self, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        let dir = self.inode_of_kind(parent, InodeKind::Dir)?;
        let nid = self.image.bootstrap.lookup(&dir, name)?.ok_or(FsError::NotFound)?;
        Ok(self.attr(&self.image.bootstrap.inode(nid)?))
    }

    pub fn attributes(&self, node: u64) -> Result<Attr, FsError> {
        Ok(self.attr(&self.inode(node)?))
    }

    pub fn link_target(&self, node: u64) -> Result<Vec<u8>, FsError> {
        Ok(self.image.bootstrap.read_link(&self.inode_of_kind(node, InodeKind::Symlink)?)?)
    }

    pub fn check_open(&self, node: u64) -> Result<Opening, FsError> {
        let inode = self.inode(node)?;
        match (&inode.kind, &self.passthrough) {
            (InodeKind::Dir, _) => Err(FsError::IsADirectory),
            (_, Some(passthrough)) => Ok(passthrough.opening(&inode)),
            (_, None) => Ok(Opening::Cached),
        }
    }

    /// Up to `size` bytes from `offset`, as pieces to write without copying.
    pub fn read_data(&self, node: u64, offset: u64, size: u32) -> Result<Vec<Piece>, FsError> {
        let inode = self.inode_of_kind(node, InodeKind::File)?;
        let bootstrap = &self.image.bootstrap;
        let extents = bootstrap.extents(&inode, offset, size.into())?;
        #[cfg(feature = "failpoints")]
        crate::failpoints::panic_in_read();
        self.readahead.on_read(&inode, offset, size.into());
        let mut pieces = Vec::with_capacity(extents.len());
        for extent in extents {
            let len = extent.len as usize;
            match extent.target {
                ExtentTarget::Hole => pieces.push(Piece::Zeros(len)),
                ExtentTarget::Bootstrap { offset } => {
                    pieces.push(Piece::Owned(bootstrap.bytes()[offset as usize..offset as usize + len].to_vec()))
                }
                ExtentTarget::Blob { offset } => {
                    let (data, start) = self.blob_chunk(offset)?;
                    let end = (start + len).min(data.len());
                    if start < end {
                        pieces.push(Piece::Shared { data: data.clone(), start, end });
                    }
                    let short = len - end.saturating_sub(start);
                    if short > 0 {
                        pieces.push(Piece::Zeros(short));
                    }
                }
            }
        }
        let served: usize = pieces.iter().map(Piece::len).sum();
        self.stats.bytes_served.fetch_add(served as u64, Ordering::Relaxed);
        Ok(pieces)
    }

    pub fn list_dir(&self, node: u64, cookie: u64, add: &mut dyn FnMut(DirEntryOut) -> bool) -> Result<(), FsError> {
        let dir = self.inode_of_kind(node, InodeKind::Dir)?;
        Ok(self.image.bootstrap.for_each_dir_entry(&dir, cookie, &mut |entry, next_cookie| {
            add(DirEntryOut { ino: self.nodeid(entry.nid), kind: erofs_type_to_dt(entry.file_type), name: entry.name, next_cookie })
        })?)
    }

    pub fn xattr(&self, node: u64, name: &[u8]) -> Result<Vec<u8>, FsError> {
        let xattrs = self.image.bootstrap.xattrs(&self.inode(node)?)?;
        xattrs.into_iter().find(|x| x.name == name).map(|x| x.value).ok_or(FsError::NoSuchAttribute)
    }

    /// Names, each followed by a NUL.
    pub fn xattr_names(&self, node: u64) -> Result<Vec<u8>, FsError> {
        let xattrs = self.image.bootstrap.xattrs(&self.inode(node)?)?;
        Ok(xattrs.into_iter().flat_map(|x| x.name.into_iter().chain([0])).collect())
    }

    /// SEEK_DATA / SEEK_HOLE, as the kernel's EROFS answers them.
    pub fn seek(&self, node: u64, offset: u64, whence: u32) -> Result<u64, FsError> {
        let inode = self.inode(node)?;
        if offset >= inode.size() {
            return Err(FsError::NothingThere);
        }
        let want_data = match whence as i32 {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(FsError::BadWhence(whence)),
        };
        let extents = self.image.bootstrap.extents(&inode, offset, inode.size() - offset)?;
        let found = extents.iter().find(|e| (e.target != ExtentTarget::Hole) == want_data).map(|e| e.file_offset.max(offset));
        match (found, want_data) {
            (Some(at), _) => Ok(at),
            (None, true) => Err(FsError::NothingThere),
            (None, false) => Ok(inode.size()),
        }
    }
}

/// EROFS_FT_* to DT_*.
fn erofs_type_to_dt(file_type: u8) -> u8 {
    match file_type {
        1 => libc::DT_REG,
        2 => libc::DT_DIR,
        3 => libc::DT_CHR,
        4 => libc::DT_BLK,
        5 => libc::DT_FIFO,
        6 => libc::DT_SOCK,
        7 => libc::DT_LNK,
        _ => libc::DT_UNKNOWN,
    }
}

impl Filesystem for ImageFs {
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, Errno> {
        self.answer(self.lookup_child(parent, name).map(|attr| Entry { attr }))
    }

    fn getattr(&self, node: u64) -> Result<Attr, Errno> {
        self.answer(self.attributes(node))
    }

    fn readlink(&self, node: u64) -> Result<Vec<u8>, Errno> {
        self.answer(self.link_target(node))
    }

    fn open(&self, node: u64) -> Result<Opening, Errno> {
        self.answer(self.check_open(node))
    }

    fn released(&self, node: u64) {
        if let (Some(passthrough), Ok(nid)) = (&self.passthrough, self.nid(node)) {
            if let Ok(inode) = self.image.bootstrap.inode(nid) {
                passthrough.released(&inode);
            }
        }
    }

    fn read(&self, node: u64, offset: u64, size: u32) -> Result<Vec<Piece>, Errno> {
        self.answer(self.read_data(node, offset, size))
    }

    fn readdir(&self, node: u64, cookie: u64, add: &mut dyn FnMut(DirEntryOut) -> bool) -> Result<(), Errno> {
        self.answer(self.list_dir(node, cookie, add))
    }

    fn statfs(&self) -> StatFs {
        let bootstrap = &self.image.bootstrap;
        let blob = bootstrap.blob().map_or(0, |(_, len)| len);
        StatFs {
            blocks: (bootstrap.bytes().len() as u64 + blob) / 4096,
            files: bootstrap.superblock().inos,
            block_size: 4096,
            name_max: 255,
        }
    }

    fn getxattr(&self, node: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        self.answer(self.xattr(node, name))
    }

    fn listxattr(&self, node: u64) -> Result<Vec<u8>, Errno> {
        self.answer(self.xattr_names(node))
    }

    fn lseek(&self, node: u64, offset: u64, whence: u32) -> Result<u64, Errno> {
        self.answer(self.seek(node, offset, whence))
    }
}
