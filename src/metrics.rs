//! Metrics: each worker counts in a plain struct on its own thread (no atomics on the
//! per-delivery path) and publishes a copy to its shared [`WorkerStats`] once per loop
//! turn with relaxed stores; `/metrics` renders Prometheus text from those copies.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::fanout::bus::Hub;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident: $kind:literal, $help:literal; )*) => {
        /// A worker's own counters, touched only by that worker.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Counters { $( $(#[$doc])* pub $name: u64, )* }

        /// The shared copy of a worker's counters.
        #[derive(Debug, Default)]
        pub struct WorkerStats {
            $( $name: AtomicU64, )*
            /// Counted by the ingest thread (into the first worker's block, the one set of
            /// stats `/metrics` reads); `store` leaves it alone.
            pub ingest: IngestStats,
        }

        impl WorkerStats {
            /// Publish the worker's current counters (once per loop turn).
            pub fn store(&self, c: &Counters) {
                $( self.$name.store(c.$name, Ordering::Relaxed); )*
            }

            pub fn load(&self) -> Counters {
                Counters { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        const FIELDS: &[(&str, &str, &str)] = &[ $( (stringify!($name), $kind, $help), )* ];

        impl Counters {
            fn values(&self) -> Vec<u64> { vec![ $( self.$name, )* ] }
        }
    };
}

counters! {
    connections_open: "gauge", "Connections currently open";
    connections_accepted: "counter", "Connections accepted";
    connections_closed: "counter", "Connections closed";
    connections_rejected: "counter", "Connections refused with 503 (over --max-connections or --accept-rate)";
    streams_open: "gauge", "SSE streams currently open";
    fanout_backlog_bytes: "gauge", "Bytes of events held for subscribers that have not been sent them yet (bounded by --max-backlog per subscriber)";
    streams_started: "counter", "SSE streams started";
    events_received: "counter", "Events handed to this worker by the hub";
    events_delivered: "counter", "Events fully written to a subscriber socket";
    bytes_written: "counter", "Bytes written to client sockets";
    writes: "counter", "Write operations submitted (one per connection per loop turn at most)";
    keepalives: "counter", "Keep-alive comments sent";
    slow_consumer_disconnects: "counter", "Subscribers disconnected for exceeding the backlog or write-stall limit";
    head_timeouts: "counter", "Connections closed for not sending a request head in time";
    http_errors: "counter", "Requests answered with a 4xx/5xx status (each status also below)";
    http_400: "counter", "Requests refused 400: malformed, smuggling-prone framing, bad topic or event";
    http_401: "counter", "Requests refused 401: a token needed and missing, or not valid";
    http_403: "counter", "Requests refused 403: POST /publish from an address not allowed, or a topic the token does not grant";
    http_404: "counter", "Requests refused 404: unknown path";
    http_405: "counter", "Requests refused 405: wrong method";
    http_411: "counter", "Requests refused 411: chunked publish body";
    http_413: "counter", "Requests refused 413: publish body over --max-event";
    http_431: "counter", "Requests refused 431: head over --max-head";
    http_429: "counter", "Requests refused 429: over --max-streams-per-user";
    http_503: "counter", "Requests refused 503: over the connection limit or accept rate, a worker busy, or the topic cap";
    http_publishes: "counter", "Events published with POST /publish";
    topics_closed_streams: "counter", "Streams ended by a topic close control message";
    auth_streams: "counter", "Streams started with a verified token";
    auth_publishes: "counter", "HTTP publishes accepted on a token from an address outside --publish-allow";
    auth_refused_missing: "counter", "Requests refused 401: a token was needed and none was sent";
    auth_refused_invalid: "counter", "Requests refused 401: a malformed token, a bad signature, a wrong algorithm, issuer or audience, an unknown key, not yet valid";
    auth_refused_expired: "counter", "Requests refused 401: the token has expired";
    auth_refused_revoked: "counter", "Requests refused 401: the token was revoked";
    auth_refused_scope: "counter", "Requests refused 403: a topic the token does not grant";
    auth_refused_limit: "counter", "Requests refused 429: over --max-streams-per-user";
    auth_waits: "counter", "Requests that waited for a JWKS refetch (a token with an unknown kid)";
    cluster_waits: "counter", "Resumes that waited for this node's Redis reader to reach their Last-Event-ID (--cluster)";
    auth_expiry_notices: "counter", "herald-auth-expiring events sent";
    auth_streams_expired: "counter", "Streams ended because their token expires";
    auth_streams_revoked: "counter", "Streams ended by a disconnect control line";
    drain_cut: "counter", "Streams closed at the end of the drain window before their last chunk was written";
    accept_pauses: "counter", "Accepts paused because the process ran out of descriptors or memory";
    loop_turns: "counter", "Event loop iterations";
    tls_handshakes: "counter", "TLS handshakes completed";
    tls_buffer_bytes: "gauge", "Bytes of buffers held by TLS connections: ciphertext being written or queued, partial records read (an idle TLS stream holds none)";
    tls_handshakes_in_progress: "gauge", "TLS handshakes in progress (bounded per worker by --tls-max-handshakes)";
    tls_accepts_deferred: "counter", "Times TLS accepting paused at --tls-max-handshakes (new connections wait in the listen queue)";
    tls_handshakes_refused: "counter", "TLS connections closed at accept: the worker had --tls-max-handshakes in progress";
    tls_handshake_timeouts: "counter", "TLS connections closed mid-handshake by --head-timeout";
    tls_plain_http: "counter", "Plain HTTP requests sent to the TLS port (answered 400 and closed)";
    tls_protocol_errors: "counter", "TLS connections ended for malformed or out-of-order records or messages (alert sent)";
    tls_incompatible: "counter", "TLS handshakes refused: no common version, cipher suite, group or ALPN protocol (alert sent)";
    tls_unknown_name: "counter", "TLS handshakes refused: the SNI name matches no certificate (alert sent)";
    tls_decrypt_errors: "counter", "TLS connections ended for a record that failed to decrypt (alert sent)";
    tls_other_errors: "counter", "TLS connections ended for any other TLS error";
    tls_sessions_sealed: "counter", "TLS sessions handed from rustls to herald's record layer after the handshake (an idle one then holds only its keys)";
    tls_sessions_kept: "counter", "TLS sessions left whole in rustls after the handshake (their TLS 1.3 traffic secrets were not seen)";
    tls_key_updates: "counter", "TLS 1.3 KeyUpdate messages received and followed on sealed sessions";
    tls_kernel_sessions: "counter", "TLS sessions whose sending was handed to the kernel (kTLS TLS_TX) after the handshake";
    tls_kernel_rekeys: "counter", "New TLS 1.3 sending keys installed in the kernel after a key update";
    tls_kernel_failures: "counter", "kTLS hand-overs the kernel refused (the session stays in userspace; a failed rekey closes it)";
    h2_connections: "counter", "HTTP/2 connections (ALPN h2 on the TLS listener, or prior knowledge on --listen)";
    h2_streams: "counter", "HTTP/2 streams opened by clients (each carries one request)";
    h2_streams_open: "gauge", "HTTP/2 streams currently open";
    h2_streams_refused: "counter", "HTTP/2 streams refused with RST_STREAM REFUSED_STREAM: over --h2-max-streams, or after GOAWAY";
    h2_resets_received: "counter", "RST_STREAM frames received from clients";
    h2_resets_sent: "counter", "RST_STREAM frames sent (a stream ended early: client gone, slow, or a stream error)";
    h2_stream_errors: "counter", "HTTP/2 stream errors: a malformed request, a frame on a closed or half-closed stream, a bad WINDOW_UPDATE (RST_STREAM sent)";
    h2_slow_streams: "counter", "HTTP/2 streams reset because their flow-control window stayed shut past --write-timeout or their backlog passed --max-backlog";
    h2_goaway_sent: "counter", "GOAWAY frames sent (each also counted by reason below)";
    h2_goaway_protocol: "counter", "GOAWAY PROTOCOL_ERROR / STREAM_CLOSED: bad preface, stream-id misuse, frames out of place, PUSH_PROMISE";
    h2_goaway_frame_size: "counter", "GOAWAY FRAME_SIZE_ERROR: a frame larger than 16384 bytes or of the wrong length";
    h2_goaway_flow_control: "counter", "GOAWAY FLOW_CONTROL_ERROR: a window overflow, or more DATA than the window allowed";
    h2_goaway_compression: "counter", "GOAWAY COMPRESSION_ERROR: a header block HPACK cannot decode";
    h2_goaway_calm: "counter", "GOAWAY ENHANCE_YOUR_CALM: a flood (each kind below), or a connection window shut past --write-timeout";
    h2_goaway_shutdown: "counter", "GOAWAY NO_ERROR: drain, or an idle connection without streams past --head-timeout";
    h2_flood_reset: "counter", "Floods: streams reset by the client faster than allowed (Rapid Reset, CVE-2023-44487), or refused streams";
    h2_flood_control: "counter", "Floods: SETTINGS, PING, tiny WINDOW_UPDATE or empty DATA frames faster than allowed";
    h2_flood_continuation: "counter", "Floods: a header block over its byte or CONTINUATION-frame bound (CVE-2024-27316 and kin)";
    h2_flood_hpack: "counter", "Floods: a header block that decodes past 4x --max-head (an HPACK bomb)";
    h2_flood_made_you_reset: "counter", "Floods: stream errors provoked faster than allowed (MadeYouReset, CVE-2025-8671)";
    h2_flood_output: "counter", "Floods: control-frame answers (PING and SETTINGS ACKs, resets) piling up unread";
}

/// The ingest thread's counters, bumped once per connection or refused line (never per
/// published event), so relaxed atomics cost nothing that matters.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub lines_refused: AtomicU64,
}

