//! `/dev/cachefiles` and the cache objects it hands out: the commands a daemon writes, the
//! messages it reads, and how a READ is answered on an object's anonymous fd.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use thiserror::Error;

use crate::message::{Message, MessageError, MAX_MESSAGE};

/// Cache files are written with direct I/O: offsets, lengths and buffers in whole pages.
pub const PAGE: usize = 4096;

/// `_IOW(0x98, 1, int)`: the READ with this id is complete.
const CACHEFILES_IOC_READ_COMPLETE: libc::c_ulong = 0x4004_9801;

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("/dev/cachefiles is missing: this kernel has no cachefiles (CONFIG_CACHEFILES); use the FUSE mount (phoenixfs mount without --fscache)")]
    Missing,
    #[error("/dev/cachefiles is already open: one cachefiles daemon per host (cachefilesd or another phoenixfs fscache daemon runs)")]
    Busy,
    #[error("this kernel's cachefiles has no on-demand mode (CONFIG_CACHEFILES_ONDEMAND, Linux 5.19+); use the FUSE mount (phoenixfs mount without --fscache)")]
    NoOnDemand,
    #[error("this kernel's cachefiles cannot `restore` requests of a dead daemon (Linux 6.8+), so a daemon restart would fail reads; use the FUSE mount (phoenixfs mount without --fscache)")]
    NoRestore,
    #[error("cachefiles refused `{command}`: {errno}")]
    Command { command: String, errno: Errno },
    #[error("reading /dev/cachefiles: {0}")]
    Read(Errno),
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error("writing cache object {object_id} at {offset}: {errno}")]
    Fill { object_id: u32, offset: u64, errno: Errno },
    #[error("completing READ {msg_id}: {errno}")]
    Complete { msg_id: u32, errno: Errno },
}

/// An open `/dev/cachefiles`: the kernel's end of the cache. Whoever holds an fd of it keeps
/// the cache bound; closing the last one unbinds it and fails every mount on it.
pub struct Device {
    fd: OwnedFd,
}

impl Device {
    pub fn open(path: &Path) -> Result<Device, DeviceError> {
        match open(path, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()) {
            // SAFETY: open just returned this fd; nothing else owns it.
            Ok(fd) => Ok(Device { fd: unsafe { OwnedFd::from_raw_fd(fd) } }),
            Err(Errno::ENOENT | Errno::ENODEV | Errno::ENXIO) => Err(DeviceError::Missing),
            Err(Errno::EBUSY) => Err(DeviceError::Busy),
            Err(errno) => Err(DeviceError::Command { command: format!("open {}", path.display()), errno }),
        }
    }

    /// A device fd another process opened and bound (handed over).
    pub fn from_fd(fd: OwnedFd) -> Device {
        Device { fd }
    }

    /// Binds the cache: cache files under `dir` (not tmpfs), culled by `tag`, in on-demand
    /// mode. Mounts that use the cache may start only after this returns.
    pub fn bind_ondemand(&self, dir: &Path, tag: &str) -> Result<(), DeviceError> {
        self.command(&format!("dir {}", dir.display()))?;
        self.command(&format!("tag {tag}"))?;
        match self.command("bind ondemand") {
            Err(DeviceError::Command { errno: Errno::EINVAL | Errno::EOPNOTSUPP, .. }) => Err(DeviceError::NoOnDemand),
            other => other,
        }
    }

    /// After a daemon died: delivers again every request it had read and not answered.
    pub fn restore(&self) -> Result<(), DeviceError> {
        match self.command("restore") {
            Err(DeviceError::Command { errno: Errno::EINVAL | Errno::EOPNOTSUPP, .. }) => Err(DeviceError::NoRestore),
            other => other,
        }
    }

    /// Answers the OPEN `msg_id`: the object is `size` bytes, or a negative errno refuses it.
    pub fn copen(&self, msg_id: u32, size: Result<u64, Errno>) -> Result<(), DeviceError> {
        let size = match size {
            Ok(size) => size.to_string(),
            Err(errno) => (-(errno as i32)).to_string(),
        };
        self.command(&format!("copen {msg_id},{size}"))
    }

    fn command(&self, command: &str) -> Result<(), DeviceError> {
        loop {
            match nix::unistd::write(&self.fd, command.as_bytes()) {
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(DeviceError::Command { command: command.to_string(), errno }),
                Ok(_) => return Ok(()),
            }
        }
    }

