//! The generated tree with every case: built with the CLI, checked by fsck.erofs, mounted by
//! the kernel's own EROFS and read back by our reader; all must equal the source.

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use phoenixfs_format::ImageFile;
use phoenixfs_store::LocalStore;
use phoenixfs_tests::kernel::KernelMount;
use phoenixfs_tests::mount::PhoenixMount;
use phoenixfs_tests::snapshot::{assert_same, sha256_via_mmap, snapshot_dir, snapshot_image, Snapshot};
use phoenixfs_tests::{build_image, export_blob, fixture_dir, fsck_erofs, phoenixfs, run_ok, trees};

struct Fixture {
    root: PathBuf,
    src: PathBuf,
    store: PathBuf,
    image: PathBuf,
    id: String,
    blob: Option<PathBuf>,
    source: Snapshot,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = fixture_dir("all-cases");
        let src = root.join("src");
        fs::create_dir(&src).unwrap();
        trees::all_cases(&src);
        let store = root.join("store");
        let (image, id) = build_image(&src, &store, &root, &[]);
        let blob = export_blob(&image, &store, &root.join("blob"));
        let source = snapshot_dir(&src);
        Fixture { root, src, store, image, id, blob, source }
    })
}

#[test]
fn fsck_erofs_accepts_the_bootstrap_and_reads_every_file() {
    let f = fixture();
    let out = fsck_erofs(&f.image, f.blob.as_deref());
    assert!(out.status.success(), "fsck.erofs failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn kernel_erofs_mount_equals_the_source_and_our_reader() {
    let f = fixture();
    let mount = KernelMount::new(&f.image, f.blob.as_deref());
    let kernel = snapshot_dir(mount.path());
    assert_same(&f.source, &kernel, "kernel EROFS mount vs source");
    let image = ImageFile::decode(fs::read(&f.image).unwrap()).unwrap();
    let ours = snapshot_image(&image, &LocalStore::open(&f.store).unwrap());
    assert_same(&kernel, &ours, "our reader vs kernel EROFS mount");
}

#[test]
fn the_source_tree_really_has_every_case() {
    let s = &fixture().source;
    let kinds: std::collections::BTreeSet<char> = s.values().map(|e| e.kind).collect();
    assert_eq!(kinds, "bcdflps".chars().collect());
    assert_eq!(s["files/sparse"].size, Some(trees::SPARSE_SIZE));
    assert_eq!(s["links/longest-target"].symlink_target.as_ref().unwrap().len(), 4095);
    assert_eq!(s["hard-3"].link_group.as_deref(), Some("hard-3"));
    assert_eq!(s["links/sub/hard-2"].link_group.as_deref(), Some("hard-3"));
    assert_eq!(s["modes/setuid"].mode & 0o7777, 0o4755);
    assert!(s["xattrs/capable"].xattrs.contains_key(&b"security.capability"[..]));
    assert_eq!(s.keys().filter(|p| p.starts_with("big-dir/")).count(), trees::BIG_DIR_ENTRIES);
}

#[test]
fn our_reader_looks_up_and_lists_like_the_source() {
    let f = fixture();
    let image = ImageFile::decode(fs::read(&f.image).unwrap()).unwrap();
    let b = &image.bootstrap;
    let big = b.resolve(b"big-dir").unwrap().expect("big-dir");
    let entries = b.read_dir(&big).unwrap();
    assert_eq!(entries.len(), trees::BIG_DIR_ENTRIES + 2);
    let mut names: Vec<_> = entries.iter().map(|e| e.name.clone()).collect();
    names.dedup();
    assert_eq!(names.len(), trees::BIG_DIR_ENTRIES + 2, "duplicate names");
    for i in [0, 1, 4095, 50_000, 99_999] {
        let name = format!("entry-{i:06}");
        let nid = b.lookup(&big, name.as_bytes()).unwrap().unwrap_or_else(|| panic!("{name} not found"));
        assert_eq!(entries.iter().find(|e| e.name == name.as_bytes()).unwrap().nid, nid);
    }
    for absent in ["entry-100000", "entry-", "", "zzz", "-"] {
        assert_eq!(b.lookup(&big, absent.as_bytes()).unwrap(), None, "{absent:?}");
    }
    assert!(b.resolve(b"files/tiny/below-a-file").unwrap().is_none());
    assert!(b.resolve(b"deep/level0/level1/level2").unwrap().is_some());
}

#[test]
fn builds_are_deterministic() {
    let f = fixture();
    let again = f.root.join("again");
    fs::create_dir_all(&again).unwrap();
    let (image, id) = build_image(&f.src, &again.join("fresh-store"), &again, &[]);
    assert_eq!(id, f.id);
    assert_eq!(fs::read(&image).unwrap(), fs::read(&f.image).unwrap());
    let stored = f.store.join("images").join(&f.id);
    assert_eq!(fs::read(stored).unwrap(), fs::read(&f.image).unwrap(), "the store holds the image under its id");
}

#[test]
fn inspect_counts_what_the_source_holds() {
    let f = fixture();
    let json: serde_json::Value = serde_json::from_str(&run_ok(phoenixfs().arg("inspect").arg(&f.image).arg("--json"))).unwrap();
    let regular: std::collections::BTreeSet<_> = f.source.iter().filter(|(_, e)| e.kind == 'f').map(|(p, e)| e.link_group.clone().unwrap_or(p.clone())).collect();
    let dirs = f.source.values().filter(|e| e.kind == 'd').count();
    assert_eq!(json["regular_files"], regular.len());
    assert_eq!(json["directories"], dirs);
    assert_eq!(json["paths"], f.source.len());
    assert_eq!(json["chunk_size"], 1 << 20);
    assert_eq!(json["id"], f.id);
    let referenced = json["referenced_bytes"].as_u64().unwrap();
    let distinct = json["chunk_bytes"].as_u64().unwrap();
    assert!(referenced >= distinct + (7 << 20), "many-chunks-copy must dedup: {referenced} vs {distinct}");
    let by_id = run_ok(phoenixfs().arg("inspect").arg(&f.id).arg("--store").arg(&f.store).arg("--json"));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&by_id).unwrap(), json);
}

