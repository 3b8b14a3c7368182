//! `build` of a tar stream: archives written by GNU tar and by Python's tarfile, packed
//! without unpacking them, must give the very image (the same id) that building the tree
//! GNU tar unpacks them to gives, and mount equal to that tree. Damaged and truncated
//! streams are refused in one line and publish nothing.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use phoenixfs_tests::mount::PhoenixMount;
use phoenixfs_tests::snapshot::{assert_same, snapshot_dir};
use phoenixfs_tests::trees::{self, noise};
use phoenixfs_tests::{assert_one_line_error, build_image, fixture_dir, phoenixfs, run, run_ok};

/// The binary form of a POSIX ACL: (tag, permissions, id) entries after the version.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// The all-cases tree plus ACLs (an access ACL naming a user and a group, a default ACL on
/// a directory).
fn source_tree(root: &Path) -> PathBuf {
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    trees::all_cases(&src);
    let undefined = u32::MAX;
    let access = acl(&[(0x01, 6, undefined), (0x02, 4, 1000), (0x04, 4, undefined), (0x08, 6, 0), (0x10, 6, undefined), (0x20, 0, undefined)]);
    xattr::set(src.join("files/tiny"), "system.posix_acl_access", &access).unwrap();
    let default = acl(&[(0x01, 7, undefined), (0x04, 5, undefined), (0x08, 7, 1000), (0x10, 7, undefined), (0x20, 5, undefined)]);
    xattr::set(src.join("deep"), "system.posix_acl_default", &default).unwrap();
    src
}

/// Runs `phoenixfs build` with `tar` as its source, piping `stdin` in when given; the output.
fn build_tar(source: &str, stdin: Option<&Path>, store: &Path, image: &Path) -> std::process::Output {
    let mut command = phoenixfs();
    command.arg("build").arg(source).arg("--store").arg(store).arg("-o").arg(image);
    if let Some(input) = stdin {
        command.stdin(File::open(input).unwrap());
    }
    run(&mut command)
}

