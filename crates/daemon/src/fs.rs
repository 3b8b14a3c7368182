//! [`ImageFs`]: the image as a read-only FUSE file system.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use phoenixfs_cache::ChunkCache;
use phoenixfs_format::{ExtentTarget, FormatError, ImageFile, Inode, InodeKind, Nid};
use phoenixfs_fuse::{Attr, DirEntryOut, Entry, Filesystem, Piece, StatFs, ROOT_NODEID};
use phoenixfs_store::ChunkStore;
use tracing::error;

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
}

impl ImageFs {
    pub fn new(image: Arc<ImageFile>, store: Arc<dyn ChunkStore>, cache: Arc<ChunkCache>, readahead_bytes: u64) -> Arc<Self> {
        let readahead = Readahead::new(image.clone(), store.clone(), cache.clone(), readahead_bytes);
        Arc::new(ImageFs { image, store, cache, stats: FsStats::default(), readahead })
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

    fn nid(&self, node: u64) -> Result<Nid, Errno> {
        match node {
            ROOT_NODEID => Ok(self.root_nid()),
            0 => Err(Errno::EINVAL),
            n => Ok(n - 2),
        }
    }

    fn corrupt(&self, error: FormatError) -> Errno {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        error!(image = %self.image.id, %error, "image is corrupt");
        Errno::EIO
    }

    fn inode(&self, node: u64) -> Result<Inode, Errno> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let nid = self.nid(node)?;
        self.image.bootstrap.inode(nid).map_err(|e| self.corrupt(e))
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

    /// The chunk at blob `offset`, verified, from the cache; errors name image and chunk.
    fn blob_chunk(&self, offset: u64) -> Result<(Arc<[u8]>, usize), Errno> {
        let chunk = self.image.table.locate(offset).map_err(|e| self.corrupt(e))?;
        let data = self.cache.get(&chunk.entry, self.store.as_ref()).map_err(|e| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            error!(image = %self.image.id, chunk = chunk.index, digest = %chunk.entry.digest, error = %e, "cannot read chunk");
            Errno::EIO
        })?;
        Ok((data, chunk.within))
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
        let dir = self.inode(parent)?;
        if dir.kind != InodeKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let nid = self.image.bootstrap.lookup(&dir, name).map_err(|e| self.corrupt(e))?.ok_or(Errno::ENOENT)?;
        let inode = self.image.bootstrap.inode(nid).map_err(|e| self.corrupt(e))?;
        Ok(Entry { attr: self.attr(&inode) })
    }

    fn getattr(&self, node: u64) -> Result<Attr, Errno> {
        Ok(self.attr(&self.inode(node)?))
    }

    fn readlink(&self, node: u64) -> Result<Vec<u8>, Errno> {
        let inode = self.inode(node)?;
        if inode.kind != InodeKind::Symlink {
            return Err(Errno::EINVAL);
        }
        self.image.bootstrap.read_link(&inode).map_err(|e| self.corrupt(e))
    }

    fn open(&self, node: u64) -> Result<(), Errno> {
        match self.inode(node)?.kind {
            InodeKind::Dir => Err(Errno::EISDIR),
            _ => Ok(()),
        }
    }

    fn read(&self, node: u64, offset: u64, size: u32) -> Result<Vec<Piece>, Errno> {
        let inode = self.inode(node)?;
        if inode.kind != InodeKind::File {
            return Err(Errno::EINVAL);
        }
        let bootstrap = &self.image.bootstrap;
        let extents = bootstrap.extents(&inode, offset, size.into()).map_err(|e| self.corrupt(e))?;
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

    fn readdir(&self, node: u64, cookie: u64, add: &mut dyn FnMut(DirEntryOut) -> bool) -> Result<(), Errno> {
        let dir = self.inode(node)?;
        if dir.kind != InodeKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        self.image
            .bootstrap
            .for_each_dir_entry(&dir, cookie, &mut |entry, next_cookie| {
                add(DirEntryOut { ino: self.nodeid(entry.nid), kind: erofs_type_to_dt(entry.file_type), name: entry.name, next_cookie })
            })
            .map_err(|e| self.corrupt(e))
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
        let inode = self.inode(node)?;
        let xattrs = self.image.bootstrap.xattrs(&inode).map_err(|e| self.corrupt(e))?;
        xattrs.into_iter().find(|x| x.name == name).map(|x| x.value).ok_or(Errno::ENODATA)
    }

    fn listxattr(&self, node: u64) -> Result<Vec<u8>, Errno> {
        let inode = self.inode(node)?;
        let xattrs = self.image.bootstrap.xattrs(&inode).map_err(|e| self.corrupt(e))?;
        Ok(xattrs.into_iter().flat_map(|x| x.name.into_iter().chain([0])).collect())
    }

    fn lseek(&self, node: u64, offset: u64, whence: u32) -> Result<u64, Errno> {
        let inode = self.inode(node)?;
        if offset >= inode.size() {
            return Err(Errno::ENXIO);
        }
        let extents = self.image.bootstrap.extents(&inode, offset, inode.size() - offset).map_err(|e| self.corrupt(e))?;
        let want_data = match whence as i32 {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(Errno::EINVAL),
        };
        let found = extents.iter().find(|e| (e.target != ExtentTarget::Hole) == want_data).map(|e| e.file_offset.max(offset));
        match (found, want_data) {
            (Some(at), _) => Ok(at),
            (None, true) => Err(Errno::ENXIO),
            (None, false) => Ok(inode.size()),
        }
    }
}
