//! The HTTP side of a worker's connections: request heads and publish bodies in,
//! one-off responses and new subscriptions out. A subscription asks the hub for its replay
//! up to the last event this worker has taken, so replay and live delivery meet exactly.

use bytes::Bytes;

use super::fanout::{LocalTopic, SubRef};
use super::{flag, piece, ConnId, Core, Phase, ReadBuf, ReadOutcome, Sub, Subs, DEMO_PAGE};
use crate::fanout::bus::PublishFailure;
use crate::fanout::table::TopicName;
use crate::http::request::{parse_head, HttpError, Parsed, Request, Route};
use crate::http::response;
use crate::sse::event::{Publish, PublishError};

impl<H: Default> Core<H> {
    // ---- read ---------------------------------------------------------------------

    /// Bytes arrived on connection `c` (ciphertext on a TLS connection).
    pub fn handle_read(&mut self, c: ConnId, data: &[u8]) -> ReadOutcome {
        match self.conns.get(c as usize) {
            Some(conn) if conn.has(flag::TLS) => self.tls_read(c, data),
            Some(_) => self.handle_plain(c, data),
            None => ReadOutcome::Stop,
        }
    }

    /// Plaintext arrived on connection `c`.
    pub(super) fn handle_plain(&mut self, c: ConnId, data: &[u8]) -> ReadOutcome {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return ReadOutcome::Stop;
        };
        match conn.phase {
            Phase::Closing => return ReadOutcome::Stop,
            Phase::H2 => return self.h2_read(c, data),
            // A subscriber has nothing more to say; whatever it sends is dropped.
            Phase::Stream | Phase::Drain => return ReadOutcome::Continue,
            // An h2 stream carries one request.
            Phase::Respond | Phase::Await if conn.has(flag::H2S) => return ReadOutcome::Continue,
            Phase::Respond | Phase::Await => {
                // Pipelined request: keep it (bounded) until the response is written.
                let rb = conn.rbuf.get_or_insert_with(Box::default);
                if rb.buf.len() + data.len() > self.limits.max_head + self.limits.max_body {
                    self.close(c);
                    return ReadOutcome::Stop;
                }
                rb.buf.extend_from_slice(data);
                return ReadOutcome::Continue;
            }
            Phase::Head | Phase::Body => {}
        }
        if conn.phase == Phase::Head && !conn.has(flag::H2S) {
            if let Some(outcome) = self.h2_detect(c, data) {
                return outcome;
            }
        }
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return ReadOutcome::Stop;
        };
        match conn.rbuf.as_mut() {
            Some(rb) => rb.buf.extend_from_slice(data),
            None if conn.phase == Phase::Head => {
                // Fast path: the whole head arrived in one read, nothing is buffered.
                return self.process_input(c, Some(data));
            }
            None => {
                conn.rbuf = Some(Box::new(ReadBuf {
                    buf: data.to_vec(),
                    publish: None,
                }))
            }
        }
        self.process_input(c, None)
    }

    /// Peer closed its side (or the read failed). A client that sent its requests
    /// and then shut down its side still gets every answer: the connection closes once
    /// they are written. A subscriber that leaves is closed at once.
    pub fn handle_eof(&mut self, c: ConnId) {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        match conn.phase {
            Phase::Respond | Phase::Await => conn.flags |= flag::PEER_EOF,
            Phase::Closing => {}
            _ => self.close_for(c, super::auth::EndReason::Client),
        }
    }

    /// After a response: a peer that has shut down its side and has no complete request
    /// left is done.
    pub(super) fn close_if_peer_done(&mut self, c: ConnId) {
        if self.conns.get(c as usize).is_some_and(|cn| {
            cn.has(flag::PEER_EOF) && matches!(cn.phase, Phase::Head | Phase::Body)
        }) {
            self.close(c);
        }
    }

    /// Parse and act on buffered input (or `direct` bytes when nothing is buffered).
    pub(super) fn process_input(&mut self, c: ConnId, direct: Option<&[u8]>) -> ReadOutcome {
        match self.conns.get(c as usize).map(|cn| cn.phase) {
            Some(Phase::Head) => self.process_head(c, direct),
            Some(Phase::Body) => self.process_body(c),
            Some(Phase::Closing) | None => ReadOutcome::Stop,
            Some(_) => ReadOutcome::Continue,
        }
    }

    pub(super) fn process_head(&mut self, c: ConnId, direct: Option<&[u8]>) -> ReadOutcome {
        enum Step {
            More(Option<Vec<u8>>),
            Request(Request, Vec<u8>),
            Refuse(HttpError),
        }
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return ReadOutcome::Stop;
        };
        let step = {
            let buf: &[u8] = match (direct, conn.rbuf.as_ref()) {
                (Some(d), _) => d,
                (None, Some(rb)) => &rb.buf,
                (None, None) => return ReadOutcome::Continue,
            };
            if buf.is_empty() {
                return ReadOutcome::Continue;
            }
            match parse_head(buf, &self.limits) {
                Ok(Parsed::Partial) => Step::More(direct.map(<[u8]>::to_vec)),
                Ok(Parsed::Done(req)) => {
                    let rest = buf[req.head_len..].to_vec();
                    Step::Request(req, rest)
                }
                Err(e) => Step::Refuse(e),
            }
        };
        match step {
            Step::More(copy) => {
                if let Some(buf) = copy {
                    conn.rbuf = Some(Box::new(ReadBuf { buf, publish: None }));
                }
                ReadOutcome::Continue
            }
            Step::Request(mut req, rest) => {
                if conn.has(flag::H2S) {
                    // The body of an h2 stream is its DATA frames: no chunk framing.
                    req.http10 = true;
                    req.keep_alive = false;
                }
                conn.rbuf = (!rest.is_empty()).then(|| {
                    Box::new(ReadBuf {
                        buf: rest,
                        publish: None,
                    })
                });
                if !self.handle_request(c, req) {
                    return ReadOutcome::Stop;
                }
                // A publish body or a pipelined request may follow.
                self.process_input(c, None)
            }
            Step::Refuse(e) => {
                self.fail(c, e);
                ReadOutcome::Stop
            }
        }
    }

    pub(super) fn process_body(&mut self, c: ConnId) -> ReadOutcome {
        let Some(rb) = self
            .conns
            .get_mut(c as usize)
            .and_then(|cn| cn.rbuf.as_mut())
        else {
            return ReadOutcome::Continue;
        };
        let Some(want) = rb.publish.as_ref().map(|r| r.content_length) else {
            self.close(c);
            return ReadOutcome::Stop;
        };
        if rb.buf.len() < want {
            return ReadOutcome::Continue;
        }
        let mut body = std::mem::take(&mut rb.buf);
        rb.buf = body.split_off(want);
        let req = rb.publish.take().expect("checked above");
        self.finish_publish(c, *req, body);
        ReadOutcome::Continue
    }

    /// Act on a parsed request head. Returns false if the connection is done.
    pub(super) fn handle_request(&mut self, c: ConnId, req: Request) -> bool {
        // Over the connection limit: refuse, but keep health checks and scrapes working,
        // which is when an operator needs them most.
        let ops = matches!(req.route, Route::Health | Route::Metrics);
        if !ops
            && self
                .conns
                .get(c as usize)
                .is_some_and(|cn| cn.has(flag::REJECT))
        {
            self.respond(c, response::unavailable(1), false);
            return false;
        }
        self.info_request(c, &req);
        let keep = req.keep_alive;
        let head_only = req.head_only;
        let simple =
            |status, ct: &str, body: &[u8]| response::simple(status, ct, body, "", keep, head_only);
        match req.route {
            Route::Health => match self.shared.cluster.as_ref() {
                // A node cut off from Redis still serves its open streams but delivers
                // nothing new: a load balancer should send new clients elsewhere.
                Some(cl) if !cl.link_up() => self.respond(
                    c,
                    simple(
                        503,
                        "text/plain",
                        b"degraded: cluster link to redis is down\n",
                    ),
                    keep,
                ),
                _ => self.respond(c, simple(200, "text/plain", b"ok\n"), keep),
            },
            Route::Metrics => {
                let backend = self.shared.backend.get().copied().unwrap_or("unknown");
                let mut text =
                    crate::metrics::render(&self.shared.hub, &self.shared.stats, backend);
                if let Some(tls) = self.shared.tls.as_ref() {
                    crate::metrics::render_tls(&mut text, &tls.certs);
                }
                if let Some(auth) = self.shared.auth.as_ref() {
                    crate::metrics::render_auth(&mut text, auth);
                }
                if let Some(log) = self.shared.access_log.as_ref() {
                    crate::metrics::render_access_log(&mut text, log);
                }
                if let Some(cl) = self.shared.cluster.as_ref() {
                    crate::metrics::render_cluster(&mut text, cl);
                }
                let ct = "text/plain; version=0.0.4; charset=utf-8";
                self.respond(c, simple(200, ct, text.as_bytes()), keep)
            }
            Route::Demo if self.shared.config.demo => {
                let page = simple(200, "text/html; charset=utf-8", DEMO_PAGE.as_bytes());
                self.respond(c, page, keep)
            }
            Route::Demo => self.fail(c, HttpError::NotFound),
            Route::Preflight => {
                let cors = self.shared.cors.headers(req.origin.as_deref());
                self.respond(c, response::preflight(&cors), keep)
            }
            Route::Publish { .. } => return self.start_publish(c, req),
            Route::Subscribe { .. } => self.subscribe(c, req),
        }
        keep && self
            .conns
            .get(c as usize)
            .is_some_and(|cn| cn.phase != Phase::Closing)
    }

    /// A publish head: check who may publish and how big, then read the body.
    pub(super) fn start_publish(&mut self, c: ConnId, req: Request) -> bool {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return false;
        };
        if !conn.has(flag::PUBLISHER) {
            let topic = match &req.route {
                Route::Publish { topic, .. } => topic.clone(),
                _ => String::new(),
            };
            if let Err(answer) = self.authorize_publish(&req, &topic) {
                self.respond(c, answer, false);
                return false;
            }
        }
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return false;
        };
        let refusal: Option<(u16, &[u8])> = if req.chunked_body {
            Some((411, b"send the event data with a Content-Length\n"))
        } else {
            None
        };
        if let Some((status, body)) = refusal {
            self.respond(
                c,
                response::simple(status, "text/plain", body, "", false, false),
                false,
            );
            return false;
        }
        if req.content_length > self.limits.max_body {
            self.fail(c, HttpError::PayloadTooLarge);
            return false;
        }
        conn.phase = Phase::Body;
        conn.rbuf.get_or_insert_with(Box::default).publish = Some(Box::new(req));
        true
    }

    pub(super) fn finish_publish(&mut self, c: ConnId, req: Request, body: Vec<u8>) {
        let Route::Publish {
            topic,
            event,
            id,
            retry,
        } = req.route
        else {
            return;
        };
        let Ok(data) = String::from_utf8(body) else {
            let b = b"event data must be UTF-8\n";
            return self.respond(
                c,
                response::simple(400, "text/plain", b, "", false, false),
                false,
            );
        };
        let p = Publish {
            topic,
            data,
            event,
            id,
            retry,
        };
        let keep = req.keep_alive;
        let cors = self.shared.cors.headers(req.origin.as_deref());
        if let Some(cluster) = self.shared.cluster.as_ref() {
            // Through Redis, off this thread: the answer comes back to the inbox.
            let Some(conn) = self.conns.get_mut(c as usize) else {
                return;
            };
            let job = crate::cluster::Job {
                worker: self.id,
                conn: c,
                gen: conn.gen,
                keep,
                cors: cors.to_string(),
                publish: p,
            };
            conn.phase = Phase::Await;
            if !cluster.submit(job) {
                self.respond(c, response::unavailable(1), false);
            }
            return;
        }
        match self.shared.hub.try_publish(&p) {
            Ok(done) => {
                self.counters.http_publishes += 1;
                let body = format!("{}\n", serde_json::json!({ "id": &*done.id }));
                let r =
                    response::simple(200, "application/json", body.as_bytes(), &cors, keep, false);
                self.respond(c, r, keep);
            }
            Err(PublishFailure::Invalid(e @ PublishError::TooManyTopics { .. })) => {
                let body = format!("{}\n", serde_json::json!({ "error": e.to_string() }));
                let extra = format!("Retry-After: 60\r\n{cors}");
                let r = response::simple(
                    503,
                    "application/json",
                    body.as_bytes(),
                    &extra,
                    keep,
                    false,
                );
                self.respond(c, r, keep);
            }
            Err(PublishFailure::Invalid(e)) => {
                let body = format!("{}\n", serde_json::json!({ "error": e.to_string() }));
                let r =
                    response::simple(400, "application/json", body.as_bytes(), &cors, keep, false);
                self.respond(c, r, keep);
            }
            Err(PublishFailure::Busy) => {
                self.respond(c, response::unavailable(1), false);
            }
        }
    }

    /// Answer with an HTTP error and close.
    pub(super) fn fail(&mut self, c: ConnId, e: HttpError) {
        tracing::trace!(
            worker = self.id,
            conn = c,
            status = e.status(),
            "request refused"
        );
        self.respond(c, response::error(&e), false);
    }

    /// Queue a one-off response; then close, or wait for the next request if `keep`.
    pub(super) fn respond(&mut self, c: ConnId, bytes: Vec<u8>, keep: bool) {
        // Every response is built by `http::response` and starts "HTTP/1.1 NNN ".
        let status = std::str::from_utf8(bytes.get(9..12).unwrap_or_default())
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        self.counters.count_status(status);
        self.log_request(c, status);
        let write_ticks = self.ticks(self.shared.config.write_timeout);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        conn.phase = Phase::Respond;
        if keep {
            conn.flags |= flag::KEEP_ALIVE;
        } else {
            conn.flags &= !flag::KEEP_ALIVE;
        }
        let h2 = conn.has(flag::H2S);
        let bytes = with_hsts(bytes, self.is_tls(c), &self.shared);
        if h2 {
            self.h2_response(c, bytes);
        } else if let Some(conn) = self.conns.get_mut(c as usize) {
            conn.pre.push_back(Bytes::from(bytes));
        }
        self.wheel.insert(c, self.now_tick + write_ticks);
        self.mark_ready(c);
    }

    // ---- subscribe ----------------------------------------------------------------

    pub(super) fn subscribe(&mut self, c: ConnId, req: Request) {
        let claims = match &req.route {
            Route::Subscribe { topics, .. } => match self.authorize_subscribe(c, &req, topics) {
                super::auth::Authz::Public => None,
                super::auth::Authz::Granted(claims) => Some(claims),
                super::auth::Authz::Answered => return,
            },
            _ => return,
        };
        if let Route::Subscribe {
            last_event_id: Some(id),
            ..
        } = &req.route
        {
            if let Some(seq) = self.shared.hub.ahead_of_reader(id) {
                if self.may_wait(c) {
                    return self.park_until_read(c, &req, seq);
                }
            }
        }
        self.stream_started_pre(c, &req);
        let Route::Subscribe {
            topics,
            last_event_id,
        } = req.route
        else {
            return;
        };
        let cors = self.shared.cors.headers(req.origin.as_deref());
        let mut attach = self
            .shared
            .hub
            .attach(self.id, &topics, last_event_id.as_deref());
        // What the hub had queued for this worker is older than the replay's end: it goes
        // to the local logs before the new stream's cursors are placed at their ends.
        for msg in std::mem::take(&mut attach.pending) {
            self.handle_msg(msg);
        }
        let last_retry = attach.last_retry;
        if attach.closed {
            if let Some(sub) = claims.as_ref().and_then(|cl| cl.sub.as_deref()) {
                if let Some(auth) = self.shared.auth.as_ref() {
                    if self.shared.config.auth.max_streams_per_user > 0 {
                        auth.release_stream(sub);
                    }
                }
            }
            return self.respond(c, response::no_content(&cors), false);
        }
        let http10 = req.http10;
        let head = response::stream_head(http10, &cors, self.shared.config.retry);
        let subs: Vec<Sub> = attach
            .names
            .iter()
            .map(|name| {
                let t = self.local_topic(name, last_retry);
                Sub {
                    topic: t,
                    pos: 0,
                    cursor: self.topics[t as usize].end(),
                }
            })
            .collect();
        let ka = self.ticks(self.shared.config.keepalive);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        conn.phase = Phase::Stream;
        if http10 {
            conn.flags |= flag::HTTP10;
        }
        conn.rbuf = None;
        let h2 = conn.has(flag::H2S);
        let head = with_hsts(head, self.is_tls(c), &self.shared);
        if h2 {
            self.h2_response(c, head);
        } else if let Some(conn) = self.conns.get_mut(c as usize) {
            conn.pre.push_back(Bytes::from(head));
        }
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if let Some(gap) = &attach.gap {
            conn.pre.push_back(piece(gap, http10));
        }
        conn.replay = attach.replay.map(Box::new);
        conn.subs = if subs.len() == 1 {
            Subs::One(subs[0])
        } else {
            Subs::Many(subs.into())
        };
        for (slot, s) in conn.subs.as_mut_slice().iter_mut().enumerate() {
            let t = &mut self.topics[s.topic as usize];
            s.pos = t.subs.len() as u32;
            t.subs.push(SubRef {
                conn: c,
                slot: slot as u32,
            });
        }
        self.counters.streams_started += 1;
        self.counters.streams_open += 1;
        if let Some(claims) = claims {
            self.stream_authorized(c, claims);
        }
        self.stream_started(c);
        let first = self.first_stream_deadline(c, self.now_tick + ka);
        self.wheel.insert(c, first);
        self.mark_ready(c);
    }

    /// Queue the next batch of `c`'s replay once its `pre` frames are all written: the
    /// replay is fed as the client takes it, so it counts against nothing unbounded and
    /// never holds the hub lock for more than a batch. Live frames wait behind it.
    pub(super) fn feed_replay(&mut self, c: ConnId) {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if !conn.pre.is_empty() {
            return;
        }
        let Some(cur) = conn.replay.as_mut() else {
            return;
        };
        if cur.remote {
            // From Redis, off this thread: the batch comes back to the inbox.
            if !cur.asked {
                cur.asked = true;
                let fetch = crate::cluster::Fetch {
                    worker: self.id,
                    conn: c,
                    gen: conn.gen,
                    topics: conn
                        .subs
                        .as_slice()
                        .iter()
                        .map(|s| self.topics.name(s.topic).clone())
                        .collect(),
                    after: cur.after,
                    upto: cur.upto,
                    last_id: cur.last_id.clone(),
                    first: !cur.started,
                };
                let sent = self
                    .shared
                    .cluster
                    .as_ref()
                    .is_some_and(|cl| cl.fetch(fetch));
                if !sent {
                    // Shutting down: the client resumes elsewhere.
                    conn.replay = None;
                }
            }
            return;
        }
        let names: Vec<&str> = conn
            .subs
            .as_slice()
            .iter()
            .map(|s| &**self.topics.name(s.topic))
            .collect();
        let batch = self.shared.hub.replay_batch(&names, cur);
        let http10 = conn.has(flag::HTTP10);
        if let Some(gap) = &batch.gap {
            conn.pre.push_back(piece(gap, http10));
        }
        for ev in &batch.events {
            conn.pre.push_back(piece(&ev.frame, http10));
        }
        if batch.done {
            conn.replay = None;
        }
    }

    /// The worker's topic `name`, created with the hub's last `retry` for it if new.
    pub(super) fn local_topic(&mut self, name: &TopicName, last_retry: Option<u32>) -> u32 {
        self.topics
            .get_or_insert_with(name, || LocalTopic::new(last_retry))
    }

    /// Remove connection `c`'s subscriptions (its cursors no longer pin log entries).
    pub(super) fn detach(&mut self, c: ConnId) {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        let subs = std::mem::replace(&mut conn.subs, Subs::None);
        if subs.as_slice().is_empty() {
            return;
        }
        self.counters.streams_open = self.counters.streams_open.saturating_sub(1);
        for s in subs.as_slice() {
            let t = &mut self.topics[s.topic as usize];
            t.subs.swap_remove(s.pos as usize);
            if let Some(moved) = t.subs.get(s.pos as usize).copied() {
                if let Some(mc) = self.conns.get_mut(moved.conn as usize) {
                    mc.subs.as_mut_slice()[moved.slot as usize].pos = s.pos;
                }
            }
            if t.subs.is_empty() {
                let (name, t) = self.topics.remove_at(s.topic);
                self.counters.fanout_backlog_bytes -= t.pending_bytes();
                // This worker no longer wants the topic's events.
                self.shared.hub.unsubscribe(self.id, &name);
            }
        }
    }
}

/// A response head with the `Strict-Transport-Security` line added after its status line,
/// on a TLS connection when `--hsts` is set.
fn with_hsts(mut head: Vec<u8>, tls: bool, shared: &super::Shared) -> Vec<u8> {
    let Some(line) = shared.tls.as_ref().and_then(|t| t.hsts.as_deref()) else {
        return head;
    };
    if !tls {
        return head;
    }
    if let Some(at) = head.windows(2).position(|w| w == b"\r\n") {
        let tail = head.split_off(at + 2);
        head.extend_from_slice(line.as_bytes());
        head.extend_from_slice(&tail);
    }
    head
}
