//! mount(8) and fstab: `mount -t fuse.phoenixfs IMAGE DIR -o store=…,cache=…` and an fstab
//! line mounted by its directory go through `/usr/sbin/mount.fuse.phoenixfs` (a link to the
//! binary, as the install step makes it); plain `umount DIR` ends the daemon.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use phoenixfs_tests::snapshot::{assert_same, snapshot_dir};
use phoenixfs_tests::trees::noise;
use phoenixfs_tests::{assert_one_line_error, build_image, fixture_dir, phoenixfs, phoenixfs_bin, process_alive, run, run_ok, wait_until};

const HELPER: &str = "/usr/sbin/mount.fuse.phoenixfs";

/// The helper link for the test and its mount point: the link removed afterwards, and the
/// mount point unmounted if a failed check left it mounted.
struct HelperLink(PathBuf);

impl HelperLink {
    fn install(mountpoint: &Path) -> Self {
        let _ = fs::remove_file(HELPER);
        std::os::unix::fs::symlink(phoenixfs_bin(), HELPER).unwrap();
        HelperLink(mountpoint.to_path_buf())
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
        let _ = fs::remove_file(HELPER);
    }
}

fn mounted(dir: &Path) -> bool {
    fs::read_to_string("/proc/mounts").unwrap().lines().any(|l| l.split(' ').nth(1) == Some(dir.to_str().unwrap()))
}

/// Checks the mount at `dir` against `src`, unmounts it with plain umount(8), and waits for
/// its holder and workers to exit.
fn check_and_umount(dir: &Path, src: &Path) {
    assert!(mounted(dir), "{} is not mounted", dir.display());
    assert_same(&snapshot_dir(src), &snapshot_dir(dir), "mount made by mount(8)");
    let status: serde_json::Value = serde_json::from_str(&run_ok(phoenixfs().arg("status").arg(dir).arg("--json"))).unwrap();
    let pids = [status[0]["holder_pid"].as_u64().unwrap() as u32, status[0]["pid"].as_u64().unwrap() as u32];
    run_ok(Command::new("umount").arg(dir));
    assert!(!mounted(dir));
    wait_until(Duration::from_secs(10), "the daemon to exit after umount", || pids.iter().all(|&pid| !process_alive(pid)).then_some(()));
}

#[test]
fn mount_t_and_an_fstab_line_mount_and_plain_umount_ends_the_daemon() {
    let root = fixture_dir("mount-helper");
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data"), noise(1, 3 << 20)).unwrap();
    fs::write(src.join("note"), b"note\n").unwrap();
    let store = root.join("store");
    let (_, id) = build_image(&src, &store, &root, &[]);
    fs::create_dir_all(root.join("mnt")).unwrap();
    // As /proc/mounts shows it.
    let dir = fs::canonicalize(root.join("mnt")).unwrap();
    let _link = HelperLink::install(&dir);
    let options = format!("store={},cache={}", store.display(), root.join("cache").display());

    run_ok(Command::new("mount").args(["-t", "fuse.phoenixfs"]).arg(&id).arg(&dir).arg("-o").arg(&options));
    check_and_umount(&dir, &src);

    let fstab = root.join("fstab");
    fs::write(&fstab, format!("# phoenixfs\n{id} {} fuse.phoenixfs {options},cache_size=1G,noauto,nofail,x-systemd.automount 0 0\n", dir.display())).unwrap();
    run_ok(Command::new("mount").arg("-T").arg(&fstab).arg(&dir));
    check_and_umount(&dir, &src);

    let out = run(Command::new("mount").args(["-t", "fuse.phoenixfs"]).arg(&id).arg(&dir).arg("-o").arg(format!("{options},colour=blue")));
    assert_one_line_error(&out, "unknown mount option \"colour=blue\"");
    assert!(!mounted(&dir));
}
