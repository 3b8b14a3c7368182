//! The remote-store benchmark (scripts/bench-stores), on SeaweedFS and nginx started on
//! 127.0.0.1, release builds, one 1 GiB file of noise (1,024 chunks of 1 MiB, stored raw):
//! 1. `phoenixfs push` of the image to S3, against s3cmd uploading the same chunk files;
//! 2. a cold sequential read of the file through a mount with an empty cache, from S3 and
//!    from nginx, against a plain client fetching the same chunk objects with 16 GETs in
//!    flight (`object_store`, no verification, nothing written), in interleaved rounds after
//!    one uncounted warm-up round;
//! 3. 4 KiB reads of unread chunks right after worker kills, the store remote (S3) or local.
//!
//! Prints each figure, then the medians and ratios.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{self, StreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt};
use phoenixfs_format::ImageFile;

use crate::chaos::{percentile, Dataset};
use crate::mount::PhoenixMount;
use crate::servers::{Nginx, SeaweedFs};
use crate::{phoenixfs, run_ok};

const MIB: f64 = (1 << 20) as f64;
const PLAIN_CLIENT_REQUESTS: usize = 16;

fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5).unwrap_or(f64::NAN)
}

/// Reads `path` start to end in 1 MiB pieces; MiB/s.
fn read_speed(path: &Path) -> f64 {
    let started = Instant::now();
    let mut file = File::open(path).expect("the benchmark file");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf).expect("reading the benchmark file") {
            0 => break,
            n => total += n as u64,
        }
    }
    total as f64 / MIB / started.elapsed().as_secs_f64()
}

/// Fetches every object of `keys` from `store`, 16 at a time; MiB/s of the bytes received.
fn plain_client_speed(runtime: &tokio::runtime::Runtime, store: Arc<dyn ObjectStore>, keys: &[String]) -> f64 {
    let started = Instant::now();
    let total: u64 = runtime.block_on(async {
        stream::iter(keys.iter().cloned())
            .map(|key| {
                let store = store.clone();
                async move { store.get(&ObjectPath::from(key)).await.expect("plain GET").bytes().await.expect("plain body").len() as u64 }
            })
            .buffer_unordered(PLAIN_CLIENT_REQUESTS)
            .fold(0, |sum, n| async move { sum + n })
            .await
    });
    total as f64 / MIB / started.elapsed().as_secs_f64()
}

