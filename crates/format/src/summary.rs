//! What an image holds, counted by walking its whole bootstrap and chunk table. The walk also
//! validates every inode, xattr area, symlink, chunk index and chunk table entry on the way, so
//! a summary that succeeds means the image is readable from end to end.

use std::collections::HashSet;

use crate::error::FormatError;
use crate::image::ImageFile;
use crate::reader::{ExtentTarget, InodeKind};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Directory entries other than `.` and `..`, plus the root.
    pub paths: u64,
    pub directories: u64,
    pub regular_files: u64,
    pub symlinks: u64,
    /// Devices, fifos and sockets.
    pub special_files: u64,
    /// Regular files whose data is inline in the bootstrap.
    pub inline_files: u64,
    /// Sum of the sizes of distinct regular files.
    pub logical_bytes: u64,
    pub chunk_size: u64,
    /// Distinct chunks (entries of the chunk table).
    pub chunks: u64,
    /// Uncompressed bytes of the distinct chunks.
    pub chunk_bytes: u64,
    /// Bytes the distinct chunks take in a store.
    pub stored_chunk_bytes: u64,
    /// Chunk-sized pieces of files that point into the blob (holes not counted).
    pub chunk_references: u64,
    /// Bytes of files served from the blob, counting every reference.
    pub referenced_bytes: u64,
    pub bootstrap_bytes: u64,
}

impl Summary {
    /// Referenced bytes per distinct chunk byte: how much deduplication saved.
    pub fn dedup_ratio(&self) -> f64 {
        if self.chunk_bytes == 0 {
            1.0
        } else {
            self.referenced_bytes as f64 / self.chunk_bytes as f64
        }
    }
}

pub fn summarize(image: &ImageFile) -> Result<Summary, FormatError> {
    let bootstrap = &image.bootstrap;
    let mut summary = Summary {
        chunk_size: image.table.chunk_size(),
        chunks: image.table.len() as u64,
        bootstrap_bytes: bootstrap.bytes().len() as u64,
        ..Default::default()
    };
    for entry in image.table.entries() {
        let entry = entry?;
        summary.chunk_bytes += u64::from(entry.length);
        summary.stored_chunk_bytes += u64::from(entry.stored_length);
    }
    let mut seen = HashSet::new();
    for (_, inode) in bootstrap.walk()? {
        summary.paths += 1;
        if !seen.insert(inode.nid) {
            continue;
        }
        bootstrap.xattrs(&inode)?;
        match inode.kind {
            InodeKind::Dir => summary.directories += 1,
            InodeKind::Symlink => {
                bootstrap.read_link(&inode)?;
                summary.symlinks += 1;
            }
            InodeKind::File => {
                summary.regular_files += 1;
                summary.logical_bytes += inode.size();
                let mut inline = true;
                for extent in bootstrap.extents(&inode, 0, inode.size())? {
                    if let ExtentTarget::Blob { .. } = extent.target {
                        inline = false;
                        summary.chunk_references += 1;
                        summary.referenced_bytes += extent.len;
                    }
                    if extent.target == ExtentTarget::Hole {
                        inline = false;
                    }
                }
                if inline && inode.size() > 0 {
                    summary.inline_files += 1;
                }
            }
            InodeKind::CharDevice | InodeKind::BlockDevice | InodeKind::Fifo | InodeKind::Socket => {
                summary.special_files += 1
            }
        }
    }
    Ok(summary)
}
