//! The fscache front-end's commands: `mount --fscache`, and `umount`, `status`, `upgrade`
//! of the mounts it made.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use phoenixfs_daemon::fscache::{self, DaemonStatus, FscacheMount};

pub fn mount(spec: FscacheMount) -> Result<ExitCode> {
    fscache::mount_fscache(spec)?;
    Ok(ExitCode::SUCCESS)
}

pub fn umount(mountpoint: &Path) -> Result<ExitCode> {
    fscache::unmount_fscache(mountpoint).with_context(|| format!("unmounting {}", mountpoint.display()))?;
    Ok(ExitCode::SUCCESS)
}

pub fn upgrade(binary: &Path) -> Result<ExitCode> {
    let pid = fscache::upgrade_fscache(binary).context("upgrading the fscache daemon")?;
    println!("fscache daemon: worker {pid} from {} serves now", binary.display());
    Ok(ExitCode::SUCCESS)
}

/// The daemon's status, as far as it concerns `mountpoint` (every image when none).
pub fn status(mountpoint: Option<&Path>, json: bool) -> Result<ExitCode> {
    let mut status = fscache::fscache_status()?;
    if let Some(mountpoint) = mountpoint {
        status.images.retain(|image| image.mountpoint == mountpoint);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print(&status);
    }
    Ok(ExitCode::SUCCESS)
}

fn print(status: &DaemonStatus) {
    for image in &status.images {
        println!("mountpoint   {} (EROFS over fscache, {})", image.mountpoint.display(), image.mount_options());
        println!("image        {} ({})", image.image, image.fsid);
        println!("store        {}", image.store);
        println!("chunk cache  {}", image.cache_dir.display());
    }
    println!("cache files  {}", status.cache_dir.display());
    let pid = |pid: Option<u32>, none: &str| pid.map_or(none.to_string(), |pid| pid.to_string());
    println!(
        "daemon       holder pid {}, worker pid {}, standby pid {} ({} restarts, {} upgrades)",
        status.holder_pid,
        pid(status.worker_pid, "none (starting)"),
        pid(status.standby_pid, "none"),
        status.restarts,
        status.upgrades
    );
    if let Some(w) = &status.worker {
        println!(
            "served       {} opens ({} refused), {} objects open, {} reads, {} bytes written, {} fetch retries, {} cache-full retries, {} errors",
            w.opens, w.opens_refused, w.objects_open, w.reads, w.bytes_written, w.fetch_retries, w.fill_retries, w.errors
        );
    }
}
