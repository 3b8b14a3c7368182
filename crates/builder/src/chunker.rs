//! Reading, hashing, compressing and storing file data, chunk by chunk, on all cores.
//!
//! Each chunk is one independent job (a file's chunk i, or a small file's whole content for
//! inline storage), so one large file keeps every core busy. Results come back in job order;
//! blob chunk numbers are handed out afterwards in that order, which keeps images
//! deterministic. Holes (found with SEEK_DATA, so a sparse file of many GiB is not read) and
//! all-zero chunks are stored as nothing at all.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use phoenixfs_format::chunk::encode_chunk;
use phoenixfs_format::tree::FileData;
use phoenixfs_format::{ChunkEntry, ChunkTable, Digest};
use phoenixfs_store::ChunkStore;
use rayon::prelude::*;

use crate::source::{source_error, Identity, SourceFile};
use crate::{BuildError, BuildOptions};

/// The data of every source file, ready for the tree, and the chunk table they share.
pub struct Processed {
    pub table: ChunkTable,
    /// One per source file, in the same order.
    pub file_data: Vec<FileData>,
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
enum Job {
    Inline { file: usize },
    Chunk { file: usize, index: u64 },
}

/// What one job found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkOutcome {
    Hole,
    Chunk(ChunkEntry),
    Inline(Vec<u8>),
}

/// Where chunks of data go: hashed, compressed and stored once each per build, from any
/// number of threads.
pub(crate) struct ChunkSink<'a> {
    store: &'a dyn ChunkStore,
    zstd_level: i32,
    /// Chunks already encoded in this build, so duplicates are neither compressed nor
    /// stored twice.
    known: Mutex<HashMap<Digest, ChunkEntry>>,
    new_chunks: AtomicU64,
    new_stored_bytes: AtomicU64,
}

impl<'a> ChunkSink<'a> {
    pub(crate) fn new(store: &'a dyn ChunkStore, options: &BuildOptions) -> Self {
        ChunkSink { store, zstd_level: options.zstd_level, known: Mutex::new(HashMap::new()), new_chunks: AtomicU64::new(0), new_stored_bytes: AtomicU64::new(0) }
    }

    /// A hole if `data` is all zeros, else its chunk, stored unless the store has it.
    pub(crate) fn put(&self, data: &[u8]) -> Result<ChunkOutcome, BuildError> {
        if is_zero(data) {
            return Ok(ChunkOutcome::Hole);
        }
        let digest = Digest::of(data);
        if let Some(entry) = self.known.lock().expect("not poisoned").get(&digest) {
            return Ok(ChunkOutcome::Chunk(*entry));
        }
        let (compression, stored) = encode_chunk(data, self.zstd_level);
        let entry = ChunkEntry::new(digest, data.len() as u32, compression, &stored);
        let present = self.store.chunk_len(&entry)? == Some(stored.len() as u64);
        if !present {
            self.store.put_chunk(&entry, &stored)?;
        }
        let first = self.known.lock().expect("not poisoned").insert(digest, entry).is_none();
        if first && !present {
            self.new_chunks.fetch_add(1, Ordering::Relaxed);
            self.new_stored_bytes.fetch_add(stored.len() as u64, Ordering::Relaxed);
        }
        Ok(ChunkOutcome::Chunk(entry))
    }
}

struct Shared<'a> {
    files: &'a [SourceFile],
    options: &'a BuildOptions,
    sink: ChunkSink<'a>,
    progress: ProgressBar,
}

pub fn process(files: &[SourceFile], store: &dyn ChunkStore, options: &BuildOptions) -> Result<Processed, BuildError> {
    let chunk_size = 1u64 << options.chunk_bits;
    let jobs: Vec<Job> = files
        .iter()
        .enumerate()
        .flat_map(|(file, f)| {
            let chunks = if f.inline { 0 } else { f.size.div_ceil(chunk_size) };
            let inline = f.inline.then_some(Job::Inline { file });
            inline.into_iter().chain((0..chunks).map(move |index| Job::Chunk { file, index }))
        })
        .collect();
    let shared = Shared {
        files,
        options,
        sink: ChunkSink::new(store, options),
        progress: progress_bar(options.progress, Some(files.iter().map(|f| f.size).sum())),
    };
    let outcomes: Vec<ChunkOutcome> = jobs.par_iter().map(|job| shared.run(*job)).collect::<Result<_, _>>()?;
    shared.progress.finish_and_clear();
    let sizes: Vec<u64> = files.iter().map(|f| f.size).collect();
    let owners = jobs.iter().map(|job| match *job {
        Job::Inline { file } | Job::Chunk { file, .. } => file,
    });
    Ok(assemble(options.chunk_bits, &sizes, owners.zip(outcomes), shared.sink))
}