/// The chunk object keys (under `prefix`) of the dataset's image, each once.
fn chunk_keys(dataset: &Dataset, prefix: &str) -> Vec<String> {
    let image = ImageFile::decode(fs::read(&dataset.image).expect("the image")).expect("a valid image");
    let mut keys: Vec<String> = image
        .table
        .entries()
        .map(|e| {
            let hex = e.expect("a chunk entry").digest.to_hex();
            format!("{prefix}chunks/{}/{hex}", &hex[..2])
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

pub fn bench(rounds: usize, kills: usize) {
    let dataset = crate::chaos::store_bench_dataset();
    let id = ImageFile::decode(fs::read(&dataset.image).expect("the image")).expect("a valid image").id.to_string();
    let work = dataset.root.join("bench-stores");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).expect("work directory");
    let seaweed = SeaweedFs::start();
    seaweed.create_bucket("bench");
    let nginx = Nginx::serve(&dataset.store);
    let s3 = seaweed.store_url("bench", "phoenixfs");
    let stored_mib = chunk_keys(&dataset, "").len() as f64;

    let started = Instant::now();
    run_ok(phoenixfs().arg("push").arg(&id).arg("--store").arg(&dataset.store).arg("--to").arg(&s3));
    let push_speed = stored_mib / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let endpoint = format!("127.0.0.1:{}", seaweed.s3.port);
    run_ok(
        Command::new("s3cmd")
            .args(["--no-ssl", "--access_key=bench", "--secret_key=bench", "--no-check-md5", "--quiet"])
            .arg(format!("--host={endpoint}"))
            .arg(format!("--host-bucket={endpoint}"))
            .args(["put", "--recursive"])
            .arg(dataset.store.join("chunks"))
            .arg("s3://bench/s3cmd/"),
    );
    let s3cmd_speed = stored_mib / started.elapsed().as_secs_f64();
    println!("RESULT push phoenixfs {push_speed:.0} MiB/s, s3cmd {s3cmd_speed:.0} MiB/s");

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    let client = ClientOptions::new().with_allow_http(true);
    let plain_s3: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::new()
            .with_bucket_name("bench")
            .with_endpoint(format!("http://{endpoint}"))
            .with_skip_signature(true)
            .with_region("us-east-1")
            .with_client_options(client.clone())
            .build()
            .expect("the plain S3 client"),
    );
    let plain_http: Arc<dyn ObjectStore> = Arc::new(HttpBuilder::new().with_url(nginx.url()).with_client_options(client).build().expect("the plain HTTP client"));
    let file = "data/file.bin";
    let mut speeds: Vec<(&str, Vec<f64>)> = ["ours s3", "plain s3", "ours nginx", "plain nginx"].into_iter().map(|n| (n, Vec::new())).collect();
    // Round 0 warms the servers up (their first answers come from a cold disk) and is not counted.
    for round in 0..=rounds {
        for (which, url) in [("s3", s3.clone()), ("nginx", nginx.url())] {
            let cache = work.join(format!("cache-{which}-{round}"));
            let mount = PhoenixMount::new(&id, &url, &cache, &[]);
            let ours = read_speed(&mount.path().join(file));
            drop(mount);
            let _ = fs::remove_dir_all(&cache);
            let plain = match which {
                "s3" => plain_client_speed(&runtime, plain_s3.clone(), &chunk_keys(&dataset, "phoenixfs/")),
                _ => plain_client_speed(&runtime, plain_http.clone(), &chunk_keys(&dataset, "")),
            };
            if round == 0 {
                println!("warm-up {which}: mount cold {ours:.0} MiB/s, plain client {plain:.0} MiB/s (not counted)");
                continue;
            }
            println!("RESULT round {round} {which}: mount cold {ours:.0} MiB/s, plain client {plain:.0} MiB/s");
            for (name, value) in [(format!("ours {which}"), ours), (format!("plain {which}"), plain)] {
                speeds.iter_mut().find(|(n, _)| *n == name).expect("a series").1.push(value);
            }
        }
    }

    let mut stalls = Vec::new();
    for (which, store) in [("s3", s3.clone()), ("local", dataset.store.display().to_string())] {
        let mount = PhoenixMount::new(&id, &store, &work.join(format!("cache-kills-{which}")), &["--readahead", "0"]);
        let (after_kill, plain) = crate::probe::reads_after_kills(&mount.path().join(file), kills, || mount.worker_pid() as i32);
        let p99 = |v: &[f64]| percentile(v, 0.99).unwrap_or(f64::NAN);
        println!(
            "RESULT takeover {which}: 4 KiB read of an unread chunk after a kill median {:.1} ms, p99 {:.1} ms; without a kill {:.1} / {:.1} ms",
            median(&after_kill),
            p99(&after_kill),
            median(&plain),
            p99(&plain)
        );
        stalls.push(median(&after_kill));
    }

    let series = |name: &str| speeds.iter().find(|(n, _)| *n == name).expect("a series").1.clone();
    println!("SUMMARY push phoenixfs / s3cmd: {:.2}x ({push_speed:.0} / {s3cmd_speed:.0} MiB/s)", push_speed / s3cmd_speed);
    for (which, label) in [("s3", "S3"), ("nginx", "nginx")] {
        let (ours, plain) = (series(&format!("ours {which}")), series(&format!("plain {which}")));
        let mut ratios: Vec<f64> = ours.iter().zip(&plain).map(|(o, p)| o / p).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "SUMMARY cold read from {label}, mount / plain client: {:.2}x (rounds min {:.2}, max {:.2}; medians {:.0} / {:.0} MiB/s of {rounds})",
            median(&ratios),
            ratios.first().copied().unwrap_or(f64::NAN),
            ratios.last().copied().unwrap_or(f64::NAN),
            median(&ours),
            median(&plain)
        );
    }
    println!("SUMMARY read after a worker kill, median: S3 {:.1} ms, local store {:.1} ms", stalls[0], stalls[1]);
}
