//! The fscache daemon's worker: takes the `/dev/cachefiles` fd from the holder, writes
//! `restore` (so the kernel delivers again what a dead predecessor had read), and serves
//! from several threads until told to retire. When its holder dies it starts a new one.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::PollTimeout;
use phoenixfs_cachefiles::Device;
use tracing::{info, warn};

use super::serve::Server;
use super::{hand_over, take_over, worker_stats_path, DaemonState, ImageMemfds, Takeover};
use crate::error::MountError;
use crate::handover::{self, Message};
use crate::holder::{spawn_with_channel, Role};
use crate::os::{die_on_panic, retry_until_done, set_cloexec, spawn_thread};

/// How often a serving thread looks up from the device to see whether it should stop.
const POLL_MS: u16 = 100;

/// The hidden `fscache-worker` subcommand.
pub fn run_fscache_worker() -> Result<(), MountError> {
    die_on_panic();
    // SAFETY: the holder started this process with the hand-over socket as fd 3, and nothing
    // else in this process owns fd 3.
    let channel = unsafe { OwnedFd::from_raw_fd(3) };
    set_cloexec(channel.as_fd());
    let started = receive(channel.as_fd());
    let (mut state, device, images) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = handover::send_message(channel.as_fd(), &Message::Failed(e.to_string()));
            return Err(e);
        }
    };
    let server = Arc::new(Server::new(device, images));
    if state.takeover == Takeover::OnGo {
        let _ = handover::send_message(channel.as_fd(), &Message::Ready { pid: std::process::id() });
        if !await_go(channel.as_fd(), &server) {
            // Let go, or the holder died (the serving worker replaces it): not needed.
            return Ok(());
        }
    }
    if let Err(e) = server.device().restore() {
        let _ = handover::send_message(channel.as_fd(), &Message::Failed(e.to_string()));
        return Err(MountError::Refused(e.to_string()));
    }
    if state.takeover != Takeover::OnGo {
        let _ = handover::send_message(channel.as_fd(), &Message::Ready { pid: std::process::id() });
    }
    info!(takeover = ?state.takeover, restarts = state.restarts, "fscache worker serving");
    let stop = Arc::new(AtomicBool::new(false));
    let threads = std::thread::available_parallelism().map_or(4, |n| (2 * n.get()).max(4));
    let mut serving = Vec::new();
    for i in 0..threads {
        let (server, stop) = (server.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("fscache-{i}"))
            .spawn(move || serve(&server, &stop))
            .map_err(|source| MountError::Io { what: "spawning a serving thread".into(), source })?;
        serving.push(thread);
    }
    let stats = server.clone();
    spawn_thread("stats", move || write_stats(&stats))?;
    // This thread follows the holder: retire when told, replace it when it dies.
    let mut channel = channel;
    loop {
        match handover::receive_message_with_fds(channel.as_fd()) {
            Ok(Some((Message::Retire, _))) => break,
            Ok(Some((message, fds))) => follow_images(&server, message, fds),
            Err(handover::HandoverError::Garbled(_)) => {}
            Ok(None) | Err(_) => {
                warn!("the holder died; starting another");
                state.takeover = Takeover::AfterStart;
                channel = replace_holder(&state, &server);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for thread in serving {
        let _ = thread.join();
    }
    let _ = handover::send_message(channel.as_fd(), &Message::Retired);
    info!("retired: a newer worker serves");
    Ok(())
}

/// Waits for the holder's `Go`, keeping up with the images registered meanwhile; false when
/// the holder let this worker go or died.
fn await_go(channel: BorrowedFd<'_>, server: &Server) -> bool {
    loop {
        match handover::receive_message_with_fds(channel) {
            Ok(Some((Message::Go { .. }, _))) => return true,
            Ok(Some((message, fds))) => follow_images(server, message, fds),
            Err(handover::HandoverError::Garbled(_)) => {}
            Ok(None) | Err(_) => return false,
        }
    }
}

/// Serves an image the holder handed over, or forgets one unmounted.
fn follow_images(server: &Server, message: Message, mut fds: Vec<OwnedFd>) {
    match message {
        Message::ImageAdded { mountpoint } => match fds.pop() {
            Some(memfd) => server.add_image(mountpoint, memfd),
            None => warn!(mountpoint = %mountpoint.display(), "an image handed over without its memfd"),
        },
        Message::ImageRemoved { mountpoint } => server.remove_image(&mountpoint),
        other => warn!(message = ?other, "unexpected message from the holder"),
    }
}

/// The state, the device and the images' memfds (by mountpoint) from the holder.
fn receive(channel: BorrowedFd<'_>) -> Result<(DaemonState, Device, ImageMemfds), MountError> {
    let (state, device, images) = take_over(channel)?;
    handover::check_peer(channel, 0)?;
    Ok((state, Device::from_fd(device), images))
}

fn serve(server: &Server, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match server.device().next_message(PollTimeout::from(POLL_MS)) {
            Ok(Some(message)) => server.handle(message),
            Ok(None) => {}
            Err(error) => {
                warn!(%error, "reading /dev/cachefiles");
                std::thread::sleep(Duration::from_millis(POLL_MS.into()));
            }
        }
    }
}

/// Writes the worker's figures where the holder's status finds them.
fn write_stats(server: &Server) {
    let path = worker_stats_path();
    let mut last = None;
    loop {
        let stats = server.stats();
        if last.as_ref() != Some(&stats) {
            let partial = path.with_extension("partial");
            if std::fs::write(&partial, serde_json::to_vec(&stats).expect("stats serialise")).and_then(|()| std::fs::rename(&partial, &path)).is_ok() {
                last = Some(stats);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts holders until one has taken the device fd and the images; the channel to it.
fn replace_holder(state: &DaemonState, server: &Server) -> OwnedFd {
    retry_until_done("cannot start a holder", || start_holder(state, server))
}

fn start_holder(state: &DaemonState, server: &Server) -> Result<OwnedFd, MountError> {
    let binary = std::env::current_exe().map_err(|source| MountError::Io { what: "finding this binary".into(), source })?;
    let (channel, mut child) = spawn_with_channel(&binary, Role::FscacheHolder, state.log_level)?;
    let started = hand_over(channel.as_fd(), state, server.device().as_fd(), &server.image_fds())
        .map_err(MountError::from)
        .and_then(|()| match handover::receive_message(channel.as_fd()) {
            Ok(Some(Message::Ready { .. })) => Ok(()),
            other => Err(MountError::Refused(format!("the new holder did not take over: {other:?}"))),
        });
    match started {
        Ok(()) => {
            info!(pid = child.id(), "a new holder holds the fscache daemon");
            // Never waited for: the holder runs in a session of its own and outlives us.
            drop(child);
            Ok(channel)
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}
