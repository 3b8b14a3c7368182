//! OCI registries (the distribution API, v2) as stores: every chunk and every image is a blob
//! of one repository, named by the sha256 of its bytes. An image's blob digest is its id; a
//! chunk's is the digest of its stored bytes, which version 2 chunk tables carry.
//!
//! The same client reads container images for `convert`: manifests by tag or digest, and
//! layer blobs streamed as they arrive ([`BlobStream`]).
//!
//! Requests are anonymous until the registry answers 401 with a Bearer challenge; then a
//! token for the repository (pull and push) is asked of the realm it names, and kept. Plain
//! http is used for a registry on the loopback interface, https elsewhere.

use std::io::{self, Read};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use phoenixfs_format::{ChunkEntry, Digest, ImageId};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tokio::runtime::Runtime;

use crate::transport::{hedged, runtime, Latencies, CONNECT_TIMEOUT, REQUEST_TIMEOUT};
use crate::{ChunkStore, Outage, StoreError};

pub struct OciStore {
    url: String,
    /// `http(s)://HOST[:PORT]/v2/REPO`.
    api: String,
    repository: String,
    client: reqwest::Client,
    token: RwLock<Option<String>>,
    latencies: Latencies,
    runtime: &'static Runtime,
}

fn is_loopback(host: &str) -> bool {
    let name = host.rsplit_once(':').map_or(host, |(name, port)| if port.chars().all(|c| c.is_ascii_digit()) { name } else { host });
    matches!(name, "localhost" | "[::1]") || name.starts_with("127.")
}

