//! Packing a tar stream into an image without unpacking it: entries are read in stream order,
//! file data is cut into chunks as it streams past and handed to worker threads that hash,
//! compress and store them, and the tree is numbered afterwards exactly as a directory
//! build numbers it (breadth first, names sorted), so a tar and the tree it unpacks to give
//! the same image.
//!
//! What the tar says is what the image holds: owners, modes and times (PAX `mtime` with its
//! fraction, PAX `uid`/`gid` beyond the header's range), xattrs (`SCHILY.xattr.*`), POSIX ACLs
//! (`SCHILY.acl.access`/`.default`, as GNU tar and star write them), devices, fifos, hard links
//! and symlinks, GNU and PAX long names. Directories the stream never lists get mode 0755,
//! owner 0 and time 0. A later entry for a path replaces an earlier one, as when unpacking.
//! A damaged or truncated stream is an error naming the entry and nothing is published.
//!
//! Several streams can be laid one over another, as the layers of a container image are
//! ([`build_from_layers`]): with [`Whiteouts::Applied`], `.wh.NAME` deletes NAME from the layers
//! below and `.wh..wh..opq` hides everything the layers below put in its directory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read};
use std::path::Component;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use indicatif::ProgressBar;
use phoenixfs_format::layout::split_xattr_name;
use phoenixfs_format::tree::{fits_inline, Attr, FileData, Node, NodeKind, Tree, TreeEntry, Xattr};
use phoenixfs_store::ChunkStore;

use crate::chunker::{assemble, progress_bar, ChunkOutcome, ChunkSink};
use crate::tar_reader::{TarEntry, TarReader};
use crate::{check_chunk_bits, publish, BuildError, BuildOptions, Built};

/// Chunks read ahead of the workers, per worker.
const QUEUE_PER_WORKER: usize = 2;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";

/// One tar stream of a build: plain, gzip or zstd compressed (told by its first bytes).
pub struct Layer {
    /// Names the stream in errors.
    pub name: String,
    pub stream: Box<dyn Read>,
}

/// What `.wh.` names in a stream mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Nothing special: files like any other (a plain tar).
    Kept,
    /// Deletions from the layers below, as in OCI and Docker image layers.
    Applied,
}

/// Packs the tar stream `input` (plain, gzip or zstd compressed: told by its first bytes)
/// into an image; `name` names the stream in errors.
pub fn build_from_tar(input: impl Read + 'static, name: &str, store: &dyn ChunkStore, options: &BuildOptions) -> Result<Built, BuildError> {
    let layer = Layer { name: name.to_string(), stream: Box::new(input) };
    build_from_layers(std::iter::once(Ok(layer)), Whiteouts::Kept, &[], store, options)
}

/// Packs tar streams laid one over another, the first at the bottom, into one image carrying
/// `metadata` ([`phoenixfs_format::ImageFile::metadata`]). Each stream is opened when the one
/// before has been read to its end.
pub fn build_from_layers(
    layers: impl Iterator<Item = Result<Layer, BuildError>>,
    whiteouts: Whiteouts,
    metadata: &[u8],
    store: &dyn ChunkStore,
    options: &BuildOptions,
) -> Result<Built, BuildError> {
    check_chunk_bits(options)?;
    let sink = ChunkSink::new(store, options);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (queue, pieces) = sync_channel::<Piece>(workers * QUEUE_PER_WORKER);
    let pieces = Mutex::new(pieces);
    let results: Mutex<HashMap<(usize, u64), ChunkOutcome>> = Mutex::new(HashMap::new());
    let failed: Mutex<Option<BuildError>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let progress = progress_bar(options.progress, None);

    let mut tree = StreamTree::new();
    let read = std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| store_pieces(&pieces, &sink, &results, &failed, &stop));
        }
        let stream = Stream { chunk_bits: options.chunk_bits, queue: &queue, results: &results, stop: &stop, progress: &progress };
        let read = (|| {
            for (index, layer) in layers.enumerate() {
                let layer = layer?;
                let depth = u32::try_from(index).unwrap_or(u32::MAX);
                read_layer(layer, depth, whiteouts, &mut tree, &stream)?;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            Ok::<(), BuildError>(())
        })();
        drop(queue);
        if read.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        read
    });
    progress.finish_and_clear();
    read?;
    if let Some(error) = failed.into_inner().expect("not poisoned") {
        return Err(error);
    }

    let (tree, files) = tree.numbered();
    let mut results = results.into_inner().expect("not poisoned");
    let sizes: Vec<u64> = files.iter().map(|f| f.size).collect();
    let file_nodes: Vec<usize> = files.iter().map(|f| f.node).collect();
    let mut outcomes = Vec::new();
    for (i, file) in files.into_iter().enumerate() {
        match file.data {
            StreamData::Inline(bytes) => outcomes.push((i, ChunkOutcome::Inline(bytes))),
            StreamData::Chunked { id, chunks } => {
                for index in 0..chunks {
                    let outcome = results.remove(&(id, index)).expect("every piece was stored or the build failed");
                    outcomes.push((i, outcome));
                }
            }
        }
    }
    let processed = assemble(options.chunk_bits, &sizes, outcomes.into_iter(), sink);
    publish(tree, &file_nodes, processed, metadata, store, options)
}

