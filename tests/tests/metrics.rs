//! Prometheus metrics: a real Prometheus scrapes `phoenixfs exporter` while a mount is read
//! and its worker SIGKILLed, and what it stored, read back through its HTTP API, matches what
//! the test did and what the mount's status says.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use phoenixfs_tests::mount::PhoenixMount;
use phoenixfs_tests::prometheus::{Exporter, Prometheus, PROMETHEUS_BIN};
use phoenixfs_tests::trees::noise;
use phoenixfs_tests::{build_image, fixture_dir, phoenixfs, run, wait_until_every};

const MIB: usize = 1 << 20;
const FILES: usize = 4;
const FILE_SIZE: usize = 3 * MIB + 12_345;
const KILLS: u64 = 2;
/// How long Prometheus may take to show a figure: a few scrapes at 1 s.
const SCRAPED: Duration = Duration::from_secs(30);

/// Waits for `probe` (each call asks a process over a socket) every 100 ms.
fn eventually<T>(timeout: Duration, what: &str, probe: impl FnMut() -> Option<T>) -> T {
    wait_until_every(Duration::from_millis(100), timeout, what, probe)
}

/// Tells the readers to stop when dropped, so a failed assertion does not leave the scope
/// waiting for them forever.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Reads all of `path` through the mount after dropping its cached pages, so every byte
/// goes through FUSE READs; returns the content.
fn read_uncached(path: &Path) -> Vec<u8> {
    let file = File::open(path).unwrap();
    posix_fadvise(file.as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
    let mut data = vec![0u8; file.metadata().unwrap().len() as usize];
    file.read_exact_at(&mut data, 0).unwrap();
    data
}

/// The mount's status, or None while no worker answers (mid-takeover).
fn status_now(mountpoint: &Path) -> Option<serde_json::Value> {
    let out = run(phoenixfs().arg("status").arg(mountpoint).arg("--json"));
    out.status.success().then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()).flatten().map(|all| all[0].clone())
}

#[test]
fn prometheus_scrapes_a_mount_under_load_and_reads_the_figures_back() {
    assert!(Path::new(PROMETHEUS_BIN).exists(), "{PROMETHEUS_BIN} is missing: apt-get install prometheus (scripts/test does)");
    let root = fixture_dir("metrics");
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..FILES {
        fs::write(src.join(format!("file{i}")), noise(i as u64 + 500, FILE_SIZE)).unwrap();
    }
    // Read only by the last worker, so that it fetches too.
    fs::write(src.join("late"), noise(499, FILE_SIZE)).unwrap();
    let (image, _) = build_image(&src, &root.join("store"), &root, &[]);
    // Passthrough off: the figures checked are of READs, and files read whole before would
    // be read by the kernel from their copies, without a READ.
    let mount = PhoenixMount::new(&image, root.join("store"), &root.join("cache"), &["--passthrough-cache", "0"]);
    let status = mount.status();
    let mountpoint = status["mountpoint"].as_str().expect("mountpoint").to_string();
    let exporter = Exporter::start(&root);
    let prometheus = Prometheus::start(&root, &[exporter.server.port]);
    let paths: Vec<PathBuf> = (0..FILES).map(|i| mount.path().join(format!("file{i}"))).collect();
    let expected: Vec<Vec<u8>> = (0..FILES).map(|i| fs::read(src.join(format!("file{i}"))).unwrap()).collect();

    // Readers keep the mount busy while its worker is killed, twice.
    let stop = AtomicBool::new(false);
    let wrong = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for reader in 0..2 {
            let (paths, expected, stop, wrong) = (&paths, &expected, &stop, &wrong);
            scope.spawn(move || {
                let mut round = reader;
                while !stop.load(Ordering::Relaxed) {
                    let which = round % FILES;
                    if read_uncached(&paths[which]) != expected[which] {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    round += 1;
                }
            });
        }
        let _stop_readers = StopOnDrop(&stop);
        let mine = |query: &str| format!("{query}{{mountpoint=\"{mountpoint}\"}}");
        eventually(SCRAPED, "Prometheus sees the first worker's reads", || {
            prometheus.value(&mine("phoenixfs_fuse_read_bytes_total")).filter(|&bytes| bytes > 0.0)
        });
        for kill_number in 1..=KILLS {
            let worker = mount.worker_pid();
            kill(Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
            eventually(Duration::from_secs(30), "a new worker serves", || {
                status_now(mount.path()).filter(|s| s["pid"] != worker && s["worker_restarts"] == kill_number)
            });
            // Let Prometheus scrape this worker at work before the next kill.
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "readers saw wrong bytes");

    // The last worker serves every byte of one more pass, uncached.
    for (path, expected) in paths.iter().zip(&expected) {
        assert!(read_uncached(path) == *expected, "{} differs", path.display());
    }
    assert!(read_uncached(&mount.path().join("late")) == fs::read(src.join("late")).unwrap(), "late differs");
    let read_bytes = ((FILES + 1) * FILE_SIZE) as f64;
    let status = mount.status();
    let fetched = status["chunks_fetched"].as_u64().expect("chunks_fetched") as f64;
    assert!(fetched >= FILE_SIZE.div_ceil(MIB) as f64, "the last worker fetched the late file's chunks: {status}");

    let mine = |query: &str| format!("{query}{{mountpoint=\"{mountpoint}\"}}");
    let at_least = |query: String, floor: f64| {
        eventually(SCRAPED, &format!("Prometheus shows {query} >= {floor}"), || prometheus.value(&query).filter(|&v| v >= floor))
    };
    let served = at_least(mine("phoenixfs_fuse_read_bytes_total"), read_bytes);
    at_least(mine("phoenixfs_worker_restarts_total"), KILLS as f64);
    at_least(mine("phoenixfs_takeover_stall_seconds_count"), 1.0);
    at_least(format!("phoenixfs_fuse_requests_total{{mountpoint=\"{mountpoint}\",opcode=\"read\"}}"), 1.0);
    at_least(format!("phoenixfs_fuse_reply_bytes_total{{mountpoint=\"{mountpoint}\",opcode=\"read\"}}"), read_bytes);
    let fetches = eventually(SCRAPED, "Prometheus shows as many timed fetches as fetched chunks", || {
        prometheus.value(&mine("phoenixfs_store_fetch_duration_seconds_count")).filter(|&n| n == fetched)
    });
    assert_eq!(prometheus.value(&mine("phoenixfs_cache_misses_total")), Some(fetches));
    assert_eq!(prometheus.value(&mine("phoenixfs_mount_up")), Some(1.0));
    // Each takeover stall is in the histogram, and within its largest bucket.
    let stalls = prometheus.value(&mine("phoenixfs_takeover_stall_seconds_count")).unwrap();
    let under_10s = prometheus.value(&format!("phoenixfs_takeover_stall_seconds_bucket{{mountpoint=\"{mountpoint}\",le=\"10\"}}")).unwrap();
    assert!(stalls >= 1.0 && under_10s == stalls, "stalls {stalls}, under 10 s {under_10s}");

    let (head, body) = exporter.get("/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    assert!(body.contains("# TYPE phoenixfs_store_fetch_duration_seconds histogram"), "{body}");
    eprintln!(
        "metrics: Prometheus read back {served} bytes served by the last worker (the test read {read_bytes} after the last kill), {fetches} fetches timed, {stalls} takeover stalls, {} restarts",
        prometheus.value(&mine("phoenixfs_worker_restarts_total")).unwrap()
    );
}
