//! The chaos harness: reader processes check every byte of an image's files through a real
//! mount, in a loop, while the mount's daemons are SIGKILLed or upgraded at random instants.
//! Used by the end-to-end tests (CI-sized) and by `phoenixfs-chaos` (long runs, benchmarks).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::{Digest, Sha256};

use phoenixfs_format::layout;

use crate::mount::PhoenixMount;
use crate::snapshot::sha256_via_mmap;
use crate::trees::noise;
use crate::{build_image, fixtures_root, phoenixfs, run_ok};

/// An image built from a tree, with what every regular file and symlink of the tree holds in
/// `manifest` (see [`ManifestEntry`]).
pub struct Dataset {
    pub image: PathBuf,
    pub store: PathBuf,
    pub manifest: PathBuf,
    pub root: PathBuf,
    /// Bytes in all regular files.
    pub bytes: u64,
    /// Regular files and symlinks: the manifest's entries.
    pub files: usize,
    /// Files, symlinks and the directories holding them.
    pub entries: usize,
}

impl Dataset {
    /// The size of the image file (bootstrap, chunk table, footer).
    pub fn image_bytes(&self) -> u64 {
        fs::metadata(&self.image).expect("the image file").len()
    }
}

/// The dataset `name`: `gib` ([`gib_dataset`]), `big` ([`big_dataset`]), or an absolute path
/// to a directory, packed as it is ([`tree_dataset`]).
pub fn dataset_named(name: &str) -> Dataset {
    match name {
        "gib" => gib_dataset(),
        "big" => big_dataset(),
        "vm" => vm_dataset(),
        path if path.starts_with('/') => tree_dataset(Path::new(path)),
        other => panic!("no dataset {other:?}: gib, big, or an absolute path"),
    }
}

/// Just over 1 GiB: four 256 MiB files, 3,000 small ones (100 B to 40 KiB) in 30
/// directories, and a few middle-sized ones. Built once, kept under the test fixtures.
pub fn gib_dataset() -> Dataset {
    cached_dataset("chaos-gib-v1", |src| {
        for i in 0..4u64 {
            write_file(&src.join(format!("large/part{i}.bin")), &noise(10 + i, 256 << 20));
        }
        for i in 0..20u64 {
            write_file(&src.join(format!("medium/m{i}.bin")), &noise(100 + i, (1 << 20) + (i as usize * 77_777)));
        }
        for i in 0..3000u64 {
            write_file(&src.join(format!("small/d{:02}/f{i}", i % 30)), &noise(1000 + i, 100 + (i as usize * 7919) % 40_000));
        }
    })
}

/// About 200 MiB for runs inside the cachefiles VM (emulated, so ten times slower than this
/// machine): two 64 MiB files, 40 medium, 600 small ones. Built once, kept under the test
/// fixtures (the guest sees them read-only).
pub fn vm_dataset() -> Dataset {
    cached_dataset("chaos-vm-v2", |src| {
        for i in 0..2u64 {
            write_file(&src.join(format!("large/part{i}.bin")), &noise(20 + i, 64 << 20));
        }
        for i in 0..40u64 {
            write_file(&src.join(format!("medium/m{i}.bin")), &noise(200 + i, (1 << 20) + (i as usize * 77_777)));
        }
        for i in 0..600u64 {
            write_file(&src.join(format!("small/d{:02}/f{i}", i % 12)), &noise(2000 + i, 100 + (i as usize * 7919) % 40_000));
        }
    })
}

/// One 1 GiB file of noise, for the remote-store benchmark.
pub fn store_bench_dataset() -> Dataset {
    cached_dataset("store-bench-v1", |src| write_file(&src.join("data/file.bin"), &noise(41, 1 << 30)))
}

/// One 256 MiB file of noise, for reading speeds and probes inside the cachefiles VM.
pub fn fscache_bench_dataset() -> Dataset {
    cached_dataset("fscache-bench-v1", |src| write_file(&src.join("data/file.bin"), &noise(31, 256 << 20)))
}

/// The largest file the builder stores inline, in the metadata right after its inode (a
/// file without xattrs: the inode and its data share one block).
const INLINE_MAX: usize = layout::BLOCK_SIZE - layout::INODE_EXTENDED_SIZE;

