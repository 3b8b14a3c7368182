//! The holder: keeps the FUSE fd and the session state for the mount's whole life, and
//! starts a worker whenever the serving one dies or is upgraded. It never reads a request
//! after INIT and never touches the data path, so there is little in it that can fail.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{umount2, MntFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use phoenixfs_fuse::Session;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::control;
use crate::handover::{self, monotonic_ns, Message, State, Takeover};
use crate::mount::{set_kernel_readahead, spawn_thread, MountError, MountSpec};

/// How long a starting worker may take to say it serves.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What `phoenixfs upgrade` asks of a holder, one JSON line on its control socket.
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlRequest {
    Upgrade { binary: PathBuf },
}

/// The holder's one-line JSON answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReply {
    Upgraded { pid: u32 },
    Refused(String),
}

/// A worker this holder watches: started by it, or adopted after the previous holder died.
struct Worker {
    pid: u32,
    channel: OwnedFd,
    /// Present when this holder started the worker (and so must reap it).
    child: Option<Child>,
    /// It has answered a request.
    answered: bool,
    /// When the worker it replaced died, to measure the takeover stall.
    predecessor_died_at_ns: Option<u64>,
    unmounted: bool,
    retired: bool,
}

impl Worker {
    fn started(channel: OwnedFd, child: Child, predecessor_died_at_ns: Option<u64>) -> Worker {
        Worker { pid: child.id(), channel, child: Some(child), answered: false, predecessor_died_at_ns, unmounted: false, retired: false }
    }

    /// Reaps the worker if it is ours; how it ended, for the log.
    fn reap(&mut self) -> String {
        match self.child.as_mut().map(Child::wait) {
            Some(Ok(status)) => status.to_string(),
            Some(Err(e)) => format!("unknown ({e})"),
            None => "unknown (not our child)".into(),
        }
    }
}