/// The chunk table and the data of each file (`sizes[i]` bytes) from the outcomes of their
/// chunks, each paired with its file and given in order: files in tree order, each file's
/// chunks in file order. Blob chunks are numbered in that order, once per distinct chunk.
pub(crate) fn assemble(chunk_bits: u8, sizes: &[u64], outcomes: impl Iterator<Item = (usize, ChunkOutcome)>, sink: ChunkSink) -> Processed {
    let mut table = ChunkTable { chunk_bits, entries: Vec::new() };
    let mut blob_index: HashMap<Digest, u32> = HashMap::new();
    let mut file_data: Vec<FileData> = sizes.iter().map(|&size| FileData::Chunked { size, chunks: Vec::new() }).collect();
    for (file, outcome) in outcomes {
        match (outcome, &mut file_data[file]) {
            (ChunkOutcome::Inline(data), slot) => *slot = FileData::Inline(data),
            (ChunkOutcome::Hole, FileData::Chunked { chunks, .. }) => chunks.push(None),
            (ChunkOutcome::Chunk(entry), FileData::Chunked { chunks, .. }) => {
                let next = table.entries.len() as u32;
                let index = *blob_index.entry(entry.digest).or_insert_with(|| {
                    table.entries.push(entry);
                    next
                });
                chunks.push(Some(index));
            }
            (_, FileData::Inline(_)) => unreachable!("inline files have one outcome"),
        }
    }
    Processed { table, file_data, new_chunks: sink.new_chunks.into_inner(), new_stored_bytes: sink.new_stored_bytes.into_inner() }
}

/// A progress bar on stderr, or a hidden one; without a total, a count of bytes.
pub(crate) fn progress_bar(visible: bool, total: Option<u64>) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(total) => (ProgressBar::new(total), "{spinner} {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}"),
        None => (ProgressBar::no_length(), "{spinner} {binary_bytes} {binary_bytes_per_sec}"),
    };
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    bar
}

impl Shared<'_> {
    fn run(&self, job: Job) -> Result<ChunkOutcome, BuildError> {
        match job {
            Job::Inline { file } => {
                let source = &self.files[file];
                let handle = open_unchanged(source)?;
                let mut data = vec![0u8; source.size as usize];
                read_exact(&handle, source, &mut data, 0)?;
                check_unchanged(source, &handle)?;
                self.progress.inc(source.size);
                Ok(ChunkOutcome::Inline(data))
            }
            Job::Chunk { file, index } => self.chunk(&self.files[file], index),
        }
    }

    fn chunk(&self, source: &SourceFile, index: u64) -> Result<ChunkOutcome, BuildError> {
        let chunk_size = 1u64 << self.options.chunk_bits;
        let start = index * chunk_size;
        let len = chunk_size.min(source.size - start);
        self.progress.inc(len);
        let handle = open_unchanged(source)?;
        if is_hole(&handle, start, len) {
            check_unchanged(source, &handle)?;
            return Ok(ChunkOutcome::Hole);
        }
        let mut data = vec![0u8; len as usize];
        read_exact(&handle, source, &mut data, start)?;
        check_unchanged(source, &handle)?;
        self.sink.put(&data)
    }
}

fn open_unchanged(source: &SourceFile) -> Result<File, BuildError> {
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&source.path)
        .map_err(source_error(&source.path))?;
    check_unchanged(source, &handle)?;
    Ok(handle)
}

fn check_unchanged(source: &SourceFile, handle: &File) -> Result<(), BuildError> {
    let meta = handle.metadata().map_err(source_error(&source.path))?;
    if Identity::of(&meta) != source.identity {
        return Err(BuildError::Changed { path: source.path.clone(), detail: "size, times or inode differ from when it was listed" });
    }
    Ok(())
}

fn read_exact(handle: &File, source: &SourceFile, buf: &mut [u8], offset: u64) -> Result<(), BuildError> {
    handle.read_exact_at(buf, offset).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => BuildError::Changed { path: source.path.clone(), detail: "shorter than when it was listed" },
        _ => BuildError::Source { path: source.path.clone(), source: e },
    })
}

/// Whether `start..start+len` holds no data at all, by SEEK_DATA (file systems without it
/// answer as if everything were data, and the chunk is read).
fn is_hole(handle: &File, start: u64, len: u64) -> bool {
    match lseek(handle.as_raw_fd(), start as i64, Whence::SeekData) {
        Ok(next_data) => next_data as u64 >= start + len,
        Err(Errno::ENXIO) => true,
        Err(_) => false,
    }
}

fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096).all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
