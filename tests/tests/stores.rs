//! Remote stores on real servers (SeaweedFS's S3 gateway, nginx), started on 127.0.0.1 by the
//! test: build → push → mount by image id equals the source; servers SIGKILLed and started
//! again under chaos readers; a 30 s outage in the middle of a read; worker kills while
//! fetches from S3 are in flight. Pass: zero application errors, zero wrong bytes.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use phoenixfs_tests::chaos::{self, Dataset, Plan, Report, Victim};
use phoenixfs_tests::faultproxy::{FaultProxy, ALL_FAULTS};
use phoenixfs_tests::mount::PhoenixMount;
use phoenixfs_tests::servers::{Nginx, Registry, SeaweedFs};
use phoenixfs_tests::snapshot::{assert_same, snapshot_dir};
use phoenixfs_tests::{assert_one_line_error, build_image, fixture_dir, phoenixfs, run, run_ok, trees};
use sha2::{Digest, Sha256};

/// Servers, readers and the machine's two cores: one scenario at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Straight to stderr, past the test harness's capture: CI logs show the figures.
fn print(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn push(image: &str, from: &Path, to: &str) {
    run_ok(phoenixfs().arg("push").arg(image).arg("--store").arg(from).arg("--to").arg(to));
}

#[test]
fn an_image_pushed_to_s3_or_a_registry_or_served_by_nginx_mounts_by_id_and_equals_its_source() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let root = fixture_dir("stores-equal");
    let src = root.join("src");
    trees::all_cases(&src);
    let source = snapshot_dir(&src);
    let store = root.join("store");
    let (_, id) = build_image(&src, &store, &root, &[]);

    let seaweed = SeaweedFs::start();
    seaweed.create_bucket("images");
    let s3 = seaweed.store_url("images", "all-cases");
    push(&id, &store, &s3);
    let pushed_again = run(phoenixfs().arg("push").arg(&id).arg("--store").arg(&store).arg("--to").arg(&s3));
    assert!(String::from_utf8_lossy(&pushed_again.stderr).contains(": 0 of "), "a second push sends nothing: {pushed_again:?}");
    let mount = PhoenixMount::new(&id, &s3, &root.join("cache-s3"), &[]);
    assert_same(&source, &snapshot_dir(mount.path()), "mount from S3 vs source");
    drop(mount);

    let registry = Registry::start();
    let oci = registry.store_url("phoenixfs/all-cases");
    push(&id, &store, &oci);
    let mount = PhoenixMount::new(&id, &oci, &root.join("cache-oci"), &[]);
    assert_same(&source, &snapshot_dir(mount.path()), "mount from an OCI registry vs source");
    drop(mount);

    // A local store copied as it is, served by a plain web server.
    let served = root.join("served");
    push(&id, &store, served.to_str().unwrap());
    let nginx = Nginx::serve(&served);
    let mount = PhoenixMount::new(&id, nginx.url(), &root.join("cache-http"), &[]);
    assert_same(&source, &snapshot_dir(mount.path()), "mount from nginx vs source");
    drop(mount);

    // Built straight into S3.
    let small = root.join("small");
    fs::create_dir_all(small.join("d")).unwrap();
    fs::write(small.join("d/file"), trees::noise(9, 3 << 20)).unwrap();
    let direct = seaweed.store_url("images", "direct");
    let (_, direct_id) = build_image(&small, Path::new(&direct), &root, &[]);
    let mount = PhoenixMount::new(&direct_id, &direct, &root.join("cache-direct"), &[]);
    assert_same(&snapshot_dir(&small), &snapshot_dir(mount.path()), "image built into S3 vs source");
}

#[test]
fn store_mistakes_are_one_line_each() {
    let root = fixture_dir("stores-mistakes");
    let out = run(phoenixfs().arg("build").arg(&root).arg("--store").arg("gs://bucket/x").arg("-o").arg(root.join("i")));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scheme gs://"), "{out:?}");
    assert!(!Path::new("gs:").exists(), "no local directory named after the scheme");
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), trees::noise(1, 100_000)).unwrap();
    let (image, _) = build_image(&src, &root.join("store"), &root, &[]);
    let nobody = format!("http://127.0.0.1:{}", phoenixfs_tests::servers::free_port());
    let mnt = root.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = run(phoenixfs().arg("mount").arg(&image).arg(&mnt).arg("--store").arg(&nobody).arg("--cache").arg(root.join("cache")));
    assert_one_line_error(&out, &format!("store {nobody} does not answer"));
    let empty = root.join("empty-store");
    fs::create_dir_all(empty.join("chunks")).unwrap();
    let out = run(phoenixfs().arg("mount").arg(&image).arg(&mnt).arg("--store").arg(&empty).arg("--cache").arg(root.join("cache")));
    assert_one_line_error(&out, "does not have chunk");
}

