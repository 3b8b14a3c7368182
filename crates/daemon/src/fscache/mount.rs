//! `mount --fscache`, `umount`, `status` and `upgrade` of fscache mounts: the client side of
//! the daemon. Mounting verifies the image, seals it into a memfd, starts the host's daemon if
//! none runs, registers the image with it (memfd attached) and asks the kernel's EROFS to
//! mount it over fscache.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use phoenixfs_store::{load_image, Patient};

use super::control::{request, ControlReply, ControlRequest, DaemonStatus};
use super::registry::{self, Registration};
use super::{log_path, FSCACHE_DIR};
use crate::error::MountError;
use crate::image_memory;
use crate::spec::open_store;
use crate::mount::check_mountpoint;

/// How long a client waits for the daemon: to start, or to answer.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// What `mount --fscache` needs besides the image.
pub struct FscacheMount {
    pub image: String,
    pub mountpoint: PathBuf,
    /// The store's URL (a local one absolute) and its mirrors'.
    pub store: String,
    pub mirrors: Vec<String>,
    pub cache_dir: PathBuf,
    pub cache_limit: u64,
    pub domain: Option<String>,
    /// The kernel's cache files (not tmpfs); used when this mount starts the daemon.
    pub fscache_dir: PathBuf,
    pub log_level: u8,
}

fn ask(what: &ControlRequest) -> Result<ControlReply, MountError> {
    ask_with_fd(what, None)
}

fn ask_with_fd(what: &ControlRequest, fd: Option<BorrowedFd<'_>>) -> Result<ControlReply, MountError> {
    match request(what, fd, DAEMON_TIMEOUT) {
        Ok(ControlReply::Refused(why)) => Err(MountError::Refused(format!("the fscache daemon refused: {why}"))),
        Ok(reply) => Ok(reply),
        Err(source) => Err(MountError::Io { what: "asking the fscache daemon".into(), source }),
    }
}

pub fn mount_fscache(spec: FscacheMount) -> Result<(), MountError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(MountError::NotRoot);
    }
    let mountpoint = check_mountpoint(&spec.mountpoint)?;
    let store = Patient::new(open_store(&spec.store, &spec.mirrors)?, image_memory::MOUNT_PATIENCE);
    let image = load_image(&spec.image, Some(&store))?;
    image_memory::probe_store(&store, &image)?;
    let memfd = image_memory::seal(image.bytes()).map_err(|source| MountError::Io { what: "copying the image into memory".into(), source })?;
    ensure_daemon(&spec.fscache_dir, spec.log_level)?;
    let registration = Registration {
        fsid: image.id.to_string(),
        domain: spec.domain,
        image: spec.image,
        store: spec.store,
        mirrors: spec.mirrors,
        cache_dir: spec.cache_dir,
        cache_limit: spec.cache_limit,
        mountpoint: mountpoint.clone(),
    };
    ask_with_fd(&ControlRequest::Register(registration.clone()), Some(memfd.as_fd()))?;
    let options = registration.mount_options();
    if let Err(errno) = mount(Some("none"), &mountpoint, Some("erofs"), MsFlags::MS_RDONLY | MsFlags::MS_NODEV, Some(options.as_str())) {
        let _ = ask(&ControlRequest::Unregister { mountpoint: mountpoint.clone() });
        return Err(MountError::Mountpoint {
            path: mountpoint,
            detail: format!("the kernel's EROFS refused to mount image {} over fscache ({options}): {errno}", registration.fsid),
        });
    }
    Ok(())
}

/// Starts the host's fscache daemon unless one answers; returns once it serves.
fn ensure_daemon(fscache_dir: &Path, log_level: u8) -> Result<(), MountError> {
    if request(&ControlRequest::Status, None, DAEMON_TIMEOUT).is_ok() {
        return Ok(());
    }
    let io = |what: String| move |source: io::Error| MountError::Io { what, source };
    std::fs::create_dir_all(FSCACHE_DIR).map_err(io(format!("creating {FSCACHE_DIR}")))?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path()).map_err(io(format!("opening {}", log_path().display())))?;
    let log_start = log.metadata().map_or(0, |m| m.len());
    let binary = std::env::current_exe().map_err(io("finding this binary".into()))?;
    let mut command = Command::new(binary);
    if log_level > 0 {
        command.arg(format!("-{}", "v".repeat(log_level as usize)));
    }
    command.arg("fscache-daemon").arg("--cache-dir").arg(fscache_dir).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // SAFETY: setsid is async-signal-safe; the daemon must outlive this command's session.
    unsafe {
        command.pre_exec(|| if libc::setsid() < 0 { Err(io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut child = command.spawn().map_err(io("starting the fscache daemon".into()))?;
    let deadline = Instant::now() + DAEMON_TIMEOUT;
    loop {
        if request(&ControlRequest::Status, None, DAEMON_TIMEOUT).is_ok() {
            return Ok(());
        }
        if let Ok(Some(_)) = child.try_wait() {
            return Err(MountError::Refused(format!("the fscache daemon did not start: {}", last_error_in_log(log_start))));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(MountError::DaemonStart(format!("no answer within {} s (log: {})", DAEMON_TIMEOUT.as_secs(), log_path().display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's own last words, from the part of its log written after `from`.
fn last_error_in_log(from: u64) -> String {
    let text = std::fs::read(log_path()).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
    text.lines()
        .rev()
        .find_map(|line| line.strip_prefix("phoenixfs: "))
        .map_or_else(|| format!("it exited (log: {})", log_path().display()), str::to_string)
}

/// Whether `mountpoint` (canonical) is an image this host's fscache daemon serves.
pub fn is_fscache_mount(mountpoint: &Path) -> bool {
    registry::find(mountpoint).is_some()
}

/// Unmounts an fscache mount and unregisters its image; the daemon exits with the last.
pub fn unmount_fscache(mountpoint: &Path) -> Result<(), MountError> {
    let bad = |detail: String| MountError::Mountpoint { path: mountpoint.to_path_buf(), detail };
    match umount2(mountpoint, MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(nix::errno::Errno::EBUSY) => return Err(bad("busy: files are open on it".into())),
        Err(errno) => return Err(bad(errno.to_string())),
    }
    ask(&ControlRequest::Unregister { mountpoint: mountpoint.to_path_buf() })?;
    if registry::all().is_empty() {
        ask(&ControlRequest::Shutdown)?;
    }
    Ok(())
}

pub fn fscache_status() -> Result<DaemonStatus, MountError> {
    match ask(&ControlRequest::Status)? {
        ControlReply::Status(status) => Ok(status),
        other => Err(MountError::Refused(format!("the fscache daemon answered {other:?}"))),
    }
}

/// Replaces the daemon's worker with one from `binary`; the new worker's pid.
pub fn upgrade_fscache(binary: &Path) -> Result<u32, MountError> {
    match ask(&ControlRequest::Upgrade { binary: binary.to_path_buf() })? {
        ControlReply::Upgraded { pid } => Ok(pid),
        other => Err(MountError::Refused(format!("the fscache daemon answered {other:?}"))),
    }
}
