//! The worker: takes over the connection from a holder, asks the kernel to resend what a dead
//! predecessor left unanswered, and serves until unmounted or retired by an upgrade. When its
//! holder dies it starts a new one and hands it the fd and state.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use phoenixfs_cache::{CacheError, ChunkCache, SharedChunks};
use phoenixfs_format::{ExtentTarget, ImageId, InodeKind};
use phoenixfs_fuse::{Ended, OpenTable, Session};
use tracing::{info, warn};

use crate::error::MountError;
use crate::fs::ImageFs;
use crate::handover::{self, History, Message, SessionFds, State, Takeover};
use crate::histogram::DurationHistogram;
use crate::holder::{start_with_handover, Role};
use crate::image_memory;
use crate::os::{die_on_panic, lowest_priority_for_this_thread, retry_until_done, monotonic_ns, rss_bytes, set_cloexec, spawn_thread};
use crate::spec::Prefetch;
use crate::status::{self, Status};

/// The worker's side of its link to the holder; replaced when the holder dies.
struct HolderLink {
    channel: Mutex<Arc<OwnedFd>>,
    holder_pid: AtomicU32,
    /// The state to hand a new holder: this worker's, plus its own takeover stall.
    state: Mutex<State>,
    /// Set once the worker is retiring or the mount is gone: no new holder then.
    leaving: AtomicBool,
    /// The session's memory objects, to hand a new holder (the FUSE fd is the session's).
    image: OwnedFd,
    chunks: Option<OwnedFd>,
    opens: Option<OwnedFd>,
}

impl HolderLink {
    fn channel(&self) -> Arc<OwnedFd> {
        self.channel.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn tell(&self, message: &Message) {
        if let Err(error) = handover::send_message(self.channel().as_fd(), message) {
            warn!(?message, %error, "cannot tell the holder");
        }
    }
}

/// The hidden `worker` subcommand. Refuses state it cannot read.
pub fn run_worker() -> Result<(), MountError> {
    die_on_panic();
    // SAFETY: the holder started this process with the hand-over socket as fd 3, and nothing
    // else in this process owns fd 3.
    let channel = unsafe { OwnedFd::from_raw_fd(3) };
    set_cloexec(channel.as_fd());
    let started = handover::receive(channel.as_fd()).map_err(MountError::from).and_then(|(state, fds)| {
        handover::check_peer(channel.as_fd(), state.spec.owner_uid)?;
        let SessionFds { fuse, image, chunks, opens } = fds;
        let table = opens.as_ref().map(OpenTable::adopt).transpose()?;
        let session = Arc::new(Session::resume(fuse, state.params, table)?);
        let fs = start_serving(&state, &session, &image, chunks.as_ref())?;
        Ok((state, session, fs, image, chunks, opens))
    });
    let (mut state, session, fs, image, chunks, opens) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = handover::send_message(channel.as_fd(), &Message::Failed(e.to_string()));
            return Err(e);
        }
    };
    let standby = state.takeover == Takeover::Standby;
    if standby {
        let _ = handover::send_message(channel.as_fd(), &Message::Ready { pid: std::process::id() });
        let Some((died_at_ns, history)) = await_go(channel.as_fd()) else {
            // Let go, or the holder died (the serving worker replaces it): not needed.
            return Ok(());
        };
        state.apply(history);
        state.takeover = Takeover::AfterDeath { died_at_ns };
        state.launched_at_ns = monotonic_ns();
        resend_after_death(&state, &session)?;
    }
    index_cache_in_background(&fs.cache)?;
    let threads = state.spec.threads;
    let link = Arc::new(HolderLink {
        channel: Mutex::new(Arc::new(channel)),
        holder_pid: AtomicU32::new(state.holder_pid),
        state: Mutex::new(state),
        leaving: AtomicBool::new(false),
        image,
        chunks,
        opens,
    });
    watch_first_reply(&session, &link);
    let start_us = monotonic_ns().saturating_sub(link.state.lock().unwrap_or_else(|p| p.into_inner()).launched_at_ns) / 1000;
    serve_status(&session, &fs, &link, start_us)?;
    if !standby {
        link.tell(&Message::Ready { pid: std::process::id() });
    }
    {
        let state = link.state.lock().unwrap_or_else(|p| p.into_inner());
        info!(mountpoint = %state.spec.mountpoint.display(), image = %state.image_id, takeover = ?state.takeover, start_ms = start_us as f64 / 1000.0, "worker serving");
    }
    {
        let (session, link) = (session.clone(), link.clone());
        spawn_thread("holder-link", move || follow_holder(&session, &link))?;
    }
    let ended = session.serve(fs, threads)?;
    link.leaving.store(true, Ordering::SeqCst);
    match ended {
        Ended::Unmounted => link.tell(&Message::Unmounted),
        Ended::Stopped => {
            info!(resent = session.resent_requests(), "retired: a newer worker serves the mount");
            link.tell(&Message::Retired);
        }
    }
    Ok(())
}