/// sha256 of what `path` holds.
fn sha256_of(path: &Path) -> String {
    let mut file = File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).unwrap() {
            0 => return hex::encode(hasher.finalize()),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// Reads the first quarter of `file` in the mount, then `outage_begins`; reads the rest while
/// the store is down for `outage`, then `outage_ends`. The reader must finish with the right
/// bytes, and must have been stalled by the outage.
fn read_through_an_outage(mount: &PhoenixMount, file: &str, expected: &str, outage: Duration, outage_begins: impl FnOnce(), outage_ends: impl FnOnce()) {
    let path = mount.path().join(file);
    let len = fs::metadata(&path).unwrap().len() as usize;
    let mut reader = File::open(&path).unwrap();
    let mut head = vec![0u8; len / 4];
    reader.read_exact(&mut head).unwrap();
    outage_begins();
    let began = Instant::now();
    let finished = std::thread::scope(|scope| {
        let rest = scope.spawn(move || {
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).map(|_| (rest, Instant::now()))
        });
        std::thread::sleep(outage / 2);
        let status = mount.status();
        assert!(status["fetches_retrying"].as_u64().unwrap() > 0, "fetches wait for the store: {status}");
        std::thread::sleep(outage - outage / 2);
        assert!(!rest.is_finished(), "the reader cannot have finished while the store was down");
        outage_ends();
        rest.join().unwrap()
    });
    let (rest, done) = finished.unwrap_or_else(|e| panic!("the reader got an error: {e}"));
    let mut hasher = Sha256::new();
    hasher.update(&head);
    hasher.update(&rest);
    assert_eq!(hex::encode(hasher.finalize()), expected, "the reader's bytes");
    let status = mount.status();
    print(&format!(
        "outage of {outage:?}: the reader finished {:.1} s after it began; {} fetch retries, store errors {}",
        (done - began).as_secs_f64(),
        status["fetch_retries"],
        status["store_errors"]
    ));
    assert_eq!(status["errors"], 0);
}

#[test]
fn a_30_second_outage_of_the_local_store_or_of_s3_is_a_stall() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let root = fixture_dir("stores-outage");
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big"), trees::noise(77, 192 << 20)).unwrap();
    let expected = sha256_of(&src.join("big"));
    let store = root.join("store");
    let (image, id) = build_image(&src, &store, &root, &[]);
    let outage = Duration::from_secs(30);

    let away = root.join("store-away");
    let mount = PhoenixMount::new(&image, &store, &root.join("cache-local"), &["--readahead", "4M"]);
    read_through_an_outage(&mount, "big", &expected, outage, || fs::rename(&store, &away).unwrap(), || fs::rename(&away, &store).unwrap());
    drop(mount);

    let mut seaweed = SeaweedFs::start();
    seaweed.create_bucket("outage");
    let s3 = seaweed.store_url("outage", "x");
    push(&id, &store, &s3);
    let mount = PhoenixMount::new(&id, &s3, &root.join("cache-s3"), &["--readahead", "4M"]);
    let gateway = std::cell::RefCell::new(&mut seaweed.s3);
    read_through_an_outage(&mount, "big", &expected, outage, || gateway.borrow_mut().kill(), || gateway.borrow_mut().start());
}

/// Prints a run's figures and checks its pass marks: among them, when one worker served the
/// whole run (`fetched_before` its count at the start), that the store was read all along (the
/// cache is smaller than the dataset). A worker's counts start at zero: after kills they
/// prove nothing.
fn check_report(name: &str, report: &Report, dataset: &Dataset, mount: &PhoenixMount, fetched_before: Option<u64>) {
    let status = mount.status();
    let fetched = status["fetched_bytes"].as_u64().unwrap();
    print(&format!("stores {name}: {}; {fetched} bytes fetched by the serving worker, store errors {}", report.summary(), status["store_errors"]));
    if let Some(before) = fetched_before {
        assert!(fetched - before >= dataset.bytes, "the store served the readers: {} bytes fetched", fetched - before);
    }
    assert_eq!(report.errors, 0, "readers saw errors or wrong bytes");
    assert_eq!(report.daemon_errors, 0, "the daemon answered requests with errors");
    assert!(report.files_verified >= 4 * dataset.files as u64, "{} files verified", report.files_verified);
    assert!(report.reader_passes.iter().all(|&passes| passes >= 1), "passes per reader: {:?}", report.reader_passes);
}