/// A tree shaped like a distribution's `/usr`, with metadata as big as such a tree gives:
/// 114,394 entries (10,815 directories, 99,679 files of which 200 are second names of hard
/// links, 3,900 symlinks, a few dangling), 1.36 GB (1.26 GiB) of file data and an 83 MB image
/// file. Three files in four are small enough to live inline in the metadata (0 to 4,032
/// bytes, most under 1 KiB: headers, scripts, manual pages), which is what makes the image
/// big; the rest are chunked: 23,400 just over the inline limit (4-32 KiB), 1,500 executables
/// (to 200 KiB), 300 libraries (64 KiB-2 MiB) and three of 128 MiB. 1,000 packages of 1-20
/// nested directories with 1-16 files each, a 6,000-entry manual section, a 2,100-entry
/// `bin`. Every directory holds a file, so the manifest's paths name them all. Generated,
/// built and listed in about 40 s (dev profile); kept under the test fixtures.
pub fn big_dataset() -> Dataset {
    cached_dataset("chaos-big-v1", |src| {
        let mut rng = XorShift(0x005e_edb1_6da7_a5e7);
        let mut seed = 1_000_000u64;
        let mut file = |path: PathBuf, len: usize| {
            seed += 1;
            write_file(&path, &noise(seed, len));
        };
        let link = |target: &str, path: PathBuf| symlink(target, &path).unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
        let lib = src.join("lib/x86_64-linux-gnu");
        for i in 0..3 {
            file(lib.join(format!("libhuge{i}.so.1")), 128 << 20);
        }
        for i in 0..300 {
            file(lib.join(format!("lib{i:03}.so.1")), (64 << 10) + rng.below(2 << 20));
            link(&format!("lib{i:03}.so.1"), lib.join(format!("lib{i:03}.so")));
        }
        for i in 0..1500 {
            file(src.join(format!("bin/prog{i:04}")), INLINE_MAX + 1 + rng.below(200 << 10));
        }
        for i in 0..600 {
            link(&format!("prog{:04}", i * 2), src.join(format!("bin/alias{i:03}")));
        }
        for i in 0..6000 {
            file(src.join(format!("share/man/man3/page{i:04}.3.gz")), small_size(&mut rng));
        }
        for p in 0..1000 {
            let top = ["share", "lib/python3/dist-packages", "include", "share/doc"][p % 4];
            let base = src.join(top).join(format!("pkg{p:04}"));
            let mut dirs = vec![base.clone()];
            for d in 1..=rng.below(20) {
                let parent = dirs[rng.below(dirs.len())].clone();
                dirs.push(parent.join(format!("d{d}")));
            }
            for dir in &dirs {
                for f in 0..=rng.below(16) {
                    let len = if rng.below(4) == 0 { INLINE_MAX + 1 + rng.below(28 << 10) } else { small_size(&mut rng) };
                    file(dir.join(format!("f{f:02}")), len);
                }
            }
            link("f00", base.join("link-here"));
            let last = dirs.last().expect("a directory").strip_prefix(&base).expect("under base").join("f00");
            link(last.to_str().expect("a UTF-8 path"), base.join("link-down"));
            link("../../no/such/file", base.join("link-dangling"));
            if p % 5 == 0 {
                let linked = base.join("f00");
                let other = src.join("share/hardlinks").join(format!("h{p:04}"));
                fs::create_dir_all(other.parent().expect("a parent")).expect("creating directories");
                fs::hard_link(&linked, &other).unwrap_or_else(|e| panic!("hard link {}: {e}", other.display()));
            }
        }
    })
}

/// A small file's size: up to the inline limit, most of them under 1 KiB.
fn small_size(rng: &mut XorShift) -> usize {
    let (a, b) = (rng.below(INLINE_MAX + 1), rng.below(INLINE_MAX + 1));
    if rng.below(2) == 0 {
        a * b / INLINE_MAX
    } else {
        a * b / INLINE_MAX * rng.below(INLINE_MAX + 1) / INLINE_MAX
    }
}

/// Deterministic pseudo-random numbers for shaping trees and timing events.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn write_file(path: &Path, data: &[u8]) {
    fs::create_dir_all(path.parent().expect("a parent")).expect("creating directories");
    fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// The dataset `name`: reused when a previous run completed it, else generated by `populate`
