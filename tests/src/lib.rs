//! Shared helpers for phoenixfs's end-to-end tests: the all-cases source tree, snapshots of a
//! tree (through any mount, or through our own image reader) to compare against the source,
//! the kernel's own EROFS mount as an oracle, and running the `phoenixfs` binary.
//!
//! Tests need root (mknod, chown, losetup, mount) and erofs-utils; `scripts/test` provides both.

pub use phoenixfs_daemon::process_alive;

pub mod bench_stores;
pub mod chaos;
pub mod faultproxy;
pub mod fscache;
pub mod kernel;
pub mod mount;
pub mod probe;
pub mod prometheus;
pub mod servers;
pub mod snapshot;
pub mod trees;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The `phoenixfs` binary built beside the test executable (`cargo build` puts it in the
/// target directory's profile folder, one level above `deps/`).
pub fn phoenixfs_bin() -> PathBuf {
    let bin = profile_dir().join("phoenixfs");
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace` before the tests (scripts/test does)", bin.display());
    bin
}

pub fn phoenixfs() -> Command {
    Command::new(phoenixfs_bin())
}

/// `target/<profile>`, found from the running executable: a test in `target/<profile>/deps/`
/// or a binary in `target/<profile>/`.
pub(crate) fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("target/<profile>/...");
    if dir.ends_with("deps") { dir.parent().expect("target/<profile>") } else { dir }.to_path_buf()
}

/// Where test fixtures live: under the target directory, so nothing piles up in /tmp.
pub fn fixtures_root() -> PathBuf {
    profile_dir().join("../test-fixtures")
}

/// Calls `probe` every few milliseconds until it gives a value, and returns that; panics
/// naming `what` if `timeout` passes first.
pub fn wait_until<T>(timeout: Duration, what: &str, probe: impl FnMut() -> Option<T>) -> T {
    wait_until_every(Duration::from_millis(5), timeout, what, probe)
}

/// [`wait_until`], calling `probe` every `interval` (a probe that asks a server something).
pub fn wait_until_every<T>(interval: Duration, timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(interval);
    }
}

/// Runs `cmd`, panics with its stderr unless it succeeds, returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs `cmd` and returns its whole output, whatever the exit status.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Builds `src` into `store` with the CLI; returns (image path, image id).
pub fn build_image(src: &Path, store: &Path, out_dir: &Path, extra: &[&str]) -> (PathBuf, String) {
    let image = out_dir.join("image.phx");
    let id = run_ok(phoenixfs().arg("build").arg(src).arg("--store").arg(store).arg("-o").arg(&image).args(extra));
    (image, id.trim().to_string())
}

/// Asserts that a command failed with exactly one line on stderr, containing `needle`.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
}

/// Materialises the image's blob with the CLI; None when the image has no chunks.
pub fn export_blob(image: &Path, store: &Path, out: &Path) -> Option<PathBuf> {
    run_ok(phoenixfs().arg("blob").arg(image).arg("--store").arg(store).arg("-o").arg(out));
    (std::fs::metadata(out).expect("blob written").len() > 0).then(|| out.to_path_buf())
}

/// `fsck.erofs --extract` on a bootstrap and its blob: checks metadata and reads every file.
pub fn fsck_erofs(image: &Path, blob: Option<&Path>) -> Output {
    let mut cmd = Command::new("fsck.erofs");
    if let Some(blob) = blob {
        cmd.arg(format!("--device={}", blob.display()));
    }
    run(cmd.arg("--extract").arg(image))
}

/// A fresh, empty directory under the target directory, named for a fixture; kept after the
/// run for inspection and replaced by the next one (so nothing piles up in /tmp).
pub fn fixture_dir(name: &str) -> PathBuf {
    let dir = fixtures_root().join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("clearing {}: {e}", dir.display()));
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The chunk files under a store's or cache's `chunks/` directory, sorted (none when absent).
pub fn chunk_files(root: &Path) -> Vec<PathBuf> {
    let Ok(subdirs) = std::fs::read_dir(root.join("chunks")) else { return Vec::new() };
    let mut files: Vec<PathBuf> = subdirs
        .flat_map(|d| std::fs::read_dir(d.expect("chunks/ entry").path()).expect("chunk subdirectory"))
        .map(|f| f.expect("chunk file").path())
        .collect();
    files.sort();
    files
}
