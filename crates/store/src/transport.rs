//! What the remote stores share: one small I/O runtime per process, request timeouts, and
//! hedged reads (a read slower than the store's recent p99 gets a second request; the first
//! answer wins).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::runtime::Runtime;

use crate::{Outage, StoreError};

/// Longest a single request may take; a slower one is an outage (and retried by the caller).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Latencies kept to estimate the p99, and how many make an estimate; before that, a read
/// is hedged after `FIRST_HEDGE_DELAY`.
const LATENCY_WINDOW: usize = 256;
const HEDGE_AFTER_SAMPLES: usize = 16;
const FIRST_HEDGE_DELAY: Duration = Duration::from_secs(1);
/// Never hedge sooner than this: on loopback the p99 can be far below a scheduler tick.
const MIN_HEDGE_DELAY: Duration = Duration::from_millis(20);

/// The runtime all remote stores of this process share: two threads drive every connection.
pub(crate) fn runtime() -> Result<&'static Runtime, StoreError> {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let built = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("store-io")
        .enable_all()
        .build()
        .map_err(|e| StoreError::Unavailable { store: "(runtime)".into(), outage: Outage::Other, detail: format!("starting the I/O runtime: {e}") })?;
    Ok(RUNTIME.get_or_init(|| built))
}

/// Recent latencies of a store's successful reads.
#[derive(Default)]
pub(crate) struct Latencies(Mutex<VecDeque<Duration>>);

impl Latencies {
    /// When a read should get a second request: after the recent p99.
    pub(crate) fn hedge_delay(&self) -> Duration {
        let latencies = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if latencies.len() < HEDGE_AFTER_SAMPLES {
            return FIRST_HEDGE_DELAY;
        }
        let mut sorted: Vec<Duration> = latencies.iter().copied().collect();
        sorted.sort_unstable();
        sorted[sorted.len() * 99 / 100].max(MIN_HEDGE_DELAY)
    }

    pub(crate) fn record(&self, took: Duration) {
        let mut latencies = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if latencies.len() == LATENCY_WINDOW {
            latencies.pop_front();
        }
        latencies.push_back(took);
    }
}

/// Runs `once()`; if it has not finished after `hedge`, runs it again beside the first and
/// takes whichever finishes first.
pub(crate) async fn hedged<F, Fut, T>(once: F, hedge: Duration) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
{
    let first = once();
    tokio::pin!(first);
    tokio::select! {
        done = &mut first => return done,
        _ = tokio::time::sleep(hedge) => {}
    }
    tracing::debug!(after_ms = hedge.as_millis() as u64, "slow read; sending a hedged request");
    let second = once();
    tokio::select! {
        done = &mut first => done,
        done = second => done,
    }
}

