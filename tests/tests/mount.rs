//! The lazy FUSE mount: fetches only what is read, once per chunk however many readers ask,
//! survives a damaged cache, refuses bad input cleanly, and unmounts with readers active.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenixfs_tests::mount::{is_mounted, PhoenixMount};
use phoenixfs_tests::trees::noise;
use phoenixfs_tests::{assert_one_line_error, build_image, chunk_files, fixture_dir, phoenixfs, run};

const MIB: usize = 1 << 20;

/// `files` files of `size` random bytes each (seeded by index), plus a small inline file.
fn tree(root: &Path, files: usize, size: usize) -> (PathBuf, PathBuf, PathBuf) {
    let src = root.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..files {
        fs::write(src.join(format!("file{i}")), noise(i as u64 + 100, size)).unwrap();
    }
    fs::write(src.join("sub/small"), b"small file").unwrap();
    let store = root.join("store");
    let (image, _) = build_image(&src, &store, root, &[]);
    (src, store, image)
}


#[test]
fn only_what_is_read_is_fetched() {
    let root = fixture_dir("mount-lazy");
    let (src, store, image) = tree(&root, 5, 4 * MIB);
    let cache = root.join("cache");
    let mount = PhoenixMount::new(&image, &store, &cache, &[]);
    for entry in fs::read_dir(mount.path()).unwrap() {
        fs::symlink_metadata(entry.unwrap().path()).unwrap();
    }
    assert_eq!(fs::read(mount.path().join("sub/small")).unwrap(), b"small file");
    assert_eq!(mount.status()["chunks_fetched"], 0, "metadata and inline data need no chunk");
    assert_eq!(fs::read(mount.path().join("file2")).unwrap(), fs::read(src.join("file2")).unwrap());
    let status = mount.status();
    assert_eq!(status["chunks_fetched"], 4, "exactly file2's chunks: {status}");
    assert_eq!(chunk_files(&cache).len(), 4);
    assert_eq!(status["bytes_served"], 4 * MIB as u64 + 10);
}

