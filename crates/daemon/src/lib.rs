//! The mount daemon: an image served over FUSE, its chunks fetched lazily through the cache.
//!
//! Owns: [`ImageFs`], the read-only file system over one image (nodeids and attributes come
//! from the image alone: nodeid = EROFS nid + 2, root = 1); readahead and prefetch; the status
//! socket; and the mount lifecycle: checks, mount, backgrounding, the holder that keeps the
//! FUSE fd and session state and restarts or upgrades the worker, the worker that takes over
//! (with FUSE_NOTIFY_RESEND after a death) and serves and replaces a dead holder, unmount.
//! The binary must offer hidden `worker` and `holder` subcommands calling [`run_worker`]
//! and [`run_adopting_holder`].
//!
//! Must never: keep state a new process could not rebuild from the image (no inode table, no
//! file handles), serve a byte that was not verified, or panic on input from the kernel, the
//! image, the cache or the store.

mod control;
mod fs;
mod handover;
mod holder;
mod mount;
mod readahead;
mod worker;

pub use control::{query_status, socket_path, Status};
pub use fs::{FsStats, ImageFs};
pub use holder::{request_upgrade, run_adopting_holder};
pub use mount::{mount, phoenixfs_mountpoints, preflight, process_alive, unmount, MountConfig, MountError, MountSpec, Prefetch, Unmounted};
pub use worker::run_worker;
