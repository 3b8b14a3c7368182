//! The mount lifecycle: checks, mount(2), INIT, backgrounding, serving, unmounting.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{umount2, MntFlags};
use nix::unistd::{fork, pipe2, setsid, ForkResult};
use phoenixfs_cache::CacheError;
use phoenixfs_fuse::session::SessionError;
use phoenixfs_fuse::MountOptions;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;

use crate::control;
use crate::holder::hold;

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
    /// The uid that mounted: it (and root) may use the mount's sockets.
    pub owner_uid: u32,
    /// How many -v the daemon's processes log with.
    pub log_level: u8,
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
            owner_uid: 0,
            log_level: 1,
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
    #[error("{0}")]
    Daemon(String),
    #[error("{0}")]
    Handover(#[from] crate::handover::HandoverError),
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
            match message.strip_prefix("ok\n") {
                Some(warnings) => {
                    for warning in warnings.lines() {
                        eprintln!("phoenixfs: warning: {warning}");
                    }
                    Ok(())
                }
                None if message.is_empty() => Err(MountError::Daemon("the mount daemon exited during start-up".into())),
                None => Err(MountError::Daemon(format!("the mount daemon failed to start: {}", message.trim()))),
            }
        }
        Ok(ForkResult::Child) => {
            drop(ready_read);
            let _ = setsid();
            let _ = std::env::set_current_dir("/");
            control::redirect_stdio(&mountpoint);
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

/// Lets the kernel read ahead as much as one READ can carry (1 MiB instead of the default
/// 128 KiB), so sequential readers cost a quarter of the requests. The device number comes
/// from mountinfo: a stat of the mount itself would wait for this very daemon.
pub(crate) fn set_kernel_readahead(mountpoint: &Path) {
    let Some(device) = mount_table().ok().and_then(|t| t.into_iter().rev().find(|m| m.mountpoint == mountpoint)).map(|m| m.device) else {
        return warn!("cannot find the mount in mountinfo to raise its readahead");
    };
    let path = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(error) = fs::write(&path, "1024") {
        warn!(path, %error, "cannot raise the kernel's readahead");
    }
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

/// Starts a named daemon thread; failing to is an error of the daemon's start-up.
pub(crate) fn spawn_thread(name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), MountError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map(drop)
        .map_err(|source| MountError::Io { what: format!("spawning the {name} thread"), source })
}

/// Whether `pid` is a live process (a zombie has exited; only its parent has yet to notice).
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold ") ".
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}
