//! Chunks and the chunk table.
//!
//! A chunk is at most one chunk-size of file data, named by the sha256 of its uncompressed
//! bytes. It is stored zstd-compressed, or raw when compression saves less than 1/32 (then
//! decompression would cost more than the bytes saved). Blob chunk i of an image is entry i of
//! its chunk table:
//!
//! ```text
//! header  16 bytes  magic "PXCHUNKS", version u16 = 3, chunk_bits u8, reserved u8, count u32
//! entry  112 bytes  sha256 [32], length u32, stored_length u32, compression u8, reserved [7],
//!                   sha256 of the stored bytes [32], BLAKE3 of the stored bytes [32]
//! ```
//!
//! The stored bytes' sha256 (since version 2) lets a store that names objects by their content
//! (an OCI registry) find a chunk. Their BLAKE3 (version 3) is what a fetched chunk is checked
//! against: five times cheaper than sha256 here, and it proves the stored bytes before they are
//! decompressed. Since the table is part of the image, whose id is its sha256, a chunk that
//! matches its BLAKE3 is the chunk the image names. Version 1 (48-byte entries) and 2 (80)
//! tables are still read; their chunks are checked by sha256.
//!
//! A builder fills a [`ChunkTable`] and encodes it. A reader never decodes a whole table into
//! memory: it opens the encoded bytes in place as a [`ChunkTableView`] (header checked, O(1))
//! and decodes an entry when it needs it. [`ChunkTableView::locate`] is the one place a blob
//! offset becomes a chunk index and an offset within that chunk.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::bytes::ImageBytes;
use crate::error::FormatError;
use crate::layout::{le32, slice_at};

pub const MIN_CHUNK_BITS: u8 = 12;
pub const MAX_CHUNK_BITS: u8 = 26;
pub const DEFAULT_CHUNK_BITS: u8 = 20;
const TABLE_MAGIC: &[u8; 8] = b"PXCHUNKS";
const TABLE_VERSION: u16 = 3;
const TABLE_HEADER_SIZE: usize = 16;
const V1_ENTRY_SIZE: usize = 48;
const V2_ENTRY_SIZE: usize = 80;
const ENTRY_SIZE: usize = 112;

/// A 32-byte digest: sha256 (the name of a chunk, and of an image) unless a field says BLAKE3.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The sha256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    /// The BLAKE3 of `data`.
    pub fn blake3_of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
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
    /// The sha256 of the stored bytes; None in a version 1 table.
    pub stored_digest: Option<Digest>,
    /// The BLAKE3 of the stored bytes; None before version 3.
    pub check: Option<Digest>,
}

impl ChunkEntry {
    /// The entry of a chunk of `length` bytes whose sha256 is `digest`, stored as `stored`.
    pub fn new(digest: Digest, length: u32, compression: Compression, stored: &[u8]) -> Self {
        let stored_digest = match compression {
            Compression::None => digest,
            Compression::Zstd => Digest::of(stored),
        };
        ChunkEntry { digest, length, stored_length: stored.len() as u32, compression, stored_digest: Some(stored_digest), check: Some(Digest::blake3_of(stored)) }
    }

    /// What the chunk's verified content is known by in a cache: the digest it was checked
    /// against (its BLAKE3 when the table has one), so that bytes under one key were always
    /// proven by that key, whichever image brought them.
    pub fn cache_key(&self) -> Digest {
        self.check.unwrap_or(self.digest)
    }
}

/// A chunk table built in memory, to be encoded into an image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkTable {
    pub chunk_bits: u8,
    pub entries: Vec<ChunkEntry>,
}

impl ChunkTable {
    /// Encodes the newest version every entry has the digests for.
    pub fn encode(&self) -> Vec<u8> {
        let v2 = self.entries.iter().all(|e| e.stored_digest.is_some());
        let v3 = v2 && self.entries.iter().all(|e| e.check.is_some());
        let (version, entry_size) = match (v2, v3) {
            (_, true) => (TABLE_VERSION, ENTRY_SIZE),
            (true, false) => (2, V2_ENTRY_SIZE),
            (false, _) => (1, V1_ENTRY_SIZE),
        };
        let mut out = Vec::with_capacity(TABLE_HEADER_SIZE + self.entries.len() * entry_size);
        out.extend_from_slice(TABLE_MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.push(self.chunk_bits);
        out.push(0);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.digest.0);
            out.extend_from_slice(&e.length.to_le_bytes());
            out.extend_from_slice(&e.stored_length.to_le_bytes());
            out.push(e.compression as u8);
            out.extend_from_slice(&[0u8; 7]);
            if let (true, Some(stored)) = (v2, e.stored_digest) {
                out.extend_from_slice(&stored.0);
            }
            if let (true, Some(check)) = (v3, e.check) {
                out.extend_from_slice(&check.0);
            }
        }
        out
    }

    /// The blob id: hex sha256 of the encoded table, as the bootstrap's device tag.
    pub fn blob_tag(&self) -> [u8; 64] {
        blob_tag_of(&self.encode())
    }
}

