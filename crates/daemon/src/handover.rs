//! What a holder hands a worker: the FUSE fd (SCM_RIGHTS over a Unix SEQPACKET socket) and
//! the session state, versioned and checksummed so that a worker given state it cannot read
//! refuses loudly instead of serving wrong answers.
//!
//! ```text
//! "PHXSTATE" | version u32 LE | json length u32 LE | json | sha256(json)
//! ```

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use phoenixfs_fuse::SessionParams;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::mount::MountSpec;

const MAGIC: &[u8; 8] = b"PHXSTATE";
pub const STATE_VERSION: u32 = 1;
const MAX_STATE: usize = 1 << 16;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub params: SessionParams,
    pub spec: MountSpec,
    /// Workers started before this one.
    pub restarts: u64,
    pub holder_pid: u32,
}

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("refusing session state: {0}")]
    Corrupt(String),
    #[error("refusing session state version {0} (this binary reads {STATE_VERSION})")]
    Version(u32),
    #[error("hand-over socket: {0}")]
    Socket(nix::errno::Errno),
    #[error("hand-over carried no FUSE file descriptor")]
    NoFd,
}

pub fn encode(state: &State) -> Vec<u8> {
    let json = serde_json::to_vec(state).expect("state serialises");
    let mut out = Vec::with_capacity(json.len() + 48);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&Sha256::digest(&json));
    out
}

pub fn decode(bytes: &[u8]) -> Result<State, HandoverError> {
    let corrupt = |why: &str| HandoverError::Corrupt(why.to_string());
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != STATE_VERSION {
        return Err(HandoverError::Version(version));
    }
    let len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if bytes.len() != 16 + len + 32 {
        return Err(corrupt("length mismatch"));
    }
    let json = &bytes[16..16 + len];
    if Sha256::digest(json)[..] != bytes[16 + len..] {
        return Err(corrupt("checksum mismatch"));
    }
    serde_json::from_slice(json).map_err(|e| HandoverError::Corrupt(e.to_string()))
}

/// Sends the state and the FUSE fd as one message.
pub fn send(socket: BorrowedFd<'_>, state: &State, fuse: BorrowedFd<'_>) -> Result<(), HandoverError> {
    let bytes = encode(state);
    let fds = [fuse.as_raw_fd()];
    sendmsg::<UnixAddr>(socket.as_raw_fd(), &[IoSlice::new(&bytes)], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
        .map_err(HandoverError::Socket)?;
    Ok(())
}

/// Receives what `send` sent: the FUSE fd, and the state (checked).
pub fn receive(socket: BorrowedFd<'_>) -> Result<(State, OwnedFd), HandoverError> {
    let mut buf = vec![0u8; MAX_STATE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (len, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(HandoverError::Socket)?;
        let mut fd = None;
        for cmsg in msg.cmsgs().map_err(HandoverError::Socket)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                // SAFETY: SCM_RIGHTS just installed these descriptors in this process; we own them.
                fd = fds.first().map(|&raw| unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        (msg.bytes, fd)
    };
    let fd = fd.ok_or(HandoverError::NoFd)?;
    Ok((decode(&buf[..len])?, fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            params: SessionParams { kernel_minor: 45, minor: 40, kernel_flags: 1 << 39, flags: 1, max_readahead: 131072, max_write: 1 << 20, max_pages: 256 },
            spec: MountSpec::for_tests(),
            restarts: 3,
            holder_pid: 42,
        }
    }

    #[test]
    fn state_round_trips_and_any_damage_is_refused() {
        let bytes = encode(&sample());
        assert_eq!(decode(&bytes).unwrap(), sample());
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            assert!(decode(&damaged).is_err(), "flip at {at} accepted");
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        let mut future = bytes.clone();
        future[8] = 2;
        assert!(matches!(decode(&future), Err(HandoverError::Version(2))));
    }
}
