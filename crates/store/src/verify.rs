//! Proving that a store holds every chunk of a chunk table, intact.

use phoenixfs_format::chunk::decode_chunk;
use phoenixfs_format::{ChunkEntry, ChunkTableView, FormatError};
use rayon::prelude::*;

use crate::{ChunkStore, StoreError};

/// What is wrong with one chunk.
#[derive(Debug)]
pub enum ChunkProblem {
    Missing,
    Corrupt(String),
    Unreadable(StoreError),
}

/// Fetches and verifies every chunk of `table` (in parallel); returns the bad ones by table
/// index, in order. `on_chunk` is called once per chunk checked, for progress. A malformed
/// table entry is an error of the table, before any chunk is fetched.
pub fn verify_chunks(
    store: &dyn ChunkStore,
    table: &ChunkTableView,
    on_chunk: &(dyn Fn(&ChunkEntry) + Sync),
) -> Result<Vec<(usize, ChunkEntry, ChunkProblem)>, FormatError> {
    let entries = table.entries().collect::<Result<Vec<_>, _>>()?;
    let mut problems: Vec<_> = entries
        .into_par_iter()
        .enumerate()
        .filter_map(|(index, entry)| {
            let problem = match store.get_chunk(&entry) {
                Ok(stored) => decode_chunk(&entry, &stored).err().map(|e| ChunkProblem::Corrupt(e.to_string())),
                Err(StoreError::NotFound { .. }) => Some(ChunkProblem::Missing),
                Err(e) => Some(ChunkProblem::Unreadable(e)),
            };
            on_chunk(&entry);
            problem.map(|p| (index, entry, p))
        })
        .collect();
    problems.sort_by_key(|(index, _, _)| *index);
    Ok(problems)
}
