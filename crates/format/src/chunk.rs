//! Chunks and the chunk table.
//!
//! A chunk is at most one chunk-size of file data, named by the sha256 of its uncompressed
//! bytes. It is stored zstd-compressed, or raw when compression saves less than 1/32 (then
//! decompression would cost more than the bytes saved). Blob chunk i of an image is entry i of
//! its chunk table:
//!
//! ```text
//! header  16 bytes  magic "PXCHUNKS", version u16 = 1, chunk_bits u8, reserved u8, count u32
//! entry   48 bytes  sha256 [32], length u32, stored_length u32, compression u8, reserved [7]
//! ```

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::FormatError;
use crate::layout::le32;

pub const MIN_CHUNK_BITS: u8 = 12;
pub const MAX_CHUNK_BITS: u8 = 26;
pub const DEFAULT_CHUNK_BITS: u8 = 20;
const TABLE_MAGIC: &[u8; 8] = b"PXCHUNKS";
const TABLE_VERSION: u16 = 1;
const TABLE_HEADER_SIZE: usize = 16;
const ENTRY_SIZE: usize = 48;

/// A sha256 digest: the name of a chunk, and of an image.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| FormatError::corrupt("digest", format!("{s:?} is not 64 hex digits")))?;
        Ok(Digest(out))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkEntry {
    pub digest: Digest,
    /// Uncompressed length.
    pub length: u32,
    /// Length of the object in the store.
    pub stored_length: u32,
    pub compression: Compression,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkTable {
    pub chunk_bits: u8,
    pub entries: Vec<ChunkEntry>,
}

impl ChunkTable {
    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_bits
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(TABLE_HEADER_SIZE + self.entries.len() * ENTRY_SIZE);
        out.extend_from_slice(TABLE_MAGIC);
        out.extend_from_slice(&TABLE_VERSION.to_le_bytes());
        out.push(self.chunk_bits);
        out.push(0);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.digest.0);
            out.extend_from_slice(&e.length.to_le_bytes());
            out.extend_from_slice(&e.stored_length.to_le_bytes());
            out.push(e.compression as u8);
            out.extend_from_slice(&[0u8; 7]);
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let bad = |detail: String| FormatError::corrupt("chunk table", detail);
        let header = crate::layout::slice_at(b, 0, TABLE_HEADER_SIZE as u64, "chunk table")?;
        if &header[..8] != TABLE_MAGIC {
            return Err(FormatError::BadMagic { what: "chunk table" });
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != TABLE_VERSION {
            return Err(FormatError::Unsupported { what: "chunk table version", value: version.into() });
        }
        if header[11] != 0 {
            return Err(bad("reserved header byte is not zero".into()));
        }
        let chunk_bits = header[10];
        if !(MIN_CHUNK_BITS..=MAX_CHUNK_BITS).contains(&chunk_bits) {
            return Err(FormatError::Unsupported { what: "chunk size bits", value: chunk_bits.into() });
        }
        let count = le32(header, 12) as usize;
        let body = &b[TABLE_HEADER_SIZE..];
        if count.checked_mul(ENTRY_SIZE) != Some(body.len()) {
            return Err(bad(format!("{count} entries need {} bytes, have {}", count.saturating_mul(ENTRY_SIZE), body.len())));
        }
        let chunk_size = 1u64 << chunk_bits;
        let mut entries = Vec::with_capacity(count);
        for (i, e) in body.chunks_exact(ENTRY_SIZE).enumerate() {
            let entry = ChunkEntry {
                digest: Digest(e[..32].try_into().expect("32 bytes")),
                length: le32(e, 32),
                stored_length: le32(e, 36),
                compression: match e[40] {
                    0 => Compression::None,
                    1 => Compression::Zstd,
                    other => return Err(bad(format!("entry {i} has compression {other}"))),
                },
            };
            if e[41..].iter().any(|&b| b != 0) {
                return Err(bad(format!("entry {i} has non-zero reserved bytes")));
            }
            let raw_mismatch = entry.compression == Compression::None && entry.stored_length != entry.length;
            if entry.length == 0 || u64::from(entry.length) > chunk_size || entry.stored_length == 0 || raw_mismatch {
                return Err(bad(format!("entry {i} has length {} stored as {}", entry.length, entry.stored_length)));
            }
            entries.push(entry);
        }
        Ok(ChunkTable { chunk_bits, entries })
    }

    /// The blob id: hex sha256 of the encoded table, as the bootstrap's device tag.
    pub fn blob_tag(&self) -> [u8; 64] {
        Digest::of(&self.encode()).to_hex().into_bytes().try_into().expect("64 hex digits")
    }
}

