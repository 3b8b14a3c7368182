//! Container images in: an OCI image from a registry (`oci://HOST/REPO[:TAG|@sha256:HEX]`) or
//! from an OCI image layout directory (`DIR` or `DIR:TAG`), its layers laid one over another
//! with their whiteouts into one image (see [`crate::tarball`]).
//!
//! Everything read is checked against the digest that names it (manifest, config, each layer
//! as it streams past; a layer that fails its check fails the build before anything is
//! published). The image records the manifest's digest and the image config (entrypoint, env,
//! ...) in its metadata, and not where it came from: the same image from a registry and from a
//! layout is the same phoenixfs image. Layers shared between images cost their chunks once,
//! like any data the store has already.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use phoenixfs_format::{Digest, ImageFile};
use phoenixfs_store::{ChunkStore, OciStore, StoreError};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::tarball::{build_from_layers, Layer, Whiteouts};
use crate::{BuildError, BuildOptions, Built};

const INDEX_TYPES: [&str; 2] = ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where a container image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OciSource {
    Registry { host: String, repository: String, reference: String },
    Layout { dir: PathBuf, tag: Option<String> },
}

impl OciSource {
    /// `oci://HOST/REPO[:TAG|@sha256:HEX]` (tag `latest` when none), or a layout directory
    /// `DIR` or `DIR:TAG`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix("oci://") else {
            let path = Path::new(text);
            if path.is_dir() {
                return Ok(OciSource::Layout { dir: path.to_path_buf(), tag: None });
            }
            return match text.rsplit_once(':') {
                Some((dir, tag)) if Path::new(dir).is_dir() && !tag.is_empty() => Ok(OciSource::Layout { dir: dir.into(), tag: Some(tag.into()) }),
                _ => Err(format!("{text}: neither an OCI layout directory (DIR or DIR:TAG) nor oci://HOST/REPO[:TAG]")),
            };
        };
        let (host, path) = rest.split_once('/').filter(|(h, p)| !h.is_empty() && !p.is_empty()).ok_or_else(|| format!("{text}: expected oci://HOST/REPO[:TAG]"))?;
        let (repository, reference) = match path.split_once('@') {
            Some((repository, digest)) => (repository, digest.to_string()),
            None => match path.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')) {
                Some((repository, tag)) => (repository, tag.to_string()),
                None => (path, "latest".to_string()),
            },
        };
        if repository.is_empty() || reference.is_empty() {
            return Err(format!("{text}: expected oci://HOST/REPO[:TAG]"));
        }
        Ok(OciSource::Registry { host: host.into(), repository: repository.into(), reference })
    }
}

impl fmt::Display for OciSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OciSource::Registry { host, repository, reference } if reference.contains(':') => write!(f, "oci://{host}/{repository}@{reference}"),
            OciSource::Registry { host, repository, reference } => write!(f, "oci://{host}/{repository}:{reference}"),
            OciSource::Layout { dir, tag: Some(tag) } => write!(f, "{}:{tag}", dir.display()),
            OciSource::Layout { dir, tag: None } => write!(f, "{}", dir.display()),
        }
    }
}

/// A converted image and what it was converted from.
#[derive(Debug, Clone)]
pub struct Converted {
    pub built: Built,
    /// `sha256:HEX` of the image manifest (of the platform's, when the source named an index).
    pub manifest_digest: String,
    pub layers: usize,
}

