//! The mount daemon: an image served over FUSE, its chunks fetched lazily through the cache.
//!
//! Owns: [`ImageFs`], the read-only file system over one image (nodeids and attributes come
//! from the image alone: nodeid = EROFS nid + 2, root = 1); readahead and prefetch; the status
//! socket and its Prometheus exposition ([`metrics`]); and the mount lifecycle: checks, mount, backgrounding, the holder that keeps the
//! session (FUSE fd, verified image, shared chunk memory, negotiated parameters) and restarts
//! or upgrades the worker, the worker that takes over (with FUSE_NOTIFY_RESEND after a death)
//! and serves and replaces a dead holder, unmount. The binary must offer hidden `worker` and
//! `holder` subcommands calling [`run_worker`] and [`run_adopting_holder`].
//!
//! Must never: keep state a new process could not rebuild from the image (no inode table, no
//! file handles), serve a byte that was not verified, do work that grows with the image or
//! the cache before a new worker serves, or panic on input from the kernel, the image, the
//! cache or the store (and a panic anyway ends the worker, which is then replaced).
//!
//! Modules depend one way: `mount` → `holder` → `handover` → `spec`; `worker` → `holder`'s
//! launcher; `metrics` reads `status` and `mounttable`; `os`, `error`, `histogram`, `mounttable`, `work_queue` and `status`
//! are leaves.

mod error;
#[cfg(feature = "failpoints")]
mod failpoints;
mod fs;
pub mod fscache;
mod handover;
mod histogram;
mod holder;
mod image_memory;
pub mod metrics;
mod mount;
mod mounttable;
mod os;
mod passthrough;
mod readahead;
mod spec;
mod status;
mod work_queue;
mod worker;

pub use error::{MountError, StartError};
pub use fs::{FsStats, ImageFs};
pub use holder::{request_upgrade, run_adopting_holder};
pub use mount::{mount, preflight, unmount, MountConfig, Unmounted};
pub use mounttable::phoenixfs_mountpoints;
pub use os::process_alive;
pub use spec::{MountSpec, Prefetch};
pub use status::{query_status, socket_path, Status};
pub use worker::run_worker;
