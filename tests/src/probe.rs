//! What a takeover costs a program that was idle, measured from outside the daemon: on a
//! mount nobody reads, kill the worker, at once look up (lstat) a name nobody looked up
//! before, and time the answer. Meanwhile /proc shows the instant the holder starts the new
//! worker, so the same probe also times the worker's start-up: from its fork (exec follows at
//! once) to that answer. The daemon's own measure of each takeover (death to first answered
//! request) is kept beside them, and its own start-up figure when status has one.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::chaos::{await_takeover, current_status, pid_of, read_manifest, Dataset};
use crate::mount::PhoenixMount;

/// One kill of an idle mount's worker.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// From the kill to the answer of the lookup, as the prober saw it.
    pub lookup_ms: f64,
    /// From the new worker process's appearance to that answer; None when it was not seen.
    pub start_ms: Option<f64>,
    /// The daemon's measure: from the death to the first answered request.
    pub stall_ms: f64,
    /// `worker_start_ms` from status, once the daemon reports it.
    pub reported_start_ms: Option<f64>,
}

/// Mounts `dataset` with an empty cache at `cache` and probes `kills` times, each on a
/// different name spread over the image, a second apart.
pub fn probe(dataset: &Dataset, kills: usize, cache: &Path) -> Vec<Probe> {
    if cache.exists() {
        fs::remove_dir_all(cache).expect("emptying the cache");
    }
    let mount = PhoenixMount::new(&dataset.image, &dataset.store, cache, &[]);
    let entries = read_manifest(&dataset.manifest).expect("manifest");
    (0..kills)
        .map(|k| {
            let name = mount.path().join(&entries[k * entries.len() / kills].path);
            // Only the name itself is new: its directory is looked up before the kill.
            let parent = name.parent().expect("a parent");
            fs::symlink_metadata(parent).unwrap_or_else(|e| panic!("lstat {}: {e}", parent.display()));
            // Past the previous takeover's after-work (the cache index starts after a second).
            std::thread::sleep(Duration::from_millis(1200));
            let status = current_status(&mount);
            let (holder, worker) = (pid_of(&status, "holder_pid"), pid_of(&status, "pid"));
            let watch = ChildWatch::start(holder, worker);
            kill(Pid::from_raw(worker), Signal::SIGKILL).expect("killing the worker");
            let killed = Instant::now();
            let looked_up = fs::symlink_metadata(&name);
            let answered = Instant::now();
            looked_up.unwrap_or_else(|e| panic!("lstat {}: {e}", name.display()));
            let started = watch.stop();
            let (now, stall_ms) = await_takeover(&mount, &status);
            Probe {
                lookup_ms: ms(answered - killed),
                start_ms: started.map(|at| ms(answered.saturating_duration_since(at))),
                stall_ms,
                reported_start_ms: now["worker_start_ms"].as_f64(),
            }
        })
        .collect()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A thread polling the holder's children (every 50 µs) for the first that is not the old
/// worker, and when it appeared.
struct ChildWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Option<Instant>>,
}

impl ChildWatch {
    fn start(holder: i32, old_worker: i32) -> ChildWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if children_of(holder).into_iter().any(|pid| pid != old_worker) {
                        return Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                None
            })
        };
        ChildWatch { stop, thread }
    }

    /// When the new worker appeared, if it did before now.
    fn stop(self) -> Option<Instant> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the watching thread")
    }
}

/// The children of every thread of `pid`, from /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|task| fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|pid| pid.parse().ok()).collect::<Vec<i32>>())
        .collect()
}

/// On a mount holding `file` (at least `2 * probes` MiB), `probes` times: kills the worker
/// `worker()` names and at once reads 4 KiB of a chunk never read before; also reads as many
/// such chunks with no kill. The latencies (ms): (after a kill, without one).
pub fn reads_after_kills(file: &Path, probes: usize, mut worker: impl FnMut() -> i32) -> (Vec<f64>, Vec<f64>) {
    use std::os::unix::fs::FileExt;
    let data = fs::File::open(file).expect("the probe file");
    let mut buf = [0u8; 4096];
    let mut read_at = |mib: u64| {
        let started = Instant::now();
        data.read_exact_at(&mut buf, mib << 20).expect("reading the probe file");
        started.elapsed().as_secs_f64() * 1000.0
    };
    let mut after_kill = Vec::new();
    let mut plain = Vec::new();
    for i in 0..probes as u64 {
        plain.push(read_at(2 * i));
        let victim = worker();
        let killed = Instant::now();
        kill(Pid::from_raw(victim), Signal::SIGKILL).expect("killing the worker");
        read_at(2 * i + 1);
        after_kill.push(killed.elapsed().as_secs_f64() * 1000.0);
    }
    (after_kill, plain)
}
