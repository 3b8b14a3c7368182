//! The host's fscache daemon: serves phoenixfs images to the kernel's own EROFS through
//! cachefiles on-demand mode. After the first fetch the kernel reads from its cache files and
//! page cache at its own speed; the daemon only fills what was never fetched.
//!
//! One per host (`/dev/cachefiles` admits one open), built like a FUSE mount's daemon: a
//! holder ([`holder`]) opens and binds the device, keeps its fd and the control socket
//! ([`control`], through which `mount --fscache` registers images), and restarts the worker
//! ([`worker`]) when it dies; a new worker writes `restore`, so the kernel delivers again what
//! the dead one had read, and re-opens the objects whose anonymous fds died with it. A worker
//! whose holder died starts a new holder. Each registered image is verified once, by the
//! `mount` that registers it, and handed to the holder as a sealed memfd; every process
//! passes the memfds on, and a worker maps them in constant time. What the images are is
//! also recorded in [`REGISTRY_DIR`] ([`registry`]) for the commands; [`serve`] answers
//! OPEN, READ and CLOSE.

pub mod control;
mod holder;
mod mount;
pub mod registry;
mod serve;
mod worker;

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::handover::{self, HandoverError};

pub use control::{request, ControlReply, ControlRequest, DaemonStatus, WorkerStats};
pub use holder::{run_adopting_fscache_holder, run_fscache_daemon};
pub use mount::{fscache_status, is_fscache_mount, mount_fscache, unmount_fscache, upgrade_fscache, FscacheMount};
pub use registry::Registration;
pub use worker::run_fscache_worker;

/// The daemon's files: control socket, log, registry, the worker's figures.
pub const FSCACHE_DIR: &str = "/run/phoenixfs/fscache";
/// One file per registered image (per mountpoint).
pub const REGISTRY_DIR: &str = "/run/phoenixfs/fscache/images";
/// The tag cachefiles gives this daemon's cache (culling is per tag).
pub const CACHE_TAG: &str = "phoenixfs";

pub fn control_socket_path() -> PathBuf {
    Path::new(FSCACHE_DIR).join("control.sock")
}

pub fn log_path() -> PathBuf {
    Path::new(FSCACHE_DIR).join("daemon.log")
}

fn worker_stats_path() -> PathBuf {
    Path::new(FSCACHE_DIR).join("worker.json")
}

/// The registered images' sealed memfds, by mountpoint.
type ImageMemfds = Vec<(PathBuf, OwnedFd)>;

/// Hands a process the state, the device fd and the images' memfds (whose mountpoints go into
/// the state, in the memfds' order).
fn hand_over(channel: BorrowedFd<'_>, state: &DaemonState, device: BorrowedFd<'_>, images: &[(PathBuf, RawFd)]) -> Result<(), HandoverError> {
    let state = DaemonState { images: images.iter().map(|(mountpoint, _)| mountpoint.clone()).collect(), ..state.clone() };
    let fds: Vec<RawFd> = std::iter::once(device.as_raw_fd()).chain(images.iter().map(|(_, fd)| *fd)).collect();
    handover::send_with_fds(channel, &state, &fds)
}

/// Receives what [`hand_over`] sent: the state, the device fd and the images' memfds.
fn take_over(channel: BorrowedFd<'_>) -> Result<(DaemonState, OwnedFd, ImageMemfds), HandoverError> {
    let (state, fds) = handover::receive_with_fds::<DaemonState>(channel)?;
    let state = state?;
    if fds.len() != 1 + state.images.len() {
        return Err(HandoverError::Fds(fds.len()));
    }
    let mut fds = fds.into_iter();
    let device = fds.next().expect("counted");
    let images = state.images.iter().cloned().zip(fds).collect();
    Ok((state, device, images))
}

/// What the daemon's holder hands each worker (and a worker a new holder), besides the
/// `/dev/cachefiles` fd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DaemonState {
    /// The cachefiles cache directory the device is bound to.
    pub cache_dir: PathBuf,
    pub holder_pid: u32,
    pub takeover: Takeover,
    /// Workers started after a predecessor died.
    pub restarts: u64,
    pub upgrades: u64,
    pub log_level: u8,
    /// The mountpoints of the registered images whose sealed memfds follow the device fd,
    /// in order.
    pub images: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Takeover {
    /// The daemon's first worker, or one replacing a dead one: `restore`, then serve.
    AfterStart,
    /// Prepare, say so, and wait for `Go` before `restore` and serving: an upgrade's new
    /// worker (`Go` once the old one has finished and exited) or a standby (`Go` when the
    /// serving worker dies, so that a takeover costs a message, not a process start).
    OnGo,
}
