//! The image file: bootstrap, chunk table, metadata, footer; named by the sha256 of all its
//! bytes.
//!
//! ```text
//! footer (last 64 bytes)  magic "PHXIMAGE", version u32, metadata_len u32,
//!                         bootstrap_len u64, table_len u64, sha256 of all bytes before the footer
//! ```
//!
//! Version 1 has no metadata (the field is zero). Version 2 has `metadata_len` bytes between
//! the table and the footer: what the builder recorded about the image's origin (a converted
//! OCI image's manifest digest and config, as UTF-8 JSON), opaque to this crate and never
//! read by a mount. Images without metadata are written as version 1, so their ids do not
//! change.
//!
//! The footer's own checksum lets a file read from a path (which has no id to check against)
//! prove it is whole; an image fetched by id is also checked against the id.
//!
//! Two ways to open image file bytes:
//! - [`ImageFile::decode`] trusts nothing: it hashes every byte and reads every chunk table
//!   entry. Anything read from a file, a store or a network goes through it, once.
//! - [`ImageFile::from_verified`] opens bytes that `decode` has already proven, such as a
//!   read-only mapping of the sealed memfd a holder wrote after decoding, in constant time:
//!   it reads the footer, the superblock block and the table header, and nothing else. Every
//!   accessor still checks what it reads, so bytes that were not in fact verified can cost
//!   errors and wrong answers, never a panic.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::bytes::ImageBytes;
use crate::chunk::{ChunkTable, ChunkTableView, Digest};
use crate::error::FormatError;
use crate::layout::{le32, le64, BLOCK_SIZE};
use crate::reader::Bootstrap;

const FOOTER_MAGIC: &[u8; 8] = b"PHXIMAGE";
const FOOTER_VERSION: u32 = 1;
const FOOTER_VERSION_METADATA: u32 = 2;
pub const FOOTER_SIZE: usize = 64;

/// An image's name: the sha256 of its image file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ImageId(pub Digest);

impl ImageId {
    pub fn of(image_file: &[u8]) -> Self {
        ImageId(Digest::of(image_file))
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for ImageId {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(ImageId)
    }
}

/// An opened image file: its bootstrap and chunk table are views of its one shared buffer.
#[derive(Debug, Clone)]
pub struct ImageFile {
    pub id: ImageId,
    pub bootstrap: Bootstrap,
    pub table: ChunkTableView,
    bytes: ImageBytes,
    /// Where the metadata is in `bytes` (empty for version 1).
    metadata: std::ops::Range<usize>,
}

/// What the footer says, checked against the length of the bytes it ends.
struct Footer {
    bootstrap_len: usize,
    table_len: usize,
    metadata_len: usize,
    checksum: [u8; 32],
}

impl Footer {
    fn read(image_file: &[u8]) -> Result<Self, FormatError> {
        let len = image_file.len();
        let Some(body_len) = len.checked_sub(FOOTER_SIZE) else {
            return Err(FormatError::Truncated { what: "image footer", start: 0, end: FOOTER_SIZE as u64, len: len as u64 });
        };
        let footer = &image_file[body_len..];
        if &footer[..8] != FOOTER_MAGIC {
            return Err(FormatError::BadMagic { what: "image footer" });
        }
        let metadata_len = le32(footer, 12);
        match le32(footer, 8) {
            FOOTER_VERSION if metadata_len != 0 => return Err(FormatError::corrupt("image footer", "reserved bytes are not zero")),
            FOOTER_VERSION_METADATA if metadata_len == 0 => return Err(FormatError::corrupt("image footer", "version 2 without metadata")),
            FOOTER_VERSION | FOOTER_VERSION_METADATA => {}
            version => return Err(FormatError::Unsupported { what: "image version", value: version.into() }),
        }
        let (bootstrap_len, table_len) = (le64(footer, 16), le64(footer, 24));
        let total = bootstrap_len.checked_add(table_len).and_then(|n| n.checked_add(metadata_len.into()));
        if total != Some(body_len as u64) || bootstrap_len % BLOCK_SIZE as u64 != 0 {
            return Err(FormatError::corrupt("image footer", format!("lengths {bootstrap_len} + {table_len} + {metadata_len} != {body_len}")));
        }
        Ok(Footer {
            bootstrap_len: bootstrap_len as usize,
            table_len: table_len as usize,
            metadata_len: metadata_len as usize,
            checksum: footer[32..64].try_into().expect("32 bytes"),
        })
    }
}

impl ImageFile {
    /// Joins a bootstrap and its chunk table into image file bytes.
    pub fn encode(bootstrap: &[u8], table: &ChunkTable) -> Vec<u8> {
        Self::encode_with_metadata(bootstrap, table, &[]).expect("no metadata is not too much")
    }

