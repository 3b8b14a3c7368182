//! A fault-injecting TCP proxy, put between phoenixfs and a storage server: it forwards
//! requests untouched and damages answers, at random, in every way a network or a dying
//! server can: a reset, a stall, a slow trickle, a truncated answer, a flipped bit. Each
//! piece of an answer (up to 64 KiB, as read from the server) draws its fate.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::chaos::XorShift;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection is reset (RST) in the middle of an answer.
    Reset,
    /// Nothing is forwarded for a while (longer than a hedge delay, shorter than a timeout).
    Stall,
    /// The piece is forwarded a few bytes at a time.
    Trickle,
    /// The answer ends early: part of the piece, then a clean close.
    Truncate,
    /// One bit of the piece is flipped.
    BitFlip,
}

pub const ALL_FAULTS: [Fault; 5] = [Fault::Reset, Fault::Stall, Fault::Trickle, Fault::Truncate, Fault::BitFlip];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Reset => "reset",
            Fault::Stall => "stall",
            Fault::Trickle => "trickle",
            Fault::Truncate => "truncate",
            Fault::BitFlip => "bitflip",
        }
    }
}

/// What the proxy did so far.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub pieces: AtomicU64,
    /// Faults done, in the order of [`ALL_FAULTS`].
    pub faults: [AtomicU64; 5],
}

pub struct FaultProxy {
    pub port: u16,
    pub stats: Arc<ProxyStats>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Proxies 127.0.0.1:`upstream`; each answer piece suffers one of `faults` with
    /// probability `per_mille` / 1000.
    pub fn start(upstream: u16, faults: &[Fault], per_mille: u64) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stats = Arc::new(ProxyStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (faults, thread_stats, thread_stop) = (faults.to_vec(), stats.clone(), stop.clone());
        std::thread::Builder::new().name("fault-proxy".into()).spawn(move || {
            let mut seed = 0x5eed_u64;
            for client in listener.incoming() {
                if thread_stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                thread_stats.connections.fetch_add(1, Ordering::Relaxed);
                let (faults, stats) = (faults.clone(), thread_stats.clone());
                std::thread::spawn(move || {
                    let _ = relay(client, upstream, &faults, per_mille, XorShift(seed | 1), &stats);
                });
            }
        })?;
        Ok(FaultProxy { port, stats, stop })
    }

    pub fn faults_done(&self) -> Vec<(&'static str, u64)> {
        ALL_FAULTS.iter().zip(&self.stats.faults).map(|(f, n)| (f.name(), n.load(Ordering::Relaxed))).collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Forwards one connection: requests as they are, answers through the fault dice.
fn relay(client: TcpStream, upstream: u16, faults: &[Fault], per_mille: u64, mut rng: XorShift, stats: &ProxyStats) -> io::Result<()> {
    let server = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], upstream)))?;
    let (mut client_in, mut server_out) = (client.try_clone()?, server.try_clone()?);
    std::thread::spawn(move || {
        let _ = io::copy(&mut client_in, &mut server_out);
        let _ = server_out.shutdown(Shutdown::Write);
    });
    let (mut server_in, mut client_out) = (server, client);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = server_in.read(&mut buf)?;
        if n == 0 {
            let _ = client_out.shutdown(Shutdown::Write);
            return Ok(());
        }
        stats.pieces.fetch_add(1, Ordering::Relaxed);
        let piece = &mut buf[..n];
        if faults.is_empty() || rng.next_u64() % 1000 >= per_mille {
            client_out.write_all(piece)?;
            continue;
        }
        let which = rng.next_u64() as usize % faults.len();
        let fault = faults[which];
        stats.faults[ALL_FAULTS.iter().position(|f| *f == fault).expect("a known fault")].fetch_add(1, Ordering::Relaxed);
        match fault {
            Fault::Reset => {
                client_out.write_all(&piece[..n / 2])?;
                // A zero linger turns the close into a reset; shutting down reading ends the
                // request thread, so that its copy of the socket closes too.
                nix::sys::socket::setsockopt(&client_out, nix::sys::socket::sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 })?;
                client_out.shutdown(Shutdown::Read)?;
                return Ok(());
            }
            Fault::Stall => {
                std::thread::sleep(Duration::from_millis(300 + rng.next_u64() % 2000));
                client_out.write_all(piece)?;
            }
            Fault::Trickle => {
                for bytes in piece.chunks(512) {
                    client_out.write_all(bytes)?;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            Fault::Truncate => {
                client_out.write_all(&piece[..rng.next_u64() as usize % n])?;
                let _ = client_out.shutdown(Shutdown::Both);
                return Ok(());
            }
            Fault::BitFlip => {
                let at = rng.next_u64() as usize % n;
                piece[at] ^= 1 << (rng.next_u64() % 8);
                client_out.write_all(piece)?;
            }
        }
    }
}
