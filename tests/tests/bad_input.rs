//! Every mistake a user can make gets one clear line, a non-zero exit, and no half-written
//! image.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use phoenixfs_builder::{build, BuildError, BuildOptions};
use phoenixfs_format::{ChunkEntry, Digest, ImageId};
use phoenixfs_store::{ChunkStore, LocalStore, StoreError};
use phoenixfs_tests::trees::noise;
use phoenixfs_tests::{assert_one_line_error, build_image, chunk_files, fixture_dir, phoenixfs, run, run_ok};

fn small_tree(root: &Path) -> std::path::PathBuf {
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data"), noise(1, 3 << 20)).unwrap();
    fs::write(src.join("note"), b"note").unwrap();
    src
}

#[test]
fn missing_or_wrong_source_is_named() {
    let root = fixture_dir("bad-source");
    let missing = root.join("no-such-dir");
    let out = run(phoenixfs().arg("build").arg(&missing).arg("--store").arg(root.join("s")).arg("-o").arg(root.join("i")));
    assert_one_line_error(&out, &missing.display().to_string());
    fs::write(root.join("a-file"), b"x").unwrap();
    let out = run(phoenixfs().arg("build").arg(root.join("a-file")).arg("--store").arg(root.join("s")).arg("-o").arg(root.join("i")));
    assert_one_line_error(&out, "a-file: not a tar stream (nor a directory)");
    assert!(!root.join("i").exists());
}

#[test]
fn unwritable_store_is_named() {
    let root = fixture_dir("bad-store");
    let src = small_tree(&root);
    let out = run(phoenixfs().arg("build").arg(&src).arg("--store").arg("/proc/phoenixfs-store").arg("-o").arg(root.join("i")));
    assert_one_line_error(&out, "/proc/phoenixfs-store");
    fs::write(root.join("plain-file"), b"x").unwrap();
    let out = run(phoenixfs().arg("build").arg(&src).arg("--store").arg(root.join("plain-file/store")).arg("-o").arg(root.join("i")));
    assert_one_line_error(&out, "plain-file");
    assert!(!root.join("i").exists());
}

/// A tmpfs too small for the chunks: the build fails with ENOSPC and publishes nothing.
#[test]
fn full_store_fails_cleanly() {
    let root = fixture_dir("full-store");
    let src = small_tree(&root);
    let store = root.join("tiny-fs");
    fs::create_dir(&store).unwrap();
    assert!(Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "phoenixfs-test"]).arg(&store).status().unwrap().success());
    let out = run(phoenixfs().arg("build").arg(&src).arg("--store").arg(&store).arg("-o").arg(root.join("image")));
    let images = fs::read_dir(store.join("images")).map(|d| d.count()).unwrap_or(0);
    let _ = Command::new("umount").arg(&store).status();
    assert_one_line_error(&out, "No space left on device");
    assert!(!root.join("image").exists(), "no image file after a failed build");
    assert_eq!(images, 0, "no image in the store after a failed build");
}

#[test]
fn output_in_a_missing_directory_is_named() {
    let root = fixture_dir("bad-output");
    let src = small_tree(&root);
    let out = run(phoenixfs().arg("build").arg(&src).arg("--store").arg(root.join("s")).arg("-o").arg(root.join("nowhere/image")));
    assert_one_line_error(&out, "nowhere/image");
}

#[test]
fn corrupt_images_are_rejected_by_inspect_and_check() {
    let root = fixture_dir("bad-image");
    let src = small_tree(&root);
    let store = root.join("store");
    let (image, id) = build_image(&src, &store, &root, &[]);
    let bytes = fs::read(&image).unwrap();
    let variants: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() - 10].to_vec()),
        ("bootstrap only", bytes[..4096].to_vec()),
        ("garbage", noise(9, 10_000)),
        ("empty", Vec::new()),
        ("bit flipped", {
            let mut b = bytes.clone();
            b[1100] ^= 4;
            b
        }),
    ];
    for (name, content) in variants {
        let path = root.join(format!("{name}.phx"));
        fs::write(&path, content).unwrap();
        let out = run(phoenixfs().arg("inspect").arg(&path));
        assert_one_line_error(&out, &path.display().to_string());
        let out = run(phoenixfs().arg("check").arg(&path).arg("--store").arg(&store));
        assert_one_line_error(&out, &path.display().to_string());
    }
    let out = run(phoenixfs().arg("inspect").arg("no-such-image"));
    assert_one_line_error(&out, "no-such-image");
    let unknown = ImageId(Digest::of(b"not an image")).to_string();
    let out = run(phoenixfs().arg("inspect").arg(&unknown).arg("--store").arg(&store));
    assert_one_line_error(&out, &unknown);
    // An image in the store whose bytes no longer match its id.
    let stored = store.join("images").join(&id);
    let mut tampered = fs::read(&stored).unwrap();
    tampered[2000] ^= 1;
    fs::write(&stored, tampered).unwrap();
    let out = run(phoenixfs().arg("inspect").arg(&id).arg("--store").arg(&store));
    assert_one_line_error(&out, &id);
}

