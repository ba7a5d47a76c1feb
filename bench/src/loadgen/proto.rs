//! Child → parent messages: one JSON object per line on the child's stdout. The parent
//! talks to a child with one word per line on its stdin: `status`, `arm E`, `abandon`,
//! `report`, `quit`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

/// Histogram as (value, count) pairs of its recorded buckets.
pub type Buckets = Vec<(u64, u64)>;

pub fn buckets(h: &Histogram<u64>) -> Buckets {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// ns histogram from 1 ns to 1 h, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    // 1 ns .. 1 h with 3 significant digits: bounds are valid constants.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds")
}

pub fn merge(into: &mut Histogram<u64>, b: &Buckets) {
    for &(v, c) in b {
        into.saturating_record_n(v, c);
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChildMsg {
    /// Every subscriber of the child is streaming or has failed.
    /// `ok`/`failed` count subscribers (--h2: streams); `conns` the connections with a
    /// subscriber streaming (without --h2: = ok).
    Connected {
        ok: u64,
        failed: u64,
        #[serde(default)]
        conns: u64,
    },
    /// `arm E` processed: sequence tracking is ready.
    Armed,
    /// Every armed subscriber has every event (or was dropped).
    Done,
    Status(ChildStatus),
    Report(Box<ChildReport>),
    /// Sent by the parent's reader thread when the child's stdout closes.
    Exited,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ChildStatus {
    pub live: u64,
    pub comments: u64,
    pub dropped: u64,
    pub deliveries: u64,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ChildReport {
    pub connected: u64,
    pub connect_fail: BTreeMap<String, u64>,
    pub first_connect_ns: u64,
    pub last_open_ns: u64,
    /// connect start → 200 head, ns.
    pub connect_hist: Buckets,
    /// TLS sessions by version, suite and handshake kind (https:// only).
    #[serde(default)]
    pub tls_sessions: BTreeMap<String, u64>,
    /// The child's VmRSS before its first connect, KiB.
    #[serde(default)]
    pub rss_start_kib: u64,
    pub bytes: u64,
    pub comments: u64,
    pub foreign: u64,
    /// Events seen before `arm`.
    pub early: u64,
    pub out_of_range: u64,
    pub dropped: BTreeMap<String, u64>,
    pub deliveries: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub complete: u64,
    pub live_at_arm: u64,
    pub last_delivery_ns: u64,
    /// publish → receive per delivery, ns.
    pub latency_hist: Buckets,
    /// Per seq: slowest and fastest delivery latency, ns (u64::MAX / 0 when none).
    pub seq_max_ns: Vec<u64>,
    pub seq_min_ns: Vec<u64>,
    pub seq_count: Vec<u64>,
    /// Connections that had a subscriber streaming (--h2: a stream; else = connected).
    #[serde(default)]
    pub conns_ok: u64,
    /// --h2: GOAWAYs received, by error code (`h2_goaway_NO_ERROR`).
    #[serde(default)]
    pub h2_goaway: BTreeMap<String, u64>,
    /// --h2: the smallest SETTINGS_MAX_CONCURRENT_STREAMS a server connection announced.
    #[serde(default)]
    pub h2_server_max_streams: Option<u32>,
    /// --h2: PINGs answered, WINDOW_UPDATEs sent.
    #[serde(default)]
    pub h2_pings: u64,
    #[serde(default)]
    pub h2_window_updates: u64,
}
