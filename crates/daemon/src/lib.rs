//! The mount daemon: an image served over FUSE, its chunks fetched lazily through the cache.
//!
//! Owns: [`ImageFs`], the read-only file system over one image (nodeids and attributes come
//! from the image alone: nodeid = EROFS nid + 2, root = 1); readahead and prefetch; the status
//! socket; and the mount lifecycle: checks, mount, backgrounding, the holder that keeps the
//! FUSE fd and session state and restarts the worker, the worker that takes over (with
//! FUSE_NOTIFY_RESEND) and serves, unmount. The binary must offer `worker` as a subcommand
//! that calls [`run_worker`].
//!
//! Must never: keep state a new process could not rebuild from the image (no inode table, no
//! file handles), serve a byte that was not verified, or panic on input from the kernel, the
//! image, the cache or the store.

mod control;
mod fs;
mod handover;
mod mount;
mod readahead;

pub use control::{query_status, socket_path, Status};
pub use fs::{FsStats, ImageFs};
pub use mount::{mount, phoenixfs_mountpoints, preflight, run_worker, unmount, MountConfig, MountError, MountSpec, Prefetch, Unmounted};
