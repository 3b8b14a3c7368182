//! Decoding kernel requests: bytes in, a typed [`Request`] out. No I/O.

use fuse_abi::linux as abi;
use thiserror::Error;
use zerocopy::FromBytes;

pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const READLINK: u32 = 5;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
    pub const LSEEK: u32 = 46;
    pub const SYNCFS: u32 = 50;
    pub const STATX: u32 = 52;
    /// Opcodes that would change the file system: SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK,
    /// RMDIR, RENAME, LINK, WRITE, SETXATTR, REMOVEXATTR, CREATE, FALLOCATE, RENAME2,
    /// COPY_FILE_RANGE, TMPFILE.
    pub const WRITES: &[u32] = &[4, 6, 8, 9, 10, 11, 12, 13, 16, 21, 24, 35, 43, 45, 47, 51];

    /// The opcode's name in lower case as the kernel's `FUSE_*` constants spell it, for
    /// metrics; "other" for opcodes this session never expects.
    pub fn name(opcode: u32) -> &'static str {
        match opcode {
            LOOKUP => "lookup",
            FORGET => "forget",
            GETATTR => "getattr",
            4 => "setattr",
            READLINK => "readlink",
            6 => "symlink",
            8 => "mknod",
            9 => "mkdir",
            10 => "unlink",
            11 => "rmdir",
            12 => "rename",
            13 => "link",
            OPEN => "open",
            READ => "read",
            16 => "write",
            STATFS => "statfs",
            RELEASE => "release",
            FSYNC => "fsync",
            21 => "setxattr",
            GETXATTR => "getxattr",
            LISTXATTR => "listxattr",
            24 => "removexattr",
            FLUSH => "flush",
            INIT => "init",
            OPENDIR => "opendir",
            READDIR => "readdir",
            RELEASEDIR => "releasedir",
            FSYNCDIR => "fsyncdir",
            ACCESS => "access",
            35 => "create",
            INTERRUPT => "interrupt",
            DESTROY => "destroy",
            NOTIFY_REPLY => "notify_reply",
            BATCH_FORGET => "batch_forget",
            43 => "fallocate",
            READDIRPLUS => "readdirplus",
            45 => "rename2",
            LSEEK => "lseek",
            47 => "copy_file_range",
            SYNCFS => "syncfs",
            51 => "tmpfile",
            STATX => "statx",
            _ => "other",
        }
    }
}

pub const IN_HEADER_SIZE: usize = std::mem::size_of::<abi::fuse_in_header>();

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub unique: u64,
    /// The raw opcode, for counting; `op` is what to do.
    pub opcode: u32,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub op: Operation<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation<'a> {
    Init(abi::fuse_init_in),
    Destroy,
    Lookup { name: &'a [u8] },
    /// FORGET and BATCH_FORGET: never answered.
    Forget,
    Getattr,
    Statx,
    Readlink,
    Open { flags: u32 },
    Read { offset: u64, size: u32 },
    /// `fh` is what our OPEN answer gave the file.
    Release { fh: u64 },
    Opendir,
    Readdir { offset: u64, size: u32, plus: bool },
    Releasedir,
    Statfs,
    Getxattr { name: &'a [u8], size: u32 },
    Listxattr { size: u32 },
    Access { mask: u32 },
    /// FLUSH, FSYNC, FSYNCDIR, SYNCFS: nothing to do on a read-only file system.
    Sync,
    Lseek { offset: u64, whence: u32 },
    /// INTERRUPT and NOTIFY_REPLY: never answered.
    NoReply,
    /// An opcode that would modify the file system.
    Write { opcode: u32 },
    Unknown { opcode: u32 },
}

impl Operation<'_> {
    /// Whether the kernel expects an answer.
    pub fn wants_reply(&self) -> bool {
        !matches!(self, Operation::Forget | Operation::NoReply)
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error("request shorter than its header ({0} bytes)")]
    ShortHeader(usize),
    #[error("request length {declared} does not match {read} bytes read")]
    Length { declared: u32, read: usize, opcode: u32, unique: u64 },
    #[error("opcode {opcode}: argument too short")]
    ShortArgument { opcode: u32, unique: u64 },
}

