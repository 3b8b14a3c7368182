//! Stores behind HTTP: S3 (and S3-compatible servers) and plain read-only web servers,
//! through `object_store`, on one small I/O runtime per process.
//!
//! Each request has a timeout, and a read that runs longer than the store's recent p99 gets a
//! second, hedged request: whichever answers first wins. `object_store`'s own retries are
//! off: the caller (the chunk cache) owns the retry policy, and must see every failure to
//! count it and to decide between waiting and giving up.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use phoenixfs_format::{ChunkEntry, Digest, ImageId};
use tokio::runtime::Runtime;

use crate::transport::{hedged, runtime, Latencies, CONNECT_TIMEOUT, REQUEST_TIMEOUT};
use crate::{ChunkStore, Outage, StoreError, StoreUrl};

pub struct RemoteStore {
    url: String,
    objects: Arc<dyn ObjectStore>,
    prefix: String,
    read_only: bool,
    latencies: Latencies,
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
            StoreUrl::Local(_) | StoreUrl::Oci { .. } => unreachable!("local and OCI stores are opened by store::open"),
        };
        Ok(RemoteStore { url: url.to_string(), objects, prefix, read_only, latencies: Latencies::default(), runtime: runtime()? })
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
        let hedge = self.latencies.hedge_delay();
        let (took, result) = self.runtime.block_on(hedged(once, hedge));
        match result {
            Ok(Ok(bytes)) => {
                self.latencies.record(took);
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

    fn get_chunk(&self, chunk: &ChunkEntry) -> Result<Vec<u8>, StoreError> {
        self.read(&Self::chunk_key(&chunk.digest), "chunk", chunk.digest.to_hex())
    }

    fn chunk_len(&self, chunk: &ChunkEntry) -> Result<Option<u64>, StoreError> {
        let path = self.path(&Self::chunk_key(&chunk.digest));
        match self.timed(self.objects.head(&path)) {
            Ok(Ok(meta)) => Ok(Some(meta.size)),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(self.outage(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn put_chunk(&self, chunk: &ChunkEntry, stored: &[u8]) -> Result<(), StoreError> {
        self.write(&Self::chunk_key(&chunk.digest), stored)
    }

    fn get_image(&self, id: &ImageId) -> Result<Vec<u8>, StoreError> {
        self.read(&format!("images/{id}"), "image", id.to_string())
    }

    /// An S3 PUT is durable when it returns, so the chunks put before are too.
    fn put_image(&self, id: &ImageId, image_file: &[u8]) -> Result<(), StoreError> {
        self.write(&format!("images/{id}"), image_file)
    }
}