/// Converts the container image at `source` into a phoenixfs image in `store`.
pub fn convert(source: &OciSource, store: &dyn ChunkStore, options: &BuildOptions) -> Result<Converted, BuildError> {
    let fail = |detail: String| BuildError::Oci { image: source.to_string(), detail };
    let blobs: Box<dyn Blobs> = match source {
        OciSource::Registry { host, repository, reference } => {
            let url = format!("oci://{host}/{repository}");
            let registry = OciStore::open(&url, host, repository)?;
            Box::new(Registry { registry, reference: reference.clone() })
        }
        OciSource::Layout { dir, tag } => Box::new(LayoutDir::open(dir, tag.as_deref()).map_err(fail)?),
    };
    let (manifest_digest, manifest) = blobs.manifest().map_err(fail)?;
    let manifest: Value = serde_json::from_slice(&manifest).map_err(|e| fail(format!("manifest {manifest_digest} is not JSON: {e}")))?;
    let config_descriptor = Descriptor::of(&manifest["config"]).map_err(|e| fail(format!("manifest {manifest_digest}: config: {e}")))?;
    let config_bytes = blobs.small(&config_descriptor).map_err(fail)?;
    let config: Value = serde_json::from_slice(&config_bytes).map_err(|e| fail(format!("config {}: not JSON: {e}", config_descriptor.digest)))?;
    let layers = manifest["layers"].as_array().ok_or_else(|| fail(format!("manifest {manifest_digest} lists no layers")))?;
    let layers = layers.iter().map(Descriptor::of).collect::<Result<Vec<_>, _>>().map_err(|e| fail(format!("manifest {manifest_digest}: a layer: {e}")))?;
    if let Some(odd) = layers.iter().find(|l| !l.media_type.contains("tar")) {
        return Err(fail(format!("layer {} is a {:?}, not a tar", odd.digest, odd.media_type)));
    }
    let metadata = json!({
        "oci": {
            "manifest_digest": manifest_digest,
            "config_digest": config_descriptor.digest.to_string(),
            "config": config,
        }
    });
    let metadata = serde_json::to_vec(&metadata).expect("a JSON value serialises");
    let count = layers.len();
    let streams = layers.into_iter().enumerate().map(|(i, layer)| {
        let name = format!("layer {} of {count} ({})", i + 1, layer.digest);
        let stream = blobs.stream(&layer).map_err(|detail| BuildError::Oci { image: source.to_string(), detail })?;
        Ok(Layer { name, stream })
    });
    let built = build_from_layers(streams, Whiteouts::Applied, &metadata, store, options)?;
    Ok(Converted { built, manifest_digest, layers: count })
}

/// What an image's metadata says about the container image it was converted from, if it was.
pub fn recorded_oci(image: &ImageFile) -> Option<Value> {
    let metadata: Value = serde_json::from_slice(image.metadata()).ok()?;
    metadata.get("oci").cloned()
}

/// A content descriptor: what a manifest or an index says of a blob.
#[derive(Debug, Clone)]
struct Descriptor {
    media_type: String,
    digest: BlobDigest,
    size: u64,
}

impl Descriptor {
    fn of(value: &Value) -> Result<Self, String> {
        let digest = value["digest"].as_str().ok_or("no digest")?;
        Ok(Descriptor {
            media_type: value["mediaType"].as_str().unwrap_or_default().to_string(),
            digest: digest.parse()?,
            size: value["size"].as_u64().ok_or_else(|| format!("{digest}: no size"))?,
        })
    }
}

/// `sha256:HEX`, the only digest algorithm this converter checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlobDigest(Digest);

impl std::str::FromStr for BlobDigest {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let hex = text.strip_prefix("sha256:").ok_or_else(|| format!("digest {text:?} is not sha256"))?;
        hex.parse().map(BlobDigest).map_err(|_| format!("digest {text:?} is malformed"))
    }
}

impl fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0.to_hex())
    }
}

/// Where the blobs of one image are.
trait Blobs {
    /// The image manifest (chosen from an index for this host's platform): its digest and bytes.
    fn manifest(&self) -> Result<(String, Vec<u8>), String>;
    /// A small blob, whole and checked.
    fn small(&self, descriptor: &Descriptor) -> Result<Vec<u8>, String>;
    /// A blob as a stream that fails at its end unless it matched its descriptor.
    fn stream(&self, descriptor: &Descriptor) -> Result<Box<dyn Read>, String>;
}

struct Registry {
    registry: OciStore,
    reference: String,
}

impl Blobs for Registry {
    fn manifest(&self) -> Result<(String, Vec<u8>), String> {
        let store_error = |e: StoreError| e.to_string();
        let (bytes, media_type) = self.registry.get_manifest(&self.reference).map_err(store_error)?;
        let digest = BlobDigest(Digest::of(&bytes));
        if self.reference.contains(':') && self.reference != digest.to_string() {
            return Err(format!("the registry sent manifest {digest} for {}", self.reference));
        }
        if !is_index(&bytes, media_type.as_deref())? {
            return Ok((digest.to_string(), bytes));
        }
        let chosen = choose_platform(&bytes)?;
        let (bytes, _) = self.registry.get_manifest(&chosen.digest.to_string()).map_err(store_error)?;
        check(&chosen, &bytes)?;
        Ok((chosen.digest.to_string(), bytes))
    }