impl ParseError {
    /// The request to answer with an error: every malformed request whose header could be
    /// read, except the kinds the kernel never waits an answer for.
    pub fn unique_to_answer(&self) -> Option<u64> {
        match *self {
            ParseError::ShortHeader(_) => None,
            ParseError::Length { opcode, unique, .. } | ParseError::ShortArgument { opcode, unique } => {
                const NEVER_ANSWERED: [u32; 4] = [opcode::FORGET, opcode::BATCH_FORGET, opcode::INTERRUPT, opcode::NOTIFY_REPLY];
                (!NEVER_ANSWERED.contains(&opcode)).then_some(unique)
            }
        }
    }
}

fn arg<T: FromBytes>(body: &[u8], opcode: u32, unique: u64) -> Result<(T, &[u8]), ParseError> {
    T::read_from_prefix(body).map_err(|_| ParseError::ShortArgument { opcode, unique })
}

/// A NUL-terminated name at the start of `body`.
fn name(body: &[u8], opcode: u32, unique: u64) -> Result<&[u8], ParseError> {
    let end = body.iter().position(|&c| c == 0).ok_or(ParseError::ShortArgument { opcode, unique })?;
    Ok(&body[..end])
}

/// Decodes one request as read from `/dev/fuse`.
pub fn parse(buf: &[u8]) -> Result<Request<'_>, ParseError> {
    let (header, body) = abi::fuse_in_header::read_from_prefix(buf).map_err(|_| ParseError::ShortHeader(buf.len()))?;
    if header.len as usize != buf.len() {
        return Err(ParseError::Length { declared: header.len, read: buf.len(), opcode: header.opcode, unique: header.unique });
    }
    let (opcode, unique) = (header.opcode, header.unique);
    let op = match opcode {
        opcode::INIT => {
            // Kernels before 7.36 send a shorter fuse_init_in; the rest reads as zero.
            let mut full = [0u8; std::mem::size_of::<abi::fuse_init_in>()];
            let n = body.len().min(full.len());
            if n < 16 {
                return Err(ParseError::ShortArgument { opcode, unique });
            }
            full[..n].copy_from_slice(&body[..n]);
            Operation::Init(abi::fuse_init_in::read_from_bytes(&full).expect("exact size"))
        }
        opcode::DESTROY => Operation::Destroy,
        opcode::LOOKUP => Operation::Lookup { name: name(body, opcode, unique)? },
        opcode::FORGET | opcode::BATCH_FORGET => Operation::Forget,
        opcode::GETATTR => Operation::Getattr,
        opcode::STATX => Operation::Statx,
        opcode::READLINK => Operation::Readlink,
        opcode::OPEN => Operation::Open { flags: arg::<abi::fuse_open_in>(body, opcode, unique)?.0.flags },
        opcode::READ => {
            let (read, _) = arg::<abi::fuse_read_in>(body, opcode, unique)?;
            Operation::Read { offset: read.offset, size: read.size }
        }
        opcode::RELEASE => Operation::Release { fh: arg::<abi::fuse_release_in>(body, opcode, unique)?.0.fh },
        opcode::OPENDIR => Operation::Opendir,
        opcode::READDIR | opcode::READDIRPLUS => {
            let (read, _) = arg::<abi::fuse_read_in>(body, opcode, unique)?;
            Operation::Readdir { offset: read.offset, size: read.size, plus: opcode == opcode::READDIRPLUS }
        }
        opcode::RELEASEDIR => Operation::Releasedir,
        opcode::STATFS => Operation::Statfs,
        opcode::GETXATTR => {
            let (xattr, rest) = arg::<abi::fuse_getxattr_in>(body, opcode, unique)?;
            Operation::Getxattr { name: name(rest, opcode, unique)?, size: xattr.size }
        }
        opcode::LISTXATTR => Operation::Listxattr { size: arg::<abi::fuse_getxattr_in>(body, opcode, unique)?.0.size },
        opcode::ACCESS => Operation::Access { mask: arg::<abi::fuse_access_in>(body, opcode, unique)?.0.mask },
        opcode::FLUSH | opcode::FSYNC | opcode::FSYNCDIR | opcode::SYNCFS => Operation::Sync,
        opcode::LSEEK => {
            let (seek, _) = arg::<abi::fuse_lseek_in>(body, opcode, unique)?;
            Operation::Lseek { offset: seek.offset, whence: seek.whence }
        }
        opcode::INTERRUPT | opcode::NOTIFY_REPLY => Operation::NoReply,
        op if opcode::WRITES.contains(&op) => Operation::Write { opcode: op },
        op => Operation::Unknown { opcode: op },
    };
    Ok(Request { unique, opcode, nodeid: header.nodeid, uid: header.uid, gid: header.gid, pid: header.pid, op })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as the kernel lays it out: fuse_in_header, then the argument bytes.
    fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((IN_HEADER_SIZE + body.len()) as u32).to_le_bytes());
        out.extend_from_slice(&opcode.to_le_bytes());
        out.extend_from_slice(&unique.to_le_bytes());
        out.extend_from_slice(&nodeid.to_le_bytes());
        out.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]); // uid 1, gid 2, pid 3, extlen, pad
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn lookup_carries_its_name_and_the_full_unique() {
        let unique = (1u64 << 63) | 77; // a resent request keeps bit 63
        let bytes = request(opcode::LOOKUP, unique, 1, b"hello\0");
        let req = parse(&bytes).unwrap();
        assert_eq!(req.unique, unique);
        assert_eq!((req.uid, req.gid, req.pid), (1, 2, 3));
        assert_eq!(req.op, Operation::Lookup { name: b"hello" });
    }

    #[test]
    fn read_arguments_decode() {
        let mut body = Vec::new();
        body.extend_from_slice(&9u64.to_le_bytes()); // fh
        body.extend_from_slice(&4096u64.to_le_bytes()); // offset
        body.extend_from_slice(&131072u32.to_le_bytes()); // size
        body.extend_from_slice(&[0u8; 20]);
        let bytes = request(opcode::READ, 5, 42, &body);
        let req = parse(&bytes).unwrap();
        assert_eq!(req.op, Operation::Read { offset: 4096, size: 131072 });
        assert_eq!(req.nodeid, 42);
    }

    #[test]
    fn writes_and_unknown_opcodes_are_classified() {
        assert_eq!(parse(&request(16, 1, 2, &[0; 40])).unwrap().op, Operation::Write { opcode: 16 });
        assert_eq!(parse(&request(999, 1, 2, &[])).unwrap().op, Operation::Unknown { opcode: 999 });
        assert!(!parse(&request(opcode::FORGET, 1, 2, &[0; 8])).unwrap().op.wants_reply());
    }

    #[test]
    fn short_or_inconsistent_requests_are_errors() {
        assert_eq!(parse(&[0u8; 10]), Err(ParseError::ShortHeader(10)));
        let mut bytes = request(opcode::LOOKUP, 1, 1, b"x\0");
        bytes.push(0);
        assert!(matches!(parse(&bytes), Err(ParseError::Length { .. })));
        assert!(matches!(parse(&request(opcode::LOOKUP, 1, 1, b"no-nul")), Err(ParseError::ShortArgument { .. })));
        assert!(matches!(parse(&request(opcode::READ, 1, 1, &[0; 8])), Err(ParseError::ShortArgument { .. })));
    }

    #[test]
    fn malformed_requests_are_answered_unless_the_kernel_expects_no_answer() {
        let mut long = request(opcode::GETATTR, 77, 1, &[0; 16]);
        long.push(0);
        assert_eq!(parse(&long).unwrap_err().unique_to_answer(), Some(77));
        assert_eq!(parse(&request(opcode::READ, 78, 1, &[0; 8])).unwrap_err().unique_to_answer(), Some(78));
        let mut forget = request(opcode::FORGET, 79, 1, &[0; 8]);
        forget.push(0);
        assert_eq!(parse(&forget).unwrap_err().unique_to_answer(), None);
        assert_eq!(parse(&[0u8; 10]).unwrap_err().unique_to_answer(), None);
    }

    #[test]
    fn old_kernels_short_init_is_accepted() {
        let mut body = Vec::new();
        for v in [7u32, 31, 131072, 0x1234] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let Operation::Init(init) = parse(&request(opcode::INIT, 1, 0, &body)).unwrap().op else { panic!() };
        assert_eq!((init.major, init.minor, init.max_readahead, init.flags, init.flags2), (7, 31, 131072, 0x1234, 0));
    }
}
