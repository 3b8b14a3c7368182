//! What a holder and a worker say over their Unix SEQPACKET socket: first the hand-over (the
//! session's fds by SCM_RIGHTS — the FUSE connection, the verified image, the shared chunk
//! memory — and the session state, versioned and checksummed so that a process given state it
//! cannot read refuses loudly instead of serving wrong answers), then small [`Message`]s both
//! ways. The socket closing is how each learns the other died.
//!
//! ```text
//! "PHXSTATE" | version u32 LE | json length u32 LE | json | sha256(json)
//! ```

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use phoenixfs_fuse::SessionParams;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::histogram::DurationHistogram;
use crate::spec::MountSpec;

const MAGIC: &[u8; 8] = b"PHXSTATE";
pub const STATE_VERSION: u32 = 3;
const MAX_STATE: usize = 1 << 16;
/// How many takeover stalls the state remembers.
const STALLS_KEPT: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub params: SessionParams,
    pub spec: MountSpec,
    /// The id of the image in the image memfd, verified by the mount's first holder.
    pub image_id: String,
    /// When the receiving process was launched (CLOCK_MONOTONIC), for its start-up time.
    pub launched_at_ns: u64,
    /// Workers started after a predecessor died.
    pub restarts: u64,
    /// Workers started by `phoenixfs upgrade`.
    pub upgrades: u64,
    pub holder_pid: u32,
    /// How the receiving worker comes to serve.
    pub takeover: Takeover,
    /// Stalls of the latest takeovers after a worker died, in microseconds, oldest first.
    pub stalls_us: Vec<u64>,
    /// Takeovers whose stall was measured, in all.
    pub takeovers_measured: u64,
    /// Every measured stall, in buckets (a state from an older holder has none).
    #[serde(default = "DurationHistogram::takeover_stalls")]
    pub stall_histogram: DurationHistogram,
}

impl State {
    /// What the holder tells a worker that started before it knew it: counts and stalls.
    pub fn history(&self) -> History {
        History {
            restarts: self.restarts,
            upgrades: self.upgrades,
            stalls_us: self.stalls_us.clone(),
            takeovers_measured: self.takeovers_measured,
            stall_histogram: self.stall_histogram.clone(),
        }
    }

    pub fn apply(&mut self, history: History) {
        (self.restarts, self.upgrades, self.stalls_us, self.takeovers_measured, self.stall_histogram) =
            (history.restarts, history.upgrades, history.stalls_us, history.takeovers_measured, history.stall_histogram);
    }

    pub fn record_stall(&mut self, stall_us: u64) {
        self.takeovers_measured += 1;
        self.stall_histogram.observe(stall_us);
        self.stalls_us.push(stall_us);
        let excess = self.stalls_us.len().saturating_sub(STALLS_KEPT);
        self.stalls_us.drain(..excess);
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Takeover {
    /// The mount's first worker.
    First,
    /// The previous worker died at `died_at_ns` (CLOCK_MONOTONIC) with requests perhaps
    /// read and unanswered: resend them.
    AfterDeath { died_at_ns: u64 },
    /// A live worker is being replaced: serve alongside it, resend nothing.
    Upgrade,
    /// Started ahead of need: prepare everything, then wait for [`Message::Go`] and take over
    /// as after a death. A takeover then costs no process start.
    Standby,
}

/// The mount's history, which a worker started earlier may have missed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct History {
    pub restarts: u64,
    pub upgrades: u64,
    pub stalls_us: Vec<u64>,
    pub takeovers_measured: u64,
    #[serde(default = "DurationHistogram::takeover_stalls")]
    pub stall_histogram: DurationHistogram,
}

/// What holder and worker tell each other after the hand-over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Message {
    /// worker/holder -> its starter: took over, serving (or holding).
    Ready { pid: u32 },
    /// worker/holder -> its starter: could not take over.
    Failed(String),
    /// worker -> holder: the first reply after a takeover was written at this instant.
    FirstReply { at_ns: u64 },
    /// holder -> worker: a newer worker serves now; stop reading, finish, exit.
    Retire,
    /// worker -> holder: stopped after `Retire`; every request it read was answered.
    Retired,
    /// holder -> worker: a worker died before it finished retiring; resend its requests.
    Resend,
    /// worker -> holder: the file system is unmounted; exiting.
    Unmounted,
    /// holder -> worker: the mount's history, when it changed while the worker was starting
    /// (a restart during an upgrade).
    History(History),
    /// holder -> standby worker: the serving worker died at `died_at_ns`; take over.
    Go { died_at_ns: u64, history: History },
    /// fscache holder -> worker: serve this image too (its sealed memfd attached).
    ImageAdded { mountpoint: PathBuf },
    /// fscache holder -> worker: the image of this mountpoint is unmounted.
    ImageRemoved { mountpoint: PathBuf },
}

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("refusing session state: {0}")]
    Corrupt(String),
    #[error("refusing session state version {0} (this binary reads {STATE_VERSION})")]
    Version(u32),
    #[error("hand-over socket: {0}")]
    Socket(nix::errno::Errno),
    #[error("unreadable message {0:?}")]
    Garbled(String),
    #[error("hand-over carried {0} file descriptors, not 2 or 3 (FUSE, image, chunk memory)")]
    Fds(usize),
    #[error("the other end of the hand-over socket is uid {0}, neither root nor the mount's owner")]
    Stranger(u32),
}

