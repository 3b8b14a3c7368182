//! The mount lifecycle: checks, mount(2), INIT, backgrounding, serving, unmounting.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::fcntl::OFlag;
use nix::unistd::{fork, pipe2, setsid, ForkResult};
use phoenixfs_cache::{CacheError, ChunkCache};
use phoenixfs_format::{ExtentTarget, InodeKind};
use phoenixfs_fuse::session::SessionError;
use phoenixfs_fuse::{MountOptions, Session};
use phoenixfs_store::{load_image, ChunkStore, LocalStore};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

use crate::control::{self, Status};
use crate::fs::ImageFs;
use crate::handover::{self, State};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prefetch {
    Nothing,
    All,
    /// Paths inside the image.
    Paths(Vec<String>),
}

/// Everything a worker needs to serve a mount, from the holder: serialisable, so a new
/// process (a restarted worker, a new binary) can be given it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// An image file path or an image id in `store` (see `phoenixfs_store::load_image`).
    pub image: String,
    pub store: PathBuf,
    pub cache_dir: PathBuf,
    pub cache_limit: u64,
    pub memory_limit: u64,
    pub mountpoint: PathBuf,
    pub threads: usize,
    pub readahead: u64,
    pub prefetch: Prefetch,
    pub allow_other: bool,
    /// Show a prefetch progress line on stderr.
    pub progress: bool,
}

#[cfg(test)]
impl MountSpec {
    pub(crate) fn for_tests() -> Self {
        MountSpec {
            image: "image.phx".into(),
            store: "/store".into(),
            cache_dir: "/cache".into(),
            cache_limit: 1 << 30,
            memory_limit: 1 << 20,
            mountpoint: "/mnt".into(),
            threads: 4,
            readahead: 1 << 20,
            prefetch: Prefetch::Paths(vec!["a".into()]),
            allow_other: true,
            progress: false,
        }
    }
}

pub struct MountConfig {
    pub spec: MountSpec,
    pub foreground: bool,
}

#[derive(Debug, Error)]
pub enum MountError {
    #[error("mounting needs root (CAP_SYS_ADMIN)")]
    NotRoot,
    #[error("/dev/fuse is missing: load the fuse module (modprobe fuse)")]
    NoFuse,
    #[error("mountpoint {}: {detail}", path.display())]
    Mountpoint { path: PathBuf, detail: String },
    #[error("cache: {0}")]
    Cache(#[from] CacheError),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("the mount daemon failed to start: {0}")]
    Daemon(String),
}

/// One line of /proc/self/mountinfo.
struct MountInfo {
    mountpoint: PathBuf,
    /// "major:minor" of the mounted file system.
    device: String,
    fstype: String,
}

fn mount_table() -> Result<Vec<MountInfo>, MountError> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| MountError::Io { what: "reading /proc/self/mountinfo".into(), source })?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(MountInfo {
                mountpoint: PathBuf::from(unescape(fields.get(4)?)),
                device: fields.get(2)?.to_string(),
                fstype: fields.get(dash + 1)?.to_string(),
            })
        })
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            out.push(u8::from_str_radix(&field[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mountpoints of every phoenixfs mount in this mount namespace.
pub fn phoenixfs_mountpoints() -> Result<Vec<PathBuf>, MountError> {
    Ok(mount_table()?.into_iter().filter(|m| m.fstype == "fuse.phoenixfs").map(|m| m.mountpoint).collect())
}

/// The canonical mountpoint, if it is an existing directory that nothing is mounted on.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    let bad = |detail: &str| MountError::Mountpoint { path: path.to_path_buf(), detail: detail.to_string() };
    let canonical = fs::canonicalize(path).map_err(|e| bad(&e.to_string()))?;
    if !canonical.is_dir() {
        return Err(bad("not a directory"));
    }
    if mount_table()?.iter().any(|m| m.mountpoint == canonical) {
        return Err(bad("something is already mounted there"));
    }
    Ok(canonical)
}

/// Everything `mount` needs of the machine: root, /dev/fuse, a free directory to mount on.
/// Returns the canonical mountpoint.
pub fn preflight(mountpoint: &Path) -> Result<PathBuf, MountError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(MountError::NotRoot);
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoFuse);
    }
    check_mountpoint(mountpoint)
}