/// into `src/`, built, and listed in the manifest.
fn cached_dataset(name: &str, populate: impl FnOnce(&Path)) -> Dataset {
    let root = fixtures_root().join(name);
    let src = root.join("src");
    if !root.join("complete").exists() {
        if root.exists() {
            fs::remove_dir_all(&root).expect("clearing an incomplete dataset");
        }
        fs::create_dir_all(&src).expect("dataset directory");
        populate(&src);
    }
    built_dataset(root, &src)
}

/// A directory of this machine (the host's `/usr`, say) packed as it is, not copied. Rebuilt
/// when anything under it changed after the last build.
pub fn tree_dataset(source: &Path) -> Dataset {
    let name: String = source.to_str().expect("a UTF-8 path").chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let root = fixtures_root().join(format!("tree{name}"));
    let done = root.join("complete");
    let built_at = fs::metadata(&done).and_then(|m| m.modified()).ok();
    if built_at.is_some_and(|at| changed_since(source, at)) {
        fs::remove_file(&done).expect("marking the dataset stale");
    }
    built_dataset(root, source)
}

/// Whether anything under `dir` (itself included) was modified or changed after `time`.
fn changed_since(dir: &Path, time: std::time::SystemTime) -> bool {
    use std::os::unix::fs::MetadataExt;
    let since = time.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() as i64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = fs::symlink_metadata(&path) else { return true };
        if meta.mtime() >= since || meta.ctime() >= since {
            return true;
        }
        if meta.is_dir() {
            let Ok(entries) = fs::read_dir(&path) else { return true };
            pending.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
        }
    }
    false
}

/// The dataset kept in `root` for the tree `src`: built and listed unless a previous run
/// completed that.
fn built_dataset(root: PathBuf, src: &Path) -> Dataset {
    let (store, image, manifest, done) = (root.join("store"), root.join("image.phx"), root.join("manifest"), root.join("complete"));
    if !done.exists() {
        for stale in [&store, &manifest, &image] {
            if stale.is_dir() {
                fs::remove_dir_all(stale).expect("clearing a stale store");
            } else if stale.exists() {
                fs::remove_file(stale).expect("clearing a stale file");
            }
        }
        fs::create_dir_all(&root).expect("dataset directory");
        let started = std::time::SystemTime::now();
        build_image(src, &store, &root, &[]);
        let mut lines = String::new();
        for path in files_under(src) {
            let rel = path.strip_prefix(src).expect("under src").to_str().expect("a UTF-8 path");
            let meta = fs::symlink_metadata(&path).expect("lstat");
            if meta.is_symlink() {
                let target = fs::read_link(&path).expect("readlink");
                let target = target.as_os_str().as_encoded_bytes();
                lines.push_str(&format!("{SYMLINK}{}\t{}\t{rel}\n", hex::encode(target), target.len()));
            } else {
                let data = fs::read(&path).expect("reading the source");
                lines.push_str(&format!("{}\t{}\t{rel}\n", hex::encode(Sha256::digest(&data)), data.len()));
            }
        }
        fs::write(&manifest, lines).expect("writing the manifest");
        // Dated when the build began: what changed in the source since is seen as a change.
        File::create(&done).and_then(|f| f.set_modified(started)).expect("marking the dataset complete");
    }
    let entries = read_manifest(&manifest).expect("manifest");
    let dirs: std::collections::HashSet<&Path> = entries.iter().flat_map(|e| Path::new(&e.path).ancestors().skip(1)).filter(|d| !d.as_os_str().is_empty()).collect();
    let bytes = entries.iter().filter(|e| matches!(e.content, Content::File { .. })).map(|e| e.size).sum();
    Dataset { image, store, manifest, root, bytes, files: entries.len(), entries: entries.len() + dirs.len() }
}

/// The regular files and symlinks under `dir`, sorted; symlinks are not followed.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir).expect("read_dir").map(|e| e.expect("entry")).collect();
    entries.sort_by_key(fs::DirEntry::path);
    for entry in entries {
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            out.extend(files_under(&entry.path()));
        } else if kind.is_file() || kind.is_symlink() {
            out.push(entry.path());
        }
    }
    out
}

/// Marks a symlink's line in a manifest: `symlink:HEX-TARGET TAB target length TAB path`,
/// where a regular file's is `SHA256 TAB size TAB path`.
const SYMLINK: &str = "symlink:";