/// Adds the entries of one stream to `tree` and reads the stream to its very end (so that a
/// stream checking its own digest at the end gets to check it).
fn read_layer(layer: Layer, depth: u32, whiteouts: Whiteouts, tree: &mut StreamTree, stream: &Stream) -> Result<(), BuildError> {
    let bad = |detail: String| BuildError::Tar { name: layer.name.clone(), detail };
    let mut input = io::BufReader::with_capacity(1 << 20, layer.stream);
    let magic = {
        let buffered = io::BufRead::fill_buf(&mut input).map_err(|e| bad(e.to_string()))?;
        buffered[..buffered.len().min(4)].to_vec()
    };
    let decompressed: Box<dyn Read> = match magic.as_slice() {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(input)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::with_buffer(input).map_err(|e| bad(format!("zstd: {e}")))?),
        [] => return Err(bad("the stream is empty".into())),
        _ => Box::new(input),
    };
    let mut reader = TarReader::new(decompressed);
    let mut last = String::new();
    loop {
        let entry = match reader.next_entry() {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            Err(e) if last.is_empty() => return Err(bad(format!("not a tar stream (nor a directory): {e}"))),
            Err(e) => return Err(bad(format!("after {last}: {e}"))),
        };
        last = String::from_utf8_lossy(&entry.path).into_owned();
        tree.add(&entry, &mut reader, stream, depth, whiteouts).map_err(|detail| bad(format!("{last}: {detail}")))?;
        if stream.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
    io::copy(&mut reader.into_inner(), &mut io::sink()).map_err(|e| bad(format!("after the end of the archive: {e}")))?;
    Ok(())
}

/// One chunk of a file's data on its way to the store.
struct Piece {
    file: usize,
    index: u64,
    data: Vec<u8>,
}

fn store_pieces(
    pieces: &Mutex<Receiver<Piece>>,
    sink: &ChunkSink,
    results: &Mutex<HashMap<(usize, u64), ChunkOutcome>>,
    failed: &Mutex<Option<BuildError>>,
    stop: &AtomicBool,
) {
    loop {
        let Ok(piece) = pieces.lock().expect("not poisoned").recv() else { return };
        if stop.load(Ordering::Relaxed) {
            continue;
        }
        match sink.put(&piece.data) {
            Ok(outcome) => {
                results.lock().expect("not poisoned").insert((piece.file, piece.index), outcome);
            }
            Err(error) => {
                stop.store(true, Ordering::Relaxed);
                failed.lock().expect("not poisoned").get_or_insert(error);
            }
        }
    }
}

enum StreamData {
    Inline(Vec<u8>),
    /// Chunks `0..chunks` of stream file `id`, stored by the workers.
    Chunked { id: usize, chunks: u64 },
}

/// A regular file as numbered in the final tree.
struct StreamFile {
    node: usize,
    size: u64,
    data: StreamData,
}

/// The tree as the stream builds it: nodes in stream order, directories as sorted maps.
struct StreamTree {
    nodes: Vec<StreamNode>,
    next_file: usize,
}

struct StreamNode {
    attr: Attr,
    xattrs: Vec<Xattr>,
    kind: StreamKind,
    /// The stream (layer) that last listed it, 0 at the bottom.
    layer: u32,
}

