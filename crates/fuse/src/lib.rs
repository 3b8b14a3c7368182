//! The FUSE session: phoenixfs's own protocol layer over the raw `/dev/fuse` fd.
//!
//! Owns: decoding kernel requests into typed operations and encoding replies ([`request`],
//! [`reply`]: pure, no I/O), mounting with mount(2), the INIT handshake whose negotiated
//! values ([`SessionParams`]) are the only session state, and the loop that serves requests
//! from several threads on one fd, resumable by another process (with FUSE_NOTIFY_RESEND)
//! and stoppable at a request boundary ([`session`]), counting requests and error answers
//! by opcode as it goes. The file system itself sits behind the small
//! read-only [`Filesystem`] trait.
//!
//! Must never: know about chunks, stores or images; keep per-open or per-lookup state that a
//! new process could not rebuild (passthrough sessions keep which files are open in which mode
//! in the holder's [`OpenTable`], written before the kernel hears of an open); answer a request
//! twice or not at all (see [`reply::Reply`]).

mod counts;
mod fs;
mod opens;
pub mod reply;
pub mod request;
pub mod session;

pub use counts::OpcodeTotals;
pub use fs::{Attr, DirEntryOut, Entry, Filesystem, Opening, Piece, StatFs};
pub use opens::{OpenMode, OpenTable, OpenTableError};
pub use session::{mount, Ended, MountOptions, Session, SessionParams};

/// The root directory's nodeid in every FUSE session.
pub const ROOT_NODEID: u64 = 1;
