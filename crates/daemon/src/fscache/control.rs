//! The daemon's control protocol: a client connects to [`control_socket_path`], writes one
//! JSON line, and reads one JSON line back. The holder answers; only root is heard.

use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use serde::{Deserialize, Serialize};

use super::registry::Registration;
use super::control_socket_path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Serve this image (mounted right after by the client); its verified bytes, in a
    /// sealed memfd, come attached.
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
    /// The prepared standby worker, which takes over when the serving one dies.
    pub standby_pid: Option<u32>,
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

/// Sends `request` to the daemon, with `fd` attached when given, and waits up to `timeout`
/// for its answer.
pub fn request(request: &ControlRequest, fd: Option<BorrowedFd<'_>>, timeout: Duration) -> io::Result<ControlReply> {
    let stream = UnixStream::connect(control_socket_path())?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request).expect("request serialises");
    line.push(b'\n');
    let fds: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<UnixAddr>(stream.as_raw_fd(), &[IoSlice::new(&line)], control, MsgFlags::MSG_NOSIGNAL, None)?;
    (&stream).write_all(&line[sent..])?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|_| io::Error::new(io::ErrorKind::UnexpectedEof, "the fscache daemon gave no answer (did it die? it recovers; try again)"))
}

/// Reads a request line and the descriptors that came with it (the holder's side).
pub(super) fn read_request(stream: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut first = [0u8; 4096];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(&mut first)];
    let msg = recvmsg::<UnixAddr>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: SCM_RIGHTS just installed these descriptors in this process; we own them.
            fds.extend(raw.into_iter().map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }));
        }
    }
    let n = msg.bytes;
    let mut line = first[..n].to_vec();
    if !line.ends_with(b"\n") && n > 0 {
        BufReader::new(stream).read_until(b'\n', &mut line)?;
    }
    Ok((String::from_utf8_lossy(&line).into_owned(), fds))
}
