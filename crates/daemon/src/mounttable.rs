//! Reading the kernel's mount table (`/proc/self/mountinfo`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::MountError;

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

/// Whether anything is mounted on `mountpoint` (a canonical path).
pub fn is_mounted(mountpoint: &Path) -> Result<bool, MountError> {
    Ok(mount_table()?.iter().any(|m| m.mountpoint == mountpoint))
}

/// Whether a phoenixfs mount sits on `mountpoint` (a canonical path).
pub fn is_phoenixfs_mount(mountpoint: &Path) -> Result<bool, MountError> {
    Ok(mount_table()?.iter().any(|m| m.mountpoint == mountpoint && m.fstype == "fuse.phoenixfs"))
}

/// The "major:minor" device of the latest mount on `mountpoint`. From mountinfo: a stat of
/// the mount itself would wait for the daemon that serves it.
pub fn device_of(mountpoint: &Path) -> Option<String> {
    mount_table().ok()?.into_iter().rev().find(|m| m.mountpoint == mountpoint).map(|m| m.device)
}
