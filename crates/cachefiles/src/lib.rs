//! The cachefiles session: phoenixfs's own layer over `/dev/cachefiles` in on-demand mode,
//! where the kernel asks a user daemon to fill the cache files that back EROFS (over fscache).
//!
//! Owns: decoding the kernel's OPEN/CLOSE/READ messages ([`message`]: pure, no I/O), the
//! commands written to the device (`dir`, `tag`, `bind ondemand`, `restore`, `copen`), and
//! the calls on a cache object's anonymous fd (page-aligned writes, READ_COMPLETE) in
//! [`device`].
//!
//! Must never: know about chunks, stores or images (a READ is answered by whoever calls
//! [`device::Object::fill`] with the bytes); keep state a new process could not rebuild from
//! the kernel's messages (after `restore` the kernel re-delivers what the dead daemon held,
//! and re-opens the objects whose anonymous fds died with it).

pub mod device;
pub mod message;

pub use device::{page_span, AlignedPages, Device, DeviceError, Object, PAGE};
pub use message::{Message, MessageError, Request};
