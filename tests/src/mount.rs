//! A phoenixfs mount for a test, made with the real CLI; unmounted on drop, and its daemon
//! waited for, even when the test failed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{phoenixfs, process_alive, run_ok};

pub struct PhoenixMount {
    dir: tempfile::TempDir,
    /// The holder: keeps the connection, outlives workers.
    pub holder_pid: u32,
}

impl PhoenixMount {
    /// Mounts `image` from `store` with `cache` as its cache directory, plus `extra` options.
    pub fn new(image: impl AsRef<OsStr>, store: impl AsRef<OsStr>, cache: &Path, extra: &[&str]) -> Self {
        Self::with_env(image, store, cache, extra, &[])
    }

    /// The same, with `env` added to the environment of `phoenixfs mount` (and so of the
    /// holder and every worker it starts).
    pub fn with_env(image: impl AsRef<OsStr>, store: impl AsRef<OsStr>, cache: &Path, extra: &[&str], env: &[(&str, &OsStr)]) -> Self {
        let dir = tempfile::tempdir().expect("mount point");
        let mut mount = phoenixfs();
        mount.envs(env.iter().copied()).arg("mount").arg(image.as_ref()).arg(dir.path()).arg("--store").arg(store.as_ref()).arg("--cache").arg(cache).args(extra);
        run_ok(&mut mount);
        let status = Self::status_of(dir.path());
        PhoenixMount { dir, holder_pid: status["holder_pid"].as_u64().expect("holder pid") as u32 }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_buf(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn status_of(path: &Path) -> serde_json::Value {
        let out = run_ok(phoenixfs().arg("status").arg(path).arg("--json"));
        let all: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
        all[0].clone()
    }

    /// `phoenixfs status --json` of this mount.
    pub fn status(&self) -> serde_json::Value {
        Self::status_of(self.path())
    }

    /// The worker's pid once a worker other than `old` answers status (a takeover may leave
    /// status unanswered for a moment); and when it did.
    pub fn next_worker(&self, old: u32) -> (u32, Instant) {
        crate::wait_until(Duration::from_secs(30), &format!("a new worker after {old}"), || {
            let out = phoenixfs().arg("status").arg(self.path()).arg("--json").output().unwrap();
            let all: serde_json::Value = serde_json::from_slice(&out.stdout).ok().filter(|_| out.status.success())?;
            let pid = all[0]["pid"].as_u64()? as u32;
            (pid != old).then(|| (pid, Instant::now()))
        })
    }

    /// The worker serving requests now.
    pub fn worker_pid(&self) -> u32 {
        self.status()["pid"].as_u64().expect("worker pid") as u32
    }

    /// Whether the holder still runs (it exits after its last worker, once unmounted).
    pub fn daemon_alive(&self) -> bool {
        process_alive(self.holder_pid)
    }

    /// Waits up to `timeout` for the holder to exit; true if it did.
    pub fn wait_for_daemon_exit(&self, timeout: Duration) -> bool {
        wait_for_exit(self.holder_pid, timeout)
    }
}

/// Waits up to `timeout` for `pid` to exit; true if it did.
fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Whether anything is mounted at `path`, per /proc/self/mounts.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    let path = path.to_str().expect("utf-8 path");
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(path))
}

impl Drop for PhoenixMount {
    fn drop(&mut self) {
        // Tests may have replaced the holder and the worker: ask who they are now.
        let status = phoenixfs()
            .arg("status")
            .arg(self.path())
            .arg("--json")
            .output()
            .ok()
            .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok());
        let pid = |field: &str| status.as_ref().and_then(|all| all[0][field].as_u64()).map(|pid| pid as u32);
        let (holder, worker) = (pid("holder_pid").unwrap_or(self.holder_pid), pid("pid"));
        if is_mounted(self.path()) {
            let ok = phoenixfs().arg("umount").arg(self.path()).status().is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("--lazy").arg(self.path()).status();
            }
        }
        if !wait_for_exit(holder, Duration::from_secs(10)) {
            for pid in [Some(holder), worker].into_iter().flatten() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}
