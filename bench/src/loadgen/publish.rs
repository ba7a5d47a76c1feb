//! The publisher: E events per topic, each with data `"<seq> <CLOCK_MONOTONIC ns>"`,
//! paced at --rate or back-to-back (--burst), over the NDJSON ingest socket or HTTP POST
//! (herald `/publish/{topic}`, Nchan's publisher location, axum-sse). Runs in the parent.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{Opt, PublishVia, Target};
use crate::procfs::{io_error_name, mono_ns};

/// What the publisher did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PublishStats {
    pub sent: u64,
    pub errors: BTreeMap<String, u64>,
    pub first_ns: u64,
    pub last_ns: u64,
}

enum Sink {
    /// NDJSON stream and the thread counting `{"error":..}` replies.
    Ingest {
        stream: TcpStream,
        replies: Option<JoinHandle<u64>>,
    },
    /// HTTP/1.1 keep-alive connection; path is `prefix + topic + suffix`.
    Http {
        addr: SocketAddr,
        host: String,
        prefix: String,
        suffix: String,
        stream: Option<TcpStream>,
    },
}

pub struct Publisher {
    sink: Sink,
    pad: String,
    line: Vec<u8>,
    resp: Vec<u8>,
    pub stats: PublishStats,
}

impl Publisher {
    pub fn connect(opt: &Opt, target: &Target) -> Result<Publisher> {
        let sink = match opt.publish {
            PublishVia::Ingest => {
                let stream = TcpStream::connect(&opt.ingest)
                    .with_context(|| format!("connecting to ingest {}", opt.ingest))?;
                stream.set_nodelay(true)?;
                let mut reader = BufReader::new(stream.try_clone()?);
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                let replies = thread::spawn(move || {
                    let mut errors = 0;
                    let mut line = String::new();
                    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                        if line.contains("\"error\"") {
                            if errors == 0 {
                                eprintln!("ingest error reply: {}", line.trim());
                            }
                            errors += 1;
                        }
                        line.clear();
                    }
                    errors
                });
                Sink::Ingest {
                    stream,
                    replies: Some(replies),
                }
            }
            PublishVia::Http => {
                let url = opt
                    .publish_url
                    .clone()
                    .unwrap_or_else(|| format!("http://{}/publish/{{topic}}", target.host));
                let rest = url
                    .strip_prefix("http://")
                    .context("--publish-url must be http://")?;
                let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                let (prefix, suffix) = path
                    .split_once("{topic}")
                    .context("--publish-url needs {topic}")?;
                let addr = host
                    .to_socket_addrs()?
                    .find(SocketAddr::is_ipv4)
                    .context("publish host")?;
                if !opt.allow_remote && !addr.ip().is_loopback() {
                    bail!("--publish-url {url} is not loopback (use --allow-remote)");
                }
                Sink::Http {
                    addr,
                    host: host.to_string(),
                    prefix: prefix.to_string(),
                    suffix: suffix.to_string(),
                    stream: None,
                }
            }
        };
        Ok(Publisher {
            sink,
            pad: if opt.payload > 0 {
                format!(" {}", "x".repeat(opt.payload))
            } else {
                String::new()
            },
            line: Vec::with_capacity(512),
            resp: Vec::with_capacity(4096),
            stats: PublishStats::default(),
        })
    }

    /// Publish seq 0..events to every topic, paced at `rate` per second unless `burst`.
    pub fn run(&mut self, topics: &[String], events: u64, rate: f64, burst: bool) {
        let t0 = mono_ns();
        for seq in 0..events {
            if !burst && rate > 0.0 {
                let due = t0 + (seq as f64 * 1e9 / rate) as u64;
                let now = mono_ns();
                if due > now {
                    thread::sleep(Duration::from_nanos(due - now));
                }
            }
            for t in topics {
                self.publish_counted(t, seq);
            }
        }
    }

    /// Publish seq 0..events to every topic, round-robin over the topics, each single
    /// publish paced so that `total_rate` events per second go out over all topics.
    pub fn run_round_robin(&mut self, topics: &[String], events: u64, total_rate: f64) {
        let t0 = mono_ns();
        let mut n = 0u64;
        for seq in 0..events {
            for t in topics {
                let due = t0 + (n as f64 * 1e9 / total_rate) as u64;
                n += 1;
                let now = mono_ns();
                if due > now {
                    thread::sleep(Duration::from_nanos(due - now));
                }
                self.publish_counted(t, seq);
            }
        }
    }

    /// One publish stamped with the time it starts, counted in `stats`.
    fn publish_counted(&mut self, topic: &str, seq: u64) {
        let ts = mono_ns();
        if self.stats.first_ns == 0 {
            self.stats.first_ns = ts;
        }
        match self.publish(topic, seq, ts) {
            Ok(()) => self.stats.sent += 1,
            Err(e) => *self.stats.errors.entry(e).or_default() += 1,
        }
        self.stats.last_ns = mono_ns();
    }

    fn publish(&mut self, topic: &str, seq: u64, ts: u64) -> Result<(), String> {
        self.line.clear();
        match &mut self.sink {
            Sink::Ingest { stream, .. } => {
                let _ = writeln!(
                    self.line,
                    "{{\"topic\":\"{topic}\",\"data\":\"{seq} {ts}{}\"}}",
                    self.pad
                );
                stream.write_all(&self.line).map_err(|e| io_error_name(&e))
            }
            Sink::Http {
                addr,
                host,
                prefix,
                suffix,
                stream,
            } => {
                let body_len = format!("{seq} {ts}{}", self.pad).len();
                let _ = write!(
                    self.line,
                    "POST {prefix}{topic}{suffix} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\nContent-Length: {body_len}\r\n\r\n{seq} {ts}{}",
                    self.pad
                );
                for attempt in 0..2 {
                    if stream.is_none() {
                        let s = TcpStream::connect(*addr).map_err(|e| io_error_name(&e))?;
                        let _ = s.set_nodelay(true);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                        *stream = Some(s);
                    }
                    let Some(s) = stream.as_mut() else { continue };
                    match http_exchange(s, &self.line, &mut self.resp) {
                        Ok((status, keep)) => {
                            if !keep {
                                *stream = None;
                            }
                            return if (200..300).contains(&status) {
                                Ok(())
                            } else {
                                Err(format!("http_{status}"))
                            };
                        }
                        // A keep-alive connection the server closed: retry once on a new one.
                        Err(e) if attempt == 0 => {
                            let _ = e;
                            *stream = None;
                        }
                        Err(e) => {
                            *stream = None;
                            return Err(io_error_name(&e));
                        }
                    }
                }
                Err("unreachable".into())
            }
        }
    }

    /// Half-close the ingest stream and count error replies.
    pub fn finish(&mut self) {
        if let Sink::Ingest { stream, replies } = &mut self.sink {
            let _ = stream.shutdown(Shutdown::Write);
            if let Some(h) = replies.take() {
                if let Ok(n) = h.join() {
                    if n > 0 {
                        self.stats.errors.insert("ingest_error_reply".into(), n);
                    }
                }
            }
        }
    }
}

/// Write one request and read its response; returns (status, keep-alive).
fn http_exchange(s: &mut TcpStream, req: &[u8], resp: &mut Vec<u8>) -> io::Result<(u16, bool)> {
    s.write_all(req)?;
    resp.clear();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = memchr::memmem::find(resp, b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        resp.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&resp[..head_end]).to_ascii_lowercase();
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let keep = !head.contains("connection: close") && (len > 0 || head.contains("content-length:"));
    let mut have = resp.len() - head_end;
    while have < len {
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
    }
    Ok((status, keep))
}
