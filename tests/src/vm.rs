//! A small Linux VM for the tests that need what the host kernel lacks: cachefiles in on-demand
//! mode and EROFS over fscache. [`Vm::run`] boots qemu (TCG) with [`kernel`] and a busybox
//! initramfs, runs a shell script inside, and returns everything the guest printed with the
//! script's exit status.
//!
//! The guest runs the host's own programs: its `/init` mounts the host's `/` read-only over 9p
//! and runs the script with `chroot` into it, so host binaries (Python, the `phoenixfs` binary
//! in the target directory) run as they are. Inside that root the guest has its own proc, sys
//! and dev, tmpfs over `/tmp`, `/run`, `/dev/shm` and `/var/cache`, and a fresh ext4 disk at
//! [`GUEST_CACHE_DIR`] (cachefiles refuses a tmpfs cache directory). So:
//! - files a test prepares for the guest must live outside the host's `/tmp`, `/run` and
//!   `/var/cache`, which the guest's tmpfs hide: under the target directory
//!   ([`crate::fixture_dir`]) is the place;
//! - the guest cannot write to the host's files, and what it writes is gone after the run; it
//!   reports back through its console output only.
//!
//! The initramfs is built once and cached under the target directory; each run appends a tiny
//! second archive holding its script (the kernel unpacks concatenated archives in turn).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::run_ok;

/// The guest's cache directory for cachefiles (`dir /var/cache/fscache`): an ext4 disk of
/// [`Vm::cache_disk_mib`], empty at each boot.
pub const GUEST_CACHE_DIR: &str = "/var/cache/fscache";

/// The line the guest prints after the script, followed by its exit status.
const EXIT_MARKER: &str = "PHOENIXFS-VM-EXIT ";

/// Where the guest's `/init` finds the script; `run` adds it to the initramfs.
const GUEST_SCRIPT: &str = "script.sh";

/// The guest's `/init` after its first lines, which [`init_script`] writes. Each setup step that
/// fails says so and powers off at once, so a broken setup shows in the console and gives no exit
/// status instead of a confusing script failure.
const INIT_BODY: &str = r#"/bin/busybox --install -s /bin
fail() { echo "PHOENIXFS-VM-SETUP-FAILED: $*"; reboot -f; }
mount -t proc proc /proc || fail proc
mount -t sysfs sys /sys || fail sysfs
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /host || fail "9p host root"
mount -t proc proc /host/proc || fail "host proc"
mount -t sysfs sys /host/sys || fail "host sysfs"
mount -t devtmpfs dev /host/dev || fail "host dev"
mkdir -p /host/dev/shm && mount -t tmpfs shm /host/dev/shm || fail "host /dev/shm"
mount -t tmpfs tmp /host/tmp || fail "host /tmp"
mount -t tmpfs run /host/run || fail "host /run"
mount -t tmpfs cache /host/var/cache || fail "host /var/cache"
mkdir /host$cache_dir && mount -t ext4 /dev/vda /host$cache_dir || fail "cache disk"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
chroot /host /bin/sh -c "$(cat "$script")"
echo "$exit_marker$?"
reboot -f
"#;

/// A VM configuration; [`Vm::default`] suits a test that serves one small image.
#[derive(Clone, Debug)]
pub struct Vm {
    pub memory_mib: u32,
    pub cpus: u32,
    pub cache_disk_mib: u32,
    /// The whole run, boot included; the VM is killed when it passes.
    pub timeout: Duration,
}

/// What one run of a script in the VM gave.
#[derive(Debug)]
pub struct VmRun {
    /// Everything the guest printed (kernel messages and the script's output), lines ending in `\n`.
    pub console: String,
    /// The script's exit status; None when it never reported one (it hung, or the setup failed).
    pub exit_code: Option<i32>,
    /// Whether the VM was killed at [`Vm::timeout`].
    pub timed_out: bool,
    /// From starting qemu until it ended.
    pub elapsed: Duration,
}

impl Default for Vm {
    fn default() -> Self {
        Vm { memory_mib: 1024, cpus: 1, cache_disk_mib: 256, timeout: Duration::from_secs(120) }
    }
}

