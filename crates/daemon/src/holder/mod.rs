//! The holder: keeps the session for the mount's whole life (the FUSE fd, the verified image
//! and the shared chunk memory, the negotiated parameters) and starts a worker whenever the
//! serving one dies or is upgraded. It never reads a request after INIT and never touches the
//! data path, so there is little in it that can fail. Its loop only waits on sockets; what a
//! worker's end means is decided by [`lifecycle`], how processes start by [`launch`], and the
//! `upgrade` command's protocol is in [`control`].

mod control;
mod launch;
mod lifecycle;

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Instant;

use nix::mount::{umount2, MntFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use phoenixfs_fuse::Session;
use tracing::{info, warn};

pub use control::request_upgrade;
pub(crate) use launch::{start_with_handover, Role};

use self::control::{ControlReply, ControlRequest};
use self::launch::{classify, discard, launch, read_ready};
use self::lifecycle::{Action, Event, Exit, Lifecycle, Phase, START_TIMEOUT};
use crate::error::MountError;
use crate::handover::{self, Message, SessionFds, State, Takeover};
use crate::mounttable::device_of;
use crate::os::{monotonic_ns, set_cloexec, spawn_thread};
use crate::spec::MountSpec;
use crate::status;

/// A worker process this holder watches: started by it, or adopted after the previous
/// holder died.
struct Worker {
    pid: u32,
    channel: OwnedFd,
    /// Present when this holder started the worker (and so must reap it).
    child: Option<Child>,
    /// When the worker it replaced died, to measure the takeover's stall.
    predecessor_died_at_ns: Option<u64>,
    /// It said it had finished retiring.
    retired: bool,
    /// A standby: it said it is prepared to take over.
    prepared: bool,
    /// Why it could not take over, in its own words.
    failure: Option<String>,
}

impl Worker {
    fn started(channel: OwnedFd, child: Child, predecessor_died_at_ns: Option<u64>) -> Worker {
        Worker { pid: child.id(), channel, child: Some(child), predecessor_died_at_ns, retired: false, prepared: false, failure: None }
    }

    /// Reaps the worker if it is ours: how it ended.
    fn reap(&mut self) -> Exit {
        let exit = match self.child.as_mut().map(Child::wait) {
            Some(Ok(status)) => classify(status),
            Some(Err(_)) | None => Exit::Unknown,
        };
        match (exit, self.failure.take()) {
            (Exit::Failed(how), Some(why)) => Exit::Failed(format!("{how}: {why}")),
            (exit, _) => exit,
        }
    }
}

struct Holder {
    fds: SessionFds,
    state: State,
    binary: PathBuf,
    /// What the serving slot is doing.
    slot: Lifecycle,
    /// The process in the serving slot, starting or serving; none while waiting to start one.
    worker: Option<Worker>,
    /// A worker started ahead of need, prepared to take over the moment the serving one dies:
    /// a takeover then costs no process start.
    standby: Option<Worker>,
    /// Standbys in a row that failed by themselves: after a few, none until a takeover.
    standby_failures: u32,
    /// Workers upgrades replaced, until each has finished its requests and exited.
    retiring: Vec<Worker>,
    /// An upgrade whose new worker is starting.
    upgrade: Option<Upgrade>,
    control: UnixListener,
}

/// A hot upgrade in progress: the holder keeps watching the serving worker meanwhile.
struct Upgrade {
    worker: Worker,
    binary: PathBuf,
    /// Who asked; answered when the new worker serves or has failed.
    client: UnixStream,
    deadline: Instant,
}

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
        let SessionFds { fuse, image, chunks } = fds;
        let session = Session::init(fuse)?;
        let params = *session.params();
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
        };
        let warnings = warnings(&state);
        for warning in &warnings {
            warn!("{warning}");
        }
        let fds = SessionFds { fuse: session.into_fd(), image, chunks };
        let binary = current_exe()?;
        let control = control::bind(&mountpoint)?;
        let (channel, child) = start_with_handover(&binary, Role::Worker, &state, &fds)?;
        let worker = Worker::started(channel, child, None);
        spawn_signal_thread(&mountpoint)?;
        let slot = Lifecycle::serving(worker.pid, Instant::now());
        Ok::<_, MountError>((Holder { fds, state, binary, slot, worker: Some(worker), standby: None, standby_failures: 0, retiring: Vec::new(), upgrade: None, control }, warnings))
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

