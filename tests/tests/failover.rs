//! Killing the worker: readers see a stall, never an error or a wrong byte.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};
use nix::unistd::Pid;
use phoenixfs_tests::mount::PhoenixMount;
use phoenixfs_tests::snapshot::sha256_via_mmap;
use phoenixfs_tests::trees::noise;
use phoenixfs_tests::{build_image, fixture_dir, phoenixfs_bin};
use sha2::{Digest, Sha256};

/// The worker's pid once a worker other than `old` answers status; and when it did.
fn next_worker(mount: &PhoenixMount, old: u32) -> (u32, Instant) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = phoenixfs_tests::phoenixfs().arg("status").arg(mount.path()).arg("--json").output().unwrap();
        if out.status.success() {
            let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let pid = all[0]["pid"].as_u64().unwrap() as u32;
            if pid != old {
                return (pid, Instant::now());
            }
        }
        assert!(Instant::now() < deadline, "no new worker after killing {old}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn readers_never_notice_the_worker_being_killed() {
    const KILLS: usize = 30;
    let root = fixture_dir("failover-worker");
    let src = root.join("src");
    fs::create_dir_all(src.join("small")).unwrap();
    for i in 0..6u64 {
        fs::write(src.join(format!("big{i}")), noise(i, (5 << 20) + 333)).unwrap();
    }
    for i in 0..300u64 {
        fs::write(src.join(format!("small/f{i}")), noise(1000 + i, 500 + (i as usize * 97) % 20_000)).unwrap();
    }
    let expected: BTreeMap<PathBuf, String> = walk(&src)
        .into_iter()
        .map(|p| (p.strip_prefix(&src).unwrap().to_path_buf(), hex::encode(Sha256::digest(fs::read(&p).unwrap()))))
        .collect();
    let store = root.join("store");
    let (image, _) = build_image(&src, &store, &root, &["--chunk-size", "64K"]);
    let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let verified = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for reader in 0..5 {
        let (stop, errors, verified, expected, mnt) = (stop.clone(), errors.clone(), verified.clone(), expected.clone(), mount.path_buf());
        readers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (rel, want) in expected.iter().skip(reader * 37 % expected.len()) {
                    let path = mnt.join(rel);
                    let got = match reader {
                        // One reader maps the files, one only stats, the others read.
                        3 => Ok(sha256_via_mmap(&path)),
                        4 => fs::symlink_metadata(&path).map(|_| want.clone()),
                        _ => fs::read(&path).map(|d| hex::encode(Sha256::digest(&d))),
                    };
                    match got {
                        Ok(sum) if sum == *want => {
                            if reader != 4 {
                                verified.fetch_add(fs::metadata(&path).map(|m| m.len()).unwrap_or(0), Ordering::Relaxed);
                            }
                        }
                        Ok(_) => {
                            eprintln!("wrong bytes in {}", rel.display());
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("error reading {}: {e}", rel.display());
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
        }));
    }

    let mut worker = mount.worker_pid();
    let mut worst = Duration::ZERO;
    let mut rng = 0x9e37_79b9u64;
    for _ in 0..KILLS {
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(Duration::from_millis(10 + (rng >> 33) % 490));
        let killed = Instant::now();
        kill(Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
        let (next, answered) = next_worker(&mount, worker);
        worst = worst.max(answered - killed);
        worker = next;
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.join().unwrap();
    }
    let status = mount.status();
    eprintln!(
        "kills: {KILLS}, bytes verified: {}, worst stall (kill to a new worker answering status): {worst:?}",
        verified.load(Ordering::Relaxed)
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0, "readers saw errors or wrong bytes");
    assert_eq!(status["worker_restarts"], KILLS as u64);
    assert!(verified.load(Ordering::Relaxed) > 0);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A READ the dead worker had taken but not answered is resent to, and answered by, the next
/// worker. The chunk file in the store is a fifo, so the first worker blocks on it for sure.
#[test]
fn a_request_the_killed_worker_held_is_answered_by_the_next() {
    let root = fixture_dir("failover-resend");
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    let data = noise(77, 100_000);
    fs::write(src.join("file"), &data).unwrap();
    let store = root.join("store");
    let (image, _) = build_image(&src, &store, &root, &[]);
    let digest = hex::encode(Sha256::digest(&data));
    let chunk = store.join("chunks").join(&digest[..2]).join(&digest);
    let stored = fs::read(&chunk).unwrap();
    fs::remove_file(&chunk).unwrap();
    nix::unistd::mkfifo(&chunk, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();

    let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);
    let first = mount.worker_pid();
    let path = mount.path().join("file");
    let reader = std::thread::spawn(move || fs::read(path));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!reader.is_finished(), "the read must be waiting on the fifo");
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    next_worker(&mount, first);
    std::thread::sleep(Duration::from_millis(200));
    // The new worker now waits on the fifo for the resent READ: feed it the real chunk.
    File::options().write(true).open(&chunk).unwrap().write_all(&stored).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "the held read was never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = reader.join().unwrap().expect("the read succeeds after the takeover");
    assert!(got == data, "the resent read returned the right bytes");
    assert_eq!(mount.status()["worker_restarts"], 1);
}

/// A worker handed state it cannot read refuses, loudly, and serves nothing.
#[test]
fn a_worker_refuses_corrupt_state() {
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::empty()).unwrap();
    let raw = theirs.as_raw_fd();
    let mut command = Command::new(phoenixfs_bin());
    command.arg("worker").stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe.
    unsafe {
        command.pre_exec(move || if libc::dup2(raw, 3) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut child = command.spawn().unwrap();
    drop(theirs);
    let devnull = File::open("/dev/null").unwrap();
    let garbage = b"PHXSTATE\x01\x00\x00\x00\x05\x00\x00\x00{}{}}not-a-checksum-not-a-checksum-xx";
    sendmsg::<UnixAddr>(ours.as_raw_fd(), &[IoSlice::new(garbage)], &[ControlMessage::ScmRights(&[devnull.as_raw_fd()])], MsgFlags::empty(), None).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let mut answer = [0u8; 256];
    let n = nix::unistd::read(ours.as_raw_fd(), &mut answer).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("refusing session state"), "{stderr}");
    assert!(String::from_utf8_lossy(&answer[..n]).contains("refusing session state"));
}