    fn small(&self, descriptor: &Descriptor) -> Result<Vec<u8>, String> {
        let bytes = self.registry.get_small_blob(&descriptor.digest.0).map_err(|e| e.to_string())?;
        check(descriptor, &bytes)?;
        Ok(bytes)
    }

    fn stream(&self, descriptor: &Descriptor) -> Result<Box<dyn Read>, String> {
        let blob = self.registry.open_blob(&descriptor.digest.0).map_err(|e| e.to_string())?;
        Ok(Box::new(CheckedStream::new(blob, descriptor)))
    }
}

/// An OCI image layout: `oci-layout`, `index.json`, `blobs/sha256/HEX`.
struct LayoutDir {
    dir: PathBuf,
    /// The descriptor `index.json` gives for the image asked for.
    chosen: Descriptor,
}

impl LayoutDir {
    fn open(dir: &Path, tag: Option<&str>) -> Result<Self, String> {
        let read = |name: &str| fs::read(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()));
        let layout: Value = serde_json::from_slice(&read("oci-layout")?).map_err(|e| format!("oci-layout is not JSON: {e}"))?;
        if layout["imageLayoutVersion"].as_str().is_none() {
            return Err("oci-layout names no imageLayoutVersion".into());
        }
        let index: Value = serde_json::from_slice(&read("index.json")?).map_err(|e| format!("index.json is not JSON: {e}"))?;
        let manifests = index["manifests"].as_array().ok_or("index.json lists no manifests")?;
        let tags: Vec<&str> = manifests.iter().filter_map(|m| m["annotations"][REF_NAME].as_str()).collect();
        let found = match tag {
            Some(tag) => manifests.iter().find(|m| m["annotations"][REF_NAME].as_str() == Some(tag)).ok_or_else(|| format!("no image tagged {tag:?} (tags: {})", tags.join(", ")))?,
            None if manifests.len() == 1 => &manifests[0],
            None => return Err(format!("{} images: name one as DIR:TAG (tags: {})", manifests.len(), tags.join(", "))),
        };
        Ok(LayoutDir { dir: dir.to_path_buf(), chosen: Descriptor::of(found).map_err(|e| format!("index.json: {e}"))? })
    }

    fn blob_path(&self, digest: &BlobDigest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.0.to_hex())
    }

    fn open_blob(&self, digest: &BlobDigest) -> Result<fs::File, String> {
        let path = self.blob_path(digest);
        fs::File::open(&path).map_err(|e| format!("blob {digest}: {}: {e}", path.display()))
    }
}

impl Blobs for LayoutDir {
    fn manifest(&self) -> Result<(String, Vec<u8>), String> {
        let bytes = self.small(&self.chosen)?;
        if !is_index(&bytes, Some(&self.chosen.media_type))? {
            return Ok((self.chosen.digest.to_string(), bytes));
        }
        let chosen = choose_platform(&bytes)?;
        Ok((chosen.digest.to_string(), self.small(&chosen)?))
    }

    fn small(&self, descriptor: &Descriptor) -> Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        self.open_blob(&descriptor.digest)?.read_to_end(&mut bytes).map_err(|e| format!("blob {}: {e}", descriptor.digest))?;
        check(descriptor, &bytes)?;
        Ok(bytes)
    }

    fn stream(&self, descriptor: &Descriptor) -> Result<Box<dyn Read>, String> {
        Ok(Box::new(CheckedStream::new(self.open_blob(&descriptor.digest)?, descriptor)))
    }
}

/// Whether manifest bytes are an index (a list of per-platform manifests).
fn is_index(bytes: &[u8], media_type: Option<&str>) -> Result<bool, String> {
    if media_type.is_some_and(|t| INDEX_TYPES.contains(&t)) {
        return Ok(true);
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("a manifest is not JSON: {e}"))?;
    Ok(value["manifests"].is_array() && !value["layers"].is_array())
}