/// One line of a manifest.
pub(crate) struct ManifestEntry {
    content: Content,
    /// The file's size, or the symlink target's length (what `lstat` says).
    size: u64,
    pub(crate) path: String,
}

enum Content {
    File { sha256: String },
    Symlink { target: Vec<u8> },
}

pub(crate) fn read_manifest(path: &Path) -> io::Result<Vec<ManifestEntry>> {
    BufReader::new(File::open(path)?)
        .lines()
        .map(|line| {
            let line = line?;
            let mut fields = line.splitn(3, '\t');
            let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad manifest line {line:?}"));
            let first = fields.next().ok_or_else(bad)?;
            let content = match first.strip_prefix(SYMLINK) {
                Some(target) => Content::Symlink { target: hex::decode(target).map_err(|_| bad())? },
                None => Content::File { sha256: first.to_string() },
            };
            let size = fields.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let path = fields.next().ok_or_else(bad)?.to_string();
            Ok(ManifestEntry { content, size, path })
        })
        .collect()
}

/// How a reader process checks the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderKind {
    /// read(2) in 1 MiB pieces, sha256 compared, page cache dropped; symlinks read.
    Read,
    /// A shared memory map, sha256 compared; symlinks read.
    Mmap,
    /// Walks the directories: every name present, every size and type right (lstat only).
    Walk,
}

impl ReaderKind {
    fn name(self) -> &'static str {
        match self {
            ReaderKind::Read => "read",
            ReaderKind::Mmap => "mmap",
            ReaderKind::Walk => "walk",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [ReaderKind::Read, ReaderKind::Mmap, ReaderKind::Walk].into_iter().find(|k| k.name() == name)
    }
}

/// What one reader process saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReaderTally {
    pub bytes: u64,
    pub files: u64,
    pub errors: u64,
    pub passes: u64,
}

/// The longest single read(2) any read reader did, in microseconds: the worst stall an
/// application saw.
static WORST_READ_US: AtomicU64 = AtomicU64::new(0);

/// The body of a reader process: passes over every file of the manifest, beginning at file
/// `start`, until `stop` exists and at least one whole pass is done. Every error and wrong
/// byte is printed to stderr and counted. Prints its tally as JSON on stdout.
pub fn reader_main(mount: &Path, manifest: &Path, kind: ReaderKind, stop: &Path, start: usize) -> ReaderTally {
    let entries = read_manifest(manifest).expect("manifest");
    let mut tally = ReaderTally::default();
    let failed = |what: String| {
        eprintln!("{} reader: {what}", kind.name());
        1
    };
    while tally.passes == 0 || !stop.exists() {
        if kind == ReaderKind::Walk {
            let (names, errors) = walk_and_stat(mount);
            tally.errors += errors;
            for entry in &entries {
                let symlink = matches!(entry.content, Content::Symlink { .. });
                match names.get(entry.path.as_str()) {
                    Some(&(size, is_symlink)) if size == entry.size && is_symlink == symlink => tally.files += 1,
                    Some(&(size, is_symlink)) => tally.errors += failed(format!("{}: size {size}, symlink {is_symlink}; expected {}, {symlink}", entry.path, entry.size)),
                    None => tally.errors += failed(format!("{}: missing from its directory", entry.path)),
                }
            }
            if names.len() != entries.len() {
                tally.errors += failed(format!("{} files listed, expected {}", names.len(), entries.len()));
            }
        } else {
            for i in 0..entries.len() {
                let entry = &entries[(start + i) % entries.len()];
                match check_entry(mount, entry, kind) {
                    Ok(bytes) => {
                        tally.files += 1;
                        tally.bytes += bytes;
                    }
                    Err(what) => tally.errors += failed(format!("{}: {what}", entry.path)),
                }
            }
        }
        tally.passes += 1;
    }
    println!(
        "{{\"bytes\":{},\"files\":{},\"errors\":{},\"passes\":{},\"worst_read_us\":{}}}",
        tally.bytes,
        tally.files,
        tally.errors,
        tally.passes,
        WORST_READ_US.load(Ordering::Relaxed)
    );
    tally
}