struct Holder {
    fuse: OwnedFd,
    state: State,
    binary: PathBuf,
    worker: Worker,
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
pub fn hold(spec: MountSpec, fd: OwnedFd, ready: Option<OwnedFd>) -> Result<(), MountError> {
    let mountpoint = spec.mountpoint.clone();
    let report = |ready: Option<OwnedFd>, message: &str| {
        if let Some(ready) = ready {
            let _ = nix::unistd::write(&ready, message.as_bytes());
        }
    };
    let started = (|| {
        let session = Session::init(fd)?;
        let params = *session.params();
        set_kernel_readahead(&mountpoint);
        let state = State { params, spec, restarts: 0, upgrades: 0, holder_pid: std::process::id(), takeover: Takeover::First, stalls_us: Vec::new(), takeovers_measured: 0 };
        let warnings = warnings(&state);
        for warning in &warnings {
            warn!("{warning}");
        }
        let binary = std::env::current_exe().map_err(|source| MountError::Io { what: "finding this binary".into(), source })?;
        let control = bind_control(&mountpoint)?;
        let worker = start_worker(&binary, &state, session.fd())?;
        spawn_signal_thread(&mountpoint)?;
        Ok::<_, MountError>((Holder { fuse: session.into_fd(), state, binary, worker, retiring: Vec::new(), upgrade: None, control }, warnings))
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

/// Request timeouts below this could abort a mount during a takeover or a slow fetch.
const MIN_SAFE_REQUEST_TIMEOUT_S: u64 = 60;

/// A holder started by a worker whose holder died (the hidden `holder` subcommand): takes
/// the fd and state from that worker (fd 3) and holds from then on.
pub fn run_adopting_holder() -> Result<(), MountError> {
    // SAFETY: the worker started this process with the hand-over socket as fd 3, and
    // nothing else in this process owns fd 3.
    let channel = unsafe { OwnedFd::from_raw_fd(3) };
    set_cloexec(channel.as_fd());
    let answer = |message: &Message| {
        let _ = handover::send_message(channel.as_fd(), message);
    };
    let adopted = (|| {
        let (mut state, fuse) = handover::receive(channel.as_fd())?;
        let worker_pid = handover::check_peer(channel.as_fd(), state.spec.owner_uid)?;
        control::redirect_stdio(&state.spec.mountpoint);
        state.holder_pid = std::process::id();
        let binary = std::env::current_exe().map_err(|source| MountError::Io { what: "finding this binary".into(), source })?;
        let control = bind_control(&state.spec.mountpoint)?;
        spawn_signal_thread(&state.spec.mountpoint)?;
        Ok::<_, MountError>((state, fuse, binary, control, worker_pid))
    })();
    let (state, fuse, binary, control, worker_pid) = match adopted {
        Ok(adopted) => adopted,
        Err(e) => {
            answer(&Message::Failed(e.to_string()));
            return Err(e);
        }
    };
    answer(&Message::Ready { pid: std::process::id() });
    warn!(worker = worker_pid, "the previous holder died; this one holds the mount now");
    let worker = Worker { pid: worker_pid, channel, child: None, answered: true, predecessor_died_at_ns: None, unmounted: false, retired: false };
    Holder { fuse, state, binary, worker, retiring: Vec::new(), upgrade: None, control }.run()
}

impl Holder {
    /// Watches the worker, an upgrade's new worker, retiring workers and the control socket
    /// until unmounted.
    fn run(mut self) -> Result<(), MountError> {
        let mut failed_starts = 0u32;
        loop {
            let (worker_event, control_event, upgrade_event, retiring_events) = {
                let mut fds = vec![PollFd::new(self.worker.channel.as_fd(), PollFlags::POLLIN), PollFd::new(self.control.as_fd(), PollFlags::POLLIN)];
                if let Some(upgrade) = &self.upgrade {
                    fds.push(PollFd::new(upgrade.worker.channel.as_fd(), PollFlags::POLLIN));
                }
                fds.extend(self.retiring.iter().map(|r| PollFd::new(r.channel.as_fd(), PollFlags::POLLIN)));
                let timeout = match &self.upgrade {
                    Some(upgrade) => PollTimeout::try_from(upgrade.deadline.saturating_duration_since(Instant::now()).as_millis() as i32).unwrap_or(PollTimeout::NONE),
                    None => PollTimeout::NONE,
                };
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(MountError::Io { what: "waiting for the worker".into(), source: e.into() }),
                }
                let ready: Vec<bool> = fds.iter().map(|fd| fd.revents().is_some_and(|r| !r.is_empty())).collect();
                let upgrade_event = self.upgrade.is_some() && ready[2];
                let first_retiring = 2 + usize::from(self.upgrade.is_some());
                let retiring_events: Vec<usize> = (0..self.retiring.len()).filter(|&i| ready[first_retiring + i]).collect();
                (ready[0], ready[1], upgrade_event, retiring_events)
            };
            // Highest index first, so that removing one keeps the others' positions.
            for i in retiring_events.into_iter().rev() {
                self.on_retiring_event(i);
            }
            if upgrade_event {
                self.on_upgrade_event();
            } else if self.upgrade.as_ref().is_some_and(|u| Instant::now() >= u.deadline) {
                self.abort_upgrade(format!("the worker did not start within {} s", START_TIMEOUT.as_secs()));
            }
            if control_event {
                self.answer_control();
            }
            if !worker_event {
                continue;
            }
            match handover::receive_message(self.worker.channel.as_fd()) {
                Ok(Some(Message::FirstReply { at_ns })) => {
                    self.worker.answered = true;
                    if let Some(died_at) = self.worker.predecessor_died_at_ns {
                        let stall_us = at_ns.saturating_sub(died_at) / 1000;
                        self.state.record_stall(stall_us);
                        info!(worker = self.worker.pid, stall_ms = stall_us as f64 / 1000.0, "takeover: first request answered after the previous worker died");
                    }
                }
                Ok(Some(Message::Unmounted)) => self.worker.unmounted = true,
                Ok(Some(other)) => warn!(message = ?other, "unexpected message from the worker"),
                Ok(None) | Err(_) => {
                    let died_at_ns = monotonic_ns();
                    let how = self.worker.reap();
                    if self.worker.unmounted || connection_ended(self.fuse.as_fd()) {
                        info!(mountpoint = %self.state.spec.mountpoint.display(), "unmounted");
                        return Ok(());
                    }
                    self.state.restarts += 1;
                    warn!(pid = self.worker.pid, how, restarts = self.state.restarts, "worker died; starting another");
                    // A worker that died before answering anything may be failing at start-up:
                    // back off if that repeats. One that served is replaced at once.
                    if self.worker.answered {
                        failed_starts = 0;
                    } else {
                        failed_starts += 1;
                        if failed_starts > 2 {
                            std::thread::sleep(Duration::from_millis(10 << failed_starts.min(7)));
                        }
                    }
                    self.worker = self.replace_dead_worker(died_at_ns);
                }
            }
        }
    }

    /// Starts workers until one serves: the mount must outlive any number of failures.
    fn replace_dead_worker(&mut self, died_at_ns: u64) -> Worker {
        let mut attempt = 0u32;
        loop {
            self.state.takeover = Takeover::AfterDeath { died_at_ns };
            match start_worker(&self.binary, &self.state, self.fuse.as_fd()) {
                Ok(worker) => return worker,
                Err(e) => {
                    attempt += 1;
                    warn!(error = %e, attempt, "cannot start a worker; retrying");
                    std::thread::sleep(Duration::from_millis(50 << attempt.min(6)));
                }
            }
        }
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
                    // It died holding requests the kernel still waits for.
                    warn!(pid = retiring.pid, "a worker replaced by an upgrade died before it finished; asking for a resend");
                    if let Err(error) = handover::send_message(self.worker.channel.as_fd(), &Message::Resend) {
                        warn!(%error, "cannot ask the worker to resend");
                    }
                }
            }
        }
    }

