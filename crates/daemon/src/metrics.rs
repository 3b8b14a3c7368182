//! Prometheus metrics for every mount on the host, in the text exposition format (0.0.4), for
//! the `exporter` command. The exporter is a process of its own that reads each worker's
//! status socket at scrape time: an HTTP server in the holder would put work in the one
//! process that must never stall, and one in the worker would die with it.
//!
//! A worker's counters start at zero with each worker (Prometheus' `rate` and `increase`
//! take such resets in their stride); restarts, upgrades and takeover stalls are the
//! holder's and survive worker deaths. A mount whose worker does not answer (mid-takeover)
//! shows as `phoenixfs_mount_up 0`; the scrape never fails for it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use tracing::debug;

use crate::histogram::DurationHistogram;
use crate::mounttable::phoenixfs_mountpoints;
use crate::status::{self, Status, RUN_DIR};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a scrape waits for one worker: a frozen one must not make the whole scrape
/// overrun Prometheus' timeout (10 s by default).
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// What a scrape learnt of one mount.
#[derive(Debug, Clone, PartialEq)]
pub enum MountReport {
    Up(Box<Status>),
    /// Mounted, but its worker did not answer.
    Down { mountpoint: String },
}

/// Asks every worker whose status socket is in [`RUN_DIR`]; a phoenixfs mount in the mount
/// table whose socket did not answer is reported down.
pub fn collect() -> Vec<MountReport> {
    let sockets: Vec<PathBuf> = match std::fs::read_dir(RUN_DIR) {
        Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "sock")).collect(),
        Err(error) => {
            debug!(%error, dir = RUN_DIR, "no status sockets to read");
            Vec::new()
        }
    };
    let mut answered = BTreeSet::new();
    let mut reports = Vec::new();
    for socket in sockets {
        match status::query_status_at(&socket, STATUS_TIMEOUT) {
            Ok(status) => {
                answered.insert(socket);
                reports.push(MountReport::Up(Box::new(status)));
            }
            Err(error) => debug!(socket = %socket.display(), %error, "a status socket did not answer"),
        }
    }
    for mountpoint in phoenixfs_mountpoints().unwrap_or_default() {
        if !answered.contains(&status::socket_path(&mountpoint)) {
            reports.push(MountReport::Down { mountpoint: mountpoint.display().to_string() });
        }
    }
    reports.sort_by(|a, b| a.mountpoint().cmp(b.mountpoint()));
    reports
}

impl MountReport {
    fn mountpoint(&self) -> &str {
        match self {
            MountReport::Up(status) => &status.mountpoint,
            MountReport::Down { mountpoint } => mountpoint,
        }
    }
}

/// The exposition of `reports`: each family's HELP and TYPE once, then its samples for every
/// mount, labelled by `mountpoint` and `image_id`.
pub fn render(reports: &[MountReport]) -> String {
    let mut out = Exposition::default();
    for report in reports {
        let mount = [("mountpoint", report.mountpoint())];
        let MountReport::Up(status) = report else {
            out.gauge("phoenixfs_mount_up", "Whether the mount's worker answered this scrape.", &mount, 0.0);
            continue;
        };
        out.gauge("phoenixfs_mount_up", "Whether the mount's worker answered this scrape.", &mount, 1.0);
        add_mount(&mut out, status);
    }
    out.render()
}

