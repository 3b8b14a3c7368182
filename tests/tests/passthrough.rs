//! FUSE passthrough: a large file whose chunks are all cached is copied whole into the cache
//! directory and then opened in passthrough mode, so the kernel reads the copy itself. The
//! kernel fails an open(2) with EIO when one inode is opened in both modes, or with two
//! backing files; these tests open files in every order that could provoke that, across a
//! worker's SIGKILL, and compare every byte with the source.

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use phoenixfs_tests::mount::PhoenixMount;
use phoenixfs_tests::trees::noise;
use phoenixfs_tests::{build_image, fixture_dir, wait_until};

const MIB: usize = 1 << 20;

fn read_all(path: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())).read_to_end(&mut data).unwrap();
    data
}

/// An image of `files` (name, bytes) built under the fixture `name`, mounted with `options`
/// and an empty cache; and that cache's directory.
fn mounted(name: &str, files: &[(&str, &[u8])], options: &[&str]) -> (PhoenixMount, PathBuf) {
    let root = fixture_dir(name);
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    for (file, data) in files {
        fs::write(src.join(file), data).unwrap();
    }
    let store = root.join("store");
    let (image, _) = build_image(&src, &store, &root, &[]);
    let cache = root.join("cache");
    (PhoenixMount::new(&image, &store, &cache, options), cache)
}

/// The whole file through a read-only shared mapping of `file`.
fn mapped(file: &File, len: usize) -> Vec<u8> {
    // SAFETY: a fresh read-only mapping of a file nobody writes, unmapped before returning.
    unsafe {
        let at = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
        assert_ne!(at, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        let copy = std::slice::from_raw_parts(at.cast::<u8>(), len).to_vec();
        libc::munmap(at, len);
        copy
    }
}

fn copies(cache: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(cache.join("files")) else { return Vec::new() };
    entries.filter_map(Result::ok).filter(|e| !e.file_name().to_string_lossy().starts_with('.')).map(|e| e.metadata().unwrap().len()).collect()
}

/// The kernel sends RELEASE after close(2) has returned: waits until the daemon had `count`.
fn wait_for_releases(mount: &PhoenixMount, count: u64) {
    wait_until(Duration::from_secs(20), "the RELEASEs", || (mount.status()["requests_by_opcode"]["release"].as_u64() >= Some(count)).then_some(()));
}

fn passthrough_opens(mount: &PhoenixMount) -> u64 {
    mount.status()["passthrough_opens"].as_u64().expect("passthrough_opens in status")
}

#[test]
fn a_file_read_whole_is_then_opened_in_passthrough_mode_and_never_in_two_modes() {
    let (large, small) = (noise(7, 3 * MIB + 12_345), noise(8, 600_000));
    let (mount, cache) = mounted("passthrough-modes", &[("large", &large), ("small", &small)], &["--passthrough", "on"]);
    let path = mount.path().join("large");

    // Read whole through the page cache, the file kept open: a second open finds every
    // chunk cached and asks for the copy, but the first open is cached, so every open
    // until both are closed must be cached too (a passthrough one would fail).
    let first = File::open(&path).unwrap();
    assert_eq!(read_all(&path), large);
    let second = File::open(&path).unwrap();
    wait_until(Duration::from_secs(20), "the copy", || (copies(&cache) == [large.len() as u64]).then_some(()));
    let third = File::open(&path).expect("an open while cached opens last");
    assert_eq!(mapped(&third, large.len()), large);
    assert_eq!(passthrough_opens(&mount), 0, "no passthrough open while the file is open cached");
    drop((first, second, third));
    wait_for_releases(&mount, 4);

    // Closed: now in passthrough mode, two at once (one backing file for both).
    let one = File::open(&path).unwrap();
    let two = File::open(&path).expect("a second passthrough open");
    assert_eq!(passthrough_opens(&mount), 2);
    assert_eq!(read_all(&path), large);
    assert_eq!(mapped(&two, large.len()), large);

    // A new worker knows the backing file the dead one registered while files use it.
    let worker = mount.worker_pid();
    kill(Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
    mount.next_worker(worker);
    let three = File::open(&path).expect("a passthrough open after the worker's death");
    assert_eq!(passthrough_opens(&mount), 1, "the new worker answered it in passthrough mode");
    assert_eq!(mapped(&three, large.len()), large);
    assert_eq!(mapped(&one, large.len()), large);
    drop((one, two, three));
    assert_eq!(read_all(&path), large, "opened again after every passthrough open was closed");

    // Smaller than --passthrough-min (1 MiB): never copied.
    assert_eq!(read_all(&mount.path().join("small")), small);
    assert_eq!(read_all(&mount.path().join("small")), small);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(copies(&cache).len(), 1, "only the large file was copied");
}

/// A copy deleted from the cache directory (its budget, or by hand) while files use it: those
/// keep reading it, new opens share its registration, and once all are closed it is made again.
#[test]
fn a_copy_deleted_while_in_use_is_made_again() {
    let data = noise(9, 2 * MIB + 1);
    let (mount, cache) = mounted("passthrough-deleted", &[("file", &data)], &["--passthrough", "on"]);
    let path = mount.path().join("file");
    assert_eq!(read_all(&path), data);
    wait_until(Duration::from_secs(20), "the copy", || (copies(&cache).len() == 1).then_some(()));
    let open = File::open(&path).unwrap();
    assert_eq!(passthrough_opens(&mount), 1);
    for entry in fs::read_dir(cache.join("files")).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    assert_eq!(mapped(&open, data.len()), data, "the deleted copy still reads");
    let another = File::open(&path).expect("an open sharing the deleted copy's registration");
    assert_eq!(passthrough_opens(&mount), 2);
    drop((open, another));
    wait_until(Duration::from_secs(20), "the copy made again", || (copies(&cache).len() == 1).then_some(()));
    assert_eq!(read_all(&path), data);
}

/// `--passthrough auto` (the default) leaves it off for an image of mostly small files: every
/// open would cost a round trip for the few large ones.
#[test]
fn auto_leaves_passthrough_off_for_an_image_of_mostly_small_files() {
    let large = noise(10, 2 * MIB);
    let smalls: Vec<(String, Vec<u8>)> = (0..4).map(|i| (format!("small{i}"), noise(20 + i, 5000))).collect();
    let mut files: Vec<(&str, &[u8])> = smalls.iter().map(|(name, data)| (name.as_str(), data.as_slice())).collect();
    files.push(("large", &large));
    let (mount, cache) = mounted("passthrough-auto", &files, &[]);
    let path = mount.path().join("large");
    for _ in 0..3 {
        assert_eq!(read_all(&path), large);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(passthrough_opens(&mount), 0);
    assert!(copies(&cache).is_empty(), "no copy made");
    let requests = mount.status()["requests_by_opcode"].clone();
    assert!(requests.get("open").is_none_or(|n| n.as_u64() <= Some(1)), "opens cost no round trip: {requests}");
}