/// Maps the image, opens the store and cache the state names, and resends a dead
/// predecessor's requests; everything before the first read. Nothing here grows with the
/// image or the cache: a takeover costs the same at any size.
fn start_serving(state: &State, session: &Session, image: &OwnedFd, chunks: Option<&OwnedFd>) -> Result<Arc<ImageFs>, MountError> {
    let spec = &state.spec;
    let store = spec.open_store()?;
    let image_id: ImageId = state.image_id.parse().map_err(|_| MountError::ImageMemory(format!("the state names no image id ({:?})", state.image_id)))?;
    let image = image_memory::map(image, image_id)?;
    let shared = chunks.and_then(adopt_shared_chunks);
    // Beside the shared memory, this worker's own only spares the several READs that cover
    // one chunk a copy each. Without it (none asked for, or damaged), its own takes its place.
    let private_limit = match (&shared, spec.memory_limit) {
        (Some(_), _) | (None, 0) => PRIVATE_MEMORY,
        (None, limit) => limit,
    };
    let cache = Arc::new(ChunkCache::open_unindexed(&spec.cache_dir, spec.cache_limit, private_limit, shared)?.with_policy(spec.fetch_policy()));
    resend_after_death(state, session)?;
    let passthrough = spec.passthrough().filter(|_| session.params().passthrough());
    let fs = ImageFs::new(Arc::new(image), store, cache, spec.readahead, passthrough).map_err(|source| MountError::Io { what: "making the passthrough copies' directory".into(), source })?;
    if state.takeover == Takeover::First && spec.prefetch != Prefetch::Nothing {
        let (fs, prefetch, progress) = (fs.clone(), spec.prefetch.clone(), spec.progress);
        spawn_thread("prefetch", move || prefetch_chunks(&fs, &prefetch, progress))?;
    }
    Ok(fs)
}

/// Indexes the cache directory (for its size limit) as soon as the worker serves, at the
/// lowest priority. Not later: until its index is built a worker counts only what it wrote
/// itself, so a relay of workers each killed before a delay ran out grew the cache past its
/// limit (a 64 MiB cache held 109 MiB under kills every 10-300 ms).
fn index_cache_in_background(cache: &Arc<ChunkCache>) -> Result<(), MountError> {
    let cache = cache.clone();
    spawn_thread("cache-index", move || {
        lowest_priority_for_this_thread();
        if let Err(error) = cache.index_disk() {
            warn!(%error, "cannot index the cache directory; its size limit is not enforced for what it held");
        }
    })
}

/// Asks the kernel to resend what a dead predecessor had read. Harmless for the first worker
/// (nothing was read), wrong for an upgrade (the old worker still answers what it read), and
/// for a standby only once it is told to take over.
fn resend_after_death(state: &State, session: &Session) -> Result<(), MountError> {
    if state.params.has_resend() && matches!(state.takeover, Takeover::First | Takeover::AfterDeath { .. }) {
        session.notify_resend()?;
    }
    Ok(())
}

