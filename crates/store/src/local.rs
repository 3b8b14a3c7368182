//! The local directory store, the embedded default.
//!
//! ```text
//! STORE/chunks/ab/abcdef…   one file per chunk, named by the hex sha256 of its content
//! STORE/images/<id>         image files, named by their id
//! STORE/tmp/                objects being written; renamed into place when complete
//! ```
//!
//! Chunks are renamed into place without an fsync each (that would halve build speed); before
//! an image that needs them is published, the whole file system is synced once, so a
//! published image never points at chunks that a crash could lose.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use phoenixfs_format::{ChunkEntry, Digest, ImageId};
use tempfile::NamedTempFile;

use crate::{ChunkStore, Outage, StoreError};

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { action, path: path.to_path_buf(), source }
}

impl LocalStore {
    /// Opens the store at `root`, creating it (and its parents) when missing.
    pub fn create(root: &Path) -> Result<Self, StoreError> {
        for sub in ["chunks", "images", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("creating store directory", &dir))?;
        }
        let probe = root.join("tmp");
        NamedTempFile::new_in(&probe).map_err(io_err("writing to store directory", &probe))?;
        Ok(LocalStore { root: root.to_path_buf() })
    }

    /// The store at `root` (an absolute path), not touched until used: a directory that is
    /// missing then is an outage, like a server that is down.
    pub fn at(root: &Path) -> Self {
        LocalStore { root: root.to_path_buf() }
    }

    /// Opens an existing store for reading.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let meta = fs::metadata(root).map_err(io_err("opening store", root))?;
        if !meta.is_dir() {
            let source = io::Error::new(io::ErrorKind::NotADirectory, "not a directory");
            return Err(StoreError::Io { action: "opening store", path: root.to_path_buf(), source });
        }
        let root = fs::canonicalize(root).map_err(io_err("opening store", root))?;
        Ok(LocalStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn chunk_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    pub fn image_path(&self, id: &ImageId) -> PathBuf {
        self.root.join("images").join(id.to_string())
    }

    fn read_object(&self, path: &Path, what: &'static str, key: String) -> Result<Vec<u8>, StoreError> {
        fs::read(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => self.not_found(what, key),
            _ => StoreError::Io { action: "reading", path: path.to_path_buf(), source },
        })
    }

    /// "Not there" is an answer only from a store that is there: when the store's own
    /// directory is gone (unmounted, moved away), the store is down.
    fn not_found(&self, what: &'static str, key: String) -> StoreError {
        if self.root.join("chunks").is_dir() {
            StoreError::NotFound { store: self.location(), what, key }
        } else {
            let detail = format!("its directory is gone (looking for {what} {key})");
            StoreError::Unavailable { store: self.location(), outage: Outage::Unreachable, detail }
        }
    }

    /// Writes `bytes` to a temporary file and renames it to `path`.
    fn write_object(&self, path: &Path, bytes: &[u8], durable: bool) -> Result<(), StoreError> {
        let tmp_dir = self.root.join("tmp");
        let mut tmp = NamedTempFile::new_in(&tmp_dir).map_err(io_err("creating a file in", &tmp_dir))?;
        tmp.write_all(bytes).map_err(io_err("writing", path))?;
        if durable {
            tmp.as_file().sync_all().map_err(io_err("syncing", path))?;
        }
        let parent = path.parent().expect("objects live in a subdirectory");
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        tmp.persist(path).map_err(|e| StoreError::Io { action: "renaming into", path: path.to_path_buf(), source: e.error })?;
        Ok(())
    }

    /// Makes everything written so far durable (one `syncfs` of the store's file system).
    fn sync(&self) -> Result<(), StoreError> {
        let dir = fs::File::open(&self.root).map_err(io_err("opening", &self.root))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)).map_err(|e| StoreError::Io { action: "syncing", path: self.root.clone(), source: e.into() })
    }
}

impl ChunkStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn get_chunk(&self, chunk: &ChunkEntry) -> Result<Vec<u8>, StoreError> {
        self.read_object(&self.chunk_path(&chunk.digest), "chunk", chunk.digest.to_hex())
    }

    fn chunk_len(&self, chunk: &ChunkEntry) -> Result<Option<u64>, StoreError> {
        let path = self.chunk_path(&chunk.digest);
        match fs::metadata(&path) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.not_found("chunk", chunk.digest.to_hex()) {
                StoreError::NotFound { .. } => Ok(None),
                outage => Err(outage),
            },
            Err(e) => Err(StoreError::Io { action: "checking", path, source: e }),
        }
    }

    fn put_chunk(&self, chunk: &ChunkEntry, stored: &[u8]) -> Result<(), StoreError> {
        self.write_object(&self.chunk_path(&chunk.digest), stored, false)
    }

    fn get_image(&self, id: &ImageId) -> Result<Vec<u8>, StoreError> {
        self.read_object(&self.image_path(id), "image", id.to_string())
    }

    fn put_image(&self, id: &ImageId, image_file: &[u8]) -> Result<(), StoreError> {
        self.sync()?;
        self.write_object(&self.image_path(id), image_file, true)?;
        self.sync()
    }
}

/// The entry of `data` kept raw, for tests.
#[cfg(test)]
pub(crate) fn raw_chunk(data: &[u8]) -> ChunkEntry {
    ChunkEntry::new(Digest::of(data), data.len() as u32, phoenixfs_format::Compression::None, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_missing_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(&dir.path().join("s")).unwrap();
        let digest = &raw_chunk(b"abc");
        assert_eq!(store.chunk_len(digest).unwrap(), None);
        let err = store.get_chunk(digest).unwrap_err().to_string();
        assert!(err.contains(&digest.digest.to_hex()), "{err}");
        store.put_chunk(digest, b"abc").unwrap();
        store.put_chunk(digest, b"abc").unwrap();
        assert_eq!(store.get_chunk(digest).unwrap(), b"abc");
        assert_eq!(store.chunk_len(digest).unwrap(), Some(3));
        assert_eq!(fs::read_dir(dir.path().join("s/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_store_directory_that_is_gone_is_an_outage_not_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(&dir.path().join("s")).unwrap();
        let digest = &raw_chunk(b"abc");
        assert!(store.get_chunk(digest).unwrap_err().is_definite());
        fs::rename(dir.path().join("s"), dir.path().join("away")).unwrap();
        let err = store.get_chunk(digest).unwrap_err();
        assert!(!err.is_definite() && err.kind() == "unreachable", "{err}");
        assert!(store.chunk_len(digest).is_err());
    }
}