#[test]
fn sixteen_readers_of_overlapping_ranges_fetch_each_chunk_once() {
    let root = fixture_dir("mount-concurrent");
    let (src, store, image) = tree(&root, 3, 6 * MIB + 777);
    let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);
    let expected: Vec<Vec<u8>> = (0..3).map(|i| fs::read(src.join(format!("file{i}"))).unwrap()).collect();
    let mismatches = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let (mount, expected, mismatches) = (&mount, &expected, &mismatches);
            s.spawn(move || {
                for round in 0..3u64 {
                    let which = ((t + round) % 3) as usize;
                    let file = File::open(mount.path().join(format!("file{which}"))).unwrap();
                    let len = expected[which].len() as u64;
                    // Overlapping, unaligned ranges that together cover the whole file.
                    let step = 300_000 + t * 7919;
                    let mut offset = (t * 104_729) % step;
                    while offset < len {
                        let want = &expected[which][offset as usize..(offset + step * 2).min(len) as usize];
                        let mut got = vec![0u8; want.len()];
                        file.read_exact_at(&mut got, offset).unwrap();
                        if got != want {
                            mismatches.fetch_add(1, Ordering::Relaxed);
                        }
                        offset += step;
                    }
                    let mut head = vec![0u8; 4096];
                    file.read_exact_at(&mut head, 0).unwrap();
                    if head[..] != expected[which][..4096] {
                        mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(mismatches.load(Ordering::Relaxed), 0);
    let status = mount.status();
    assert_eq!(status["chunks_fetched"], 3 * 7, "each chunk fetched exactly once: {status}");
    assert_eq!(status["errors"], 0);
}

#[test]
fn a_torn_or_flipped_cache_entry_is_fetched_again_not_served() {
    let root = fixture_dir("mount-cache-damage");
    let (src, store, image) = tree(&root, 3, 3 * MIB);
    let cache = root.join("cache");
    // Passthrough off: with it, files read whole before are read from their copies and the
    // damaged chunk files are never loaded.
    let options = ["--passthrough-cache", "0"];
    {
        let mount = PhoenixMount::new(&image, &store, &cache, &options);
        for i in 0..3 {
            fs::read(mount.path().join(format!("file{i}"))).unwrap();
        }
    }
    let chunk_files = chunk_files(&cache);
    assert_eq!(chunk_files.len(), 9);
    let torn = &chunk_files[0];
    fs::write(torn, &fs::read(torn).unwrap()[..1000]).unwrap();
    let flipped = File::options().write(true).open(&chunk_files[1]).unwrap();
    flipped.write_all_at(b"\xff\x00\xff", 500_000).unwrap();

    let mount = PhoenixMount::new(&image, &store, &cache, &options);
    for i in 0..3 {
        let name = format!("file{i}");
        assert!(fs::read(mount.path().join(&name)).unwrap() == fs::read(src.join(&name)).unwrap(), "{name} differs");
    }
    let status = mount.status();
    assert_eq!(status["corrupt_cache_entries_discarded"], 2, "{status}");
    assert_eq!(status["chunks_fetched"], 2, "{status}");
}

#[test]
fn umount_with_active_readers_leaves_no_mount_and_no_process() {
    let root = fixture_dir("mount-umount-busy");
    let (src, store, image) = tree(&root, 2, 2 * MIB);
    let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);
    let expected = fs::read(src.join("file0")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (path, expected, stop, errors) = (mount.path().join("file0"), expected.clone(), stop.clone(), errors.clone());
            let file = File::open(path).unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; expected.len()];
                while !stop.load(Ordering::Relaxed) {
                    if file.read_exact_at(&mut buf, 0).is_err() || buf != expected {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = run(phoenixfs().arg("umount").arg(mount.path()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!is_mounted(mount.path()), "the mount is gone at once");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.join().unwrap();
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "open files keep working until closed");
    assert!(mount.wait_for_daemon_exit(Duration::from_secs(10)), "the daemon exits when the last file closes");
}

/// Asserts failure with one line on stderr containing `needle`, and nothing mounted at `at`.
fn assert_refused(out: std::process::Output, needle: &str, at: &Path) {
    assert_one_line_error(&out, needle);
    assert!(!is_mounted(at), "{} was mounted", at.display());
}

#[test]
fn bad_mounts_are_refused_with_one_line_and_leave_nothing_mounted() {
    let root = fixture_dir("mount-bad-input");
    let (_, store, image) = tree(&root, 1, MIB);
    let cache = root.join("cache");
    let mount = |image: &Path, at: &Path, store: &Path| run(phoenixfs().arg("mount").arg(image).arg(at).arg("--store").arg(store).arg("--cache").arg(&cache));

    let missing = root.join("no-such-dir");
    assert_refused(mount(&image, &missing, &store), "no-such-dir", &missing);
    let file = root.join("a-file");
    fs::write(&file, b"x").unwrap();
    assert_refused(mount(&image, &file, &store), "not a directory", &file);
    let target = root.join("target");
    fs::create_dir(&target).unwrap();
    assert_refused(mount(&root.join("no-image.phx"), &target, &store), "no-image.phx", &target);
    assert_refused(mount(&image, &target, &root.join("no-store")), "no-store", &target);
    fs::write(root.join("garbage.phx"), noise(1, 5000)).unwrap();
    assert_refused(mount(&root.join("garbage.phx"), &target, &store), "garbage.phx", &target);

    let first = PhoenixMount::new(&image, &store, &cache, &[]);
    assert_one_line_error(&mount(&image, first.path(), &store), "already mounted");

    // Not root: refused before anything is mounted.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(phoenixfs_tests::phoenixfs_bin())
        .arg("mount")
        .arg(&image)
        .arg(&target)
        .arg("--store")
        .arg(&store)
        .output()
        .unwrap();
    assert_refused(out, "needs root", &target);
}

#[test]
fn a_chunk_missing_from_the_store_or_corrupt_past_the_fetch_deadline_gives_eio_and_a_log_line_naming_it() {
    let root = fixture_dir("mount-bad-chunk");
    let (src, store, image) = tree(&root, 3, MIB);
    let image_id = phoenixfs_format::ImageFile::decode(fs::read(&image).unwrap()).unwrap().id.to_string();
    let digest_of = |i: usize| phoenixfs_format::Digest::of(&fs::read(src.join(format!("file{i}"))).unwrap()).to_hex();
    // file0's chunk stays good: mounting asks the store for the first chunk.
    let (missing, corrupt) = (digest_of(1), digest_of(2));
    fs::remove_file(store.join("chunks").join(&missing[..2]).join(&missing)).unwrap();
    let corrupt_path = store.join("chunks").join(&corrupt[..2]).join(&corrupt);
    File::options().write(true).open(&corrupt_path).unwrap().write_all_at(b"!", 1234).unwrap();

    let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &["--fetch-deadline", "2s"]);
    for i in 1..3 {
        let err = fs::read(mount.path().join(format!("file{i}"))).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "file{i}: {err}");
    }
    assert_eq!(fs::read(mount.path().join("file0")).unwrap(), fs::read(src.join("file0")).unwrap());
    let status = mount.status();
    assert!(status["errors"].as_u64().unwrap() >= 2, "{status}");
    let log = fs::read_to_string(status["log"].as_str().unwrap()).unwrap();
    for digest in [&missing, &corrupt] {
        let line = log.lines().find(|l| l.contains(digest.as_str()) && l.contains("cannot read chunk"));
        let line = line.unwrap_or_else(|| panic!("no log line names {digest}:\n{log}"));
        assert!(line.contains(&image_id), "{line}");
    }
    assert_eq!(chunk_files(&root.join("cache")).len(), 1, "nothing bad was cached");
}

#[test]
fn without_a_fetch_deadline_a_corrupt_chunk_stalls_its_reader_until_the_store_is_repaired() {
    let root = fixture_dir("mount-corrupt-stall");
    let (src, store, image) = tree(&root, 2, MIB);
    let corrupt = phoenixfs_format::Digest::of(&fs::read(src.join("file1")).unwrap()).to_hex();
    let corrupt_path = store.join("chunks").join(&corrupt[..2]).join(&corrupt);
    let good = fs::read(&corrupt_path).unwrap();
    File::options().write(true).open(&corrupt_path).unwrap().write_all_at(b"!", 1234).unwrap();
    let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);
    let path = mount.path().join("file1");
    let reader = std::thread::spawn(move || fs::read(path));
    std::thread::sleep(Duration::from_secs(3));
    assert!(!reader.is_finished(), "the reader waits for good bytes");
    assert!(mount.status()["store_errors"]["corrupt"].as_u64().unwrap() > 0);
    fs::write(&corrupt_path, good).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), fs::read(src.join("file1")).unwrap());
    assert_eq!(mount.status()["errors"], 0);
}

