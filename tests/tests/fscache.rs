//! `mount --fscache` on a real kernel: each test boots the cachefiles VM ([`phoenixfs_tests::vm`],
//! Linux 6.12 with cachefiles on-demand mode), where the host's binaries mount with the
//! kernel's own EROFS over fscache, served by our daemon. Pass: the mount equals the source,
//! also read while the worker is killed again and again;
//! readers see no error and no wrong byte while the daemon's worker or holder is killed or
//! upgraded; two images of one domain share their common blob's cache file. And on this host,
//! whose kernel has no cachefiles, the mount refuses in one line.

use std::fs;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use phoenixfs_tests::fscache::{report_in, shell_line};
use phoenixfs_tests::snapshot::{snapshot_dir, snapshot_lines};
use phoenixfs_tests::trees::{self, noise};
use phoenixfs_tests::vm::{Vm, VmRun, GUEST_CACHE_DIR};
use phoenixfs_tests::{assert_one_line_error, build_image, chaos, fixture_dir, phoenixfs, phoenixfs_bin, run};

/// Each VM wants both of the machine's cores.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn boot(script: &str, cache_disk_mib: u32, timeout: Duration) -> VmRun {
    let _turn = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let run = Vm { memory_mib: 2048, cpus: 2, cache_disk_mib, timeout }.run(script);
    assert_eq!(run.exit_code, Some(0), "the guest script failed (timed out: {}); console:\n{}", run.timed_out, run.console);
    run
}

fn chaos_bin() -> &'static str {
    env!("CARGO_BIN_EXE_phoenixfs-chaos")
}

/// `phoenixfs mount --fscache IMAGE DIR` as a guest shell line, with the cache files in
/// `files` on the guest's disk, and the chunk cache there too (its tmpfs is small).
fn mount_line(image: &Path, store: &Path, mountpoint: &str, files: &str, extra: &[&str]) -> String {
    let mut command = phoenixfs();
    command.args(["mount", "--fscache"]).arg(image).arg(mountpoint).arg("--store").arg(store);
    command.args(["--cache", &format!("{GUEST_CACHE_DIR}/chunks"), "--fscache-dir", &format!("{GUEST_CACHE_DIR}/{files}")]).args(extra);
    shell_line(&command)
}

#[test]
fn a_hostile_tree_mounted_through_fscache_equals_the_source() {
    let root = fixture_dir("fscache-hostile");
    let src = root.join("src");
    trees::all_cases(&src);
    fs::write(src.join("files/one-gib"), noise(77, 1 << 30)).unwrap();
    // The emulated guest hashes about 20 MiB/s: the tree's 5 GiB sparse file becomes one of
    // 256 MiB, with data at its start, in its middle and at its end.
    let sparse = src.join("files/sparse");
    fs::remove_file(&sparse).unwrap();
    let file = fs::File::create(&sparse).unwrap();
    file.set_len(256 << 20).unwrap();
    for (at, data) in [(0, b"start".to_vec()), (100 << 20, noise(78, 300_000)), ((256 << 20) - 3, b"end".to_vec())] {
        std::os::unix::fs::FileExt::write_all_at(&file, &data, at).unwrap();
    }
    let (image, _) = build_image(&src, &root.join("store"), &root, &[]);
    let expected = root.join("expected");
    fs::write(&expected, snapshot_lines(&snapshot_dir(&src))).unwrap();
    let p = phoenixfs_bin();
    let script = format!(
        r#"set -e
mkdir -p /tmp/mnt
{mount}
mount | grep ' /tmp/mnt '
# The worker is SIGKILLed every 10-500 ms while the snapshot reads everything from an empty
# cache, the 1 GiB file included.
(kills=0; while [ ! -e /tmp/snapshot-done ]; do
   sleep "$(awk "BEGIN {{ print $(shuf -i 10-500 -n 1) / 1000 }}")"
   worker=$({p} status /tmp/mnt --json | grep '"worker_pid"' | tr -dc 0-9)
   [ -n "$worker" ] && kill -9 "$worker" && kills=$((kills + 1))
 done; echo "WORKER-KILLS $kills") &
killer=$!
{chaos} snapshot --dir /tmp/mnt --out /tmp/actual
touch /tmp/snapshot-done; wait $killer
if ! diff {expected} /tmp/actual > /tmp/diff; then echo "the mount differs from the source:"; head -c 6000 /tmp/diff; exit 1; fi
echo SNAPSHOT-EQUAL
{p} status /tmp/mnt
{p} umount /tmp/mnt
if mount | grep -q ' /tmp/mnt '; then echo "still mounted"; exit 1; fi
test ! -e /run/phoenixfs/fscache/control.sock
echo UNMOUNTED"#,
        mount = mount_line(&image, &root.join("store"), "/tmp/mnt", "files", &[]),
        chaos = chaos_bin(),
        expected = expected.display(),
        p = p.display(),
    );
    let run = boot(&script, 4096, Duration::from_secs(900));
    for line in ["SNAPSHOT-EQUAL", "EROFS over fscache", "UNMOUNTED"] {
        assert!(run.console.contains(line), "{line:?} not in the console:\n{}", run.console);
    }
    let kills: u64 = run.console.lines().find_map(|l| l.split_once("WORKER-KILLS ")).and_then(|(_, n)| n.trim().parse().ok()).expect("the kill count");
    assert!(kills >= 50, "only {kills} worker kills while the tree was read");
    eprintln!("hostile tree through fscache, {kills} worker kills while it was read: equal to the source; VM run {:.0} s", run.elapsed.as_secs_f64());
}