impl Counters {
    /// Count a response by status: every 4xx/5xx in `http_errors`, and in its own counter.
    pub fn count_status(&mut self, status: u16) {
        if status < 400 {
            return;
        }
        self.http_errors += 1;
        match status {
            400 => self.http_400 += 1,
            401 => self.http_401 += 1,
            403 => self.http_403 += 1,
            404 => self.http_404 += 1,
            405 => self.http_405 += 1,
            411 => self.http_411 += 1,
            413 => self.http_413 += 1,
            431 => self.http_431 += 1,
            429 => self.http_429 += 1,
            503 => self.http_503 += 1,
            _ => {}
        }
    }
}

/// Render `/metrics`: hub totals, then per-worker series labelled `worker`, then sums.
/// The TLS certificate store's process-wide figures.
pub fn render_tls(out: &mut String, certs: &crate::tls::CertStore) {
    let (reloads, failures) = certs.reloads();
    for (name, help, v) in [
        (
            "tls_reloads_total",
            "Certificate reloads that took effect (SIGHUP)",
            reloads,
        ),
        (
            "tls_reload_failures_total",
            "Certificate reloads refused (bad or missing files; the old ones stay)",
            failures,
        ),
    ] {
        row(out, name, "counter", help, v);
    }
}

/// Authentication's process-wide figures.
pub fn render_auth(out: &mut String, auth: &crate::auth::Auth) {
    let s = &auth.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, kind, help, v) in [
        (
            "auth_jwks_fetches_total",
            "counter",
            "JWKS fetch attempts (--auth-jwks-url)",
            get(&s.jwks_fetches),
        ),
        (
            "auth_jwks_fetch_failures_total",
            "counter",
            "JWKS fetches that failed (the last good keys stay in use)",
            get(&s.jwks_fetch_failures),
        ),
        (
            "auth_jwks_keys",
            "gauge",
            "Keys in the last good JWKS",
            get(&s.jwks_keys),
        ),
        (
            "auth_revocations",
            "gauge",
            "Revocations kept (by sub and by jti)",
            get(&s.revocations),
        ),
        (
            "auth_revocations_refused_total",
            "counter",
            "Revocations refused because the list was full",
            get(&s.revocations_refused),
        ),
    ] {
        row(out, name, kind, help, v);
    }
}