/// Checks one manifest entry through the mount: a file's bytes (read with read(2) or
/// through a memory map), a symlink's target. The bytes checked, or what was wrong.
fn check_entry(mount: &Path, entry: &ManifestEntry, kind: ReaderKind) -> Result<u64, String> {
    let path = mount.join(&entry.path);
    match &entry.content {
        Content::Symlink { target } => match fs::read_link(&path) {
            Ok(got) if got.as_os_str().as_encoded_bytes() == target.as_slice() => Ok(0),
            Ok(got) => Err(format!("symlink to {}, expected {}", got.display(), String::from_utf8_lossy(target))),
            Err(e) => Err(e.to_string()),
        },
        Content::File { sha256 } => {
            let sum = match kind {
                ReaderKind::Mmap => sha256_via_mmap(&path).map(|sum| (sum, entry.size)),
                _ => sha256_by_read(&path),
            };
            match sum {
                Ok((sum, len)) if sum == *sha256 && len == entry.size => Ok(len),
                Ok((_, len)) => Err(format!("wrong bytes ({len} read, {} expected)", entry.size)),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

/// sha256 and length of a file read with read(2); a short read shows as a wrong length.
/// The file's pages are dropped from the page cache afterwards, so every pass reads through
/// the daemon again.
fn sha256_by_read(path: &Path) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let started = Instant::now();
        let n = file.read(&mut buf)?;
        WORST_READ_US.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if n == 0 {
            // So that the next pass reads through the daemon again. A kernel without
            // fadvise (the cachefiles VM's) keeps the pages: the next pass is cheaper, not wrong.
            match nix::fcntl::posix_fadvise(file.as_raw_fd(), 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED) {
                Ok(()) | Err(nix::errno::Errno::ENOSYS) => {}
                Err(errno) => return Err(errno.into()),
            }
            return Ok((hex::encode(hasher.finalize()), len));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

/// Everything but directories under `dir` (relative path -> size and whether it is a
/// symlink), and how many operations failed.
fn walk_and_stat(dir: &Path) -> (std::collections::HashMap<String, (u64, bool)>, u64) {
    let mut files = std::collections::HashMap::new();
    let mut errors = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = match fs::read_dir(&current) {
            Ok(entries) => entries,
            Err(e) => {
                eprintln!("walk reader: listing {}: {e}", current.display());
                errors += 1;
                continue;
            }
        };
        for entry in entries {
            let meta = entry.and_then(|e| fs::symlink_metadata(e.path()).map(|m| (e.path(), m)));
            match meta {
                Ok((path, meta)) if meta.is_dir() => pending.push(path),
                Ok((path, meta)) => {
                    files.insert(path.strip_prefix(dir).expect("under the walk root").display().to_string(), (meta.len(), meta.is_symlink()));
                }
                Err(e) => {
                    eprintln!("walk reader: {}: {e}", current.display());
                    errors += 1;
                }
            }
        }
    }
    (files, errors)
}

/// What to do to the mount's daemons while the readers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    Nobody,
    Worker,
    Holder,
    /// Holder, worker, holder, worker, ...
    Alternate,
    /// `phoenixfs upgrade` instead of a kill.
    Upgrade,
    /// Worker kill, upgrade, holder kill, worker kill, ...
    Mixed,
}

impl Victim {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "nobody" => Victim::Nobody,
            "worker" => Victim::Worker,
            "holder" => Victim::Holder,
            "alternate" => Victim::Alternate,
            "upgrade" => Victim::Upgrade,
            "mixed" => Victim::Mixed,
            _ => return None,
        })
    }
}

pub struct Plan {
    pub victim: Victim,
    /// Kills (or upgrades) to do at least.
    pub events: usize,
    /// Keep going at least this long.
    pub min_duration: Duration,
    /// Each event comes this many milliseconds (uniformly drawn) after the previous one's
    /// takeover is complete.
    pub interval_ms: (u64, u64),
    /// Reader processes: one mmap, one walker, the rest read(2); at least 4.
    pub readers: usize,
}

