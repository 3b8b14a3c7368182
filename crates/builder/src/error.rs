use std::io;
use std::path::PathBuf;

use phoenixfs_format::WriteError;
use phoenixfs_store::StoreError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("{}: {source}", path.display())]
    Source { path: PathBuf, source: io::Error },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("OCI image {image}: {detail}; nothing was published")]
    Oci { image: String, detail: String },
    #[error("tar stream {name}: {detail}; nothing was published")]
    Tar { name: String, detail: String },
    #[error("{} changed during the build ({detail}); nothing was published", path.display())]
    Changed { path: PathBuf, detail: &'static str },
    #[error("{} vanished during the build; nothing was published", path.display())]
    Vanished { path: PathBuf },
    #[error("{}: xattr {name:?} is in a namespace EROFS cannot store", path.display())]
    XattrNamespace { path: PathBuf, name: String },
    #[error("{}: {error}", path.display())]
    Unrepresentable { path: PathBuf, error: WriteError },
    #[error("chunk size 2^{0} is outside 4 KiB..64 MiB")]
    ChunkSize(u8),
    #[error("the image needs more than 2^32 chunks")]
    TooManyChunks,
    #[error("the image's metadata is 4 GiB or more")]
    MetadataTooBig,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the image: {0}")]
    Write(#[from] WriteError),
}
