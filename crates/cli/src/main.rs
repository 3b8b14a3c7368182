//! `phoenixfs`: the command line.
//!
//! Owns: argument parsing, turning library errors into one clear line and a non-zero exit,
//! logging setup, and what each command prints. Must never: hold logic a daemon or a test
//! would need too; that lives in the library crates.

mod commands;
mod args;
mod mount_helper;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use phoenixfs_store::StoreUrl;

#[derive(Parser)]
#[command(name = "phoenixfs", version, about = "Lazy-loading, kill-proof read-only file system images")]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pack a directory or a tar stream into an image: chunks into STORE, the image file to IMAGE.
    Build {
        /// The directory to pack; or a tar file (plain, .gz or .zst: told by its content), or
        /// `-` for a tar stream on stdin, packed without unpacking it.
        src: PathBuf,
        #[command(flatten)]
        output: commands::build::OutputArgs,
    },
    /// Convert a container image into an image: its layers applied in order (with their
    /// whiteouts), chunks into STORE, the image file to IMAGE; the manifest digest and the
    /// image config (entrypoint, env, ...) are recorded in the image.
    Convert {
        /// oci://HOST/REPO[:TAG|@sha256:HEX] (a registry; plain http on loopback, else https),
        /// or an OCI image layout directory DIR or DIR:TAG.
        source: String,
        #[command(flatten)]
        output: commands::build::OutputArgs,
    },
    /// Show what an image holds.
    Inspect {
        /// An image file, or an image id in --store.
        image: String,
        #[arg(long, value_parser = args::parse_store)]
        store: Option<StoreUrl>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Read and verify every chunk an image needs; exit non-zero if any is missing or corrupt.
    Check {
        /// An image file, or an image id in --store.
        image: String,
        #[arg(long, value_parser = args::parse_store)]
        store: StoreUrl,
    },
    /// Copy an image and the chunks a store lacks to that store (run it again after an
    /// interruption: it sends only what is missing).
    Push {
        /// An image file, or an image id in --store.
        image: String,
        /// The store the image's chunks are in.
        #[arg(long, value_parser = args::parse_store)]
        store: Option<StoreUrl>,
        /// The store to copy to: a local directory or s3://BUCKET/PREFIX[?endpoint=URL].
        #[arg(long, value_parser = args::parse_store)]
        to: StoreUrl,
        /// Uploads at once.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
        jobs: u16,
    },
    /// Mount an image; its chunks are fetched from STORE when first read.
    Mount {
        /// An image file, or an image id in --store.
        image: String,
        mountpoint: PathBuf,
        /// The chunk store: a local directory, s3://BUCKET/PREFIX[?endpoint=URL&region=NAME],
        /// or http(s)://HOST/PATH. Give it again for mirrors, tried in turn when one fails.
        #[arg(long, value_parser = args::parse_store, required = true)]
        store: Vec<StoreUrl>,
        /// Fail a read with EIO when its data cannot be fetched for this long (like 30s);
        /// by default a read waits for a store that is down, as on an NFS hard mount.
        #[arg(long, value_parser = args::parse_duration)]
        fetch_deadline: Option<Duration>,
        /// Cache directory [default: $XDG_CACHE_HOME/phoenixfs or /var/cache/phoenixfs].
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Size limit of the cache directory (suffixes K, M, G, T).
        #[arg(long, default_value = "10G", value_parser = commands::build::parse_size)]
        cache_size: u64,
        /// Chunks kept in memory, shared by the mount's worker generations so that a new
        /// worker starts warm (0: none; each worker then keeps only a small one of its own).
        #[arg(long, default_value = "256M", value_parser = commands::build::parse_size)]
        memory_cache: u64,
        /// Stay in the foreground (logs on stderr) instead of running as a daemon.
        #[arg(long)]
        foreground: bool,
        /// A file listing paths in the image (one per line) to fetch in the background.
        #[arg(long)]
        prefetch: Option<PathBuf>,
        /// Fetch the whole image in the background.
        #[arg(long)]
        prefetch_all: bool,
        /// How far ahead of a sequential reader to fetch (0 disables readahead).
        #[arg(long, default_value = "16M", value_parser = commands::build::parse_size)]
        readahead: u64,
        /// Threads serving FUSE requests [default: twice the cores, at least 4].
        #[arg(long)]
        threads: Option<usize>,
        /// Files at least --passthrough-min large, once all their chunks are cached, are copied
        /// whole into the cache directory and read by the kernel from there (FUSE passthrough,
        /// Linux 6.9+), as fast as the disk file system's page cache; but then every open of
        /// any file is a round trip to the daemon. `auto`: when at least a quarter of the
        /// image's files are that large (models, data set shards; not a container's /usr).
        #[arg(long, value_enum, default_value = "auto")]
        passthrough: commands::mount::Passthrough,
        /// See --passthrough.
        #[arg(long, default_value = "1M", value_parser = commands::build::parse_size)]
        passthrough_min: u64,
        /// Size limit of those copies [default: a quarter of --cache-size] (0: no passthrough).
        #[arg(long, value_parser = commands::build::parse_size)]
        passthrough_cache: Option<u64>,
        /// Mount with the kernel's own EROFS over fscache (cachefiles on-demand mode, Linux
        /// 6.8+) instead of FUSE, served by the host's one fscache daemon (started when none runs).
        #[arg(long)]
        fscache: bool,
        /// With --fscache: images of one domain share the cache files of identical blobs.
        #[arg(long, requires = "fscache")]
        domain: Option<String>,
        /// With --fscache: where the kernel keeps its cache files (not tmpfs), when this
        /// mount starts the daemon.
        #[arg(long, default_value = "/var/cache/phoenixfs/fscache", requires = "fscache")]
        fscache_dir: PathBuf,
    },
    /// Unmount a phoenixfs mount (detached lazily when files are still open).
    Umount { mountpoint: PathBuf },
    /// Replace a mount's worker with one from BINARY while applications read: nothing is
    /// lost, resent or answered twice; if the new worker fails to start, the old one serves on.
    Upgrade {
        mountpoint: PathBuf,
        /// The binary to run the new worker from [default: this one].
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Serve a mount for its holder (started by a holder, not by hand).
    #[command(hide = true)]
    Worker,
    /// Hold a mount for a worker whose holder died (started by a worker, not by hand).
    #[command(hide = true)]
    Holder,
    /// The host's fscache daemon, which serves `mount --fscache` images to the kernel (started
    /// by the first such mount; runs until the last is unmounted).
    FscacheDaemon {
        /// Where the kernel keeps its cache files (not tmpfs).
        #[arg(long)]
        cache_dir: PathBuf,
    },
    /// Serve the fscache daemon for its holder (started by the daemon, not by hand).
    #[command(hide = true)]
    FscacheWorker,
    /// Hold the fscache daemon for a worker whose holder died (not by hand).
    #[command(hide = true)]
    FscacheHolder,
    /// Show what a mount (or every phoenixfs mount) is doing.
    Status {
        mountpoint: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Serve every mount's metrics to Prometheus at http://ADDR/metrics (text exposition
    /// format), read from the mounts' status sockets at each scrape.
    Exporter {
        /// The address to listen on, e.g. 127.0.0.1:9420.
        #[arg(long, default_value = "127.0.0.1:9420")]
        listen: std::net::SocketAddr,
        /// Print the metrics once to stdout and exit.
        #[arg(long)]
        once: bool,
    },
    /// Write an image's data blob, uncompressed, to a file (for the kernel's own EROFS:
    /// `mount -t erofs -o device=BLOB IMAGE DIR`).
    Blob {
        /// An image file, or an image id in --store.
        image: String,
        #[arg(long, value_parser = args::parse_store)]
        store: StoreUrl,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let program = std::env::args_os().next().map(PathBuf::from);
    let cli = match program.as_deref().and_then(|p| p.file_name()).is_some_and(|name| name == mount_helper::HELPER_NAME) {
        true => {
            let args: Result<Vec<String>, _> = std::env::args_os().skip(1).map(|a| a.into_string()).collect();
            match args.map_err(|a| format!("{a:?} is not UTF-8")).and_then(|args| mount_helper::command_line(&args)) {
                Ok(mount_helper::HelperCall::Mount(line)) => Cli::parse_from(line),
                Ok(mount_helper::HelperCall::Fake) => return ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("{}: {error}", mount_helper::HELPER_NAME);
                    return ExitCode::from(1);
                }
            }
        }
        false => Cli::parse(),
    };
    // A mount's daemon logs its life (takeovers, stalls, upgrades) by default.
    let daemon = matches!(cli.command, Command::Mount { .. } | Command::Worker | Command::Holder | Command::FscacheDaemon { .. } | Command::FscacheWorker | Command::FscacheHolder);
    init_logging(cli.verbose + u8::from(daemon));
    let result = match cli.command {
        Command::Build { src, output } => commands::build::run(&src, &output),
        Command::Convert { source, output } => commands::build::convert(&source, &output),
        Command::Inspect { image, store, json } => commands::inspect::run(&image, store.as_ref(), json),
        Command::Push { image, store, to, jobs } => commands::push::run(&image, store.as_ref(), &to, usize::from(jobs)),
        Command::Check { image, store } => commands::check::run(&image, &store),
        Command::Blob { image, store, output } => commands::blob::run(&image, &store, &output),
        Command::Mount { image, mountpoint, store, cache, cache_size, fscache: true, domain, fscache_dir, .. } => {
            let (store, mirrors) = commands::mount::store_arguments(&store);
            commands::fscache::mount(phoenixfs_daemon::fscache::FscacheMount {
                image: commands::mount::image_argument(&image),
                mountpoint,
                store,
                mirrors,
                cache_dir: commands::mount::cache_dir(cache),
                cache_limit: cache_size,
                domain,
                fscache_dir,
                log_level: cli.verbose,
            })
        }
        Command::Mount { image, mountpoint, store, fetch_deadline, cache, cache_size, memory_cache, foreground, prefetch, prefetch_all, readahead, threads, passthrough, passthrough_min, passthrough_cache, .. } => {
            commands::mount::run(commands::mount::MountArgs {
                image,
                mountpoint,
                store,
                fetch_deadline,
                cache,
                cache_size,
                memory_cache,
                foreground,
                prefetch_list: prefetch,
                prefetch_all,
                readahead,
                threads,
                passthrough,
                passthrough_min,
                passthrough_cache: passthrough_cache.unwrap_or(cache_size / 4),
                log_level: cli.verbose,
            })
        }
        Command::Upgrade { mountpoint, binary } => commands::mount::upgrade(&mountpoint, binary),
        Command::Umount { mountpoint } => commands::mount::umount(&mountpoint),
        Command::Worker => commands::mount::worker(),
        Command::Holder => commands::mount::holder(),
        Command::FscacheDaemon { cache_dir } => phoenixfs_daemon::fscache::run_fscache_daemon(&cache_dir, cli.verbose).map(|()| ExitCode::SUCCESS).map_err(Into::into),
        Command::FscacheWorker => phoenixfs_daemon::fscache::run_fscache_worker().map(|()| ExitCode::SUCCESS).map_err(Into::into),
        Command::FscacheHolder => phoenixfs_daemon::fscache::run_adopting_fscache_holder().map(|()| ExitCode::SUCCESS).map_err(Into::into),
        Command::Status { mountpoint, json } => commands::status::run(mountpoint.as_deref(), json),
        Command::Exporter { listen, once } => commands::exporter::run(listen, once),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("phoenixfs: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose words the line already
/// has (library errors often quote their source).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
