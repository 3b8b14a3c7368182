use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use phoenixfs_daemon::{query_status, Status};

fn print(status: &Status) {
    println!("mountpoint   {}", status.mountpoint);
    println!("image        {} ({})", status.image, status.image_id);
    println!("store        {}", status.store);
    println!("cache        {} ({} chunks, {} of {} bytes)", status.cache_dir, status.cache_chunks, status.cache_bytes, status.cache_limit);
    println!("fetched      {} chunks, {} bytes", status.chunks_fetched, status.fetched_bytes);
    println!(
        "fetching     {} in flight, {} retrying, oldest {:.0} ms; {} retries",
        status.fetches_in_flight, status.fetches_retrying, status.oldest_fetch_ms, status.fetch_retries
    );
    if !status.store_errors.is_empty() {
        let kinds: Vec<String> = status.store_errors.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
        println!("store errors {}", kinds.join(", "));
    }
    println!(
        "cache        {} hits ({} memory, {} disk), {} misses, {} evictions, {} corrupt entries discarded",
        status.cache_hits, status.memory_hits, status.disk_hits, status.cache_misses, status.evictions, status.corrupt_cache_entries_discarded
    );
    println!("served       {} requests, {} bytes, {} errors", status.requests, status.bytes_served, status.errors);
    println!("log          {}", status.log);
    println!("daemon       holder pid {}, worker pid {} ({} restarts, {} upgrades)", status.holder_pid, status.pid, status.worker_restarts, status.upgrades);
    println!("worker       started in {:.1} ms (launch to serving)", status.worker_start_ms);
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "memory       worker {:.1} MiB, holder {:.1} MiB resident; image {:.1} MiB shared by all workers",
        mib(status.worker_rss_bytes),
        mib(status.holder_rss_bytes),
        mib(status.image_memory_bytes)
    );
    if status.shared_memory_bytes > 0 {
        println!(
            "chunk memory {:.0} MiB shared by worker generations: {} hits, {} torn or corrupt slots discarded",
            mib(status.shared_memory_bytes),
            status.shared_memory_hits,
            status.shared_memory_discarded
        );
    }
    if !status.takeover_stalls_ms.is_empty() {
        let stalls: Vec<String> = status.takeover_stalls_ms.iter().map(|ms| format!("{ms:.1}")).collect();
        println!("takeovers    last stalls (ms, oldest first): {}", stalls.join(" "));
    }
    println!("resent       {} requests resent by the kernel to this worker", status.resent_requests);
    println!("passthrough  {} opens answered in passthrough mode by this worker", status.passthrough_opens);
    println!("fuse         7.{}{}", status.fuse_kernel_minor, if status.fuse_resend_supported { ", resend supported" } else { "" });
}

pub fn run(mountpoint: Option<&Path>, json: bool) -> Result<ExitCode> {
    let mountpoints = match mountpoint {
        Some(path) => vec![std::fs::canonicalize(path).with_context(|| format!("mountpoint {}", path.display()))?],
        None => phoenixfs_daemon::phoenixfs_mountpoints()?,
    };
    if let [only] = mountpoints.as_slice() {
        if phoenixfs_daemon::fscache::is_fscache_mount(only) {
            return super::fscache::status(Some(only), json);
        }
    }
    let fscache_mounts = mountpoint.is_none() && !phoenixfs_daemon::fscache::registry::all().is_empty();
    if fscache_mounts {
        super::fscache::status(None, json)?;
    }
    if mountpoints.is_empty() && fscache_mounts {
        return Ok(ExitCode::SUCCESS);
    }
    if mountpoints.is_empty() {
        println!("no phoenixfs mounts");
        return Ok(ExitCode::SUCCESS);
    }
    let mut statuses = Vec::new();
    for mp in &mountpoints {
        match query_status(mp) {
            Ok(status) => statuses.push(status),
            Err(e) if mountpoint.is_some() => bail!("{}: no phoenixfs daemon answers ({e})", mp.display()),
            Err(e) => eprintln!("{}: no phoenixfs daemon answers ({e})", mp.display()),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
    } else {
        for (i, status) in statuses.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print(status);
        }
    }
    Ok(ExitCode::SUCCESS)
}