    fn answer_control(&mut self) {
        let Ok((stream, _)) = self.control.accept() else { return };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let refused = match handover::check_peer(stream.as_fd(), self.state.spec.owner_uid) {
            Err(e) => e.to_string(),
            Ok(_) => {
                let mut line = String::new();
                let _ = BufReader::new(&stream).read_line(&mut line);
                match serde_json::from_str(&line) {
                    Ok(ControlRequest::Upgrade { binary }) => match self.start_upgrade(binary, stream) {
                        Ok(()) => return,
                        Err((why, stream)) => return reply(&stream, &ControlReply::Refused(why)),
                    },
                    Err(e) => format!("bad request: {e}"),
                }
            }
        };
        reply(&stream, &ControlReply::Refused(refused));
    }

    /// Hot upgrade, first half: starts a worker from `binary` and hands it the fd and state.
    /// The current worker serves on meanwhile, and the holder keeps watching it.
    fn start_upgrade(&mut self, binary: PathBuf, client: UnixStream) -> Result<(), (String, UnixStream)> {
        if self.upgrade.is_some() {
            return Err(("another upgrade is in progress; try again".into(), client));
        }
        let mut state = self.state.clone();
        state.takeover = Takeover::Upgrade;
        state.upgrades += 1;
        match launch(&binary, "worker", &state, self.fuse.as_fd()) {
            Ok((channel, child)) => {
                let worker = Worker::started(channel, child, None);
                self.upgrade = Some(Upgrade { worker, binary, client, deadline: Instant::now() + START_TIMEOUT });
                Ok(())
            }
            Err(e) => Err((format!("the new worker did not start, the old one serves on: {e}"), client)),
        }
    }

    /// Hot upgrade, second half: the new worker serves next to the current one, which is told
    /// to stop reading and finish what it holds. Nothing is resent, nothing answered twice.
    fn on_upgrade_event(&mut self) {
        let Some(upgrade) = &self.upgrade else { return };
        match read_ready(upgrade.worker.channel.as_fd(), "worker") {
            Ok(()) => {
                let upgrade = self.upgrade.take().expect("checked above");
                let pid = upgrade.worker.pid;
                let old = std::mem::replace(&mut self.worker, upgrade.worker);
                // If the old worker is already dead, the send fails; its death is seen as a
                // retiring worker's (resend), not as the serving worker's (restart).
                let _ = handover::send_message(old.channel.as_fd(), &Message::Retire);
                self.retiring.push(old);
                self.state.upgrades += 1;
                let history = Message::History {
                    restarts: self.state.restarts,
                    upgrades: self.state.upgrades,
                    stalls_us: self.state.stalls_us.clone(),
                    takeovers_measured: self.state.takeovers_measured,
                };
                let _ = handover::send_message(self.worker.channel.as_fd(), &history);
                info!(pid, binary = %upgrade.binary.display(), upgrades = self.state.upgrades, "upgraded");
                self.binary = upgrade.binary;
                reply(&upgrade.client, &ControlReply::Upgraded { pid });
            }
            Err(e) => self.abort_upgrade(e.to_string()),
        }
    }

    fn abort_upgrade(&mut self, why: String) {
        let Some(mut upgrade) = self.upgrade.take() else { return };
        if let Some(child) = upgrade.worker.child.as_mut() {
            discard(child);
        }
        warn!(binary = %upgrade.binary.display(), why, "upgrade failed; the old worker serves on");
        reply(&upgrade.client, &ControlReply::Refused(format!("the new worker did not start, the old one serves on: {why}")));
    }
}

fn reply(client: &UnixStream, reply: &ControlReply) {
    let mut body = serde_json::to_vec(reply).expect("reply serialises");
    body.push(b'\n');
    let _ = (&*client).write_all(&body);
}

/// Starts `binary worker` with a hand-over socket as its fd 3, hands it the state and the
/// FUSE fd, and waits until it serves. On failure nothing is left running.
fn start_worker(binary: &Path, state: &State, fuse: BorrowedFd<'_>) -> Result<Worker, MountError> {
    let (channel, child) = start_with_handover(binary, "worker", state, fuse)?;
    let predecessor_died_at_ns = match state.takeover {
        Takeover::AfterDeath { died_at_ns } => Some(died_at_ns),
        Takeover::First | Takeover::Upgrade => None,
    };
    Ok(Worker::started(channel, child, predecessor_died_at_ns))
}

