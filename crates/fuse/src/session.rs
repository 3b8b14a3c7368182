//! Mounting, the INIT handshake, and serving requests from several threads on one fd.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_abi::linux as abi;
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount as mount2, MsFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, warn};
use zerocopy::IntoBytes;

use crate::counts::{OpcodeCounts, OpcodeTotals};
use crate::fs::{DirEntryOut, Filesystem, Opening, Piece};
use crate::opens::{OpenMode, OpenTable};
use crate::reply::{self, out_header, OUT_HEADER_SIZE};
use crate::request::{parse, Operation, Request};

/// Largest READ we ask for: 256 pages.
pub const MAX_PAGES: u16 = 256;
const MAX_READ: usize = MAX_PAGES as usize * 4096;
/// A request buffer must hold the largest WRITE plus headers; we never get writes of data,
/// but the kernel sizes requests by max_write, so it is the same.
const BUFFER_SIZE: usize = MAX_READ + 4096;
/// The FUSE minor version whose structures we speak (fuse-abi's).
const OUR_MINOR: u32 = abi::FUSE_KERNEL_MINOR_VERSION;

static ZEROS: [u8; MAX_READ] = [0; MAX_READ];

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("opening /dev/fuse: {0}")]
    OpenDevice(Errno),
    #[error("mounting on {mountpoint}: {errno}")]
    Mount { mountpoint: String, errno: Errno },
    #[error("reading from /dev/fuse: {0}")]
    Read(Errno),
    #[error("the kernel's first request was not INIT")]
    NoInit,
    #[error("the kernel speaks FUSE {0}, not 7")]
    Major(u32),
    #[error("the connection ended before INIT")]
    Unmounted,
    #[error("sending a notification to the kernel: {0}")]
    Notify(Errno),
    #[error("installing the stop signal handler: {0}")]
    Signal(Errno),
    #[error("the session negotiated passthrough opens but was given no open-file table")]
    NoOpenTable,
}

/// Everything negotiated at INIT: the only session state. The kernel never sends INIT again,
/// so a process taking over a live connection must be given this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionParams {
    pub kernel_minor: u32,
    /// The minor version both sides use: min(kernel's, ours).
    pub minor: u32,
    /// All capability flags the kernel offered (flags | flags2 << 32).
    pub kernel_flags: u64,
    /// The flags we accepted.
    pub flags: u64,
    pub max_readahead: u32,
    pub max_write: u32,
    pub max_pages: u16,
}

impl SessionParams {
    /// Whether the kernel can resend requests a dead daemon had read (Linux 6.9+).
    pub fn has_resend(&self) -> bool {
        self.kernel_flags & abi::FUSE_HAS_RESEND != 0
    }

    /// Whether files may be opened in passthrough mode (Linux 6.9+, asked for at INIT): then
    /// every OPEN of a file is answered, never with ENOSYS.
    pub fn passthrough(&self) -> bool {
        self.flags & abi::FUSE_PASSTHROUGH != 0
    }

    /// Whether an ENOSYS answer to OPEN (OPENDIR) makes the kernel stop sending them and
    /// open every file (directory) with FOPEN_KEEP_CACHE (and FOPEN_CACHE_DIR) by itself:
    /// opens then cost no round trip and hold no state at all.
    fn opens_optional(&self, dir: bool) -> bool {
        let flag = if dir { abi::FUSE_NO_OPENDIR_SUPPORT } else { abi::FUSE_NO_OPEN_SUPPORT };
        self.flags & u64::from(flag) != 0
    }
}

pub struct MountOptions {
    /// Shown as the mount's source in /proc/mounts.
    pub source: String,
    pub allow_other: bool,
}