/// The chaos readers' 200 MiB dataset and its image id.
fn chaos_dataset() -> (Dataset, String) {
    let dataset = chaos::vm_dataset();
    let id = run_ok(phoenixfs().arg("inspect").arg(&dataset.image).arg("--json"));
    let id = serde_json::from_str::<serde_json::Value>(&id).unwrap()["id"].as_str().unwrap().to_string();
    (dataset, id)
}

/// A SeaweedFS cluster whose `bucket` holds image `id` (pushed from `store`) under `vm/`, and
/// that store's URL.
fn seaweed_holding(bucket: &str, id: &str, store: &Path) -> (SeaweedFs, String) {
    let seaweed = SeaweedFs::start();
    seaweed.create_bucket(bucket);
    let url = seaweed.store_url(bucket, "vm");
    push(id, store, &url);
    (seaweed, url)
}

/// A small cache, so that chunks are evicted and fetched again all the time the servers die.
const SMALL_CACHE: [&str; 4] = ["--cache-size", "48M", "--memory-cache", "0"];

#[test]
fn storage_servers_killed_under_readers_cost_stalls_not_errors() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (dataset, id) = chaos_dataset();
    let reader = Path::new(env!("CARGO_BIN_EXE_phoenixfs-chaos"));
    let root = fixture_dir("stores-chaos");

    let (mut seaweed, s3) = seaweed_holding("chaos", &id, &dataset.store);
    let mount = PhoenixMount::new(&id, &s3, &root.join("cache-s3"), &SMALL_CACHE);
    let before = mount.status()["fetched_bytes"].as_u64().unwrap();
    let report = chaos::run_with_faults(&mount, &dataset, reader, 4, 20, (1000, 5000), || seaweed.s3.restart());
    check_report("s3 gateway", &report, &dataset, &mount, Some(before));
    let before = mount.status()["fetched_bytes"].as_u64().unwrap();
    let report = chaos::run_with_faults(&mount, &dataset, reader, 4, 20, (1000, 5000), || seaweed.volumes[0].restart());
    check_report("volume server", &report, &dataset, &mount, Some(before));
    drop(mount);

    let nginx = std::cell::RefCell::new(Nginx::serve(&dataset.store));
    let url = nginx.borrow().url();
    let mount = PhoenixMount::new(&id, &url, &root.join("cache-http"), &SMALL_CACHE);
    let report = chaos::run_with_faults(&mount, &dataset, reader, 4, 20, (1000, 5000), || nginx.borrow_mut().server.restart());
    check_report("nginx", &report, &dataset, &mount, Some(0));
    drop(mount);

    let mut registry = Registry::start();
    let oci = registry.store_url("phoenixfs/chaos");
    push(&id, &dataset.store, &oci);
    let mount = PhoenixMount::new(&id, &oci, &root.join("cache-oci"), &SMALL_CACHE);
    let report = chaos::run_with_faults(&mount, &dataset, reader, 4, 20, (1000, 5000), || registry.server.restart());
    check_report("registry", &report, &dataset, &mount, Some(0));
}

#[test]
fn worker_kills_while_fetching_from_s3_cost_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (dataset, id) = chaos_dataset();
    let reader = Path::new(env!("CARGO_BIN_EXE_phoenixfs-chaos"));
    let root = fixture_dir("stores-worker-kills");
    let (_seaweed, s3) = seaweed_holding("kills", &id, &dataset.store);
    let mount = PhoenixMount::new(&id, &s3, &root.join("cache"), &SMALL_CACHE);
    let plan = Plan { victim: Victim::Worker, events: 30, min_duration: Duration::ZERO, interval_ms: (10, 500), readers: 4 };
    let report = chaos::run_on(&mount, &dataset, reader, &plan);
    check_report("worker kills, S3", &report, &dataset, &mount, None);
    assert_eq!(report.worker_kills, 30);
}

/// Every chunk file in the cache holds the chunk that `image` keeps under its name (its data,
/// whose sha256 the image gives, then a crc32c).
fn assert_cache_holds_only_good_chunks(cache: &Path, image: &Path) -> usize {
    let image = phoenixfs_format::ImageFile::decode(fs::read(image).unwrap()).unwrap();
    let by_key: HashMap<String, phoenixfs_format::ChunkEntry> =
        image.table.entries().map(|e| e.unwrap()).map(|e| (e.cache_key().to_hex(), e)).collect();
    let files = phoenixfs_tests::chunk_files(cache);
    for file in &files {
        let bytes = fs::read(file).unwrap();
        let data = &bytes[..bytes.len() - 4];
        let name = file.file_name().unwrap().to_str().unwrap();
        let entry = by_key.get(name).unwrap_or_else(|| panic!("{} is no chunk of the image", file.display()));
        assert_eq!(hex::encode(Sha256::digest(data)), entry.digest.to_hex(), "{} holds other bytes", file.display());
    }
    files.len()
}

