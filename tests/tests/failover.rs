//! Takeover details: a request a killed worker held (serving, or retiring after an upgrade) is
//! resent and answered, and so is one whose worker panicked; corrupt state is refused; a
//! failed upgrade rolls back. Readers under kills: tests/chaos.rs.

use std::fs::{self, File};
use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};
use nix::unistd::Pid;
use phoenixfs_tests::mount::PhoenixMount;
use phoenixfs_tests::probe::children_of;
use phoenixfs_tests::trees::noise;
use phoenixfs_tests::{assert_one_line_error, build_image, fixture_dir, phoenixfs_bin, wait_until};
use sha2::{Digest, Sha256};

/// A child of the holder other than `worker` (its oldest standby), once there is one.
fn standby_of(holder: i32, worker: u32) -> i32 {
    wait_until(Duration::from_secs(30), &format!("a standby beside worker {worker}"), || children_of(holder).into_iter().find(|&pid| pid != worker as i32))
}

/// The holder keeps standby workers prepared beside the serving one; when the serving one
/// dies, the oldest standby takes over (no process is started for the takeover), answers
/// what the dead one held, and another standby is prepared after it.
#[test]
fn a_prepared_standby_takes_over_when_the_worker_dies() {
    let data = noise(9, 3 << 20);
    let (root, image, store) = one_file_image("failover-standby", &data);
    let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);
    let holder = mount.status()["holder_pid"].as_u64().unwrap() as i32;
    let worker = mount.worker_pid();
    let standby = standby_of(holder, worker);
    // Time to map the image and open the cache; a standby not yet prepared would be passed
    // over for a fresh worker, and the assertion below would say so.
    std::thread::sleep(Duration::from_secs(2));
    kill(Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
    assert!(fs::read(mount.path().join("file")).unwrap() == data);
    let (new, _) = mount.next_worker(worker);
    assert_eq!(new, standby as u32, "the standby took over");
    let status = mount.status();
    assert_eq!(status["worker_restarts"].as_u64(), Some(1), "{status}");
    assert!(status["worker_start_ms"].as_f64().unwrap() < 1000.0, "{status}");
    standby_of(holder, new);
}

/// A fixture whose image holds one file, `file`, with `data`: (fixture root, image, store).
fn one_file_image(name: &str, data: &[u8]) -> (PathBuf, PathBuf, PathBuf) {
    let root = fixture_dir(name);
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("file"), data).unwrap();
    let store = root.join("store");
    let (image, _) = build_image(&src, &store, &root, &[]);
    (root, image, store)
}

/// An image of one 100,000-byte file whose only chunk in the store is a fifo: a worker that
/// reads it blocks until `feed` writes the real chunk.
struct HeldRead {
    mount: PhoenixMount,
    data: Vec<u8>,
    chunk: PathBuf,
    stored: Vec<u8>,
    reader: std::thread::JoinHandle<std::io::Result<Vec<u8>>>,
}

impl HeldRead {
    /// Mounts it and starts a reader of the file, held by the serving worker.
    fn start(name: &str) -> HeldRead {
        let data = noise(77, 100_000);
        let (root, image, store) = one_file_image(name, &data);
        let digest = hex::encode(Sha256::digest(&data));
        let chunk = store.join("chunks").join(&digest[..2]).join(&digest);
        let stored = fs::read(&chunk).unwrap();
        fs::remove_file(&chunk).unwrap();
        nix::unistd::mkfifo(&chunk, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);
        let path = mount.path().join("file");
        let reader = std::thread::spawn(move || fs::read(path));
        std::thread::sleep(Duration::from_millis(500));
        assert!(!reader.is_finished(), "the read must be waiting on the fifo");
        HeldRead { mount, data, chunk, stored, reader }
    }

