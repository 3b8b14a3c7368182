use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use phoenixfs_daemon::{query_status, MountConfig, MountSpec, Prefetch, Unmounted};
use phoenixfs_store::{LocalStore, StoreUrl};


/// When files are opened in passthrough mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Passthrough {
    /// When at least a quarter of the image's files are --passthrough-min or larger.
    Auto,
    On,
    Off,
}

pub struct MountArgs {
    pub image: String,
    pub mountpoint: PathBuf,
    /// The store, then its mirrors.
    pub store: Vec<StoreUrl>,
    pub fetch_deadline: Option<Duration>,
    pub cache: Option<PathBuf>,
    pub cache_size: u64,
    pub memory_cache: u64,
    pub foreground: bool,
    pub prefetch_list: Option<PathBuf>,
    pub prefetch_all: bool,
    pub readahead: u64,
    pub threads: Option<usize>,
    pub passthrough_min: u64,
    pub passthrough_cache: u64,
    pub passthrough: Passthrough,
    /// How many -v were given.
    pub log_level: u8,
}

/// `$XDG_CACHE_HOME/phoenixfs` when set, else /var/cache/phoenixfs.
fn default_cache_dir() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join("phoenixfs"),
        _ => PathBuf::from("/var/cache/phoenixfs"),
    }
}

/// An image argument as the daemon keeps it: a file's absolute path, or an image id.
pub fn image_argument(image: &str) -> String {
    match std::fs::canonicalize(image) {
        Ok(path) => path.display().to_string(),
        Err(_) => image.to_string(),
    }
}

/// The store's URL and its mirrors', as the daemon keeps them.
pub fn store_arguments(stores: &[StoreUrl]) -> (String, Vec<String>) {
    let mut urls = stores.iter().map(StoreUrl::to_string);
    (urls.next().expect("clap requires a --store"), urls.collect())
}

/// The chunk cache directory, absolute: the one given, or the default.
pub fn cache_dir(given: Option<PathBuf>) -> PathBuf {
    let dir = given.unwrap_or_else(default_cache_dir);
    std::path::absolute(&dir).unwrap_or(dir)
}

pub fn run(args: MountArgs) -> Result<ExitCode> {
    phoenixfs_daemon::preflight(&args.mountpoint)?;
    // The daemon loads and verifies the image once, before it mounts anything: a bad image
    // or store is reported then, in one line.
    for url in &args.store {
        if let StoreUrl::Local(root) = url {
            LocalStore::open(root)?;
        }
    }
    let (store, mirrors) = store_arguments(&args.store);
    let image = image_argument(&args.image);
    let prefetch = match (&args.prefetch_list, args.prefetch_all) {
        (_, true) => Prefetch::All,
        (Some(list), false) => {
            let text = std::fs::read_to_string(list).with_context(|| format!("reading prefetch list {}", list.display()))?;
            Prefetch::Paths(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        }
        (None, false) => Prefetch::Nothing,
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spec = MountSpec {
        image,
        store,
        mirrors,
        fetch_deadline_ms: args.fetch_deadline.map(|d| d.as_millis() as u64),
        cache_dir: cache_dir(args.cache),
        cache_limit: args.cache_size,
        memory_limit: args.memory_cache,
        mountpoint: args.mountpoint,
        threads: args.threads.unwrap_or((2 * cores).max(4)),
        readahead: args.readahead,
        prefetch,
        allow_other: true,
        progress: args.foreground && std::io::stderr().is_terminal(),
        owner_uid: nix::unistd::getuid().as_raw(),
        log_level: args.log_level,
        passthrough_min: args.passthrough_min,
        passthrough_budget: if args.passthrough == Passthrough::Off { 0 } else { args.passthrough_cache },
        passthrough_auto: args.passthrough == Passthrough::Auto,
    };
    phoenixfs_daemon::mount(MountConfig { spec, foreground: args.foreground })?;
    Ok(ExitCode::SUCCESS)
}

/// The hidden `worker` subcommand: started by a mount's holder, never by hand.
pub fn worker() -> Result<ExitCode> {
    phoenixfs_daemon::run_worker()?;
    Ok(ExitCode::SUCCESS)
}

/// The hidden `holder` subcommand: started by a worker whose holder died, never by hand.
pub fn holder() -> Result<ExitCode> {
    phoenixfs_daemon::run_adopting_holder()?;
    Ok(ExitCode::SUCCESS)
}

pub fn upgrade(mountpoint: &Path, binary: Option<PathBuf>) -> Result<ExitCode> {
    let canonical = std::fs::canonicalize(mountpoint).with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    let binary = match binary {
        Some(path) => std::fs::canonicalize(&path).with_context(|| format!("binary {}", path.display()))?,
        None => std::env::current_exe().context("finding this binary")?,
    };
    if phoenixfs_daemon::fscache::is_fscache_mount(&canonical) {
        return super::fscache::upgrade(&binary);
    }
    let pid = phoenixfs_daemon::request_upgrade(&canonical, &binary).with_context(|| format!("upgrading {}", canonical.display()))?;
    println!("{}: worker {pid} from {} serves now", canonical.display(), binary.display());
    Ok(ExitCode::SUCCESS)
}

pub fn umount(mountpoint: &Path) -> Result<ExitCode> {
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or(mountpoint.to_path_buf());
    if phoenixfs_daemon::fscache::is_fscache_mount(&canonical) {
        return super::fscache::umount(&canonical);
    }
    let holder = query_status(&std::fs::canonicalize(mountpoint).unwrap_or(mountpoint.to_path_buf())).ok().map(|s| s.holder_pid);
    match phoenixfs_daemon::unmount(mountpoint)? {
        Unmounted::Detached => {
            eprintln!("{} is busy: detached now; its daemon exits when the last open file is closed", mountpoint.display());
        }
        Unmounted::Clean => {
            if let Some(pid) = holder {
                let deadline = Instant::now() + Duration::from_secs(10);
                while phoenixfs_daemon::process_alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