/// Mounts the image and serves it; in the background unless `foreground`. Returns once the
/// mount is ready (background) or unmounted (foreground).
pub fn mount(config: MountConfig) -> Result<(), MountError> {
    let mut spec = config.spec;
    let mountpoint = preflight(&spec.mountpoint)?;
    spec.mountpoint = mountpoint.clone();
    let fd = phoenixfs_fuse::mount(&mountpoint, &MountOptions { source: spec.image.clone(), allow_other: spec.allow_other })?;
    if config.foreground {
        return hold(spec, fd, None);
    }
    let (ready_read, ready_write) = pipe2(OFlag::O_CLOEXEC).map_err(|e| MountError::Io { what: "creating a pipe".into(), source: e.into() })?;
    // SAFETY: no other thread exists yet in this process (nothing above spawns one), so the
    // child may do anything.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => {
            drop(ready_write);
            drop(fd);
            let mut message = String::new();
            let _ = fs::File::from(ready_read).read_to_string(&mut message);
            match message.strip_prefix("ok") {
                Some(_) => Ok(()),
                None if message.is_empty() => Err(MountError::Daemon("it exited during start-up".into())),
                None => Err(MountError::Daemon(message.trim().to_string())),
            }
        }
        Ok(ForkResult::Child) => {
            drop(ready_read);
            let _ = setsid();
            redirect_stdio(&mountpoint);
            let code = match hold(spec, fd, Some(ready_write)) {
                Ok(()) => 0,
                Err(e) => {
                    warn!(error = %e, "mount daemon failed");
                    1
                }
            };
            std::process::exit(code);
        }
        Err(e) => {
            let _ = umount2(&mountpoint, MntFlags::MNT_DETACH);
            Err(MountError::Io { what: "forking the mount daemon".into(), source: e.into() })
        }
    }
}

/// The daemon's stdin and stdout go to /dev/null, its log (stderr) to /run/phoenixfs/<key>.log.
fn redirect_stdio(mountpoint: &Path) {
    let log = control::log_path(mountpoint);
    let null = fs::OpenOptions::new().read(true).write(true).open("/dev/null");
    let log = fs::OpenOptions::new().create(true).append(true).open(log);
    if let Ok(null) = null {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
        if log.is_err() {
            let _ = nix::unistd::dup2(null.as_raw_fd(), 2);
        }
    }
    if let Ok(log) = log {
        let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
    }
}

/// The holder: answers INIT, keeps the FUSE fd and the session state, and (re)starts the
/// worker that serves, handing it both. It never reads a request after INIT. Runs until the
/// file system is unmounted (the worker then exits cleanly). Failures before the first worker
/// serves unmount and are reported on `ready`.
fn hold(spec: MountSpec, fd: OwnedFd, ready: Option<OwnedFd>) -> Result<(), MountError> {
    let mountpoint = spec.mountpoint.clone();
    // The one answer to `mount`'s parent: "ok" or why not; closing the pipe ends its wait.
    let ready = std::cell::RefCell::new(ready);
    let report = |message: &str| {
        if let Some(ready) = ready.borrow_mut().take() {
            let _ = nix::unistd::write(&ready, message.as_bytes());
        }
    };
    let fail = |e: MountError| {
        let _ = umount2(&mountpoint, MntFlags::MNT_DETACH);
        report(&format!("{e}\n"));
        e
    };
    let session = Session::init(fd).map_err(|e| fail(e.into()))?;
    let params = *session.params();
    if !params.has_resend() {
        warn!("this kernel cannot resend FUSE requests (FUSE_HAS_RESEND, Linux 6.9+): requests in flight when the worker dies may hang");
    }
    set_kernel_readahead(&mountpoint);
    // Termination signals unmount; the worker then sees the connection end and exits cleanly.
    let signals = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP]);
    let _ = signals.thread_block();
    let signal_mountpoint = mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                info!(%signal, "unmounting");
                let _ = umount2(&signal_mountpoint, MntFlags::MNT_DETACH);
            }
        })
        .map_err(|source| fail(MountError::Io { what: "spawning the signal thread".into(), source }))?;

    let mut restarts = 0u64;
    let mut quick_failures = 0u32;
    let mut serving = false;
    loop {
        let started = Instant::now();
        let state = State { params, spec: spec.clone(), restarts, holder_pid: std::process::id() };
        let (mut worker, answer) = match start_worker(&state, session.fd()) {
            Ok(started) => started,
            Err(e) if !serving => return Err(fail(e)),
            Err(e) => {
                warn!(error = %e, "cannot start a worker; retrying");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if !serving {
            match answer.strip_prefix("ok") {
                Some(_) => {
                    serving = true;
                    report("ok\n");
                }
                None => {
                    let _ = worker.wait();
                    let why = if answer.is_empty() { "the worker exited during start-up".to_string() } else { answer.trim().to_string() };
                    return Err(fail(MountError::Daemon(why)));
                }
            }
        }
        let status = worker.wait().map_err(|source| MountError::Io { what: "waiting for the worker".into(), source })?;
        if status.success() {
            info!(mountpoint = %mountpoint.display(), "unmounted");
            return Ok(());
        }
        restarts += 1;
        warn!(pid = worker.id(), %status, restarts, "worker died; starting another");
        if started.elapsed() < Duration::from_secs(1) {
            quick_failures += 1;
            std::thread::sleep(Duration::from_millis(10 << quick_failures.min(8)));
        } else {
            quick_failures = 0;
        }
    }
}

/// Starts `phoenixfs worker` (this same binary) with a hand-over socket as its fd 3, hands it
/// the state and the FUSE fd, and waits for its first line ("ok", or why it failed).
fn start_worker(state: &State, fuse: BorrowedFd<'_>) -> Result<(Child, String), MountError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source: io::Error| MountError::Io { what: what.clone(), source }
    };
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| io("creating the hand-over socket")(e.into()))?;
    let theirs_raw = theirs.as_raw_fd();
    let binary = std::env::current_exe().map_err(io("finding this binary"))?;
    let mut command = Command::new(binary);
    command.arg("worker").stdin(Stdio::null()).process_group(0);
    // SAFETY: dup2 is async-signal-safe; fd 3 in the child becomes the hand-over socket
    // (dup2 clears close-on-exec on the copy).
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(theirs_raw, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(io("starting the worker"))?;
    drop(theirs);
    handover::send(ours.as_fd(), state, fuse).map_err(|e| MountError::Daemon(e.to_string()))?;
    let mut answer = vec![0u8; 4096];
    let n = nix::unistd::read(ours.as_raw_fd(), &mut answer).unwrap_or(0);
    Ok((child, String::from_utf8_lossy(&answer[..n]).into_owned()))
}

