//! Small process and thread helpers shared by the holder and the worker.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollTimeout};

pub use phoenixfs_cache::process_alive;

use crate::error::MountError;

/// Starts a named daemon thread; failing to is an error of the daemon's start-up.
pub(crate) fn spawn_thread(name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), MountError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map(drop)
        .map_err(|source| MountError::Io { what: format!("spawning the {name} thread"), source })
}


/// Background work (prefetch, indexing) yields the CPU and the disk to serving requests.
pub(crate) fn lowest_priority_for_this_thread() {
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    const IOPRIO_CLASS_IDLE: libc::c_int = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
    // SAFETY: setpriority and ioprio_set with who = 0 change only the calling thread on Linux.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT);
    }
}

pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) {
    let _ = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
}

/// Now on CLOCK_MONOTONIC in nanoseconds: one clock for all processes of a mount.
pub(crate) fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// A process's resident memory (VmRSS), shared pages included.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    Some(kib * 1024)
}

/// A panic anywhere in a worker ends the worker, as a death: the holder replaces it and the
/// kernel resends what it held. A thread that unwound alone would leave the worker a thread
/// short and its requests unanswered.
pub(crate) fn die_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

/// Calls `attempt` until it succeeds, logging each failure as `what` and waiting 20 ms, then
/// twice as long each time, up to 1.3 s, between tries: for what must happen, like finding a
/// new holder for a session.
pub(crate) fn retry_until_done<T, E: std::fmt::Display>(what: &str, mut attempt: impl FnMut() -> Result<T, E>) -> T {
    let mut failures = 0u32;
    loop {
        match attempt() {
            Ok(done) => return done,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, attempt = failures, "{what}; retrying");
                std::thread::sleep(std::time::Duration::from_millis(20 << failures.min(6)));
            }
        }
    }
}

/// Waits until one of `fds` has something to say or `deadline` passes (never, without one);
/// which of them have, in order. A signal ends the wait early with none ready.
pub(crate) fn poll_until(fds: &mut [PollFd<'_>], deadline: Option<Instant>) -> nix::Result<Vec<bool>> {
    let timeout = match deadline {
        // One millisecond late rather than early: poll rounds down.
        Some(at) => PollTimeout::try_from(at.saturating_duration_since(Instant::now()).as_millis().min(1 << 30) as i32 + 1).unwrap_or(PollTimeout::NONE),
        None => PollTimeout::NONE,
    };
    match poll(fds, timeout) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(fds.iter().map(|fd| fd.revents().is_some_and(|r| !r.is_empty())).collect()),
        Err(errno) => Err(errno),
    }
}

/// A listening Unix socket at `path`, replacing whatever a dead process left there, not
/// inherited by the processes this one starts.
pub(crate) fn bind_fresh(path: &Path) -> Result<UnixListener, MountError> {
    let _ = fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|source| MountError::Io { what: format!("binding {}", path.display()), source })?;
    set_cloexec(listener.as_fd());
    Ok(listener)
}
