//! The region header and where everything lies (see the layout in the parent module's doc).

use phoenixfs_format::Digest;

pub const REGION_HEADER_SIZE: usize = 64;
pub const SLOT_HEADER_SIZE: usize = 64;
/// Slot data starts on a page of its own, so a slot's first write allocates only its pages.
const DATA_ALIGN: u64 = 4096;
const MAGIC: [u8; 8] = *b"phxchunk";
const VERSION: u32 = 1;
/// Slots per set: a chunk can live in any of these, so a lookup probes this many headers.
pub const WAYS: u64 = 8;

/// Where everything lies in one region, in bytes; consistent with the file's length.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub slot_size: usize,
    pub slot_count: usize,
    pub ways: usize,
    pub data_offset: usize,
    /// The whole region.
    pub len: usize,
}

impl Layout {
    /// Checks that the numbers make a region this process can map, without overflow.
    pub fn new(slot_size: u64, slot_count: u64, ways: u64) -> Result<Layout, String> {
        if slot_size == 0 || !slot_size.is_multiple_of(8) || slot_size > u64::from(u32::MAX) {
            return Err(format!("slot size {slot_size} is not a multiple of 8 between 8 and 2^32"));
        }
        // More ways would make every lookup probe more slots: only damage asks for that.
        if ways == 0 || ways > WAYS || slot_count == 0 || !slot_count.is_multiple_of(ways) {
            return Err(format!("{slot_count} slots in sets of {ways}: not whole sets of 1 to {WAYS} slots"));
        }
        let too_big = || format!("{slot_count} slots of {slot_size} bytes do not fit in memory");
        let headers_end = slot_count.checked_mul(SLOT_HEADER_SIZE as u64).and_then(|n| n.checked_add(REGION_HEADER_SIZE as u64)).ok_or_else(too_big)?;
        let data_offset = headers_end.checked_next_multiple_of(DATA_ALIGN).ok_or_else(too_big)?;
        let len = slot_count.checked_mul(slot_size).and_then(|n| n.checked_add(data_offset)).ok_or_else(too_big)?;
        let len = usize::try_from(len).map_err(|_| too_big())?;
        // Everything below `len` fits in usize, so these conversions are exact.
        Ok(Layout { slot_size: slot_size as usize, slot_count: slot_count as usize, ways: ways as usize, data_offset: data_offset as usize, len })
    }

    pub fn header(&self) -> [u8; REGION_HEADER_SIZE] {
        let mut header = [0u8; REGION_HEADER_SIZE];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(self.ways as u32).to_le_bytes());
        header[16..24].copy_from_slice(&(self.slot_size as u64).to_le_bytes());
        header[24..32].copy_from_slice(&(self.slot_count as u64).to_le_bytes());
        header
    }

    /// The layout a header describes, if it is ours and matches a file of `file_len` bytes.
    pub fn parse(header: &[u8; REGION_HEADER_SIZE], file_len: u64) -> Result<Layout, String> {
        let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        if header[0..8] != MAGIC {
            return Err(format!("bad magic {:02x?}: not a phoenixfs chunk region", &header[0..8]));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!("version {version}, this program reads version {VERSION}"));
        }
        let layout = Layout::new(u64_at(16), u64_at(24), u64::from(u32_at(12)))?;
        if layout.len as u64 != file_len {
            return Err(format!("its header describes {} bytes but the file has {file_len}", layout.len));
        }
        Ok(layout)
    }

    /// The first slot of the set a digest maps to (digests are uniformly distributed).
    pub fn first_slot_of_set(&self, digest: &Digest) -> usize {
        let sets = (self.slot_count / self.ways) as u64;
        let set = u64::from_le_bytes(digest.0[..8].try_into().expect("8 bytes")) % sets;
        set as usize * self.ways
    }

    /// Index of slot `index`'s header in the region's u64 words.
    pub fn header_word(&self, index: usize) -> usize {
        (REGION_HEADER_SIZE + index * SLOT_HEADER_SIZE) / 8
    }

    /// Index of slot `index`'s first data word in the region's u64 words.
    pub fn data_word(&self, index: usize) -> usize {
        (self.data_offset + index * self.slot_size) / 8
    }
}