    /// Waits up to `timeout` for a request and reads it; `None` when there was none (or
    /// another thread took it first). The kernel gives an OPEN's anonymous fd to the
    /// reading process, so the caller owns it from here on.
    pub fn next_message(&self, timeout: PollTimeout) -> Result<Option<Message>, DeviceError> {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => return Ok(None),
            Ok(_) => {}
            Err(errno) => return Err(DeviceError::Read(errno)),
        }
        let mut buf = [0u8; MAX_MESSAGE];
        match nix::unistd::read(self.fd.as_raw_fd(), &mut buf) {
            Ok(0) | Err(Errno::EINTR | Errno::EAGAIN) => Ok(None),
            Ok(n) => Ok(Some(Message::decode(&buf[..n])?)),
            Err(errno) => Err(DeviceError::Read(errno)),
        }
    }
}

impl From<Device> for OwnedFd {
    fn from(device: Device) -> OwnedFd {
        device.fd
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One cache object's anonymous fd, from its OPEN. Closing it is how the object is released;
/// if the daemon dies, the kernel re-opens the object on its next READ.
pub struct Object {
    pub object_id: u32,
    fd: OwnedFd,
}

impl Object {
    /// Takes ownership of the fd an OPEN message named.
    ///
    /// # Safety
    /// `fd` must be the anonymous fd of an OPEN this process read, not yet owned elsewhere.
    pub unsafe fn from_open(object_id: u32, fd: u32) -> Object {
        // SAFETY: the caller promises the kernel installed this fd for us alone.
        Object { object_id, fd: unsafe { OwnedFd::from_raw_fd(fd as i32) } }
    }

    /// Writes `pages` (whole pages, from a page-aligned buffer) at `offset` (page-aligned).
    pub fn fill(&self, offset: u64, pages: &AlignedPages) -> Result<(), DeviceError> {
        let mut written = 0;
        while written < pages.len() {
            let at = offset + written as u64;
            match nix::sys::uio::pwrite(&self.fd, &pages.as_slice()[written..], at as i64) {
                Ok(0) => return Err(DeviceError::Fill { object_id: self.object_id, offset: at, errno: Errno::EIO }),
                Ok(n) => written += n,
                Err(Errno::EINTR) => {}
                Err(errno) => return Err(DeviceError::Fill { object_id: self.object_id, offset: at, errno }),
            }
        }
        Ok(())
    }

    /// Tells the kernel the READ `msg_id` has its data in the cache file.
    pub fn complete(&self, msg_id: u32) -> Result<(), DeviceError> {
        // SAFETY: a plain ioctl on an fd we own; the argument is passed by value.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), CACHEFILES_IOC_READ_COMPLETE, msg_id as libc::c_ulong) };
        if rc < 0 {
            return Err(DeviceError::Complete { msg_id, errno: Errno::last() });
        }
        Ok(())
    }
}

/// A zeroed, page-aligned buffer of whole pages, as direct I/O to a cache file needs.
pub struct AlignedPages {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedPages {}

impl AlignedPages {
    /// `len` rounded up to whole pages, zeroed.
    pub fn zeroed(len: usize) -> AlignedPages {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        let layout = std::alloc::Layout::from_size_align(len, PAGE).expect("page layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedPages { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedPages {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, PAGE).expect("page layout");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// The page-aligned span that covers `len` bytes at `offset`: (start, length).
pub fn page_span(offset: u64, len: u64) -> (u64, u64) {
    let page = PAGE as u64;
    let start = offset / page * page;
    let end = offset.saturating_add(len).div_ceil(page) * page;
    (start, end - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_whole_pages() {
        assert_eq!(page_span(0, 1), (0, 4096));
        assert_eq!(page_span(4096, 4096), (4096, 4096));
        assert_eq!(page_span(4095, 2), (0, 8192));
        assert_eq!(page_span(1 << 20, 128 << 10), (1 << 20, 128 << 10));
    }

    #[test]
    fn aligned_pages_are_aligned_zeroed_and_whole() {
        let mut pages = AlignedPages::zeroed(5000);
        assert_eq!(pages.len(), 8192);
        assert_eq!(pages.as_slice().as_ptr() as usize % PAGE, 0);
        assert!(pages.as_slice().iter().all(|&b| b == 0));
        pages.as_mut_slice()[8191] = 1;
        assert_eq!(pages.as_slice()[8191], 1);
    }

    #[test]
    fn a_missing_device_says_what_is_missing() {
        let err = Device::open(Path::new("/nonexistent/cachefiles")).err().unwrap();
        assert!(matches!(err, DeviceError::Missing), "{err}");
        assert!(err.to_string().contains("FUSE mount"));
    }
}