enum StreamKind {
    Dir(BTreeMap<Vec<u8>, usize>),
    File { size: u64, data: StreamData },
    Other(NodeKind),
}

impl StreamTree {
    fn new() -> Self {
        StreamTree { nodes: vec![implicit_dir(0)], next_file: 0 }
    }

    /// Adds one tar entry of stream `layer`, its data read from `data` and handed to `queue`
    /// chunk by chunk; or, for a whiteout, deletes what it names.
    fn add(&mut self, entry: &TarEntry, data: &mut TarReader<impl Read>, stream: &Stream, layer: u32, whiteouts: Whiteouts) -> Result<(), String> {
        let names = components(&entry.path)?;
        if whiteouts == Whiteouts::Applied {
            if let Some((name, parents)) = names.split_last().filter(|(name, _)| name.starts_with(WHITEOUT_PREFIX)) {
                self.white_out(parents, name, layer);
                return Ok(());
            }
        }
        let (xattrs, acl_mode) = xattrs(&entry.pax)?;
        let mut mode = (entry.mode & 0o7777) as u16;
        if let Some(bits) = acl_mode {
            mode = mode & !0o777 | bits;
        }
        let attr = Attr {
            mode,
            uid: u32::try_from(entry.uid).map_err(|_| "uid beyond 32 bits")?,
            gid: u32::try_from(entry.gid).map_err(|_| "gid beyond 32 bits")?,
            mtime: entry.mtime.0,
            mtime_nsec: entry.mtime.1,
        };
        let node = match entry.kind {
            b'5' => {
                if let Some(existing) = self.lookup(&names).filter(|&n| matches!(self.nodes[n].kind, StreamKind::Dir(_))) {
                    let node = &mut self.nodes[existing];
                    (node.attr, node.xattrs, node.layer) = (attr, xattrs, layer);
                    return Ok(());
                }
                StreamNode { attr, xattrs, kind: StreamKind::Dir(BTreeMap::new()), layer }
            }
            b'1' => {
                let target = self.lookup(&components(&entry.link)?).ok_or_else(|| format!("a hard link to {}, which the stream has not shown", String::from_utf8_lossy(&entry.link)))?;
                if matches!(self.nodes[target].kind, StreamKind::Dir(_)) {
                    return Err("a hard link to a directory".into());
                }
                return self.link(&names, target, layer);
            }
            b'2' => StreamNode { attr, xattrs, kind: StreamKind::Other(NodeKind::Symlink(entry.link.clone())), layer },
            b'3' | b'4' => {
                let rdev = nix::sys::stat::makedev(entry.major.into(), entry.minor.into());
                let kind = if entry.kind == b'3' { NodeKind::CharDevice(rdev) } else { NodeKind::BlockDevice(rdev) };
                StreamNode { attr, xattrs, kind: StreamKind::Other(kind), layer }
            }
            b'6' => StreamNode { attr, xattrs, kind: StreamKind::Other(NodeKind::Fifo), layer },
            _ => {
                let size = entry.size;
                let stored = if fits_inline(size, &xattrs) {
                    let mut bytes = vec![0u8; size as usize];
                    data.read_exact(&mut bytes).map_err(|e| e.to_string())?;
                    stream.progress.inc(size);
                    StreamData::Inline(bytes)
                } else {
                    let id = self.next_file;
                    self.next_file += 1;
                    let chunks = stream.read_chunks(data, id, size)?;
                    StreamData::Chunked { id, chunks }
                };
                StreamNode { attr, xattrs, kind: StreamKind::File { size, data: stored }, layer }
            }
        };
        let Some((name, parents)) = names.split_last() else {
            return Err("only a directory can be the root".into());
        };
        let parent = self.make_dirs(parents, layer)?;
        let index = self.nodes.len();
        self.nodes.push(node);
        self.children(parent)?.insert(name.clone(), index);
        Ok(())
    }

    fn link(&mut self, names: &[Vec<u8>], target: usize, layer: u32) -> Result<(), String> {
        let (name, parents) = names.split_last().ok_or("a hard link cannot be the root")?;
        let parent = self.make_dirs(parents, layer)?;
        self.children(parent)?.insert(name.clone(), target);
        Ok(())
    }