fn blob_tag_of(encoded_table: &[u8]) -> [u8; 64] {
    Digest::of(encoded_table).to_hex().into_bytes().try_into().expect("64 hex digits")
}

/// Where one byte of the blob lives: `within` bytes into blob chunk `index`, whose table entry
/// is `entry`. `within` may lie beyond `entry.length` (the chunk's tail that reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLocation {
    pub index: usize,
    pub entry: ChunkEntry,
    pub within: usize,
}

/// A chunk table read in place from its encoded bytes, which stay shared with the image file.
///
/// Opening one checks only the header and that the entries exactly fill the bytes, so it costs
/// the same for ten entries or ten million; each entry is decoded and checked when it is read,
/// and a malformed one is an error then. [`ChunkTableView::entries`] reads them all, which is
/// how [`crate::ImageFile::decode`] proves a whole table sound.
#[derive(Debug, Clone)]
pub struct ChunkTableView {
    bytes: ImageBytes,
    chunk_bits: u8,
    len: usize,
    entry_size: usize,
}

impl ChunkTableView {
    /// Checks the header of the encoded table `bytes` (O(1)); entries are checked when read.
    pub fn new(bytes: ImageBytes) -> Result<Self, FormatError> {
        let bad = |detail: String| FormatError::corrupt("chunk table", detail);
        let header = slice_at(&bytes, 0, TABLE_HEADER_SIZE as u64, "chunk table")?;
        if &header[..8] != TABLE_MAGIC {
            return Err(FormatError::BadMagic { what: "chunk table" });
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        let entry_size = match version {
            1 => V1_ENTRY_SIZE,
            2 => V2_ENTRY_SIZE,
            TABLE_VERSION => ENTRY_SIZE,
            _ => return Err(FormatError::Unsupported { what: "chunk table version", value: version.into() }),
        };
        if header[11] != 0 {
            return Err(bad("reserved header byte is not zero".into()));
        }
        let chunk_bits = header[10];
        if !(MIN_CHUNK_BITS..=MAX_CHUNK_BITS).contains(&chunk_bits) {
            return Err(FormatError::Unsupported { what: "chunk size bits", value: chunk_bits.into() });
        }
        let len = le32(header, 12) as usize;
        let body_len = bytes.len().saturating_sub(TABLE_HEADER_SIZE);
        if len.checked_mul(entry_size) != Some(body_len) {
            return Err(bad(format!("{len} entries need {} bytes, have {body_len}", len.saturating_mul(entry_size))));
        }
        Ok(ChunkTableView { bytes, chunk_bits, len, entry_size })
    }

    pub fn chunk_bits(&self) -> u8 {
        self.chunk_bits
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_bits
    }

    /// Number of entries: blob chunks.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of the blob's address space: every chunk counted at the full chunk size.
    pub fn blob_len(&self) -> u64 {
        (self.len as u64) << self.chunk_bits
    }

    /// Entry `index`, decoded and checked.
    pub fn entry(&self, index: usize) -> Result<ChunkEntry, FormatError> {
        if index >= self.len {
            return Err(FormatError::corrupt("chunk table", format!("no entry {index} in a table of {}", self.len)));
        }
        let at = (TABLE_HEADER_SIZE + index * self.entry_size) as u64;
        decode_entry(slice_at(&self.bytes, at, self.entry_size as u64, "chunk table entry")?, self.chunk_bits, index)
    }

    /// Every entry in blob order, each decoded and checked as it is reached.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = Result<ChunkEntry, FormatError>> + '_ {
        (0..self.len).map(|index| self.entry(index))
    }

    /// The chunk holding blob byte `blob_offset`, and where in it: the one place a blob offset
    /// becomes a chunk. An offset beyond the table is an error, as is a malformed entry.
    pub fn locate(&self, blob_offset: u64) -> Result<ChunkLocation, FormatError> {
        let index = blob_offset >> self.chunk_bits;
        if index >= self.len as u64 {
            return Err(FormatError::BeyondBlob { offset: blob_offset, blob_len: self.blob_len() });
        }
        let within = (blob_offset & (self.chunk_size() - 1)) as usize;
        let index = index as usize;
        Ok(ChunkLocation { index, entry: self.entry(index)?, within })
    }

