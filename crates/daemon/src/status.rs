//! A mount's files in `/run/phoenixfs/`, named by a `key` derived from the mountpoint's path
//! so that commands find them without a registry: the worker's status socket `<key>.sock`,
//! the holder's control socket `<key>.holder`, the daemon's log `<key>.log`. Reachable by
//! root only (the directory is 0700).

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::histogram::DurationHistogram;

pub const RUN_DIR: &str = "/run/phoenixfs";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// The worker serving requests.
    pub pid: u32,
    /// The holder keeping the FUSE connection and restarting workers.
    pub holder_pid: u32,
    /// Workers started after a predecessor died (crashes, kills).
    pub worker_restarts: u64,
    /// Workers started by `phoenixfs upgrade`.
    pub upgrades: u64,
    /// The latest takeovers after a worker died: from its death to the first answered
    /// request, oldest first.
    pub takeover_stalls_ms: Vec<f64>,
    /// Takeovers whose stall was measured, in all (the list above keeps the latest).
    pub takeovers_measured: u64,
    /// Requests this worker read that the kernel had resent (a dead worker's).
    pub resent_requests: u64,
    /// Opens this worker answered in passthrough mode (the kernel then reads a copy itself).
    #[serde(default)]
    pub passthrough_opens: u64,
    pub mountpoint: String,
    pub image: String,
    pub image_id: String,
    pub store: String,
    pub cache_dir: String,
    pub cache_chunks: u64,
    pub cache_bytes: u64,
    pub cache_limit: u64,
    pub chunks_fetched: u64,
    pub fetched_bytes: u64,
    /// Fetches from the store under way, those of them being retried after a failure, and
    /// how long the oldest has been waiting (a stall readers feel when the store is down).
    #[serde(default)]
    pub fetches_in_flight: u64,
    #[serde(default)]
    pub fetches_retrying: u64,
    #[serde(default)]
    pub oldest_fetch_ms: f64,
    /// Failed fetches (each was tried again unless it was a "not there"), by kind.
    #[serde(default)]
    pub fetch_retries: u64,
    #[serde(default)]
    pub store_errors: std::collections::BTreeMap<String, u64>,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub corrupt_cache_entries_discarded: u64,
    pub bytes_served: u64,
    pub requests: u64,
    pub errors: u64,
    /// Where the daemon logs: a file, or "stderr" in the foreground.
    pub log: String,
    pub fuse_kernel_minor: u32,
    pub fuse_resend_supported: bool,
    /// This worker's start-up: from its launch by the holder to serving.
    pub worker_start_ms: f64,
    /// Resident memory of the worker and the holder (pages of the shared image and chunk
    /// memory count in each process that touched them).
    pub worker_rss_bytes: u64,
    pub holder_rss_bytes: u64,
    /// The verified image all processes of the mount share (one copy, a sealed memfd).
    pub image_memory_bytes: u64,
    /// The chunk memory all worker generations share (0: none), its hits, and the slots
    /// found torn or corrupt and discarded.
    pub shared_memory_bytes: u64,
    pub shared_memory_hits: u64,
    pub shared_memory_discarded: u64,
    /// Requests this worker read, and those it answered with an errno (ENOENT, ENOSYS included), by
    /// FUSE opcode ("read", "lookup", ...).
    #[serde(default)]
    pub requests_by_opcode: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub errors_by_opcode: std::collections::BTreeMap<String, u64>,
    /// Bytes of the answers' bodies, by opcode.
    #[serde(default)]
    pub reply_bytes_by_opcode: std::collections::BTreeMap<String, u64>,
    /// `cache_hits` by where the chunk was found: this worker's memory, the cache directory.
    #[serde(default)]
    pub memory_hits: u64,
    #[serde(default)]
    pub disk_hits: u64,
    /// Chunk files removed to keep the cache directory under its limit.
    #[serde(default)]
    pub evictions: u64,
    /// How long this worker's fetches from the store took (an older daemon reports none).
    #[serde(default)]
    pub fetch_durations: Option<DurationHistogram>,
    /// Every measured takeover stall of the mount, in buckets.
    #[serde(default)]
    pub takeover_stall_histogram: Option<DurationHistogram>,
}

/// The socket of the mount at `mountpoint` (an absolute, canonical path).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let digest = Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    Path::new(RUN_DIR).join(format!("{}.sock", hex::encode(&digest[..8])))
}

/// The log file of a background daemon serving `mountpoint`.
pub fn log_path(mountpoint: &Path) -> PathBuf {
    socket_path(mountpoint).with_extension("log")
}

/// The control socket of the holder of the mount at `mountpoint`.
pub fn holder_socket_path(mountpoint: &Path) -> PathBuf {
    socket_path(mountpoint).with_extension("holder")
}

pub fn make_run_dir() -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(RUN_DIR)
}

/// A daemon's stdin and stdout go to /dev/null, its log (stderr) to `log_path`.
pub fn redirect_stdio(mountpoint: &Path) {
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null");
    let log = make_run_dir().and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(log_path(mountpoint)));
    if let Ok(null) = null {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
        if log.is_err() {
            let _ = nix::unistd::dup2(null.as_raw_fd(), 2);
        }
    }
    if let Ok(log) = log {
        let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
    }
}

/// Binds the status socket and answers each connection with `status()` as JSON.
pub fn serve(mountpoint: &Path, status: impl Fn() -> Status + Send + 'static) -> io::Result<PathBuf> {
    make_run_dir()?;
    let path = socket_path(mountpoint);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::thread::Builder::new().name("status".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            if line.trim() == "status" {
                let body = serde_json::to_string(&status()).expect("status serialises");
                if let Err(e) = stream.write_all(body.as_bytes()) {
                    warn!(error = %e, "answering a status request");
                }
            }
        }
    })?;
    Ok(path)
}

/// Asks the daemon serving `mountpoint` for its status.
pub fn query_status(mountpoint: &Path) -> io::Result<Status> {
    query_status_at(&socket_path(mountpoint), Duration::from_secs(5))
}

/// Asks the daemon listening on `socket` for its status, waiting at most `timeout` for each
/// read or write.
pub fn query_status_at(socket: &Path, timeout: Duration) -> io::Result<Status> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"status\n")?;
    let mut body = String::new();
    io::Read::read_to_string(&mut stream, &mut body)?;
    serde_json::from_str(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
