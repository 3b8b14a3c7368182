//! The verified image every process of a mount shares. `mount` loads the image and verifies
//! it completely (checksum, id, chunk table) once, and copies it into a memfd sealed against
//! any change; the holder keeps the memfd for the mount's life and hands it on. Each worker
//! maps it read-only and builds its image from the mapping without reading, hashing or
//! copying it, so a takeover costs the same at any image size, and all worker generations
//! share one copy of the image in memory.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use phoenixfs_format::{ImageBytes, ImageFile, ImageId, InodeKind};
use phoenixfs_store::{load_image, ChunkStore, Patient};
use tracing::info;

use crate::error::MountError;
use crate::spec::MountSpec;

/// Seals that make a memfd's content immutable for everyone, including us.
const IMMUTABLE: SealFlag = SealFlag::F_SEAL_WRITE.union(SealFlag::F_SEAL_SHRINK).union(SealFlag::F_SEAL_GROW).union(SealFlag::F_SEAL_SEAL);

/// How long mounting rides out a store that fails: then the mount fails, with the reason.
pub(crate) const MOUNT_PATIENCE: Duration = Duration::from_secs(10);

/// Loads and fully verifies the image `spec` names, and seals a copy of its bytes into a
/// memfd. Returns the memfd, the image's id and its chunk size.
/// Resolves `--passthrough auto` against the image on the way.
pub(crate) fn load_and_seal(spec: &mut MountSpec) -> Result<(OwnedFd, ImageId, usize), MountError> {
    let store = Patient::new(spec.open_store()?, MOUNT_PATIENCE);
    let image = load_image(&spec.image, Some(&store))?;
    probe_store(&store, &image)?;
    if spec.passthrough_auto && !passthrough_worth_it(&image, spec.passthrough_min) {
        info!("passthrough off: fewer than a quarter of the image's files are large enough for it");
        spec.passthrough_budget = 0;
    }
    let fd = seal(image.bytes()).map_err(|source| MountError::Io { what: "copying the image into memory".into(), source })?;
    Ok((fd, image.id, image.table.chunk_size() as usize))
}

/// Whether at least a quarter of the image's regular files are `min_size` or larger: passthrough
/// costs every open of every file a round trip to the daemon (the kernel sends no OPEN without
/// it), which only pays where large files are the rule (models, data set shards), not in a
/// tree of many small files such as a container's `/usr`.
fn passthrough_worth_it(image: &ImageFile, min_size: u64) -> bool {
    let Ok(entries) = image.bootstrap.walk() else { return false };
    let (mut files, mut large) = (0, 0);
    for (_, inode) in entries.iter().filter(|(_, inode)| inode.kind == InodeKind::File) {
        files += 1;
        large += usize::from(inode.size() >= min_size);
    }
    large > 0 && large * 4 >= files
}

/// Asks the store for the image's first chunk, so that a store that is wrong or down is a
/// mount that fails with its reason, not one that stalls its first reader.
pub(crate) fn probe_store(store: &dyn ChunkStore, image: &ImageFile) -> Result<(), MountError> {
    let Some(first) = image.table.entries().next() else { return Ok(()) };
    let first = first.map_err(|e| MountError::ImageMemory(e.to_string()))?;
    match store.chunk_len(&first) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(MountError::StoreLacks { store: store.location(), image: image.id.to_string(), chunk: first.digest.to_hex() }),
        Err(source) => Err(MountError::StoreDown { store: store.location(), source }),
    }
}

/// A copy of `bytes` in a memfd sealed against any change.
pub(crate) fn seal(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = memfd_create(c"phoenixfs-image", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)?;
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(IMMUTABLE))?;
    Ok(file.into())
}

/// The image in a sealed memfd that `load_and_seal` made, mapped read-only.
pub(crate) fn map(fd: &OwnedFd, id: ImageId) -> Result<ImageFile, MountError> {
    let bad = |detail: String| MountError::ImageMemory(detail);
    let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(|e| bad(format!("reading its seals: {e}")))?;
    if !SealFlag::from_bits_truncate(seals).contains(IMMUTABLE) {
        return Err(bad("it is not sealed against changes".into()));
    }
    // SAFETY: the memfd is sealed against writes, shrinking and growing (checked above), so
    // the mapped bytes can neither change under us nor vanish (no SIGBUS).
    let mapping = unsafe { memmap2::Mmap::map(fd) }.map_err(|e| bad(format!("mapping it: {e}")))?;
    // Verified when it was sealed: only its structure is checked again, in constant time.
    ImageFile::from_verified(ImageBytes::new(Arc::new(mapping)), id).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use phoenixfs_builder::{build, BuildOptions};
    use phoenixfs_store::MemoryStore;

    use super::*;

    fn image_bytes() -> (Vec<u8>, ImageId) {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("file"), vec![7u8; 300_000]).unwrap();
        let built = build(src.path(), &MemoryStore::new(), &BuildOptions::default()).unwrap();
        (built.image_file, built.id)
    }

    #[test]
    fn a_sealed_image_maps_as_the_image_it_was() {
        let (bytes, id) = image_bytes();
        let fd = seal(&bytes).unwrap();
        let image = map(&fd, id).unwrap();
        assert_eq!(image.id, id);
        assert!(image.bytes() == bytes.as_slice());
        // Nobody, not even its maker, can change it now.
        let mut file = File::from(fd.try_clone().unwrap());
        assert!(file.write_all(b"x").is_err());
        assert!(file.set_len(1).is_err());
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        let (bytes, id) = image_bytes();
        let fd = memfd_create(c"not-sealed", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        File::from(fd.try_clone().unwrap()).write_all(&bytes).unwrap();
        assert!(matches!(map(&fd, id), Err(MountError::ImageMemory(why)) if why.contains("not sealed")));
    }
}