    /// The blob id this table must be named by: hashes the whole table.
    pub fn blob_tag(&self) -> [u8; 64] {
        blob_tag_of(&self.bytes)
    }
}

/// Decodes and checks the encoded entry `e` (48 bytes: version 1; 80: version 2; 112: 3), entry
/// `index` of a table of `chunk_bits`.
fn decode_entry(e: &[u8], chunk_bits: u8, index: usize) -> Result<ChunkEntry, FormatError> {
    let bad = |detail: String| FormatError::corrupt("chunk table", detail);
    let entry = ChunkEntry {
        digest: Digest(e[..32].try_into().expect("32 bytes")),
        length: le32(e, 32),
        stored_length: le32(e, 36),
        compression: match e[40] {
            0 => Compression::None,
            1 => Compression::Zstd,
            other => return Err(bad(format!("entry {index} has compression {other}"))),
        },
        stored_digest: (e.len() >= V2_ENTRY_SIZE).then(|| Digest(e[V1_ENTRY_SIZE..V2_ENTRY_SIZE].try_into().expect("32 bytes"))),
        check: (e.len() == ENTRY_SIZE).then(|| Digest(e[V2_ENTRY_SIZE..].try_into().expect("32 bytes"))),
    };
    if e[41..V1_ENTRY_SIZE].iter().any(|&b| b != 0) {
        return Err(bad(format!("entry {index} has non-zero reserved bytes")));
    }
    let raw = entry.compression == Compression::None;
    if raw && entry.stored_digest.is_some_and(|d| d != entry.digest) {
        return Err(bad(format!("entry {index} is raw but its stored bytes have another sha256")));
    }
    let raw_mismatch = raw && entry.stored_length != entry.length;
    if entry.length == 0 || u64::from(entry.length) > 1u64 << chunk_bits || entry.stored_length == 0 || raw_mismatch {
        return Err(bad(format!("entry {index} has length {} stored as {}", entry.length, entry.stored_length)));
    }
    Ok(entry)
}

/// Compresses one chunk for storage (zstd at `level`), or keeps it raw when that saves little.
pub fn encode_chunk(data: &[u8], level: i32) -> (Compression, Vec<u8>) {
    match zstd::bulk::compress(data, level) {
        Ok(packed) if packed.len() < data.len() - data.len() / 32 => (Compression::Zstd, packed),
        _ => (Compression::None, data.to_vec()),
    }
}

/// Decodes a stored chunk and proves it is the one `entry` names: its lengths, and the
/// BLAKE3 of the stored bytes (version 3) or else the sha256 of the data.
pub fn decode_chunk(entry: &ChunkEntry, stored: &[u8]) -> Result<Vec<u8>, FormatError> {
    decode(entry, Cow::Borrowed(stored))
}

/// [`decode_chunk`] of bytes the caller gives up: a raw chunk is verified in place, not copied.
pub fn decode_chunk_owned(entry: &ChunkEntry, stored: Vec<u8>) -> Result<Vec<u8>, FormatError> {
    decode(entry, Cow::Owned(stored))
}