pub fn encode(state: &impl Serialize) -> Vec<u8> {
    let json = serde_json::to_vec(state).expect("state serialises");
    let mut out = Vec::with_capacity(json.len() + 48);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&Sha256::digest(&json));
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HandoverError> {
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

/// Sends `state` (framed and checksummed) and `fds` as one message.
pub fn send_with_fds(socket: BorrowedFd<'_>, state: &impl Serialize, fds: &[RawFd]) -> Result<(), HandoverError> {
    let bytes = encode(state);
    sendmsg::<UnixAddr>(socket.as_raw_fd(), &[IoSlice::new(&bytes)], &[ControlMessage::ScmRights(fds)], MsgFlags::empty(), None)
        .map_err(HandoverError::Socket)?;
    Ok(())
}

/// Receives what [`send_with_fds`] sent: the fds (at most 4), then the state (checked).
pub fn receive_with_fds<T: DeserializeOwned>(socket: BorrowedFd<'_>) -> Result<(Result<T, HandoverError>, Vec<OwnedFd>), HandoverError> {
    let mut buf = vec![0u8; MAX_STATE];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<UnixAddr>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).map_err(HandoverError::Socket)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(HandoverError::Socket)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: SCM_RIGHTS just installed these descriptors in this process; we own them.
            fds.extend(raw.into_iter().map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }));
        }
    }
    let len = msg.bytes;
    Ok((decode(&buf[..len]), fds))
}

/// What every process of a mount holds and passes on: the FUSE connection, the verified
/// image (a sealed memfd), the chunk memory shared by worker generations (a memfd; none
/// when the mount has no memory cache) and the open-file table (a memfd; only when the
/// session negotiated passthrough opens).
pub struct SessionFds {
    pub fuse: OwnedFd,
    pub image: OwnedFd,
    pub chunks: Option<OwnedFd>,
    pub opens: Option<OwnedFd>,
}

impl SessionFds {
    fn raw(&self) -> Vec<RawFd> {
        let mut fds = vec![self.fuse.as_raw_fd(), self.image.as_raw_fd()];
        fds.extend(self.chunks.as_ref().map(AsRawFd::as_raw_fd));
        fds.extend(self.opens.as_ref().map(AsRawFd::as_raw_fd));
        fds
    }
}

/// Sends the state and the session's fds as one message.
pub fn send(socket: BorrowedFd<'_>, state: &State, fds: &SessionFds) -> Result<(), HandoverError> {
    send_with_fds(socket, state, &fds.raw())
}

/// Receives what `send` sent: the session's fds, and the state (checked), which says which
/// of the optional fds came.
pub fn receive(socket: BorrowedFd<'_>) -> Result<(State, SessionFds), HandoverError> {
    let (state, fds) = receive_with_fds::<State>(socket)?;
    let state = state?;
    let (has_chunks, has_opens) = (state.spec.memory_limit > 0, state.params.passthrough());
    if fds.len() != 2 + usize::from(has_chunks) + usize::from(has_opens) {
        return Err(HandoverError::Fds(fds.len()));
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted above");
    let (fuse, image) = (next(), next());
    let chunks = has_chunks.then(&mut next);
    let opens = has_opens.then(&mut next);
    Ok((state, SessionFds { fuse, image, chunks, opens }))
}

/// Sends one message; fails when the other side is gone.
pub fn send_message(socket: BorrowedFd<'_>, message: &Message) -> Result<(), HandoverError> {
    send_message_with_fds(socket, message, &[])
}

/// Sends one message with file descriptors attached.
pub fn send_message_with_fds(socket: BorrowedFd<'_>, message: &Message, fds: &[RawFd]) -> Result<(), HandoverError> {
    let bytes = serde_json::to_vec(message).expect("message serialises");
    let rights = [ControlMessage::ScmRights(fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<UnixAddr>(socket.as_raw_fd(), &[IoSlice::new(&bytes)], control, MsgFlags::MSG_NOSIGNAL, None).map(drop).map_err(HandoverError::Socket)
}

/// Waits for one message; `None` when the other side is gone. Descriptors attached to it
/// are closed.
pub fn receive_message(socket: BorrowedFd<'_>) -> Result<Option<Message>, HandoverError> {
    Ok(receive_message_with_fds(socket)?.map(|(message, _)| message))
}

/// Waits for one message and the descriptors attached to it; `None` when the other side is
/// gone.
pub fn receive_message_with_fds(socket: BorrowedFd<'_>) -> Result<Option<(Message, Vec<OwnedFd>)>, HandoverError> {
    let mut buf = [0u8; 4096];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<UnixAddr>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::ECONNRESET) => return Ok(None),
            Err(errno) => return Err(HandoverError::Socket(errno)),
            Ok(msg) => {
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs().map_err(HandoverError::Socket)? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: SCM_RIGHTS just installed these descriptors in this process; we own them.
                        fds.extend(raw.into_iter().map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }));
                    }
                }
                break (msg.bytes, fds);
            }
        }
    };
    if n == 0 {
        return Ok(None);
    }
    let message = serde_json::from_slice(&buf[..n]).map_err(|_| HandoverError::Garbled(String::from_utf8_lossy(&buf[..n]).trim().to_string()))?;
    Ok(Some((message, fds)))
}

