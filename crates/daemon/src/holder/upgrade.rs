//! Hot upgrade: `phoenixfs upgrade` asks the holder (over its control socket) to start a
//! worker from a new binary; it serves next to the current one, which then stops reading at
//! a request boundary, answers what it holds and exits. Nothing is resent or answered twice.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use tracing::{info, warn};

use super::control::{self, ControlReply, ControlRequest};
use super::launch::{discard, launch, read_ready, Role};
use super::lifecycle::{Lifecycle, Phase, START_TIMEOUT};
use super::{Holder, Worker};
use crate::handover::{self, Message, Takeover};

/// A hot upgrade in progress: the holder keeps watching the serving worker meanwhile.
pub(super) struct Upgrade {
    pub(super) worker: Worker,
    binary: PathBuf,
    /// Who asked; answered when the new worker serves or has failed.
    client: UnixStream,
    pub(super) deadline: Instant,
}

impl Holder {
    pub(super) fn answer_control(&mut self) {
        let Some((client, request)) = control::accept(&self.control, self.state.spec.owner_uid) else { return };
        match request {
            Ok(ControlRequest::Upgrade { binary }) => self.start_upgrade(binary, client),
            Err(why) => control::reply(&client, &ControlReply::Refused(why)),
        }
    }

    /// Hot upgrade, first half: starts a worker from `binary` and hands it the session. The
    /// current worker serves on meanwhile, and the holder keeps watching it.
    pub(super) fn start_upgrade(&mut self, binary: PathBuf, client: UnixStream) {
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
    pub(super) fn on_upgrade_event(&mut self) {
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
        self.discard_standbys();
        control::reply(&upgrade.client, &ControlReply::Upgraded { pid });
    }

    pub(super) fn abort_upgrade(&mut self, why: String) {
        let Some(mut upgrade) = self.upgrade.take() else { return };
        if let Some(child) = upgrade.worker.child.as_mut() {
            discard(child);
        }
        warn!(binary = %upgrade.binary.display(), why, "upgrade failed; the old worker serves on");
        control::reply(&upgrade.client, &ControlReply::Refused(format!("the new worker did not start, the old one serves on: {why}")));
    }
}