/// Standbys in a row that may fail by themselves before the holder stops starting them (until
/// the next takeover or upgrade): a broken binary must not spin.
const MAX_STANDBY_FAILURES: u32 = 3;

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
    Holder { fds, state, binary, slot, worker: Some(worker), standby: None, standby_failures: 0, retiring: Vec::new(), upgrade: None, control }.run()
}

/// Which of the holder's sockets have something to say.
struct Ready {
    worker: bool,
    control: bool,
    upgrade: bool,
    standby: bool,
    /// Indexes into `retiring`.
    retiring: Vec<usize>,
}

impl Holder {
    /// Watches the serving slot, an upgrade's new worker, retiring workers and the control
    /// socket until unmounted.
    fn run(mut self) -> Result<(), MountError> {
        loop {
            let ready = self.wait()?;
            // Highest index first, so that removing one keeps the others' positions.
            for i in ready.retiring.into_iter().rev() {
                self.on_retiring_event(i);
            }
            if ready.upgrade {
                self.on_upgrade_event();
            } else if self.upgrade.as_ref().is_some_and(|u| Instant::now() >= u.deadline) {
                self.abort_upgrade(format!("no answer within {} s", START_TIMEOUT.as_secs()));
            }
            if ready.control {
                self.answer_control();
            }
            if ready.standby {
                self.on_standby_event();
            }
            if ready.worker && self.on_worker_event() {
                return Ok(());
            }
            if self.step(Event::Tick) {
                return Ok(());
            }
            self.ensure_standby();
        }
    }

    /// Starts a standby when the slot's worker serves and has finished its own takeover (so
    /// the start does not compete with it), unless standbys keep failing by themselves.
    fn ensure_standby(&mut self) {
        let settled = matches!(self.slot.phase(), Phase::Serving { .. }) && self.worker.as_ref().is_some_and(|w| w.predecessor_died_at_ns.is_none());
        if self.standby.is_some() || !settled || self.standby_failures >= MAX_STANDBY_FAILURES {
            return;
        }
        let state = State { takeover: Takeover::Standby, ..self.state.clone() };
        match launch(&self.binary, Role::Worker, &state, &self.fds) {
            Ok((channel, child)) => self.standby = Some(Worker::started(channel, child, None)),
            Err(error) => {
                self.standby_failures += 1;
                warn!(%error, "cannot start a standby worker");
            }
        }
    }

    fn on_standby_event(&mut self) {
        let Some(standby) = self.standby.as_mut() else { return };
        match handover::receive_message(standby.channel.as_fd()) {
            Ok(Some(Message::Ready { .. })) => standby.prepared = true,
            Ok(Some(Message::Failed(why))) => standby.failure = Some(why),
            Ok(Some(other)) => warn!(message = ?other, "unexpected message from the standby worker"),
            Ok(None) | Err(_) => {
                let mut standby = self.standby.take().expect("checked above");
                match standby.reap() {
                    Exit::Failed(how) => {
                        self.standby_failures += 1;
                        warn!(pid = standby.pid, how, failures = self.standby_failures, "the standby worker failed");
                    }
                    exit => info!(pid = standby.pid, how = ?exit, "the standby worker was killed"),
                }
            }
        }
    }

    /// Lets the standby go (it is of a binary an upgrade replaced).
    fn discard_standby(&mut self) {
        if let Some(child) = self.standby.take().and_then(|mut s| s.child.take()).as_mut() {
            discard(child);
        }
        self.standby_failures = 0;
    }

    /// Polls every socket until one has something to say or a deadline passes.
    fn wait(&self) -> Result<Ready, MountError> {
        let mut fds = vec![PollFd::new(self.control.as_fd(), PollFlags::POLLIN)];
        let watched: Vec<Option<BorrowedFd<'_>>> = [self.worker.as_ref(), self.upgrade.as_ref().map(|u| &u.worker), self.standby.as_ref()]
            .into_iter()
            .map(|w| w.map(|w| w.channel.as_fd()))
            .collect();
        for fd in watched.iter().flatten() {
            fds.push(PollFd::new(*fd, PollFlags::POLLIN));
        }
        fds.extend(self.retiring.iter().map(|r| PollFd::new(r.channel.as_fd(), PollFlags::POLLIN)));
        let deadline = [self.slot.deadline(), self.upgrade.as_ref().map(|u| u.deadline)].into_iter().flatten().min();
        let timeout = match deadline {
            // One millisecond late rather than early: poll rounds down.
            Some(at) => PollTimeout::try_from(at.saturating_duration_since(Instant::now()).as_millis().min(1 << 30) as i32 + 1).unwrap_or(PollTimeout::NONE),
            None => PollTimeout::NONE,
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(MountError::Io { what: "waiting for the worker".into(), source: e.into() }),
        }
        let mut events = fds.iter().map(|fd| fd.revents().is_some_and(|r| !r.is_empty()));
        let control = events.next().unwrap_or(false);
        let worker = watched[0].is_some() && events.next().unwrap_or(false);
        let upgrade = watched[1].is_some() && events.next().unwrap_or(false);
        let standby = watched[2].is_some() && events.next().unwrap_or(false);
        let retiring = events.enumerate().filter(|(_, ready)| *ready).map(|(i, _)| i).collect();
        Ok(Ready { worker, control, upgrade, standby, retiring })
    }