#[derive(Debug, Default)]
pub struct Report {
    pub worker_kills: usize,
    pub holder_kills: usize,
    pub upgrades: usize,
    pub bytes_verified: u64,
    pub files_verified: u64,
    /// Whole passes over the manifest, per reader (read, mmap, walk, read, ...).
    pub reader_passes: Vec<u64>,
    /// Errors and wrong bytes the readers saw, plus readers that died.
    pub errors: u64,
    /// Requests the daemon itself answered with an error.
    pub daemon_errors: u64,
    /// Kill to first answered request, per worker kill (measured by the daemon).
    pub stalls_ms: Vec<f64>,
    /// Requests the kernel resent to workers that took over by upgrade.
    pub resent_after_upgrades: u64,
    /// Holders that ended without being killed (a crash the worker covered for).
    pub holder_deaths_unasked: usize,
    /// Faults done to the store (servers killed and started again, say).
    pub store_faults: usize,
    /// The longest single read(2) of a reader.
    pub worst_read_ms: f64,
    /// Opens answered in passthrough mode, by all workers seen (each counts its own; one
    /// killed between two looks loses what it answered since the first).
    pub passthrough_opens: u64,
    pub elapsed: Duration,
}

impl Report {
    pub fn stall_percentile(&self, p: f64) -> Option<f64> {
        percentile(&self.stalls_ms, p)
    }

    pub fn summary(&self) -> String {
        let stall = |p| self.stall_percentile(p).map_or("-".into(), |ms| format!("{ms:.1} ms"));
        format!(
            "worker kills {}, holder kills {}, upgrades {}, store faults {}; {} files, {} bytes verified in {:.1} s ({:.0} MiB/s), reader passes {:?}; errors {}, daemon errors {}, holders that died by themselves {}, resent after upgrades {}; stall median {}, p99 {}, worst {}; longest read(2) {:.0} ms; passthrough opens {}",
            self.worker_kills,
            self.holder_kills,
            self.upgrades,
            self.store_faults,
            self.files_verified,
            self.bytes_verified,
            self.elapsed.as_secs_f64(),
            self.bytes_verified as f64 / self.elapsed.as_secs_f64() / f64::from(1 << 20),
            self.reader_passes,
            self.errors,
            self.daemon_errors,
            self.holder_deaths_unasked,
            self.resent_after_upgrades,
            stall(0.5),
            stall(0.99),
            stall(1.0),
            self.worst_read_ms,
            self.passthrough_opens,
        )
    }
}

/// The value below which a fraction `p` of `values` lie (nearest rank; 1.0: the largest).
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((last as f64) * p).round() as usize])
}

/// Mounts `dataset` with an empty cache at `cache`, starts the readers (`reader_bin read
/// ...`), carries out `plan`, stops the readers after their current pass, and reports.
pub fn run(dataset: &Dataset, reader_bin: &Path, plan: &Plan, cache: &Path) -> Report {
    assert!(plan.readers >= 4, "at least 4 readers");
    if cache.exists() {
        fs::remove_dir_all(cache).expect("emptying the cache");
    }
    // Passthrough on whatever the image (`auto` would leave it off for these, mostly small
    // files): its open-file table and backing files are under fire too, from the readers'
    // first pass on: files of 1 to 8 MiB are read once first, so their copies are there.
    let mount = PhoenixMount::new(&dataset.image, &dataset.store, cache, &["--passthrough", "on"]);
    for entry in read_manifest(&dataset.manifest).expect("manifest") {
        if matches!(entry.content, Content::File { .. }) && (1 << 20..=8 << 20).contains(&entry.size) {
            fs::read(mount.path().join(&entry.path)).expect("reading a file before the readers start");
        }
    }
    run_on(&mount, dataset, reader_bin, plan)
}