fn id_of(out: &std::process::Output) -> String {
    assert!(out.status.success(), "build failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap().trim().to_string()
}

/// Unpacks `archive` with GNU tar into `dir` (owners, modes, xattrs, ACLs as recorded).
fn gnu_unpack(archive: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    run_ok(Command::new("tar").args(["--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "-xpf"]).arg(archive).arg("-C").arg(dir));
}

#[test]
fn gnu_tar_streams_build_the_image_of_the_tree_they_unpack_to() {
    let root = fixture_dir("tar-gnu");
    let src = source_tree(&root);
    let archive = root.join("tree.tar");
    run_ok(Command::new("tar").args(["--xattrs", "--xattrs-include=*", "--acls", "--sparse", "--format=posix", "--numeric-owner", "-C"]).arg(&src).arg("-cf").arg(&archive).arg("."));
    run_ok(Command::new("gzip").arg("-k").arg(&archive));
    run_ok(Command::new("zstd").arg("-q").arg(&archive).arg("-o").arg(root.join("tree.tar.zst")));
    let store = root.join("store");

    let unpacked = root.join("unpacked");
    gnu_unpack(&archive, &unpacked);
    let (_, expected_id) = build_image(&unpacked, &store, &root, &[]);
    let from_stdin = id_of(&build_tar("-", Some(&archive), &store, &root.join("stdin.phx")));
    let gz = id_of(&build_tar(root.join("tree.tar.gz").to_str().unwrap(), None, &store, &root.join("gz.phx")));
    let zst = id_of(&build_tar("-", Some(&root.join("tree.tar.zst")), &store, &root.join("zst.phx")));
    assert_eq!((&from_stdin, &gz, &zst), (&expected_id, &expected_id, &expected_id), "a tar must give the image of the tree it unpacks to");

    let mount = PhoenixMount::new(root.join("stdin.phx"), &store, &root.join("cache"), &[]);
    assert_same(&snapshot_dir(&unpacked), &snapshot_dir(mount.path()), "mount of the tar stream against GNU tar's unpacking");
    // GNU tar does not archive sockets; everything else is the source.
    let mut source = snapshot_dir(&src);
    assert!(source.remove("special/socket").is_some());
    assert_same(&source, &snapshot_dir(mount.path()), "mount of the tar stream against the source (without its socket)");
}

/// libarchive's bsdtar writes each xattr twice (`LIBARCHIVE.xattr.*` in base64 and
/// `SCHILY.xattr.*`), times before 1970 in base-256 over the field's end, the owning group's
/// bits in the mode of a file with an ACL mask, and devices in `SCHILY.dev*` records: its
/// archive of the every-case tree mounts equal to the source, but for one time.
#[test]
fn bsdtar_streams_mount_equal_to_their_source() {
    let root = fixture_dir("tar-bsdtar");
    let src = source_tree(&root);
    let archive = root.join("tree.tar");
    let out = run(Command::new("bsdtar").args(["--format=pax", "--xattrs", "--acls", "--numeric-owner", "-C"]).arg(&src).arg("-cf").arg(&archive).arg("."));
    // Its one complaint: the socket, which no tar format holds.
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot archive sockets"), "{}", String::from_utf8_lossy(&out.stderr));
    let store = root.join("store");
    id_of(&build_tar(archive.to_str().unwrap(), None, &store, &root.join("bsdtar.phx")));
    let mount = PhoenixMount::new(root.join("bsdtar.phx"), &store, &root.join("cache"), &[]);
    let mut source = snapshot_dir(&src);
    assert!(source.remove("special/socket").is_some());
    // libarchive writes -0.999999995 s (-1 s and 5 ns) as PAX mtime "-1.000000005", which
    // POSIX and GNU tar read as -1.000000005 s; so do we.
    let tiny = source.get_mut("files/tiny").unwrap();
    assert_eq!(tiny.mtime, (-1, 5));
    tiny.mtime = (-2, 999_999_995);
    assert_same(&source, &snapshot_dir(mount.path()), "mount of a bsdtar stream against the source (without its socket)");
}

#[test]
fn python_tarfile_streams_with_long_names_build_the_image_of_the_tree_they_unpack_to() {
    let root = fixture_dir("tar-python");
    let src = root.join("src");
    let deep = (0..12).fold(src.clone(), |p, i| p.join(format!("a-rather-long-directory-name-{i:02}")));
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("x".repeat(200)), noise(1, 3 << 20)).unwrap();
    fs::write(src.join("ünïcödé name"), b"text\n").unwrap();
    fs::hard_link(deep.join("x".repeat(200)), src.join("hard")).unwrap();
    std::os::unix::fs::symlink("t".repeat(300), src.join("long-target")).unwrap();
    fs::write(src.join("small"), b"small").unwrap();
    for path in [src.join("small"), src.join("hard"), src.join("ünïcödé name")] {
        File::options().write(true).open(&path).unwrap().set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)).unwrap();
    }
    let store = root.join("store");
    for format in ["PAX_FORMAT", "GNU_FORMAT"] {
        let archive = root.join(format!("{format}.tar"));
        let script = format!("import tarfile, sys\nwith tarfile.open(sys.argv[2], 'w', format=tarfile.{format}) as t:\n    t.add(sys.argv[1], arcname='.')\n");
        run_ok(Command::new("python3").arg("-c").arg(&script).arg(&src).arg(&archive));
        let unpacked = root.join(format!("unpacked-{format}"));
        gnu_unpack(&archive, &unpacked);
        let (_, expected_id) = build_image(&unpacked, &store, &root, &[]);
        let id = id_of(&build_tar(archive.to_str().unwrap(), None, &store, &root.join(format!("{format}.phx"))));
        assert_eq!(id, expected_id, "{format}: a tar must give the image of the tree it unpacks to");
        let mount = PhoenixMount::new(root.join(format!("{format}.phx")), &store, &root.join(format!("cache-{format}")), &[]);
        assert_same(&snapshot_dir(&unpacked), &snapshot_dir(mount.path()), format);
    }
}

#[test]
fn damaged_or_truncated_streams_are_refused_in_one_line_and_publish_nothing() {
    let root = fixture_dir("tar-damaged");
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big"), noise(2, 5 << 20)).unwrap();
    fs::write(src.join("small"), b"small").unwrap();
    let archive = root.join("good.tar");
    run_ok(Command::new("tar").args(["--format=posix", "-C"]).arg(&src).arg("-cf").arg(&archive).arg("."));
    let good = fs::read(&archive).unwrap();
    let store = root.join("store");

    // The last entry's data ends at the block boundary after the last non-zero byte; the
    // end-of-archive blocks and the record's padding follow.
    let last_data_end = (good.iter().rposition(|&b| b != 0).unwrap() + 1).next_multiple_of(512);
    let small_header = (0..good.len()).step_by(512).find(|&at| good[at..].starts_with(b"./small\0")).expect("the header of ./small");
    let mut flipped = good.clone();
    flipped[small_header + 2] ^= 0x20;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("cut inside a file", good[..good.len() / 2].to_vec(), "truncated"),
        ("cut before the end blocks", good[..last_data_end].to_vec(), "truncated"),
        ("a damaged header", flipped, "checksum"),
        ("not a tar", b"just some text\n".repeat(100), "not a tar stream"),
    ];
    for (what, bytes, needle) in cases {
        let input = root.join("input");
        fs::write(&input, &bytes).unwrap();
        let image = root.join("image.phx");
        let out = build_tar("-", Some(&input), &store, &image);
        assert_one_line_error(&out, needle);
        assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was published"), "{what}");
        assert!(!image.exists(), "{what}: no image file");
        assert!(fs::read_dir(store.join("images")).map_or(true, |mut d| d.next().is_none()), "{what}: no image in the store");
    }
    // The same bytes, whole, build.
    let mut child = phoenixfs().arg("build").arg("-").arg("--store").arg(&store).arg("-o").arg(root.join("ok.phx")).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(&good).unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
}
