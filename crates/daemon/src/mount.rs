//! The mount lifecycle: checks, mount(2), INIT, backgrounding, serving, unmounting.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{umount2, MntFlags};
use nix::unistd::{fork, pipe2, setsid, ForkResult};
use phoenixfs_cache::SharedChunks;
use phoenixfs_fuse::MountOptions;
use tracing::warn;

use crate::error::MountError;
use crate::handover::SessionFds;
use crate::holder::hold;
use crate::image_memory;
use crate::mounttable::{is_mounted, is_phoenixfs_mount};
use crate::spec::MountSpec;
use crate::status;

pub struct MountConfig {
    pub spec: MountSpec,
    pub foreground: bool,
}

/// The canonical mountpoint, if it is an existing directory that nothing is mounted on.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    let bad = |detail: &str| MountError::Mountpoint { path: path.to_path_buf(), detail: detail.to_string() };
    let canonical = fs::canonicalize(path).map_err(|e| bad(&e.to_string()))?;
    if !canonical.is_dir() {
        return Err(bad("not a directory"));
    }
    if is_mounted(&canonical)? {
        return Err(bad("something is already mounted there"));
    }
    Ok(canonical)
}

/// Everything `mount` needs of the machine: root, /dev/fuse, a free directory to mount on.
/// Returns the canonical mountpoint.
pub fn preflight(mountpoint: &Path) -> Result<PathBuf, MountError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(MountError::NotRoot);
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoFuse);
    }
    check_mountpoint(mountpoint)
}

/// Mounts the image and serves it; in the background unless `foreground`. Returns once the
/// mount is ready (background) or unmounted (foreground).
pub fn mount(config: MountConfig) -> Result<(), MountError> {
    let mut spec = config.spec;
    let mountpoint = preflight(&spec.mountpoint)?;
    spec.mountpoint = mountpoint.clone();
    let (image, image_id, chunk_size) = image_memory::load_and_seal(&mut spec)?;
    // Chunk memory that outlives workers: a new one starts warm.
    let chunks = (spec.memory_limit > 0).then(|| SharedChunks::create(spec.memory_limit, chunk_size)).transpose()?;
    let fuse = phoenixfs_fuse::mount(&mountpoint, &MountOptions { source: spec.image.clone(), allow_other: spec.allow_other })?;
    let fds = SessionFds { fuse, image, chunks, opens: None };
    if config.foreground {
        return hold(spec, image_id.to_string(), fds, None);
    }
    let (ready_read, ready_write) = pipe2(OFlag::O_CLOEXEC).map_err(|e| MountError::Io { what: "creating a pipe".into(), source: e.into() })?;
    // SAFETY: no other thread exists yet in this process (nothing above spawns one), so the
    // child may do anything.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => {
            drop(ready_write);
            drop(fds);
            let mut message = String::new();
            let _ = fs::File::from(ready_read).read_to_string(&mut message);
            match message.strip_prefix("ok\n") {
                Some(warnings) => {
                    for warning in warnings.lines() {
                        eprintln!("phoenixfs: warning: {warning}");
                    }
                    Ok(())
                }
                None if message.is_empty() => Err(MountError::DaemonStart("it exited during start-up".into())),
                None => Err(MountError::DaemonStart(message.trim().to_string())),
            }
        }
        Ok(ForkResult::Child) => {
            drop(ready_read);
            let _ = setsid();
            let _ = std::env::set_current_dir("/");
            status::redirect_stdio(&mountpoint);
            let code = match hold(spec, image_id.to_string(), fds, Some(ready_write)) {
                Ok(()) => 0,
                Err(e) => {
                    warn!(error = %e, "mount daemon failed");
                    1
                }
            };
            std::process::exit(code);
        }
        Err(e) => {
            let _ = umount2(&mountpoint, MntFlags::MNT_DETACH);
            Err(MountError::Io { what: "forking the mount daemon".into(), source: e.into() })
        }
    }
}

/// What `unmount` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    Clean,
    /// Files were open: the mount is detached now, the daemon exits when the last closes.
    Detached,
}

pub fn unmount(mountpoint: &Path) -> Result<Unmounted, MountError> {
    let bad = |detail: &str| MountError::Mountpoint { path: mountpoint.to_path_buf(), detail: detail.to_string() };
    let canonical = fs::canonicalize(mountpoint).map_err(|e| bad(&e.to_string()))?;
    if !is_phoenixfs_mount(&canonical)? {
        return Err(bad("not a phoenixfs mount"));
    }
    match umount2(&canonical, MntFlags::empty()) {
        Ok(()) => Ok(Unmounted::Clean),
        Err(Errno::EBUSY) => {
            umount2(&canonical, MntFlags::MNT_DETACH).map_err(|e| bad(&e.to_string()))?;
            Ok(Unmounted::Detached)
        }
        Err(e) => Err(bad(&e.to_string())),
    }
}