fn add_mount(out: &mut Exposition, s: &Status) {
    let mount = [("mountpoint", s.mountpoint.as_str()), ("image_id", s.image_id.as_str())];
    let info = [mount.as_slice(), &[("image", s.image.as_str()), ("store", s.store.as_str())]].concat();
    out.gauge("phoenixfs_mount_info", "The mount's image and store (always 1).", &info, 1.0);

    for (opcode, n) in &s.requests_by_opcode {
        out.counter("phoenixfs_fuse_requests_total", "FUSE requests the worker read, by opcode.", &labelled(&mount, "opcode", opcode), *n);
    }
    for (opcode, n) in &s.errors_by_opcode {
        out.counter("phoenixfs_fuse_request_errors_total", "FUSE requests answered with an errno (expected ones such as ENOENT and ENOSYS included), by opcode.", &labelled(&mount, "opcode", opcode), *n);
    }
    for (opcode, n) in &s.reply_bytes_by_opcode {
        out.counter("phoenixfs_fuse_reply_bytes_total", "Bytes of the worker's answers (bodies, not headers), by opcode.", &labelled(&mount, "opcode", opcode), *n);
    }
    out.counter("phoenixfs_fuse_read_bytes_total", "Bytes of file data answered to READ requests.", &mount, s.bytes_served);
    out.counter("phoenixfs_fuse_io_errors_total", "Requests failed with EIO because a chunk could not be read or the image is corrupt.", &mount, s.errors);
    out.counter("phoenixfs_resent_requests_total", "Requests the kernel resent to this worker after its predecessor died.", &mount, s.resent_requests);
    out.counter("phoenixfs_passthrough_opens_total", "Opens the worker answered in passthrough mode: the kernel reads a copy in the cache directory itself.", &mount, s.passthrough_opens);

    let hits = "Chunk reads served from a cache level: the worker's memory, the memory shared by worker generations, the cache directory.";
    out.counter("phoenixfs_cache_hits_total", hits, &labelled(&mount, "level", "memory"), s.memory_hits);
    out.counter("phoenixfs_cache_hits_total", hits, &labelled(&mount, "level", "shared"), s.shared_memory_hits);
    out.counter("phoenixfs_cache_hits_total", hits, &labelled(&mount, "level", "disk"), s.disk_hits);
    out.counter("phoenixfs_cache_misses_total", "Chunks found at no cache level and fetched from the store.", &mount, s.cache_misses);
    out.counter("phoenixfs_cache_evictions_total", "Chunk files removed to keep the cache directory under its limit.", &mount, s.evictions);
    let discarded = "Cached chunks found torn or corrupt and discarded, by cache level.";
    out.counter("phoenixfs_cache_discarded_total", discarded, &labelled(&mount, "level", "shared"), s.shared_memory_discarded);
    out.counter("phoenixfs_cache_discarded_total", discarded, &labelled(&mount, "level", "disk"), s.corrupt_cache_entries_discarded);
    out.gauge("phoenixfs_cache_bytes", "Bytes in the cache directory.", &mount, s.cache_bytes as f64);
    out.gauge("phoenixfs_cache_limit_bytes", "The cache directory's size limit.", &mount, s.cache_limit as f64);
    out.gauge("phoenixfs_cache_chunks", "Chunk files in the cache directory.", &mount, s.cache_chunks as f64);

    out.counter("phoenixfs_store_fetched_bytes_total", "Bytes fetched from the store, as stored (compressed).", &mount, s.fetched_bytes);
    if let Some(fetches) = &s.fetch_durations {
        out.histogram("phoenixfs_store_fetch_duration_seconds", "How long a chunk fetch from the store took, retries included.", &mount, fetches);
    }
    out.counter("phoenixfs_store_fetch_retries_total", "Failed fetches from the store that were tried again.", &mount, s.fetch_retries);
    for (kind, n) in &s.store_errors {
        out.counter("phoenixfs_store_fetch_failures_total", "Failed fetch attempts, by kind of failure.", &labelled(&mount, "kind", kind), *n);
    }
    out.gauge("phoenixfs_store_fetches_in_flight", "Fetches from the store under way.", &mount, s.fetches_in_flight as f64);
    out.gauge("phoenixfs_store_fetches_retrying", "Fetches under way that failed at least once.", &mount, s.fetches_retrying as f64);
    out.gauge("phoenixfs_store_oldest_fetch_seconds", "How long the oldest fetch under way has waited.", &mount, s.oldest_fetch_ms / 1000.0);

    out.counter("phoenixfs_worker_restarts_total", "Workers started after a predecessor died (kept by the holder).", &mount, s.worker_restarts);
    out.counter("phoenixfs_upgrades_total", "Workers started by phoenixfs upgrade (kept by the holder).", &mount, s.upgrades);
    if let Some(stalls) = &s.takeover_stall_histogram {
        out.histogram("phoenixfs_takeover_stall_seconds", "From a worker's death to its successor's first answer.", &mount, stalls);
    }
    out.gauge("phoenixfs_worker_start_seconds", "The serving worker's start-up, from its launch to serving.", &mount, s.worker_start_ms / 1000.0);
    let rss = "Resident memory by process (shared pages count in each).";
    out.gauge("phoenixfs_resident_memory_bytes", rss, &labelled(&mount, "process", "worker"), s.worker_rss_bytes as f64);
    out.gauge("phoenixfs_resident_memory_bytes", rss, &labelled(&mount, "process", "holder"), s.holder_rss_bytes as f64);
    out.gauge("phoenixfs_image_memory_bytes", "The verified image all processes of the mount share.", &mount, s.image_memory_bytes as f64);
    out.gauge("phoenixfs_shared_chunk_memory_bytes", "The chunk memory worker generations share (0: none).", &mount, s.shared_memory_bytes as f64);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    /// Sample lines, ready to print.
    samples: Vec<String>,
}