    /// Feeds the serving slot an event and carries out what it decides. True when the mount
    /// is gone and the holder is done.
    fn step(&mut self, event: Event) -> bool {
        let mut next = self.slot.on(event, Instant::now());
        while let Some(action) = next {
            next = match action {
                Action::Launch { died_at_ns } => self.launch_replacement(died_at_ns),
                Action::Kill { pid } => {
                    warn!(pid, "the worker did not start in time; killing it");
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    None
                }
                Action::Wait { at, failures, why } => {
                    let delay_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64;
                    warn!(failures, why, delay_ms, "workers keep failing by themselves; waiting before the next start");
                    None
                }
                Action::Finish => {
                    info!(mountpoint = %self.state.spec.mountpoint.display(), "unmounted");
                    return true;
                }
            };
        }
        false
    }

    /// Starts a worker in place of one that died (at `died_at_ns`): it asks the kernel to
    /// resend what the dead one held.
    fn launch_replacement(&mut self, died_at_ns: u64) -> Option<Action> {
        self.state.restarts += 1;
        self.state.takeover = Takeover::AfterDeath { died_at_ns };
        if let Some(pid) = self.wake_standby(died_at_ns) {
            self.slot.on(Event::Launched { pid }, Instant::now());
            return self.slot.on(Event::Ready, Instant::now());
        }
        let event = match launch(&self.binary, Role::Worker, &self.state, &self.fds) {
            Ok((channel, child)) => {
                let worker = Worker::started(channel, child, Some(died_at_ns));
                let pid = worker.pid;
                self.worker = Some(worker);
                Event::Launched { pid }
            }
            Err(e) => Event::LaunchFailed { why: e.to_string() },
        };
        self.slot.on(event, Instant::now())
    }

    /// Hands the slot to the standby, if one is prepared: its pid.
    fn wake_standby(&mut self, died_at_ns: u64) -> Option<u32> {
        if !self.standby.as_ref().is_some_and(|s| s.prepared) {
            return None;
        }
        let mut standby = self.standby.take().expect("checked above");
        let go = Message::Go { died_at_ns, history: self.state.history() };
        if let Err(error) = handover::send_message(standby.channel.as_fd(), &go) {
            warn!(%error, "the standby worker is gone; starting another worker");
            standby.reap();
            return None;
        }
        standby.predecessor_died_at_ns = Some(died_at_ns);
        self.standby_failures = 0;
        let pid = standby.pid;
        self.worker = Some(standby);
        Some(pid)
    }

    /// A message from the slot's worker, or its end. True when the holder is done.
    fn on_worker_event(&mut self) -> bool {
        let Some(worker) = self.worker.as_mut() else { return false };
        let event = match handover::receive_message(worker.channel.as_fd()) {
            Ok(Some(Message::Ready { .. })) => Event::Ready,
            Ok(Some(Message::Failed(why))) => {
                worker.failure = Some(why);
                return false;
            }
            Ok(Some(Message::FirstReply { at_ns })) => {
                if let Some(died_at) = worker.predecessor_died_at_ns.take() {
                    let stall_us = at_ns.saturating_sub(died_at) / 1000;
                    self.state.record_stall(stall_us);
                    info!(worker = worker.pid, stall_ms = stall_us as f64 / 1000.0, "takeover: first request answered after the previous worker died");
                }
                return false;
            }
            Ok(Some(Message::Unmounted)) => Event::SaidUnmounted,
            Ok(Some(other)) => {
                warn!(message = ?other, "unexpected message from the worker");
                return false;
            }
            Ok(None) | Err(_) => {
                let at_ns = monotonic_ns();
                let mut worker = self.worker.take().expect("checked above");
                let exit = worker.reap();
                let connection_ended = connection_ended(self.fds.fuse.as_fd());
                if !connection_ended {
                    warn!(pid = worker.pid, how = ?exit, restarts = self.state.restarts, "the worker died");
                }
                Event::Exited { exit, at_ns, connection_ended }
            }
        };
        self.step(event)
    }