/// Opens `/dev/fuse` and mounts it read-only on `mountpoint` as `fuse.phoenixfs`.
pub fn mount(mountpoint: &Path, options: &MountOptions) -> Result<OwnedFd, SessionError> {
    let fd = open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()).map_err(SessionError::OpenDevice)?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut data = format!("fd={},rootmode=40000,user_id=0,group_id=0,default_permissions", fd.as_raw_fd());
    if options.allow_other {
        data.push_str(",allow_other");
    }
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
    mount2(Some(options.source.as_str()), mountpoint, Some("fuse.phoenixfs"), flags, Some(data.as_str()))
        .map_err(|errno| SessionError::Mount { mountpoint: mountpoint.display().to_string(), errno })?;
    Ok(fd)
}

/// A live, initialised FUSE connection.
pub struct Session {
    fd: OwnedFd,
    params: SessionParams,
    /// Set by [`Session::stop`]: serving threads stop reading at the next request boundary.
    stopping: AtomicBool,
    /// The serving threads blocked in (or about to enter) read(2), for `stop` to interrupt.
    readers: Mutex<Vec<libc::pthread_t>>,
    first_reply: FirstReply,
    resent: AtomicU64,
    counts: OpcodeCounts,
    passthrough_opens: AtomicU64,
    backing_refused: AtomicBool,
    /// Which files are open in which mode, when the session negotiated passthrough.
    opens: Option<OpenTable>,
}

/// Runs a hook once, when the first reply has been written (takeover stalls end there).
#[derive(Default)]
struct FirstReply {
    done: AtomicBool,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl FirstReply {
    fn replied(&self) {
        if self.done.load(Ordering::Relaxed) || self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(hook) = self.hook.lock().unwrap_or_else(|p| p.into_inner()).take() {
            hook();
        }
    }
}

/// Why [`Session::serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The file system was unmounted (the connection is gone).
    Unmounted,
    /// [`Session::stop`] was called; every request read was answered.
    Stopped,
}

/// The signal that interrupts a serving thread's read(2) when the session stops.
const STOP_SIGNAL: Signal = Signal::SIGUSR1;

extern "C" fn interrupt_read(_: libc::c_int) {}

/// Capabilities we take when the kernel offers them.
///
/// Not FUSE_READDIRPLUS_AUTO: with it the kernel asks for attributes only with a directory's
/// first batch of entries and then LOOKUPs every later entry one by one (a `find` of 24,119
/// entries sent 21,396 LOOKUPs); our attributes cost nothing to give, so every batch has them.
const WANTED_FLAGS: u64 = abi::FUSE_ASYNC_READ as u64
    | abi::FUSE_DO_READDIRPLUS as u64
    | abi::FUSE_MAX_PAGES as u64
    | abi::FUSE_CACHE_SYMLINKS as u64
    | abi::FUSE_PARALLEL_DIROPS as u64
    | abi::FUSE_INIT_EXT as u64
    | abi::FUSE_NO_OPEN_SUPPORT as u64
    | abi::FUSE_NO_OPENDIR_SUPPORT as u64
    | abi::FUSE_HAS_RESEND;