/// Boots the VM and runs `phoenixfs-chaos fscache-run` on the VM dataset; its report.
fn fscache_chaos(victim: &str, events: usize) -> serde_json::Value {
    let dataset = chaos::vm_dataset();
    let script = format!(
        "set -e\nmkdir -p /tmp/work\n{chaos} fscache-run --dataset vm --victim {victim} --events {events} --fscache-dir {GUEST_CACHE_DIR}/files --work /tmp/work",
        chaos = chaos_bin()
    );
    let run = boot(&script, 1024, Duration::from_secs(900));
    let report = report_in(&run.console).unwrap_or_else(|| panic!("no report on the console:\n{}", run.console));
    eprintln!("fscache chaos {victim}: {}; kills while fetching {}", report["summary"], report["kills_while_fetching"]);
    assert_eq!(report["errors"], 0, "readers saw errors or wrong bytes: {report}");
    assert_eq!(report["daemon_errors"], 0, "the daemon could not answer requests: {report}");
    assert_eq!(report["holder_deaths_unasked"], 0, "a holder died by itself: {report}");
    assert!(report["bytes_verified"].as_u64().unwrap() >= 3 * dataset.bytes, "{report}");
    assert!(report["files_verified"].as_u64().unwrap() >= 4 * dataset.files as u64, "{report}");
    assert!(report["reader_passes"].as_array().unwrap().iter().all(|p| p.as_u64() >= Some(1)), "{report}");
    report
}

#[test]
fn readers_never_notice_the_fscache_worker_being_killed() {
    let report = fscache_chaos("worker", 50);
    assert_eq!(report["worker_kills"], 50);
    // The kills must hit the daemon while it fetches, not only once the kernel's cache serves.
    assert!(report["kills_while_fetching"].as_u64() >= Some(10), "{report}");
}

#[test]
fn readers_never_notice_the_fscache_holder_being_killed() {
    let report = fscache_chaos("holder", 20);
    assert_eq!(report["holder_kills"], 20);
}

#[test]
fn readers_never_notice_fscache_upgrades() {
    let report = fscache_chaos("upgrade", 20);
    assert_eq!(report["upgrades"], 20);
}