/// The worker: takes over the connection from the holder (fd 3), asks the kernel to resend
/// what a dead predecessor left unanswered, and serves until unmounted. Refuses state it
/// cannot read.
pub fn run_worker() -> Result<(), MountError> {
    // SAFETY: the holder started this process with the hand-over socket as fd 3, and nothing
    // else in this process owns fd 3.
    let socket = unsafe { OwnedFd::from_raw_fd(3) };
    let answer = |message: &str| {
        let _ = nix::unistd::write(&socket, message.as_bytes());
    };
    let (state, fuse) = handover::receive(socket.as_fd()).map_err(|e| {
        answer(&format!("{e}\n"));
        MountError::Daemon(e.to_string())
    })?;
    let started = start_serving(&state, fuse);
    let (session, fs) = match started {
        Ok(started) => started,
        Err(e) => {
            answer(&format!("{e}\n"));
            return Err(e);
        }
    };
    answer("ok\n");
    drop(socket);
    session.serve(fs, state.spec.threads)?;
    Ok(())
}

fn start_serving(state: &State, fuse: OwnedFd) -> Result<(Session, Arc<ImageFs>), MountError> {
    let spec = &state.spec;
    let store = LocalStore::open(&spec.store).map_err(|e| MountError::Daemon(e.to_string()))?;
    let image = load_image(&spec.image, Some(&store)).map_err(|e| MountError::Daemon(e.to_string()))?;
    let cache = Arc::new(ChunkCache::open(&spec.cache_dir, spec.cache_limit, spec.memory_limit)?);
    let session = Session::resume(fuse, state.params);
    if state.params.has_resend() {
        session.notify_resend()?;
    }
    let store_location = store.location();
    let image = Arc::new(image);
    let fs = ImageFs::new(image.clone(), Arc::new(store), cache, spec.readahead);
    let status_fs = fs.clone();
    let (status_spec, params, restarts, holder_pid) = (spec.clone(), state.params, state.restarts, state.holder_pid);
    let log = if nix::unistd::isatty(2).unwrap_or(false) { "stderr".to_string() } else { control::log_path(&spec.mountpoint).display().to_string() };
    control::serve(&spec.mountpoint, move || {
        let cache = &status_fs.cache;
        let (cache_chunks, cache_bytes) = cache.disk_usage();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        Status {
            pid: std::process::id(),
            holder_pid,
            worker_restarts: restarts,
            mountpoint: status_spec.mountpoint.display().to_string(),
            image: status_spec.image.clone(),
            image_id: status_fs.image.id.to_string(),
            store: store_location.clone(),
            cache_dir: cache.dir().display().to_string(),
            cache_chunks,
            cache_bytes,
            cache_limit: status_spec.cache_limit,
            chunks_fetched: load(&cache.stats.fetches),
            fetched_bytes: load(&cache.stats.fetched_bytes),
            cache_hits: load(&cache.stats.memory_hits) + load(&cache.stats.disk_hits),
            cache_misses: load(&cache.stats.fetches),
            corrupt_cache_entries_discarded: load(&cache.stats.corrupt_discarded),
            bytes_served: load(&status_fs.stats.bytes_served),
            requests: load(&status_fs.stats.requests),
            errors: load(&status_fs.stats.errors),
            log: log.clone(),
            fuse_kernel_minor: params.kernel_minor,
            fuse_resend_supported: params.has_resend(),
        }
    })
    .map_err(|source| MountError::Io { what: "creating the status socket".into(), source })?;
    // Prefetch once per mount, not again after every restart.
    if restarts == 0 && spec.prefetch != Prefetch::Nothing {
        let (fs, prefetch, progress) = (fs.clone(), spec.prefetch.clone(), spec.progress);
        std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || prefetch_chunks(&fs, &prefetch, progress))
            .map_err(|source| MountError::Io { what: "spawning the prefetch thread".into(), source })?;
    }
    info!(mountpoint = %spec.mountpoint.display(), image = %image.id, restarts, "worker serving");
    Ok((session, fs))
}

