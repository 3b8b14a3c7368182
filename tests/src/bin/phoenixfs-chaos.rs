//! `phoenixfs-chaos`: the chaos harness from the command line, for runs too long for the
//! test suite (scripts/chaos, scripts/bench-failover, scripts/bench-takeover). `run` mounts a
//! dataset and kills or upgrades while reader processes (`read`, this same binary) check
//! every byte; `probe` times lookups right after kills of an idle mount's worker; `dataset`
//! builds one and says where it is.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use phoenixfs_tests::chaos::{self, Plan, ReaderKind, Victim};
use phoenixfs_tests::servers::SeaweedFs;
use phoenixfs_tests::{bench_stores, fscache, phoenixfs, probe, run_ok, snapshot};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What to do to the mount while the readers check, and how often.
#[derive(Args)]
struct PlanArgs {
    /// nobody, worker, holder, alternate, upgrade or mixed.
    #[arg(long, value_parser = |s: &str| Victim::parse(s).ok_or("nobody, worker, holder, alternate, upgrade or mixed"))]
    victim: Victim,
    #[arg(long, default_value_t = 50)]
    events: usize,
    #[arg(long, default_value_t = 10)]
    min_ms: u64,
    #[arg(long, default_value_t = 500)]
    max_ms: u64,
    #[arg(long, default_value_t = 4)]
    readers: usize,
}

