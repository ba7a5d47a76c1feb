//! `herald-bench`: opens N SSE subscribers from child processes (≤ `--per-child` sockets
//! each), publishes E numbered events carrying their CLOCK_MONOTONIC publish time, and
//! reports connect rate, memory per connection, CPU per delivery, latency and loss.
//! The parent publishes and samples /proc; children only read sockets (see `child.rs`).

pub mod child;
pub mod h2;
pub mod handshake;
pub mod parent;
pub mod proto;
pub mod publish;
pub mod report;
pub mod tls;

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
/// An https:// --url speaks TLS (rustls, verified against --cacert); --handshakes N
/// measures TLS handshakes instead of subscribing; --starts N measures stream starts
/// (connect, subscribe, 200 head, close) per second. --bearer/--bearer-file/--cookie
/// send a token with every subscribe request. --h2 subscribes over HTTP/2 (ALPN h2 on
/// https://, prior knowledge on http://), --streams-per-conn M streams on each of the N
/// connections.
#[derive(Parser, Debug, Clone, serde::Serialize)]
#[command(name = "herald-bench", version)]
pub struct Opt {
    /// Subscriber URL, http:// or https:// (TLS); the last path segment is the topic.
    #[arg(long, default_value = "http://127.0.0.1:8080/events/bench")]
    pub url: String,
    /// PEM file of the CA certificate(s) an https:// server's chain is verified against.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Name sent as SNI and checked against the server's certificate [default: the
    /// --url host; an IP address is checked against the certificate's IP SANs, no SNI].
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// TLS versions offered.
    #[arg(long, value_enum, default_value_t = TlsVersion::Auto)]
    pub tls_version: TlsVersion,
    /// TLS cipher-suite preference offered (the server picks; herald and nginx follow
    /// the client's order): browser = AES-128-GCM first, as Chrome and Firefox.
    #[arg(long, value_enum, default_value_t = TlsSuite::Browser)]
    pub tls_suite: TlsSuite,
    /// Verify the server's whole certificate chain on every connection (default: a
    /// chain identical to one already verified for the same name is not re-verified;
    /// the handshake signature is always checked).
    #[arg(long)]
    pub tls_verify_every: bool,
    /// Let TLS connections resume sessions from tickets the server sent earlier ones
    /// (default: every handshake is a full one).
    #[arg(long)]
    pub tls_resume: bool,
    /// TLS handshakes in flight over all children together (each child gets its share,
    /// at most --max-inflight): keeps the connect phase inside the server's handshake
    /// capacity and below herald's --tls-max-handshakes (1024 per worker).
    #[arg(long, default_value_t = 512)]
    pub tls_inflight: usize,
    /// Handshake-rate mode: open this many TLS connections (full handshakes unless
    /// --tls-resume), GET --handshake-path on each (Connection: close), read to the
    /// server's close; report handshakes per second and the server's CPU per handshake.
    /// No subscribers, no publishing. With an http:// --url: the same without TLS (the
    /// baseline cost of a connection and a request).
    #[arg(long, default_value_t = 0)]
    pub handshakes: u64,
    /// Handshake-rate and stream-start modes: connections in progress at once (one
    /// thread each).
    #[arg(long, visible_alias = "concurrency", default_value_t = 8)]
    pub handshake_concurrency: usize,
    /// Handshake-rate mode: path requested on each connection (any complete response
    /// counts; statuses are reported).
    #[arg(long, default_value = "/healthz")]
    pub handshake_path: String,
    /// Stream-start mode: this many times connect, send the subscribe request for the
    /// --url topic (with --bearer/--cookie), read the response head (a 200 counts, any
    /// other status is a failure), half-close and read to the server's close; report
    /// stream starts per second and the server's CPU per start. No subscribers stay.
    #[arg(long, default_value_t = 0, conflicts_with = "handshakes")]
    pub starts: u64,
    /// Send `Authorization: Bearer TOKEN` with every subscribe request (never written
    /// to --json).
    #[arg(long, conflicts_with = "bearer_file")]
    #[serde(serialize_with = "redacted")]
    pub bearer: Option<String>,
    /// Read the --bearer token from this file (trailing whitespace stripped).
    #[arg(long)]
    pub bearer_file: Option<PathBuf>,
    /// Send `Cookie: VALUE` with every subscribe request, e.g. 'herald_token=JWT'
    /// (never written to --json).
    #[arg(long)]
    #[serde(serialize_with = "redacted")]
    pub cookie: Option<String>,
    /// Number of SSE subscribers to open (with --h2: connections, each carrying
    /// --streams-per-conn subscriber streams).
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub subscribers: usize,
    /// Subscribe over HTTP/2: an https:// --url offers ALPN h2 only (the run stops if the
    /// server does not select it), an http:// --url sends the h2 preface at once (prior
    /// knowledge, h2c). Every stream gets the checks an HTTP/1.1 subscriber gets.
    #[arg(long, conflicts_with_all = ["handshakes", "starts"])]
    pub h2: bool,
    /// With --h2: streams (subscribers) opened on each connection; the run has
    /// --subscribers × this many subscribers. Keep it within the server's
    /// SETTINGS_MAX_CONCURRENT_STREAMS (herald --h2-max-streams and nginx
    /// http2_max_concurrent_streams default to 128): streams beyond are refused.
    #[arg(long, default_value_t = 1, requires = "h2", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub streams_per_conn: u32,
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

/// Secrets in `--json`: whether one was given and its length, not its value.
fn redacted<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&format!("<redacted, {} bytes>", v.len())),
        None => s.serialize_none(),
    }
}