/// Starts `binary subcommand` (a worker, or a holder to replace a dead one), hands it the
/// state and the FUSE fd, and waits until it says it has taken over. Returns our end of the
/// socket to it. On failure nothing is left running.
pub(crate) fn start_with_handover(binary: &Path, subcommand: &str, state: &State, fuse: BorrowedFd<'_>) -> Result<(OwnedFd, Child), MountError> {
    let (channel, mut child) = launch(binary, subcommand, state, fuse)?;
    if let Err(e) = await_ready(channel.as_fd(), subcommand) {
        discard(&mut child);
        return Err(e);
    }
    Ok((channel, child))
}

/// Starts `binary subcommand` and hands it the state and the FUSE fd; does not wait for it.
fn launch(binary: &Path, subcommand: &str, state: &State, fuse: BorrowedFd<'_>) -> Result<(OwnedFd, Child), MountError> {
    // A holder must outlive the worker that starts it: a session of its own.
    let detach = subcommand == "holder";
    let (channel, mut child) = spawn_with_channel(binary, subcommand, state.spec.log_level, detach)?;
    if let Err(e) = handover::send(channel.as_fd(), state, fuse) {
        discard(&mut child);
        return Err(e.into());
    }
    Ok((channel, child))
}

/// Kills and reaps a process that failed to take over, so nothing of it is left.
fn discard(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts `binary [-v..] subcommand` with one end of a new SEQPACKET socket pair as its
/// fd 3; returns our end. `detach` puts it in a session of its own, otherwise it gets a
/// process group of its own.
fn spawn_with_channel(binary: &Path, subcommand: &str, log_level: u8, detach: bool) -> Result<(OwnedFd, Child), MountError> {
    let io = |what: String| move |source: io::Error| MountError::Io { what, source };
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| io("creating the hand-over socket".into())(e.into()))?;
    let theirs_raw = theirs.as_raw_fd();
    let mut command = Command::new(binary);
    if log_level > 0 {
        command.arg(format!("-{}", "v".repeat(log_level as usize)));
    }
    command.arg(subcommand).stdin(Stdio::null()).stdout(Stdio::null());
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
    let child = command.spawn().map_err(io(format!("starting {} {subcommand}", binary.display())))?;
    Ok((ours, child))
}

/// Waits for a started process's first message: `Ready`, or why it failed.
fn await_ready(channel: BorrowedFd<'_>, what: &str) -> Result<(), MountError> {
    let mut fds = [PollFd::new(channel, PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(START_TIMEOUT.as_millis() as i32).unwrap_or(PollTimeout::NONE);
    if !matches!(poll(&mut fds, timeout), Ok(n) if n > 0) {
        return Err(MountError::Daemon(format!("the {what} did not start within {} s", START_TIMEOUT.as_secs())));
    }
    read_ready(channel, what)
}

/// Reads a started process's first message, which has arrived: `Ready`, or why it failed.
fn read_ready(channel: BorrowedFd<'_>, what: &str) -> Result<(), MountError> {
    match handover::receive_message(channel) {
        Ok(Some(Message::Ready { .. })) => Ok(()),
        Ok(Some(Message::Failed(why))) => Err(MountError::Daemon(why)),
        Ok(Some(other)) => Err(MountError::Daemon(format!("the {what} said {other:?} instead of starting"))),
        Ok(None) => Err(MountError::Daemon(format!("the {what} exited during start-up"))),
        Err(e) => Err(MountError::Daemon(format!("the {what} answered with an {e}"))),
    }
}

pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) {
    let _ = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
}

/// Whether the kernel has ended the connection (unmounted, or aborted): /dev/fuse then
/// polls as an error.
fn connection_ended(fuse: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fuse, PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLERR))
}

/// The holder's control socket (for `upgrade`), accepting root and the mount's owner.
fn bind_control(mountpoint: &Path) -> Result<UnixListener, MountError> {
    let path = control::holder_socket_path(mountpoint);
    control::make_run_dir().map_err(|source| MountError::Io { what: format!("creating {}", control::RUN_DIR), source })?;
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| MountError::Io { what: format!("binding {}", path.display()), source })?;
    set_cloexec(listener.as_fd());
    Ok(listener)
}

/// Asks the holder of `mountpoint` to upgrade its worker to `binary`; the new worker's pid.
pub fn request_upgrade(mountpoint: &Path, binary: &Path) -> Result<u32, MountError> {
    let path = control::holder_socket_path(mountpoint);
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
    BufReader::new(&stream).read_line(&mut line).map_err(io("reading from"))?;
    match serde_json::from_str(&line) {
        Ok(ControlReply::Upgraded { pid }) => Ok(pid),
        Ok(ControlReply::Refused(why)) => Err(MountError::Daemon(why)),
        Err(_) => Err(MountError::Daemon("the holder gave no answer (did it die? the mount recovers; try again)".into())),
    }
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
