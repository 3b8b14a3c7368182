//! Stores behind HTTP: S3 (and S3-compatible servers) and plain read-only web servers,
//! through `object_store`, on one small I/O runtime per process.
//!
//! Each request has a timeout, and a read that runs longer than the store's recent p99 gets a
//! second, hedged request: whichever answers first wins. `object_store`'s own retries are
//! off: the caller (the chunk cache) owns the retry policy, and must see every failure to
//! count it and to decide between waiting and giving up.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use phoenixfs_format::{Digest, ImageId};
use tokio::runtime::Runtime;

use crate::{ChunkStore, Outage, StoreError, StoreUrl};

/// Longest a single request may take; a slower one is an outage (and retried by the caller).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Latencies kept to estimate the p99, and how many make an estimate; before that, a read
/// is hedged after `FIRST_HEDGE_DELAY`.
const LATENCY_WINDOW: usize = 256;
const HEDGE_AFTER_SAMPLES: usize = 16;
const FIRST_HEDGE_DELAY: Duration = Duration::from_secs(1);
/// Never hedge sooner than this: on loopback the p99 can be far below a scheduler tick.
const MIN_HEDGE_DELAY: Duration = Duration::from_millis(20);

/// The runtime all remote stores of this process share: two threads drive every connection.
fn runtime() -> Result<&'static Runtime, StoreError> {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let built = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("store-io")
        .enable_all()
        .build()
        .map_err(|e| StoreError::Unavailable { store: "(runtime)".into(), outage: Outage::Other, detail: format!("starting the I/O runtime: {e}") })?;
    Ok(RUNTIME.get_or_init(|| built))
}

pub struct RemoteStore {
    url: String,
    objects: Arc<dyn ObjectStore>,
    prefix: String,
    read_only: bool,
    latencies: Mutex<VecDeque<Duration>>,
    runtime: &'static Runtime,
}

impl RemoteStore {
    /// Opens an S3 or HTTP store; makes no request.
    pub fn open(url: &StoreUrl) -> Result<Self, StoreError> {
        let bad = |e: object_store::Error| StoreError::BadUrl { url: url.to_string(), detail: e.to_string() };
        let client = ClientOptions::new().with_timeout(REQUEST_TIMEOUT).with_connect_timeout(CONNECT_TIMEOUT).with_allow_http(true);
        let retry = RetryConfig { max_retries: 0, ..RetryConfig::default() };
        let (objects, prefix, read_only): (Arc<dyn ObjectStore>, String, bool) = match url {
            StoreUrl::S3 { bucket, prefix, endpoint, region } => {
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_client_options(client).with_retry(retry);
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint);
                    // A server of one's own without credentials in the environment: ask it
                    // anonymously rather than look for a cloud's instance credentials.
                    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
                        builder = builder.with_skip_signature(true);
                    }
                }
                if let Some(region) = region {
                    builder = builder.with_region(region);
                }
                (Arc::new(builder.build().map_err(bad)?), prefix.clone(), false)
            }
            StoreUrl::Http(base) => {
                let builder = HttpBuilder::new().with_url(base).with_client_options(client).with_retry(retry);
                (Arc::new(builder.build().map_err(bad)?), String::new(), true)
            }
            StoreUrl::Local(_) => unreachable!("local stores are opened by store::open"),
        };
        Ok(RemoteStore { url: url.to_string(), objects, prefix, read_only, latencies: Mutex::new(VecDeque::new()), runtime: runtime()? })
    }

    fn path(&self, key: &str) -> ObjectPath {
        match self.prefix.as_str() {
            "" => ObjectPath::from(key),
            prefix => ObjectPath::from(format!("{prefix}/{key}")),
        }
    }

    fn chunk_key(digest: &Digest) -> String {
        let hex = digest.to_hex();
        format!("chunks/{}/{hex}", &hex[..2])
    }

    /// When a read should get a second request: after the recent p99.
    fn hedge_delay(&self) -> Duration {
        let latencies = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        if latencies.len() < HEDGE_AFTER_SAMPLES {
            return FIRST_HEDGE_DELAY;
        }
        let mut sorted: Vec<Duration> = latencies.iter().copied().collect();
        sorted.sort_unstable();
        sorted[sorted.len() * 99 / 100].max(MIN_HEDGE_DELAY)
    }

    fn record_latency(&self, took: Duration) {
        let mut latencies = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        if latencies.len() == LATENCY_WINDOW {
            latencies.pop_front();
        }
        latencies.push_back(took);
    }

    /// Reads one object whole; a read slower than the recent p99 is raced by a second one.
    fn read(&self, key: &str, what: &'static str, name: String) -> Result<Vec<u8>, StoreError> {
        let path = self.path(key);
        let once = || {
            let path = path.clone();
            let objects = self.objects.clone();
            async move {
                let started = Instant::now();
                let result = tokio::time::timeout(REQUEST_TIMEOUT, async { objects.get(&path).await?.bytes().await }).await;
                (started.elapsed(), result)
            }
        };
        let hedge = self.hedge_delay();
        let (took, result) = self.runtime.block_on(hedged(once, hedge));
        match result {
            Ok(Ok(bytes)) => {
                self.record_latency(took);
                Ok(Vec::from(bytes))
            }
            Ok(Err(object_store::Error::NotFound { .. })) => Err(StoreError::NotFound { store: self.url.clone(), what, key: name }),
            Ok(Err(e)) => Err(self.outage(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn write(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly { store: self.url.clone(), why: "a plain web server is only read" });
        }
        let path = self.path(key);
        let payload = PutPayload::from(bytes.to_vec());
        match self.timed(self.objects.put(&path, payload)) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.outage(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// Runs one request on the I/O runtime, bounded by the request timeout.
    fn timed<T>(&self, request: impl Future<Output = T>) -> Result<T, tokio::time::error::Elapsed> {
        self.runtime.block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, request).await })
    }

    fn timed_out(&self) -> StoreError {
        StoreError::Unavailable { store: self.url.clone(), outage: Outage::Timeout, detail: format!("no answer in {REQUEST_TIMEOUT:?}") }
    }

    fn outage(&self, error: &object_store::Error) -> StoreError {
        StoreError::Unavailable { store: self.url.clone(), outage: classify(error), detail: error.to_string() }
    }
}

