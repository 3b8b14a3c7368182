//! The builder: packs a source directory, a tar stream or a container image into a phoenixfs
//! image.
//!
//! Owns: walking the source tree ([`source`]), reading tar streams ([`tarball`]) and the layers
//! of OCI images ([`oci`]), reading, hashing, compressing and storing file
//! data chunk by chunk in parallel ([`chunker`]), and putting bootstrap, chunk table and image
//! file together. The same input always gives byte-identical output.
//!
//! Must never: publish an image whose chunks are not all stored, publish an image of a tree
//! that changed while it was read, or know about mounts, FUSE or cachefiles.

pub mod chunker;
mod error;
pub mod oci;
pub mod source;
mod tar_reader;
pub mod tarball;

use std::path::Path;

use phoenixfs_format::chunk::DEFAULT_CHUNK_BITS;
use phoenixfs_format::tree::{FileData, NodeKind, Tree};
use phoenixfs_format::writer::{write_bootstrap, BlobDevice};
use phoenixfs_format::{ImageFile, ImageId};
use phoenixfs_store::ChunkStore;

use chunker::Processed;
pub use chunker::ChunkOutcome;
pub use error::BuildError;
pub use tarball::{build_from_layers, build_from_tar, Layer, Whiteouts};

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// log2 of the chunk size, 12 (4 KiB) to 26 (64 MiB).
    pub chunk_bits: u8,
    pub zstd_level: i32,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions { chunk_bits: DEFAULT_CHUNK_BITS, zstd_level: 1, progress: false }
    }
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct Built {
    pub id: ImageId,
    /// The image file's bytes, already stored in the store under `id`.
    pub image_file: Vec<u8>,
    pub stats: BuildStats,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildStats {
    pub inodes: u64,
    pub regular_files: u64,
    pub directories: u64,
    pub logical_bytes: u64,
    /// Distinct chunks in the image.
    pub chunks: u64,
    /// Chunks the store did not have before this build.
    pub new_chunks: u64,
    /// Bytes those new chunks take in the store.
    pub new_stored_bytes: u64,
}

/// Packs `src` into an image: chunks go to `store`, then the image file itself.
pub fn build(src: &Path, store: &dyn ChunkStore, options: &BuildOptions) -> Result<Built, BuildError> {
    check_chunk_bits(options)?;
    let scan = source::scan(src)?;
    let processed = chunker::process(&scan.files, store, options)?;
    let file_nodes: Vec<usize> = scan.files.iter().map(|f| f.node).collect();
    publish(scan.tree, &file_nodes, processed, &[], store, options)
}

fn check_chunk_bits(options: &BuildOptions) -> Result<(), BuildError> {
    let chunk_range = phoenixfs_format::chunk::MIN_CHUNK_BITS..=phoenixfs_format::chunk::MAX_CHUNK_BITS;
    match chunk_range.contains(&options.chunk_bits) {
        true => Ok(()),
        false => Err(BuildError::ChunkSize(options.chunk_bits)),
    }
}

/// Gives regular file `file_nodes[i]` of `tree` its data `processed.file_data[i]`, writes the
/// bootstrap and the image file (with `metadata`), and stores the image: the last step, once
/// every chunk is in.
fn publish(mut tree: Tree, file_nodes: &[usize], processed: Processed, metadata: &[u8], store: &dyn ChunkStore, options: &BuildOptions) -> Result<Built, BuildError> {
    let mut stats = BuildStats { inodes: tree.nodes.len() as u64, ..Default::default() };
    for node in &tree.nodes {
        match &node.kind {
            NodeKind::Dir(_) => stats.directories += 1,
            NodeKind::File(_) => stats.regular_files += 1,
            _ => {}
        }
    }
    for (&node, data) in file_nodes.iter().zip(processed.file_data) {
        stats.logical_bytes += match &data {
            FileData::Inline(bytes) => bytes.len() as u64,
            FileData::Chunked { size, .. } => *size,
        };
        tree.nodes[node].kind = NodeKind::File(data);
    }
    stats.chunks = processed.table.entries.len() as u64;
    stats.new_chunks = processed.new_chunks;
    stats.new_stored_bytes = processed.new_stored_bytes;

    let blob = BlobDevice {
        tag: processed.table.blob_tag(),
        chunk_bits: options.chunk_bits,
        chunks: u32::try_from(processed.table.entries.len()).map_err(|_| BuildError::TooManyChunks)?,
    };
    let bootstrap = write_bootstrap(&tree, &blob)?;
    let image_file = ImageFile::encode_with_metadata(&bootstrap, &processed.table, metadata).ok_or(BuildError::MetadataTooBig)?;
    let id = ImageId::of(&image_file);
    store.put_image(&id, &image_file)?;
    Ok(Built { id, image_file, stats })
}