impl PlanArgs {
    fn plan(&self, min_duration: Duration) -> Plan {
        Plan { victim: self.victim, events: self.events, min_duration, interval_ms: (self.min_ms, self.max_ms.max(self.min_ms)), readers: self.readers }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Mount the dataset with an empty cache and kill or upgrade while readers check.
    Run {
        /// gib (1.05 GiB, 3,000 files), big (/usr-shaped, 112,000 entries) or an absolute
        /// path to a directory to pack as it is.
        #[arg(long, default_value = "gib")]
        dataset: String,
        /// nobody, worker, holder, alternate, upgrade or mixed.
        #[command(flatten)]
        plan: PlanArgs,
        /// Keep going at least this many seconds.
        #[arg(long, default_value_t = 0)]
        seconds: u64,
        /// Print every stall (ms), one per line, to this file.
        #[arg(long)]
        stalls: Option<PathBuf>,
    },
    /// Kill an idle mount's worker and at once look up a new name, KILLS times; prints the
    /// figures (ms).
    Probe {
        /// gib, big, or an absolute path to a directory.
        #[arg(long, default_value = "gib")]
        dataset: String,
        #[arg(long, default_value_t = 30)]
        kills: usize,
        /// Print every probe to this file, one a line: lookup, start-up seen from outside,
        /// the daemon's stall, start-up reported by status (ms, "-" when unknown).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build a dataset unless built, and print where it is and its figures as JSON.
    Dataset {
        /// gib, big, or an absolute path to a directory.
        #[arg(long, default_value = "gib")]
        dataset: String,
    },
    /// Inside the cachefiles VM: mount a dataset (built beforehand) with `mount --fscache` and
    /// an empty cache, kill or upgrade while readers check, print the report line.
    FscacheRun {
        #[arg(long, default_value = "vm")]
        dataset: String,
        #[command(flatten)]
        plan: PlanArgs,
        /// Where the kernel keeps its cache files (a disk, not tmpfs).
        #[arg(long)]
        fscache_dir: PathBuf,
        /// A writable directory for the mountpoint, the chunk cache and the readers' stop file.
        #[arg(long)]
        work: PathBuf,
    },
    /// Inside the cachefiles VM, on an fscache mount: kill the worker and at once read 4 KiB
    /// of a chunk never read before, KILLS times; prints the latencies (ms) with and without
    /// a kill.
    FscacheProbe {
        #[arg(long)]
        mount: PathBuf,
        /// A file of the mount of at least 2 * KILLS MiB.
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 100)]
        kills: usize,
    },
    /// On the host: boot the cachefiles VM and measure, in one run and three interleaved
    /// rounds, `cat` of a 256 MiB file through fscache (cold: empty cache; warm: cache files
    /// kept, page cache dropped), through the FUSE mount (cold, warm) and through the kernel's
    /// EROFS on a local blob; then the read latency after worker kills.
    BenchFscache {
        #[arg(long, default_value_t = 100)]
        kills: usize,
    },
    /// On the host: start SeaweedFS and nginx on 127.0.0.1 and measure push against s3cmd,
    /// cold reads of a 1 GiB file from S3 and nginx against a plain parallel GET client
    /// (ROUNDS interleaved rounds), and reads right after worker kills, S3 against local.
    BenchStores {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 30)]
        kills: usize,
    },
    /// On the host: start SeaweedFS on 127.0.0.1, push IMAGE from STORE to its S3 gateway,
    /// write the S3 store URL to URL_FILE, then SIGKILL and restart the gateway every 1-5 s
    /// until the file STOP exists (with --calm: never); prints how many times. For
    /// scripts/bench-programs.
    ServeS3 {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        image: String,
        #[arg(long)]
        url_file: PathBuf,
        #[arg(long)]
        stop: PathBuf,
        #[arg(long)]
        calm: bool,
    },
    /// Write everything observable about a tree, one entry a line, to OUT (trees on two
    /// machines compare as text).
    Snapshot {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// One reader process (started by `run`).
    Read {
        #[arg(long)]
        mount: PathBuf,
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long, value_parser = |s: &str| ReaderKind::parse(s).ok_or("read, mmap or walk"))]
        kind: ReaderKind,
        #[arg(long)]
        stop: PathBuf,
        #[arg(long, default_value_t = 0)]
        start: usize,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Read { mount, manifest, kind, stop, start } => {
            chaos::reader_main(&mount, &manifest, kind, &stop, start);
            ExitCode::SUCCESS
        }
        Command::Probe { dataset, kills, out } => {
            let dataset = chaos::dataset_named(&dataset);
            let probes = probe::probe(&dataset, kills, &dataset.root.join("cache-probe"));
            let figures = |what: &str, values: Vec<f64>| {
                let at = |p| chaos::percentile(&values, p).map_or("-".into(), |ms| format!("{ms:.1} ms"));
                println!("{what}: median {}, p99 {}, worst {} ({} of {} kills)", at(0.5), at(0.99), at(1.0), values.len(), probes.len());
            };
            figures("lookup after a kill", probes.iter().map(|p| p.lookup_ms).collect());
            figures("worker start-up seen from outside (fork to answer)", probes.iter().filter_map(|p| p.start_ms).collect());
            figures("stall measured by the daemon", probes.iter().map(|p| p.stall_ms).collect());
            figures("worker start-up reported by status", probes.iter().filter_map(|p| p.reported_start_ms).collect());
            if let Some(path) = out {
                let show = |v: Option<f64>| v.map_or("-".into(), |ms| format!("{ms:.3}"));
                let lines: String = probes.iter().map(|p| format!("{:.3} {} {:.3} {}\n", p.lookup_ms, show(p.start_ms), p.stall_ms, show(p.reported_start_ms))).collect();
                std::fs::write(&path, lines).expect("writing the probes");
            }
            ExitCode::SUCCESS
        }
        Command::FscacheRun { dataset, plan, fscache_dir, work } => {
            let dataset = chaos::dataset_named(&dataset);
            let plan = plan.plan(Duration::ZERO);
            let me = std::env::current_exe().expect("this binary");
            let (mountpoint, chunk_cache, stop) = (work.join("mnt"), work.join("chunks"), work.join("stop"));
            let paths = fscache::GuestPaths { mountpoint: &mountpoint, chunk_cache: &chunk_cache, fscache_dir: &fscache_dir, stop: &stop };
            let report = fscache::run(&dataset, &me, &plan, &paths);
            println!("{}", fscache::report_line(&report));
            ExitCode::SUCCESS
        }
        Command::FscacheProbe { mount, file, kills } => {
            let (after_kill, plain) = fscache::probe_kills(&mount, &file, kills);
            let at = |values: &[f64], p| chaos::percentile(values, p).map_or("-".into(), |ms| format!("{ms:.1}"));
            println!("PROBE after-kill median {} p99 {} worst {} ms", at(&after_kill, 0.5), at(&after_kill, 0.99), at(&after_kill, 1.0));
            println!("PROBE no-kill median {} p99 {} worst {} ms", at(&plain, 0.5), at(&plain, 0.99), at(&plain, 1.0));
            ExitCode::SUCCESS
        }
        Command::BenchFscache { kills } => {
            let me = std::env::current_exe().expect("this binary");
            fscache::bench(&me, kills);
            ExitCode::SUCCESS
        }
        Command::BenchStores { rounds, kills } => {
            bench_stores::bench(rounds, kills);
            ExitCode::SUCCESS
        }
        Command::ServeS3 { store, image, url_file, stop, calm } => {
            let mut seaweed = SeaweedFs::start();
            seaweed.create_bucket("programs");
            let url = seaweed.store_url("programs", "image");
            run_ok(phoenixfs().arg("push").arg(&image).arg("--store").arg(&store).arg("--to").arg(&url));
            std::fs::write(&url_file, &url).expect("writing the URL file");
            let mut rng = chaos::XorShift(u64::from(std::process::id()) | 1);
            let mut restarts = 0;
            'serving: loop {
                let pause = Instant::now() + Duration::from_millis(1000 + rng.next_u64() % 4001);
                while Instant::now() < pause {
                    if stop.exists() {
                        break 'serving;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                if !calm {
                    seaweed.s3.restart();
                    restarts += 1;
                }
            }
            println!("S3 gateway SIGKILLed and restarted {restarts} times");
            ExitCode::SUCCESS
        }
        Command::Snapshot { dir, out } => {
            std::fs::write(&out, snapshot::snapshot_lines(&snapshot::snapshot_dir(&dir))).expect("writing the snapshot");
            ExitCode::SUCCESS
        }
        Command::Dataset { dataset } => {
            let started = std::time::Instant::now();
            let dataset = chaos::dataset_named(&dataset);
            let figures = serde_json::json!({
                "image": dataset.image,
                "store": dataset.store,
                "manifest": dataset.manifest,
                "entries": dataset.entries,
                "files_and_symlinks": dataset.files,
                "file_bytes": dataset.bytes,
                "image_bytes": dataset.image_bytes(),
                "seconds": started.elapsed().as_secs_f64(),
            });
            println!("{figures}");
            ExitCode::SUCCESS
        }
        Command::Run { dataset, plan, seconds, stalls } => {
            let dataset = chaos::dataset_named(&dataset);
            let plan = plan.plan(Duration::from_secs(seconds));
            let me = std::env::current_exe().expect("this binary");
            let report = chaos::run(&dataset, &me, &plan, &dataset.root.join("cache-cli"));
            println!("{}", report.summary());
            if let Some(path) = stalls {
                let lines: String = report.stalls_ms.iter().map(|ms| format!("{ms}\n")).collect();
                std::fs::write(&path, lines).expect("writing the stalls");
            }
            if report.errors == 0 && report.daemon_errors == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
    }
}
