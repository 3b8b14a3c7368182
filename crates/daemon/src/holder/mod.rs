//! The holder: keeps the session for the mount's whole life (the FUSE fd, the verified image
//! and the shared chunk memory, the negotiated parameters) and starts a worker whenever the
//! serving one dies or is upgraded. It never reads a request after INIT and never touches the
//! data path, so there is little in it that can fail. Its loop (here) only waits on sockets;
//! what a worker's end means is decided by [`lifecycle`], how processes start by [`launch`],
//! how a holder comes to hold by [`start`], the prepared standby worker is [`standby`], hot
//! upgrades are [`upgrade`], and the `upgrade` command's protocol is [`control`].

mod control;
mod launch;
mod lifecycle;
mod standby;
mod start;
mod upgrade;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Child;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{info, warn};

pub use control::request_upgrade;
pub(crate) use control::reply;
pub(crate) use launch::{discard, reap, spawn_with_channel, start_with_handover, Role};
pub(crate) use lifecycle::{Exit, START_TIMEOUT as WORKER_START_TIMEOUT};
pub(crate) use start::hold;
pub use start::run_adopting_holder;

use self::launch::launch;
use self::lifecycle::{Action, Event, Lifecycle, START_TIMEOUT};
use self::upgrade::Upgrade;
use crate::error::MountError;
use crate::handover::{self, Message, SessionFds, State, Takeover};
use crate::os::{monotonic_ns, poll_until};

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
        match (reap(self.child.as_mut()), self.failure.take()) {
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
    /// Workers started ahead of need, prepared to take over the moment the serving one dies:
    /// a takeover then costs no process start. Oldest first.
    standbys: Vec<Worker>,
    /// Standbys in a row that failed by themselves: after a few, none until a takeover.
    standby_failures: u32,
    /// Workers upgrades replaced, until each has finished its requests and exited.
    retiring: Vec<Worker>,
    /// An upgrade whose new worker is starting.
    upgrade: Option<Upgrade>,
    control: UnixListener,
}

/// Which of the holder's sockets have something to say.
struct Ready {
    worker: bool,
    control: bool,
    upgrade: bool,
    /// Pids of standbys, not indexes: the handlers before theirs may change the list
    /// (an upgrade discards every standby).
    standbys: Vec<u32>,
    /// Pids of retiring workers.
    retiring: Vec<u32>,
}

impl Holder {
    /// Watches the serving slot, an upgrade's new worker, retiring workers and the control
    /// socket until unmounted.
    fn run(mut self) -> Result<(), MountError> {
        loop {
            self.ensure_standby();
            let ready = self.wait()?;
            for pid in ready.retiring {
                self.on_retiring_event(pid);
            }
            if ready.upgrade {
                self.on_upgrade_event();
            } else if self.upgrade.as_ref().is_some_and(|u| Instant::now() >= u.deadline) {
                self.abort_upgrade(format!("no answer within {} s", START_TIMEOUT.as_secs()));
            }
            if ready.control {
                self.answer_control();
            }
            for pid in ready.standbys {
                self.on_standby_event(pid);
            }
            if ready.worker && self.on_worker_event() {
                return Ok(());
            }
            if self.step(Event::Tick) {
                return Ok(());
            }
        }
    }

    /// Polls every socket until one has something to say or a deadline passes.
    fn wait(&self) -> Result<Ready, MountError> {
        let mut fds = vec![PollFd::new(self.control.as_fd(), PollFlags::POLLIN)];
        let watched: Vec<Option<BorrowedFd<'_>>> = [self.worker.as_ref(), self.upgrade.as_ref().map(|u| &u.worker)]
            .into_iter()
            .map(|w| w.map(|w| w.channel.as_fd()))
            .collect();
        for fd in watched.iter().flatten() {
            fds.push(PollFd::new(*fd, PollFlags::POLLIN));
        }
        fds.extend(self.standbys.iter().chain(&self.retiring).map(|w| PollFd::new(w.channel.as_fd(), PollFlags::POLLIN)));
        let deadline = [self.slot.deadline(), self.upgrade.as_ref().map(|u| u.deadline)].into_iter().flatten().min();
        let ready = poll_until(&mut fds, deadline).map_err(|e| MountError::Io { what: "waiting for the worker".into(), source: e.into() })?;
        let mut events = ready.into_iter();
        let control = events.next().unwrap_or(false);
        let worker = watched[0].is_some() && events.next().unwrap_or(false);
        let upgrade = watched[1].is_some() && events.next().unwrap_or(false);
        let ready_pids = |events: &mut std::vec::IntoIter<bool>, workers: &[Worker]| workers.iter().zip(events).filter(|(_, ready)| *ready).map(|(w, _)| w.pid).collect();
        let standbys = ready_pids(&mut events, &self.standbys);
        let retiring = ready_pids(&mut events, &self.retiring);
        Ok(Ready { worker, control, upgrade, standbys, retiring })
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

    fn on_retiring_event(&mut self, pid: u32) {
        let Some(index) = self.retiring.iter().position(|w| w.pid == pid) else { return };
        let retiring = &mut self.retiring[index];
        match handover::receive_message(retiring.channel.as_fd()) {
            Ok(Some(Message::Retired)) => retiring.retired = true,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                let mut retiring = self.retiring.remove(index);
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

}

/// Whether the kernel has ended the connection (unmounted, or aborted): /dev/fuse then
/// polls as an error.
fn connection_ended(fuse: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fuse, PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLERR))
}