/// The Redis link's figures (`--cluster`).
pub fn render_cluster(out: &mut String, c: &crate::cluster::Cluster) {
    let s = &c.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, kind, help, v) in [
        (
            "cluster_link_up",
            "gauge",
            "1 while the reader's link to Redis is up",
            u64::from(c.link_up()),
        ),
        (
            "cluster_lag_ms",
            "gauge",
            "Age of the last stream entry read when it was read, in ms (0 when caught up and idle)",
            get(&s.lag_ms),
        ),
        (
            "cluster_reconnects_total",
            "counter",
            "Times the reader connected to Redis again after losing it",
            get(&s.reconnects),
        ),
        (
            "cluster_gaps_total",
            "counter",
            "Live herald-gap signals: Redis lost or trimmed entries before this node read them",
            get(&s.gaps),
        ),
        (
            "cluster_publish_errors_total",
            "counter",
            "Publishes refused because Redis did not accept them",
            get(&s.publish_errors),
        ),
        (
            "cluster_publishes_total",
            "counter",
            "Publishes Redis accepted from this node",
            get(&s.publishes),
        ),
        (
            "cluster_events_read_total",
            "counter",
            "Stream entries the reader took from Redis",
            get(&s.events_read),
        ),
    ] {
        row(out, name, kind, help, v);
    }
}