/// Lets the kernel read ahead as much as one READ can carry (1 MiB instead of the default
/// 128 KiB), so sequential readers cost a quarter of the requests. The device number comes
/// from mountinfo: a stat of the mount itself would wait for this very daemon.
fn set_kernel_readahead(mountpoint: &Path) {
    let Some(device) = mount_table().ok().and_then(|t| t.into_iter().rev().find(|m| m.mountpoint == mountpoint)).map(|m| m.device) else {
        return warn!("cannot find the mount in mountinfo to raise its readahead");
    };
    let path = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(error) = fs::write(&path, "1024") {
        warn!(path, %error, "cannot raise the kernel's readahead");
    }
}

/// Warms the cache with the chunks of the listed files (or of every file), one at a time at
/// the lowest CPU priority, after the mount is serving.
fn prefetch_chunks(fs: &ImageFs, prefetch: &Prefetch, progress: bool) {
    // SAFETY: setpriority with who = 0 changes only the calling thread on Linux.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    let bootstrap = &fs.image.bootstrap;
    let inodes = match prefetch {
        Prefetch::Nothing => return,
        Prefetch::All => match bootstrap.walk() {
            Ok(all) => all.into_iter().map(|(_, inode)| inode).collect(),
            Err(error) => return warn!(%error, "cannot list the image for prefetch"),
        },
        Prefetch::Paths(paths) => paths
            .iter()
            .filter_map(|path| match bootstrap.resolve(path.as_bytes()) {
                Ok(Some(inode)) => Some(inode),
                _ => {
                    warn!(path, "prefetch: no such file in the image");
                    None
                }
            })
            .collect::<Vec<_>>(),
    };
    let mut chunks = BTreeSet::new();
    let mut ordered = Vec::new();
    for inode in inodes.iter().filter(|i| i.kind == InodeKind::File) {
        for extent in bootstrap.extents(inode, 0, inode.size()).unwrap_or_default() {
            if let ExtentTarget::Blob { offset } = extent.target {
                let index = (offset >> fs.image.table.chunk_bits) as usize;
                if chunks.insert(index) {
                    ordered.push(index);
                }
            }
        }
    }
    let total = ordered.len();
    for (done, index) in ordered.into_iter().enumerate() {
        if let Some(entry) = fs.image.table.entries.get(index) {
            if let Err(error) = fs.cache.get(entry, fs.store.as_ref()) {
                warn!(chunk = index, %error, "prefetch fetch failed");
            }
        }
        if progress {
            eprint!("\rprefetch: {}/{total} chunks", done + 1);
        }
    }
    if progress {
        eprintln!();
    }
    info!(chunks = total, "prefetch done");
}

/// What `unmount` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    Clean,
    /// Files were open: the mount is detached now, the daemon exits when the last closes.
    Detached,
}

pub fn unmount(mountpoint: &Path) -> Result<Unmounted, MountError> {
    let bad = |detail: &str| MountError::Mountpoint { path: mountpoint.to_path_buf(), detail: detail.to_string() };
    let canonical = fs::canonicalize(mountpoint).map_err(|e| bad(&e.to_string()))?;
    let is_ours = mount_table()?.iter().any(|m| m.mountpoint == canonical && m.fstype == "fuse.phoenixfs");
    if !is_ours {
        return Err(bad("not a phoenixfs mount"));
    }
    match umount2(&canonical, MntFlags::empty()) {
        Ok(()) => Ok(Unmounted::Clean),
        Err(Errno::EBUSY) => {
            umount2(&canonical, MntFlags::MNT_DETACH).map_err(|e| bad(&e.to_string()))?;
            Ok(Unmounted::Detached)
        }
        Err(e) => Err(bad(&e.to_string())),
    }
}