/// A standby waits for the holder's word: `Go` (when its predecessor died, and the history
/// it missed), or nothing (it was let go, or the holder died).
fn await_go(channel: BorrowedFd<'_>) -> Option<(u64, History)> {
    loop {
        match handover::receive_message(channel) {
            Ok(Some(Message::Go { died_at_ns, history })) => return Some((died_at_ns, history)),
            Ok(Some(other)) => warn!(message = ?other, "a standby worker was told something other than to take over"),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// The size of a worker's private memory cache beside the shared chunk memory.
const PRIVATE_MEMORY: u64 = 64 << 20;

/// Maps the mount's shared chunk memory; a damaged one is left alone (logged), and this
/// worker serves from its own memory and the cache directory instead.
fn adopt_shared_chunks(fd: &OwnedFd) -> Option<SharedChunks> {
    let adopted = fd.try_clone().map_err(|e| CacheError::SharedRegion { detail: e.to_string() }).and_then(SharedChunks::adopt);
    match adopted {
        Ok(shared) => Some(shared),
        Err(error) => {
            warn!(%error, "cannot use the mount's shared chunk memory; serving without it");
            None
        }
    }
}

/// After a predecessor's death, the stall ends with this worker's first reply: recorded in
/// the state (for status and a future holder) and told to the holder (for its log).
fn watch_first_reply(session: &Session, link: &Arc<HolderLink>) {
    let link = link.clone();
    session.on_first_reply(move || {
        let at_ns = monotonic_ns();
        {
            let mut state = link.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Takeover::AfterDeath { died_at_ns } = state.takeover {
                let stall_us = at_ns.saturating_sub(died_at_ns) / 1000;
                state.record_stall(stall_us);
                info!(stall_ms = stall_us as f64 / 1000.0, "first request answered after the takeover");
            }
        }
        link.tell(&Message::FirstReply { at_ns });
    });
}

/// Follows the holder's messages; when the holder dies, starts a new one.
fn follow_holder(session: &Session, link: &HolderLink) {
    let mut our_holder: Option<Child> = None;
    loop {
        let channel = link.channel();
        match handover::receive_message(channel.as_fd()) {
            Ok(Some(Message::Retire)) => {
                link.leaving.store(true, Ordering::SeqCst);
                return session.stop();
            }
            Ok(Some(Message::Resend)) => {
                if let Err(error) = session.notify_resend() {
                    warn!(%error, "cannot ask the kernel to resend");
                }
            }
            Ok(Some(Message::History(history))) => link.state.lock().unwrap_or_else(|p| p.into_inner()).apply(history),
            Ok(Some(other)) => warn!(message = ?other, "unexpected message from the holder"),
            Ok(None) | Err(_) => {
                if let Some(mut child) = our_holder.take() {
                    let _ = child.wait();
                }
                if link.leaving.load(Ordering::SeqCst) {
                    return;
                }
                warn!(pid = link.holder_pid.load(Ordering::Relaxed), "the holder died; starting another");
                our_holder = Some(replace_holder(session, link));
            }
        }
    }
}

/// Starts holders until one has taken the fd and state.
fn replace_holder(session: &Session, link: &HolderLink) -> Child {
    retry_until_done("cannot start a holder", || start_holder(session, link))
}

fn start_holder(session: &Session, link: &HolderLink) -> Result<Child, MountError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source: std::io::Error| MountError::Io { what, source }
    };
    let binary = std::env::current_exe().map_err(io("finding this binary"))?;
    let state = link.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let fds = SessionFds {
        fuse: session.fd().try_clone_to_owned().map_err(io("duplicating the FUSE fd"))?,
        image: link.image.try_clone().map_err(io("duplicating the image memfd"))?,
        chunks: link.chunks.as_ref().map(OwnedFd::try_clone).transpose().map_err(io("duplicating the chunk memfd"))?,
        opens: link.opens.as_ref().map(OwnedFd::try_clone).transpose().map_err(io("duplicating the open-file table"))?,
    };
    let (channel, child) = start_with_handover(&binary, Role::Holder, &state, &fds)?;
    link.holder_pid.store(child.id(), Ordering::Relaxed);
    *link.channel.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(channel);
    info!(pid = child.id(), "a new holder holds the mount");
    Ok(child)
}

fn serve_status(session: &Arc<Session>, fs: &Arc<ImageFs>, link: &Arc<HolderLink>, start_us: u64) -> Result<(), MountError> {
    let (session, fs, link) = (session.clone(), fs.clone(), link.clone());
    let (spec, log) = {
        let state = link.state.lock().unwrap_or_else(|p| p.into_inner());
        let log = if nix::unistd::isatty(2).unwrap_or(false) { "stderr".to_string() } else { status::log_path(&state.spec.mountpoint).display().to_string() };
        (state.spec.clone(), log)
    };
    let store_location = fs.store.location();
    let mountpoint = spec.mountpoint.clone();
    status::serve(&mountpoint, move || {
        let state = link.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let cache = &fs.cache;
        let (cache_chunks, cache_bytes) = cache.disk_usage();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let fetches = cache.fetches_in_flight();
        let opcodes = session.opcode_totals();
        let store_errors = cache.stats.fetch_errors.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(kind, n)| (kind.to_string(), *n)).collect();
        Status {
            pid: std::process::id(),
            holder_pid: link.holder_pid.load(Ordering::Relaxed),
            worker_restarts: state.restarts,
            upgrades: state.upgrades,
            takeover_stalls_ms: state.stalls_us.iter().map(|&us| us as f64 / 1000.0).collect(),
            takeovers_measured: state.takeovers_measured,
            resent_requests: session.resent_requests(),
            passthrough_opens: session.passthrough_opens(),
            mountpoint: spec.mountpoint.display().to_string(),
            image: spec.image.clone(),
            image_id: fs.image.id.to_string(),
            store: store_location.clone(),
            cache_dir: cache.dir().display().to_string(),
            cache_chunks,
            cache_bytes,
            cache_limit: spec.cache_limit,
            chunks_fetched: load(&cache.stats.fetches),
            fetched_bytes: load(&cache.stats.fetched_bytes),
            fetches_in_flight: fetches.in_flight,
            fetches_retrying: fetches.retrying,
            oldest_fetch_ms: fetches.oldest.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            fetch_retries: load(&cache.stats.fetch_retries),
            store_errors,
            cache_hits: load(&cache.stats.memory_hits) + load(&cache.stats.disk_hits),
            cache_misses: load(&cache.stats.fetches),
            corrupt_cache_entries_discarded: load(&cache.stats.corrupt_discarded),
            bytes_served: load(&fs.stats.bytes_served),
            requests: load(&fs.stats.requests),
            errors: load(&fs.stats.errors),
            log: log.clone(),
            fuse_kernel_minor: state.params.kernel_minor,
            fuse_resend_supported: state.params.has_resend(),
            worker_start_ms: start_us as f64 / 1000.0,
            worker_rss_bytes: rss_bytes(std::process::id()).unwrap_or(0),
            holder_rss_bytes: rss_bytes(link.holder_pid.load(Ordering::Relaxed)).unwrap_or(0),
            image_memory_bytes: fs.image.bytes().len() as u64,
            shared_memory_bytes: cache.shared().map_or(0, SharedChunks::capacity),
            shared_memory_hits: cache.shared().map_or(0, |s| load(&s.stats.hits)),
            shared_memory_discarded: cache.shared().map_or(0, |s| load(&s.stats.discarded)),
            requests_by_opcode: opcodes.requests.iter().map(|(name, n)| (name.to_string(), *n)).collect(),
            errors_by_opcode: opcodes.errors.iter().map(|(name, n)| (name.to_string(), *n)).collect(),
            reply_bytes_by_opcode: opcodes.reply_bytes.iter().map(|(name, n)| (name.to_string(), *n)).collect(),
            memory_hits: load(&cache.stats.memory_hits),
            disk_hits: load(&cache.stats.disk_hits),
            evictions: load(&cache.stats.evictions),
            fetch_durations: Some(DurationHistogram {
                bounds_us: cache.stats.fetch_durations.bounds_us().to_vec(),
                counts: cache.stats.fetch_durations.counts(),
                sum_us: cache.stats.fetch_durations.sum_us(),
            }),
            takeover_stall_histogram: Some(state.stall_histogram),
        }
    })
    .map(drop)
    .map_err(|source| MountError::Io { what: "creating the status socket".into(), source })
}