#[test]
fn check_names_missing_and_corrupt_chunks() {
    let root = fixture_dir("bad-chunks");
    let src = small_tree(&root);
    let store = root.join("store");
    let (image, _) = build_image(&src, &store, &root, &[]);
    let chunk_files = chunk_files(&store);
    assert_eq!(chunk_files.len(), 3);
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    fs::remove_file(&chunk_files[0]).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&chunk_files[1]).unwrap();
    f.write_all_at(b"X", 1000).unwrap();
    let out = run(phoenixfs().arg("check").arg(&image).arg("--store").arg(&store));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("missing chunk {}", name(&chunk_files[0]))), "{stderr}");
    assert!(stderr.contains(&format!("corrupt chunk {}", name(&chunk_files[1]))), "{stderr}");
    assert!(!stderr.contains(&name(&chunk_files[2])), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 of 3 chunks"));
    // Building again stores the missing chunk again.
    run_ok(phoenixfs().arg("build").arg(&src).arg("--store").arg(&store).arg("-o").arg(root.join("again.phx")));
    let out = run(phoenixfs().arg("check").arg(&image).arg("--store").arg(&store));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("missing chunk"), "{stderr}");
}

/// A store that does something to the source tree when the first chunk is stored, to change
/// the tree while the build reads it.
struct MeddlingStore {
    inner: LocalStore,
    meddle: Box<dyn Fn() + Send + Sync>,
    done: AtomicBool,
}

impl ChunkStore for MeddlingStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn get_chunk(&self, chunk: &ChunkEntry) -> Result<Vec<u8>, StoreError> {
        self.inner.get_chunk(chunk)
    }
    fn chunk_len(&self, chunk: &ChunkEntry) -> Result<Option<u64>, StoreError> {
        self.inner.chunk_len(chunk)
    }
    fn put_chunk(&self, chunk: &ChunkEntry, stored: &[u8]) -> Result<(), StoreError> {
        if !self.done.swap(true, Ordering::SeqCst) {
            (self.meddle)();
        }
        self.inner.put_chunk(chunk, stored)
    }
    fn get_image(&self, id: &ImageId) -> Result<Vec<u8>, StoreError> {
        self.inner.get_image(id)
    }
    fn put_image(&self, id: &ImageId, image_file: &[u8]) -> Result<(), StoreError> {
        self.inner.put_image(id, image_file)
    }
}

fn build_while(root: &Path, meddle: impl Fn() + Send + Sync + 'static) -> Result<(), BuildError> {
    let store = MeddlingStore {
        inner: LocalStore::create(&root.join("store")).unwrap(),
        meddle: Box::new(meddle),
        done: AtomicBool::new(false),
    };
    let result = build(&root.join("src"), &store, &BuildOptions { chunk_bits: 12, ..Default::default() });
    assert_eq!(fs::read_dir(root.join("store/images")).unwrap().count(), 0, "nothing published");
    result.map(|_| ())
}

#[test]
fn a_file_changing_during_the_build_fails_it() {
    let root = fixture_dir("changing-source");
    let src = small_tree(&root);
    let target = src.join("data");
    let err = build_while(&root, move || fs::OpenOptions::new().append(true).open(&target).unwrap().write_all_at(b"more", 0).unwrap()).unwrap_err();
    assert!(matches!(err, BuildError::Changed { .. }), "{err}");
    assert!(err.to_string().contains("data") && err.to_string().contains("changed during the build"), "{err}");
}

#[test]
fn a_file_vanishing_during_the_build_fails_it() {
    let root = fixture_dir("vanishing-source");
    let src = small_tree(&root);
    let target = src.join("data");
    let err = build_while(&root, move || fs::remove_file(&target).unwrap()).unwrap_err();
    assert!(matches!(err, BuildError::Vanished { .. } | BuildError::Changed { .. }), "{err}");
    assert!(err.to_string().contains("data"), "{err}");
}
