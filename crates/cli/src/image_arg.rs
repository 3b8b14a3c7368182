//! An `IMAGE` argument: a path to an image file, or an image id looked up in a store.

use anyhow::Result;
use phoenixfs_format::ImageFile;
use phoenixfs_store::{load_image, ChunkStore, LocalStore};

pub fn load(image: &str, store: Option<&LocalStore>) -> Result<ImageFile> {
    Ok(load_image(image, store.map(|s| s as &dyn ChunkStore))?)
}
