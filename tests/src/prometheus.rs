//! A real Prometheus (Debian's `prometheus` package, which `scripts/test` installs) scraping
//! `phoenixfs exporter` every second, and its HTTP query API read back over a plain socket.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::phoenixfs_bin;
use crate::servers::{free_port, Server};

pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// `phoenixfs exporter` on a free port of 127.0.0.1; killed on drop.
pub struct Exporter {
    pub server: Server,
}

impl Exporter {
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let args = vec!["exporter".into(), "--listen".into(), format!("127.0.0.1:{port}").into()];
        let mut server = Server::new("exporter", &phoenixfs_bin(), args, port, dir);
        server.start();
        Exporter { server }
    }

    /// The answer to `GET path`: head (status line and headers) and body.
    pub fn get(&self, path: &str) -> (String, String) {
        http_get(self.server.port, path).unwrap_or_else(|e| panic!("GET {path} from the exporter: {e}"))
    }
}

/// Prometheus scraping `targets` (127.0.0.1 ports) every second, its data in `dir`; killed on
/// drop.
pub struct Prometheus {
    pub server: Server,
}

impl Prometheus {
    pub fn start(dir: &Path, targets: &[u16]) -> Self {
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|port| format!("'127.0.0.1:{port}'")).collect();
        let yaml = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: phoenixfs\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(&config, yaml).expect("writing the Prometheus configuration");
        let port = free_port();
        let arg = |name: &str, value: &dyn AsRef<std::ffi::OsStr>| -> OsString {
            let mut arg = OsString::from(name);
            arg.push(value);
            arg
        };
        let args = vec![
            arg("--config.file=", &config),
            arg("--storage.tsdb.path=", &dir.join("tsdb")),
            arg("--web.listen-address=", &format!("127.0.0.1:{port}")),
        ];
        let mut server = Server::new("prometheus", Path::new(PROMETHEUS_BIN), args, port, dir);
        server.start();
        Prometheus { server }
    }

    /// The samples of an instant `query` (PromQL): each series' labels and value. None when
    /// Prometheus does not answer (yet).
    pub fn query(&self, query: &str) -> Option<Vec<(Value, f64)>> {
        let (_, body) = http_get(self.server.port, &format!("/api/v1/query?query={}", percent_encode(query))).ok()?;
        let answer: Value = serde_json::from_str(&body).ok()?;
        if answer["status"] != "success" {
            return None;
        }
        let samples = answer["data"]["result"].as_array()?.iter().filter_map(|series| {
            let value = series["value"][1].as_str()?.parse().ok()?;
            Some((series["metric"].clone(), value))
        });
        Some(samples.collect())
    }

    /// The value of a query that selects one series, if it has one.
    pub fn value(&self, query: &str) -> Option<f64> {
        match self.query(query)?.as_slice() {
            [(_, value)] => Some(*value),
            _ => None,
        }
    }
}

/// A GET over HTTP/1.0 (so no chunked answer) to 127.0.0.1:`port`: (head, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    Ok((head.to_string(), body.to_string()))
}

/// Everything but RFC 3986's unreserved characters, percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
