//! Chunks shared between files and between images are stored once.

use std::fs;
use std::path::Path;

use phoenixfs_tests::trees::noise;
use phoenixfs_tests::{chunk_files, fixture_dir, phoenixfs, run_ok};


#[test]
fn two_trees_sharing_files_store_shared_chunks_once() {
    let root = fixture_dir("dedup");
    let (a, b, store) = (root.join("a"), root.join("b"), root.join("store"));
    for dir in [&a, &b] {
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("shared-3-chunks"), noise(1, 3 << 20)).unwrap();
        fs::write(dir.join("sub/shared-2-chunks"), noise(2, (1 << 20) + 5)).unwrap();
    }
    fs::write(a.join("copy-of-shared"), noise(1, 3 << 20)).unwrap();
    fs::write(a.join("a-only-2-chunks"), noise(3, 2 << 20)).unwrap();
    fs::write(b.join("b-only-1-chunk"), noise(4, 10_000)).unwrap();
    fs::write(b.join("b-inline"), b"inline data is not a chunk").unwrap();

    let build = |src: &Path, name: &str| {
        let out = phoenixfs().arg("build").arg(src).arg("--store").arg(&store).arg("-o").arg(root.join(name)).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let report_a = build(&a, "a.phx");
    assert_eq!(chunk_files(&store).len(), 3 + 2 + 2, "a: {report_a}");
    assert!(report_a.contains("7 chunks (7 new"), "{report_a}");
    let report_b = build(&b, "b.phx");
    assert_eq!(chunk_files(&store).len(), 3 + 2 + 2 + 1, "b: {report_b}");
    assert!(report_b.contains("6 chunks (1 new"), "{report_b}");

    let json: serde_json::Value = serde_json::from_str(&run_ok(phoenixfs().arg("inspect").arg(root.join("a.phx")).arg("--json"))).unwrap();
    assert_eq!(json["chunks"], 7);
    assert_eq!(json["chunk_references"], 10);
    assert!((json["dedup_ratio"].as_f64().unwrap() - (9.0 * 1048576.0 + 5.0) / (6.0 * 1048576.0 + 5.0)).abs() < 1e-9, "{json}");
}