    fn on_retiring_event(&mut self, index: usize) {
        let retiring = &mut self.retiring[index];
        match handover::receive_message(retiring.channel.as_fd()) {
            Ok(Some(Message::Retired)) => retiring.retired = true,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                let mut retiring = self.retiring.swap_remove(index);
                retiring.reap();
                if !retiring.retired {
                    // It died holding requests the kernel still waits for. Without a serving
                    // worker now, the next one to start resends anyway.
                    warn!(pid = retiring.pid, "a worker replaced by an upgrade died before it finished; asking for a resend");
                    if let Some(worker) = &self.worker {
                        if let Err(error) = handover::send_message(worker.channel.as_fd(), &Message::Resend) {
                            warn!(%error, "cannot ask the worker to resend");
                        }
                    }
                }
            }
        }
    }

    fn answer_control(&mut self) {
        let Some((client, request)) = control::accept(&self.control, self.state.spec.owner_uid) else { return };
        match request {
            Ok(ControlRequest::Upgrade { binary }) => self.start_upgrade(binary, client),
            Err(why) => control::reply(&client, &ControlReply::Refused(why)),
        }
    }

    /// Hot upgrade, first half: starts a worker from `binary` and hands it the session. The
    /// current worker serves on meanwhile, and the holder keeps watching it.
    fn start_upgrade(&mut self, binary: PathBuf, client: UnixStream) {
        if self.upgrade.is_some() {
            return control::reply(&client, &ControlReply::Refused("another upgrade is in progress; try again".into()));
        }
        let mut state = self.state.clone();
        state.takeover = Takeover::Upgrade;
        state.upgrades += 1;
        match launch(&binary, Role::Worker, &state, &self.fds) {
            Ok((channel, child)) => {
                let worker = Worker::started(channel, child, None);
                self.upgrade = Some(Upgrade { worker, binary, client, deadline: Instant::now() + START_TIMEOUT });
            }
            Err(e) => control::reply(&client, &ControlReply::Refused(format!("the new worker did not start, the old one serves on: {e}"))),
        }
    }

    /// Hot upgrade, second half: the new worker serves next to the current one, which is told
    /// to stop reading and finish what it holds. Nothing is resent, nothing answered twice.
    fn on_upgrade_event(&mut self) {
        let Some(upgrade) = &self.upgrade else { return };
        if let Err(e) = read_ready(upgrade.worker.channel.as_fd(), Role::Worker) {
            return self.abort_upgrade(e.to_string());
        }
        let upgrade = self.upgrade.take().expect("checked above");
        let pid = upgrade.worker.pid;
        let was_serving = matches!(self.slot.phase(), Phase::Serving { .. });
        if let Some(old) = self.worker.replace(upgrade.worker) {
            // If the old worker is already dead, the send fails; its death is seen as a
            // retiring worker's (resend), not as the serving worker's (restart).
            let _ = handover::send_message(old.channel.as_fd(), &Message::Retire);
            self.retiring.push(old);
        }
        self.slot = Lifecycle::serving(pid, Instant::now());
        self.state.upgrades += 1;
        let new = self.worker.as_ref().expect("just placed");
        let _ = handover::send_message(new.channel.as_fd(), &Message::History(self.state.history()));
        if !was_serving {
            // The slot's worker had died and its successor had not yet started serving: what
            // the dead one held must be resent to the upgraded worker.
            let _ = handover::send_message(new.channel.as_fd(), &Message::Resend);
        }
        info!(pid, binary = %upgrade.binary.display(), upgrades = self.state.upgrades, "upgraded");
        self.binary = upgrade.binary;
        self.discard_standby();
        control::reply(&upgrade.client, &ControlReply::Upgraded { pid });
    }

    fn abort_upgrade(&mut self, why: String) {
        let Some(mut upgrade) = self.upgrade.take() else { return };
        if let Some(child) = upgrade.worker.child.as_mut() {
            discard(child);
        }
        warn!(binary = %upgrade.binary.display(), why, "upgrade failed; the old worker serves on");
        control::reply(&upgrade.client, &ControlReply::Refused(format!("the new worker did not start, the old one serves on: {why}")));
    }
}

/// Whether the kernel has ended the connection (unmounted, or aborted): /dev/fuse then
/// polls as an error.
fn connection_ended(fuse: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fuse, PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLERR))
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