impl OciStore {
    /// Opens `oci://host/repository`; makes no request.
    pub fn open(url: &str, host: &str, repository: &str) -> Result<Self, StoreError> {
        let scheme = if is_loopback(host) { "http" } else { "https" };
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .read_timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| StoreError::BadUrl { url: url.to_string(), detail: e.to_string() })?;
        Ok(OciStore {
            url: url.to_string(),
            api: format!("{scheme}://{host}/v2/{repository}"),
            repository: repository.to_string(),
            client,
            token: RwLock::new(None),
            latencies: Latencies::default(),
            runtime: runtime()?,
        })
    }

    fn blob_url(&self, digest: &Digest) -> String {
        format!("{}/blobs/sha256:{}", self.api, digest.to_hex())
    }

    fn outage(&self, outage: Outage, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable { store: self.url.clone(), outage, detail: detail.to_string() }
    }

    fn request_error(&self, error: &reqwest::Error) -> StoreError {
        let outage = if error.is_timeout() {
            Outage::Timeout
        } else if error.is_connect() {
            Outage::Unreachable
        } else if error.is_body() || error.is_decode() || error.is_request() {
            Outage::Truncated
        } else {
            Outage::Other
        };
        self.outage(outage, error)
    }

    /// What an answer's status means when it is not the one hoped for.
    fn status_error(&self, status: StatusCode, what: &'static str, key: String) -> StoreError {
        match status {
            StatusCode::NOT_FOUND => StoreError::NotFound { store: self.url.clone(), what, key },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => StoreError::Denied { store: self.url.clone(), detail: format!("{status} for {what} {key}") },
            StatusCode::TOO_MANY_REQUESTS => self.outage(Outage::Throttled, status),
            s if s.is_server_error() => self.outage(Outage::ServerError, status),
            s => self.outage(Outage::Other, format!("unexpected {s} for {what} {key}")),
        }
    }

    /// Sends the request `build` makes, with the token when there is one; after a 401 with a
    /// Bearer challenge, gets a token and sends it once more.
    async fn send(&self, build: impl Fn() -> RequestBuilder) -> Result<Response, StoreError> {
        let with_token = |request: RequestBuilder| match self.token.read().unwrap_or_else(|p| p.into_inner()).as_deref() {
            Some(token) => request.header(AUTHORIZATION, format!("Bearer {token}")),
            None => request,
        };
        let response = with_token(build()).send().await.map_err(|e| self.request_error(&e))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let Some(challenge) = response.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).map(str::to_string) else {
            return Ok(response);
        };
        self.fetch_token(&challenge).await?;
        with_token(build()).send().await.map_err(|e| self.request_error(&e))
    }

    /// Asks the realm of a `Bearer realm="...",service="..."` challenge for a token to pull
    /// and push this repository.
    async fn fetch_token(&self, challenge: &str) -> Result<(), StoreError> {
        let denied = |detail: String| StoreError::Denied { store: self.url.clone(), detail };
        let Some(params) = challenge.strip_prefix("Bearer ") else { return Err(denied(format!("unsupported challenge {challenge:?}"))) };
        let param = |name: &str| {
            params.split(',').filter_map(|p| p.trim().split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v.trim_matches('"').to_string())
        };
        let realm = param("realm").ok_or_else(|| denied(format!("no realm in {challenge:?}")))?;
        let mut query = vec![("scope", format!("repository:{}:pull,push", self.repository))];
        if let Some(service) = param("service") {
            query.push(("service", service));
        }
        let token_url = reqwest::Url::parse_with_params(&realm, &query).map_err(|e| denied(format!("realm {realm:?}: {e}")))?;
        let response = self.client.get(token_url).send().await.map_err(|e| self.request_error(&e))?;
        if !response.status().is_success() {
            return Err(self.status_error(response.status(), "token", realm));
        }
        let body = response.bytes().await.map_err(|e| self.request_error(&e))?;
        let body: serde_json::Value = serde_json::from_slice(&body).map_err(|e| denied(format!("the token answer is not JSON: {e}")))?;
        let token = body["token"].as_str().or(body["access_token"].as_str()).ok_or_else(|| denied("the token answer holds no token".into()))?;
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token.to_string());
        Ok(())
    }

    /// The whole blob `digest`, hedged when slow.
    fn get_blob(&self, digest: &Digest, what: &'static str) -> Result<Vec<u8>, StoreError> {
        let url = self.blob_url(digest);
        let once = || async {
            let started = Instant::now();
            let response = self.send(|| self.client.get(&url)).await?;
            if !response.status().is_success() {
                return Err(self.status_error(response.status(), what, digest.to_hex()));
            }
            let body = response.bytes().await.map_err(|e| self.request_error(&e))?;
            Ok((started.elapsed(), body))
        };
        let (took, body) = self.runtime.block_on(hedged(once, self.latencies.hedge_delay()))?;
        self.latencies.record(took);
        Ok(Vec::from(body))
    }

    /// Uploads `bytes` as blob `digest` in one request (a monolithic upload), unless the
    /// registry has it.
    fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if Digest::of(bytes) != *digest {
            return Err(self.outage(Outage::Other, format!("refusing to upload bytes that are not blob {digest}")));
        }
        self.runtime.block_on(async {
            let start = format!("{}/blobs/uploads/", self.api);
            let response = self.send(|| self.client.post(&start).header(CONTENT_LENGTH, 0)).await?;
            if response.status() != StatusCode::ACCEPTED {
                return Err(self.status_error(response.status(), "upload", digest.to_hex()));
            }
            let location = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| self.outage(Outage::Other, "an upload without a Location"))?;
            let mut target = match location.starts_with('/') {
                true => format!("{}{location}", self.api.split("/v2/").next().expect("an api url")),
                false => location.to_string(),
            };
            target.push(if target.contains('?') { '&' } else { '?' });
            target.push_str(&format!("digest=sha256:{}", digest.to_hex()));
            let body = bytes.to_vec();
            let response = self
                .send(|| self.client.request(Method::PUT, &target).header(CONTENT_TYPE, "application/octet-stream").body(body.clone()))
                .await?;
            match response.status() {
                StatusCode::CREATED => Ok(()),
                status => Err(self.status_error(status, "upload", digest.to_hex())),
            }
        })
    }

    /// The manifest (or index) `reference` (a tag, or `sha256:HEX`) names: its bytes and the
    /// media type the registry gave it.
    pub fn get_manifest(&self, reference: &str) -> Result<(Vec<u8>, Option<String>), StoreError> {
        let url = format!("{}/manifests/{reference}", self.api);
        self.runtime.block_on(async {
            let response = self.send(|| self.client.get(&url).header(ACCEPT, MANIFEST_TYPES)).await?;
            if !response.status().is_success() {
                return Err(self.status_error(response.status(), "manifest", reference.to_string()));
            }
            let media_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
            let body = response.bytes().await.map_err(|e| self.request_error(&e))?;
            Ok((body.to_vec(), media_type))
        })
    }

    /// A small blob (an image config) whole; not verified here.
    pub fn get_small_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        self.get_blob(digest, "blob")
    }

    /// Blob `digest` as a stream of its bytes as they arrive (a layer, read once); not
    /// verified here. Only a stalled transfer times out, not a long one.
    pub fn open_blob(&self, digest: &Digest) -> Result<BlobStream, StoreError> {
        let url = self.blob_url(digest);
        let response = self.runtime.block_on(self.send(|| self.client.get(&url).timeout(WHOLE_BLOB_TIMEOUT)))?;
        if !response.status().is_success() {
            return Err(self.status_error(response.status(), "blob", digest.to_hex()));
        }
        Ok(BlobStream { response, runtime: self.runtime, pending: Default::default() })
    }

    fn stored_digest(&self, chunk: &ChunkEntry) -> Result<Digest, StoreError> {
        chunk.stored_digest.ok_or_else(|| StoreError::Denied {
            store: self.url.clone(),
            detail: format!("chunk {} comes from a version 1 chunk table, without the digest an OCI registry names it by; build the image again", chunk.digest),
        })
    }
}

