//! `convert` of OCI images made with Debian's umoci: three layers (a tree; changes with
//! deletions, a replaced file and a directory turned into a file; a hand-made layer with an
//! opaque directory and a whiteout), converted from the layout and, after `skopeo copy` into
//! a docker-registry, from the registry. The mount must equal what `umoci unpack` makes of
//! the image, both sources must give the same image, the config must be recorded, a layer
//! shared with another image must cost no new chunks, and a damaged layer publishes nothing.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use phoenixfs_tests::mount::PhoenixMount;
use phoenixfs_tests::servers::Registry;
use phoenixfs_tests::snapshot::{assert_same, snapshot_dir};
use phoenixfs_tests::trees::noise;
use phoenixfs_tests::{assert_one_line_error, chunk_files, fixture_dir, phoenixfs, run, run_ok};

const MIB: usize = 1 << 20;

fn umoci(args: &[&str], at: &Path) {
    run_ok(Command::new("umoci").args(args).current_dir(at));
}

/// The first layer's tree: files inline and chunked, a hard link, a symlink, odd modes and
/// owners, nested directories.
fn base_tree(rootfs: &Path) {
    for dir in ["etc/app", "usr/lib/app", "data/keep", "data/gone/deep", "var/cache/app", "swap/dir"] {
        fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    fs::write(rootfs.join("etc/app/conf"), "colour = blue\n").unwrap();
    fs::write(rootfs.join("usr/lib/app/lib.so"), noise(1, 3 * MIB + 5)).unwrap();
    fs::write(rootfs.join("data/keep/a"), noise(2, 70_000)).unwrap();
    fs::write(rootfs.join("data/gone/deep/b"), noise(3, 2 * MIB)).unwrap();
    fs::write(rootfs.join("var/cache/app/old"), "stale").unwrap();
    fs::write(rootfs.join("swap/dir/inside"), "x").unwrap();
    fs::hard_link(rootfs.join("data/keep/a"), rootfs.join("data/keep/a-link")).unwrap();
    symlink("../usr/lib/app/lib.so", rootfs.join("etc/lib-link")).unwrap();
    fs::set_permissions(rootfs.join("etc/app/conf"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(rootfs.join("data/keep"), fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::chown(rootfs.join("data/keep/a"), Some(1234), Some(5678)).unwrap();
}

/// The second layer: umoci writes whiteouts for what is gone.
fn change_tree(rootfs: &Path) {
    fs::remove_dir_all(rootfs.join("data/gone")).unwrap();
    fs::remove_file(rootfs.join("var/cache/app/old")).unwrap();
    fs::write(rootfs.join("etc/app/conf"), "colour = green\n").unwrap();
    fs::remove_dir_all(rootfs.join("swap/dir")).unwrap();
    fs::write(rootfs.join("swap/dir"), "now a file").unwrap();
    fs::write(rootfs.join("data/new"), noise(4, MIB + 1)).unwrap();
}

/// The third layer, written by hand as image builders write it: `var/cache` opaque (its
/// lower contents hidden, one new file kept), `etc/.wh.lib-link`, and 1.5 MiB of new data
/// (two chunks).
fn opaque_layer(path: &Path) {
    let script = r#"
import io, sys, tarfile
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tar:
    def add(name, data=None, kind=tarfile.REGTYPE, mode=0o644):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, 1700000000
        if data is not None:
            info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data is not None else None)
    add(".", kind=tarfile.DIRTYPE, mode=0o755)
    add("var/cache", kind=tarfile.DIRTYPE, mode=0o755)
    add("var/cache/.wh..wh..opq", b"")
    add("var/cache/fresh", b"fresh after the opaque marker\n")
    add("etc/.wh.lib-link", b"")
    add("opt", kind=tarfile.DIRTYPE, mode=0o755)
    add("opt/blob", bytes(range(256)) * 6144)
"#;
    run_ok(Command::new("python3").arg("-c").arg(script).arg(path));
}

/// Makes the image `layout:v1` (three layers, an entrypoint and env) and `layout:base` (its
/// first two layers); returns umoci's unpacking of v1, the oracle.
fn make_images(root: &Path) -> std::path::PathBuf {
    let layout = root.join("layout");
    umoci(&["init", "--layout", "layout"], root);
    umoci(&["new", "--image", "layout:v1"], root);
    umoci(&["unpack", "--image", "layout:v1", "bundle"], root);
    base_tree(&root.join("bundle/rootfs"));
    umoci(&["repack", "--image", "layout:v1", "bundle"], root);
    // A bundle repacks against the image it was unpacked from: a second layer needs a new one.
    umoci(&["unpack", "--image", "layout:v1", "bundle2"], root);
    change_tree(&root.join("bundle2/rootfs"));
    umoci(&["repack", "--image", "layout:v1", "bundle2"], root);
    umoci(&["tag", "--image", "layout:v1", "base"], root);
    opaque_layer(&root.join("layer3.tar"));
    umoci(&["raw", "add-layer", "--image", "layout:v1", "layer3.tar"], root);
    umoci(&["config", "--image", "layout:v1", "--config.entrypoint=/usr/bin/app", "--config.env=MODE=test", "--config.workingdir=/data"], root);
    umoci(&["unpack", "--image", "layout:v1", "unpacked"], root);
    assert!(layout.join("index.json").exists());
    root.join("unpacked/rootfs")
}

fn convert(source: &str, store: &Path, image: &Path) -> std::process::Output {
    run(phoenixfs().arg("convert").arg(source).arg("--store").arg(store).arg("-o").arg(image))
}

fn id_of(out: &std::process::Output) -> String {
    assert!(out.status.success(), "convert failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap().trim().to_string()
}

#[test]
fn oci_images_from_a_layout_and_a_registry_mount_as_umoci_unpacks_them() {
    let root = fixture_dir("oci-convert");
    let expected = make_images(&root);
    let oracle = snapshot_dir(&expected);
    assert!(oracle.contains_key("var/cache/fresh") && !oracle.contains_key("var/cache/app"), "umoci applied the opaque layer");
    assert!(!oracle.contains_key("data/gone") && !oracle.contains_key("etc/lib-link"), "umoci applied the whiteouts");
    let layout = root.join("layout");
    let store = root.join("store");

    // The base image first: the full image then adds only its third layer's chunks.
    id_of(&convert(&format!("{}:base", layout.display()), &store, &root.join("base.phx")));
    let chunks_before = chunk_files(&store).len();
    let from_layout = id_of(&convert(&format!("{}:v1", layout.display()), &store, &root.join("v1.phx")));
    assert_eq!(chunk_files(&store).len(), chunks_before + 2, "the shared layers' chunks are stored once: only the third layer's two are new");

    let mount = PhoenixMount::new(root.join("v1.phx"), &store, &root.join("cache"), &[]);
    assert_same(&oracle, &snapshot_dir(mount.path()), "the converted image against umoci unpack");
    drop(mount);

    let inspect: serde_json::Value = serde_json::from_str(&run_ok(phoenixfs().arg("inspect").arg(root.join("v1.phx")).arg("--json"))).unwrap();
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let v1 = index["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "v1").unwrap();
    assert_eq!(inspect["oci"]["manifest_digest"], v1["digest"], "{inspect}");
    assert_eq!(inspect["oci"]["config"]["config"]["Entrypoint"], serde_json::json!(["/usr/bin/app"]));
    assert_eq!(inspect["oci"]["config"]["config"]["WorkingDir"], "/data");
    assert!(inspect["oci"]["config"]["config"]["Env"].as_array().unwrap().contains(&serde_json::json!("MODE=test")), "{inspect}");
    let text = run_ok(phoenixfs().arg("inspect").arg(root.join("v1.phx")));
    assert!(text.contains("entrypoint   [\"/usr/bin/app\"]") && text.contains("env          MODE=test"), "{text}");

    let registry = Registry::start();
    let target = registry.store_url("test/app").replace("oci://", "docker://") + ":v1";
    run_ok(Command::new("skopeo").args(["copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]).arg(format!("oci:{}:v1", layout.display())).arg(&target));
    let registry_store = root.join("store-from-registry");
    let from_registry = id_of(&convert(&(registry.store_url("test/app") + ":v1"), &registry_store, &root.join("registry.phx")));
    assert_eq!(from_registry, from_layout, "the same image from a registry and from a layout");
    let by_digest = id_of(&convert(&format!("{}@{}", registry.store_url("test/app"), v1["digest"].as_str().unwrap()), &registry_store, &root.join("digest.phx")));
    assert_eq!(by_digest, from_layout);
    let mount = PhoenixMount::new(root.join("registry.phx"), &registry_store, &root.join("cache2"), &[]);
    assert_same(&oracle, &snapshot_dir(mount.path()), "the image converted from the registry against umoci unpack");
    drop(mount);

    let missing = convert(&(registry.store_url("test/app") + ":nope"), &registry_store, &root.join("nope.phx"));
    assert_one_line_error(&missing, "manifest");
    assert!(!root.join("nope.phx").exists());
}

#[test]
fn a_damaged_layer_or_layout_is_one_line_and_publishes_nothing() {
    let root = fixture_dir("oci-damaged");
    make_images(&root);
    let layout = root.join("layout");
    let store = root.join("store");
    // Flip a byte in the middle of v1's first layer.
    let blob = |digest: &serde_json::Value| layout.join("blobs/sha256").join(digest.as_str().unwrap().strip_prefix("sha256:").unwrap());
    let json = |path: std::path::PathBuf| serde_json::from_slice::<serde_json::Value>(&fs::read(path).unwrap()).unwrap();
    let index = json(layout.join("index.json"));
    let v1 = index["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "v1").unwrap();
    let first_layer = blob(&json(blob(&v1["digest"]))["layers"][0]["digest"]);
    let mut bytes = fs::read(&first_layer).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&first_layer, &bytes).unwrap();
    let out = convert(&format!("{}:v1", layout.display()), &store, &root.join("bad.phx"));
    assert_one_line_error(&out, "layer 1 of 3");
    assert!(!root.join("bad.phx").exists());
    let images = store.join("images");
    assert!(!images.exists() || fs::read_dir(&images).unwrap().next().is_none(), "no image in the store");

    let out = convert(&format!("{}:nosuchtag", layout.display()), &store, &root.join("bad.phx"));
    assert_one_line_error(&out, "no image tagged \"nosuchtag\"");
    let out = convert(root.join("nowhere").to_str().unwrap(), &store, &root.join("bad.phx"));
    assert_one_line_error(&out, "neither an OCI layout directory");
}