/// [`run`] on a mount made already (from any store, with any options).
pub fn run_on(mount: &PhoenixMount, dataset: &Dataset, reader_bin: &Path, plan: &Plan) -> Report {
    let stop = dataset.root.join(format!("stop-{}", std::process::id()));
    let _ = fs::remove_file(&stop);
    let started = Instant::now();
    let mut readers = spawn_readers(dataset, reader_bin, mount.path(), plan.readers, &stop);

    let mut report = Report::default();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut event = 0;
    // The worker the latest upgrade started, until its resent requests are counted.
    let mut upgraded = None;
    // Every holder pid seen: one more than the holder kills unless a holder died by itself.
    let mut holders = HashSet::new();
    let mut passthrough_opens = HashMap::new();
    let mut note_passthrough = |status: &Value| {
        let opens = passthrough_opens.entry(pid_of(status, "pid")).or_insert(0);
        *opens = status["passthrough_opens"].as_u64().unwrap_or(0).max(*opens);
    };
    while event < plan.events || started.elapsed() < plan.min_duration {
        let (low, high) = plan.interval_ms;
        std::thread::sleep(Duration::from_millis(low + rng.next_u64() % (high - low + 1)));
        let status = current_status(mount);
        holders.insert(pid_of(&status, "holder_pid"));
        note_passthrough(&status);
        count_resent_after_upgrade(&status, &mut upgraded, &mut report);
        match plan.victim {
            Victim::Nobody => {}
            Victim::Worker => kill_worker(mount, &status, &mut report),
            Victim::Holder => kill_holder(mount, &status, &mut report),
            Victim::Alternate if event % 2 == 0 => kill_holder(mount, &status, &mut report),
            Victim::Alternate => kill_worker(mount, &status, &mut report),
            Victim::Upgrade => upgraded = Some(upgrade(mount, &mut report)),
            Victim::Mixed => match event % 3 {
                0 => kill_worker(mount, &status, &mut report),
                1 => upgraded = Some(upgrade(mount, &mut report)),
                _ => kill_holder(mount, &status, &mut report),
            },
        }
        event += 1;
    }
    count_resent_after_upgrade(&current_status(mount), &mut upgraded, &mut report);
    finish_readers(&mut readers, &stop, &mut report);
    report.elapsed = started.elapsed();
    let status = current_status(mount);
    holders.insert(pid_of(&status, "holder_pid"));
    note_passthrough(&status);
    report.passthrough_opens = passthrough_opens.values().sum();
    report.holder_deaths_unasked = holders.len().saturating_sub(report.holder_kills + 1);
    report.daemon_errors = status["errors"].as_u64().unwrap_or(0);
    assert_eq!(status["worker_restarts"].as_u64(), Some(report.worker_kills as u64), "every worker kill is one restart");
    assert_eq!(status["upgrades"].as_u64(), Some(report.upgrades as u64), "every upgrade counted");
    report
}

/// Readers over `mount` while `fault` happens (a store server killed and started again, say)
/// `faults` times or more, each after a pause drawn from `interval_ms`; stops the readers after
/// their current pass and reports. Nothing is done to the mount's own daemons.
pub fn run_with_faults(mount: &PhoenixMount, dataset: &Dataset, reader_bin: &Path, readers: usize, faults: usize, interval_ms: (u64, u64), mut fault: impl FnMut()) -> Report {
    let stop = dataset.root.join(format!("stop-{}", std::process::id()));
    let _ = fs::remove_file(&stop);
    let started = Instant::now();
    let mut running = spawn_readers(dataset, reader_bin, mount.path(), readers, &stop);
    let mut report = Report::default();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    while report.store_faults < faults {
        let (low, high) = interval_ms;
        std::thread::sleep(Duration::from_millis(low + rng.next_u64() % (high - low + 1)));
        fault();
        report.store_faults += 1;
    }
    finish_readers(&mut running, &stop, &mut report);
    report.elapsed = started.elapsed();
    report.daemon_errors = current_status(mount)["errors"].as_u64().unwrap_or(0);
    report
}

/// Starts `count` reader processes (`reader_bin read`) over the dataset mounted at `mount`:
/// one mmap, one walker, the rest read(2), each from its own place in the manifest, until
/// `stop` exists.
pub(crate) fn spawn_readers(dataset: &Dataset, reader_bin: &Path, mount: &Path, count: usize, stop: &Path) -> Readers {
    Readers(
        (0..count)
            .map(|i| {
                let kind = match i {
                    1 => ReaderKind::Mmap,
                    2 => ReaderKind::Walk,
                    _ => ReaderKind::Read,
                };
                Command::new(reader_bin)
                    .arg("read")
                    .arg("--mount")
                    .arg(mount)
                    .arg("--manifest")
                    .arg(&dataset.manifest)
                    .arg("--kind")
                    .arg(kind.name())
                    .arg("--stop")
                    .arg(stop)
                    .arg("--start")
                    .arg((i * dataset.files / count).to_string())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("starting reader {}: {e}", reader_bin.display()))
            })
            .collect(),
    )
}