impl Session {
    /// Answers the kernel's INIT on a freshly mounted fd, asking for passthrough opens if
    /// `passthrough`. The session serves nothing itself: [`Session::resume`] it.
    pub fn init(fd: OwnedFd, passthrough: bool) -> Result<(OwnedFd, SessionParams), SessionError> {
        let mut buf = vec![0u8; BUFFER_SIZE];
        let n = loop {
            match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                Ok(n) => break n,
                Err(Errno::EINTR | Errno::ENOENT) => continue,
                Err(Errno::ENODEV) => return Err(SessionError::Unmounted),
                Err(e) => return Err(SessionError::Read(e)),
            }
        };
        let request = parse(&buf[..n]).map_err(|_| SessionError::NoInit)?;
        let Operation::Init(init) = request.op else { return Err(SessionError::NoInit) };
        if init.major != 7 {
            send(fd.as_fd(), request.unique, -libc::EPROTO, &[]);
            return Err(SessionError::Major(init.major));
        }
        let kernel_flags = u64::from(init.flags) | (u64::from(init.flags2) << 32);
        let wanted = if passthrough { WANTED_FLAGS | abi::FUSE_PASSTHROUGH } else { WANTED_FLAGS };
        let flags = kernel_flags & wanted;
        let params = SessionParams {
            kernel_minor: init.minor,
            minor: init.minor.min(OUR_MINOR),
            kernel_flags,
            flags,
            max_readahead: init.max_readahead,
            max_write: MAX_READ as u32,
            max_pages: MAX_PAGES,
        };
        let out = abi::fuse_init_out {
            major: 7,
            minor: OUR_MINOR,
            max_readahead: params.max_readahead,
            flags: flags as u32,
            max_background: 64,
            congestion_threshold: 48,
            max_write: params.max_write,
            time_gran: 1,
            max_pages: params.max_pages,
            flags2: (flags >> 32) as u32,
            // Backing files on a disk file system (stacking depth 0) under this one.
            max_stack_depth: u32::from(flags & abi::FUSE_PASSTHROUGH != 0),
            ..Default::default()
        };
        send(fd.as_fd(), request.unique, 0, &[IoSlice::new(out.as_bytes())]);
        debug!(kernel_minor = init.minor, flags = format_args!("{flags:#x}"), "FUSE session initialised");
        Ok((fd, params))
    }

    /// Resumes a connection another process initialised: the kernel never sends INIT again,
    /// so `params` must be what that process negotiated. A passthrough session needs the
    /// mount's open-file table (every process serving it must share one).
    pub fn resume(fd: OwnedFd, params: SessionParams, opens: Option<OpenTable>) -> Result<Session, SessionError> {
        if params.passthrough() && opens.is_none() {
            return Err(SessionError::NoOpenTable);
        }
        Ok(Session {
            fd,
            params,
            stopping: AtomicBool::new(false),
            readers: Mutex::new(Vec::new()),
            first_reply: FirstReply::default(),
            resent: AtomicU64::new(0),
            counts: OpcodeCounts::new(),
            passthrough_opens: AtomicU64::new(0),
            backing_refused: AtomicBool::new(false),
            opens: opens.filter(|_| params.passthrough()),
        })
    }

    /// Calls `hook` once, right after this session writes its first reply.
    pub fn on_first_reply(&self, hook: impl FnOnce() + Send + 'static) {
        *self.first_reply.hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(hook));
    }

    /// Requests this session has read that carried the resend mark (bit 63 of `unique`).
    pub fn resent_requests(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
    }

    /// OPENs this session answered in passthrough mode.
    pub fn passthrough_opens(&self) -> u64 {
        self.passthrough_opens.load(Ordering::Relaxed)
    }

    /// Requests this session has read, and those it answered with an error, by opcode.
    pub fn opcode_totals(&self) -> OpcodeTotals {
        self.counts.totals()
    }

    /// Makes [`Session::serve`] return [`Ended::Stopped`]: each serving thread stops reading
    /// at a request boundary and finishes the request it holds. Returns when all have; another
    /// process reading the same connection keeps it served meanwhile.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // A thread may check the flag just before it blocks in read(2), so interrupt until
        // every one has left.
        loop {
            {
                let readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
                if readers.is_empty() {
                    return;
                }
                for &thread in readers.iter() {
                    // SAFETY: threads deregister (under this lock) before they exit, so
                    // every id here names a live thread.
                    unsafe { libc::pthread_kill(thread, STOP_SIGNAL as libc::c_int) };
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// FUSE_NOTIFY_RESEND: the kernel queues again every request that was read from this
    /// connection but never answered (a dead worker's), marked with bit 63 of `unique`.
    pub fn notify_resend(&self) -> Result<(), SessionError> {
        const FUSE_NOTIFY_RESEND: i32 = 7;
        let header = out_header(OUT_HEADER_SIZE, FUSE_NOTIFY_RESEND, 0);
        nix::unistd::write(&self.fd, &header).map(drop).map_err(SessionError::Notify)
    }

    /// Serves requests on `threads` threads until the file system is unmounted or
    /// [`Session::stop`] is called.
    pub fn serve(&self, fs: Arc<dyn Filesystem>, threads: usize) -> Result<Ended, SessionError> {
        // No SA_RESTART: the stop signal must make a blocked read(2) return EINTR.
        let action = SigAction::new(SigHandler::Handler(interrupt_read), SaFlags::empty(), SigSet::empty());
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        unsafe { sigaction(STOP_SIGNAL, &action) }.map_err(SessionError::Signal)?;
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|i| {
                    let fs = fs.clone();
                    std::thread::Builder::new()
                        .name(format!("fuse-{i}"))
                        .spawn_scoped(scope, move || self.serve_thread(fs.as_ref()))
                        .expect("spawning a FUSE thread")
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("FUSE thread panicked")).collect::<Result<Vec<()>, _>>()
        })?;
        Ok(if self.stopping.load(Ordering::SeqCst) { Ended::Stopped } else { Ended::Unmounted })
    }

    fn serve_thread(&self, fs: &dyn Filesystem) -> Result<(), SessionError> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).push(me);
        let result = self.read_requests(fs);
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).retain(|&t| t != me);
        result
    }

    fn read_requests(&self, fs: &dyn Filesystem) -> Result<(), SessionError> {
        let mut buf = vec![0u8; BUFFER_SIZE];
        while !self.stopping.load(Ordering::SeqCst) {
            let n = match nix::unistd::read(self.fd.as_raw_fd(), &mut buf) {
                Ok(n) => n,
                // ENOENT: the request was interrupted before we read it.
                Err(Errno::EINTR | Errno::ENOENT | Errno::EAGAIN) => continue,
                Err(Errno::ENODEV) => return Ok(()),
                Err(e) => return Err(SessionError::Read(e)),
            };
            match parse(&buf[..n]) {
                Ok(request) => {
                    self.counts.request(request.opcode);
                    if request.unique & RESENT != 0 {
                        self.resent.fetch_add(1, Ordering::Relaxed);
                    }
                    dispatch(self, fs, request)
                }
                Err(error) => {
                    warn!(%error, "malformed FUSE request");
                    if let Some(unique) = error.unique_to_answer() {
                        self.send(unique, -libc::EIO, &[]);
                    }
                }
            }
        }
        Ok(())
    }

    fn send(&self, unique: u64, error: i32, body: &[IoSlice<'_>]) {
        send(self.fd.as_fd(), unique, error, body);
        self.first_reply.replied();
    }

    /// FUSE_DEV_IOC_BACKING_OPEN: `file` becomes a backing file of this connection. The
    /// kernel keeps its own reference; the id lives until [`Session::close_backing`].
    fn register_backing(&self, file: &File) -> Option<u32> {
        let map = abi::fuse_backing_map { fd: file.as_raw_fd(), flags: 0, padding: 0 };
        // SAFETY: the fd is /dev/fuse's and `map` is the struct this ioctl reads.
        match unsafe { backing_open(self.fd.as_raw_fd(), &map) } {
            Ok(id) => u32::try_from(id).ok().filter(|&id| id != 0),
            Err(errno) => {
                // Once: a cache directory the kernel refuses (on a stacked file system, say)
                // would refuse every copy.
                if !self.backing_refused.swap(true, Ordering::Relaxed) {
                    warn!(%errno, "the kernel refuses a passthrough copy as a backing file: such opens go through the page cache");
                }
                None
            }
        }
    }

    fn close_backing(&self, backing_id: u32) {
        // SAFETY: the fd is /dev/fuse's and the argument is the u32 this ioctl reads.
        if let Err(errno) = unsafe { backing_close(self.fd.as_raw_fd(), &backing_id) } {
            warn!(%errno, backing_id, "cannot close a backing file");
        }
    }
}

