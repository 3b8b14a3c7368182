//! Starting the mount's processes: `phoenixfs worker` (by a holder) and `phoenixfs holder` (by
//! a worker whose holder died), each with a hand-over socket as its fd 3 through which it is
//! given the session's fds and state, and then says whether it has taken over.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::lifecycle::{Exit, START_TIMEOUT};
use crate::error::{MountError, StartError};
use crate::handover::{self, Message, SessionFds, State};
use crate::os::{monotonic_ns, poll_until};

/// What a launched process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Worker,
    Holder,
    /// The host's fscache daemon's worker and holder (see `crate::fscache`).
    FscacheWorker,
    FscacheHolder,
}

impl Role {
    pub(crate) fn subcommand(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Holder => "holder",
            Role::FscacheWorker => "fscache-worker",
            Role::FscacheHolder => "fscache-holder",
        }
    }

    fn is_holder(self) -> bool {
        matches!(self, Role::Holder | Role::FscacheHolder)
    }
}

/// Starts `binary worker|holder` and hands it the state and the session's fds; does not wait
/// for it to take over. On failure nothing is left running.
pub(crate) fn launch(binary: &Path, role: Role, state: &State, fds: &SessionFds) -> Result<(OwnedFd, Child), MountError> {
    let state = State { launched_at_ns: monotonic_ns(), ..state.clone() };
    let (channel, mut child) = spawn_with_channel(binary, role, state.spec.log_level)?;
    if let Err(e) = handover::send(channel.as_fd(), &state, fds) {
        discard(&mut child);
        return Err(e.into());
    }
    Ok((channel, child))
}

/// [`launch`], then waits until the process says it has taken over. On failure nothing is
/// left running.
pub(crate) fn start_with_handover(binary: &Path, role: Role, state: &State, fds: &SessionFds) -> Result<(OwnedFd, Child), MountError> {
    let (channel, mut child) = launch(binary, role, state, fds)?;
    if let Err(e) = await_ready(channel.as_fd(), role) {
        discard(&mut child);
        return Err(e);
    }
    Ok((channel, child))
}

/// Kills and reaps a process that failed to take over, so nothing of it is left.
pub(crate) fn discard(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts `binary [-v..] worker|holder` with one end of a new SEQPACKET socket pair as its
/// fd 3; returns our end. A holder gets a session of its own (it must outlive the worker that
/// starts it), a worker a process group of its own.
pub(crate) fn spawn_with_channel(binary: &Path, role: Role, log_level: u8) -> Result<(OwnedFd, Child), MountError> {
    let io = |what: String| move |source: io::Error| MountError::Io { what, source };
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| io("creating the hand-over socket".into())(e.into()))?;
    let theirs_raw = theirs.as_raw_fd();
    let detach = role.is_holder();
    let mut command = Command::new(binary);
    if log_level > 0 {
        command.arg(format!("-{}", "v".repeat(log_level as usize)));
    }
    command.arg(role.subcommand()).stdin(Stdio::null()).stdout(Stdio::null());
    if !detach {
        command.process_group(0);
    }
    // SAFETY: dup2 and setsid are async-signal-safe. fd 3 in the child becomes the hand-over
    // socket (dup2 clears close-on-exec on the copy).
    unsafe {
        command.pre_exec(move || {
            if detach && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::dup2(theirs_raw, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(io(format!("starting {} {}", binary.display(), role.subcommand())))?;
    Ok((ours, child))
}

/// Waits for a started process's first message: `Ready`, or why it failed.
fn await_ready(channel: BorrowedFd<'_>, role: Role) -> Result<(), MountError> {
    let mut fds = [PollFd::new(channel, PollFlags::POLLIN)];
    if poll_until(&mut fds, Some(Instant::now() + START_TIMEOUT)) != Ok(vec![true]) {
        return Err(MountError::NotStarted { what: role.subcommand(), cause: StartError::Timeout(START_TIMEOUT.as_secs()) });
    }
    read_ready(channel, role)
}

/// Reads a started process's first message, which has arrived: `Ready`, or why it failed.
pub(crate) fn read_ready(channel: BorrowedFd<'_>, role: Role) -> Result<(), MountError> {
    let cause = match handover::receive_message(channel) {
        Ok(Some(Message::Ready { .. })) => return Ok(()),
        Ok(Some(Message::Failed(why))) => StartError::Said(why),
        Ok(Some(other)) => StartError::Unexpected(format!("{other:?}")),
        Ok(None) => StartError::Exited,
        Err(e) => StartError::Channel(e),
    };
    Err(MountError::NotStarted { what: role.subcommand(), cause })
}

/// Waits for a process we started (none: one we adopted, which we cannot wait for) and says
/// how it ended.
pub(crate) fn reap(child: Option<&mut Child>) -> Exit {
    match child.map(Child::wait) {
        Some(Ok(status)) => classify(status),
        Some(Err(_)) | None => Exit::Unknown,
    }
}

/// How a child process ended, for the lifecycle: killed from outside, or failed by itself.
pub(crate) fn classify(status: ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Failed(format!("exit status {code}")),
        (None, Some(signal)) => {
            let name = nix::sys::signal::Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_string());
            match signal {
                libc::SIGKILL | libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGQUIT => Exit::Killed(name),
                _ => Exit::Failed(name),
            }
        }
        (None, None) => Exit::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn deaths_by_outside_signals_are_kills_and_the_rest_are_failures() {
        assert_eq!(classify(ExitStatus::from_raw(libc::SIGKILL)), Exit::Killed("SIGKILL".into()));
        assert_eq!(classify(ExitStatus::from_raw(libc::SIGTERM)), Exit::Killed("SIGTERM".into()));
        assert_eq!(classify(ExitStatus::from_raw(libc::SIGABRT)), Exit::Failed("SIGABRT".into()));
        assert_eq!(classify(ExitStatus::from_raw(libc::SIGSEGV | 0x80)), Exit::Failed("SIGSEGV".into()));
        assert_eq!(classify(ExitStatus::from_raw(1 << 8)), Exit::Failed("exit status 1".into()));
        assert_eq!(classify(ExitStatus::from_raw(0)), Exit::Failed("exit status 0".into()));
    }
}