    /// Applies whiteout `name` (in directory `parents`) of stream `layer`. A whiteout of
    /// something no layer below has hides nothing; aufs's other `.wh..wh.` names (hard link
    /// and metadata bookkeeping) mean nothing here.
    fn white_out(&mut self, parents: &[Vec<u8>], name: &[u8], layer: u32) {
        let Some(dir) = self.lookup(parents) else { return };
        if name == OPAQUE_WHITEOUT {
            self.hide_lower(dir, layer);
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX).filter(|n| !n.starts_with(WHITEOUT_PREFIX)) {
            if let Ok(children) = self.children(dir) {
                children.remove(hidden);
            }
        }
    }

    /// Takes out of `dir` whatever layers below `layer` put there, also below directories
    /// that `layer` lists again.
    fn hide_lower(&mut self, dir: usize, layer: u32) {
        let StreamKind::Dir(children) = &self.nodes[dir].kind else { return };
        let children: Vec<(Vec<u8>, usize)> = children.iter().map(|(name, &child)| (name.clone(), child)).collect();
        for (name, child) in children {
            if self.nodes[child].layer < layer {
                if let StreamKind::Dir(entries) = &mut self.nodes[dir].kind {
                    entries.remove(&name);
                }
            } else if matches!(self.nodes[child].kind, StreamKind::Dir(_)) {
                self.hide_lower(child, layer);
            }
        }
    }

    fn lookup(&self, names: &[Vec<u8>]) -> Option<usize> {
        names.iter().try_fold(0, |node, name| match &self.nodes[node].kind {
            StreamKind::Dir(children) => children.get(name).copied(),
            _ => None,
        })
    }

    /// The directory at `names`, made (with default attributes) where the stream has not
    /// listed it yet.
    fn make_dirs(&mut self, names: &[Vec<u8>], layer: u32) -> Result<usize, String> {
        let mut node = 0;
        for name in names {
            node = match self.children(node)?.get(name) {
                Some(&child) => child,
                None => {
                    let child = self.nodes.len();
                    self.nodes.push(implicit_dir(layer));
                    self.children(node)?.insert(name.clone(), child);
                    child
                }
            };
        }
        Ok(node)
    }

    fn children(&mut self, node: usize) -> Result<&mut BTreeMap<Vec<u8>, usize>, String> {
        match &mut self.nodes[node].kind {
            StreamKind::Dir(children) => Ok(children),
            _ => Err("a path goes through something that is not a directory".into()),
        }
    }

    /// The tree numbered as a directory build numbers it (breadth first from the root,
    /// entries by name), with its regular files in that order.
    fn numbered(self) -> (Tree, Vec<StreamFile>) {
        let mut number: HashMap<usize, usize> = HashMap::from([(0, 0)]);
        let mut order = vec![0usize];
        let mut pending = VecDeque::from([0usize]);
        while let Some(dir) = pending.pop_front() {
            if let StreamKind::Dir(children) = &self.nodes[dir].kind {
                for &child in children.values() {
                    if let std::collections::hash_map::Entry::Vacant(slot) = number.entry(child) {
                        slot.insert(order.len());
                        order.push(child);
                        if matches!(self.nodes[child].kind, StreamKind::Dir(_)) {
                            pending.push_back(child);
                        }
                    }
                }
            }
        }
        let mut slots: Vec<Option<StreamNode>> = self.nodes.into_iter().map(Some).collect();
        let mut tree = Tree { nodes: Vec::with_capacity(order.len()) };
        let mut files = Vec::new();
        for (final_index, &old) in order.iter().enumerate() {
            let node = slots[old].take().expect("each node is numbered once");
            let kind = match node.kind {
                StreamKind::Dir(children) => NodeKind::Dir(children.into_iter().map(|(name, child)| TreeEntry { name, node: number[&child] }).collect()),
                StreamKind::File { size, data } => {
                    files.push(StreamFile { node: final_index, size, data });
                    NodeKind::File(FileData::Inline(Vec::new()))
                }
                StreamKind::Other(kind) => kind,
            };
            tree.nodes.push(Node { attr: node.attr, xattrs: node.xattrs, kind });
        }
        (tree, files)
    }
}

fn implicit_dir(layer: u32) -> StreamNode {
    StreamNode { attr: Attr { mode: 0o755, uid: 0, gid: 0, mtime: 0, mtime_nsec: 0 }, xattrs: Vec::new(), kind: StreamKind::Dir(BTreeMap::new()), layer }
}

