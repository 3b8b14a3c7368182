//! Finding an image: a path to an image file, or an image id in a store.

use std::path::Path;

use phoenixfs_format::{FormatError, ImageFile, ImageId};
use thiserror::Error;

use crate::{ChunkStore, StoreError};

#[derive(Debug, Error)]
pub enum ImageLoadError {
    #[error("reading image {name}: {source}")]
    Read { name: String, source: std::io::Error },
    #[error("image {name} is not a valid phoenixfs image: {source}")]
    Invalid { name: String, source: FormatError },
    #[error("image {name}: no such file, and not an image id (64 hex digits)")]
    NoSuchImage { name: String },
    #[error("image {name}: no such file; give --store to look it up as an image id")]
    NoStore { name: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("image {id} in store {store} is corrupt: its content hashes to {actual}")]
    WrongId { id: ImageId, store: String, actual: ImageId },
}

/// Fetches of an image from a store before its bytes are taken as corrupt.
const IMAGE_ATTEMPTS: u32 = 5;

/// Loads the image `name` (a file if one exists at that path, else an id in `store`) and proves
/// it with [`ImageFile::decode`]: every byte hashed, every chunk table entry checked. The
/// result's bytes ([`ImageFile::bytes`]) can then be opened again, without that cost, by
/// [`ImageFile::from_verified`].
pub fn load_image(name: &str, store: Option<&dyn ChunkStore>) -> Result<ImageFile, ImageLoadError> {
    let path = Path::new(name);
    if path.exists() {
        let bytes = std::fs::read(path).map_err(|source| ImageLoadError::Read { name: name.to_string(), source })?;
        return ImageFile::decode(bytes).map_err(|source| ImageLoadError::Invalid { name: name.to_string(), source });
    }
    let Ok(id) = name.parse::<ImageId>() else { return Err(ImageLoadError::NoSuchImage { name: name.to_string() }) };
    let store = store.ok_or_else(|| ImageLoadError::NoStore { name: name.to_string() })?;
    // Bytes that do not hash to the id may have been damaged on the way: ask again, a few times.
    let mut attempt = 1;
    loop {
        let result = ImageFile::decode(store.get_image(&id)?)
            .map_err(|source| ImageLoadError::Invalid { name: format!("{id} in store {}", store.location()), source })
            .and_then(|decoded| match decoded.id == id {
                true => Ok(decoded),
                false => Err(ImageLoadError::WrongId { id, store: store.location(), actual: decoded.id }),
            });
        match result {
            Err(e) if attempt < IMAGE_ATTEMPTS => {
                tracing::debug!(image = %id, store = store.location(), attempt, error = %e, "image fetched damaged; fetching it again");
                attempt += 1;
            }
            result => return result,
        }
    }
}