/// Compresses one chunk for storage (zstd at `level`), or keeps it raw when that saves little.
pub fn encode_chunk(data: &[u8], level: i32) -> (Compression, Vec<u8>) {
    match zstd::bulk::compress(data, level) {
        Ok(packed) if packed.len() < data.len() - data.len() / 32 => (Compression::Zstd, packed),
        _ => (Compression::None, data.to_vec()),
    }
}

/// Decodes a stored chunk and proves it is the one `entry` names: lengths and sha256.
pub fn decode_chunk(entry: &ChunkEntry, stored: &[u8]) -> Result<Vec<u8>, FormatError> {
    let bad = |detail: String| FormatError::ChunkCorrupt { digest: entry.digest.to_hex(), detail };
    if stored.len() != entry.stored_length as usize {
        return Err(bad(format!("stored length {} instead of {}", stored.len(), entry.stored_length)));
    }
    let data = match entry.compression {
        Compression::None => stored.to_vec(),
        Compression::Zstd => zstd::bulk::decompress(stored, entry.length as usize)
            .map_err(|e| bad(format!("zstd: {e}")))?,
    };
    if data.len() != entry.length as usize {
        return Err(bad(format!("length {} instead of {}", data.len(), entry.length)));
    }
    if Digest::of(&data) != entry.digest {
        return Err(bad("sha256 mismatch".into()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry_for(data: &[u8]) -> (ChunkEntry, Vec<u8>) {
        let (compression, stored) = encode_chunk(data, 3);
        let entry = ChunkEntry {
            digest: Digest::of(data),
            length: data.len() as u32,
            stored_length: stored.len() as u32,
            compression,
        };
        (entry, stored)
    }

    #[test]
    fn compressible_chunks_are_zstd_and_random_ones_raw() {
        let (entry, stored) = entry_for(&[7u8; 100_000]);
        assert_eq!(entry.compression, Compression::Zstd);
        assert_eq!(decode_chunk(&entry, &stored).unwrap(), vec![7u8; 100_000]);
        let random: Vec<u8> = (0..2048u32).flat_map(|i| Digest::of(&i.to_le_bytes()).0).collect();
        let (entry, stored) = entry_for(&random);
        assert_eq!(entry.compression, Compression::None);
        assert_eq!(stored, random);
    }

    #[test]
    fn flipped_bytes_in_a_stored_chunk_are_caught() {
        let data = b"hello chunk".repeat(1000);
        let (entry, mut stored) = entry_for(&data);
        let last = stored.len() - 1;
        stored[last] ^= 0x40;
        assert!(matches!(decode_chunk(&entry, &stored), Err(FormatError::ChunkCorrupt { .. })));
        assert!(decode_chunk(&entry, &stored[..last]).is_err());
    }

    #[test]
    fn digests_parse_from_hex() {
        let d = Digest::of(b"x");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!("zz".parse::<Digest>().is_err());
    }

    proptest! {
        #[test]
        fn table_round_trips(lengths in proptest::collection::vec(1u32..=4096, 0..50)) {
            let table = ChunkTable {
                chunk_bits: 12,
                entries: lengths.iter().map(|&l| ChunkEntry {
                    digest: Digest::of(&l.to_le_bytes()),
                    length: l,
                    stored_length: l,
                    compression: Compression::None,
                }).collect(),
            };
            prop_assert_eq!(ChunkTable::decode(&table.encode()).unwrap(), table);
        }

        #[test]
        fn garbage_tables_are_rejected_not_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = ChunkTable::decode(&bytes);
        }

        #[test]
        fn mutated_tables_never_panic(flip in 0usize..(16 + 48 * 3), bit in 0u8..8, cut in 0usize..(16 + 48 * 3)) {
            let table = ChunkTable {
                chunk_bits: 20,
                entries: (1..=3u32).map(|l| ChunkEntry {
                    digest: Digest::of(&l.to_le_bytes()),
                    length: l * 100,
                    stored_length: l * 50,
                    compression: Compression::Zstd,
                }).collect(),
            };
            let mut bytes = table.encode();
            bytes[flip] ^= 1 << bit;
            let _ = ChunkTable::decode(&bytes);
            prop_assert!(ChunkTable::decode(&table.encode()[..cut]).is_err());
        }
    }
}