/// Where the data of the files in a stream goes.
struct Stream<'a> {
    chunk_bits: u8,
    queue: &'a SyncSender<Piece>,
    /// The outcome of each chunk (stream file, chunk index) once known.
    results: &'a Mutex<HashMap<(usize, u64), ChunkOutcome>>,
    stop: &'a AtomicBool,
    progress: &'a ProgressBar,
}

impl Stream<'_> {
    /// Reads stream file `file`'s `size` bytes and queues them chunk by chunk (holes of a
    /// sparse file are passed over unread); the number of chunks.
    fn read_chunks(&self, data: &mut TarReader<impl Read>, file: usize, size: u64) -> Result<u64, String> {
        let chunk_size = 1u64 << self.chunk_bits;
        let chunks = size.div_ceil(chunk_size);
        for index in 0..chunks {
            let len = chunk_size.min(size - index * chunk_size);
            self.progress.inc(len);
            if data.skip_hole(len) {
                self.results.lock().expect("not poisoned").insert((file, index), ChunkOutcome::Hole);
                continue;
            }
            let mut piece = vec![0u8; len as usize];
            data.read_exact(&mut piece).map_err(|e| e.to_string())?;
            if self.stop.load(Ordering::Relaxed) || self.queue.send(Piece { file, index, data: piece }).is_err() {
                break;
            }
        }
        Ok(chunks)
    }
}

/// The names of a tar path from the root: `.` and a leading `/` dropped, `..` refused.
fn components(path: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
    let mut names = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => names.push(name.as_bytes().to_vec()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err("a path with \"..\" in it".into()),
        }
    }
    Ok(names)
}

/// The xattrs of an entry's PAX records, ACLs among them, sorted by name; and the permission
/// bits its access ACL gives, if it has one (setting an ACL sets them: an archive's mode may
/// hold the owning group's bits where the kernel shows the mask's).
fn xattrs(pax: &[(String, Vec<u8>)]) -> Result<(Vec<Xattr>, Option<u16>), String> {
    let mut out: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut acl_mode = None;
    for (key, value) in pax {
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            if split_xattr_name(name.as_bytes()).is_none() {
                return Err(format!("xattr {name:?} is in a namespace EROFS cannot store"));
            }
            out.insert(name.as_bytes().to_vec(), value.clone());
        }
        let acl = match key.as_str() {
            "SCHILY.acl.access" => "system.posix_acl_access",
            "SCHILY.acl.default" => "system.posix_acl_default",
            _ => continue,
        };
        let text = std::str::from_utf8(value).map_err(|_| format!("{key} is not text"))?;
        let binary = acl::from_text(text).map_err(|e| format!("{key}: {e}"))?;
        if key == "SCHILY.acl.access" && !acl::is_empty(&binary) {
            acl_mode = Some(acl::mode_bits(&binary));
        }
        // An access ACL of the three base entries only is the mode itself: the kernel keeps
        // no xattr for it, so neither does the image.
        match acl::is_empty(&binary) || (key == "SCHILY.acl.access" && acl::is_minimal(&binary)) {
            true => out.remove(acl.as_bytes()),
            false => out.insert(acl.as_bytes().to_vec(), binary),
        };
    }
    Ok((out.into_iter().map(|(name, value)| Xattr { name, value }).collect(), acl_mode))
}

/// POSIX ACLs from their text form to the binary form the kernel keeps in
/// `system.posix_acl_*` xattrs.
mod acl {
    const VERSION: u32 = 2;
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const UNDEFINED_ID: u32 = u32::MAX;

