//! The holder's control protocol: `phoenixfs upgrade` connects to `/run/phoenixfs/<key>.holder`,
//! writes one JSON line, and reads one JSON line back once the upgrade is done or refused.
//! Only root and the mount's owner are heard.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::lifecycle::START_TIMEOUT;
use crate::error::MountError;
use crate::handover;
use crate::os::bind_fresh;
use crate::status;

/// What `phoenixfs upgrade` asks of a holder.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlRequest {
    Upgrade { binary: PathBuf },
}

/// The holder's answer.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlReply {
    Upgraded { pid: u32 },
    Refused(String),
}

/// The holder's control socket.
pub(crate) fn bind(mountpoint: &Path) -> Result<UnixListener, MountError> {
    status::make_run_dir().map_err(|source| MountError::Io { what: format!("creating {}", status::RUN_DIR), source })?;
    bind_fresh(&status::holder_socket_path(mountpoint))
}

/// Accepts one connection and reads its request: the client (to answer later) and what it
/// asks, or why it is refused.
pub(crate) fn accept(listener: &UnixListener, owner_uid: u32) -> Option<(UnixStream, Result<ControlRequest, String>)> {
    let (stream, _) = listener.accept().ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = match handover::check_peer(stream.as_fd(), owner_uid) {
        Err(e) => Err(e.to_string()),
        Ok(_) => {
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            serde_json::from_str(&line).map_err(|e| format!("bad request: {e}"))
        }
    };
    Some((stream, request))
}

/// Writes `reply` to the client as one JSON line (the fscache daemon's control protocol too).
pub(crate) fn reply(client: &UnixStream, reply: &impl Serialize) {
    let mut body = serde_json::to_vec(reply).expect("reply serialises");
    body.push(b'\n');
    let _ = (&*client).write_all(&body);
}

/// Asks the holder of `mountpoint` to upgrade its worker to `binary`; the new worker's pid.
pub fn request_upgrade(mountpoint: &Path, binary: &Path) -> Result<u32, MountError> {
    let path = status::holder_socket_path(mountpoint);
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source: io::Error| MountError::Io { what, source }
    };
    let mut stream = UnixStream::connect(&path).map_err(io("connecting to the mount's holder at"))?;
    stream.set_read_timeout(Some(START_TIMEOUT + Duration::from_secs(10))).map_err(io("configuring"))?;
    let mut request = serde_json::to_vec(&ControlRequest::Upgrade { binary: binary.to_path_buf() }).expect("request serialises");
    request.push(b'\n');
    stream.write_all(&request).map_err(io("writing to"))?;
    let mut line = String::new();
    // A holder that dies while upgrading resets the connection or closes it unanswered.
    let no_answer = match BufReader::new(&stream).read_line(&mut line) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => return Err(io("waiting for an answer from")(e)),
        Err(e) => e.to_string(),
        Ok(_) => "the connection closed".into(),
    };
    match serde_json::from_str(&line) {
        Ok(ControlReply::Upgraded { pid }) => Ok(pid),
        Ok(ControlReply::Refused(why)) => Err(MountError::Refused(why)),
        Err(_) => Err(MountError::Refused(format!("the holder gave no answer ({no_answer}): did it die? the mount recovers; try again"))),
    }
}