#[test]
fn check_verifies_every_chunk() {
    let f = fixture();
    let out = run_ok(phoenixfs().arg("check").arg(&f.image).arg("--store").arg(&f.store));
    assert!(out.starts_with("ok:"), "{out}");
}

#[test]
fn phoenixfs_mount_equals_the_source() {
    let f = fixture();
    let mount = PhoenixMount::new(&f.image, &f.store, &f.root.join("cache-mount"), &[]);
    assert_same(&f.source, &snapshot_dir(mount.path()), "phoenixfs mount vs source");

    for path in ["files/many-chunks", "files/sparse", "files/tiny", "files/chunk-plus-one", "links/hard", "files/empty"] {
        assert_eq!(Some(sha256_via_mmap(&mount.path().join(path)).expect("mmap")), f.source[path].sha256, "mmap of {path}");
    }
    let mut names: Vec<_> = fs::read_dir(mount.path().join("big-dir")).unwrap().map(|e| e.unwrap().file_name()).collect();
    let listed = names.len();
    names.sort();
    names.dedup();
    assert_eq!((listed, names.len()), (trees::BIG_DIR_ENTRIES, trees::BIG_DIR_ENTRIES), "readdir complete, no duplicates");

    // SEEK_DATA / SEEK_HOLE answer as the kernel's own EROFS does on the same image.
    let kernel = KernelMount::new(&f.image, f.blob.as_deref());
    let probes = [(0, libc::SEEK_DATA), (0, libc::SEEK_HOLE), (5 << 20, libc::SEEK_DATA), (2 << 30, libc::SEEK_HOLE), ((2 << 30) + 400_000, libc::SEEK_DATA)];
    for (offset, whence) in probes {
        let seek = |root: &std::path::Path| {
            let file = fs::File::open(root.join("files/sparse")).unwrap();
            // SAFETY: lseek on a file we hold open.
            unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&file), offset, whence) }
        };
        assert_eq!(seek(mount.path()), seek(kernel.path()), "lseek({offset}, {whence})");
    }

    let write = fs::write(mount.path().join("files/new"), b"x").unwrap_err();
    assert_eq!(write.raw_os_error(), Some(libc::EROFS));

    let status = mount.status();
    assert_eq!(status["errors"], 0, "{status}");
    assert_eq!(status["image_id"], f.id);
}