fn decode(entry: &ChunkEntry, stored: Cow<'_, [u8]>) -> Result<Vec<u8>, FormatError> {
    let bad = |detail: String| FormatError::ChunkCorrupt { digest: entry.digest.to_hex(), detail };
    if stored.len() != entry.stored_length as usize {
        return Err(bad(format!("stored length {} instead of {}", stored.len(), entry.stored_length)));
    }
    // Proven stored bytes need no second check after decompression, which is deterministic.
    let proven = match entry.check {
        Some(check) if Digest::blake3_of(&stored) != check => return Err(bad("BLAKE3 of the stored bytes mismatch".into())),
        Some(_) => true,
        None => false,
    };
    let data = match entry.compression {
        Compression::None => stored.into_owned(),
        Compression::Zstd => {
            if !proven && entry.stored_digest.is_some_and(|d| d != Digest::of(&stored)) {
                return Err(bad("sha256 of the stored bytes mismatch".into()));
            }
            zstd::bulk::decompress(&stored, entry.length as usize).map_err(|e| bad(format!("zstd: {e}")))?
        }
    };
    if data.len() != entry.length as usize {
        return Err(bad(format!("length {} instead of {}", data.len(), entry.length)));
    }
    if !proven && Digest::of(&data) != entry.digest {
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
        (ChunkEntry::new(Digest::of(data), data.len() as u32, compression, &stored), stored)
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
        // Older entries: by the stored bytes' sha256 (version 2), after decoding (version 1).
        let v2 = ChunkEntry { check: None, ..entry };
        assert!(matches!(decode_chunk(&v2, &stored), Err(FormatError::ChunkCorrupt { .. })));
        let v1 = ChunkEntry { stored_digest: None, ..v2 };
        assert!(matches!(decode_chunk(&v1, &stored), Err(FormatError::ChunkCorrupt { .. })));
    }

    #[test]
    fn every_version_of_an_entry_decodes_its_good_chunk() {
        for data in [b"hello chunk".repeat(1000), (0..2048u32).flat_map(|i| Digest::of(&i.to_le_bytes()).0).collect()] {
            let (v3, stored) = entry_for(&data);
            let v2 = ChunkEntry { check: None, ..v3 };
            let v1 = ChunkEntry { stored_digest: None, ..v2 };
            for entry in [v3, v2, v1] {
                assert_eq!(decode_chunk(&entry, &stored).unwrap(), data);
                assert_eq!(decode_chunk_owned(&entry, stored.clone()).unwrap(), data);
            }
            assert_eq!(v3.cache_key(), Digest::blake3_of(&stored));
            assert_eq!(v2.cache_key(), v2.digest);
        }
    }

    #[test]
    fn digests_parse_from_hex() {
        let d = Digest::of(b"x");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!("zz".parse::<Digest>().is_err());
    }

    /// A version 3 table of raw entries of `lengths`.
    fn table_of(chunk_bits: u8, lengths: &[u32]) -> ChunkTable {
        ChunkTable {
            chunk_bits,
            entries: lengths
                .iter()
                .enumerate()
                .map(|(i, &length)| ChunkEntry {
                    digest: Digest::of(&(i as u64).to_le_bytes()),
                    length,
                    stored_length: length,
                    compression: Compression::None,
                    stored_digest: Some(Digest::of(&(i as u64).to_le_bytes())),
                    check: Some(Digest::blake3_of(&(i as u64).to_le_bytes())),
                })
                .collect(),
        }
    }

    #[test]
    fn older_tables_still_read_without_the_newer_digests() {
        let mut table = table_of(12, &[4096, 100]);
        for (version, entry_size) in [(3, ENTRY_SIZE), (2, V2_ENTRY_SIZE), (1, V1_ENTRY_SIZE)] {
            match version {
                2 => table.entries.iter_mut().for_each(|e| e.check = None),
                1 => table.entries.iter_mut().for_each(|e| e.stored_digest = None),
                _ => {}
            }
            let bytes = table.encode();
            assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), version);
            assert_eq!(bytes.len(), TABLE_HEADER_SIZE + 2 * entry_size);
            assert_eq!(view_of(&table).entries().collect::<Result<Vec<_>, _>>().unwrap(), table.entries);
        }
    }

    #[test]
    fn a_raw_entry_whose_stored_sha256_is_not_its_own_is_malformed() {
        let mut table = table_of(12, &[4096]);
        table.entries[0].stored_digest = Some(Digest::of(b"other"));
        assert!(matches!(view_of(&table).entry(0), Err(FormatError::Corrupt { .. })));
    }

    fn view_of(table: &ChunkTable) -> ChunkTableView {
        ChunkTableView::new(table.encode().into()).unwrap()
    }

    /// Reads every entry and locates offsets all over (and past) the blob; errors are fine.
    fn read_everything(view: &ChunkTableView) {
        let _ = view.entries().collect::<Vec<_>>();
        let _ = view.entry(view.len());
        for offset in [0, view.chunk_size() - 1, view.chunk_size(), view.blob_len().saturating_sub(1), view.blob_len(), u64::MAX] {
            let _ = view.locate(offset);
        }
    }

    #[test]
    fn locate_finds_chunk_boundaries_and_refuses_offsets_past_the_blob() {
        let table = table_of(12, &[4096, 4096, 100]);
        let view = view_of(&table);
        let at = |offset| view.locate(offset).map(|l| (l.index, l.within, l.entry));
        assert_eq!(at(0), Ok((0, 0, table.entries[0])));
        assert_eq!(at(4095), Ok((0, 4095, table.entries[0])));
        assert_eq!(at(4096), Ok((1, 0, table.entries[1])));
        assert_eq!(at(2 * 4096 + 99), Ok((2, 99, table.entries[2])));
        // Past the last chunk's data but inside its chunk-size slot: its zero tail.
        assert_eq!(at(3 * 4096 - 1), Ok((2, 4095, table.entries[2])));
        for past in [3 * 4096, 3 * 4096 + 1, 1 << 40, u64::MAX] {
            assert_eq!(view.locate(past), Err(FormatError::BeyondBlob { offset: past, blob_len: 3 * 4096 }));
        }
        let empty = view_of(&table_of(20, &[]));
        assert!(empty.is_empty());
        assert_eq!(empty.locate(0), Err(FormatError::BeyondBlob { offset: 0, blob_len: 0 }));
    }

    #[test]
    fn a_malformed_entry_is_an_error_when_met_and_its_neighbours_still_read() {
        let table = table_of(12, &[4096, 4096, 4096]);
        let mut bytes = table.encode();
        bytes[TABLE_HEADER_SIZE + ENTRY_SIZE + 40] = 9;
        let view = ChunkTableView::new(bytes.into()).unwrap();
        assert_eq!(view.entry(0), Ok(table.entries[0]));
        assert!(matches!(view.entry(1), Err(FormatError::Corrupt { .. })));
        assert!(matches!(view.locate(4096 + 5), Err(FormatError::Corrupt { .. })));
        assert_eq!(view.locate(2 * 4096).map(|l| l.entry), Ok(table.entries[2]));
        assert!(view.entries().any(|e| e.is_err()));
        assert!(view.entry(3).is_err());
    }

    proptest! {
        #[test]
        fn table_round_trips(lengths in proptest::collection::vec(1u32..=4096, 0..50)) {
            let table = table_of(12, &lengths);
            let view = view_of(&table);
            prop_assert_eq!(view.chunk_bits(), 12);
            prop_assert_eq!(view.len(), lengths.len());
            prop_assert_eq!(view.entries().collect::<Result<Vec<_>, _>>().unwrap(), table.entries.clone());
            prop_assert_eq!(view.blob_tag(), table.blob_tag());
        }

        /// The index and offset within recompose the blob offset (checked with division, not
        /// with the shifts `locate` uses); offsets past the blob are refused.
        #[test]
        fn locate_recomposes_every_offset(
            chunk_bits in MIN_CHUNK_BITS..=MAX_CHUNK_BITS,
            count in 0usize..40,
            raw in any::<u64>(),
            anywhere in any::<bool>(),
        ) {
            let chunk_size = 1u64 << chunk_bits;
            let lengths: Vec<u32> = (0..count).map(|i| (chunk_size - i as u64 % chunk_size) as u32).collect();
            let table = table_of(chunk_bits, &lengths);
            let view = view_of(&table);
            let blob_len = count as u64 * chunk_size;
            let offset = if anywhere { raw } else { raw % (blob_len + 2 * chunk_size) };
            match view.locate(offset) {
                Ok(location) => {
                    prop_assert!(offset < blob_len);
                    prop_assert_eq!(location.index as u64, offset / chunk_size);
                    prop_assert_eq!(location.within as u64, offset % chunk_size);
                    prop_assert_eq!(location.index as u64 * chunk_size + location.within as u64, offset);
                    prop_assert_eq!(location.entry, table.entries[location.index]);
                }
                Err(error) => {
                    prop_assert!(offset >= blob_len);
                    prop_assert_eq!(error, FormatError::BeyondBlob { offset, blob_len });
                }
            }
        }

        #[test]
        fn garbage_tables_are_rejected_not_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(view) = ChunkTableView::new(bytes.into()) {
                read_everything(&view);
            }
        }

        #[test]
        fn garbage_entries_behind_a_valid_header_never_panic(
            chunk_bits in MIN_CHUNK_BITS..=MAX_CHUNK_BITS,
            entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), ENTRY_SIZE), 0..8),
        ) {
            let mut bytes = table_of(chunk_bits, &vec![1; entries.len()]).encode();
            bytes.truncate(TABLE_HEADER_SIZE);
            bytes.extend(entries.iter().flatten());
            read_everything(&ChunkTableView::new(bytes.into()).unwrap());
        }

        #[test]
        fn mutated_tables_never_panic(flip in 0usize..(16 + 112 * 3), bit in 0u8..8, cut in 0usize..(16 + 112 * 3)) {
            let table = ChunkTable {
                chunk_bits: 20,
                entries: (1..=3u32).map(|l| ChunkEntry {
                    digest: Digest::of(&l.to_le_bytes()),
                    length: l * 100,
                    stored_length: l * 50,
                    compression: Compression::Zstd,
                    stored_digest: Some(Digest::of(&[l as u8])),
                    check: Some(Digest::blake3_of(&[l as u8])),
                }).collect(),
            };
            let mut bytes = table.encode();
            bytes[flip] ^= 1 << bit;
            if let Ok(view) = ChunkTableView::new(bytes.into()) {
                read_everything(&view);
            }
            prop_assert!(ChunkTableView::new(table.encode()[..cut].to_vec().into()).is_err());
        }
    }
}