/// The access log's process-wide figures.
pub fn render_access_log(out: &mut String, log: &crate::access_log::AccessLog) {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, help, v) in [
        (
            "access_log_lines_total",
            "Access-log lines handed to the writer",
            get(&log.lines),
        ),
        (
            "access_log_dropped_total",
            "Access-log lines dropped because the writer was behind",
            get(&log.dropped),
        ),
        (
            "access_log_write_errors_total",
            "Access-log writes that failed",
            get(&log.write_errors),
        ),
    ] {
        row(out, name, "counter", help, v);
    }
}

pub fn render(hub: &Hub, workers: &[std::sync::Arc<WorkerStats>], backend: &str) -> String {
    let mut out = String::with_capacity(4096);
    let per: Vec<Vec<u64>> = workers.iter().map(|w| w.load().values()).collect();
    let _ = writeln!(out, "# HELP herald_info Build and backend information");
    let _ = writeln!(out, "# TYPE herald_info gauge");
    let _ = writeln!(
        out,
        "herald_info{{version=\"{}\",backend=\"{backend}\",workers=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        workers.len()
    );
    for (i, (name, kind, help)) in FIELDS.iter().enumerate() {
        let suffix = if *kind == "counter" { "_total" } else { "" };
        let _ = writeln!(out, "# HELP herald_{name}{suffix} {help}");
        let _ = writeln!(out, "# TYPE herald_{name}{suffix} {kind}");
        let sum: u64 = per.iter().map(|v| v[i]).sum();
        let _ = writeln!(out, "herald_{name}{suffix} {sum}");
        for (w, v) in per.iter().enumerate() {
            let _ = writeln!(out, "herald_{name}{suffix}{{worker=\"{w}\"}} {}", v[i]);
        }
    }
    let s = &hub.stats;
    let (topics, events, bytes) = hub.history_size();
    let ingest = |f: fn(&IngestStats) -> &AtomicU64| -> u64 {
        workers
            .iter()
            .map(|w| f(&w.ingest).load(Ordering::Relaxed))
            .sum()
    };
    for (name, kind, help, v) in [
        (
            "ingest_connections_open",
            "gauge",
            "Ingest (NDJSON) connections currently open",
            ingest(|i| &i.connections_open),
        ),
        (
            "ingest_connections_accepted_total",
            "counter",
            "Ingest connections accepted",
            ingest(|i| &i.connections_accepted),
        ),
        (
            "ingest_connections_refused_total",
            "counter",
            "Ingest connections refused over --ingest-max-connections",
            ingest(|i| &i.connections_refused),
        ),
        (
            "ingest_idle_timeouts_total",
            "counter",
            "Ingest connections closed after --ingest-idle-timeout without traffic",
            ingest(|i| &i.idle_timeouts),
        ),
        (
            "ingest_lines_refused_total",
            "counter",
            "Ingest lines answered with an error line (invalid, too long or not publishable)",
            ingest(|i| &i.lines_refused),
        ),
        (
            "events_ingested_total",
            "counter",
            "Events accepted for publishing",
            s.published.load(Ordering::Relaxed),
        ),
        (
            "events_rejected_total",
            "counter",
            "Publishes refused as invalid",
            s.rejected.load(Ordering::Relaxed),
        ),
        (
            "replays_total",
            "counter",
            "Subscriptions resumed with Last-Event-ID",
            s.replays.load(Ordering::Relaxed),
        ),
        (
            "replayed_events_total",
            "counter",
            "Retained events replayed on resume",
            s.replayed_events.load(Ordering::Relaxed),
        ),
        (
            "gap_signals_total",
            "counter",
            "herald-gap events sent (resume id unknown or no longer retained)",
            s.gaps.load(Ordering::Relaxed),
        ),
        (
            "topics_closed_total",
            "counter",
            "Topic close control messages",
            s.topics_closed.load(Ordering::Relaxed),
        ),
        (
            "worker_wakeups_total",
            "counter",
            "Parked workers woken by a publisher (once per batch of events, never per delivery)",
            s.wakeups.load(Ordering::Relaxed),
        ),
        (
            "history_janitor_last_microseconds",
            "gauge",
            "How long the last once-a-second history pass (age eviction, forgetting empty topics) held the hub lock",
            s.janitor_micros.load(Ordering::Relaxed),
        ),
        (
            "history_topics",
            "gauge",
            "Topics herald keeps state for: retained history, a close marker or subscribers (bounded by --history-topics)",
            topics as u64,
        ),
        (
            "history_events",
            "gauge",
            "Events retained for resume",
            events as u64,
        ),
        (
            "history_bytes",
            "gauge",
            "Bytes retained for resume",
            bytes as u64,
        ),
    ] {
        row(&mut out, name, kind, help, v);
    }
    out
}

