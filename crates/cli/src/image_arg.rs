//! An `IMAGE` argument: a path to an image file, or an image id looked up in a store.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use phoenixfs_format::{ImageFile, ImageId};
use phoenixfs_store::{ChunkStore, LocalStore};

pub fn load(image: &str, store: Option<&LocalStore>) -> Result<ImageFile> {
    let path = Path::new(image);
    if path.exists() {
        let bytes = fs::read(path).with_context(|| format!("reading image {image}"))?;
        return ImageFile::decode(bytes).with_context(|| format!("image {image} is not a valid phoenixfs image"));
    }
    let Ok(id) = image.parse::<ImageId>() else {
        bail!("image {image}: no such file, and not an image id (64 hex digits)");
    };
    let Some(store) = store else {
        bail!("image {image}: no such file; give --store to look it up as an image id");
    };
    let bytes = store.get_image(&id)?;
    let decoded = ImageFile::decode(bytes).with_context(|| format!("image {id} in store {} is corrupt", store.location()))?;
    if decoded.id != id {
        bail!("image {id} in store {} is corrupt: its content hashes to {}", store.location(), decoded.id);
    }
    Ok(decoded)
}