/// The manifest media types `convert` understands, OCI's and Docker's, images and indexes.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// A layer of any size streams for as long as bytes keep coming (the client's read timeout
/// catches a stall).
const WHOLE_BLOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A blob's bytes as the registry sends them.
pub struct BlobStream {
    response: Response,
    runtime: &'static Runtime,
    pending: bytes::Bytes,
}

impl Read for BlobStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pending.is_empty() {
            match self.runtime.block_on(self.response.chunk()) {
                Ok(Some(bytes)) => self.pending = bytes,
                Ok(None) => return Ok(0),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        Ok(n)
    }
}

impl ChunkStore for OciStore {
    fn location(&self) -> String {
        self.url.clone()
    }

    fn get_chunk(&self, chunk: &ChunkEntry) -> Result<Vec<u8>, StoreError> {
        self.get_blob(&self.stored_digest(chunk)?, "chunk")
    }

    fn chunk_len(&self, chunk: &ChunkEntry) -> Result<Option<u64>, StoreError> {
        let digest = self.stored_digest(chunk)?;
        let url = self.blob_url(&digest);
        let response = self.runtime.block_on(self.send(|| self.client.head(&url)))?;
        match response.status() {
            StatusCode::OK => Ok(response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok())),
            StatusCode::NOT_FOUND => Ok(None),
            status => Err(self.status_error(status, "chunk", digest.to_hex())),
        }
    }

    fn put_chunk(&self, chunk: &ChunkEntry, stored: &[u8]) -> Result<(), StoreError> {
        self.put_blob(&self.stored_digest(chunk)?, stored)
    }

    fn get_image(&self, id: &ImageId) -> Result<Vec<u8>, StoreError> {
        self.get_blob(&id.0, "image")
    }

    /// A registry keeps a blob once the upload is answered, so the chunks put before are kept.
    fn put_image(&self, id: &ImageId, image_file: &[u8]) -> Result<(), StoreError> {
        self.put_blob(&id.0, image_file)
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn loopback_registries_are_spoken_to_in_plain_http() {
        for host in ["127.0.0.1:5000", "localhost", "localhost:5000", "[::1]:5000", "127.1.2.3"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["registry.example.com", "ghcr.io:443", "10.0.0.1:5000"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
