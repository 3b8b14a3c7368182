//! How a holder comes to hold: the mount's first holder answers INIT and starts the first
//! worker; a replacement holder adopts the worker whose holder died.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{SigSet, Signal};
use phoenixfs_fuse::{OpenTable, Session};
use tracing::{info, warn};

use super::control;
use super::launch::{start_with_handover, Role};
use super::lifecycle::Lifecycle;
use super::{Holder, Worker};
use crate::error::MountError;
use crate::handover::{self, Message, SessionFds, State, Takeover};
use crate::histogram::DurationHistogram;
use crate::mounttable::device_of;
use crate::os::{set_cloexec, spawn_thread};
use crate::spec::MountSpec;
use crate::status;

/// The first holder of a mount (the `mount` command's daemon): answers INIT, starts the first
/// worker, reports "ok" or why not on `ready`, then holds until unmounted. Failures before
/// the first worker serves unmount.
pub(crate) fn hold(spec: MountSpec, image_id: String, fds: SessionFds, ready: Option<OwnedFd>) -> Result<(), MountError> {
    let mountpoint = spec.mountpoint.clone();
    let report = |ready: Option<OwnedFd>, message: &str| {
        if let Some(ready) = ready {
            let _ = nix::unistd::write(&ready, message.as_bytes());
        }
    };
    let started = (|| {
        let SessionFds { fuse, image, chunks, .. } = fds;
        let (fuse, params) = Session::init(fuse, spec.passthrough().is_some())?;
        let opens = params.passthrough().then(OpenTable::create).transpose()?;
        set_kernel_readahead(&mountpoint);
        let state = State {
            params,
            spec,
            image_id,
            launched_at_ns: 0,
            restarts: 0,
            upgrades: 0,
            holder_pid: std::process::id(),
            takeover: Takeover::First,
            stalls_us: Vec::new(),
            takeovers_measured: 0,
            stall_histogram: DurationHistogram::takeover_stalls(),
        };
        let warnings = warnings(&state);
        for warning in &warnings {
            warn!("{warning}");
        }
        let fds = SessionFds { fuse, image, chunks, opens };
        let binary = current_exe()?;
        let control = control::bind(&mountpoint)?;
        let (channel, child) = start_with_handover(&binary, Role::Worker, &state, &fds)?;
        let worker = Worker::started(channel, child, None);
        spawn_signal_thread(&mountpoint)?;
        let slot = Lifecycle::serving(worker.pid, Instant::now());
        Ok::<_, MountError>((Holder { fds, state, binary, slot, worker: Some(worker), standbys: Vec::new(), standby_failures: 0, retiring: Vec::new(), upgrade: None, control }, warnings))
    })();
    match started {
        Ok((holder, warnings)) => {
            report(ready, &format!("ok\n{}", warnings.join("\n")));
            holder.run()
        }
        Err(e) => {
            let _ = umount2(&mountpoint, MntFlags::MNT_DETACH);
            report(ready, &format!("{e}\n"));
            Err(e)
        }
    }
}

fn current_exe() -> Result<PathBuf, MountError> {
    std::env::current_exe().map_err(|source| MountError::Io { what: "finding this binary".into(), source })
}