impl Vm {
    /// Boots the VM, runs `script` with the guest's `/bin/sh -c` (which is the host's), and
    /// returns once the VM is gone. The guest's console is streamed to stderr as it comes,
    /// each line prefixed with `vm: `, so a slow or stuck run shows where it is.
    pub fn run(&self, script: &str) -> VmRun {
        let vm_dir = vm_dir();
        let run_dir = tempfile::Builder::new().prefix("run-").tempdir_in(&vm_dir).expect("VM run directory");

        let initrd = run_dir.path().join("initrd.gz");
        let mut initrd_bytes = std::fs::read(base_initramfs(&vm_dir)).expect("reading the cached initramfs");
        initrd_bytes.extend(gzip(&cpio(&[CpioEntry::file(GUEST_SCRIPT, 0o644, script.as_bytes())]), run_dir.path()));
        std::fs::write(&initrd, initrd_bytes).expect("writing the run's initramfs");

        let cache_disk = run_dir.path().join("cache.img");
        File::create(&cache_disk)
            .and_then(|f| f.set_len(u64::from(self.cache_disk_mib) << 20))
            .expect("creating the cache disk");
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&cache_disk));

        let mut qemu = Command::new("qemu-system-x86_64");
        // -nic none: no network card, so no network boot ROM to wait for.
        qemu.args(["-accel", "tcg", "-nographic", "-no-reboot", "-nic", "none"])
            .args(["-m", &self.memory_mib.to_string(), "-smp", &self.cpus.to_string()])
            .arg("-kernel")
            .arg(kernel())
            .arg("-initrd")
            .arg(&initrd)
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw", cache_disk.display()))
            .args(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"])
            // panic=-1: a guest kernel panic reboots, which ends qemu, instead of waiting out the timeout.
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It kills qemu
        // when the thread that started it dies, so even a killed test process leaves no VM
        // behind; `run` holds this thread until qemu has ended.
        unsafe {
            qemu.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }

        let started = Instant::now();
        let mut qemu = RunningVm(qemu.spawn().unwrap_or_else(|e| {
            panic!("starting qemu-system-x86_64: {e} (scripts/test installs qemu-system-x86)")
        }));
        let stdout = qemu.0.stdout.take().expect("qemu's stdout is piped");
        // A thread drains the console so qemu never blocks on a full pipe while we wait.
        let console = std::thread::spawn(move || read_console(stdout));
        let deadline = started + self.timeout;
        let timed_out = loop {
            if qemu.0.try_wait().expect("polling qemu").is_some() {
                break false;
            }
            if Instant::now() >= deadline {
                qemu.kill();
                break true;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let elapsed = started.elapsed();
        let console = console.join().expect("console reader");
        let exit_code = exit_code(&console);
        VmRun { console, exit_code, timed_out, elapsed }
    }
}

/// The kernel to boot: the prebuilt `../shared/vm/bzImage` beside the repository when there is
/// one, else the one `scripts/build-vm-kernel` caches in the target directory.
pub fn kernel() -> PathBuf {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/vm/bzImage");
    if shared.exists() {
        return shared;
    }
    let target_dir = crate::profile_dir().join("..");
    let built = target_dir.join("vm/bzImage");
    assert!(
        built.exists(),
        "no VM kernel: run `scripts/build-vm-kernel {}/vm` (about 20 minutes) or provide ../shared/vm/bzImage",
        target_dir.display()
    );
    built
}

/// The qemu process of a run; killed and reaped on drop, so no VM outlives its test, even one
/// that panicked.
struct RunningVm(Child);

impl RunningVm {
    fn kill(&mut self) {
        // Both fail only when qemu has already been reaped, which is what we want anyway.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads qemu's console to the end, echoing each line to stderr; the serial line's `\r` dropped.
fn read_console(stdout: impl std::io::Read) -> String {
    let mut reader = BufReader::new(stdout);
    let mut console = String::new();
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => return console,
            Ok(_) => {
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']);
                eprintln!("vm: {line}");
                console.push_str(line);
                console.push('\n');
            }
        }
    }
}

/// The status after the last exit marker: kernel messages may share its line, so it is found
/// anywhere in a line.
fn exit_code(console: &str) -> Option<i32> {
    let (_, after) = console.rsplit_once(EXIT_MARKER)?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `<target>/test-fixtures/vm`, created when missing: the cached initramfs and the runs' files.
fn vm_dir() -> PathBuf {
    let dir = crate::fixtures_root().join("vm");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// The guest's `/init`: the constants it shares with this module as shell variables, then `INIT_BODY`.
fn init_script() -> String {
    format!(
        "#!/bin/busybox sh\ncache_dir={GUEST_CACHE_DIR}\nscript=/{GUEST_SCRIPT}\nexit_marker='{EXIT_MARKER}'\n{INIT_BODY}"
    )
}

/// The gzip'd initramfs with busybox and `/init`, built when busybox or `/init` changed (the
/// file is named by their hash) and reused otherwise.
fn base_initramfs(vm_dir: &Path) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox")
        .unwrap_or_else(|e| panic!("reading /bin/busybox: {e} (scripts/test installs busybox-static)"));
    let init = init_script();
    let hash = hex::encode(&Sha256::new().chain_update(&busybox).chain_update(&init).finalize()[..8]);
    let path = vm_dir.join(format!("initramfs-{hash}.cpio.gz"));
    if path.exists() {
        return path;
    }
    let archive = cpio(&[
        CpioEntry::dir("bin"),
        CpioEntry::dir("dev"),
        CpioEntry::console(),
        CpioEntry::dir("proc"),
        CpioEntry::dir("sys"),
        CpioEntry::file("bin/busybox", 0o755, &busybox),
        CpioEntry::file("init", 0o755, init.as_bytes()),
    ]);
    let build_dir = tempfile::tempdir_in(vm_dir).expect("initramfs build directory");
    // Written aside and renamed, so tests running side by side never read a half-written one.
    let partial = build_dir.path().join("initramfs.cpio.gz");
    std::fs::write(&partial, gzip(&archive, build_dir.path())).expect("writing the initramfs");
    std::fs::rename(&partial, &path).expect("caching the initramfs");
    path
}

/// One member of a cpio archive in the kernel's "newc" format.
struct CpioEntry<'a> {
    name: &'a str,
    mode: u32,
    /// (major, minor) of a device node.
    rdev: (u32, u32),
    data: &'a [u8],
}

impl<'a> CpioEntry<'a> {
    fn dir(name: &'a str) -> Self {
        CpioEntry { name, mode: libc::S_IFDIR | 0o755, rdev: (0, 0), data: &[] }
    }

    fn file(name: &'a str, permissions: u32, data: &'a [u8]) -> Self {
        CpioEntry { name, mode: libc::S_IFREG | permissions, rdev: (0, 0), data }
    }

    /// `/dev/console`, which the kernel opens for `/init`'s output before anything is mounted.
    fn console() -> Self {
        CpioEntry { name: "dev/console", mode: libc::S_IFCHR | 0o600, rdev: (5, 1), data: &[] }
    }
}

/// A newc cpio archive (the kernel's initramfs format, `Documentation/driver-api/early-userspace/buffer-format.rst`):
/// per member a header of 13 hex fields, the name, the data, each padded to 4 bytes.
fn cpio(entries: &[CpioEntry]) -> Vec<u8> {
    fn pad(archive: &mut Vec<u8>) {
        archive.resize(archive.len().next_multiple_of(4), 0);
    }
    let trailer = CpioEntry { name: "TRAILER!!!", mode: 0, rdev: (0, 0), data: &[] };
    let mut archive = Vec::new();
    for (ino, entry) in entries.iter().chain([&trailer]).enumerate() {
        let nlink = if entry.mode & libc::S_IFMT == libc::S_IFDIR { 2 } else { 1 };
        let fields = [
            ino as u32 + 1,
            entry.mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            entry.data.len() as u32,
            0, // devmajor
            0, // devminor
            entry.rdev.0,
            entry.rdev.1,
            entry.name.len() as u32 + 1,
            0, // check
        ];
        archive.extend_from_slice(b"070701");
        for field in fields {
            archive.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        archive.extend_from_slice(entry.name.as_bytes());
        archive.push(0);
        pad(&mut archive);
        archive.extend_from_slice(entry.data);
        pad(&mut archive);
    }
    archive
}

/// `data` compressed with the `gzip` binary (the kernel's initramfs decompressor reads gzip),
/// through a file in `scratch_dir`.
fn gzip(data: &[u8], scratch_dir: &Path) -> Vec<u8> {
    let input = scratch_dir.join("to-gzip");
    File::create(&input).and_then(|mut f| f.write_all(data)).expect("writing data to gzip");
    let output = Command::new("gzip").args(["-n", "-c"]).arg(&input).output().expect("running gzip");
    assert!(output.status.success(), "gzip failed: {}", String::from_utf8_lossy(&output.stderr));
    std::fs::remove_file(&input).expect("removing gzip's input");
    output.stdout
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_status_is_read_after_the_last_marker_even_mid_line() {
        assert_eq!(exit_code("PHOENIXFS-VM-EXIT 0\nreboot: Restarting system\n"), Some(0));
        assert_eq!(exit_code("[    3.1] erofs: mountedPHOENIXFS-VM-EXIT 127\n"), Some(127));
        assert_eq!(exit_code("PHOENIXFS-VM-EXIT 1\nPHOENIXFS-VM-EXIT 3\n"), Some(3));
        assert_eq!(exit_code("echo hanging\n"), None);
    }

    #[test]
    fn cpio_members_are_padded_to_four_bytes_and_end_with_the_trailer() {
        let archive = cpio(&[CpioEntry::file("init", 0o755, b"abcde")]);
        // 110-byte header + "init\0" = 115, padded to 116; 5 data bytes padded to 8.
        assert_eq!(&archive[..6], b"070701");
        assert_eq!(&archive[116..124], b"abcde\0\0\0");
        assert_eq!(&archive[124..130], b"070701");
        assert!(archive.ends_with(b"TRAILER!!!\0\0\0\0"));
        assert_eq!(archive.len() % 4, 0);
    }
}