    /// Feeds the fifo (to whichever worker now waits on it) and checks the reader's bytes.
    fn feed_and_check(self) -> PhoenixMount {
        File::options().write(true).open(&self.chunk).unwrap().write_all(&self.stored).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.reader.is_finished() {
            assert!(Instant::now() < deadline, "the held read was never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        let got = self.reader.join().unwrap().expect("the read succeeds after the takeover");
        assert!(got == self.data, "the resent read returned the right bytes");
        self.mount
    }
}

/// A READ the dead worker had taken but not answered is resent to, and answered by, the next
/// worker.
#[test]
fn a_request_the_killed_worker_held_is_answered_by_the_next() {
    let held = HeldRead::start("failover-resend");
    let first = held.mount.worker_pid();
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    held.mount.next_worker(first);
    std::thread::sleep(Duration::from_millis(200));
    let mount = held.feed_and_check();
    let status = mount.status();
    assert_eq!(status["worker_restarts"], 1);
    assert!(status["resent_requests"].as_u64() >= Some(1), "the READ came back as a resent request: {status}");
}

/// A panic is a death: a worker that panics in the middle of a READ ends, the holder starts
/// another, the kernel resends the READ and the reader gets the right bytes. The panic comes
/// from a failpoint that only builds with the daemon's `failpoints` feature have (the
/// workspace build the tests run, never a release of `phoenixfs`): when
/// `PHOENIXFS_FAILPOINT_PANIC_IN_READ` names a file that exists as a worker handles a READ,
/// the worker deletes the file and panics.
#[test]
fn a_read_whose_worker_panicked_is_answered_by_the_next() {
    let data = noise(11, 3 << 20);
    let (root, image, store) = one_file_image("failover-panic", &data);
    let marker = root.join("panic-in-read");
    let mount = PhoenixMount::with_env(&image, &store, &root.join("cache"), &[], &[("PHOENIXFS_FAILPOINT_PANIC_IN_READ", marker.as_os_str())]);
    let first = mount.worker_pid();
    fs::write(&marker, "").unwrap();
    let got = fs::read(mount.path().join("file")).expect("the READ is answered by the next worker");
    assert!(got == data, "the resent READ returned the right bytes");
    assert!(!marker.exists(), "a worker took the failpoint");
    let status = mount.status();
    assert_eq!(status["worker_restarts"], 1, "the panicking worker died and was replaced: {status}");
    assert_ne!(status["pid"].as_u64(), Some(u64::from(first)));
    let log = fs::read_to_string(status["log"].as_str().expect("the log's path")).unwrap();
    assert!(log.contains("panicked"), "the mount's log says the worker panicked:\n{log}");
    assert!(fs::read(mount.path().join("file")).unwrap() == data);
}

/// An upgrade's old worker killed while it still holds a READ (it cannot finish: the chunk
/// is a fifo): the holder has the new worker ask for a resend, and the READ is answered.
#[test]
fn a_request_held_by_a_worker_killed_while_retiring_is_answered() {
    let held = HeldRead::start("failover-retiring");
    let old = held.mount.worker_pid();
    phoenixfs_tests::run_ok(phoenixfs_tests::phoenixfs().arg("upgrade").arg(held.mount.path()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(phoenixfs_tests::process_alive(old), "the old worker waits to finish its READ");
    assert!(!held.reader.is_finished());
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mount = held.feed_and_check();
    let status = mount.status();
    assert_eq!((status["upgrades"].as_u64(), status["worker_restarts"].as_u64()), (Some(1), Some(0)));
    assert!(status["resent_requests"].as_u64() >= Some(1), "the READ came back as a resent request: {status}");
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
    let garbage = b"PHXSTATE\x03\x00\x00\x00\x05\x00\x00\x00{}{}}not-a-checksum-not-a-checksum-xx";
    sendmsg::<UnixAddr>(ours.as_raw_fd(), &[IoSlice::new(garbage)], &[ControlMessage::ScmRights(&[devnull.as_raw_fd(), devnull.as_raw_fd()])], MsgFlags::empty(), None).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let mut answer = [0u8; 256];
    let n = nix::unistd::read(ours.as_raw_fd(), &mut answer).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("refusing session state"), "{stderr}");
    assert!(String::from_utf8_lossy(&answer[..n]).contains("refusing session state"));
}

/// An upgrade to a binary that cannot take over fails with one line saying why, and the old
/// worker serves on; a good upgrade then replaces it without a resend.
#[test]
fn a_failed_upgrade_rolls_back() {
    let data = noise(5, 3 << 20);
    let (root, image, store) = one_file_image("failover-upgrade", &data);
    let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);
    let worker = mount.worker_pid();

    let out = phoenixfs_tests::run(phoenixfs_tests::phoenixfs().arg("upgrade").arg(mount.path()).arg("--binary").arg("/bin/false"));
    assert_one_line_error(&out, "the new worker did not start, the old one serves on");
    assert_eq!(mount.worker_pid(), worker);
    assert!(fs::read(mount.path().join("file")).unwrap() == data);

    let out = phoenixfs_tests::run_ok(phoenixfs_tests::phoenixfs().arg("upgrade").arg(mount.path()));
    let status = mount.status();
    assert!(out.contains(&format!("worker {} ", status["pid"])), "{out}");
    assert_ne!(status["pid"].as_u64(), Some(u64::from(worker)));
    assert_eq!(status["upgrades"], 1);
    assert!(fs::read(mount.path().join("file")).unwrap() == data);
    assert_eq!(mount.status()["resent_requests"], 0);
    wait_until(Duration::from_secs(10), "the replaced worker exits", || (!phoenixfs_tests::process_alive(worker)).then_some(()));
}

/// The holder keeps watching the serving worker while an upgrade's new worker is starting
/// (here, a binary that takes seconds to start): a worker killed meanwhile is replaced at
/// once, and the upgrade still completes.
#[test]
fn a_worker_killed_during_a_slow_upgrade_is_replaced_at_once() {
    let data = noise(9, 2 << 20);
    let (root, image, store) = one_file_image("failover-slow-upgrade", &data);
    let slow = root.join("slow-phoenixfs");
    fs::write(&slow, format!("#!/bin/sh\nsleep 5\nexec {} \"$@\"\n", phoenixfs_bin().display())).unwrap();
    fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mount = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);
    let first = mount.worker_pid();

    let (mountpoint, binary) = (mount.path_buf(), slow.clone());
    let upgrade = std::thread::spawn(move || phoenixfs_tests::run(phoenixfs_tests::phoenixfs().arg("upgrade").arg(mountpoint).arg("--binary").arg(binary)));
    std::thread::sleep(Duration::from_millis(500));
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    mount.next_worker(first);
    assert!(!upgrade.is_finished(), "the replacement serves before the slow upgrade is done");
    assert!(fs::read(mount.path().join("file")).unwrap() == data);

    let out = upgrade.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The holder tells the new worker the restart it missed while starting; it may take a
    // moment to read that.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = mount.status();
        if (status["upgrades"].as_u64(), status["worker_restarts"].as_u64()) == (Some(1), Some(1)) {
            break;
        }
        assert!(Instant::now() < deadline, "status after the upgrade: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(fs::read(mount.path().join("file")).unwrap() == data);
}
