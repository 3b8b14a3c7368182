//! The kernel's on-demand messages (`include/uapi/linux/cachefiles.h`), one per read(2) of
//! `/dev/cachefiles`, little-endian:
//!
//! ```text
//! header  msg_id u32 | opcode u32 | len u32 | object_id u32            (len counts the header)
//! OPEN    volume_key_size u32 | cookie_key_size u32 | fd u32 | flags u32 | volume key | cookie key
//! CLOSE   (nothing)
//! READ    off u64 | len u64
//! ```

use thiserror::Error;

/// The most a message can be (the kernel's CACHEFILES_MSG_MAX_SIZE).
pub const MAX_MESSAGE: usize = 1024;

const HEADER: usize = 16;
const OPEN_FIXED: usize = 16;
const READ_BODY: usize = 16;

const OP_OPEN: u32 = 0;
const OP_CLOSE: u32 = 1;
const OP_READ: u32 = 2;

/// One request from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Identifies the request in its reply (`copen` or READ_COMPLETE).
    pub msg_id: u32,
    /// The cache object (one cache file) the request is about.
    pub object_id: u32,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Look up a cache object; the kernel installed `fd`, an anonymous fd for the object's
    /// cache file, in the reading process. Answered with `copen`.
    Open {
        /// The netfs's volume key without its terminating NUL (EROFS: `erofs,<domain or fsid>`).
        volume_key: Vec<u8>,
        /// The object's key within the volume (EROFS: the fsid for the bootstrap, the device
        /// tag for a blob).
        cookie_key: Vec<u8>,
        fd: u32,
        flags: u32,
    },
    /// The object is no longer used: close its anonymous fd. Not answered.
    Close,
    /// Fill `len` bytes at `offset` of the object's cache file, then READ_COMPLETE.
    Read { offset: u64, len: u64 },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("cachefiles message of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("cachefiles message says it is {said} bytes long but {got} were read")]
    Length { said: u32, got: usize },
    #[error("cachefiles message {msg_id}: unknown opcode {opcode}")]
    Opcode { msg_id: u32, opcode: u32 },
    #[error("cachefiles message {msg_id}: {what} does not fit in the message")]
    Body { msg_id: u32, what: &'static str },
}

impl MessageError {
    /// The id of a message whose header parsed, so that it can still be answered.
    pub fn msg_id(&self) -> Option<u32> {
        match self {
            MessageError::Opcode { msg_id, .. } | MessageError::Body { msg_id, .. } => Some(*msg_id),
            MessageError::Short(_) | MessageError::Length { .. } => None,
        }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

impl Message {
    /// Decodes what one read(2) of the device returned.
    pub fn decode(bytes: &[u8]) -> Result<Message, MessageError> {
        if bytes.len() < HEADER {
            return Err(MessageError::Short(bytes.len()));
        }
        let (msg_id, opcode, len, object_id) = (u32_at(bytes, 0), u32_at(bytes, 4), u32_at(bytes, 8), u32_at(bytes, 12));
        if len as usize != bytes.len() {
            return Err(MessageError::Length { said: len, got: bytes.len() });
        }
        let body = &bytes[HEADER..];
        let short = |what| MessageError::Body { msg_id, what };
        let request = match opcode {
            OP_OPEN => {
                if body.len() < OPEN_FIXED {
                    return Err(short("the OPEN header"));
                }
                let (volume_size, cookie_size) = (u32_at(body, 0) as usize, u32_at(body, 4) as usize);
                let keys = &body[OPEN_FIXED..];
                if volume_size.checked_add(cookie_size) != Some(keys.len()) || volume_size == 0 {
                    return Err(short("the volume and cookie keys"));
                }
                let (volume, cookie) = keys.split_at(volume_size);
                // The volume key's size counts its NUL; the key itself does not.
                let volume_key = volume.strip_suffix(&[0]).ok_or_else(|| short("a NUL-terminated volume key"))?;
                Request::Open { volume_key: volume_key.to_vec(), cookie_key: cookie.to_vec(), fd: u32_at(body, 8), flags: u32_at(body, 12) }
            }
            OP_CLOSE => Request::Close,
            OP_READ => {
                if body.len() < READ_BODY {
                    return Err(short("the READ range"));
                }
                Request::Read { offset: u64_at(body, 0), len: u64_at(body, 8) }
            }
            opcode => return Err(MessageError::Opcode { msg_id, opcode }),
        };
        Ok(Message { msg_id, object_id, request })
    }

    /// The bytes the kernel would send for this message (for tests and fixtures).
    pub fn encode(&self) -> Vec<u8> {
        let (opcode, body) = match &self.request {
            Request::Open { volume_key, cookie_key, fd, flags } => {
                let mut body = Vec::new();
                for field in [volume_key.len() as u32 + 1, cookie_key.len() as u32, *fd, *flags] {
                    body.extend_from_slice(&field.to_le_bytes());
                }
                body.extend_from_slice(volume_key);
                body.push(0);
                body.extend_from_slice(cookie_key);
                (OP_OPEN, body)
            }
            Request::Close => (OP_CLOSE, Vec::new()),
            Request::Read { offset, len } => (OP_READ, [offset.to_le_bytes(), len.to_le_bytes()].concat()),
        };
        let mut out = Vec::with_capacity(HEADER + body.len());
        for field in [self.msg_id, opcode, (HEADER + body.len()) as u32, self.object_id] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        out.extend_from_slice(&body);
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// An OPEN as the kernel sends it for an EROFS bootstrap (volume `erofs,abc`, cookie
    /// `abc`, anonymous fd 7), byte for byte.
    const OPEN_FIXTURE: [u8; 45] = [
        5, 0, 0, 0, // msg_id
        0, 0, 0, 0, // OPEN
        45, 0, 0, 0, // len
        9, 0, 0, 0, // object_id
        10, 0, 0, 0, // volume_key_size (with NUL)
        3, 0, 0, 0, // cookie_key_size
        7, 0, 0, 0, // fd
        0, 0, 0, 0, // flags
        b'e', b'r', b'o', b'f', b's', b',', b'a', b'b', b'c', 0, b'a', b'b', b'c',
    ];

    #[test]
    fn an_open_fixture_decodes() {
        let message = Message::decode(&OPEN_FIXTURE).unwrap();
        assert_eq!(
            message,
            Message { msg_id: 5, object_id: 9, request: Request::Open { volume_key: b"erofs,abc".to_vec(), cookie_key: b"abc".to_vec(), fd: 7, flags: 0 } }
        );
        assert_eq!(message.encode(), OPEN_FIXTURE);
    }

    #[test]
    fn lengths_that_disagree_are_refused() {
        let mut bytes = OPEN_FIXTURE.to_vec();
        bytes[8] = 40;
        assert_eq!(Message::decode(&bytes), Err(MessageError::Length { said: 40, got: 45 }));
        let mut keys_too_long = OPEN_FIXTURE.to_vec();
        keys_too_long[20] = 4;
        assert_eq!(Message::decode(&keys_too_long), Err(MessageError::Body { msg_id: 5, what: "the volume and cookie keys" }));
    }

    #[test]
    fn read_and_close_fixtures_decode() {
        let read = [1, 0, 0, 0, 2, 0, 0, 0, 32, 0, 0, 0, 4, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0];
        assert_eq!(Message::decode(&read), Ok(Message { msg_id: 1, object_id: 4, request: Request::Read { offset: 1 << 20, len: 128 << 10 } }));
        let close = [3, 0, 0, 0, 1, 0, 0, 0, 16, 0, 0, 0, 4, 0, 0, 0];
        assert_eq!(Message::decode(&close), Ok(Message { msg_id: 3, object_id: 4, request: Request::Close }));
    }

    #[test]
    fn malformed_messages_name_what_is_wrong() {
        assert_eq!(Message::decode(&[0; 8]), Err(MessageError::Short(8)));
        let unknown = [6, 0, 0, 0, 9, 0, 0, 0, 16, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(Message::decode(&unknown), Err(MessageError::Opcode { msg_id: 6, opcode: 9 }));
        assert_eq!(Message::decode(&unknown).unwrap_err().msg_id(), Some(6));
        let short_read = [2, 0, 0, 0, 2, 0, 0, 0, 24, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(Message::decode(&short_read), Err(MessageError::Body { msg_id: 2, what: "the READ range" }));
        let mut no_nul = OPEN_FIXTURE.to_vec();
        no_nul[41] = b'x';
        assert_eq!(Message::decode(&no_nul), Err(MessageError::Body { msg_id: 5, what: "a NUL-terminated volume key" }));
    }

    fn requests() -> impl Strategy<Value = Request> {
        prop_oneof![
            (proptest::collection::vec(1u8..=255, 1..200), proptest::collection::vec(any::<u8>(), 0..255), any::<u32>(), any::<u32>())
                .prop_map(|(volume_key, cookie_key, fd, flags)| Request::Open { volume_key, cookie_key, fd, flags }),
            Just(Request::Close),
            (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| Request::Read { offset, len }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_survives_encoding(msg_id: u32, object_id: u32, request in requests()) {
            let message = Message { msg_id, object_id, request };
            prop_assert_eq!(Message::decode(&message.encode()), Ok(message));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..MAX_MESSAGE)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn a_truncated_message_is_an_error(msg_id: u32, object_id: u32, request in requests(), cut in 1usize..16) {
            let bytes = Message { msg_id, object_id, request }.encode();
            let cut = cut.min(bytes.len());
            prop_assert!(Message::decode(&bytes[..bytes.len() - cut]).is_err());
        }
    }
}
