//! What the daemon serves: one JSON file per mountpoint in [`REGISTRY_DIR`], written by the
//! holder when `mount --fscache` registers an image and removed at unmount. The commands read
//! them (is this an fscache mount? what is mounted?); a worker reads the one of each image
//! memfd it is handed, for the store and cache to serve it from.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::REGISTRY_DIR;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registration {
    /// The image id, which is also the EROFS `fsid` and the bootstrap's cookie.
    pub fsid: String,
    /// Images of one domain share the cache files of blobs with the same tag.
    pub domain: Option<String>,
    /// The image: a file, or an image id in the store.
    pub image: String,
    /// The store's URL and its mirrors' (see `MountSpec::store`).
    pub store: String,
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// phoenixfs's chunk cache (the kernel's cache files are elsewhere).
    pub cache_dir: PathBuf,
    pub cache_limit: u64,
    pub mountpoint: PathBuf,
}

impl Registration {
    /// The EROFS volume key the kernel opens this image's objects under.
    pub fn volume_key(&self) -> String {
        format!("erofs,{}", self.domain.as_deref().unwrap_or(&self.fsid))
    }

    /// The mount(2) options that make EROFS mount this image over fscache.
    pub fn mount_options(&self) -> String {
        match &self.domain {
            Some(domain) => format!("fsid={},domain_id={domain}", self.fsid),
            None => format!("fsid={}", self.fsid),
        }
    }
}

fn file_for(mountpoint: &Path) -> PathBuf {
    let digest = Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    Path::new(REGISTRY_DIR).join(format!("{}.json", hex::encode(&digest[..8])))
}

/// Records `registration`, replacing any for the same mountpoint (atomically: a worker reading
/// the directory never sees half a file).
pub fn save(registration: &Registration) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(REGISTRY_DIR)?;
    let path = file_for(&registration.mountpoint);
    let partial = path.with_extension("partial");
    fs::write(&partial, serde_json::to_vec(registration).expect("registration serialises"))?;
    fs::rename(&partial, &path)
}

/// Forgets the image mounted at `mountpoint`; what it was, if anything.
pub fn remove(mountpoint: &Path) -> io::Result<Option<Registration>> {
    let path = file_for(mountpoint);
    let registration = read(&path);
    match fs::remove_file(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
        Ok(()) => Ok(registration),
    }
}

/// The registration of `mountpoint`, if there is one.
pub fn find(mountpoint: &Path) -> Option<Registration> {
    read(&file_for(mountpoint))
}

fn read(path: &Path) -> Option<Registration> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Every registered image; unreadable files are skipped.
pub fn all() -> Vec<Registration> {
    let Ok(dir) = fs::read_dir(REGISTRY_DIR) else { return Vec::new() };
    let mut registrations: Vec<Registration> =
        dir.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "json")).filter_map(|e| read(&e.path())).collect();
    registrations.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    registrations
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_and_volume_keys_follow_the_domain() {
        let mut registration = Registration {
            fsid: "ab".repeat(32),
            domain: None,
            image: "/images/x".into(),
            store: "/store".into(),
            mirrors: Vec::new(),
            cache_dir: "/cache".into(),
            cache_limit: 1 << 30,
            mountpoint: "/mnt/x".into(),
        };
        assert_eq!(registration.mount_options(), format!("fsid={}", "ab".repeat(32)));
        assert_eq!(registration.volume_key(), format!("erofs,{}", "ab".repeat(32)));
        registration.domain = Some("team".into());
        assert_eq!(registration.mount_options(), format!("fsid={},domain_id=team", "ab".repeat(32)));
        assert_eq!(registration.volume_key(), "erofs,team");
    }
}
