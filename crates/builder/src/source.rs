//! Walking the source directory into a [`Tree`], in a fixed order (breadth first, entries
//! sorted by name bytes), so that the same tree always yields the same image.
//!
//! File contents are not read here; each regular file becomes a [`SourceFile`] that the
//! chunker reads later, checking that it is still the file that was listed.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use phoenixfs_format::layout::split_xattr_name;
use phoenixfs_format::tree::{fits_inline, Attr, FileData, Node, NodeKind, Tree, TreeEntry, Xattr};

use crate::BuildError;

/// A regular file whose data the chunker must read.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub node: usize,
    pub path: PathBuf,
    pub size: u64,
    /// Stored in the bootstrap rather than in chunks.
    pub inline: bool,
    pub identity: Identity,
}

/// What must stay the same between listing a file and reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    pub fn of(meta: &Metadata) -> Self {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

pub struct Scan {
    pub tree: Tree,
    pub files: Vec<SourceFile>,
}

pub(crate) fn source_error(path: &Path) -> impl FnOnce(io::Error) -> BuildError + '_ {
    move |source| match source.kind() {
        io::ErrorKind::NotFound => BuildError::Vanished { path: path.to_path_buf() },
        _ => BuildError::Source { path: path.to_path_buf(), source },
    }
}

/// Lists `src` completely: every inode with its attributes and xattrs.
pub fn scan(src: &Path) -> Result<Scan, BuildError> {
    let meta = fs::symlink_metadata(src).map_err(|source| BuildError::Source { path: src.to_path_buf(), source })?;
    if !meta.is_dir() {
        return Err(BuildError::NotADirectory { path: src.to_path_buf() });
    }
    let mut tree = Tree { nodes: vec![new_node(src, &meta, NodeKind::Dir(Vec::new()))?] };
    let mut files = Vec::new();
    let mut hard_links: HashMap<(u64, u64), usize> = HashMap::new();
    let mut pending = VecDeque::from([(0usize, src.to_path_buf())]);
    while let Some((dir_node, dir_path)) = pending.pop_front() {
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir_path).map_err(source_error(&dir_path))? {
            names.push(entry.map_err(source_error(&dir_path))?.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let path = dir_path.join(&name);
            let meta = fs::symlink_metadata(&path).map_err(source_error(&path))?;
            let link_key = (meta.dev(), meta.ino());
            if !meta.is_dir() && meta.nlink() > 1 {
                if let Some(&node) = hard_links.get(&link_key) {
                    entries.push(TreeEntry { name: name.as_bytes().to_vec(), node });
                    continue;
                }
            }
            let index = tree.nodes.len();
            let file_type = meta.file_type();
            let kind = if file_type.is_dir() {
                pending.push_back((index, path.clone()));
                NodeKind::Dir(Vec::new())
            } else if file_type.is_file() {
                NodeKind::File(FileData::Inline(Vec::new()))
            } else if file_type.is_symlink() {
                let target = fs::read_link(&path).map_err(source_error(&path))?;
                NodeKind::Symlink(target.as_os_str().as_bytes().to_vec())
            } else if file_type.is_char_device() {
                NodeKind::CharDevice(meta.rdev())
            } else if file_type.is_block_device() {
                NodeKind::BlockDevice(meta.rdev())
            } else if file_type.is_fifo() {
                NodeKind::Fifo
            } else {
                NodeKind::Socket
            };
            let node = new_node(&path, &meta, kind)?;
            if file_type.is_file() {
                files.push(SourceFile {
                    node: index,
                    path: path.clone(),
                    size: meta.size(),
                    inline: fits_inline(meta.size(), &node.xattrs),
                    identity: Identity::of(&meta),
                });
            }
            if !meta.is_dir() && meta.nlink() > 1 {
                hard_links.insert(link_key, index);
            }
            tree.nodes.push(node);
            entries.push(TreeEntry { name: name.as_bytes().to_vec(), node: index });
        }
        tree.nodes[dir_node].kind = NodeKind::Dir(entries);
    }
    Ok(Scan { tree, files })
}

fn new_node(path: &Path, meta: &Metadata, kind: NodeKind) -> Result<Node, BuildError> {
    let attr = Attr {
        mode: (meta.mode() & 0o7777) as u16,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        mtime_nsec: meta.mtime_nsec() as u32,
    };
    Ok(Node { attr, xattrs: read_xattrs(path)?, kind })
}

/// The xattrs of `path` itself (symlinks are not followed), sorted by name.
fn read_xattrs(path: &Path) -> Result<Vec<Xattr>, BuildError> {
    let mut out = Vec::new();
    for name in xattr::list(path).map_err(source_error(path))? {
        let name = name.as_bytes().to_vec();
        if split_xattr_name(&name).is_none() {
            return Err(BuildError::XattrNamespace { path: path.to_path_buf(), name: String::from_utf8_lossy(&name).into_owned() });
        }
        let value = xattr::get(path, std::ffi::OsStr::from_bytes(&name)).map_err(source_error(path))?;
        out.push(Xattr { name, value: value.unwrap_or_default() });
    }
    out.sort();
    Ok(out)
}
