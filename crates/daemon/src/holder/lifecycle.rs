//! The holder's serving slot as a state machine: the worker that serves (or is starting), what
//! its end means, and when the next one starts. Pure: events and the time in, an action out;
//! the holder's loop does the I/O, and the tests below drive it without processes.
//!
//! The rule it keeps: a worker killed from outside is replaced at once, every time, also
//! while it is starting (a kill is the failure the design survives, and each one costs
//! readers a stall). Only a binary that fails by itself again and again (non-zero exits,
//! aborts, crashes, or no sign of life within the start deadline) is retried at a growing,
//! bounded interval, so that a broken binary does not spin the machine.

use std::time::{Duration, Instant};

/// How long a starting worker may take to say it serves.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);
/// A worker that served this long before failing resets the failure count: it was not a
/// binary that cannot start, and its successor gets a fresh start.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Failures in a row that are retried at once before the holder starts waiting.
const FREE_RETRIES: u32 = 2;
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a worker process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exit {
    /// A signal from outside (SIGKILL, SIGTERM, SIGINT, SIGHUP, SIGQUIT): not the binary's fault.
    Killed(String),
    /// Its own doing: a non-zero exit, an abort (a panic aborts), a crash.
    Failed(String),
    /// Not our child (adopted after a holder death), so how it ended is unknown: treated as a kill.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A worker was launched and has not yet said it serves.
    Starting { pid: u32, since: Instant, timed_out: bool },
    /// The worker serves.
    Serving { pid: u32, since: Instant },
    /// Workers keep failing by themselves: the next one starts at `at`.
    Waiting { at: Instant },
    /// The file system is gone.
    Unmounted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A worker process was started and handed the session.
    Launched { pid: u32 },
    /// No worker process could be started (the binary is missing, the hand-over failed).
    LaunchFailed { why: String },
    /// The worker said it serves.
    Ready,
    /// The worker said the file system is unmounted.
    SaidUnmounted,
    /// The worker's socket closed: it ended, at `at_ns` (CLOCK_MONOTONIC).
    Exited { exit: Exit, at_ns: u64, connection_ended: bool },
    /// Time passed (a start deadline or a wait may be over).
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Start a worker now. `died_at_ns`: when its predecessor died, for the resend and the
    /// takeover's stall.
    Launch { died_at_ns: u64 },
    /// Kill the starting worker: it missed its start deadline. Its exit comes as an event.
    Kill { pid: u32 },
    /// Start a worker at `at`, after `failures` failures in a row; `why` the latest.
    Wait { at: Instant, failures: u32, why: String },
    /// The file system is unmounted: the holder's work is done.
    Finish,
}

#[derive(Debug)]
pub(crate) struct Lifecycle {
    phase: Phase,
    /// Failures of the binary in a row (kills do not count).
    failures: u32,
    /// When the latest worker died, until a successor answers (stall measurement).
    died_at_ns: u64,
    said_unmounted: bool,
}

