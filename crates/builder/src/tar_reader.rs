//! A streaming reader of tar archives: POSIX ustar headers, PAX extended headers (local and
//! global), GNU long names and long link targets, base-256 numbers, and sparse files in the
//! PAX format 1.0 that `tar --sparse --format=posix` writes (holes read as zeros, and
//! [`TarReader::skip_hole`] passes over them without reading).
//!
//! Written by hand because the `tar` crate splits PAX records at new lines, so the ACL
//! records GNU tar writes (`SCHILY.acl.access=user::rw-\ngroup::r--\n…`) and binary xattr
//! values holding a new line come out malformed, and a malformed record before `size` makes
//! it miss the size of a file over 8 GiB. Here a record is cut by its length, as the format
//! says. The older GNU sparse formats (`S` entries, PAX sparse 0.x) are refused by name.

use std::io::{self, Read};

const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the stream ends inside {0} (truncated?)")]
    Truncated(&'static str),
    #[error("a header's checksum does not match (not a tar stream, or damaged)")]
    Checksum,
    #[error("a bad {field} field in a header")]
    Field { field: &'static str },
    #[error("a malformed PAX record")]
    Pax,
    #[error("{0}: not supported")]
    Unsupported(String),
}

/// One entry's header, with its PAX records and GNU long names applied.
#[derive(Debug, Clone, Default)]
pub struct TarEntry {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    /// The type flag: b'0' regular, b'1' hard link, b'2' symlink, b'3' char, b'4' block,
    /// b'5' directory, b'6' fifo (b'\0' and b'7' are read as b'0', b'D' as b'5').
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds and nanoseconds.
    pub mtime: (i64, u32),
    pub size: u64,
    pub major: u32,
    pub minor: u32,
    /// The entry's PAX records (global ones first), in order.
    pub pax: Vec<(String, Vec<u8>)>,
}

pub struct TarReader<R> {
    inner: R,
    /// Stored data bytes of the current entry not read yet, then its padding.
    remaining: u64,
    padding: u64,
    /// For a sparse entry: its data segments (offset, length) and where reading is.
    sparse: Option<Sparse>,
    global: Vec<(String, Vec<u8>)>,
    ended: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader { inner, remaining: 0, padding: 0, sparse: None, global: Vec::new(), ended: false }
    }

    /// The stream, from where reading stopped.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next entry (its data is then read through `Read`), or None after the
    /// end-of-archive block. A stream that stops without one is an error.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>, TarError> {
        if self.ended {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut local: Vec<(String, Vec<u8>)> = Vec::new();
        let (mut long_name, mut long_link) = (None, None);
        loop {
            let mut block = [0u8; BLOCK];
            if !self.fill(&mut block, "a header")? {
                return Err(TarError::Truncated("the archive: no end-of-archive block"));
            }
            if block.iter().all(|&b| b == 0) {
                self.ended = true;
                return Ok(None);
            }
            check_sum(&block)?;
            let size = number(&block[124..136], "size")?;
            let kind = block[156];
            match kind {
                b'x' | b'g' => {
                    let records = parse_pax(&self.read_whole(size, "a PAX header")?)?;
                    match kind {
                        b'g' => self.global.extend(records),
                        _ => local.extend(records),
                    }
                }
                b'L' => long_name = Some(trim_nul(self.read_whole(size, "a long name")?)),
                b'K' => long_link = Some(trim_nul(self.read_whole(size, "a long link target")?)),
                b'V' => self.skip(size, padding_of(size), "a volume label")?,
                _ => {
                    let pax: Vec<(String, Vec<u8>)> = self.global.iter().cloned().chain(local).collect();
                    let (entry, stored) = self.entry(&block, kind, size, pax, long_name, long_link)?;
                    self.remaining = stored;
                    self.padding = padding_of(stored);
                    if stored != entry.size {
                        self.sparse = Some(self.sparse_map(entry.size)?);
                    }
                    return Ok(Some(entry));
                }
            }
        }
    }

    /// The entry, and how many data bytes the archive stores for it.
    fn entry(&self, block: &[u8; BLOCK], kind: u8, size: u64, pax: Vec<(String, Vec<u8>)>, long_name: Option<Vec<u8>>, long_link: Option<Vec<u8>>) -> Result<(TarEntry, u64), TarError> {
        let posix = &block[257..263] == b"ustar\0";
        let mut path = trim_nul(block[..100].to_vec());
        if posix && block[345] != 0 {
            path = [trim_nul(block[345..500].to_vec()), b"/".to_vec(), path].concat();
        }
        let mut entry = TarEntry {
            path: long_name.unwrap_or(path),
            link: long_link.unwrap_or_else(|| trim_nul(block[157..257].to_vec())),
            kind: match kind {
                0 | b'7' => b'0',
                b'D' => b'5',
                b'0'..=b'6' => kind,
                b'S' => return Err(TarError::Unsupported("a GNU sparse file".into())),
                other => return Err(TarError::Unsupported(format!("entry type {:?}", other as char))),
            },
            mode: number(&block[100..108], "mode")? as u32,
            uid: number(&block[108..116], "uid")?,
            gid: number(&block[116..124], "gid")?,
            mtime: (signed_number(&block[136..148], "mtime")?, 0),
            size,
            major: number(&block[329..337], "devmajor").unwrap_or(0) as u32,
            minor: number(&block[337..345], "devminor").unwrap_or(0) as u32,
            pax: Vec::new(),
        };
        let (mut sparse_version, mut sparse_name, mut real_size) = ((None, None), None, None);
        for (key, value) in &pax {
            let text = || std::str::from_utf8(value).map_err(|_| TarError::Pax);
            let decimal = || text()?.parse::<u64>().map_err(|_| TarError::Pax);
            match key.as_str() {
                "path" => entry.path = value.clone(),
                "linkpath" => entry.link = value.clone(),
                "size" => entry.size = decimal()?,
                "uid" => entry.uid = decimal()?,
                "gid" => entry.gid = decimal()?,
                "mtime" => entry.mtime = parse_time(text()?).ok_or(TarError::Pax)?,
                "GNU.sparse.major" => sparse_version.0 = Some(decimal()?),
                "GNU.sparse.minor" => sparse_version.1 = Some(decimal()?),
                "GNU.sparse.name" => sparse_name = Some(value.clone()),
                "GNU.sparse.realsize" => real_size = Some(decimal()?),
                key if key.starts_with("GNU.sparse.") => return Err(TarError::Unsupported("a GNU sparse file of format 0.x".into())),
                _ => {}
            }
        }
        entry.pax = pax;
        let stored = entry.size;
        match (sparse_version, sparse_name, real_size) {
            ((None, None), None, None) => {}
            ((Some(1), Some(0)), Some(name), Some(real_size)) => {
                entry.path = name;
                entry.size = real_size;
            }
            _ => return Err(TarError::Unsupported("a GNU sparse file of another format than 1.0".into())),
        }
        Ok((entry, stored))
    }

    /// Reads the map at the start of a sparse entry's data (format 1.0: decimal numbers one
    /// per line, the count then offset and length pairs, padded to a block).
    fn sparse_map(&mut self, real_size: u64) -> Result<Sparse, TarError> {
        let bad = || TarError::Field { field: "sparse map" };
        let mut map_len = 0u64;
        let mut numbers = Vec::new();
        let mut line = Vec::new();
        while numbers.len() < 1 + 2 * numbers.first().copied().unwrap_or(0) as usize {
            let mut byte = [0u8; 1];
            if self.remaining == 0 || !self.fill(&mut byte, "a sparse map")? {
                return Err(TarError::Truncated("a sparse map"));
            }
            self.remaining -= 1;
            map_len += 1;
            match byte[0] {
                b'\n' => {
                    let number = std::str::from_utf8(&line).ok().and_then(|t| t.parse::<u64>().ok()).ok_or_else(bad)?;
                    if numbers.is_empty() && number > 1 << 24 {
                        return Err(bad());
                    }
                    numbers.push(number);
                    line.clear();
                }
                b'0'..=b'9' if line.len() < 20 => line.push(byte[0]),
                _ => return Err(bad()),
            }
        }
        let skip = padding_of(map_len).min(self.remaining);
        self.skip(skip, 0, "a sparse map")?;
        self.remaining -= skip;
        let segments: Vec<(u64, u64)> = numbers[1..].chunks(2).map(|pair| (pair[0], pair[1])).collect();
        let mut end = 0;
        for &(offset, len) in &segments {
            let segment_end = offset.checked_add(len).ok_or_else(bad)?;
            if offset < end || segment_end > real_size {
                return Err(bad());
            }
            end = segment_end;
        }
        if segments.iter().map(|s| s.1).sum::<u64>() != self.remaining {
            return Err(bad());
        }
        Ok(Sparse { segments, next: 0, position: 0, size: real_size })
    }

    /// Passes over the next `len` bytes of a sparse entry without reading if they are all
    /// a hole; whether it did.
    pub fn skip_hole(&mut self, len: u64) -> bool {
        let Some(sparse) = &mut self.sparse else { return false };
        let (start, end) = (sparse.position, sparse.position + len);
        let data_ahead = sparse.segments[sparse.next..].iter().take_while(|&&(offset, _)| offset < end).any(|&(offset, seg_len)| seg_len > 0 && offset + seg_len > start);
        if data_ahead || end > sparse.size {
            return false;
        }
        sparse.position = end;
        true
    }

    /// Skips what is left of the current entry's data and its padding.
    fn skip_rest(&mut self) -> Result<(), TarError> {
        let (remaining, padding) = (self.remaining, self.padding);
        self.remaining = 0;
        self.padding = 0;
        self.sparse = None;
        self.skip(remaining, padding, "an entry's data")
    }

    fn skip(&mut self, size: u64, padding: u64, what: &'static str) -> Result<(), TarError> {
        let total = size + padding;
        let copied = io::copy(&mut (&mut self.inner).take(total), &mut io::sink())?;
        if copied < total {
            return Err(TarError::Truncated(what));
        }
        Ok(())
    }

    /// The whole data of an extension entry, and its padding skipped.
    fn read_whole(&mut self, size: u64, what: &'static str) -> Result<Vec<u8>, TarError> {
        if size > 64 << 20 {
            return Err(TarError::Unsupported(format!("{what} of {size} bytes")));
        }
        let mut data = vec![0u8; size as usize];
        if !self.fill(&mut data, what)? && size > 0 {
            return Err(TarError::Truncated(what));
        }
        self.skip(0, padding_of(size), what)?;
        Ok(data)
    }

    /// Fills `buf` completely (true), or finds the stream at its end before any byte (false).
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<bool, TarError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Truncated(what)),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }
}

