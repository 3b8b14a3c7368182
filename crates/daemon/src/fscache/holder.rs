//! The fscache daemon's holder: opens and binds `/dev/cachefiles`, keeps its fd (while any
//! process holds one, the cache stays bound and the kernel queues requests), answers the
//! control socket, and starts a worker whenever the serving one dies: at once after a kill,
//! with a growing delay when workers keep failing by themselves. It never reads a request.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};
use phoenixfs_cachefiles::{Device, DeviceError};
use tracing::{info, warn};

use super::control::{self, ControlReply, ControlRequest, DaemonStatus, WorkerStats};
use super::registry::{self, Registration};
use super::{control_socket_path, hand_over, take_over, worker_stats_path, DaemonState, ImageMemfds, Takeover, CACHE_TAG, FSCACHE_DIR};
use crate::error::MountError;
use crate::handover::{self, History, Message};
use crate::histogram::DurationHistogram;
use crate::holder::{discard, reap, reply as reply_to, spawn_with_channel, Exit, Role, WORKER_START_TIMEOUT};
use crate::os::{bind_fresh, monotonic_ns, poll_until, set_cloexec};

/// A worker that lived this long before failing was not failing at start-up.
const HEALTHY_AFTER: Duration = Duration::from_secs(1);

/// Standbys in a row that may fail by themselves before no more are started (until the next
/// takeover or upgrade): a broken binary must not spin.
const MAX_STANDBY_FAILURES: u32 = 3;

struct Worker {
    pid: u32,
    channel: OwnedFd,
    /// Present when this holder started it (and so must reap it).
    child: Option<Child>,
    started: Instant,
    /// It said it serves.
    serving: bool,
}

