//! The daemon's one error type: every way mounting, holding or serving can fail, with its cause.

use std::io;
use std::path::PathBuf;

use phoenixfs_cache::CacheError;
use phoenixfs_cachefiles::DeviceError;
use phoenixfs_fuse::session::SessionError;
use phoenixfs_fuse::OpenTableError;
use phoenixfs_store::{ImageLoadError, StoreError};
use thiserror::Error;

use crate::handover::HandoverError;

#[derive(Debug, Error)]
pub enum MountError {
    #[error("mounting needs root (CAP_SYS_ADMIN)")]
    NotRoot,
    #[error("/dev/fuse is missing: load the fuse module (modprobe fuse)")]
    NoFuse,
    #[error("mountpoint {}: {detail}", path.display())]
    Mountpoint { path: PathBuf, detail: String },
    #[error("cache: {0}")]
    Cache(#[from] CacheError),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error(transparent)]
    OpenTable(#[from] OpenTableError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Image(#[from] ImageLoadError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store {store} does not have chunk {chunk} of image {image}: was the image pushed there?")]
    StoreLacks { store: String, image: String, chunk: String },
    #[error("store {store} does not answer: {source}")]
    StoreDown { store: String, source: StoreError },
    #[error("the mount's image in memory: {0}")]
    ImageMemory(String),
    #[error("the {what} did not start: {cause}")]
    NotStarted { what: &'static str, cause: StartError },
    /// The mount daemon's own words, from the process that reported its start-up.
    #[error("the mount daemon failed to start: {0}")]
    DaemonStart(String),
    /// The holder's answer to a request it refused.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Handover(#[from] HandoverError),
    #[error(transparent)]
    Cachefiles(#[from] DeviceError),
}

/// Why a started worker or holder did not take over.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("no answer within {0} s")]
    Timeout(u64),
    /// Its own explanation.
    #[error("{0}")]
    Said(String),
    #[error("it said {0} instead of starting")]
    Unexpected(String),
    #[error("it exited during start-up")]
    Exited,
    #[error("its socket failed: {0}")]
    Channel(HandoverError),
}