/// One process-wide series with its HELP and TYPE lines.
fn row(out: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP herald_{name} {help}");
    let _ = writeln!(out, "# TYPE herald_{name} {kind}");
    let _ = writeln!(out, "herald_{name} {v}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::topic::Limits;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn render_sums_workers_and_labels_each() {
        let hub = Hub::new(
            2,
            Limits {
                max_events: 1,
                max_bytes: 1,
                max_age: Duration::from_secs(1),
            },
        );
        let a = Arc::new(WorkerStats::default());
        let b = Arc::new(WorkerStats::default());
        a.store(&Counters {
            events_delivered: 3,
            connections_open: 1,
            ..Counters::default()
        });
        b.store(&Counters {
            events_delivered: 4,
            ..Counters::default()
        });
        b.ingest.lines_refused.fetch_add(2, Ordering::Relaxed);
        let text = render(&hub, &[a, b], "epoll");
        assert!(
            text.contains("herald_ingest_lines_refused_total 2\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE herald_ingest_connections_open gauge\n"));
        assert!(text.contains("herald_events_delivered_total 7\n"), "{text}");
        assert!(text.contains("herald_events_delivered_total{worker=\"1\"} 4\n"));
        assert!(text.contains("herald_connections_open 1\n"));
        assert!(text.contains("# TYPE herald_connections_open gauge\n"));
        assert!(text.contains("herald_info{version="));
    }
}
