//! Authentication and the access log in the worker: who may open a stream, when a stream
//! must end because of its token (expiry, revocation), and the lines the access log gets.
//!
//! Everything per connection lives in a side table (`Core::info`), filled only when
//! authentication or the access log is on and only for connections that need it, so a
//! server with neither pays nothing per connection, and nothing here runs per delivery
//! beyond two counters on a write's completion.
//!
//! A stream's token sets two moments, both in the connection's one timer: the expiry
//! notice (`event: herald-auth-expiring`, `--auth-expiry-notice` before the end) and the
//! end, spread over the last tenth of the token's lifetime so tokens minted together do not
//! reconnect together, always before `exp`. The end is the drain's: after everything
//! already queued, a `retry:` hint and the last chunk.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{flag, piece, ConnId, Core, Phase};
use crate::auth::{Claims, Refusal, Revoke};
use crate::http::request::{Request, Route, TokenSource};
use crate::http::response;

/// How a stream ended, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Client,
    Slow,
    Stall,
    Drain,
    Expired,
    Revoked,
    TopicClosed,
    Error,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Client => "client",
            EndReason::Slow => "slow",
            EndReason::Stall => "stall",
            EndReason::Drain => "drain",
            EndReason::Expired => "expired",
            EndReason::Revoked => "revoked",
            EndReason::TopicClosed => "topic-closed",
            EndReason::Error => "error",
        }
    }
}

/// A notice that came due while a frame was being written is retried this many ticks on.
const NOTICE_RETRY_TICKS: u64 = 10;
/// `Retry-After` of a 429 over `--max-streams-per-user`, in seconds.
const LIMIT_RETRY_AFTER_S: u32 = 5;

/// What a connection carries for authentication and the access log. The access log's
/// share is boxed apart, so a token's stream without the log holds about 100 bytes here.
#[derive(Debug, Default)]
pub(crate) struct ConnInfo {
    /// With the access log on.
    log: Option<Box<LogInfo>>,
    sub: Option<Arc<str>>,
    jti: Option<Arc<str>>,
    /// The token's `iat` (unix s), to tell a revocation's targets from newer tokens.
    iat: Option<u64>,
    /// The token's `exp` (unix s); 0 without a token.
    exp: u64,
    notice_tick: u64,
    end_tick: u64,
    notice_sent: bool,
    /// Counted in `--max-streams-per-user`.
    counted: bool,
    reason: Option<EndReason>,
    /// A request waiting for a JWKS refetch, and the fetch epoch it saw.
    parked: Option<(Box<Request>, u64)>,
    /// `--cluster`: the parked request resumes from an id this node has not read yet;
    /// it waits until the reader has (the sequence), or until the tick given.
    ahead: Option<(u64, u64)>,
    /// The request already waited for one refetch.
    retried: bool,
}

/// What the access log needs of a connection.
#[derive(Debug, Default)]
pub(crate) struct LogInfo {
    peer: Option<IpAddr>,
    /// The request being answered.
    method: &'static str,
    path: Option<Box<str>>,
    /// The stream's start, once its head is queued.
    started: Option<SystemTime>,
    topics: Vec<String>,
    last_event_id: Option<String>,
    pub(super) events: u64,
    bytes: u64,
}

impl ConnInfo {
    fn log(&mut self) -> &mut LogInfo {
        self.log.get_or_insert_with(Box::default)
    }

    /// The access log's share, if any.
    pub(super) fn log_mut(&mut self) -> Option<&mut LogInfo> {
        self.log.as_deref_mut()
    }

    /// Disconnected over its backlog (set where the connection's record is already
    /// borrowed).
    pub(super) fn slow(&mut self) {
        self.reason.get_or_insert(EndReason::Slow);
    }
}

/// The outcome of checking a subscription.
pub(super) enum Authz {
    /// Every topic is public (or authentication is off): no token involved.
    Public,
    Granted(Claims),
    /// Refused (the answer is queued) or waiting for a JWKS refetch.
    Answered,
}