/// Metric families in the order first added, each with its samples.
#[derive(Default)]
struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    fn samples(&mut self, name: &'static str, help: &'static str, kind: Kind) -> &mut Vec<String> {
        let at = match self.families.iter().position(|f| f.name == name) {
            Some(at) => at,
            None => {
                self.families.push(Family { name, help, kind, samples: Vec::new() });
                self.families.len() - 1
            }
        };
        &mut self.families[at].samples
    }

    fn counter(&mut self, name: &'static str, help: &'static str, labels: &[(&str, &str)], value: u64) {
        let line = sample(name, labels, &value.to_string());
        self.samples(name, help, Kind::Counter).push(line);
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, labels: &[(&str, &str)], value: f64) {
        let line = sample(name, labels, &float(value));
        self.samples(name, help, Kind::Gauge).push(line);
    }

    /// Cumulative `_bucket{le=...}` lines up to `+Inf`, then `_sum` and `_count`, in seconds.
    fn histogram(&mut self, name: &'static str, help: &'static str, labels: &[(&str, &str)], histogram: &DurationHistogram) {
        let mut lines = Vec::with_capacity(histogram.bounds_us.len() + 3);
        let bucket = format!("{name}_bucket");
        for (bound_us, count) in histogram.cumulative() {
            let le = float(bound_us as f64 / 1e6);
            lines.push(sample(&bucket, &[labels, &[("le", le.as_str())]].concat(), &count.to_string()));
        }
        let count = histogram.count().to_string();
        lines.push(sample(&bucket, &[labels, &[("le", "+Inf")]].concat(), &count));
        lines.push(sample(&format!("{name}_sum"), labels, &float(histogram.sum_us as f64 / 1e6)));
        lines.push(sample(&format!("{name}_count"), labels, &count));
        self.samples(name, help, Kind::Histogram).extend(lines);
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for family in &self.families {
            let _ = writeln!(out, "# HELP {} {}", family.name, escape_help(family.help));
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind.name());
            for line in &family.samples {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// `base` and one more label.
fn labelled<'a>(base: &[(&'a str, &'a str)], name: &'a str, value: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut labels = base.to_vec();
    labels.push((name, value));
    labels
}

fn sample(name: &str, labels: &[(&str, &str)], value: &str) -> String {
    if labels.is_empty() {
        return format!("{name} {value}");
    }
    let labels: Vec<String> = labels.iter().map(|(label, value)| format!("{label}=\"{}\"", escape_label(value))).collect();
    format!("{name}{{{}}} {value}", labels.join(","))
}

/// Rust prints a whole f64 without a fraction ("1") and never in exponent form, both of which
/// Prometheus parses; the special values need its spelling.
fn float(value: f64) -> String {
    match value {
        v if v.is_nan() => "NaN".into(),
        v if v == f64::INFINITY => "+Inf".into(),
        v if v == f64::NEG_INFINITY => "-Inf".into(),
        v => v.to_string(),
    }
}

/// A label value may hold anything; backslash, double quote and line feed are escaped.
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// HELP text escapes only backslash and line feed.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_help("a\\b\"c\nd"), "a\\\\b\"c\\nd");
        assert_eq!(sample("m", &[("mountpoint", "/mnt/\"x\"")], "1"), "m{mountpoint=\"/mnt/\\\"x\\\"\"} 1");
        assert_eq!(sample("m", &[], "2.5"), "m 2.5");
    }

    #[test]
    fn histograms_are_cumulative_and_in_seconds() {
        let mut stalls = DurationHistogram::empty(&[5_000, 1_000_000]);
        for us in [1_000, 2_000, 300_000, 7_000_000] {
            stalls.observe(us);
        }
        let mut out = Exposition::default();
        out.histogram("x_seconds", "Stalls.", &[("mountpoint", "/m")], &stalls);
        assert_eq!(
            out.render(),
            "# HELP x_seconds Stalls.\n\
             # TYPE x_seconds histogram\n\
             x_seconds_bucket{mountpoint=\"/m\",le=\"0.005\"} 2\n\
             x_seconds_bucket{mountpoint=\"/m\",le=\"1\"} 3\n\
             x_seconds_bucket{mountpoint=\"/m\",le=\"+Inf\"} 4\n\
             x_seconds_sum{mountpoint=\"/m\"} 7.303\n\
             x_seconds_count{mountpoint=\"/m\"} 4\n"
        );
    }

    #[test]
    fn a_mount_is_labelled_and_counted_by_opcode() {
        let status = Status {
            mountpoint: "/mnt/a".into(),
            image_id: "ab12".into(),
            bytes_served: 4096,
            requests_by_opcode: [("lookup".to_string(), 2), ("read".to_string(), 5)].into(),
            worker_restarts: 3,
            ..Status::default()
        };
        let text = render(&[MountReport::Up(Box::new(status))]);
        for line in [
            "phoenixfs_mount_up{mountpoint=\"/mnt/a\"} 1\n",
            "# TYPE phoenixfs_fuse_requests_total counter\n\
             phoenixfs_fuse_requests_total{mountpoint=\"/mnt/a\",image_id=\"ab12\",opcode=\"lookup\"} 2\n\
             phoenixfs_fuse_requests_total{mountpoint=\"/mnt/a\",image_id=\"ab12\",opcode=\"read\"} 5\n",
            "phoenixfs_fuse_read_bytes_total{mountpoint=\"/mnt/a\",image_id=\"ab12\"} 4096\n",
            "phoenixfs_cache_hits_total{mountpoint=\"/mnt/a\",image_id=\"ab12\",level=\"shared\"} 0\n",
            "phoenixfs_worker_restarts_total{mountpoint=\"/mnt/a\",image_id=\"ab12\"} 3\n",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // An older daemon reports no histograms: none is made up.
        assert!(!text.contains("phoenixfs_store_fetch_duration_seconds"));
    }

    #[test]
    fn each_family_is_introduced_once_for_all_mounts() {
        let down = |mountpoint: &str| MountReport::Down { mountpoint: mountpoint.into() };
        assert_eq!(
            render(&[down("/a"), down("/b")]),
            "# HELP phoenixfs_mount_up Whether the mount's worker answered this scrape.\n\
             # TYPE phoenixfs_mount_up gauge\n\
             phoenixfs_mount_up{mountpoint=\"/a\"} 0\n\
             phoenixfs_mount_up{mountpoint=\"/b\"} 0\n"
        );
    }
}
