//! Standbys: workers started ahead of need, prepared (image mapped, cache open, threads up)
//! but not reading requests. When the serving worker dies the holder tells the oldest
//! prepared one `Go`, and the takeover costs a message instead of a process start. Two are
//! kept, so that a kill right after a takeover still finds one prepared while the next is
//! starting. Standbys that fail by themselves a few times in a row are not replaced until
//! the next takeover or upgrade.

use std::os::fd::AsFd;

use tracing::{info, warn};

use super::launch::{discard, launch, Role};
use super::lifecycle::{Exit, Phase};
use super::{Holder, Worker};
use crate::handover::{self, Message, State, Takeover};

/// How many standbys the holder keeps.
const STANDBYS: usize = 2;

/// Standbys in a row that may fail by themselves before the holder stops starting them (until
/// the next takeover or upgrade): a broken binary must not spin.
const MAX_STANDBY_FAILURES: u32 = 3;

impl Holder {
    /// Starts a standby when the slot's worker serves and has finished its own takeover, and
    /// every standby is prepared (so that starts never compete with each other or with a
    /// takeover), unless standbys keep failing by themselves.
    pub(super) fn ensure_standby(&mut self) {
        let settled = matches!(self.slot.phase(), Phase::Serving { .. }) && self.worker.as_ref().is_some_and(|w| w.predecessor_died_at_ns.is_none());
        let all_prepared = self.standbys.iter().all(|s| s.prepared);
        if self.standbys.len() >= STANDBYS || !all_prepared || !settled || self.standby_failures >= MAX_STANDBY_FAILURES {
            return;
        }
        let state = State { takeover: Takeover::Standby, ..self.state.clone() };
        match launch(&self.binary, Role::Worker, &state, &self.fds) {
            Ok((channel, child)) => self.standbys.push(Worker::started(channel, child, None)),
            Err(error) => {
                self.standby_failures += 1;
                warn!(%error, "cannot start a standby worker");
            }
        }
    }

    /// A message from the standby `pid`, or its end; nothing if it is no longer a standby.
    pub(super) fn on_standby_event(&mut self, pid: u32) {
        let Some(index) = self.standbys.iter().position(|s| s.pid == pid) else { return };
        let standby = &mut self.standbys[index];
        match handover::receive_message(standby.channel.as_fd()) {
            Ok(Some(Message::Ready { .. })) => standby.prepared = true,
            Ok(Some(Message::Failed(why))) => standby.failure = Some(why),
            Ok(Some(other)) => warn!(message = ?other, "unexpected message from the standby worker"),
            Ok(None) | Err(_) => {
                let mut standby = self.standbys.remove(index);
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

    /// Lets the standbys go (they are of a binary an upgrade replaced).
    pub(super) fn discard_standbys(&mut self) {
        for mut standby in self.standbys.drain(..) {
            if let Some(child) = standby.child.as_mut() {
                discard(child);
            }
        }
        self.standby_failures = 0;
    }

    /// Hands the slot to the oldest prepared standby, if there is one: its pid.
    pub(super) fn wake_standby(&mut self, died_at_ns: u64) -> Option<u32> {
        let index = self.standbys.iter().position(|s| s.prepared)?;
        let mut standby = self.standbys.remove(index);
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
}