/// Tells the readers to stop after their current pass and adds up what they verified.
pub(crate) fn finish_readers(readers: &mut Readers, stop: &Path, report: &mut Report) {
    fs::write(stop, "").expect("stop file");
    for (i, reader) in std::mem::take(&mut readers.0).into_iter().enumerate() {
        let out = reader.wait_with_output().expect("waiting for a reader");
        let tally: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        match tally {
            Some(tally) if out.status.success() => {
                report.bytes_verified += tally["bytes"].as_u64().unwrap_or(0);
                report.files_verified += tally["files"].as_u64().unwrap_or(0);
                report.errors += tally["errors"].as_u64().unwrap_or(0);
                report.reader_passes.push(tally["passes"].as_u64().unwrap_or(0));
                report.worst_read_ms = report.worst_read_ms.max(tally["worst_read_us"].as_u64().unwrap_or(0) as f64 / 1000.0);
            }
            _ => {
                eprintln!("reader {i} ended badly: {}", out.status);
                report.errors += 1;
                report.reader_passes.push(0);
            }
        }
    }
    let _ = fs::remove_file(stop);
}

/// The reader processes; killed if the run ends early (a failed assertion), so that none
/// outlives its test.
pub(crate) struct Readers(Vec<Child>);

impl Drop for Readers {
    fn drop(&mut self) {
        for reader in &mut self.0 {
            let _ = reader.kill();
            let _ = reader.wait();
        }
    }
}

/// Status of the mount, waiting out the instants when no worker answers (a takeover).
pub(crate) fn current_status(mount: &PhoenixMount) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = phoenixfs().arg("status").arg(mount.path()).arg("--json").output().expect("running status");
        if out.status.success() {
            if let Ok(all) = serde_json::from_slice::<Value>(&out.stdout) {
                return all[0].clone();
            }
        }
        assert!(Instant::now() < deadline, "no daemon answered status for 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub(crate) fn pid_of(status: &Value, field: &str) -> i32 {
    status[field].as_u64().unwrap_or_else(|| panic!("{field} in status")) as i32
}

/// Kills the worker and waits until its successor has answered a request and measured the
/// stall.
fn kill_worker(mount: &PhoenixMount, status: &Value, report: &mut Report) {
    kill(Pid::from_raw(pid_of(status, "pid")), Signal::SIGKILL).expect("killing the worker");
    report.worker_kills += 1;
    report.stalls_ms.push(await_takeover(mount, status).1);
}

/// After the worker `before` names was killed: waits until its successor has answered a
/// request and the stall is measured; the successor's status, and the stall (ms).
pub(crate) fn await_takeover(mount: &PhoenixMount, before: &Value) -> (Value, f64) {
    let (worker, measured) = (pid_of(before, "pid"), before["takeovers_measured"].as_u64().unwrap_or(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = current_status(mount);
        if pid_of(&now, "pid") != worker && now["takeovers_measured"].as_u64().unwrap_or(0) > measured {
            let stall = now["takeover_stalls_ms"].as_array().and_then(|stalls| stalls.last()).and_then(Value::as_f64).expect("a stall");
            return (now, stall);
        }
        assert!(Instant::now() < deadline, "no request answered for 60 s after killing worker {worker}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Kills the holder and waits until the worker has started a new one.
fn kill_holder(mount: &PhoenixMount, status: &Value, report: &mut Report) {
    let holder = pid_of(status, "holder_pid");
    kill(Pid::from_raw(holder), Signal::SIGKILL).expect("killing the holder");
    report.holder_kills += 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    while pid_of(&current_status(mount), "holder_pid") == holder {
        assert!(Instant::now() < deadline, "no new holder 60 s after killing holder {holder}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Upgrades the worker (to the same binary); the new worker's pid.
fn upgrade(mount: &PhoenixMount, report: &mut Report) -> i32 {
    run_ok(phoenixfs().arg("upgrade").arg(mount.path()));
    report.upgrades += 1;
    // The new worker answers status from the moment the upgrade is done.
    pid_of(&current_status(mount), "pid")
}

/// Counts, once, the requests resent to a worker that took over by upgrade (none should be:
/// an upgrade sends no FUSE_NOTIFY_RESEND), while it still serves.
fn count_resent_after_upgrade(status: &Value, upgraded: &mut Option<i32>, report: &mut Report) {
    if *upgraded == Some(pid_of(status, "pid")) {
        report.resent_after_upgrades += status["resent_requests"].as_u64().unwrap_or(0);
    }
    *upgraded = None;
}
