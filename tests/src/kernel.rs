//! The kernel's own EROFS mount of an image: the oracle our images and mounts must match.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run_ok;

/// A read-only kernel EROFS mount of an image file, its blob attached with a loop device.
/// Unmounted and detached on drop, even when the test failed.
pub struct KernelMount {
    dir: tempfile::TempDir,
    loop_device: Option<String>,
}

impl KernelMount {
    pub fn new(image: &Path, blob: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().expect("mount point");
        let loop_device = blob.map(|blob| {
            run_ok(Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(blob)).trim().to_string()
        });
        let mut options = "ro".to_string();
        if let Some(dev) = &loop_device {
            options.push_str(&format!(",device={dev}"));
        }
        let mount = KernelMount { dir, loop_device };
        run_ok(Command::new("mount").args(["-t", "erofs", "-o", &options]).arg(image).arg(mount.path()));
        mount
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_buf(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(self.dir.path()).status().is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("--lazy").arg(self.dir.path()).status();
        }
        if let Some(dev) = &self.loop_device {
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
    }
}