nix::ioctl_write_ptr!(backing_open, 229, 1, abi::fuse_backing_map);
nix::ioctl_write_ptr!(backing_close, 229, 2, u32);

/// The kernel marks a request it queues again after FUSE_NOTIFY_RESEND with bit 63.
const RESENT: u64 = 1 << 63;

/// Writes one reply. A reply to a request the kernel gave up on (ENOENT) is not an error.
fn send(fd: BorrowedFd<'_>, unique: u64, error: i32, body: &[IoSlice<'_>]) {
    let len = OUT_HEADER_SIZE + body.iter().map(|s| s.len()).sum::<usize>();
    let header = out_header(len, error, unique);
    let mut iov = Vec::with_capacity(body.len() + 1);
    iov.push(IoSlice::new(&header));
    iov.extend_from_slice(body);
    match nix::sys::uio::writev(fd, &iov) {
        Ok(_) | Err(Errno::ENOENT) => {}
        Err(e) => warn!(unique, error = %e, "writing a FUSE reply"),
    }
}

/// Answers one request exactly once: consumed by the first answer, and answers EIO if it is
/// dropped unanswered (a handler forgot, or panicked).
struct Reply<'a> {
    session: &'a Session,
    unique: u64,
    opcode: u32,
    answered: bool,
}

