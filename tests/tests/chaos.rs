//! The chaos tests, CI-sized: four reader processes (read(2), mmap, a directory walker that
//! stats everything) check every byte of a ≥ 1 GiB image through a mount that starts with an
//! empty cache, while the worker, the holder, both in turn, upgrades, or all three hit it at
//! random instants 10-500 ms apart. Pass: zero errors of any kind, zero wrong bytes.
//! Longer runs: scripts/chaos.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use phoenixfs_tests::chaos::{self, Plan, Report, Victim};

/// The scenarios share one dataset and the machine's two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn chaos_run(victim: Victim, events: usize, name: &str) -> Report {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dataset = chaos::gib_dataset();
    assert!(dataset.bytes >= 1 << 30, "the dataset holds at least 1 GiB");
    let plan = Plan { victim, events, min_duration: Duration::ZERO, interval_ms: (10, 500), readers: 4 };
    let report = chaos::run(&dataset, Path::new(env!("CARGO_BIN_EXE_phoenixfs-chaos")), &plan, &dataset.root.join(format!("cache-{name}")));
    // Straight to stderr, past the test harness's capture: CI logs show the figures.
    let _ = writeln!(std::io::stderr(), "chaos {name}: {}", report.summary());
    assert_eq!(report.errors, 0, "readers saw errors or wrong bytes");
    assert_eq!(report.daemon_errors, 0, "the daemon answered requests with errors");
    // Every reader finished at least one whole pass over the image (3 readers verify bytes).
    assert!(report.bytes_verified >= 3 * dataset.bytes, "{} bytes verified", report.bytes_verified);
    report
}

#[test]
fn readers_never_notice_the_worker_being_killed() {
    let report = chaos_run(Victim::Worker, 50, "worker");
    assert_eq!(report.worker_kills, 50);
    assert_eq!(report.stalls_ms.len(), 50, "each takeover's stall was measured");
}

#[test]
fn readers_never_notice_the_holder_being_killed() {
    let report = chaos_run(Victim::Holder, 50, "holder");
    assert_eq!(report.holder_kills, 50);
}

#[test]
fn readers_never_notice_holder_and_worker_killed_in_turn() {
    let report = chaos_run(Victim::Alternate, 50, "alternate");
    assert_eq!((report.holder_kills, report.worker_kills), (25, 25));
}

#[test]
fn upgrades_lose_nothing_and_resend_nothing() {
    let report = chaos_run(Victim::Upgrade, 20, "upgrade");
    assert_eq!(report.upgrades, 20);
    assert_eq!(report.resent_after_upgrades, 0, "an upgrade must not make the kernel resend");
}

#[test]
fn kills_of_either_process_between_upgrades_lose_nothing() {
    let report = chaos_run(Victim::Mixed, 60, "mixed");
    assert_eq!((report.worker_kills, report.upgrades, report.holder_kills), (20, 20, 20));
    assert_eq!(report.resent_after_upgrades, 0, "an upgrade must not make the kernel resend");
}