    /// `user::rw-,user:1000:r--,group::r--,mask::r--,other::---` (entries split by commas or
    /// new lines; names or numbers as qualifiers; star's fourth field, the number, wins).
    pub fn from_text(text: &str) -> Result<Vec<u8>, String> {
        let mut entries = Vec::new();
        for item in text.split([',', '\n']).map(str::trim).filter(|s| !s.is_empty() && !s.starts_with('#')) {
            let item = item.split('#').next().unwrap_or_default().trim();
            let fields: Vec<&str> = item.split(':').collect();
            let (tag, qualifier, perms) = match fields.as_slice() {
                [tag, qualifier, perms] | [tag, qualifier, perms, _] => (*tag, *qualifier, *perms),
                _ => return Err(format!("{item:?} is not an ACL entry")),
            };
            let numeric = fields.get(3).copied().filter(|n| !n.is_empty());
            let named = !qualifier.is_empty();
            let (tag, id) = match (tag, named) {
                ("user" | "u", false) => (USER_OBJ, UNDEFINED_ID),
                ("user" | "u", true) => (USER, id_of(numeric.unwrap_or(qualifier), true)?),
                ("group" | "g", false) => (GROUP_OBJ, UNDEFINED_ID),
                ("group" | "g", true) => (GROUP, id_of(numeric.unwrap_or(qualifier), false)?),
                ("mask" | "m", _) => (MASK, UNDEFINED_ID),
                ("other" | "o", _) => (OTHER, UNDEFINED_ID),
                _ => return Err(format!("{item:?} has an unknown tag")),
            };
            entries.push((tag, id, perms_of(perms).ok_or_else(|| format!("{item:?} has bad permissions"))?));
        }
        entries.sort();
        let mut out = VERSION.to_le_bytes().to_vec();
        for (tag, id, perm) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        Ok(out)
    }

    /// The permission bits an access ACL stands for: the owner's, the mask's (else the
    /// owning group's) and the others'.
    pub fn mode_bits(binary: &[u8]) -> u16 {
        let (mut user, mut group, mut mask, mut other) = (0, 0, None, 0);
        for entry in binary[4..].chunks_exact(8) {
            let perm = u16::from_le_bytes([entry[2], entry[3]]) & 7;
            match u16::from_le_bytes([entry[0], entry[1]]) {
                USER_OBJ => user = perm,
                GROUP_OBJ => group = perm,
                MASK => mask = Some(perm),
                OTHER => other = perm,
                _ => {}
            }
        }
        user << 6 | mask.unwrap_or(group) << 3 | other
    }

    /// Whether a binary ACL has no entries.
    pub fn is_empty(binary: &[u8]) -> bool {
        binary.len() <= 4
    }

    /// Whether a binary ACL holds only the owner, group and other entries.
    pub fn is_minimal(binary: &[u8]) -> bool {
        binary[4..].chunks(8).all(|entry| matches!(u16::from_le_bytes([entry[0], entry[1]]), USER_OBJ | GROUP_OBJ | OTHER))
    }

    fn perms_of(text: &str) -> Option<u16> {
        text.chars().try_fold(0u16, |perm, c| match c {
            'r' => Some(perm | 4),
            'w' => Some(perm | 2),
            'x' => Some(perm | 1),
            '-' => Some(perm),
            _ => None,
        })
    }