fn wait_for_fetches(mount: &PhoenixMount, want: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = mount.status();
        if status["chunks_fetched"] == want || std::time::Instant::now() > deadline {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn prefetch_warms_the_cache_in_the_background() {
    let root = fixture_dir("mount-prefetch");
    let (_, store, image) = tree(&root, 3, 2 * MIB);
    let all = PhoenixMount::new(&image, &store, &root.join("cache-all"), &["--prefetch-all"]);
    let status = wait_for_fetches(&all, 6);
    assert_eq!(status["chunks_fetched"], 6, "{status}");
    assert_eq!(chunk_files(&root.join("cache-all")).len(), 6);

    fs::write(root.join("list"), "file1\n\n/sub/small\nno-such-file\n").unwrap();
    let list = root.join("list");
    let some = PhoenixMount::new(&image, &store, &root.join("cache-list"), &["--prefetch", list.to_str().unwrap()]);
    let status = wait_for_fetches(&some, 2);
    assert_eq!(status["chunks_fetched"], 2, "only file1's chunks: {status}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(some.status()["chunks_fetched"], 2);
}

/// A worker killed soon after it began serving must not let the cache outgrow its limit:
/// each one counts the chunk files already there (its index) before it has served long.
#[test]
fn the_cache_keeps_its_size_limit_while_workers_are_killed() {
    let root = fixture_dir("mount-cache-limit-kills");
    let (src, store, image) = tree(&root, 1, 32 * MIB);
    let cache = root.join("cache");
    let limit = 8 * MIB as u64;
    let mount = PhoenixMount::new(&image, &store, &cache, &["--cache-size", "8M", "--readahead", "0"]);
    let expected = fs::read(src.join("file0")).unwrap();
    let file = File::open(mount.path().join("file0")).unwrap();
    let mut piece = vec![0u8; MIB];
    for i in 0..32 {
        file.read_exact_at(&mut piece, (i * MIB) as u64).unwrap();
        assert!(piece == expected[i * MIB..(i + 1) * MIB], "MiB {i} differs from the source");
        // Long enough for a new worker's index, far shorter than a worker's life in use.
        std::thread::sleep(Duration::from_millis(50));
        let worker = mount.worker_pid();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    file.read_exact_at(&mut piece, 0).unwrap();
    // The last worker's index may still be under way: give it a moment, but less than the
    // second a worker once waited before indexing.
    let held = || chunk_files(&cache).iter().filter_map(|f| fs::metadata(f).ok()).map(|m| m.len()).sum::<u64>();
    let deadline = Instant::now() + Duration::from_millis(600);
    while held() > limit && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = held();
    assert!(held <= limit, "after 32 worker kills the cache holds {held} bytes, over its {limit}-byte limit");
}

/// A name the image lacks is answered once: the kernel keeps the answer (a negative entry),
/// so probing it again, as an interpreter searching its path does, asks the daemon nothing.
#[test]
fn a_missing_name_is_looked_up_once() {
    let root = fixture_dir("mount-negative-entries");
    let (_, store, image) = tree(&root, 1, 10);
    let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);
    let missing = mount.path().join("sub/no-such-module.py");
    let requests = || mount.status()["requests"].as_u64().unwrap();
    fs::metadata(mount.path().join("sub")).unwrap();
    let before = requests();
    for _ in 0..5 {
        assert_eq!(fs::metadata(&missing).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        assert_eq!(File::open(&missing).unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }
    assert_eq!(requests() - before, 1, "one LOOKUP for ten probes of a missing name");
    assert_eq!(fs::read(mount.path().join("sub/small")).unwrap(), b"small file", "names beside it are still found");
}
