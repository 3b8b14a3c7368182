use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use phoenixfs_format::chunk::decode_chunk;
use phoenixfs_format::ChunkEntry;
use phoenixfs_store::StoreUrl;
use rayon::prelude::*;

use crate::args;

/// Copies an image and the chunks `to` lacks from `from`, `jobs` at a time; the image last, so
/// that a store never names an image whose chunks it lacks. Run again after a kill, it sends
/// only what is still missing.
pub fn run(image: &str, from: Option<&StoreUrl>, to: &StoreUrl, jobs: usize) -> Result<ExitCode> {
    let source = from.map(args::open_store).transpose()?;
    let file = args::load(image, source.as_deref())?;
    let source = source.with_context(|| format!("image {image} is a file: give --store, the store its chunks are in"))?;
    let destination = args::create_store(to)?;
    let mut entries: Vec<ChunkEntry> = file.table.entries().collect::<Result<_, _>>().with_context(|| format!("image {image} is corrupt"))?;
    entries.sort_by_key(|e| e.digest);
    entries.dedup_by_key(|e| e.digest);
    let total: u64 = entries.iter().map(|e| u64::from(e.stored_length)).sum();
    let progress = match std::io::stderr().is_terminal() {
        true => ProgressBar::new(total).with_style(
            ProgressStyle::with_template("{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}").expect("a valid template"),
        ),
        false => ProgressBar::hidden(),
    };
    let (sent_chunks, sent_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(jobs).thread_name(|i| format!("push-{i}")).build().context("starting upload threads")?;
    pool.install(|| {
        entries.par_iter().try_for_each(|entry| -> Result<()> {
            let there = destination.chunk_len(entry)?;
            if there != Some(u64::from(entry.stored_length)) {
                let stored = source.get_chunk(entry)?;
                decode_chunk(entry, &stored).with_context(|| format!("chunk {} in store {} is corrupt; not pushed", entry.digest, source.location()))?;
                destination.put_chunk(entry, &stored)?;
                sent_chunks.fetch_add(1, Ordering::Relaxed);
                sent_bytes.fetch_add(stored.len() as u64, Ordering::Relaxed);
            }
            progress.inc(u64::from(entry.stored_length));
            Ok(())
        })
    })?;
    destination.put_image(&file.id, file.bytes())?;
    progress.finish_and_clear();
    println!("{}", file.id);
    eprintln!(
        "pushed image {} to {}: {} of {} chunks sent ({} bytes), the rest were there",
        file.id,
        destination.location(),
        sent_chunks.load(Ordering::Relaxed),
        entries.len(),
        sent_bytes.load(Ordering::Relaxed)
    );
    Ok(ExitCode::SUCCESS)
}
