//! `phoenixfs exporter`: every mount's metrics over HTTP for Prometheus. One blocking
//! listener answering one connection at a time is enough for a scraper or two; each scrape
//! reads the status sockets afresh (see `phoenixfs_daemon::metrics`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use phoenixfs_daemon::metrics;
use tracing::{info, warn};

/// A client that sends no request line within this is dropped, so it cannot hold up scrapes.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(listen: SocketAddr, once: bool) -> Result<ExitCode> {
    if once {
        print!("{}", metrics::render(&metrics::collect()));
        return Ok(ExitCode::SUCCESS);
    }
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    info!(address = %listener.local_addr().unwrap_or(listen), "serving metrics at /metrics");
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(error) = answer(stream) {
                    warn!(%error, "answering a metrics request");
                }
            }
            Err(error) => warn!(%error, "accepting a metrics connection"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads one request and answers it: the exposition for `GET /metrics`, 404 for any other
/// path, 405 for any other method. The connection is closed after the answer.
fn answer(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        // Closed without a request: a probe that the port is open.
        return Ok(());
    }
    // The headers are not needed, but a client may wait until they are read.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", metrics::CONTENT_TYPE, metrics::render(&metrics::collect())),
        ("GET", "/") => ("200 OK", "text/plain; charset=utf-8", "phoenixfs exporter: metrics at /metrics\n".to_string()),
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found; metrics are at /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".to_string()),
    };
    let mut stream = &stream;
    write!(stream, "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    stream.write_all(body.as_bytes())
}
