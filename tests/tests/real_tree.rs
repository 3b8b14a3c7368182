//! A real tree of at least 10,000 entries copied from /usr: built, checked by fsck.erofs,
//! mounted by the kernel, read by our reader; all equal to the source.

use std::fs;

use phoenixfs_format::ImageFile;
use phoenixfs_store::LocalStore;
use phoenixfs_tests::kernel::KernelMount;
use phoenixfs_tests::mount::PhoenixMount;
use phoenixfs_tests::snapshot::{assert_same, snapshot_dir, snapshot_image};
use phoenixfs_tests::{build_image, export_blob, fixture_dir, fsck_erofs, trees};

#[test]
fn a_copy_of_usr_survives_the_round_trip() {
    let root = fixture_dir("real-tree");
    let src = root.join("src");
    let entries = trees::real_tree(&src, 10_000);
    assert!(entries >= 10_000);
    let store = root.join("store");
    let (image, _) = build_image(&src, &store, &root, &[]);
    let blob = export_blob(&image, &store, &root.join("blob"));

    let out = fsck_erofs(&image, blob.as_deref());
    assert!(out.status.success(), "fsck.erofs: {}", String::from_utf8_lossy(&out.stderr));

    let source = snapshot_dir(&src);
    assert!(source.len() >= 10_000, "{} entries", source.len());
    let mount = KernelMount::new(&image, blob.as_deref());
    let kernel = snapshot_dir(mount.path());
    assert_same(&source, &kernel, "kernel EROFS mount vs source");
    let decoded = ImageFile::decode(fs::read(&image).unwrap()).unwrap();
    assert_same(&kernel, &snapshot_image(&decoded, &LocalStore::open(&store).unwrap()), "our reader vs kernel");
    let ours = PhoenixMount::new(&image, &store, &root.join("cache"), &[]);
    assert_same(&source, &snapshot_dir(ours.path()), "phoenixfs mount vs source");
}