/// The pid of the process at the other end, refusing anyone but root and `owner`.
pub fn check_peer(socket: BorrowedFd<'_>, owner: u32) -> Result<u32, HandoverError> {
    let peer = getsockopt(&socket, sockopt::PeerCredentials).map_err(HandoverError::Socket)?;
    if peer.uid() != 0 && peer.uid() != owner {
        return Err(HandoverError::Stranger(peer.uid()));
    }
    Ok(peer.pid() as u32)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn sample() -> State {
        State {
            params: SessionParams { kernel_minor: 45, minor: 40, kernel_flags: 1 << 39, flags: 1, max_readahead: 131072, max_write: 1 << 20, max_pages: 256 },
            spec: MountSpec::for_tests(),
            image_id: "ab".repeat(32),
            launched_at_ns: 5,
            restarts: 3,
            upgrades: 1,
            holder_pid: 42,
            takeover: Takeover::AfterDeath { died_at_ns: 7 },
            stalls_us: vec![1500, 900],
            takeovers_measured: 2,
            stall_histogram: DurationHistogram::takeover_stalls(),
        }
    }

    #[test]
    fn state_round_trips_and_any_damage_is_refused() {
        let bytes = encode(&sample());
        assert_eq!(decode::<State>(&bytes).unwrap(), sample());
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            assert!(decode::<State>(&damaged).is_err(), "flip at {at} accepted");
        }
        assert!(decode::<State>(&bytes[..bytes.len() - 1]).is_err());
        let mut future = bytes.clone();
        future[8] = 4;
        assert!(matches!(decode::<State>(&future), Err(HandoverError::Version(4))));
    }

    #[test]
    fn messages_cross_the_socket_and_garbage_or_a_closed_peer_is_told_apart() {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let history = History { restarts: 1, upgrades: 2, stalls_us: vec![3], takeovers_measured: 4, stall_histogram: DurationHistogram::takeover_stalls() };
        for message in [Message::Ready { pid: 7 }, Message::Failed("why".into()), Message::FirstReply { at_ns: 1 << 40 }, Message::Retire, Message::Retired, Message::Resend, Message::Unmounted, Message::History(history.clone()), Message::Go { died_at_ns: 9, history }] {
            send_message(a.as_fd(), &message).unwrap();
            assert_eq!(receive_message(b.as_fd()).unwrap(), Some(message));
        }
        nix::sys::socket::send(a.as_raw_fd(), b"ok\n", MsgFlags::empty()).unwrap();
        assert!(matches!(receive_message(b.as_fd()), Err(HandoverError::Garbled(text)) if text == "ok"));
        // Both ends were made by this process, as root or its owner.
        assert_eq!(check_peer(b.as_fd(), nix::unistd::getuid().as_raw()).unwrap(), std::process::id());
        drop(a);
        assert_eq!(receive_message(b.as_fd()).unwrap(), None);
    }

    #[test]
    fn a_message_carries_its_descriptors() {
        use std::io::{Read, Seek, Write};
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"image bytes").unwrap();
        let added = Message::ImageAdded { mountpoint: "/mnt/x".into() };
        send_message_with_fds(a.as_fd(), &added, &[file.as_raw_fd()]).unwrap();
        let (message, mut fds) = receive_message_with_fds(b.as_fd()).unwrap().unwrap();
        assert_eq!(message, added);
        assert_eq!(fds.len(), 1);
        let mut received = std::fs::File::from(fds.pop().unwrap());
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "image bytes");
    }

    #[test]
    fn only_the_latest_stalls_are_kept() {
        let mut state = sample();
        for stall in 0..40 {
            state.record_stall(stall);
        }
        assert_eq!(state.stalls_us, (24..40).collect::<Vec<_>>());
        assert_eq!(state.stall_histogram.count(), 40);
    }
}