    fn id_of(qualifier: &str, user: bool) -> Result<u32, String> {
        if let Ok(id) = qualifier.parse() {
            return Ok(id);
        }
        let found = match user {
            true => nix::unistd::User::from_name(qualifier).ok().flatten().map(|u| u.uid.as_raw()),
            false => nix::unistd::Group::from_name(qualifier).ok().flatten().map(|g| g.gid.as_raw()),
        };
        found.ok_or_else(|| format!("no {} named {qualifier:?} on this host", if user { "user" } else { "group" }))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn text_acls_become_the_kernels_binary_form_in_its_order() {
            let binary = from_text("user::rw-,group::r--,other::---,user:1000:r-x,mask::r-x,group:0:rw-").unwrap();
            let entry = |tag: u16, perm: u16, id: u32| [tag.to_le_bytes().as_slice(), &perm.to_le_bytes(), &id.to_le_bytes()].concat();
            let expected = [
                2u32.to_le_bytes().to_vec(),
                entry(USER_OBJ, 6, UNDEFINED_ID),
                entry(USER, 5, 1000),
                entry(GROUP_OBJ, 4, UNDEFINED_ID),
                entry(GROUP, 6, 0),
                entry(MASK, 5, UNDEFINED_ID),
                entry(OTHER, 0, UNDEFINED_ID),
            ]
            .concat();
            assert_eq!(binary, expected);
            assert_eq!(from_text("u::rw-\ng:root:r--:0\no::r--\n").unwrap().len(), 4 + 3 * 8);
            assert!(!is_minimal(&binary));
            assert!(is_minimal(&from_text("user::rwx,group::r-x,other::r-x").unwrap()));
            assert_eq!(mode_bits(&binary), 0o650, "the mask's bits, not the owning group's");
            assert_eq!(mode_bits(&from_text("user::rwx,group::r-x,other::r--").unwrap()), 0o754);
            assert!(is_empty(&from_text("").unwrap()));
            assert!(from_text("user::rwz").is_err());
            assert!(from_text("nobody::r--").is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenixfs_format::ImageFile;
    use phoenixfs_store::MemoryStore;

    /// A ustar archive of (path, type flag, data) entries.
    fn ustar(entries: &[(&str, u8, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, data) in entries {
            let mut header = [0u8; 512];
            header[..path.len()].copy_from_slice(path.as_bytes());
            let octal = |header: &mut [u8; 512], at: usize, width: usize, value: u64| {
                header[at..at + width - 1].copy_from_slice(format!("{value:0w$o}", w = width - 1).as_bytes());
            };
            octal(&mut header, 100, 8, if *kind == b'5' { 0o755 } else { 0o644 });
            octal(&mut header, 108, 8, 0);
            octal(&mut header, 116, 8, 0);
            octal(&mut header, 124, 12, data.len() as u64);
            octal(&mut header, 136, 12, 1_700_000_000);
            header[156] = *kind;
            header[257..263].copy_from_slice(b"ustar\0");
            header[263..265].copy_from_slice(b"00");
            header[148..156].fill(b' ');
            let sum: u64 = header.iter().map(|&b| u64::from(b)).sum();
            octal(&mut header, 148, 7, sum);
            out.extend_from_slice(&header);
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(512), 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn layers(whiteouts: Whiteouts, streams: Vec<Vec<u8>>) -> ImageFile {
        let store = MemoryStore::new();
        let layers = streams.into_iter().enumerate().map(|(i, bytes)| Ok(Layer { name: format!("layer {i}"), stream: Box::new(io::Cursor::new(bytes)) }));
        let built = build_from_layers(layers, whiteouts, &[], &store, &BuildOptions::default()).unwrap();
        ImageFile::decode(built.image_file).unwrap()
    }

    #[test]
    fn whiteouts_delete_from_the_layers_below_and_opaque_directories_hide_them() {
        let lower = ustar(&[
            ("a/", b'5', b""),
            ("a/x", b'0', b"x"),
            ("a/sub/y", b'0', b"y"),
            ("b/z", b'0', b"z"),
            ("b/keep", b'0', b"keep"),
            ("c", b'0', b"c"),
            ("d/", b'5', b""),
        ]);
        // The opaque marker after entries of its own layer, and below a directory listed again.
        let upper = ustar(&[
            ("a/sub/", b'5', b""),
            ("a/new", b'0', b"new"),
            ("a/.wh..wh..opq", b'0', b""),
            ("b/.wh.z", b'0', b""),
            (".wh.c", b'0', b""),
            ("d/.wh..wh..plnk", b'0', b""),
            ("e/.wh.nothing", b'0', b""),
        ]);
        let image = layers(Whiteouts::Applied, vec![lower.clone(), upper.clone()]);
        let present = |path: &str| image.bootstrap.resolve(path.as_bytes()).unwrap().is_some();
        for path in ["a", "a/new", "a/sub", "b", "b/keep", "d"] {
            assert!(present(path), "{path} is gone");
        }
        for path in ["a/x", "a/sub/y", "b/z", "c", "d/.wh..wh..plnk", "e", "b/.wh.z"] {
            assert!(!present(path), "{path} is there");
        }
        let kept = layers(Whiteouts::Kept, vec![lower, upper]);
        for path in ["a/x", "a/sub/y", "a/.wh..wh..opq", "b/z", "b/.wh.z", ".wh.c", "c"] {
            assert!(kept.bootstrap.resolve(path.as_bytes()).unwrap().is_some(), "a plain tar keeps {path}");
        }
    }

    #[test]
    fn paths_stay_inside_the_tree() {
        assert_eq!(components(b"./a/b/").unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(components(b"/etc/x").unwrap(), vec![b"etc".to_vec(), b"x".to_vec()]);
        assert!(components(b"./").unwrap().is_empty());
        assert!(components(b"a/../../x").is_err());
    }
}