impl Worker {
    /// Ends it for good: killed and reaped if we started it, killed if adopted.
    fn discard(mut self) {
        match self.child.as_mut() {
            Some(child) => discard(child),
            None => {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

struct Holder {
    device: OwnedFd,
    /// The registered images' sealed memfds, by mountpoint (`state.images` lists them).
    images: ImageMemfds,
    state: DaemonState,
    binary: PathBuf,
    worker: Option<Worker>,
    /// A worker started ahead of need, prepared to take over (`serving` here means prepared)
    /// the moment the serving one dies: a takeover then costs a message, not a process start.
    standby: Option<Worker>,
    /// Standbys in a row that failed by themselves: after a few, none until a takeover.
    standby_failures: u32,
    control: UnixListener,
    /// Workers in a row that failed by themselves soon after starting.
    failures: u32,
    /// When to start the next worker, while none serves.
    next_start: Option<Instant>,
}

/// `phoenixfs fscache-daemon`: binds the cache and holds it until shut down.
pub fn run_fscache_daemon(cache_dir: &Path, log_level: u8) -> Result<(), MountError> {
    let io = |what: String| move |source: std::io::Error| MountError::Io { what, source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(FSCACHE_DIR).map_err(io(format!("creating {FSCACHE_DIR}")))?;
    std::fs::create_dir_all(cache_dir).map_err(io(format!("creating {}", cache_dir.display())))?;
    let device = open_device()?;
    device.bind_ondemand(cache_dir, CACHE_TAG)?;
    let state = DaemonState { cache_dir: cache_dir.to_path_buf(), holder_pid: std::process::id(), takeover: Takeover::AfterStart, restarts: 0, upgrades: 0, log_level, images: Vec::new() };
    let binary = std::env::current_exe().map_err(io("finding this binary".into()))?;
    let device = OwnedFd::from(device);
    // The first worker must start (it checks `restore`); the socket appears only then, so a
    // client that finds it finds a daemon that can serve.
    let mut worker = launch(&binary, &state, device.as_fd(), &[])?;
    match handover::receive_message(worker.channel.as_fd()) {
        Ok(Some(Message::Ready { .. })) => worker.serving = true,
        Ok(Some(Message::Failed(why))) => return Err(MountError::Refused(why)),
        other => return Err(MountError::Refused(format!("the first fscache worker did not start: {other:?}"))),
    }
    let control = bind_control()?;
    info!(cache_dir = %cache_dir.display(), "fscache daemon bound the cache");
    Holder { device, images: Vec::new(), state, binary, worker: Some(worker), standby: None, standby_failures: 0, control, failures: 0, next_start: None }.run()
}

/// The hidden `fscache-holder` subcommand: started by a worker whose holder died; takes the
/// device fd and the state from it (fd 3) and holds from then on.
pub fn run_adopting_fscache_holder() -> Result<(), MountError> {
    // SAFETY: the worker started this process with the hand-over socket as fd 3, and nothing
    // else in this process owns fd 3.
    let channel = unsafe { OwnedFd::from_raw_fd(3) };
    set_cloexec(channel.as_fd());
    let adopted = (|| {
        let (mut state, device, images) = take_over(channel.as_fd())?;
        let worker_pid = handover::check_peer(channel.as_fd(), 0)?;
        state.holder_pid = std::process::id();
        let binary = std::env::current_exe().map_err(|source| MountError::Io { what: "finding this binary".into(), source })?;
        let control = bind_control()?;
        Ok::<_, MountError>((state, device, images, binary, control, worker_pid))
    })();
    let (state, device, images, binary, control, worker_pid) = match adopted {
        Ok(adopted) => adopted,
        Err(e) => {
            let _ = handover::send_message(channel.as_fd(), &Message::Failed(e.to_string()));
            return Err(e);
        }
    };
    let _ = handover::send_message(channel.as_fd(), &Message::Ready { pid: std::process::id() });
    warn!(worker = worker_pid, "the previous fscache holder died; this one holds the cache now");
    let worker = Worker { pid: worker_pid, channel, child: None, started: Instant::now(), serving: true };
    Holder { device, images, state, binary, worker: Some(worker), standby: None, standby_failures: 0, control, failures: 0, next_start: None }.run()
}

/// Opens `/dev/cachefiles`, waiting a little while a daemon that is shutting down lets go.
fn open_device() -> Result<Device, MountError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Device::open(Path::new("/dev/cachefiles")) {
            Err(DeviceError::Busy) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            other => return Ok(other?),
        }
    }
}

fn bind_control() -> Result<UnixListener, MountError> {
    bind_fresh(&control_socket_path())
}

/// Starts `binary fscache-worker` and hands it the state, the device fd and the images'
/// memfds.
fn launch(binary: &Path, state: &DaemonState, device: BorrowedFd<'_>, images: &[(PathBuf, OwnedFd)]) -> Result<Worker, MountError> {
    let (channel, mut child) = spawn_with_channel(binary, Role::FscacheWorker, state.log_level)?;
    let images: Vec<(PathBuf, RawFd)> = images.iter().map(|(mountpoint, fd)| (mountpoint.clone(), fd.as_raw_fd())).collect();
    if let Err(e) = hand_over(channel.as_fd(), state, device, &images) {
        discard(&mut child);
        return Err(e.into());
    }
    Ok(Worker { pid: child.id(), channel, child: Some(child), started: Instant::now(), serving: false })
}

/// Waits up to `timeout` for a message from a worker; `None` if none came or it died.
fn await_message(channel: BorrowedFd<'_>, timeout: Duration) -> Option<Message> {
    let mut fds = [PollFd::new(channel, PollFlags::POLLIN)];
    match poll_until(&mut fds, Some(Instant::now() + timeout)) {
        Ok(ready) if ready == [true] => handover::receive_message(channel).ok().flatten(),
        _ => None,
    }
}

impl Holder {
    fn run(mut self) -> Result<(), MountError> {
        loop {
            if self.worker.is_none() && self.next_start.is_none_or(|at| Instant::now() >= at) {
                self.start_worker();
            }
            self.ensure_standby();
            let (worker_ready, standby_ready, control_ready) = self.wait()?;
            if standby_ready {
                self.on_standby_event();
            }
            if worker_ready {
                self.on_worker_event();
            }
            if control_ready && self.answer_control() {
                return Ok(());
            }
        }
    }

    fn start_worker(&mut self) {
        self.next_start = None;
        match launch(&self.binary, &self.state, self.device.as_fd(), &self.images) {
            Ok(worker) => self.worker = Some(worker),
            Err(error) => {
                warn!(%error, "cannot start an fscache worker");
                self.failed_by_itself();
            }
        }
    }

    /// Starts a standby when the serving worker serves and none is there, unless standbys
    /// keep failing by themselves.
    fn ensure_standby(&mut self) {
        let serving = self.worker.as_ref().is_some_and(|w| w.serving);
        if !serving || self.standby.is_some() || self.standby_failures >= MAX_STANDBY_FAILURES {
            return;
        }
        let state = DaemonState { takeover: Takeover::OnGo, ..self.state.clone() };
        match launch(&self.binary, &state, self.device.as_fd(), &self.images) {
            Ok(standby) => self.standby = Some(standby),
            Err(error) => {
                self.standby_failures += 1;
                warn!(%error, "cannot start a standby fscache worker");
            }
        }
    }

    fn on_standby_event(&mut self) {
        let Some(standby) = self.standby.as_mut() else { return };
        match handover::receive_message(standby.channel.as_fd()) {
            Ok(Some(Message::Ready { .. })) => standby.serving = true,
            Ok(Some(Message::Failed(why))) => warn!(pid = standby.pid, why, "the standby fscache worker could not start"),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                let mut standby = self.standby.take().expect("checked above");
                match reap(standby.child.as_mut()) {
                    Exit::Failed(how) => {
                        self.standby_failures += 1;
                        warn!(pid = standby.pid, how, failures = self.standby_failures, "the standby fscache worker failed");
                    }
                    exit => info!(pid = standby.pid, how = ?exit, "the standby fscache worker was killed"),
                }
            }
        }
    }

    /// Hands the serving slot to the prepared standby, if there is one: it `restore`s and
    /// serves.
    fn wake_standby(&mut self) -> bool {
        if !self.standby.as_ref().is_some_and(|s| s.serving) {
            return false;
        }
        let mut standby = self.standby.take().expect("checked above");
        if let Err(error) = handover::send_message(standby.channel.as_fd(), &self.go()) {
            warn!(%error, "the standby fscache worker is gone; starting another worker");
            standby.discard();
            return false;
        }
        standby.started = Instant::now();
        self.standby_failures = 0;
        info!(pid = standby.pid, "the standby fscache worker took over");
        self.worker = Some(standby);
        true
    }

    /// Lets the standby go (it is of a binary an upgrade replaces, or the daemon stops).
    fn discard_standby(&mut self) {
        if let Some(standby) = self.standby.take() {
            standby.discard();
        }
        self.standby_failures = 0;
    }

    /// Tells a prepared worker to take over.
    fn go(&self) -> Message {
        Message::Go { died_at_ns: monotonic_ns(), history: History { restarts: self.state.restarts, upgrades: self.state.upgrades, stalls_us: Vec::new(), takeovers_measured: 0, stall_histogram: DurationHistogram::takeover_stalls() } }
    }

    /// Polls the control socket and the workers' channels until one speaks or the next start
    /// is due: (serving worker, standby, control).
    fn wait(&self) -> Result<(bool, bool, bool), MountError> {
        let mut fds = vec![PollFd::new(self.control.as_fd(), PollFlags::POLLIN)];
        let watched = [self.worker.as_ref(), self.standby.as_ref()];
        fds.extend(watched.iter().flatten().map(|w| PollFd::new(w.channel.as_fd(), PollFlags::POLLIN)));
        let ready = poll_until(&mut fds, self.next_start).map_err(|e| MountError::Io { what: "waiting on the fscache worker".into(), source: e.into() })?;
        let mut ready = ready.into_iter();
        let control = ready.next().unwrap_or(false);
        let worker = watched[0].is_some() && ready.next().unwrap_or(false);
        let standby = watched[1].is_some() && ready.next().unwrap_or(false);
        Ok((worker, standby, control))
    }

    fn on_worker_event(&mut self) {
        let Some(worker) = self.worker.as_mut() else { return };
        match handover::receive_message(worker.channel.as_fd()) {
            Ok(Some(Message::Failed(why))) => warn!(pid = worker.pid, why, "the fscache worker could not start"),
            Ok(Some(Message::Ready { .. })) => worker.serving = true,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                let mut worker = self.worker.take().expect("checked above");
                let exit = reap(worker.child.as_mut());
                self.state.restarts += 1;
                self.state.takeover = Takeover::AfterStart;
                warn!(pid = worker.pid, how = ?exit, restarts = self.state.restarts, "the fscache worker died");
                match exit {
                    Exit::Failed(_) if worker.started.elapsed() < HEALTHY_AFTER => self.failed_by_itself(),
                    _ => self.failures = 0,
                }
                self.wake_standby();
            }
        }
    }

    /// Two free retries, then 20 ms doubling up to 5 s: a broken binary must not spin.
    fn failed_by_itself(&mut self) {
        self.failures += 1;
        let delay = match self.failures {
            0..=2 => Duration::ZERO,
            n => (Duration::from_millis(20) * 2u32.saturating_pow(n - 3)).min(Duration::from_secs(5)),
        };
        self.next_start = Some(Instant::now() + delay);
    }

    /// Answers one control request. True when the daemon is to exit.
    fn answer_control(&mut self) -> bool {
        let Ok((stream, _)) = self.control.accept() else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut attached = Vec::new();
        let request = match handover::check_peer(stream.as_fd(), 0) {
            Err(e) => Err(e.to_string()),
            Ok(_) => control::read_request(&stream).map_err(|e| format!("reading the request: {e}")).and_then(|(line, fds)| {
                attached = fds;
                serde_json::from_str::<ControlRequest>(&line).map_err(|e| format!("bad request: {e}"))
            }),
        };
        let mut shutdown = false;
        let reply = match request {
            Err(why) => ControlReply::Refused(why),
            Ok(ControlRequest::Register(registration)) => match attached.pop() {
                Some(memfd) => self.register(registration, memfd),
                None => ControlReply::Refused("a registration comes with the image's sealed memfd".into()),
            },
            Ok(ControlRequest::Unregister { mountpoint }) => self.unregister(&mountpoint),
            Ok(ControlRequest::Status) => ControlReply::Status(self.status()),
            Ok(ControlRequest::Upgrade { binary }) => match self.upgrade(binary) {
                Ok(pid) => ControlReply::Upgraded { pid },
                Err(why) => ControlReply::Refused(why),
            },
            Ok(ControlRequest::Shutdown) => {
                let images = registry::all();
                if images.is_empty() {
                    shutdown = true;
                    ControlReply::Done
                } else {
                    ControlReply::Refused(format!("{} image(s) are still mounted through the daemon (first: {})", images.len(), images[0].mountpoint.display()))
                }
            }
        };
        if shutdown {
            // Gone from the socket first, so that the next mount starts a new daemon.
            let _ = std::fs::remove_file(control_socket_path());
            self.discard_standby();
            self.retire_worker();
            info!("fscache daemon shut down; the cache is unbound");
        }
        reply_to(&stream, &reply);
        shutdown
    }

    /// Records the image, keeps its memfd and hands it to the serving worker.
    fn register(&mut self, registration: Registration, memfd: OwnedFd) -> ControlReply {
        if let Err(e) = registry::save(&registration) {
            return ControlReply::Refused(format!("recording the image: {e}"));
        }
        let mountpoint = registration.mountpoint;
        self.images.retain(|(m, _)| *m != mountpoint);
        let added = Message::ImageAdded { mountpoint: mountpoint.clone() };
        for worker in [&self.worker, &self.standby].into_iter().flatten() {
            if let Err(error) = handover::send_message_with_fds(worker.channel.as_fd(), &added, &[memfd.as_raw_fd()]) {
                // It is dying; its successor gets every image at its start.
                warn!(%error, pid = worker.pid, "cannot hand a worker a new image");
            }
        }
        self.images.push((mountpoint, memfd));
        ControlReply::Done
    }

    fn unregister(&mut self, mountpoint: &Path) -> ControlReply {
        if let Err(e) = registry::remove(mountpoint) {
            return ControlReply::Refused(format!("forgetting the image: {e}"));
        }
        self.images.retain(|(m, _)| m != mountpoint);
        for worker in [&self.worker, &self.standby].into_iter().flatten() {
            let _ = handover::send_message(worker.channel.as_fd(), &Message::ImageRemoved { mountpoint: mountpoint.to_path_buf() });
        }
        ControlReply::Done
    }

    fn status(&self) -> DaemonStatus {
        let worker: Option<WorkerStats> = std::fs::read(worker_stats_path()).ok().and_then(|b| serde_json::from_slice(&b).ok());
        DaemonStatus {
            holder_pid: std::process::id(),
            worker_pid: self.worker.as_ref().filter(|w| w.serving).map(|w| w.pid),
            standby_pid: self.standby.as_ref().filter(|w| w.serving).map(|w| w.pid),
            restarts: self.state.restarts,
            upgrades: self.state.upgrades,
            cache_dir: self.state.cache_dir.clone(),
            images: registry::all(),
            worker,
        }
    }

    /// Starts a worker from `binary`, prepared but not reading; then retires the serving one
    /// (it finishes what it read and exits), and lets the new one `restore` and serve: what
    /// the old one never read is still queued in the kernel, objects it had open are re-opened.
    fn upgrade(&mut self, binary: PathBuf) -> Result<u32, String> {
        if self.worker.is_none() {
            return Err("no fscache worker serves right now (one is starting); try again".into());
        }
        self.discard_standby();
        let state = DaemonState { takeover: Takeover::OnGo, ..self.state.clone() };
        let mut new = launch(&binary, &state, self.device.as_fd(), &self.images).map_err(|e| e.to_string())?;
        match await_message(new.channel.as_fd(), WORKER_START_TIMEOUT) {
            Some(Message::Ready { .. }) => {}
            other => {
                new.discard();
                return Err(format!("the new worker did not start, the old one serves on: {other:?}"));
            }
        }
        self.retire_worker();
        self.state.upgrades += 1;
        if let Err(e) = handover::send_message(new.channel.as_fd(), &self.go()) {
            warn!(error = %e, "the upgraded worker died before it served");
        }
        self.binary = binary;
        let pid = new.pid;
        new.started = Instant::now();
        new.serving = true;
        self.worker = Some(new);
        info!(pid, binary = %self.binary.display(), "fscache worker upgraded");
        Ok(pid)
    }

    /// Tells the serving worker to finish and exit, and waits for it (killing it after the
    /// start timeout: what it held is then delivered again by `restore`).
    fn retire_worker(&mut self) {
        let Some(old) = self.worker.take() else { return };
        let _ = handover::send_message(old.channel.as_fd(), &Message::Retire);
        let deadline = Instant::now() + WORKER_START_TIMEOUT;
        while Instant::now() < deadline {
            match await_message(old.channel.as_fd(), deadline.saturating_duration_since(Instant::now())) {
                Some(Message::Retired) | None => break,
                Some(_) => {}
            }
        }
        old.discard();
    }
}
