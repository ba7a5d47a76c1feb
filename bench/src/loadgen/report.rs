//! The report: every figure of one run, serialised to JSON (`--json`) and printed as a
//! table. Units are in the field names; "per delivery" divides by deliveries counted by
//! the children during the publish window.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::publish::PublishStats;
use crate::procfs::{Machine, SysCounters, ThreadCpu};

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of an ns histogram, in µs.
    pub fn us(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let q = |p: f64| h.value_at_quantile(p) as f64 / 1e3;
        Percentiles {
            count: h.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64 / 1e3,
        }
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ConnectReport {
    pub requested: u64,
    pub connected: u64,
    pub failed: BTreeMap<String, u64>,
    pub children: usize,
    pub seconds: f64,
    pub per_second: f64,
    /// connect start → 200 response head, µs (TLS: the handshake included).
    pub setup_us: Percentiles,
    /// https:// only: "TLSv1_3 TLS13_AES_256_GCM_SHA384 full" → connections.
    pub tls_sessions: BTreeMap<String, u64>,
    /// --h2 only: the connections under the streams (requested/connected above count
    /// streams, the subscribers).
    pub h2: Option<H2Report>,
}

/// --h2: N connections × M streams.
#[derive(Debug, Default, serde::Serialize)]
pub struct H2Report {
    /// "ALPN h2" (https://) or "prior knowledge" (http://, h2c).
    pub negotiation: String,
    pub streams_per_conn: usize,
    pub connections_requested: u64,
    /// Connections with at least one stream streaming after the connect phase.
    pub connections_established: u64,
    /// The smallest SETTINGS_MAX_CONCURRENT_STREAMS the server announced.
    pub server_max_concurrent_streams: Option<u32>,
    /// GOAWAYs received, by error code.
    pub goaway: BTreeMap<String, u64>,
    pub pings_answered: u64,
    pub window_updates_sent: u64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct MemoryReport {
    /// TCP connections with a subscriber streaming after the connect phase, and those
    /// subscribers (streams; without --h2 the two are equal). "per conn" figures divide
    /// by the first, "per stream" ones by the second.
    pub tcp_connections: u64,
    pub streams: u64,
    pub server_rss_before_kib: u64,
    pub server_rss_idle_kib: u64,
    pub server_rss_per_conn_bytes: f64,
    pub server_rss_per_stream_bytes: f64,
    pub slab_delta_kib: i64,
    /// Δ Slab / connections: both ends of each loopback connection are counted.
    pub kernel_slab_per_conn_bytes: f64,
    pub kernel_slab_per_stream_bytes: f64,
    pub tcp_mem_delta_pages: i64,
    /// Δ sockstat TCP mem × 4096 / connections (both ends, loopback).
    pub tcp_mem_per_conn_bytes: f64,
    pub tcp_inuse_idle: u64,
    /// Σ VmRSS of the load generator's children after connect + settle, KiB.
    pub loadgen_rss_idle_kib: u64,
    /// (that − Σ the children's VmRSS before their first connect) / connected.
    pub loadgen_rss_per_conn_bytes: f64,
    pub loadgen_rss_per_stream_bytes: f64,
    pub note: &'static str,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct HoldReport {
    pub seconds: f64,
    pub keepalives: u64,
    /// live subscribers × hold / 15 s.
    pub keepalives_expected_15s: f64,
    pub streams_dropped: u64,
    pub live_at_end: u64,
    pub server_cpu_ms: f64,
    pub server_cpu_pct: f64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ThreadReport {
    pub name: String,
    pub tid: u32,
    pub cpu: i64,
    pub cpu_ms: f64,
    pub us_per_delivery: f64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct PublishReport {
    pub via: String,
    pub topics: usize,
    pub events_per_topic: u64,
    pub rate: f64,
    pub burst: bool,
    pub publisher: PublishStats,
    pub publish_seconds: f64,
    /// first publish → last delivery (or drain timeout), s.
    pub window_seconds: f64,
    pub complete: bool,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub out_of_range: u64,
    pub foreign_events: u64,
    pub streams_dropped: BTreeMap<String, u64>,
    /// publish → receive, every delivery, µs.
    pub latency_us: Percentiles,
    /// per event: publish → first subscriber received, µs.
    pub first_delivery_us: Percentiles,
    /// per event: publish → last subscriber received, µs.
    pub fanout_completion_us: Percentiles,
    pub server_cpu_ms: f64,
    /// Server process CPU (schedstat run time, all threads) / deliveries.
    pub server_cpu_us_per_delivery: f64,
    /// Same from /proc/PID/stat utime+stime (clock-tick resolution).
    pub server_cpu_stat_us_per_delivery: f64,
    pub server_threads: Vec<ThreadReport>,
    /// Busy time of --server-cpus (user+system+irq+softirq, everything on those cores).
    pub server_cores_busy_us_per_delivery: Option<f64>,
    pub loadgen_cpu_ms: f64,
    pub loadgen_cpu_us_per_delivery: f64,
    pub publisher_cpu_ms: f64,
    pub loadgen_cheaper_than_server: bool,
    pub peak_server_rss_kib: u64,
    pub peak_tcp_mem_pages: u64,
}

/// `--handshakes N`: N TLS connections, each a handshake, one request, a close.
#[derive(Debug, Default, serde::Serialize)]
pub struct HandshakeReport {
    pub requested: u64,
    pub concurrency: usize,
    pub path: String,
    /// Handshake done and a complete response read.
    pub ok: u64,
    pub failed: BTreeMap<String, u64>,
    /// Response status → count.
    pub statuses: BTreeMap<String, u64>,
    pub tls_sessions: BTreeMap<String, u64>,
    /// Responses whose connection the server then ended with close_notify / without.
    pub server_close_notify: u64,
    pub server_close_unclean: u64,
    /// first connect → last close, s.
    pub seconds: f64,
    pub per_second: f64,
    /// connect start → TCP connected, µs.
    pub tcp_connect_us: Percentiles,
    /// connect start → TLS handshake complete (client Finished sent), µs.
    pub handshake_us: Percentiles,
    /// connect start → response read to its end, µs.
    pub total_us: Percentiles,
    pub server_cpu_ms: f64,
    /// Server CPU (schedstat, all threads) over the run ÷ ok: handshake + request + close.
    pub server_cpu_us_per_handshake: f64,
    /// 1 s ÷ server CPU per handshake: the rate one fully busy server core would reach
    /// (handshakes/s itself is the lower of the server's and the load generator's limit).
    pub server_handshakes_per_cpu_second: f64,
    pub server_cores_busy_us_per_handshake: Option<f64>,
    pub loadgen_cpu_us_per_handshake: f64,
}

/// `--starts N`: N connections, each a subscribe request, its response head, a
/// half-close and the server's close.
#[derive(Debug, Default, serde::Serialize)]
pub struct StartReport {
    pub requested: u64,
    pub concurrency: usize,
    pub path: String,
    pub tls: bool,
    /// An Authorization: Bearer / a Cookie header was sent.
    pub bearer: bool,
    pub cookie: bool,
    /// 200 heads.
    pub ok: u64,
    /// By cause: `http_<status>` for any other status, errno names, `tls_*`.
    pub failed: BTreeMap<String, u64>,
    pub statuses: BTreeMap<String, u64>,
    pub tls_sessions: BTreeMap<String, u64>,
    /// first connect → last server close, s.
    pub seconds: f64,
    /// 200 heads ÷ seconds.
    pub per_second: f64,
    pub tcp_connect_us: Percentiles,
    /// TLS only (else = tcp_connect_us).
    pub handshake_us: Percentiles,
    /// connect start → response head read, µs.
    pub head_us: Percentiles,
    /// connect start → server's close read, µs.
    pub closed_us: Percentiles,
    pub server_cpu_ms: f64,
    /// Server CPU (schedstat, all threads) over the run ÷ ok: accept, request,
    /// authentication, head, stream set-up and tear-down, close.
    pub server_cpu_us_per_start: f64,
    pub server_starts_per_cpu_second: f64,
    pub server_cores_busy_us_per_start: Option<f64>,
    pub loadgen_cpu_us_per_start: f64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct NetReport {
    pub softnet_drops: u64,
    pub retrans_connect_phase: u64,
    pub retrans_measured_phase: u64,
    pub listen_drops_connect_phase: u64,
    pub listen_drops_measured_phase: u64,
    pub before: SysCounters,
    pub after: SysCounters,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub label: String,
    pub unix_time: u64,
    pub machine: Machine,
    pub server_pids: Vec<u32>,
    pub options: serde_json::Value,
    pub connect: ConnectReport,
    pub memory: MemoryReport,
    pub hold: Option<HoldReport>,
    pub publish: Option<PublishReport>,
    /// --handshakes mode.
    pub handshakes: Option<HandshakeReport>,
    /// --starts mode.
    pub starts: Option<StartReport>,
    pub network: NetReport,
    pub valid: bool,
    pub invalid_reasons: Vec<String>,
    pub warnings: Vec<String>,
    #[serde(skip)]
    pub threads_before: Vec<ThreadCpu>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "herald-bench {}  ({}, {} cpus, kernel {})",
            self.label, self.machine.cpu_model, self.machine.cpus, self.machine.kernel
        );
        let _ = writeln!(
            s,
            "{:<34} {}",
            "run",
            if self.valid {
                "VALID".to_string()
            } else {
                format!("INVALID: {}", self.invalid_reasons.join("; "))
            }
        );
        for w in &self.warnings {
            let _ = writeln!(s, "{:<34} {w}", "warning");
        }
        if self.handshakes.is_none() && self.starts.is_none() {
            self.subscriber_lines(&mut s);
        }
        if let Some(st) = &self.starts {
            Self::start_lines(st, &mut s);
        }
        if let Some(h) = &self.handshakes {
            let _ = writeln!(
                s,
                "{:<34} {}/{} ok in {:.2} s = {:.0}/s (concurrency {}, GET {})",
                "handshakes", h.ok, h.requested, h.seconds, h.per_second, h.concurrency, h.path
            );
            if !h.failed.is_empty() {
                let _ = writeln!(s, "{:<34} {:?}", "handshake failures", h.failed);
            }
            let _ = writeln!(s, "{:<34} {:?}", "responses", h.statuses);
            if !h.tls_sessions.is_empty() {
                let _ = writeln!(s, "{:<34} {:?}", "TLS sessions", h.tls_sessions);
                let _ = writeln!(
                    s,
                    "{:<34} {} with close_notify, {} without",
                    "server closed", h.server_close_notify, h.server_close_unclean
                );
            }
            for (name, p) in [
                ("TCP connect µs", &h.tcp_connect_us),
                ("connect→handshake done µs", &h.handshake_us),
                ("connect→response read µs", &h.total_us),
            ] {
                let _ = writeln!(
                    s,
                    "{:<34} p50 {:.0}  p99 {:.0}  max {:.0}",
                    name, p.p50, p.p99, p.max
                );
            }
            let _ = writeln!(
                s,
                "{:<34} {:.1} µs ({:.0} ms) = {:.0} handshakes per server CPU-second",
                "server CPU per handshake",
                h.server_cpu_us_per_handshake,
                h.server_cpu_ms,
                h.server_handshakes_per_cpu_second
            );
            if let Some(b) = h.server_cores_busy_us_per_handshake {
                let _ = writeln!(s, "{:<34} {:.1} µs", "server cores busy per handshake", b);
            }
            let _ = writeln!(
                s,
                "{:<34} {:.1} µs",
                "load generator CPU per handshake", h.loadgen_cpu_us_per_handshake
            );
        }
        let n = &self.network;
        let _ = writeln!(s, "{:<34} softnet drops {}  retrans {} (+{} while connecting)  listen drops {} (+{} while connecting)", "network", n.softnet_drops, n.retrans_measured_phase, n.retrans_connect_phase, n.listen_drops_measured_phase, n.listen_drops_connect_phase);
        s
    }

    /// Figures of a --starts run.
    fn start_lines(st: &StartReport, s: &mut String) {
        let _ = writeln!(
            s,
            "{:<34} {}/{} in {:.2} s = {:.0}/s (concurrency {}, GET {}{}{}{})",
            "stream starts (200 head)",
            st.ok,
            st.requested,
            st.seconds,
            st.per_second,
            st.concurrency,
            st.path,
            if st.tls { ", TLS" } else { "" },
            if st.bearer { ", Bearer" } else { "" },
            if st.cookie { ", Cookie" } else { "" },
        );
        if !st.failed.is_empty() {
            let _ = writeln!(s, "{:<34} {:?}", "start failures", st.failed);
        }
        let _ = writeln!(s, "{:<34} {:?}", "responses", st.statuses);
        if !st.tls_sessions.is_empty() {
            let _ = writeln!(s, "{:<34} {:?}", "TLS sessions", st.tls_sessions);
        }
        let mut rows = vec![("TCP connect µs", &st.tcp_connect_us)];
        if st.tls {
            rows.push(("connect→handshake done µs", &st.handshake_us));
        }
        rows.push(("connect→response head µs", &st.head_us));
        rows.push(("connect→server close µs", &st.closed_us));
        for (name, p) in rows {
            let _ = writeln!(
                s,
                "{:<34} p50 {:.0}  p99 {:.0}  max {:.0}",
                name, p.p50, p.p99, p.max
            );
        }
        let _ = writeln!(
            s,
            "{:<34} {:.2} µs ({:.0} ms) = {:.0} starts per server CPU-second",
            "server CPU per start",
            st.server_cpu_us_per_start,
            st.server_cpu_ms,
            st.server_starts_per_cpu_second
        );
        if let Some(b) = st.server_cores_busy_us_per_start {
            let _ = writeln!(s, "{:<34} {:.2} µs", "server cores busy per start", b);
        }
        let _ = writeln!(
            s,
            "{:<34} {:.2} µs",
            "load generator CPU per start", st.loadgen_cpu_us_per_start
        );
    }

    /// Connect, memory, hold and publish figures of a subscriber run.
    fn subscriber_lines(&self, s: &mut String) {
        let c = &self.connect;
        let _ = writeln!(
            s,
            "{:<34} {}/{} in {:.2} s over {} child(ren) = {:.0}/s",
            "subscribers connected", c.connected, c.requested, c.seconds, c.children, c.per_second
        );
        if !c.failed.is_empty() {
            let _ = writeln!(s, "{:<34} {:?}", "connect failures", c.failed);
        }
        let _ = writeln!(
            s,
            "{:<34} p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            "connect→200 head",
            c.setup_us.p50 / 1e3,
            c.setup_us.p99 / 1e3,
            c.setup_us.max / 1e3
        );
        let m = &self.memory;
        if let Some(h) = &c.h2 {
            let _ = writeln!(
                s,
                "{:<34} {}, {}/{} connections × {} streams, server max streams {}, GOAWAY {:?}, {} PINGs answered, {} WINDOW_UPDATEs sent",
                "h2",
                h.negotiation,
                h.connections_established,
                h.connections_requested,
                h.streams_per_conn,
                h.server_max_concurrent_streams
                    .map_or("-".to_string(), |v| v.to_string()),
                h.goaway,
                h.pings_answered,
                h.window_updates_sent
            );
            let _ = writeln!(
                s,
                "{:<34} {:.0} B  ({} → {} KiB, {} streams)",
                "server RSS per stream",
                m.server_rss_per_stream_bytes,
                m.server_rss_before_kib,
                m.server_rss_idle_kib,
                m.streams
            );
            let _ = writeln!(
                s,
                "{:<34} {:.0} B  ({} connections)",
                "server RSS per h2 connection", m.server_rss_per_conn_bytes, m.tcp_connections
            );
            let _ = writeln!(
                s,
                "{:<34} {:.0} B slab per stream, {:.0} B slab, {:.0} B tcp_mem per connection",
                "kernel (both ends)",
                m.kernel_slab_per_stream_bytes,
                m.kernel_slab_per_conn_bytes,
                m.tcp_mem_per_conn_bytes
            );
        } else {
            let _ = writeln!(
                s,
                "{:<34} {:.0} B  ({} → {} KiB)",
                "server RSS per connection",
                m.server_rss_per_conn_bytes,
                m.server_rss_before_kib,
                m.server_rss_idle_kib
            );
            let _ = writeln!(
                s,
                "{:<34} {:.0} B slab, {:.0} B tcp_mem",
                "kernel per connection (both ends)",
                m.kernel_slab_per_conn_bytes,
                m.tcp_mem_per_conn_bytes
            );
        }
        if !c.tls_sessions.is_empty() {
            let _ = writeln!(s, "{:<34} {:?}", "TLS sessions", c.tls_sessions);
        }
        let _ = writeln!(
            s,
            "{:<34} {:.0} B  ({} KiB){}",
            "load generator RSS per connection",
            m.loadgen_rss_per_conn_bytes,
            m.loadgen_rss_idle_kib,
            if c.h2.is_some() {
                format!(", {:.0} B per stream", m.loadgen_rss_per_stream_bytes)
            } else {
                String::new()
            }
        );
        if let Some(h) = &self.hold {
            let _ = writeln!(s, "{:<34} {:.0} s: {} keep-alives (≈{:.0} expected at 15 s), {} dropped, server CPU {:.2} %", "hold", h.seconds, h.keepalives, h.keepalives_expected_15s, h.streams_dropped, h.server_cpu_pct);
        }
        if let Some(p) = &self.publish {
            let _ = writeln!(
                s,
                "{:<34} {} events × {} topic(s) via {} {}",
                "publish",
                p.events_per_topic,
                p.topics,
                p.via,
                if p.burst {
                    "burst".to_string()
                } else {
                    format!("at {}/s", p.rate)
                }
            );
            let _ = writeln!(
                s,
                "{:<34} {}/{} ({}), {:.0}/s over {:.2} s",
                "deliveries",
                p.deliveries,
                p.expected_deliveries,
                if p.complete { "complete" } else { "INCOMPLETE" },
                p.deliveries_per_s,
                p.window_seconds
            );
            let _ = writeln!(
                s,
                "{:<34} missing {}  dup {}  out-of-order {}  dropped {:?}",
                "checks", p.missing, p.duplicates, p.out_of_order, p.streams_dropped
            );
            let l = &p.latency_us;
            let _ = writeln!(
                s,
                "{:<34} p50 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
                "delivery latency µs", l.p50, l.p99, l.p999, l.max
            );
            let f = &p.fanout_completion_us;
            let _ = writeln!(
                s,
                "{:<34} p50 {:.0}  p99 {:.0}  max {:.0}",
                "fan-out completion µs", f.p50, f.p99, f.max
            );
            let f = &p.first_delivery_us;
            let _ = writeln!(
                s,
                "{:<34} p50 {:.0}  p99 {:.0}",
                "first delivery µs", f.p50, f.p99
            );
            let _ = writeln!(
                s,
                "{:<34} {:.2} µs ({:.0} ms; stat {:.2} µs)",
                "server CPU per delivery",
                p.server_cpu_us_per_delivery,
                p.server_cpu_ms,
                p.server_cpu_stat_us_per_delivery
            );
            for t in &p.server_threads {
                let _ = writeln!(
                    s,
                    "{:<34} {:.2} µs ({:.0} ms, cpu {})",
                    format!("  thread {}", t.name),
                    t.us_per_delivery,
                    t.cpu_ms,
                    t.cpu
                );
            }
            if let Some(b) = p.server_cores_busy_us_per_delivery {
                let _ = writeln!(s, "{:<34} {:.2} µs", "server cores busy per delivery", b);
            }
            let _ = writeln!(
                s,
                "{:<34} {:.2} µs ({:.0} ms){}",
                "load generator CPU per delivery",
                p.loadgen_cpu_us_per_delivery,
                p.loadgen_cpu_ms,
                if p.loadgen_cheaper_than_server {
                    ""
                } else {
                    "  NOT cheaper than the server"
                }
            );
            let _ = writeln!(
                s,
                "{:<34} {} KiB RSS, {} pages tcp_mem",
                "peak during publish", p.peak_server_rss_kib, p.peak_tcp_mem_pages
            );
        }
    }
}
