//! The fscache front-end under chaos, run inside the cachefiles VM (see [`crate::vm`]) by
//! `phoenixfs-chaos fscache-run`: mounts a dataset with `mount --fscache` and an empty cache,
//! and kills the daemon's worker or holder, or upgrades it, while reader processes check
//! every byte. Reports as one line the host-side test reads back from the console.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::chaos::{finish_readers, percentile, spawn_readers, Dataset, Plan, Report, Victim, XorShift};
use crate::{phoenixfs, run_ok};

/// The line prefix of the report on the console.
pub const REPORT_PREFIX: &str = "FSCACHE-REPORT ";

/// Where things go inside the guest (all on its tmpfs, but the cache files, which must be on
/// a disk cachefiles accepts).
pub struct GuestPaths<'a> {
    pub mountpoint: &'a Path,
    pub chunk_cache: &'a Path,
    pub fscache_dir: &'a Path,
    pub stop: &'a Path,
}

fn status(mountpoint: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = phoenixfs().arg("status").arg(mountpoint).arg("--json").output().expect("running status");
        if out.status.success() {
            if let Ok(status) = serde_json::from_slice::<Value>(&out.stdout) {
                return status;
            }
        }
        assert!(Instant::now() < deadline, "the fscache daemon did not answer status for 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn pid(status: &Value, field: &str) -> Option<i32> {
    status[field].as_u64().map(|pid| pid as i32)
}

/// The serving worker's pid and the status that names it; while a worker is starting there
/// is none, so this waits for it.
fn serving_worker(mountpoint: &Path) -> (i32, Value) {
    loop {
        let now = status(mountpoint);
        if let Some(worker) = pid(&now, "worker_pid") {
            return (worker, now);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until status shows `field` set and different from `before`; how long that took (ms).
fn await_replacement(mountpoint: &Path, field: &str, before: i32) -> f64 {
    let started = Instant::now();
    loop {
        if pid(&status(mountpoint), field).is_some_and(|now| now != before) {
            return started.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no new {field} 60 s after killing {before}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What a run did and saw.
pub struct FscacheReport {
    /// `stalls_ms` holds, per worker kill, the time until a new worker served (seen from
    /// outside).
    pub report: Report,
    /// Worker kills that hit a worker which had written data to the cache: after the first
    /// pass the kernel reads from its cache files and a kill costs the readers nothing.
    pub kills_while_fetching: usize,
}

/// Mounts `dataset` through fscache, runs `plan`, unmounts, and reports.
pub fn run(dataset: &Dataset, reader_bin: &Path, plan: &Plan, paths: &GuestPaths<'_>) -> FscacheReport {
    fs::create_dir_all(paths.mountpoint).expect("mountpoint");
    run_ok(
        phoenixfs()
            .args(["mount", "--fscache"])
            .arg(&dataset.image)
            .arg(paths.mountpoint)
            .arg("--store")
            .arg(&dataset.store)
            .arg("--cache")
            .arg(paths.chunk_cache)
            .arg("--fscache-dir")
            .arg(paths.fscache_dir),
    );
    let started = Instant::now();
    let mut readers = spawn_readers(dataset, reader_bin, paths.mountpoint, plan.readers, paths.stop);
    let mut report = Report::default();
    let mut kills_while_fetching = 0;
    // Every holder pid seen: one more than the holder kills unless a holder died by itself.
    let mut holders = std::collections::HashSet::new();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut event = 0;
    while event < plan.events || started.elapsed() < plan.min_duration {
        let (low, high) = plan.interval_ms;
        std::thread::sleep(Duration::from_millis(low + rng.next_u64() % (high - low + 1)));
        let now = status(paths.mountpoint);
        holders.extend(pid(&now, "holder_pid"));
        let mut kill_worker = |report: &mut Report| {
            let (worker, now) = serving_worker(paths.mountpoint);
            let fetching = pid(&now["worker"], "pid") == Some(worker) && now["worker"]["bytes_written"].as_u64() > Some(0);
            kill(Pid::from_raw(worker), Signal::SIGKILL).expect("killing the worker");
            report.worker_kills += 1;
            kills_while_fetching += usize::from(fetching);
            report.stalls_ms.push(await_replacement(paths.mountpoint, "worker_pid", worker));
        };
        let kill_holder = |report: &mut Report| {
            let holder = pid(&now, "holder_pid").expect("holder_pid in status");
            kill(Pid::from_raw(holder), Signal::SIGKILL).expect("killing the holder");
            report.holder_kills += 1;
            await_replacement(paths.mountpoint, "holder_pid", holder);
        };
        match plan.victim {
            Victim::Nobody => {}
            Victim::Worker => kill_worker(&mut report),
            Victim::Holder => kill_holder(&mut report),
            Victim::Alternate if event % 2 == 0 => kill_holder(&mut report),
            Victim::Alternate => kill_worker(&mut report),
            Victim::Upgrade => {
                run_ok(phoenixfs().arg("upgrade").arg(paths.mountpoint));
                report.upgrades += 1;
            }
            Victim::Mixed => match event % 3 {
                0 => kill_worker(&mut report),
                1 => {
                    run_ok(phoenixfs().arg("upgrade").arg(paths.mountpoint));
                    report.upgrades += 1;
                }
                _ => kill_holder(&mut report),
            },
        }
        event += 1;
    }
    finish_readers(&mut readers, paths.stop, &mut report);
    report.elapsed = started.elapsed();
    let last = status(paths.mountpoint);
    holders.extend(pid(&last, "holder_pid"));
    report.holder_deaths_unasked = holders.len().saturating_sub(report.holder_kills + 1);
    report.daemon_errors = last["worker"]["errors"].as_u64().unwrap_or(0);
    assert_eq!(last["restarts"].as_u64(), Some(report.worker_kills as u64), "every worker kill is one restart: {last}");
    assert_eq!(last["upgrades"].as_u64(), Some(report.upgrades as u64), "every upgrade counted: {last}");
    run_ok(phoenixfs().arg("umount").arg(paths.mountpoint));
    FscacheReport { report, kills_while_fetching }
}

/// The report as the one console line the host reads back.
pub fn report_line(run: &FscacheReport) -> String {
    let report = &run.report;
    let at = |p| percentile(&report.stalls_ms, p);
    let json = serde_json::json!({
        "worker_kills": report.worker_kills,
        "kills_while_fetching": run.kills_while_fetching,
        "holder_kills": report.holder_kills,
        "upgrades": report.upgrades,
        "bytes_verified": report.bytes_verified,
        "files_verified": report.files_verified,
        "reader_passes": report.reader_passes,
        "errors": report.errors,
        "daemon_errors": report.daemon_errors,
        "holder_deaths_unasked": report.holder_deaths_unasked,
        "takeover_ms_median": at(0.5),
        "takeover_ms_p99": at(0.99),
        "elapsed_s": report.elapsed.as_secs_f64(),
        "summary": report.summary(),
    });
    format!("{REPORT_PREFIX}{json}")
}

/// The report line `console` carries, parsed.
pub fn report_in(console: &str) -> Option<Value> {
    console.lines().find_map(|line| line.split_once(REPORT_PREFIX)).and_then(|(_, json)| serde_json::from_str(json.trim()).ok())
}

/// `command` as a shell word list for a guest script.
pub fn shell_line(command: &Command) -> String {
    std::iter::once(command.get_program()).chain(command.get_args()).map(|word| format!("'{}'", word.to_string_lossy().replace('\'', r"'\''"))).collect::<Vec<_>>().join(" ")
}

/// Inside the guest, on an fscache mount at `mountpoint` of an image holding `file` (at
/// least `2 * probes` MiB): [`crate::probe::reads_after_kills`] with its serving worker.
pub fn probe_kills(mountpoint: &Path, file: &Path, probes: usize) -> (Vec<f64>, Vec<f64>) {
    crate::probe::reads_after_kills(file, probes, || serving_worker(mountpoint).0)
}

/// The reading benchmark, from the host: boots the cachefiles VM once and, in three
/// interleaved rounds, times `cat` of a 256 MiB file (page cache dropped before each) through
/// fscache cold (empty cache) and warm (cache files kept, a fresh mount), through the FUSE
/// mount cold (empty chunk cache) and warm (chunk cache kept, a fresh mount), and through the
/// kernel's EROFS with image and blob on the guest's disk; then [`probe_kills`]. Everything
/// on the guest's one ext4 disk. Prints each figure and the medians.
pub fn bench(chaos_bin: &Path, kills: usize) {
    let dataset = crate::chaos::fscache_bench_dataset();
    let blob = dataset.root.join("blob");
    if !blob.exists() {
        run_ok(phoenixfs().arg("blob").arg(&dataset.image).arg("--store").arg(&dataset.store).arg("-o").arg(&blob));
    }
    let p = crate::phoenixfs_bin();
    let disk = crate::vm::GUEST_CACHE_DIR;
    let (image, store) = (dataset.image.display(), dataset.store.display());
    let script = format!(
        r#"set -e
ms() {{ echo $(( ($(date +%s%N) - $1) / 1000000 )); }}
timed() {{ sync; echo 3 > /proc/sys/vm/drop_caches; t=$(date +%s%N); cat $2/data/file.bin > /dev/null; echo "RESULT $1 $(ms $t)"; }}
cp {blob} {disk}/blob; cp {image} {disk}/image
mkdir -p /tmp/mnt
for round in 1 2 3; do
  {p} mount --fscache {image} /tmp/mnt --store {store} --cache {disk}/chunks-f$round --fscache-dir {disk}/files$round
  timed fscache-cold /tmp/mnt; {p} umount /tmp/mnt
  {p} mount --fscache {image} /tmp/mnt --store {store} --cache {disk}/chunks-f$round --fscache-dir {disk}/files$round
  timed fscache-warm /tmp/mnt; {p} umount /tmp/mnt
  {p} mount {image} /tmp/mnt --store {store} --cache {disk}/chunks-u$round
  timed fuse-cold /tmp/mnt; {p} umount /tmp/mnt
  {p} mount {image} /tmp/mnt --store {store} --cache {disk}/chunks-u$round
  timed fuse-warm /tmp/mnt; {p} umount /tmp/mnt
  loop=$(losetup --find --show --read-only {disk}/blob)
  mount -t erofs -o ro,device=$loop {disk}/image /tmp/mnt
  timed kernel-local-blob /tmp/mnt; umount /tmp/mnt; losetup -d $loop
done
{p} mount --fscache {image} /tmp/mnt --store {store} --cache {disk}/chunks-probe --fscache-dir {disk}/files-probe
{chaos} fscache-probe --mount /tmp/mnt --file /tmp/mnt/data/file.bin --kills {kills}
{p} umount /tmp/mnt"#,
        blob = blob.display(),
        chaos = chaos_bin.display(),
        p = p.display(),
    );
    let run = crate::vm::Vm { memory_mib: 2048, cpus: 2, cache_disk_mib: 8192, timeout: Duration::from_secs(3600) }.run(&script);
    assert_eq!(run.exit_code, Some(0), "the benchmark failed in the guest:\n{}", run.console);
    let mut results: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for line in run.console.lines() {
        if let Some((_, rest)) = line.split_once("RESULT ") {
            let mut words = rest.split_whitespace();
            if let (Some(what), Some(ms)) = (words.next(), words.next().and_then(|ms| ms.parse::<f64>().ok())) {
                results.entry(what.to_string()).or_default().push(ms);
            }
        }
    }
    let mib_s = |ms: f64| 256.0 / (ms / 1000.0);
    let median = |what: &str| results.get(what).and_then(|v| percentile(v, 0.5));
    println!("256 MiB read with cat in the cachefiles VM (qemu TCG, 2 vCPUs), page cache dropped, 3 rounds:");
    for (what, times) in &results {
        let speeds: Vec<String> = times.iter().map(|&ms| format!("{:.0}", mib_s(ms))).collect();
        println!("  {what:18} median {:6.0} MiB/s  (rounds: {} MiB/s)", median(what).map_or(0.0, mib_s), speeds.join(", "));
    }
    if let (Some(warm), Some(kernel)) = (median("fscache-warm"), median("kernel-local-blob")) {
        println!("  fscache warm / kernel EROFS on a local blob: {:.2}x", kernel / warm);
    }
    if let (Some(fscache), Some(fuse)) = (median("fscache-cold"), median("fuse-cold")) {
        println!("  fscache cold / FUSE cold: {:.2}x", fuse / fscache);
    }
    for line in run.console.lines().filter_map(|l| l.split_once("PROBE ")).map(|(_, rest)| rest) {
        println!("  4 KiB read of a chunk never read, {line}");
    }
}