#[test]
fn answers_damaged_on_the_way_never_reach_readers_or_the_cache() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (dataset, id) = chaos_dataset();
    let reader = Path::new(env!("CARGO_BIN_EXE_phoenixfs-chaos"));
    let root = fixture_dir("stores-fault-proxy");
    let nginx = Nginx::serve(&dataset.store);
    let (seaweed, _) = seaweed_holding("proxied", &id, &dataset.store);
    let registry = Registry::start();
    push(&id, &dataset.store, &registry.store_url("phoenixfs/proxied"));
    for (name, upstream) in [("nginx", nginx.server.port), ("s3", seaweed.s3.port), ("registry", registry.server.port)] {
        let proxy = FaultProxy::start(upstream, &ALL_FAULTS, 15).unwrap();
        let url = match name {
            "nginx" => format!("http://127.0.0.1:{}", proxy.port),
            "registry" => format!("oci://127.0.0.1:{}/phoenixfs/proxied", proxy.port),
            _ => format!("s3://proxied/vm?endpoint=http://127.0.0.1:{}", proxy.port),
        };
        let cache = root.join(format!("cache-{name}"));
        // The image comes through the proxy too.
        let mount = PhoenixMount::new(&id, &url, &cache, &SMALL_CACHE);
        let report = chaos::run_with_faults(&mount, &dataset, reader, 4, 15, (1000, 1000), || {});
        check_report(&format!("fault proxy before {name}"), &report, &dataset, &mount, Some(0));
        let status = mount.status();
        let requests = status["chunks_fetched"].as_u64().unwrap() + status["fetch_retries"].as_u64().unwrap();
        print(&format!("fault proxy before {name}: {requests} chunk requests, faults {:?}, store errors {}", proxy.faults_done(), status["store_errors"]));
        assert!(requests >= 1000, "{requests} requests");
        assert!(proxy.faults_done().iter().all(|&(_, n)| n > 0), "every kind of fault happened: {:?}", proxy.faults_done());
        assert!(status["store_errors"]["corrupt"].as_u64().unwrap_or(0) > 0, "flipped bits were caught: {status}");
        drop(mount);
        assert!(assert_cache_holds_only_good_chunks(&cache, &dataset.image) > 0);
    }
}

#[test]
fn a_mirror_that_is_down_is_passed_over() {
    let root = fixture_dir("stores-mirrors");
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), trees::noise(3, 5 << 20)).unwrap();
    let store = root.join("store");
    let (_, id) = build_image(&src, &store, &root, &[]);
    let nginx = Nginx::serve(&store);
    let dead = format!("http://127.0.0.1:{}", phoenixfs_tests::servers::free_port());
    let mount = PhoenixMount::new(&id, &dead, &root.join("cache"), &["--store", &nginx.url()]);
    assert_eq!(fs::read(mount.path().join("f")).unwrap(), fs::read(src.join("f")).unwrap());
    let status = mount.status();
    assert_eq!(status["errors"], 0);
    assert!(status["store"].as_str().unwrap().contains(&nginx.url()), "{status}");
}

#[test]
fn push_sends_only_what_the_destination_lacks() {
    let root = fixture_dir("stores-push-resume");
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..6 {
        fs::write(src.join(format!("f{i}")), trees::noise(40 + i, 2 << 20)).unwrap();
    }
    let store = root.join("store");
    let (image, id) = build_image(&src, &store, &root, &[]);
    let copy = root.join("copy");
    // An image file and the store its chunks are in; the image lands in the copy last.
    push(image.to_str().unwrap(), &store, copy.to_str().unwrap());
    let chunks = phoenixfs_tests::chunk_files(&copy);
    assert_eq!(chunks.len(), 12);
    // What a push killed half-way leaves: some chunks there, the image not yet.
    for chunk in &chunks[..5] {
        fs::remove_file(chunk).unwrap();
    }
    fs::remove_file(copy.join("images").join(&id)).unwrap();
    let again = run(phoenixfs().arg("push").arg(&id).arg("--store").arg(&store).arg("--to").arg(&copy));
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && said.contains(": 5 of 12 chunks sent"), "{said}");
    assert_eq!(run_ok(phoenixfs().arg("check").arg(&id).arg("--store").arg(&copy)).trim(), format!("ok: image {id} and all 12 chunks verified"));
}
