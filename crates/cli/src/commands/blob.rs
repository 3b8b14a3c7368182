use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use phoenixfs_format::chunk::decode_chunk;
use phoenixfs_store::StoreUrl;

use crate::args;

/// Materialises the blob: chunk i, verified, at offset i << chunk_bits; holes stay sparse.
pub fn run(image: &str, store: &StoreUrl, output: &Path) -> Result<ExitCode> {
    let store = args::open_store(store)?;
    let file = args::load(image, Some(store.as_ref()))?;
    let out = File::create(output).with_context(|| format!("creating {}", output.display()))?;
    out.set_len(file.table.blob_len()).with_context(|| format!("sizing {}", output.display()))?;
    for (index, entry) in file.table.entries().enumerate() {
        let entry = entry.with_context(|| format!("image {image} is corrupt"))?;
        let stored = store.get_chunk(&entry)?;
        let data = decode_chunk(&entry, &stored).with_context(|| format!("in store {}", store.location()))?;
        out.write_all_at(&data, index as u64 * file.table.chunk_size())
            .with_context(|| format!("writing {}", output.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
