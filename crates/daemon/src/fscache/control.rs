//! The daemon's control protocol: a client connects to [`control_socket_path`], writes one
//! JSON line, and reads one JSON line back. The holder answers; only root is heard.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::registry::Registration;
use super::control_socket_path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Serve this image (mounted right after by the client).
    Register(Registration),
    /// Stop serving the image of this mountpoint (after the client unmounted it).
    Unregister { mountpoint: PathBuf },
    Status,
    /// Replace the worker with one from `binary`.
    Upgrade { binary: PathBuf },
    /// Unbind the cache and exit; refused while images are registered.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlReply {
    Done,
    Status(DaemonStatus),
    Upgraded { pid: u32 },
    Refused(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub holder_pid: u32,
    /// The worker that serves, unless one is starting.
    pub worker_pid: Option<u32>,
    /// Workers started after a predecessor died.
    pub restarts: u64,
    pub upgrades: u64,
    pub cache_dir: PathBuf,
    pub images: Vec<Registration>,
    /// The latest worker's figures.
    pub worker: Option<WorkerStats>,
}

/// What a worker has done, written by it a few times a second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub pid: u32,
    pub opens: u64,
    /// OPENs of cookies no registered image has.
    pub opens_refused: u64,
    pub objects_open: u64,
    pub reads: u64,
    pub bytes_written: u64,
    /// Chunk fetches that failed and were tried again.
    pub fetch_retries: u64,
    /// Writes to a full cache directory that were tried again.
    pub fill_retries: u64,
    /// Requests that could not be answered (a READ of an object this worker never opened, a
    /// cache file that refused a write).
    pub errors: u64,
}

/// Sends `request` to the daemon and waits up to `timeout` for its answer.
pub fn request(request: &ControlRequest, timeout: Duration) -> io::Result<ControlReply> {
    let mut stream = UnixStream::connect(control_socket_path())?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request).expect("request serialises");
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|_| io::Error::new(io::ErrorKind::UnexpectedEof, "the fscache daemon gave no answer (did it die? it recovers; try again)"))
}