/// Runs `once()`; if it has not finished after `hedge`, runs it again beside the first and
/// takes whichever finishes first.
async fn hedged<F, Fut, T>(once: F, hedge: Duration) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
{
    let first = once();
    tokio::pin!(first);
    tokio::select! {
        done = &mut first => return done,
        _ = tokio::time::sleep(hedge) => {}
    }
    tracing::debug!(after_ms = hedge.as_millis() as u64, "slow read; sending a hedged request");
    let second = once();
    tokio::select! {
        done = &mut first => done,
        done = second => done,
    }
}

/// What kind of outage an `object_store` error is, from its HTTP error kind and status.
fn classify(error: &object_store::Error) -> Outage {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(http) = e.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind::*;
            return match http.kind() {
                Connect => Outage::Unreachable,
                Timeout => Outage::Timeout,
                Request | Interrupted | Decode => Outage::Truncated,
                _ => Outage::Other,
            };
        }
        source = e.source();
    }
    let text = error.to_string();
    if text.contains("429") || text.contains("SlowDown") {
        Outage::Throttled
    } else if text.contains("status code: 5") {
        Outage::ServerError
    } else {
        Outage::Other
    }
}

impl ChunkStore for RemoteStore {
    fn location(&self) -> String {
        self.url.clone()
    }

    fn get_chunk(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        self.read(&Self::chunk_key(digest), "chunk", digest.to_hex())
    }

    fn chunk_len(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let path = self.path(&Self::chunk_key(digest));
        match self.timed(self.objects.head(&path)) {
            Ok(Ok(meta)) => Ok(Some(meta.size)),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(self.outage(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn put_chunk(&self, digest: &Digest, stored: &[u8]) -> Result<(), StoreError> {
        self.write(&Self::chunk_key(digest), stored)
    }

    fn get_image(&self, id: &ImageId) -> Result<Vec<u8>, StoreError> {
        self.read(&format!("images/{id}"), "image", id.to_string())
    }

    /// An S3 PUT is durable when it returns, so the chunks put before are too.
    fn put_image(&self, id: &ImageId, image_file: &[u8]) -> Result<(), StoreError> {
        self.write(&format!("images/{id}"), image_file)
    }
}