/// Two images whose files hold the same bytes (only their times differ) have one blob; in one
/// domain the kernel keeps one cache file for it, in none one per image. (Cache files are
/// linked into the cache directory when their mount ends, so it is measured after.)
#[test]
fn images_of_one_domain_share_their_blob_cache_file() {
    let root = fixture_dir("fscache-domain");
    let (first, second) = (root.join("first"), root.join("second"));
    for (tree, mtime) in [(&first, 1_600_000_000), (&second, 1_700_000_000)] {
        for i in 0..8u64 {
            let path = tree.join(format!("data/file{i}"));
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, noise(500 + i, 5 << 20)).unwrap();
            let time = nix::sys::time::TimeSpec::new(mtime, 0);
            nix::sys::stat::utimensat(None, &path, &time, &time, nix::sys::stat::UtimensatFlags::NoFollowSymlink).unwrap();
        }
    }
    let store = root.join("store");
    for out in ["first-out", "second-out"] {
        fs::create_dir_all(root.join(out)).unwrap();
    }
    let (first_image, first_id) = build_image(&first, &store, &root.join("first-out"), &[]);
    let (second_image, second_id) = build_image(&second, &store, &root.join("second-out"), &[]);
    assert_ne!(first_id, second_id, "the images differ (times)");
    let script = format!(
        r#"set -e
read_both() {{ cat /tmp/a/data/* /tmp/b/data/* > /dev/null; }}
mkdir -p /tmp/a /tmp/b
{mount_a_shared}
{mount_b_shared}
read_both
{p} umount /tmp/a
{p} umount /tmp/b
du -ak {GUEST_CACHE_DIR}/files | sort -n | tail -4
echo "DU shared $(du -sk {GUEST_CACHE_DIR}/files | cut -f1)"
{mount_a_separate}
{mount_b_separate}
read_both
{p} umount /tmp/a
{p} umount /tmp/b
du -ak {GUEST_CACHE_DIR}/separate | sort -n | tail -4
echo "DU separate $(du -sk {GUEST_CACHE_DIR}/separate | cut -f1)""#,
        mount_a_shared = mount_line(&first_image, &store, "/tmp/a", "files", &["--domain", "shared"]),
        mount_b_shared = mount_line(&second_image, &store, "/tmp/b", "files", &["--domain", "shared"]),
        mount_a_separate = mount_line(&first_image, &store, "/tmp/a", "separate", &[]),
        mount_b_separate = mount_line(&second_image, &store, "/tmp/b", "separate", &[]),
        p = phoenixfs_bin().display(),
    );
    let run = boot(&script, 512, Duration::from_secs(300));
    let du = |what: &str| -> u64 {
        let marker = format!("DU {what} ");
        let line = run.console.lines().find_map(|l| l.split_once(&marker)).unwrap_or_else(|| panic!("no {marker:?}:\n{}", run.console)).1;
        line.trim().parse().unwrap()
    };
    let (shared, separate) = (du("shared"), du("separate"));
    eprintln!("cache files for two images of 40 MiB each: {shared} KiB in one domain, {separate} KiB without");
    let blob_kib = 40 << 10;
    assert!(shared >= blob_kib && shared < blob_kib * 3 / 2, "one blob cache file in a domain: {shared} KiB");
    assert!(separate >= 2 * blob_kib, "one blob cache file per image without a domain: {separate} KiB");
}

#[test]
fn without_cachefiles_the_mount_says_so_in_one_line() {
    if Path::new("/dev/cachefiles").exists() {
        return eprintln!("this host has /dev/cachefiles: the refusal is checked on hosts without it");
    }
    let root = fixture_dir("fscache-refused");
    fs::create_dir_all(root.join("src")).unwrap();
    fs::write(root.join("src/file"), b"x").unwrap();
    let (image, _) = build_image(&root.join("src"), &root.join("store"), &root, &[]);
    fs::create_dir_all(root.join("mnt")).unwrap();
    let out = run(phoenixfs().args(["mount", "--fscache"]).arg(&image).arg(root.join("mnt")).arg("--store").arg(root.join("store")).args(["--fscache-dir"]).arg(root.join("fscache")));
    assert!(!out.status.success());
    assert_one_line_error(&out, "/dev/cachefiles is missing");
    assert!(String::from_utf8_lossy(&out.stderr).contains("use the FUSE mount"));
}

/// A store that is gone for a while (moved away for 3 s, in the guest) stalls the reader; the
/// daemon tries again until the chunks come, and no READ completes without its data.
#[test]
fn a_store_outage_is_a_stall_not_an_error() {
    let dataset = chaos::vm_dataset();
    let p = phoenixfs_bin();
    let script = format!(
        r#"set -e
cp -r {store} /tmp/store
mkdir -p /tmp/mnt
{mount}
(cd /tmp/mnt && sha256sum large/part0.bin large/part1.bin > /tmp/sums) &
reader=$!
sleep 0.5
mv /tmp/store /tmp/store-away
sleep 3
mv /tmp/store-away /tmp/store
wait $reader
cd {src} && sha256sum -c /tmp/sums
{p} status /tmp/mnt
{p} status /tmp/mnt --json | grep -q '"fetch_retries": [1-9]'
echo OUTAGE-SURVIVED
{p} umount /tmp/mnt"#,
        store = dataset.store.display(),
        mount = mount_line(&dataset.image, Path::new("/tmp/store"), "/tmp/mnt", "files", &[]),
        src = dataset.root.join("src").display(),
        p = p.display(),
    );
    let run = boot(&script, 1024, Duration::from_secs(600));
    assert!(run.console.contains("OUTAGE-SURVIVED"), "console:\n{}", run.console);
}