/// A sparse entry being read: its data segments in order, the next one, the logical position.
struct Sparse {
    segments: Vec<(u64, u64)>,
    next: usize,
    position: u64,
    size: u64,
}

/// The current entry's data (holes of a sparse entry as zeros).
impl<R: Read> Read for TarReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(sparse) = &mut self.sparse else { return self.read_stored(buf) };
        while sparse.segments.get(sparse.next).is_some_and(|&(offset, len)| sparse.position >= offset + len) {
            sparse.next += 1;
        }
        let (position, size) = (sparse.position, sparse.size);
        let (n, from_segment) = match sparse.segments.get(sparse.next) {
            Some(&(offset, _)) if position < offset => (((offset - position) as usize).min(buf.len()), false),
            Some(&(offset, len)) => (((offset + len - position) as usize).min(buf.len()), true),
            None => (((size - position).min(usize::MAX as u64) as usize).min(buf.len()), false),
        };
        let n = match from_segment {
            true => self.read_stored(&mut buf[..n])?,
            false => {
                buf[..n].fill(0);
                n
            }
        };
        if let Some(sparse) = &mut self.sparse {
            sparse.position += n as u64;
        }
        Ok(n)
    }
}

impl<R: Read> TarReader<R> {
    fn read_stored(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(self.remaining.min(usize::MAX as u64) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ends inside a file's data (truncated?)"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn padding_of(size: u64) -> u64 {
    size.next_multiple_of(BLOCK as u64) - size
}

fn trim_nul(mut bytes: Vec<u8>) -> Vec<u8> {
    if let Some(end) = bytes.iter().position(|&b| b == 0) {
        bytes.truncate(end);
    }
    bytes
}

fn check_sum(block: &[u8; BLOCK]) -> Result<(), TarError> {
    let stored = number(&block[148..156], "checksum").map_err(|_| TarError::Checksum)?;
    let unsigned: u64 = block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
    let signed: i64 = block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { i64::from(b as i8) }).sum();
    match stored == unsigned || stored as i64 == signed {
        true => Ok(()),
        false => Err(TarError::Checksum),
    }
}

/// An octal field (NULs and spaces around it), or a base-256 one (high bit of the first byte).
fn number(field: &[u8], name: &'static str) -> Result<u64, TarError> {
    u64::try_from(signed_number(field, name)?).map_err(|_| TarError::Field { field: name })
}

/// An octal field, or base-256 (the first byte's top bit set) in two's complement: libarchive
/// writes a time before 1970 so (over the field's terminator too; the PAX `mtime` then gives
/// the real one).
fn signed_number(field: &[u8], name: &'static str) -> Result<i64, TarError> {
    let bad = TarError::Field { field: name };
    if let Some((&first, rest)) = field.split_first().filter(|(&b, _)| b & 0x80 != 0) {
        let top = i64::from(first & 0x7f) - if first & 0x40 != 0 { 0x80 } else { 0 };
        return rest.iter().try_fold(top, |n, &b| n.checked_mul(256).and_then(|n| n.checked_add(i64::from(b)))).ok_or(bad);
    }
    let text: Vec<u8> = field.iter().copied().skip_while(|&b| b == b' ').take_while(|&b| b != 0 && b != b' ').collect();
    if text.is_empty() {
        return Ok(0);
    }
    std::str::from_utf8(&text).ok().and_then(|t| i64::from_str_radix(t, 8).ok()).filter(|n| *n >= 0).ok_or(bad)
}

/// PAX records: `LENGTH KEY=VALUE\n`, each cut by its length (values may hold new lines).
pub fn parse_pax(mut data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, TarError> {
    let mut records = Vec::new();
    while !data.is_empty() && data[0] != 0 {
        let space = data.iter().position(|&b| b == b' ').ok_or(TarError::Pax)?;
        let len: usize = std::str::from_utf8(&data[..space]).ok().and_then(|t| t.parse().ok()).ok_or(TarError::Pax)?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(TarError::Pax);
        }
        let record = &data[space + 1..len - 1];
        let equals = record.iter().position(|&b| b == b'=').ok_or(TarError::Pax)?;
        let key = String::from_utf8(record[..equals].to_vec()).map_err(|_| TarError::Pax)?;
        records.push((key, record[equals + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(records)
}

/// A PAX time, `SECONDS[.FRACTION]`, possibly negative.
pub fn parse_time(text: &str) -> Option<(i64, u32)> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let seconds: i64 = whole.parse().ok()?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = fraction.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    // -1.5 is 1.5 s before the epoch: -2 s plus 0.5 s.
    match (whole.starts_with('-'), nanos) {
        (true, n) if n > 0 => Some((seconds - 1, 1_000_000_000 - n)),
        _ => Some((seconds, nanos)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pax_records_are_cut_by_length_not_at_new_lines() {
        let acl = "user::rw-\ngroup::r--\nother::---\n";
        let record = |k: &str, v: &[u8]| {
            let body = [k.as_bytes(), b"=", v, b"\n"].concat();
            let mut len = body.len() + 2;
            while len.to_string().len() + 1 + body.len() != len {
                len += 1;
            }
            [len.to_string().as_bytes(), b" ", &body].concat()
        };
        let data = [record("SCHILY.acl.access", acl.as_bytes()), record("path", b"a/b"), record("SCHILY.xattr.user.x", b"\n\0\xff")].concat();
        let records = parse_pax(&data).unwrap();
        assert_eq!(records, vec![("SCHILY.acl.access".into(), acl.as_bytes().to_vec()), ("path".into(), b"a/b".to_vec()), ("SCHILY.xattr.user.x".into(), b"\n\0\xff".to_vec())]);
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"9 pathx\n").is_err());
    }

    #[test]
    fn pax_times_keep_their_fraction_also_before_the_epoch() {
        assert_eq!(parse_time("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(parse_time("1700000000.123456789123"), Some((1_700_000_000, 123_456_789)));
        assert_eq!(parse_time("12"), Some((12, 0)));
        assert_eq!(parse_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_time("x"), None);
        assert_eq!(parse_time("1.x"), None);
    }

    #[test]
    fn numbers_are_octal_or_base_256() {
        assert_eq!(number(b"0000644\0", "mode").unwrap(), 0o644);
        assert_eq!(number(b"  17 \0\0\0", "x").unwrap(), 0o17);
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0x01, 0x00], "size").unwrap(), 256);
        assert!(number(b"9\0", "x").is_err());
        assert_eq!(signed_number(&[0xff; 8], "mtime").unwrap(), -1);
        assert_eq!(signed_number(&[0xff, 0xff, 0xfe, 0x00], "mtime").unwrap(), -512);
        assert_eq!(signed_number(&[[0xff; 11].as_slice(), b" "].concat(), "mtime").unwrap(), -224);
        assert!(number(&[0xff; 8], "uid").is_err());
        assert!(number(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], "size").is_err());
    }

    proptest! {
        #[test]
        fn garbage_streams_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut reader = TarReader::new(&bytes[..]);
            while let Ok(Some(_)) = reader.next_entry() {
                let _ = io::copy(&mut reader, &mut io::sink());
            }
        }

        #[test]
        fn garbage_pax_records_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_pax(&bytes);
        }
    }
}
