use std::process::ExitCode;

use anyhow::{Context, Result};
use phoenixfs_format::summary::summarize;
use phoenixfs_store::{verify_chunks, ChunkProblem, StoreUrl};

use crate::args;

pub fn run(image: &str, store: &StoreUrl) -> Result<ExitCode> {
    let store = args::open_store(store)?;
    let file = args::load(image, Some(store.as_ref()))?;
    summarize(&file).with_context(|| format!("image {image} is corrupt"))?;
    let problems = verify_chunks(store.as_ref(), &file.table, &|_| {}).with_context(|| format!("image {image} is corrupt"))?;
    for (index, entry, problem) in &problems {
        match problem {
            ChunkProblem::Missing => eprintln!("missing chunk {} (blob chunk {index})", entry.digest),
            ChunkProblem::Corrupt(why) => eprintln!("corrupt chunk {} (blob chunk {index}): {why}", entry.digest),
            ChunkProblem::Unreadable(why) => eprintln!("unreadable chunk {} (blob chunk {index}): {why}", entry.digest),
        }
    }
    let total = file.table.len();
    if problems.is_empty() {
        println!("ok: image {} and all {total} chunks verified", file.id);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAILED: {} of {total} chunks of image {} are missing or corrupt", problems.len(), file.id);
        Ok(ExitCode::FAILURE)
    }
}