/// The manifest of an index for this host: linux and this architecture.
fn choose_platform(index: &[u8]) -> Result<Descriptor, String> {
    let index: Value = serde_json::from_slice(index).map_err(|e| format!("an index is not JSON: {e}"))?;
    let manifests = index["manifests"].as_array().ok_or("an index lists no manifests")?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    let found = manifests.iter().find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch);
    let found = match found {
        Some(found) => found,
        None if manifests.len() == 1 => &manifests[0],
        None => {
            let platforms: Vec<String> = manifests.iter().map(|m| format!("{}/{}", m["platform"]["os"].as_str().unwrap_or("?"), m["platform"]["architecture"].as_str().unwrap_or("?"))).collect();
            return Err(format!("no image for linux/{arch} in the index (it has {})", platforms.join(", ")));
        }
    };
    Descriptor::of(found).map_err(|e| format!("an index entry: {e}"))
}

fn check(descriptor: &Descriptor, bytes: &[u8]) -> Result<(), String> {
    if bytes.len() as u64 != descriptor.size {
        return Err(format!("blob {} is {} bytes, not the {} its descriptor says", descriptor.digest, bytes.len(), descriptor.size));
    }
    if Digest::of(bytes) != descriptor.digest.0 {
        return Err(format!("blob {} does not match its digest", descriptor.digest));
    }
    Ok(())
}

/// A blob read as a stream, checked against its descriptor when it ends: its last read is an
/// error instead of the end if the bytes were not the ones named.
struct CheckedStream<R> {
    inner: R,
    hasher: Option<Sha256>,
    read: u64,
    expected: Descriptor,
}

impl<R: Read> CheckedStream<R> {
    fn new(inner: R, expected: &Descriptor) -> Self {
        CheckedStream { inner, hasher: Some(Sha256::new()), read: 0, expected: expected.clone() }
    }
}

impl<R: Read> Read for CheckedStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let Some(hasher) = &mut self.hasher else { return Ok(n) };
        if n > 0 {
            hasher.update(&buf[..n]);
            self.read += n as u64;
            if self.read > self.expected.size {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("blob {} is longer than the {} bytes its descriptor says", self.expected.digest, self.expected.size)));
            }
            return Ok(n);
        }
        let digest = Digest(self.hasher.take().expect("checked above").finalize().into());
        if self.read != self.expected.size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("blob {} ends after {} of its {} bytes", self.expected.digest, self.read, self.expected.size)));
        }
        if digest != self.expected.digest.0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("blob {} does not match its digest", self.expected.digest)));
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_as_registries_or_layouts() {
        let registry = |host: &str, repository: &str, reference: &str| OciSource::Registry { host: host.into(), repository: repository.into(), reference: reference.into() };
        assert_eq!(OciSource::parse("oci://127.0.0.1:5000/lib/app:v1").unwrap(), registry("127.0.0.1:5000", "lib/app", "v1"));
        assert_eq!(OciSource::parse("oci://localhost:5000/app").unwrap(), registry("localhost:5000", "app", "latest"));
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(OciSource::parse(&format!("oci://h/a/b@{digest}")).unwrap(), registry("h", "a/b", &digest));
        assert!(OciSource::parse("oci://host").is_err());
        assert!(OciSource::parse("oci:///repo").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        assert_eq!(OciSource::parse(path).unwrap(), OciSource::Layout { dir: dir.path().into(), tag: None });
        assert_eq!(OciSource::parse(&format!("{path}:v2")).unwrap(), OciSource::Layout { dir: dir.path().into(), tag: Some("v2".into()) });
        assert!(OciSource::parse(&format!("{path}/missing:v2")).is_err());
    }

    #[test]
    fn a_stream_fails_at_its_end_unless_it_is_the_blob_named() {
        let blob = b"layer bytes".to_vec();
        let descriptor = |bytes: &[u8], size: u64| Descriptor { media_type: String::new(), digest: BlobDigest(Digest::of(bytes)), size };
        let read_all = |data: &[u8], d: Descriptor| {
            let mut out = Vec::new();
            CheckedStream::new(data, &d).read_to_end(&mut out).map(|_| out)
        };
        assert_eq!(read_all(&blob, descriptor(&blob, blob.len() as u64)).unwrap(), blob);
        assert!(read_all(b"layer bytez", descriptor(&blob, blob.len() as u64)).is_err());
        assert!(read_all(&blob[..5], descriptor(&blob, blob.len() as u64)).is_err());
        assert!(read_all(&blob, descriptor(&blob, 5)).is_err());
    }
}