/// What `mount` prints (and the holder logs) about the machine's ability to survive a
/// worker's death: a kernel that cannot resend requests, a request timeout that would abort
/// the whole connection during a long takeover.
fn warnings(state: &State) -> Vec<String> {
    let mut warnings = Vec::new();
    if !state.params.has_resend() {
        warnings.push("this kernel cannot resend FUSE requests (no FUSE_HAS_RESEND, Linux 6.9+): requests in flight when a worker dies may hang; upgrades still lose nothing".to_string());
    }
    if state.spec.passthrough().is_some() && !state.params.passthrough() {
        warnings.push("this kernel offers no FUSE passthrough (Linux 6.9+, CONFIG_FUSE_PASSTHROUGH): every file is read through the FUSE page cache".to_string());
    }
    let sysctl = |name: &str| std::fs::read_to_string(format!("/proc/sys/fs/fuse/{name}")).ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    // The kernel's rule: the default applies, capped (or replaced when 0) by the maximum.
    let (default, max) = (sysctl("default_request_timeout"), sysctl("max_request_timeout"));
    let timeout = match (default, max) {
        (d, 0) => d,
        (0, m) => m,
        (d, m) => d.min(m),
    };
    if timeout != 0 && timeout < MIN_SAFE_REQUEST_TIMEOUT_S {
        warnings.push(format!(
            "fs.fuse request timeout is {timeout} s: a request waiting longer (a slow takeover, a slow store) aborts the whole mount; set fs.fuse.default_request_timeout and max_request_timeout to 0 or at least {MIN_SAFE_REQUEST_TIMEOUT_S}"
        ));
    }
    warnings
}

/// Request timeouts below this could abort a mount during a takeover or a slow fetch.
const MIN_SAFE_REQUEST_TIMEOUT_S: u64 = 60;

/// Lets the kernel read ahead as much as one READ can carry (1 MiB instead of the default
/// 128 KiB), so sequential readers cost a quarter of the requests.
fn set_kernel_readahead(mountpoint: &Path) {
    let Some(device) = device_of(mountpoint) else {
        return warn!("cannot find the mount in mountinfo to raise its readahead");
    };
    let path = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(error) = std::fs::write(&path, "1024") {
        warn!(path, %error, "cannot raise the kernel's readahead");
    }
}

/// A holder started by a worker whose holder died (the hidden `holder` subcommand): takes
/// the session from that worker (fd 3) and holds from then on.
pub fn run_adopting_holder() -> Result<(), MountError> {
    // SAFETY: the worker started this process with the hand-over socket as fd 3, and
    // nothing else in this process owns fd 3.
    let channel = unsafe { OwnedFd::from_raw_fd(3) };
    set_cloexec(channel.as_fd());
    let answer = |message: &Message| {
        let _ = handover::send_message(channel.as_fd(), message);
    };
    let adopted = (|| {
        let (mut state, fds) = handover::receive(channel.as_fd())?;
        let worker_pid = handover::check_peer(channel.as_fd(), state.spec.owner_uid)?;
        status::redirect_stdio(&state.spec.mountpoint);
        state.holder_pid = std::process::id();
        let binary = current_exe()?;
        let control = control::bind(&state.spec.mountpoint)?;
        spawn_signal_thread(&state.spec.mountpoint)?;
        Ok::<_, MountError>((state, fds, binary, control, worker_pid))
    })();
    let (state, fds, binary, control, worker_pid) = match adopted {
        Ok(adopted) => adopted,
        Err(e) => {
            answer(&Message::Failed(e.to_string()));
            return Err(e);
        }
    };
    answer(&Message::Ready { pid: std::process::id() });
    warn!(worker = worker_pid, "the previous holder died; this one holds the mount now");
    let worker = Worker { pid: worker_pid, channel, child: None, predecessor_died_at_ns: None, retired: false, prepared: false, failure: None };
    let slot = Lifecycle::serving(worker_pid, Instant::now());
    Holder { fds, state, binary, slot, worker: Some(worker), standbys: Vec::new(), standby_failures: 0, retiring: Vec::new(), upgrade: None, control }.run()
}

/// Termination signals unmount; the worker then sees the connection end and exits cleanly.
fn spawn_signal_thread(mountpoint: &Path) -> Result<(), MountError> {
    let signals = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP]);
    let _ = signals.thread_block();
    let mountpoint = mountpoint.to_path_buf();
    spawn_thread("signals", move || {
        if let Ok(signal) = signals.wait() {
            info!(%signal, "unmounting");
            let _ = umount2(&mountpoint, MntFlags::MNT_DETACH);
        }
    })
}