/// What the expiry check did to a stream.
pub(super) enum ExpiryStep {
    /// The stream's end has begun.
    Ended,
    /// Look again at this tick.
    Next(u64),
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<H: Default> Core<H> {
    pub(super) fn info_mut(&mut self, c: ConnId) -> Option<&mut ConnInfo> {
        self.info.get_mut(c as usize)?.as_deref_mut()
    }

    fn info_or_insert(&mut self, c: ConnId) -> &mut ConnInfo {
        let i = c as usize;
        if self.info.len() <= i {
            self.info.resize_with(i + 1, || None);
        }
        self.info[i].get_or_insert_with(Box::default)
    }

    /// A connection was accepted: with the access log on, remember its peer.
    pub(super) fn info_accepted(&mut self, c: ConnId, peer: Option<IpAddr>) {
        if let Some(slot) = self.info.get_mut(c as usize) {
            *slot = None;
        }
        if self.shared.access_log.is_some() {
            self.info_or_insert(c).log().peer = peer;
        }
    }

    /// The peer address remembered for `c` (with the access log on).
    pub(super) fn info_peer(&self, c: ConnId) -> Option<IpAddr> {
        self.info.get(c as usize)?.as_ref()?.log.as_ref()?.peer
    }

    /// The first reason a connection is ending wins.
    pub(super) fn set_reason(&mut self, c: ConnId, r: EndReason) {
        if let Some(i) = self.info_mut(c) {
            i.reason.get_or_insert(r);
        }
    }

    /// Close `c`, recording why (for a stream's access-log end line).
    pub(super) fn close_for(&mut self, c: ConnId, r: EndReason) {
        self.set_reason(c, r);
        self.close(c);
    }

    /// A write on `c` moved `bytes`.
    pub(super) fn info_written(&mut self, c: ConnId, bytes: usize) {
        if let Some(l) = self.info_mut(c).and_then(ConnInfo::log_mut) {
            l.bytes += bytes as u64;
        }
    }

    /// A request head is being acted on: note what the access log needs of it.
    pub(super) fn info_request(&mut self, c: ConnId, req: &Request) {
        if self.shared.access_log.is_none() {
            return;
        }
        let l = self.info_or_insert(c).log();
        l.method = req.method;
        l.path = req.path.as_deref().map(Into::into);
    }

    fn is_public(&self, topic: &str) -> bool {
        crate::auth::pattern::any_matches(&self.shared.config.auth.public_topics, None, topic)
    }

    /// May `c` subscribe to `topics`? Refusals are answered here; an unknown `kid` parks
    /// the request until the JWKS thread has fetched again.
    pub(super) fn authorize_subscribe(
        &mut self,
        c: ConnId,
        req: &Request,
        topics: &[String],
    ) -> Authz {
        let Some(private) = topics.iter().find(|t| !self.is_public(t)) else {
            return Authz::Public;
        };
        let private = private.clone();
        let Some(auth) = self.shared.auth.clone() else {
            return self.refuse(c, req, Refusal::Missing);
        };
        let Some(token) = req.token.as_ref() else {
            return self.refuse(c, req, Refusal::Missing);
        };
        let claims = match auth.verify(&token.value) {
            Ok(claims) => claims,
            Err(Refusal::UnknownKid) => {
                let retried = self.info_mut(c).is_some_and(|i| i.retried);
                let wait = if retried {
                    // The fetch it waited for began before it asked; one more is queued.
                    auth.refetch_pending()
                } else {
                    auth.request_refetch()
                };
                if wait {
                    self.park_request(c, req, auth.jwks_epoch());
                    return Authz::Answered;
                }
                return self.refuse(c, req, Refusal::Invalid("unknown key id"));
            }
            Err(r) => return self.refuse(c, req, r),
        };
        let denied = std::iter::once(&private)
            .chain(topics.iter())
            .find(|t| !self.is_public(t) && !claims.may_subscribe(t));
        let refusal = if denied.is_some() {
            Some(Refusal::Scope)
        } else {
            claims
                .sub
                .as_deref()
                .filter(|sub| !auth.acquire_stream(sub))
                .map(|_| Refusal::Limit)
        };
        if let Some(r) = refusal {
            if self.shared.access_log.is_some() {
                // The refused request's log line names who asked.
                self.info_or_insert(c).sub = claims.sub.as_deref().map(Into::into);
            }
            return self.refuse(c, req, r);
        }
        self.counters.auth_streams += 1;
        Authz::Granted(claims)
    }

    /// May a publisher outside `--publish-allow` publish to `topic`? Only a Bearer header
    /// counts (a cookie would let any page that can make the browser POST publish).
    pub(super) fn authorize_publish(&mut self, req: &Request, topic: &str) -> Result<(), Vec<u8>> {
        let cors = self.shared.cors.headers(req.origin.as_deref());
        let not_allowed = || {
            response::simple(
                403,
                "text/plain",
                b"publishing is not allowed from this address\n",
                &cors,
                false,
                false,
            )
        };
        let Some(auth) = self.shared.auth.clone() else {
            return Err(not_allowed());
        };
        let Some(token) = req
            .token
            .as_ref()
            .filter(|t| t.source == TokenSource::Header)
        else {
            return Err(not_allowed());
        };
        let refusal = match auth.verify(&token.value) {
            Ok(claims) if claims.may_publish(topic) => {
                self.counters.auth_publishes += 1;
                return Ok(());
            }
            Ok(_) => Refusal::Scope,
            Err(Refusal::UnknownKid) => {
                // No waiting on a publish: ask for the keys, the publisher retries.
                auth.request_refetch();
                Refusal::Invalid("unknown key id")
            }
            Err(r) => r,
        };
        self.count_refusal(refusal);
        Err(refusal_response(refusal, &cors, false))
    }

    fn count_refusal(&mut self, r: Refusal) {
        let n = &mut self.counters;
        match r {
            Refusal::Missing => n.auth_refused_missing += 1,
            Refusal::Invalid("token revoked") => n.auth_refused_revoked += 1,
            Refusal::Invalid("token expired") => n.auth_refused_expired += 1,
            Refusal::Invalid(_) | Refusal::UnknownKid => n.auth_refused_invalid += 1,
            Refusal::Scope => n.auth_refused_scope += 1,
            Refusal::Limit => n.auth_refused_limit += 1,
        }
    }

    fn refuse(&mut self, c: ConnId, req: &Request, r: Refusal) -> Authz {
        if let Some(i) = self.info_mut(c) {
            i.retried = false;
        }
        self.count_refusal(r);
        let cors = self.shared.cors.headers(req.origin.as_deref());
        self.respond(
            c,
            refusal_response(r, &cors, req.keep_alive),
            req.keep_alive,
        );
        Authz::Answered
    }

    fn park_request(&mut self, c: ConnId, req: &Request, epoch: u64) {
        self.counters.auth_waits += 1;
        let deadline = self.now_tick + self.ticks(self.shared.config.head_timeout);
        let i = self.info_or_insert(c);
        i.parked = Some((Box::new(req.clone()), epoch));
        i.retried = true;
        // Pipelined bytes are held (bounded) as while a response is written.
        if let Some(conn) = self.conns.get_mut(c as usize) {
            conn.phase = Phase::Respond;
            conn.flags &= !flag::KEEP_ALIVE;
        }
        self.parked.push(c);
        self.wheel.insert(c, deadline);
    }

    pub(super) fn is_parked(&self, c: ConnId) -> bool {
        self.info
            .get(c as usize)
            .and_then(|i| i.as_deref())
            .is_some_and(|i| i.parked.is_some())
    }

    /// Park a subscription whose `Last-Event-ID` is a position this node's Redis reader
    /// has not reached yet (`--cluster`: the client came from a node that is ahead). It
    /// is looked at every tick and goes on once the reader is there, or after a second
    /// (then as an unknown id: a gap signal, never a wrong position).
    pub(super) fn park_until_read(&mut self, c: ConnId, req: &Request, seq: u64) {
        self.counters.cluster_waits += 1;
        let deadline = self.now_tick + self.ticks(std::time::Duration::from_secs(1));
        let i = self.info_or_insert(c);
        i.parked = Some((Box::new(req.clone()), 0));
        i.ahead = Some((seq, deadline));
        i.retried = true;
        if let Some(conn) = self.conns.get_mut(c as usize) {
            conn.phase = Phase::Respond;
            conn.flags &= !flag::KEEP_ALIVE;
        }
        self.wheel.insert(c, self.now_tick + 1);
    }

    /// Whether `c`'s request may wait (once) for the reader.
    pub(super) fn may_wait(&self, c: ConnId) -> bool {
        !self
            .info
            .get(c as usize)
            .and_then(|i| i.as_deref())
            .is_some_and(|i| i.retried)
    }

    /// At `c`'s timer: a request parked by [`Core::park_until_read`] goes on once the
    /// reader has reached its id or its wait is over; true if it was one.
    pub(super) fn check_read_wait(&mut self, c: ConnId) -> bool {
        let Some((seq, deadline)) = self
            .info
            .get(c as usize)
            .and_then(|i| i.as_deref())
            .and_then(|i| i.ahead)
        else {
            return false;
        };
        if self.shared.hub.newest_seq() >= seq || self.now_tick >= deadline {
            if let Some(i) = self.info_mut(c) {
                i.ahead = None;
            }
            self.resume(c);
        } else {
            self.wheel.insert(c, self.now_tick + 1);
        }
        true
    }

    /// Retry the requests that waited for a JWKS fetch that has now happened (or all of
    /// them, at their deadline: `force`).
    pub(super) fn resume_parked(&mut self) {
        let Some(epoch) = self.shared.auth.as_ref().map(|a| a.jwks_epoch()) else {
            return;
        };
        let waiting = std::mem::take(&mut self.parked);
        for c in waiting {
            let due = self
                .info
                .get(c as usize)
                .and_then(|i| i.as_deref())
                .and_then(|i| i.parked.as_ref())
                .is_some_and(|(_, seen)| epoch > *seen);
            if due {
                self.resume(c);
            } else if self.is_parked(c) {
                self.parked.push(c);
            }
        }
    }

    /// Act on `c`'s parked request again.
    pub(super) fn resume(&mut self, c: ConnId) {
        let Some((req, _)) = self.info_mut(c).and_then(|i| i.parked.take()) else {
            return;
        };
        self.parked.retain(|&p| p != c);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if conn.phase == Phase::Closing {
            return;
        }
        conn.phase = Phase::Head;
        if self.handle_request(c, *req) {
            self.process_input(c, None);
        }
    }

    /// A stream was granted: remember its token's subject and moments.
    pub(super) fn stream_authorized(&mut self, c: ConnId, claims: Claims) {
        let now = SystemTime::now();
        let now_ms = unix_ms(now);
        let notice_ms = self.shared.config.auth.expiry_notice.as_millis() as u64;
        let gen = self.conns.get(c as usize).map_or(0, |cn| cn.gen);
        let exp_ms = claims.exp.saturating_mul(1000);
        let issued_ms = claims
            .iat
            .map(|t| t.saturating_mul(1000))
            .filter(|&t| t < exp_ms && t <= now_ms)
            .unwrap_or(now_ms);
        let tenth = (exp_ms.saturating_sub(issued_ms) / 10).max(1);
        let spread = ((c as u64) << 32 | gen as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
        // In the last tenth of the lifetime, strictly before `exp`.
        let end_ms = exp_ms.saturating_sub(1 + spread % tenth).max(now_ms);
        let notice_at = end_ms.saturating_sub(notice_ms).max(now_ms);
        let now_tick = self.now_tick;
        let to_tick = |ms: u64| now_tick + (ms - now_ms) / super::TICK.as_millis() as u64;
        let sub: Option<Arc<str>> = claims.sub.as_deref().map(Into::into);
        let jti: Option<Arc<str>> = claims.jti.as_deref().map(Into::into);
        let counted = sub.is_some() && self.shared.config.auth.max_streams_per_user > 0;
        let (notice_tick, end_tick) = (to_tick(notice_at), to_tick(end_ms));
        let i = self.info_or_insert(c);
        i.sub = sub.clone();
        i.jti = jti.clone();
        i.iat = claims.iat;
        i.exp = claims.exp;
        i.notice_tick = notice_tick;
        i.end_tick = end_tick;
        i.notice_sent = false;
        i.counted = counted;
        if let Some(s) = sub {
            self.by_sub.entry(s).or_default().push(c);
        }
        if let Some(j) = jti {
            self.by_jti.entry(j).or_default().push(c);
        }
    }

    /// The stream's first timer: the keep-alive's, or its token's notice if sooner.
    pub(super) fn first_stream_deadline(&self, c: ConnId, keepalive_at: u64) -> u64 {
        match self.info.get(c as usize).and_then(|i| i.as_deref()) {
            Some(i) if i.exp > 0 => keepalive_at.min(i.notice_tick.max(self.now_tick + 1)),
            _ => keepalive_at,
        }
    }

    /// At a stream's timer: send its expiry notice or begin its end when due.
    pub(super) fn expiry_step(&mut self, c: ConnId, now: u64) -> Option<ExpiryStep> {
        let busy = self
            .conns
            .get(c as usize)
            .is_some_and(|cn| cn.has(flag::WRITING))
            || self.has_pending(c);
        let i = self.info.get_mut(c as usize)?.as_deref_mut()?;
        if i.exp == 0 {
            return None;
        }
        if now >= i.end_tick {
            i.reason.get_or_insert(EndReason::Expired);
            self.counters.auth_streams_expired += 1;
            self.start_drain(c, true, 0);
            return Some(ExpiryStep::Ended);
        }
        if !i.notice_sent && now >= i.notice_tick {
            if busy {
                // A frame is partly written: the notice waits for the boundary.
                return Some(ExpiryStep::Next(now + NOTICE_RETRY_TICKS));
            }
            i.notice_sent = true;
            let body = format!(
                "event: herald-auth-expiring\ndata: {{\"exp\":{}}}\n\n",
                i.exp
            );
            let frame = crate::sse::encode::chunk(body.as_bytes());
            let conn = &mut self.conns[c as usize];
            conn.pre.push_back(piece(&frame, conn.has(flag::HTTP10)));
            self.counters.auth_expiry_notices += 1;
            self.mark_ready(c);
        }
        let i = self.info.get(c as usize)?.as_deref()?;
        Some(ExpiryStep::Next(if i.notice_sent {
            i.end_tick
        } else {
            i.notice_tick
        }))
    }

    /// An ingest revocation: end at once this worker's streams it covers (tokens of the
    /// subject issued up to `at`, or the one token).
    pub(super) fn handle_revoke(&mut self, what: &Revoke, at: u64) {
        let conns: Vec<ConnId> = match what {
            Revoke::Sub(s) => self.by_sub.get(s).cloned().unwrap_or_default(),
            Revoke::Jti(j) => self.by_jti.get(j).cloned().unwrap_or_default(),
        };
        for c in conns {
            let covered = match (what, self.info.get(c as usize).and_then(|i| i.as_deref())) {
                (Revoke::Sub(_), Some(i)) => i.iat.is_none_or(|iat| iat <= at),
                (Revoke::Jti(_), Some(_)) => true,
                (_, None) => false,
            };
            let live = self
                .conns
                .get(c as usize)
                .is_some_and(|cn| cn.phase != Phase::Closing);
            if covered && live {
                self.counters.auth_streams_revoked += 1;
                // At once, without the queued events: they were for the revoked token.
                self.close_for(c, EndReason::Revoked);
            }
        }
    }

    /// The connection is going away: its access-log end line, its per-user count, its
    /// place in the revocation index.
    pub(super) fn info_released(&mut self, c: ConnId) {
        let Some(info) = self.info.get_mut(c as usize).and_then(Option::take) else {
            return;
        };
        self.parked.retain(|&p| p != c);
        if info.log.as_ref().is_some_and(|l| l.started.is_some()) {
            self.log_stream(c, &info, true);
        }
        if info.counted {
            if let (Some(auth), Some(sub)) = (self.shared.auth.as_ref(), info.sub.as_deref()) {
                auth.release_stream(sub);
            }
        }
        for (index, key) in [(&mut self.by_sub, &info.sub), (&mut self.by_jti, &info.jti)] {
            if let Some(k) = key {
                if let Some(v) = index.get_mut(k) {
                    v.retain(|&x| x != c);
                    if v.is_empty() {
                        index.remove(k);
                    }
                }
            }
        }
    }

    // ---- access log ---------------------------------------------------------------

    fn log_base(
        &self,
        c: ConnId,
        ev: &str,
        info: Option<&ConnInfo>,
    ) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::Value;
        let conn = self.conns.get(c as usize);
        let mut m = serde_json::Map::new();
        m.insert("ev".into(), ev.into());
        m.insert(
            "ts".into(),
            crate::access_log::timestamp(SystemTime::now()).into(),
        );
        m.insert("worker".into(), self.id.into());
        m.insert("conn".into(), conn.map_or(0, |cn| cn.gen).into());
        m.insert(
            "remote".into(),
            info.and_then(|i| i.log.as_ref()?.peer)
                .map_or(Value::Null, |p| p.to_string().into()),
        );
        let proto = match conn {
            Some(cn) if cn.has(flag::H2S | flag::H2) => "HTTP/2",
            Some(cn) if cn.has(flag::HTTP10) => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        m.insert("proto".into(), proto.into());
        m.insert("tls".into(), self.is_tls(c).into());
        m
    }

    /// The access-log line of a one-off response.
    pub(super) fn log_request(&mut self, c: ConnId, status: u16) {
        if self.shared.access_log.is_none() {
            return;
        }
        let info = self.info_mut(c).map(|i| {
            let sub = i.sub.take();
            let l = i.log();
            (std::mem::take(&mut l.method), l.path.take(), sub)
        });
        let peer = self.info.get(c as usize).and_then(|i| i.as_deref());
        let mut m = self.log_base(c, "request", peer);
        let (method, path, sub) = info.unwrap_or(("", None, None));
        m.insert(
            "method".into(),
            if method.is_empty() {
                None
            } else {
                Some(method)
            }
            .into(),
        );
        m.insert("path".into(), path.as_deref().into());
        m.insert("sub".into(), sub.as_deref().into());
        m.insert("status".into(), status.into());
        self.log.push(&serde_json::Value::Object(m));
    }

    /// A subscription was granted: keep what its access-log lines name.
    pub(super) fn stream_started_pre(&mut self, c: ConnId, req: &Request) {
        if self.shared.access_log.is_none() {
            return;
        }
        let Route::Subscribe {
            topics,
            last_event_id,
        } = &req.route
        else {
            return;
        };
        let l = self.info_or_insert(c).log();
        l.topics = topics.clone();
        l.last_event_id = last_event_id.clone();
    }

    /// A stream's head is queued: its start line.
    pub(super) fn stream_started(&mut self, c: ConnId) {
        if self.shared.access_log.is_none() {
            return;
        }
        let l = self.info_or_insert(c).log();
        l.started = Some(SystemTime::now());
        l.method = "";
        l.path = None;
        if let Some(info) = self.info.get_mut(c as usize).and_then(Option::take) {
            self.log_stream(c, &info, false);
            self.info[c as usize] = Some(info);
        }
    }

    fn log_stream(&mut self, c: ConnId, info: &ConnInfo, end: bool) {
        if self.shared.access_log.is_none() {
            return;
        }
        let Some(l) = info.log.as_deref() else {
            return;
        };
        let mut m = self.log_base(c, if end { "end" } else { "start" }, Some(info));
        m.insert("topics".into(), l.topics.clone().into());
        m.insert("sub".into(), info.sub.as_deref().into());
        m.insert("last_event_id".into(), l.last_event_id.clone().into());
        m.insert("status".into(), 200.into());
        if info.exp > 0 {
            m.insert("exp".into(), info.exp.into());
        }
        if end {
            let started = l.started.unwrap_or_else(SystemTime::now);
            let ms = SystemTime::now()
                .duration_since(started)
                .map_or(0, |d| d.as_millis() as u64);
            m.insert("duration_ms".into(), ms.into());
            m.insert("events".into(), l.events.into());
            m.insert("bytes".into(), l.bytes.into());
            let reason = info.reason.unwrap_or(EndReason::Error);
            m.insert("reason".into(), reason.as_str().into());
        }
        self.log.push(&serde_json::Value::Object(m));
    }

    /// Hand this turn's access-log lines to the writer thread.
    pub(super) fn flush_log(&mut self) {
        if self.log.lines == 0 {
            return;
        }
        if let Some(log) = self.shared.access_log.as_ref() {
            let buf = std::mem::take(&mut self.log.buf);
            log.submit(buf, std::mem::take(&mut self.log.lines));
        }
    }
}

/// The answer to a refused token, in RFC 6750 form.
pub(super) fn refusal_response(r: Refusal, cors: &str, keep: bool) -> Vec<u8> {
    const REALM: &str = "Bearer realm=\"herald\"";
    let invalid = |why: &str| {
        (
            401,
            format!("{REALM}, error=\"invalid_token\", error_description=\"{why}\""),
            format!("invalid token: {why}\n"),
        )
    };
    let (status, challenge, body): (u16, String, String) = match r {
        Refusal::Missing => (401, REALM.into(), "a token is required\n".into()),
        Refusal::Invalid(why) => invalid(why),
        Refusal::UnknownKid => invalid("unknown key id"),
        Refusal::Scope => (
            403,
            format!(
                "{REALM}, error=\"insufficient_scope\", error_description=\"topic not granted\""
            ),
            "the token does not grant this topic\n".into(),
        ),
        Refusal::Limit => {
            let extra = format!("Retry-After: {LIMIT_RETRY_AFTER_S}\r\n{cors}");
            return response::simple(
                429,
                "text/plain; charset=utf-8",
                b"too many streams for this user\n",
                &extra,
                keep,
                false,
            );
        }
    };
    let extra = format!("WWW-Authenticate: {challenge}\r\n{cors}");
    response::simple(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        &extra,
        keep,
        false,
    )
}

#[cfg(test)]
mod tests {
    /// What a token's stream adds (before its `sub` and `jti` strings): kept small, since
    /// per-user deployments have one such stream per user.
    #[test]
    fn a_token_stream_record_stays_small() {
        assert!(std::mem::size_of::<super::ConnInfo>() <= 128);
    }
}