impl Reply<'_> {
    fn ok(mut self, body: &[u8]) {
        self.answered = true;
        self.session.counts.replied(self.opcode, body.len());
        self.session.send(self.unique, 0, &[IoSlice::new(body)]);
    }

    fn error(mut self, errno: Errno) {
        self.answered = true;
        self.session.counts.error(self.opcode);
        self.session.send(self.unique, -(errno as i32), &[]);
    }

    fn result(self, result: Result<Vec<u8>, Errno>) {
        match result {
            Ok(body) => self.ok(&body),
            Err(errno) => self.error(errno),
        }
    }

    fn data(mut self, pieces: &[Piece]) {
        self.answered = true;
        let mut iov = Vec::with_capacity(pieces.len());
        for piece in pieces {
            match piece {
                Piece::Zeros(n) => {
                    let mut left = *n;
                    while left > 0 {
                        let take = left.min(ZEROS.len());
                        iov.push(IoSlice::new(&ZEROS[..take]));
                        left -= take;
                    }
                }
                Piece::Shared { data, start, end } => iov.push(IoSlice::new(&data[*start..*end])),
                Piece::Owned(v) => iov.push(IoSlice::new(v)),
            }
        }
        self.session.counts.replied(self.opcode, iov.iter().map(|slice| slice.len()).sum());
        self.session.send(self.unique, 0, &iov);
    }
}

impl Drop for Reply<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.session.counts.error(self.opcode);
            self.session.send(self.unique, -libc::EIO, &[]);
        }
    }
}

