//! `herald-bench`: opens N SSE subscribers from child processes (≤ `--per-child` sockets
//! each), publishes E numbered events carrying their CLOCK_MONOTONIC publish time, and
//! reports connect rate, memory per connection, CPU per delivery, latency and loss.
//! The parent publishes and samples /proc; children only read sockets (see `child.rs`).

pub mod child;
pub mod parent;
pub mod proto;
pub mod publish;
pub mod report;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

/// Load generator for SSE fan-out servers (herald, Nchan, axum-sse, uring-floor).
///
/// Opens N subscribers over child processes and 127.0.0.x source addresses, waits until
/// all are streaming, samples idle memory, optionally holds them idle (--hold), then
/// publishes --events numbered events (data "<seq> <CLOCK_MONOTONIC ns>") and checks that
/// every subscriber receives seq 0..E-1 exactly once, in order. Prints a table and, with
/// --json, writes every figure. Target must be loopback unless --allow-remote.
#[derive(Parser, Debug, Clone, serde::Serialize)]
#[command(name = "herald-bench", version)]
pub struct Opt {
    /// Subscriber URL; the last path segment is the topic.
    #[arg(long, default_value = "http://127.0.0.1:8080/events/bench")]
    pub url: String,
    /// Number of SSE subscribers to open.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub subscribers: usize,
    /// Spread subscribers over K topics (TOPIC-0 .. TOPIC-{K-1}, or TOPIC itself when
    /// K = 1); every event is published to every topic.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Source addresses: subscriber i binds 127.0.0.(2 + i mod S) with
    /// IP_BIND_ADDRESS_NO_PORT before connecting (0 = let the kernel choose).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(0..=250))]
    pub sources: u8,
    /// Sockets per child process (the open-files hard limit here is 20,000).
    #[arg(long, default_value_t = 15_000)]
    pub per_child: usize,
    /// New connections per second over all children (0 = as fast as --max-inflight allows).
    #[arg(long, default_value_t = 0)]
    pub connect_rate: u64,
    /// Connections being set up at once, per child.
    #[arg(long, default_value_t = 256)]
    pub max_inflight: usize,
    /// SO_RCVBUF per subscriber socket, bytes (0 = kernel default with autotuning).
    #[arg(long, default_value_t = 0)]
    pub rcvbuf: usize,
    /// Give up on subscribers not streaming after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub connect_timeout: f64,
    /// Seconds to wait after all subscribers stream before sampling idle memory.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Soak: keep the subscribers idle this many seconds; counts keep-alive comments,
    /// dropped streams and server CPU % over the hold.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
    /// Events to publish per topic (0 = connect and measure memory only).
    #[arg(long, short = 'e', default_value_t = 0)]
    pub events: u64,
    /// Publish rate, events per second per topic.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Publish back-to-back, ignoring --rate.
    #[arg(long)]
    pub burst: bool,
    /// Pace every single publish at this many events per second over all topics
    /// together, topics taken round-robin (the per-user shape: one event, one topic, one
    /// subscriber); overrides --rate.
    #[arg(long)]
    pub total_rate: Option<f64>,
    /// How to publish: NDJSON lines to --ingest, or HTTP POST of the data to --publish-url.
    #[arg(long, value_enum, default_value_t = PublishVia::Ingest)]
    pub publish: PublishVia,
    /// NDJSON ingest address (--publish ingest).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub ingest: String,
    /// URL for --publish http, `{topic}` replaced by the topic
    /// [default: host of --url + /publish/{topic}] (Nchan: its nchan_publisher location).
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Extra bytes of padding appended to each event's data.
    #[arg(long, default_value_t = 0)]
    pub payload: usize,
    /// Seconds to wait for deliveries after the last publish.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// Server process id(s) to measure, comma-separated (e.g. the nginx worker pids).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Name prefix of the server's worker threads, reported one by one.
    #[arg(long, default_value = "herald-w")]
    pub thread_prefix: String,
    /// CPUs the server is pinned to; their whole busy time (softirq included) per
    /// delivery is reported too.
    #[arg(long, value_delimiter = ',')]
    pub server_cpus: Vec<usize>,
    /// Free-form label stored in the JSON (server, backend, set-up).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Write the full report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
    /// Internal: run as a child that owns subscribers [first, first + count).
    #[arg(long, hide = true)]
    pub child: bool,
    #[arg(long, hide = true, default_value_t = 0)]
    pub child_first: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    pub child_count: usize,
}

/// Publishing path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishVia {
    /// NDJSON lines `{"topic":..,"data":..}` over the TCP ingest socket.
    Ingest,
    /// `POST` with the data as body (herald /publish/{topic}, Nchan, axum-sse).
    Http,
}

/// Where subscribers connect and what they ask for.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as given, for the Host header.
    pub host: String,
    /// Path up to and including the last `/`.
    pub prefix: String,
    pub base_topic: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target> {
        let rest = url
            .strip_prefix("http://")
            .context("only http:// URLs are supported")?;
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let addr = host
            .to_socket_addrs()
            .with_context(|| format!("resolving {host}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{host}: no IPv4 address"))?;
        let cut = path.rfind('/').unwrap_or(0) + 1;
        let base_topic = path[cut..].to_string();
        if base_topic.is_empty() {
            bail!("--url must end with a topic, e.g. http://127.0.0.1:8080/events/bench");
        }
        Ok(Target {
            addr,
            host: host.to_string(),
            prefix: path[..cut].to_string(),
            base_topic,
        })
    }

    /// Topic names for `--topics k`.
    pub fn topics(&self, k: usize) -> Vec<String> {
        if k <= 1 {
            vec![self.base_topic.clone()]
        } else {
            (0..k).map(|i| format!("{}-{i}", self.base_topic)).collect()
        }
    }
}

/// Entry point shared by parent and child.
pub fn main(opt: Opt) -> Result<()> {
    if opt.child {
        child::run(&opt)
    } else {
        parent::run(&opt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_and_topics() {
        let t = Target::parse("http://127.0.0.1:8080/events/bench").unwrap();
        assert_eq!(t.addr.port(), 8080);
        assert_eq!(
            (t.prefix.as_str(), t.base_topic.as_str()),
            ("/events/", "bench")
        );
        assert_eq!(t.topics(2), vec!["bench-0", "bench-1"]);
        assert!(Target::parse("http://127.0.0.1:8080/events/").is_err());
    }
}