impl Opt {
    /// The request header lines (each ending in CRLF) of --bearer / --bearer-file and
    /// --cookie, empty without them.
    pub fn auth_headers(&self) -> Result<String> {
        Ok(self
            .auth_fields()?
            .iter()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .collect())
    }

    /// The (name, value) pairs of --bearer / --bearer-file and --cookie, checked.
    pub fn auth_fields(&self) -> Result<Vec<(String, String)>> {
        let token = match (&self.bearer, &self.bearer_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("--bearer-file {}", p.display()))?
                    .trim_end()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let mut h = Vec::new();
        if let Some(t) = token {
            if t.is_empty() || t.bytes().any(|b| b.is_ascii_whitespace() || b < 0x21) {
                bail!("the Bearer token is empty or contains whitespace/control characters");
            }
            h.push(("Authorization".to_string(), format!("Bearer {t}")));
        }
        if let Some(c) = &self.cookie {
            if c.bytes().any(|b| b == b'\r' || b == b'\n') {
                bail!("--cookie contains a line break");
            }
            h.push(("Cookie".to_string(), c.clone()));
        }
        Ok(h)
    }

    /// Streams per connection: --streams-per-conn with --h2, else 1.
    pub fn streams_per_conn(&self) -> usize {
        if self.h2 {
            self.streams_per_conn as usize
        } else {
            1
        }
    }
}

/// The subscribe request a subscriber sends (and a --starts connection): `extra` is
/// header lines ending in CRLF (see `Opt::auth_headers`).
pub fn subscribe_request(target: &Target, topic: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {}{topic} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n{extra}\r\n",
        target.prefix, target.host
    )
    .into_bytes()
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

/// TLS versions the client offers (`--tls-version`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum TlsVersion {
    /// TLS 1.3 and 1.2 (1.3 is negotiated when the server has it).
    Auto,
    #[value(name = "1.2")]
    #[serde(rename = "1.2")]
    V12,
    #[value(name = "1.3")]
    #[serde(rename = "1.3")]
    V13,
}

/// Cipher-suite order the client offers (`--tls-suite`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsSuite {
    /// AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305.
    Browser,
    /// AES-256-GCM first (rustls' own default order).
    Aes256,
    /// ChaCha20-Poly1305 first.
    Chacha20,
}

/// Where subscribers connect and what they ask for.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// https:// URL.
    pub tls: bool,
    /// `host:port` as given, for the Host header.
    pub host: String,
    /// The host without the port (the default TLS server name).
    pub hostname: String,
    /// Path up to and including the last `/`.
    pub prefix: String,
    pub base_topic: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("--url must start with http:// or https://");
        };
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let (hostname, port) = split_host_port(host, if tls { 443 } else { 80 })?;
        let addr = (hostname.as_str(), port)
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
            tls,
            host: host.to_string(),
            hostname,
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

/// `host[:port]` or `[v6]:port` → (host without brackets, port).
fn split_host_port(host: &str, default_port: u16) -> Result<(String, u16)> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (name, after) = rest
            .split_once(']')
            .context("unterminated [ in --url host")?;
        (name, after.strip_prefix(':'))
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    if name.is_empty() {
        bail!("--url has no host");
    }
    let port = match port {
        Some(p) => p.parse().with_context(|| format!("bad port in {host}"))?,
        None => default_port,
    };
    Ok((name.to_string(), port))
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
        assert!(!t.tls);
        assert!(Target::parse("http://127.0.0.1:8080/events/").is_err());
        let t = Target::parse("https://localhost:8443/events/x").unwrap();
        assert!(t.tls);
        assert_eq!((t.hostname.as_str(), t.addr.port()), ("localhost", 8443));
        assert_eq!(t.host, "localhost:8443");
        let t = Target::parse("https://127.0.0.1/events/x").unwrap();
        assert_eq!((t.hostname.as_str(), t.addr.port()), ("127.0.0.1", 443));
        assert!(Target::parse("ftp://127.0.0.1/events/x").is_err());
    }

    #[test]
    fn auth_headers_and_request() {
        let mut opt = Opt::parse_from(["herald-bench"]);
        assert_eq!(opt.auth_headers().unwrap(), "");
        opt.bearer = Some("a.b.c".into());
        opt.cookie = Some("herald_token=x.y.z".into());
        let h = opt.auth_headers().unwrap();
        assert_eq!(
            h,
            "Authorization: Bearer a.b.c\r\nCookie: herald_token=x.y.z\r\n"
        );
        let t = Target::parse("http://127.0.0.1:8080/events/bench").unwrap();
        let req = String::from_utf8(subscribe_request(&t, "bench", &h)).unwrap();
        assert!(req.starts_with("GET /events/bench HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(req.ends_with("Cookie: herald_token=x.y.z\r\n\r\n"));
        let json = serde_json::to_string(&opt).unwrap();
        assert!(!json.contains("a.b.c") && !json.contains("x.y.z"));
        assert!(json.contains("<redacted, 5 bytes>"));
        opt.bearer = Some("a b".into());
        assert!(opt.auth_headers().is_err());
        opt.bearer = None;
        let dir = std::env::temp_dir().join(format!("hb-bearer-{}", std::process::id()));
        std::fs::write(&dir, "t.o.k\n").unwrap();
        opt.bearer_file = Some(dir.clone());
        opt.cookie = None;
        assert_eq!(
            opt.auth_headers().unwrap(),
            "Authorization: Bearer t.o.k\r\n"
        );
        let _ = std::fs::remove_file(dir);
    }
}