impl Lifecycle {
    /// A slot whose worker (started or adopted) already serves.
    pub(crate) fn serving(pid: u32, now: Instant) -> Self {
        Lifecycle { phase: Phase::Serving { pid, since: now }, failures: 0, died_at_ns: 0, said_unmounted: false }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// When the holder must call [`Lifecycle::on`] with [`Event::Tick`] at the latest.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Starting { since, timed_out: false, .. } => Some(since + START_TIMEOUT),
            Phase::Waiting { at } => Some(at),
            _ => None,
        }
    }

    /// The transition function.
    pub(crate) fn on(&mut self, event: Event, now: Instant) -> Option<Action> {
        match (event, self.phase) {
            (_, Phase::Unmounted) => None,
            (Event::Launched { pid }, _) => {
                self.phase = Phase::Starting { pid, since: now, timed_out: false };
                self.said_unmounted = false;
                None
            }
            (Event::LaunchFailed { why }, _) => Some(self.failed(why, None, now)),
            (Event::Ready, Phase::Starting { pid, .. }) => {
                self.phase = Phase::Serving { pid, since: now };
                None
            }
            (Event::SaidUnmounted, _) => {
                self.said_unmounted = true;
                None
            }
            (Event::Exited { connection_ended, .. }, _) if connection_ended || self.said_unmounted => {
                self.phase = Phase::Unmounted;
                Some(Action::Finish)
            }
            (Event::Exited { exit, at_ns, .. }, phase) => {
                self.died_at_ns = at_ns;
                let served_since = match phase {
                    Phase::Serving { since, .. } => Some(since),
                    _ => None,
                };
                match (exit, phase) {
                    (_, Phase::Starting { timed_out: true, .. }) => {
                        Some(self.failed(format!("it did not start within {} s", START_TIMEOUT.as_secs()), None, now))
                    }
                    (Exit::Failed(why), _) => Some(self.failed(why, served_since, now)),
                    (Exit::Killed(_) | Exit::Unknown, _) => Some(self.launch()),
                }
            }
            (Event::Tick, Phase::Waiting { at }) if now >= at => Some(self.launch()),
            (Event::Tick, Phase::Starting { pid, since, timed_out: false }) if now >= since + START_TIMEOUT => {
                self.phase = Phase::Starting { pid, since, timed_out: true };
                Some(Action::Kill { pid })
            }
            (Event::Ready | Event::Tick, _) => None,
        }
    }

    fn launch(&mut self) -> Action {
        Action::Launch { died_at_ns: self.died_at_ns }
    }

    /// The binary failed by itself (`served_since`: when the failed worker began serving).
    fn failed(&mut self, why: String, served_since: Option<Instant>, now: Instant) -> Action {
        let was_stable = served_since.is_some_and(|since| now.duration_since(since) >= STABLE_AFTER);
        self.failures = if was_stable { 1 } else { self.failures + 1 };
        if self.failures <= FREE_RETRIES {
            return self.launch();
        }
        let exponent = (self.failures - FREE_RETRIES - 1).min(16);
        let delay = FIRST_BACKOFF.saturating_mul(1 << exponent).min(MAX_BACKOFF);
        let at = now + delay;
        self.phase = Phase::Waiting { at };
        Action::Wait { at, failures: self.failures, why }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn killed() -> Event {
        Event::Exited { exit: Exit::Killed("SIGKILL".into()), at_ns: 7, connection_ended: false }
    }

    fn failed() -> Event {
        Event::Exited { exit: Exit::Failed("signal 6 (SIGABRT)".into()), at_ns: 9, connection_ended: false }
    }

    #[test]
    fn kills_are_replaced_at_once_every_time_also_during_start_up() {
        let now = Instant::now();
        let mut slot = Lifecycle::serving(10, now);
        assert_eq!(slot.on(killed(), now), Some(Action::Launch { died_at_ns: 7 }));
        for pid in 11..200 {
            slot.on(Event::Launched { pid }, now);
            // Killed before it could say Ready: still no waiting.
            assert_eq!(slot.on(killed(), now), Some(Action::Launch { died_at_ns: 7 }), "kill {pid}");
        }
        assert_eq!(slot.deadline(), Some(now + START_TIMEOUT));
        slot.on(Event::Launched { pid: 300 }, now);
        slot.on(Event::Ready, now);
        assert_eq!(slot.phase(), Phase::Serving { pid: 300, since: now });
        assert_eq!(slot.deadline(), None);
    }

    #[test]
    fn a_binary_failing_by_itself_again_and_again_is_retried_at_a_bounded_interval() {
        let now = Instant::now();
        let mut slot = Lifecycle::serving(10, now);
        // The first failures (a panic on one request, say) are retried at once.
        assert_eq!(slot.on(failed(), now), Some(Action::Launch { died_at_ns: 9 }));
        slot.on(Event::Launched { pid: 11 }, now);
        assert_eq!(slot.on(failed(), now), Some(Action::Launch { died_at_ns: 9 }));
        let mut delays = Vec::new();
        for pid in 12..40 {
            slot.on(Event::Launched { pid }, now);
            match slot.on(failed(), now) {
                Some(Action::Wait { at, why, .. }) => {
                    assert_eq!(why, "signal 6 (SIGABRT)");
                    delays.push(at - now);
                    assert_eq!(slot.deadline(), Some(at));
                    assert_eq!(slot.on(Event::Tick, at - Duration::from_millis(1)), None, "too early");
                    assert_eq!(slot.on(Event::Tick, at), Some(Action::Launch { died_at_ns: 9 }));
                }
                other => panic!("expected a wait, got {other:?}"),
            }
        }
        assert_eq!(delays[0], FIRST_BACKOFF);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "growing: {delays:?}");
        assert_eq!(*delays.last().unwrap(), MAX_BACKOFF);
        // A kill in the middle of a failing streak is still replaced at once.
        slot.on(Event::Launched { pid: 50 }, now);
        assert_eq!(slot.on(killed(), now), Some(Action::Launch { died_at_ns: 7 }));
        slot.on(Event::LaunchFailed { why: "no such binary".into() }, now);
        assert!(matches!(slot.phase(), Phase::Waiting { .. }));
    }

    #[test]
    fn a_worker_that_served_a_while_before_failing_starts_a_fresh_count() {
        let now = Instant::now();
        let mut slot = Lifecycle::serving(10, now);
        for pid in 11..20 {
            slot.on(failed(), now);
            slot.on(Event::Tick, now + MAX_BACKOFF);
            slot.on(Event::Launched { pid }, now);
        }
        slot.on(Event::Ready, now);
        assert_eq!(slot.on(failed(), now + STABLE_AFTER), Some(Action::Launch { died_at_ns: 9 }));
    }

    #[test]
    fn a_worker_silent_past_its_start_deadline_is_killed_and_counts_as_a_failure() {
        let now = Instant::now();
        let mut slot = Lifecycle::serving(10, now);
        for _ in 0..FREE_RETRIES {
            slot.on(failed(), now);
        }
        slot.on(Event::Launched { pid: 11 }, now);
        assert_eq!(slot.on(Event::Tick, now + START_TIMEOUT - Duration::from_millis(1)), None);
        assert_eq!(slot.on(Event::Tick, now + START_TIMEOUT), Some(Action::Kill { pid: 11 }));
        assert_eq!(slot.deadline(), None, "no second kill");
        // Our own SIGKILL is not a kill from outside.
        assert!(matches!(slot.on(killed(), now + START_TIMEOUT), Some(Action::Wait { why, .. }) if why.contains("did not start")));
    }

    #[test]
    fn the_end_of_the_connection_finishes_whatever_the_exit() {
        let now = Instant::now();
        let mut slot = Lifecycle::serving(10, now);
        let ended = Event::Exited { exit: Exit::Unknown, at_ns: 1, connection_ended: true };
        assert_eq!(slot.on(ended, now), Some(Action::Finish));
        assert_eq!(slot.phase(), Phase::Unmounted);
        assert_eq!(slot.on(Event::Tick, now), None);

        let mut slot = Lifecycle::serving(10, now);
        slot.on(Event::SaidUnmounted, now);
        assert_eq!(slot.on(failed(), now), Some(Action::Finish));
    }

    #[test]
    fn adopted_workers_of_unknown_fate_are_replaced_at_once() {
        let now = Instant::now();
        let mut slot = Lifecycle::serving(10, now);
        let gone = Event::Exited { exit: Exit::Unknown, at_ns: 3, connection_ended: false };
        assert_eq!(slot.on(gone, now), Some(Action::Launch { died_at_ns: 3 }));
    }
}