    /// Joins a bootstrap, its chunk table and `metadata` (none: a version 1 image) into image
    /// file bytes; None if the metadata is 4 GiB or more.
    pub fn encode_with_metadata(bootstrap: &[u8], table: &ChunkTable, metadata: &[u8]) -> Option<Vec<u8>> {
        debug_assert_eq!(bootstrap.len() % BLOCK_SIZE, 0);
        let metadata_len = u32::try_from(metadata.len()).ok()?;
        let version = if metadata.is_empty() { FOOTER_VERSION } else { FOOTER_VERSION_METADATA };
        let table = table.encode();
        let mut out = Vec::with_capacity(bootstrap.len() + table.len() + metadata.len() + FOOTER_SIZE);
        out.extend_from_slice(bootstrap);
        out.extend_from_slice(&table);
        out.extend_from_slice(metadata);
        let checksum = Digest::of(&out);
        out.extend_from_slice(FOOTER_MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&metadata_len.to_le_bytes());
        out.extend_from_slice(&(bootstrap.len() as u64).to_le_bytes());
        out.extend_from_slice(&(table.len() as u64).to_le_bytes());
        out.extend_from_slice(&checksum.0);
        Some(out)
    }

    /// Opens and proves image file bytes of unknown origin: footer, checksum, every chunk table
    /// entry, and that the bootstrap's blob is this table's; the id is the sha256 of `bytes`.
    /// One sha256 pass over the file gives both checksum and id, a second one over the table
    /// its blob tag.
    pub fn decode(bytes: impl Into<ImageBytes>) -> Result<Self, FormatError> {
        let bytes = bytes.into();
        let file: &[u8] = &bytes;
        let footer = Footer::read(file)?;
        let body_len = footer.bootstrap_len + footer.table_len + footer.metadata_len;
        let mut hasher = Sha256::new();
        hasher.update(&file[..body_len]);
        if hasher.clone().finalize()[..] != footer.checksum {
            return Err(FormatError::Checksum { what: "image file" });
        }
        hasher.update(&file[body_len..]);
        let id = ImageId(Digest(hasher.finalize().into()));
        let image = ImageFile::open(bytes, id, &footer)?;
        for entry in image.table.entries() {
            entry?;
        }
        if let Some((tag, _)) = image.bootstrap.blob() {
            if *tag != image.table.blob_tag() {
                return Err(FormatError::corrupt("image", "bootstrap names another chunk table"));
            }
        }
        Ok(image)
    }

    /// Opens image file bytes named `id` that [`ImageFile::decode`] has already proven (the
    /// caller vouches for both), in constant time: no hashing, no copy, no work per inode or
    /// chunk. It checks what it reads (footer, superblock, device slot, table header, blob
    /// size); all else is checked when read, so unproven bytes give errors, never a panic.
    pub fn from_verified(bytes: impl Into<ImageBytes>, id: ImageId) -> Result<Self, FormatError> {
        let bytes = bytes.into();
        let footer = Footer::read(&bytes)?;
        ImageFile::open(bytes, id, &footer)
    }

    /// The whole image file, as opened: what a verifier hands on to [`ImageFile::from_verified`].
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// What the builder recorded about the image's origin (empty if nothing).
    pub fn metadata(&self) -> &[u8] {
        &self.bytes[self.metadata.clone()]
    }

    /// Everything both ways of opening check: the structure of the bytes, in constant time.
    fn open(bytes: ImageBytes, id: ImageId, footer: &Footer) -> Result<Self, FormatError> {
        let table_end = footer.bootstrap_len + footer.table_len;
        let metadata = table_end..table_end + footer.metadata_len;
        let part = |range: std::ops::Range<usize>, what| {
            bytes.slice(range.clone()).ok_or(FormatError::Truncated {
                what,
                start: range.start as u64,
                end: range.end as u64,
                len: bytes.len() as u64,
            })
        };
        let table = ChunkTableView::new(part(footer.bootstrap_len..table_end, "chunk table")?)?;
        let bootstrap = Bootstrap::new(part(0..footer.bootstrap_len, "bootstrap")?)?;
        match bootstrap.blob() {
            Some((_, blob_len)) if blob_len != table.blob_len() => {
                return Err(FormatError::corrupt("image", "blob size does not match the chunk table"));
            }
            None if !table.is_empty() => {
                return Err(FormatError::corrupt("image", "chunk table without a blob device"));
            }
            _ => {}
        }
        Ok(ImageFile { id, bootstrap, table, bytes, metadata })
    }
}
