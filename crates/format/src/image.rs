//! The image file: bootstrap, chunk table, footer; named by the sha256 of all its bytes.
//!
//! ```text
//! footer (last 64 bytes)  magic "PHXIMAGE", version u32 = 1, reserved u32,
//!                         bootstrap_len u64, table_len u64, sha256 of all bytes before the footer
//! ```
//!
//! The footer's own checksum lets a file read from a path (which has no id to check against)
//! prove it is whole; an image fetched by id is also checked against the id.

use std::fmt;
use std::str::FromStr;

use crate::chunk::{ChunkTable, Digest};
use crate::error::FormatError;
use crate::layout::{le32, le64, BLOCK_SIZE};
use crate::reader::Bootstrap;

const FOOTER_MAGIC: &[u8; 8] = b"PHXIMAGE";
const FOOTER_VERSION: u32 = 1;
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

/// A decoded image file.
#[derive(Debug, Clone)]
pub struct ImageFile {
    pub id: ImageId,
    pub bootstrap: Bootstrap,
    pub table: ChunkTable,
}

impl ImageFile {
    /// Joins a bootstrap and its chunk table into image file bytes.
    pub fn encode(bootstrap: &[u8], table: &ChunkTable) -> Vec<u8> {
        debug_assert_eq!(bootstrap.len() % BLOCK_SIZE, 0);
        let table = table.encode();
        let mut out = Vec::with_capacity(bootstrap.len() + table.len() + FOOTER_SIZE);
        out.extend_from_slice(bootstrap);
        out.extend_from_slice(&table);
        let checksum = Digest::of(&out);
        out.extend_from_slice(FOOTER_MAGIC);
        out.extend_from_slice(&FOOTER_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(bootstrap.len() as u64).to_le_bytes());
        out.extend_from_slice(&(table.len() as u64).to_le_bytes());
        out.extend_from_slice(&checksum.0);
        out
    }

    /// Parses and checks image file bytes: footer, checksum, bootstrap, table, and that the
    /// bootstrap's blob is this table's.
    pub fn decode(mut bytes: Vec<u8>) -> Result<Self, FormatError> {
        let id = ImageId::of(&bytes);
        let len = bytes.len();
        if len < FOOTER_SIZE {
            return Err(FormatError::Truncated { what: "image footer", start: 0, end: FOOTER_SIZE as u64, len: len as u64 });
        }
        let body_len = len - FOOTER_SIZE;
        let footer = &bytes[body_len..];
        if &footer[..8] != FOOTER_MAGIC {
            return Err(FormatError::BadMagic { what: "image footer" });
        }
        if le32(footer, 8) != FOOTER_VERSION {
            return Err(FormatError::Unsupported { what: "image version", value: le32(footer, 8).into() });
        }
        if le32(footer, 12) != 0 {
            return Err(FormatError::corrupt("image footer", "reserved bytes are not zero"));
        }
        let (bootstrap_len, table_len) = (le64(footer, 16), le64(footer, 24));
        if bootstrap_len.checked_add(table_len) != Some(body_len as u64) || bootstrap_len % BLOCK_SIZE as u64 != 0 {
            return Err(FormatError::corrupt("image footer", format!("lengths {bootstrap_len} + {table_len} != {body_len}")));
        }
        if Digest::of(&bytes[..body_len]).0 != footer[32..64] {
            return Err(FormatError::Checksum { what: "image file" });
        }
        let table = ChunkTable::decode(&bytes[bootstrap_len as usize..body_len])?;
        bytes.truncate(bootstrap_len as usize);
        let bootstrap = Bootstrap::new(bytes)?;
        match bootstrap.blob() {
            Some((tag, blob_len)) => {
                if *tag != table.blob_tag() {
                    return Err(FormatError::corrupt("image", "bootstrap names another chunk table"));
                }
                if blob_len != (table.entries.len() as u64) << table.chunk_bits {
                    return Err(FormatError::corrupt("image", "blob size does not match the chunk table"));
                }
            }
            None if !table.entries.is_empty() => {
                return Err(FormatError::corrupt("image", "chunk table without a blob device"));
            }
            None => {}
        }
        Ok(ImageFile { id, bootstrap, table })
    }
}