/// Warms the cache with the chunks of the listed files (or of every file), one at a time at
/// the lowest CPU priority, after the mount is serving.
fn prefetch_chunks(fs: &ImageFs, prefetch: &Prefetch, progress: bool) {
    lowest_priority_for_this_thread();
    let bootstrap = &fs.image.bootstrap;
    let inodes = match prefetch {
        Prefetch::Nothing => return,
        Prefetch::All => match bootstrap.walk() {
            Ok(all) => all.into_iter().map(|(_, inode)| inode).collect(),
            Err(error) => return warn!(%error, "cannot list the image for prefetch"),
        },
        Prefetch::Paths(paths) => paths
            .iter()
            .filter_map(|path| match bootstrap.resolve(path.as_bytes()) {
                Ok(Some(inode)) => Some(inode),
                _ => {
                    warn!(path, "prefetch: no such file in the image");
                    None
                }
            })
            .collect::<Vec<_>>(),
    };
    let mut chunks = BTreeSet::new();
    let mut ordered = Vec::new();
    for inode in inodes.iter().filter(|i| i.kind == InodeKind::File) {
        for extent in bootstrap.extents(inode, 0, inode.size()).unwrap_or_default() {
            if let ExtentTarget::Blob { offset } = extent.target {
                let Ok(index) = fs.image.table.locate(offset).map(|chunk| chunk.index) else { continue };
                if chunks.insert(index) {
                    ordered.push(index);
                }
            }
        }
    }
    let total = ordered.len();
    for (done, index) in ordered.into_iter().enumerate() {
        if let Ok(entry) = fs.image.table.entry(index) {
            if let Err(error) = fs.cache.get(&entry, fs.store.as_ref()) {
                warn!(chunk = index, %error, "prefetch fetch failed");
            }
        }
        if progress {
            eprint!("\rprefetch: {}/{total} chunks", done + 1);
        }
    }
    if progress {
        eprintln!();
    }
    info!(chunks = total, "prefetch done");
}