fn dispatch(session: &Session, fs: &dyn Filesystem, request: Request<'_>) {
    if !request.op.wants_reply() {
        return;
    }
    let params = &session.params;
    let node = request.nodeid;
    let reply = Reply { session, unique: request.unique, opcode: request.opcode, answered: false };
    match request.op {
        Operation::Init(_) => reply.error(Errno::EPROTO),
        Operation::Release { fh } => {
            if let Some(opens) = &session.opens {
                if let Some(backing_id) = opens.release(node, fh) {
                    session.close_backing(backing_id);
                }
                fs.released(node);
            }
            reply.ok(&[])
        }
        // ENOSYS makes the kernel stop sending these for good: a FLUSH came with every
        // close(2), a round trip that cost 40 us of each open-and-close of a cached file.
        Operation::Sync => reply.error(Errno::ENOSYS),
        Operation::Destroy | Operation::Releasedir => reply.ok(&[]),
        Operation::Lookup { name } => reply.result(match fs.lookup(node, name) {
            Ok(entry) => Ok(reply::entry_out(&entry.attr).as_bytes().to_vec()),
            // The image never changes, so a name it lacks stays absent: a negative entry the
            // kernel keeps (as it keeps the others) spares the daemon every later probe of it,
            // such as an interpreter's search along its module path.
            Err(Errno::ENOENT) => Ok(reply::negative_entry_out().as_bytes().to_vec()),
            Err(errno) => Err(errno),
        }),
        Operation::Getattr => reply.result(fs.getattr(node).map(|a| reply::attr_out(&a))),
        Operation::Statx => reply.result(fs.getattr(node).map(|a| reply::statx_out(&a))),
        Operation::Readlink => reply.result(fs.readlink(node)),
        Operation::Open { flags } => {
            if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                return reply.error(Errno::EROFS);
            }
            let Some(opens) = &session.opens else {
                if params.opens_optional(false) {
                    return reply.error(Errno::ENOSYS);
                }
                return reply.result(fs.open(node).map(|_| reply::open_out(abi::FOPEN_KEEP_CACHE)));
            };
            reply.result(fs.open(node).map(|opening| match opening {
                Opening::Cached => reply::open_out(abi::FOPEN_KEEP_CACHE | abi::FOPEN_NOFLUSH),
                Opening::Passthrough { backing } => match opens.open(node, || backing.and_then(|file| session.register_backing(&file))) {
                    OpenMode::Cached { fh } => reply::open_out_with(fh, abi::FOPEN_KEEP_CACHE | abi::FOPEN_NOFLUSH, 0),
                    OpenMode::Passthrough { fh, backing_id } => {
                        session.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                        reply::open_out_with(fh, abi::FOPEN_PASSTHROUGH | abi::FOPEN_NOFLUSH, backing_id)
                    }
                },
            }))
        }
        Operation::Opendir if params.opens_optional(true) => reply.error(Errno::ENOSYS),
        Operation::Opendir => reply.result(fs.getattr(node).map(|_| reply::open_out(abi::FOPEN_KEEP_CACHE | abi::FOPEN_CACHE_DIR))),
        Operation::Read { offset, size } => match fs.read(node, offset, size.min(MAX_READ as u32)) {
            Ok(pieces) => reply.data(&pieces),
            Err(errno) => reply.error(errno),
        },
        Operation::Readdir { offset, size, plus } => reply.result(readdir(fs, node, offset, size as usize, plus)),
        Operation::Statfs => reply.ok(&reply::statfs_out(&fs.statfs())),
        Operation::Getxattr { name, size } => reply.result(fs.getxattr(node, name).and_then(|v| sized(v, size))),
        Operation::Listxattr { size } => reply.result(fs.listxattr(node).and_then(|v| sized(v, size))),
        Operation::Access { mask } => {
            if mask & libc::W_OK as u32 != 0 {
                reply.error(Errno::EROFS)
            } else {
                reply.result(fs.getattr(node).map(|_| Vec::new()))
            }
        }
        Operation::Lseek { offset, whence } => reply.result(fs.lseek(node, offset, whence).map(reply::lseek_out)),
        Operation::Write { .. } => reply.error(Errno::EROFS),
        Operation::Unknown { opcode } => {
            debug!(opcode, "unsupported FUSE opcode");
            reply.error(Errno::ENOSYS)
        }
        Operation::Forget | Operation::NoReply => unreachable!("filtered above"),
    }
}

/// GETXATTR/LISTXATTR: size 0 asks for the length, a short buffer gets ERANGE.
fn sized(value: Vec<u8>, size: u32) -> Result<Vec<u8>, Errno> {
    if size == 0 {
        Ok(reply::xattr_size_out(value.len() as u32))
    } else if value.len() > size as usize {
        Err(Errno::ERANGE)
    } else {
        Ok(value)
    }
}

fn readdir(fs: &dyn Filesystem, node: u64, cookie: u64, size: usize, plus: bool) -> Result<Vec<u8>, Errno> {
    let mut buf = Vec::with_capacity(size.min(MAX_READ));
    let mut failure = None;
    fs.readdir(node, cookie, &mut |entry: DirEntryOut| {
        if !plus {
            return reply::push_dirent(&mut buf, size, &entry, None);
        }
        if entry.name == b"." || entry.name == b".." {
            return reply::push_dirent_plus_unlooked(&mut buf, size, &entry);
        }
        match fs.getattr(entry.ino) {
            Ok(attr) => reply::push_dirent(&mut buf, size, &entry, Some(&attr)),
            Err(errno) => {
                failure = Some(errno);
                false
            }
        }
    })?;
    match failure {
        Some(errno) if buf.is_empty() => Err(errno),
        _ => Ok(buf),
    }
}
