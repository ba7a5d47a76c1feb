//! HTTP/2 on a worker's connections, sans-IO, over the same read and write path as
//! HTTP/1.1 and TLS (RFC 9113: preface, SETTINGS, HEADERS + CONTINUATION, DATA,
//! WINDOW_UPDATE, PING, RST_STREAM, GOAWAY; no push, priorities ignored).
//!
//! Each stream is an ordinary connection record in the slab (a "child", flag `H2S`) with
//! HTTP/1.0 body framing, so requests, subscriptions, fan-out, replay, keep-alives, the
//! drain and the timers treat it exactly like an HTTP/1.1 connection. What differs is
//! only the edges:
//! - in: a request's decoded header list becomes an HTTP/1.1 head for the same parser;
//! - out: a child never writes. When it has frames pending it queues itself on its
//!   connection (the "parent", flag `H2`), whose write is a *plan*: control frames, then
//!   per ready stream its HEADERS and DATA frames, each DATA frame a 9-byte header
//!   followed by slices of the child's own pending frames (the shared event bytes). The
//!   plan is walked by `fill` (or gathered for TLS) like any connection's frames, so all
//!   frames pending on a connection, across its streams, leave in one write and nothing
//!   is copied per stream.
//!
//! Flow control is the slow-consumer rule: a stream whose window is shut keeps its events
//! in the topic log like a full socket, and past `--write-timeout` or `--max-backlog` it
//! gets RST_STREAM and resumes with `Last-Event-ID`; a connection window shut that long is
//! the connection being slow. Abuse (rapid resets, control-frame floods, CONTINUATION
//! floods, HPACK bombs, provoked resets) fills a leaky bucket per connection; a full bucket
//! ends the connection with GOAWAY ENHANCE_YOUR_CALM. Every protocol error is counted.

use bytes::Bytes;

use super::{flag, ConnId, Core, Phase, ReadOutcome, Subs};
use crate::http::h2::{self as wire, flags as fl, kind, setting, Code, Fields, Head};
use crate::http::request::HttpError;

/// Most bytes of stream data in one plan (one write).
const PLAN_BYTES: usize = 256 << 10;
/// Most segments in one plan.
const PLAN_SEGS: usize = 1024;
/// A written plan keeps its buffer for the next write up to this many segments.
const PLAN_KEEP: usize = 16;
/// Control frames (ACKs, resets, window updates) queued while the client does not read.
const CTRL_MAX: usize = 64 << 10;
/// A header block (HEADERS + CONTINUATION) is at most this many frames.
const CONTINUATION_FRAMES: u32 = 32;
/// The abuse bucket: points it holds before GOAWAY, and points it leaks per tick
/// (1 per 10 ms: 100 per second).
const ABUSE_MAX: u32 = 400;
/// WINDOW_UPDATEs a client may send before any DATA; each DATA frame herald sends allows
/// two more (one for the stream, one for the connection), up to a bound. Past its credit
/// a WINDOW_UPDATE counts toward the abuse bucket.
const WU_CREDIT_START: u32 = 64;
const WU_CREDIT_MAX: u32 = 4096;
/// The connection window is topped up once this much of it has been used.
const RECV_WINDOW_REFILL: i64 = 32 << 10;

/// Per-stream state bits.
mod st {
    /// Our response HEADERS frame is out (or in the plan).
    pub const HEAD_SENT: u8 = 1;
    /// Our END_STREAM is queued.
    pub const END_SENT: u8 = 2;
    /// The client's END_STREAM arrived (half-closed remote).
    pub const REMOTE_END: u8 = 4;
    /// RST_STREAM was sent or received: nothing more is said on this stream.
    pub const RESET: u8 = 8;
    /// The response ended cleanly: close with END_STREAM, not RST_STREAM.
    pub const CLEAN: u8 = 16;
    /// Waiting in the connection's `blocked` list for window.
    pub const BLOCKED: u8 = 32;
    /// Request DATA is not wanted (the response went out early): dropped, windows kept.
    pub const DISCARD: u8 = 64;
    /// Closed, waiting for `take_closing`: frames for it are those of a closed stream,
    /// and it no longer counts against the concurrency limit.
    pub const GONE: u8 = 128;
}

/// What kind of abuse filled the bucket (each counted).
#[derive(Debug, Clone, Copy)]
enum Flood {
    Reset,
    Control,
    MadeYouReset,
}

/// One segment of a connection's write plan.
enum Seg {
    /// A DATA frame header.
    Hdr([u8; 9]),
    /// Whole frames: control frames, a HEADERS frame.
    Frames(Bytes),
    /// The next `len` bytes of a stream's pending frames.
    Data { child: ConnId, len: u32 },
}

impl Seg {
    fn len(&self) -> usize {
        match self {
            Seg::Hdr(h) => h.len(),
            Seg::Frames(b) => b.len(),
            Seg::Data { len, .. } => *len as usize,
        }
    }
}

/// A header block being received over CONTINUATION frames.
struct Partial {
    sid: u32,
    end_stream: bool,
    block: Vec<u8>,
    frames: u32,
}

/// How a stream's request body arrives.
enum Body {
    /// None expected, or all of it is in.
    Done,
    /// `Content-Length` was declared: the head went to the parser, DATA follows it.
    Declared { left: usize },
    /// No length: buffered (up to `--max-event`) until END_STREAM, then the head with the
    /// length and the body go to the parser together.
    Buffered { fields: Box<Fields>, body: Vec<u8> },
}

pub(super) struct H2Conn {
    decoder: loona_hpack::Decoder<'static>,
    /// Bytes read and not yet a whole frame; freed when empty.
    inbuf: Vec<u8>,
    preface_done: bool,
    got_settings: bool,
    peer_max_frame: u32,
    peer_initial_window: i64,
    send_window: i64,
    recv_window: i64,
    /// Open streams: (stream id, child).
    streams: Vec<(u32, ConnId)>,
    /// Closed children whose frames are still in the plan (released once written).
    zombies: Vec<ConnId>,
    last_sid: u32,
    /// The last streams that closed (HEADERS on one is STREAM_CLOSED; on an id never
    /// opened, PROTOCOL_ERROR).
    recent: [u32; 8],
    /// Control frames queued for the next plan.
    ctrl: Vec<u8>,
    plan: Vec<Seg>,
    plan_idx: usize,
    plan_off: usize,
    /// Streams with frames to write, in the order they became ready.
    ready: Vec<ConnId>,
    /// Streams waiting for window.
    blocked: Vec<ConnId>,
    partial: Option<Box<Partial>>,
    goaway_sent: bool,
    peer_goaway: bool,
    /// A connection error was sent: streams are gone, the connection closes once flushed.
    dead: bool,
    abuse: u32,
    abuse_tick: u64,
    /// WINDOW_UPDATEs still expected (see `WU_CREDIT_START`).
    wu_credit: u32,
    /// Tick since which the connection has had no stream.
    idle_since: u64,
    /// Request body bytes buffered across streams.
    body_bytes: usize,
}

pub(super) struct H2Stream {
    sid: u32,
    parent: ConnId,
    send_window: i32,
    recv_window: i32,
    st: u8,
    /// The RST_STREAM code if this stream is reset by us.
    rst: Option<Code>,
    /// DATA segments of this stream in its connection's plan.
    in_plan: u16,
    /// What a stream holds only for a while (an idle stream has none of it).
    extra: Option<Box<Extra>>,
}

#[derive(Default)]
struct Extra {
    /// Our HEADERS block, until it goes into a plan (shared by every stream whose response
    /// head is the same: see `Core::h2_head`).
    head: Option<Bytes>,
    body: Option<Box<Body>>,
    /// Body bytes of this stream counted in the connection's `body_bytes`.
    body_held: u32,
}

impl H2Stream {
    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Free `extra` once it holds nothing.
    fn tidy(&mut self) {
        if self
            .extra
            .as_ref()
            .is_some_and(|e| e.head.is_none() && e.body.is_none() && e.body_held == 0)
        {
            self.extra = None;
        }
    }

    fn body_mut(&mut self) -> Option<&mut Body> {
        self.extra.as_mut()?.body.as_deref_mut()
    }

    fn take_body(&mut self) -> Option<Body> {
        let b = self.extra.as_mut()?.body.take();
        self.tidy();
        b.map(|b| *b)
    }

    fn take_head(&mut self) -> Option<Bytes> {
        let h = self.extra.as_mut()?.head.take();
        self.tidy();
        h
    }

    fn has_head(&self) -> bool {
        self.extra.as_ref().is_some_and(|e| e.head.is_some())
    }
}

pub(super) enum H2Side {
    Conn(Box<H2Conn>),
    /// Its record's key in `Core::h2_streams`.
    Stream(u32),
}

impl<H: Default> Core<H> {
    fn h2c(&self, p: ConnId) -> Option<&H2Conn> {
        match self.h2.get(p as usize)?.as_ref()? {
            H2Side::Conn(h) => Some(h),
            H2Side::Stream(_) => None,
        }
    }

    fn h2c_mut(&mut self, p: ConnId) -> Option<&mut H2Conn> {
        match self.h2.get_mut(p as usize)?.as_mut()? {
            H2Side::Conn(h) => Some(h),
            H2Side::Stream(_) => None,
        }
    }

    fn h2s(&self, c: ConnId) -> Option<&H2Stream> {
        match self.h2.get(c as usize)?.as_ref()? {
            H2Side::Stream(k) => self.h2_streams.get(*k as usize),
            H2Side::Conn(_) => None,
        }
    }

    fn h2s_mut(&mut self, c: ConnId) -> Option<&mut H2Stream> {
        match self.h2.get(c as usize)?.as_ref()? {
            H2Side::Stream(k) => self.h2_streams.get_mut(*k as usize),
            H2Side::Conn(_) => None,
        }
    }

    fn set_side(&mut self, c: ConnId, side: Option<H2Side>) {
        let i = c as usize;
        if self.h2.len() <= i {
            self.h2.resize_with(i + 1, || None);
        }
        if let Some(H2Side::Stream(k)) = std::mem::replace(&mut self.h2[i], side) {
            self.h2_streams.try_remove(k as usize);
        }
    }

    /// Make `c` the h2 stream `s`.
    fn set_stream(&mut self, c: ConnId, s: H2Stream) {
        let k = self.h2_streams.insert(s) as u32;
        self.set_side(c, Some(H2Side::Stream(k)));
    }

    /// Whether `c` (a connection or one of its h2 streams) is carried over TLS.
    pub(super) fn is_tls(&self, c: ConnId) -> bool {
        match self.conns.get(c as usize) {
            Some(cn) if cn.has(flag::H2S) => self
                .h2s(c)
                .and_then(|s| self.conns.get(s.parent as usize))
                .is_some_and(|p| p.has(flag::TLS)),
            Some(cn) => cn.has(flag::TLS),
            None => false,
        }
    }

    // ---- entry --------------------------------------------------------------------

    /// Plaintext in the head phase that is (or may become) the h2 preface: switch to h2.
    /// Returns None when `data` is HTTP/1.x.
    pub(super) fn h2_detect(&mut self, c: ConnId, data: &[u8]) -> Option<ReadOutcome> {
        let conn = self.conns.get_mut(c as usize)?;
        if conn.has(flag::H2S | flag::H2) || conn.phase != Phase::Head {
            return None;
        }
        let buffered = conn.rbuf.as_ref().map_or(&[][..], |rb| &rb.buf[..]);
        let first = buffered.first().or(data.first())?;
        if *first != b'P' {
            return None;
        }
        let mut all = buffered.to_vec();
        all.extend_from_slice(data);
        let n = all.len().min(wire::PREFACE.len());
        if all[..n] != wire::PREFACE[..n] {
            return None;
        }
        if n < wire::PREFACE.len() {
            conn.rbuf.get_or_insert_with(Box::default).buf = all;
            return Some(ReadOutcome::Continue);
        }
        conn.rbuf = None;
        self.h2_start(c);
        Some(self.h2_read(c, &all))
    }

    /// Connection `p` speaks h2 from now on (ALPN, or the prior-knowledge preface).
    pub(super) fn h2_start(&mut self, p: ConnId) {
        let cfg = &self.shared.config;
        let mut ctrl = Vec::with_capacity(64);
        wire::settings(
            &mut ctrl,
            &[
                (setting::MAX_CONCURRENT_STREAMS, cfg.h2_max_streams),
                (setting::INITIAL_WINDOW_SIZE, wire::DEFAULT_WINDOW as u32),
                (setting::MAX_HEADER_LIST_SIZE, cfg.max_head as u32),
            ],
        );
        let head_ticks = self.ticks(cfg.head_timeout);
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(wire::HEADER_TABLE_SIZE);
        let h = H2Conn {
            decoder,
            inbuf: Vec::new(),
            preface_done: false,
            got_settings: false,
            peer_max_frame: wire::DEFAULT_MAX_FRAME,
            peer_initial_window: wire::DEFAULT_WINDOW,
            send_window: wire::DEFAULT_WINDOW,
            recv_window: wire::DEFAULT_WINDOW,
            streams: Vec::new(),
            zombies: Vec::new(),
            last_sid: 0,
            recent: [0; 8],
            ctrl,
            plan: Vec::new(),
            plan_idx: 0,
            plan_off: 0,
            ready: Vec::new(),
            blocked: Vec::new(),
            partial: None,
            goaway_sent: false,
            peer_goaway: false,
            dead: false,
            abuse: 0,
            abuse_tick: self.now_tick,
            wu_credit: WU_CREDIT_START,
            idle_since: self.now_tick,
            body_bytes: 0,
        };
        self.set_side(p, Some(H2Side::Conn(Box::new(h))));
        let Some(conn) = self.conns.get_mut(p as usize) else {
            return;
        };
        conn.flags |= flag::H2;
        conn.phase = Phase::H2;
        conn.rbuf = None;
        self.counters.h2_connections += 1;
        self.wheel.insert(p, self.now_tick + head_ticks);
        self.mark_ready(p);
    }

    // ---- frames in ------------------------------------------------------------------

    /// Plaintext arrived on h2 connection `p`.
    pub(super) fn h2_read(&mut self, p: ConnId, data: &[u8]) -> ReadOutcome {
        let Some(h) = self.h2c_mut(p) else {
            return ReadOutcome::Stop;
        };
        if h.dead {
            return ReadOutcome::Stop;
        }
        let mut buf = std::mem::take(&mut h.inbuf);
        buf.extend_from_slice(data);
        let mut pos = 0;
        if !h.preface_done {
            let n = buf.len().min(wire::PREFACE.len());
            if buf[..n] != wire::PREFACE[..n] {
                self.h2_fail(p, Code::Protocol);
                return ReadOutcome::Stop;
            }
            if n < wire::PREFACE.len() {
                h.inbuf = buf;
                return ReadOutcome::Continue;
            }
            h.preface_done = true;
            pos = n;
        }
        while let Some(head) = Head::parse(&buf[pos..]) {
            if head.len > wire::DEFAULT_MAX_FRAME {
                self.h2_fail(p, Code::FrameSize);
                return ReadOutcome::Stop;
            }
            let end = pos + wire::FRAME_HEADER_LEN + head.len as usize;
            if buf.len() < end {
                break;
            }
            let payload = &buf[pos + wire::FRAME_HEADER_LEN..end];
            if let Err(code) = self.h2_frame(p, head, payload) {
                self.h2_fail(p, code);
                return ReadOutcome::Stop;
            }
            pos = end;
            let Some(h) = self.h2c_mut(p) else {
                return ReadOutcome::Stop;
            };
            if h.dead {
                return ReadOutcome::Stop;
            }
            if h.ctrl.len() > CTRL_MAX {
                self.counters.h2_flood_output += 1;
                self.h2_fail(p, Code::EnhanceYourCalm);
                return ReadOutcome::Stop;
            }
        }
        buf.drain(..pos);
        if let Some(h) = self.h2c_mut(p) {
            if !buf.is_empty() {
                h.inbuf = buf;
            }
        }
        ReadOutcome::Continue
    }

    fn h2_frame(&mut self, p: ConnId, f: Head, payload: &[u8]) -> Result<(), Code> {
        let max_block = 2 * self.shared.config.max_head + 4096;
        let h = self.h2c_mut(p).ok_or(Code::Internal)?;
        if !h.got_settings && f.kind != kind::SETTINGS {
            return Err(Code::Protocol);
        }
        if let Some(part) = h.partial.as_deref_mut() {
            if f.kind != kind::CONTINUATION || f.sid != part.sid {
                return Err(Code::Protocol);
            }
            part.frames += 1;
            part.block.extend_from_slice(payload);
            if part.frames > CONTINUATION_FRAMES || part.block.len() > max_block {
                self.counters.h2_flood_continuation += 1;
                return Err(Code::EnhanceYourCalm);
            }
            if payload.is_empty() && !f.has(fl::END_HEADERS) {
                self.h2_abuse(p, Flood::Control)?;
            }
            if f.has(fl::END_HEADERS) {
                let part = self
                    .h2c_mut(p)
                    .and_then(|h| h.partial.take())
                    .ok_or(Code::Internal)?;
                return self.h2_block(p, part.sid, part.end_stream, &part.block);
            }
            return Ok(());
        }
        match f.kind {
            kind::DATA => self.h2_data(p, f, payload),
            kind::HEADERS => self.h2_headers(p, f, payload),
            kind::PRIORITY => {
                if f.sid == 0 {
                    return Err(Code::Protocol);
                }
                if payload.len() != 5 {
                    let child = self.h2_child(p, f.sid);
                    return self.h2_stream_error(p, f.sid, child, Code::FrameSize);
                }
                Ok(())
            }
            kind::RST_STREAM => {
                if payload.len() != 4 {
                    return Err(Code::FrameSize);
                }
                if f.sid == 0 || f.sid > h.last_sid {
                    return Err(Code::Protocol);
                }
                self.counters.h2_resets_received += 1;
                if let Some(child) = self.h2_child(p, f.sid) {
                    if let Some(s) = self.h2s_mut(child) {
                        s.st |= st::RESET;
                    }
                    self.close_for(child, super::auth::EndReason::Client);
                }
                self.h2_abuse(p, Flood::Reset)
            }
            kind::SETTINGS => self.h2_settings(p, f, payload),
            kind::PUSH_PROMISE => Err(Code::Protocol),
            kind::PING => {
                if f.sid != 0 {
                    return Err(Code::Protocol);
                }
                if payload.len() != 8 {
                    return Err(Code::FrameSize);
                }
                if f.has(fl::ACK) {
                    return Ok(());
                }
                wire::frame(&mut h.ctrl, kind::PING, fl::ACK, 0, payload);
                self.mark_ready(p);
                self.h2_abuse(p, Flood::Control)
            }
            kind::GOAWAY => {
                if f.sid != 0 {
                    return Err(Code::Protocol);
                }
                if payload.len() < 8 {
                    return Err(Code::FrameSize);
                }
                h.peer_goaway = true;
                if h.streams.is_empty() {
                    self.h2_close_when_flushed(p);
                }
                Ok(())
            }
            kind::WINDOW_UPDATE => self.h2_window_update(p, f, payload),
            kind::CONTINUATION => Err(Code::Protocol),
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    fn h2_child(&self, p: ConnId, sid: u32) -> Option<ConnId> {
        let h = self.h2c(p)?;
        let c = h.streams.iter().find(|(s, _)| *s == sid).map(|&(_, c)| c)?;
        self.h2s(c)
            .is_some_and(|s| s.st & st::GONE == 0)
            .then_some(c)
    }

    /// `close` of stream `c`: from now on it is a closed stream.
    pub(super) fn h2_gone(&mut self, c: ConnId) {
        if let Some(s) = self.h2s_mut(c) {
            s.st |= st::GONE;
        }
    }

    /// Streams of `p` open and not closing.
    fn h2_live_streams(&self, p: ConnId) -> usize {
        self.h2c(p).map_or(0, |h| {
            h.streams
                .iter()
                .filter(|&&(_, c)| self.h2s(c).is_some_and(|s| s.st & st::GONE == 0))
                .count()
        })
    }

    fn h2_settings(&mut self, p: ConnId, f: Head, payload: &[u8]) -> Result<(), Code> {
        if f.sid != 0 {
            return Err(Code::Protocol);
        }
        if f.has(fl::ACK) {
            return if payload.is_empty() {
                Ok(())
            } else {
                Err(Code::FrameSize)
            };
        }
        if payload.len() % 6 != 0 {
            return Err(Code::FrameSize);
        }
        let h = self.h2c_mut(p).ok_or(Code::Internal)?;
        let repeated = h.got_settings;
        h.got_settings = true;
        let mut delta = 0i64;
        for s in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match id {
                setting::ENABLE_PUSH if v > 1 => return Err(Code::Protocol),
                setting::INITIAL_WINDOW_SIZE => {
                    if v as i64 > wire::MAX_WINDOW {
                        return Err(Code::FlowControl);
                    }
                    delta += v as i64 - h.peer_initial_window;
                    h.peer_initial_window = v as i64;
                }
                setting::MAX_FRAME_SIZE => {
                    if !(wire::DEFAULT_MAX_FRAME..=(1 << 24) - 1).contains(&v) {
                        return Err(Code::Protocol);
                    }
                    h.peer_max_frame = v;
                }
                // Header table size: our encoder never uses the dynamic table.
                _ => {}
            }
        }
        wire::frame(&mut h.ctrl, kind::SETTINGS, fl::ACK, 0, &[]);
        let streams: Vec<ConnId> = h.streams.iter().map(|&(_, c)| c).collect();
        if delta != 0 {
            for c in streams {
                let s = self.h2s_mut(c).ok_or(Code::Internal)?;
                let w = s.send_window as i64 + delta;
                if w > wire::MAX_WINDOW {
                    return Err(Code::FlowControl);
                }
                s.send_window = w as i32;
            }
            if delta > 0 {
                self.h2_unblock_all(p);
            }
        }
        self.mark_ready(p);
        if repeated {
            self.h2_abuse(p, Flood::Control)?;
        }
        Ok(())
    }

    fn h2_window_update(&mut self, p: ConnId, f: Head, payload: &[u8]) -> Result<(), Code> {
        if payload.len() != 4 {
            return Err(Code::FrameSize);
        }
        let inc =
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
        let h = self.h2c_mut(p).ok_or(Code::Internal)?;
        if h.wu_credit == 0 {
            // More window updates than the data sent could explain.
            self.h2_abuse(p, Flood::Control)?;
        }
        let h = self.h2c_mut(p).ok_or(Code::Internal)?;
        h.wu_credit = h.wu_credit.saturating_sub(1);
        if f.sid == 0 {
            if inc == 0 {
                return Err(Code::Protocol);
            }
            h.send_window += inc as i64;
            if h.send_window > wire::MAX_WINDOW {
                return Err(Code::FlowControl);
            }
            self.h2_unblock_all(p);
            return Ok(());
        }
        if f.sid > h.last_sid {
            return Err(Code::Protocol);
        }
        let Some(child) = self.h2_child(p, f.sid) else {
            // A closed stream: the update may have crossed our RST_STREAM.
            return Ok(());
        };
        if inc == 0 {
            return self.h2_stream_error(p, f.sid, Some(child), Code::Protocol);
        }
        let s = self.h2s_mut(child).ok_or(Code::Internal)?;
        let w = s.send_window as i64 + inc as i64;
        if w > wire::MAX_WINDOW {
            return self.h2_stream_error(p, f.sid, Some(child), Code::FlowControl);
        }
        s.send_window = w as i32;
        if s.st & st::BLOCKED != 0 && w > 0 {
            s.st &= !st::BLOCKED;
            if let Some(h) = self.h2c_mut(p) {
                h.blocked.retain(|&b| b != child);
            }
            self.mark_ready(child);
        }
        Ok(())
    }

    /// The connection window (or every stream's) grew: streams waiting for it may write.
    fn h2_unblock_all(&mut self, p: ConnId) {
        let Some(h) = self.h2c_mut(p) else {
            return;
        };
        for c in std::mem::take(&mut h.blocked) {
            if let Some(s) = self.h2s_mut(c) {
                s.st &= !st::BLOCKED;
            }
            self.mark_ready(c);
        }
    }

    fn h2_headers(&mut self, p: ConnId, f: Head, payload: &[u8]) -> Result<(), Code> {
        if f.sid == 0 || f.sid % 2 == 0 {
            return Err(Code::Protocol);
        }
        let frag = wire::unpad(&f, payload).ok_or(Code::Protocol)?;
        let last = self.h2c(p).ok_or(Code::Internal)?.last_sid;
        if f.sid <= last {
            // Trailers on an open stream, or a stream that is closed.
            if self.h2_child(p, f.sid).is_none() {
                let h = self.h2c(p).ok_or(Code::Internal)?;
                let known = h.recent.contains(&f.sid) || h.streams.iter().any(|(s, _)| *s == f.sid);
                return Err(if known {
                    Code::StreamClosed
                } else {
                    Code::Protocol
                });
            }
            if !f.has(fl::END_STREAM) {
                return Err(Code::Protocol);
            }
        }
        let h = self.h2c_mut(p).ok_or(Code::Internal)?;
        h.last_sid = h.last_sid.max(f.sid);
        if !f.has(fl::END_HEADERS) {
            h.partial = Some(Box::new(Partial {
                sid: f.sid,
                end_stream: f.has(fl::END_STREAM),
                block: frag.to_vec(),
                frames: 1,
            }));
            return Ok(());
        }
        self.h2_block(p, f.sid, f.has(fl::END_STREAM), frag)
    }

    /// A whole header block arrived for stream `sid`.
    fn h2_block(
        &mut self,
        p: ConnId,
        sid: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<(), Code> {
        let max_head = self.shared.config.max_head;
        let mut fields = Fields::new(4 * max_head);
        let h = self.h2c_mut(p).ok_or(Code::Internal)?;
        if h.decoder
            .decode_with_cb(block, |n, v| fields.add(&n, &v))
            .is_err()
        {
            return Err(Code::Compression);
        }
        if fields.size > 4 * max_head {
            self.counters.h2_flood_hpack += 1;
            return Err(Code::EnhanceYourCalm);
        }
        if let Some(child) = self.h2_child(p, sid) {
            // Trailers: the body is complete; their fields mean nothing to herald.
            return self.h2_body(p, sid, child, &[], true);
        }
        let max_streams = self.shared.config.h2_max_streams as usize;
        let live = self.h2_live_streams(p);
        let h = self.h2c_mut(p).ok_or(Code::Internal)?;
        if h.goaway_sent || live >= max_streams {
            wire::rst_stream(&mut h.ctrl, sid, Code::RefusedStream);
            self.counters.h2_streams_refused += 1;
            self.counters.h2_resets_sent += 1;
            self.mark_ready(p);
            return self.h2_abuse(p, Flood::Reset);
        }
        let method = fields.method().to_vec();
        let declared = fields.content_length.as_deref().map(wire::content_length);
        if let Some(None) = declared {
            return self.h2_stream_error(p, sid, None, Code::Protocol);
        }
        let declared = declared.flatten();
        let bodiless = matches!(&method[..], b"GET" | b"HEAD" | b"OPTIONS" | b"DELETE");
        let (head, body) = if fields.size > max_head {
            (None, Body::Done)
        } else if end_stream {
            if declared.is_some_and(|n| n > 0) {
                return self.h2_stream_error(p, sid, None, Code::Protocol);
            }
            (Some(fields.to_h1((!bodiless).then_some(0))), Body::Done)
        } else if let Some(n) = declared {
            (Some(fields.to_h1(Some(n))), Body::Declared { left: n })
        } else if bodiless {
            (Some(fields.to_h1(None)), Body::Done)
        } else {
            // Checked now, sent once the body's length is known.
            if let Err(_e) = fields.to_h1(None) {
                return self.h2_stream_error(p, sid, None, Code::Protocol);
            }
            (
                None,
                Body::Buffered {
                    fields: Box::new(fields),
                    body: Vec::new(),
                },
            )
        };
        let head = match head.transpose() {
            Ok(h) => h,
            Err(_) => return self.h2_stream_error(p, sid, None, Code::Protocol),
        };
        let buffered = matches!(body, Body::Buffered { .. });
        let child = self.h2_open_stream(p, sid, end_stream, body);
        match head {
            Some(h1) => {
                if let Some(s) = self.h2s_mut(child) {
                    if bodiless && !end_stream {
                        // DATA on a request that has no body is dropped.
                        s.st |= st::DISCARD;
                    }
                }
                let _ = self.handle_plain(child, &h1);
            }
            None if buffered => {}
            None => self.fail(child, HttpError::HeadersTooLarge),
        }
        Ok(())
    }

    /// A new stream `sid` on `p`: a child connection record in the head phase.
    fn h2_open_stream(&mut self, p: ConnId, sid: u32, end_stream: bool, body: Body) -> ConnId {
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let head_ticks = self.ticks(self.shared.config.head_timeout);
        let now = self.now_tick;
        let inherit = self.conns[p as usize].flags & (flag::PUBLISHER | flag::REJECT);
        let child = self.conns.insert(super::Conn {
            handle: H::default(),
            gen,
            phase: Phase::Head,
            flags: flag::H2S | flag::HTTP10 | inherit,
            off: 0,
            progress: now as u32,
            subs: Subs::None,
            pre: Default::default(),
            rbuf: None,
            replay: None,
        }) as ConnId;
        let window = self
            .h2c(p)
            .map_or(wire::DEFAULT_WINDOW, |h| h.peer_initial_window);
        self.set_stream(
            child,
            H2Stream {
                sid,
                parent: p,
                send_window: window as i32,
                recv_window: wire::DEFAULT_WINDOW as i32,
                st: if end_stream { st::REMOTE_END } else { 0 },
                rst: None,
                in_plan: 0,
                extra: (!matches!(body, Body::Done)).then(|| {
                    Box::new(Extra {
                        body: Some(Box::new(body)),
                        ..Extra::default()
                    })
                }),
            },
        );
        let peer = self.info_peer(p);
        self.info_accepted(child, peer);
        self.wheel.insert(child, now + head_ticks);
        self.counters.h2_streams += 1;
        self.counters.h2_streams_open += 1;
        let reject = inherit & flag::REJECT != 0;
        if let Some(h) = self.h2c_mut(p) {
            h.streams.push((sid, child));
        }
        if reject {
            // Over the connection limit: this stream is answered 503, and no other opens.
            self.h2_goaway(p, Code::NoError);
        }
        child
    }

    fn h2_data(&mut self, p: ConnId, f: Head, payload: &[u8]) -> Result<(), Code> {
        let h = self.h2c_mut(p).ok_or(Code::Internal)?;
        if f.sid == 0 || f.sid > h.last_sid {
            return Err(Code::Protocol);
        }
        let len = payload.len() as i64;
        h.recv_window -= len;
        if h.recv_window < 0 {
            return Err(Code::FlowControl);
        }
        if h.recv_window <= wire::DEFAULT_WINDOW - RECV_WINDOW_REFILL {
            let inc = wire::DEFAULT_WINDOW - h.recv_window;
            wire::window_update(&mut h.ctrl, 0, inc as u32);
            h.recv_window = wire::DEFAULT_WINDOW;
            self.mark_ready(p);
        }
        let data = wire::unpad(&f, payload).ok_or(Code::Protocol)?;
        let end = f.has(fl::END_STREAM);
        if data.is_empty() && !end {
            self.h2_abuse(p, Flood::Control)?;
        }
        let Some(child) = self.h2_child(p, f.sid) else {
            // A stream already closed (perhaps answered before its body was in): ignored.
            return Ok(());
        };
        let s = self.h2s_mut(child).ok_or(Code::Internal)?;
        if s.st & st::REMOTE_END != 0 {
            return self.h2_stream_error(p, f.sid, Some(child), Code::StreamClosed);
        }
        s.recv_window -= len as i32;
        if s.recv_window < 0 {
            return self.h2_stream_error(p, f.sid, Some(child), Code::FlowControl);
        }
        self.h2_body(p, f.sid, child, data, end)?;
        // Give the stream its window back while it is still reading a body.
        let budget = 2 * self.shared.config.max_event.max(1 << 20);
        let over = self.h2c(p).is_some_and(|h| h.body_bytes > budget);
        if let Some(s) = self.h2s_mut(child) {
            if !end && len > 0 && s.st & st::REMOTE_END == 0 && !over {
                s.recv_window += len as i32;
                if let Some(h) = self.h2c_mut(p) {
                    wire::window_update(&mut h.ctrl, f.sid, len as u32);
                }
                self.mark_ready(p);
            }
        }
        Ok(())
    }

    /// Request body bytes (and maybe its end) for stream `child`.
    fn h2_body(
        &mut self,
        p: ConnId,
        sid: u32,
        child: ConnId,
        data: &[u8],
        end: bool,
    ) -> Result<(), Code> {
        let max_body = self.shared.config.max_event;
        let s = self.h2s_mut(child).ok_or(Code::Internal)?;
        if end {
            s.st |= st::REMOTE_END;
        }
        if s.st & st::DISCARD != 0 {
            return Ok(());
        }
        let Some(body) = s.body_mut() else {
            if data.is_empty() {
                return Ok(());
            }
            return self.h2_stream_error(p, sid, Some(child), Code::Protocol);
        };
        match body {
            Body::Done => Ok(()),
            Body::Declared { left } => {
                if data.len() > *left || (end && data.len() < *left) {
                    return self.h2_stream_error(p, sid, Some(child), Code::Protocol);
                }
                *left -= data.len();
                if *left == 0 {
                    s.take_body();
                }
                let wanted = self
                    .conns
                    .get(child as usize)
                    .is_some_and(|cn| matches!(cn.phase, Phase::Head | Phase::Body));
                if wanted && !data.is_empty() {
                    self.h2_hold(p, child, data.len() as i64);
                    let _ = self.handle_plain(child, data);
                    self.h2_hold_done(p, child);
                }
                Ok(())
            }
            Body::Buffered { body: buf, .. } => {
                if buf.len() + data.len() > max_body {
                    s.take_body();
                    s.st |= st::DISCARD;
                    self.h2_hold_done(p, child);
                    self.fail(child, HttpError::PayloadTooLarge);
                    return Ok(());
                }
                buf.extend_from_slice(data);
                let n = data.len() as i64;
                if !end {
                    self.h2_hold(p, child, n);
                    return Ok(());
                }
                let Some(Body::Buffered { fields, body }) =
                    self.h2s_mut(child).and_then(|s| s.take_body())
                else {
                    return Ok(());
                };
                self.h2_hold_done(p, child);
                let Ok(mut h1) = fields.to_h1(Some(body.len())) else {
                    return self.h2_stream_error(p, sid, Some(child), Code::Protocol);
                };
                h1.extend_from_slice(&body);
                let _ = self.handle_plain(child, &h1);
                Ok(())
            }
        }
    }

    /// Count `n` more body bytes held for `child` against its connection's budget.
    fn h2_hold(&mut self, p: ConnId, child: ConnId, n: i64) {
        if let Some(s) = self.h2s_mut(child) {
            let e = s.extra();
            e.body_held = (e.body_held as i64 + n).max(0) as u32;
            s.tidy();
        }
        if let Some(h) = self.h2c_mut(p) {
            h.body_bytes = (h.body_bytes as i64 + n).max(0) as usize;
        }
    }

    /// `child`'s buffered body is handed on (or dropped): uncount it.
    fn h2_hold_done(&mut self, p: ConnId, child: ConnId) {
        let held = self.h2s_mut(child).map_or(0, |s| {
            let held = s
                .extra
                .as_mut()
                .map_or(0, |e| std::mem::take(&mut e.body_held));
            s.tidy();
            held
        });
        if let Some(h) = self.h2c_mut(p) {
            h.body_bytes = h.body_bytes.saturating_sub(held as usize);
        }
    }

    // ---- errors and abuse -------------------------------------------------------------

    /// Reset stream `sid` for a stream error (the peer's fault). A peer that provokes
    /// resets faster than the bucket leaks is cut off (MadeYouReset).
    fn h2_stream_error(
        &mut self,
        p: ConnId,
        sid: u32,
        child: Option<ConnId>,
        code: Code,
    ) -> Result<(), Code> {
        self.counters.h2_stream_errors += 1;
        match child {
            Some(c) => {
                if let Some(s) = self.h2s_mut(c) {
                    s.rst = Some(code);
                }
                self.close_for(c, super::auth::EndReason::Error);
            }
            None => {
                if let Some(h) = self.h2c_mut(p) {
                    wire::rst_stream(&mut h.ctrl, sid, code);
                }
                self.counters.h2_resets_sent += 1;
                self.mark_ready(p);
            }
        }
        self.h2_abuse(p, Flood::MadeYouReset)
    }

    fn h2_abuse(&mut self, p: ConnId, why: Flood) -> Result<(), Code> {
        let now = self.now_tick;
        let Some(h) = self.h2c_mut(p) else {
            return Ok(());
        };
        let leaked = now.saturating_sub(h.abuse_tick).min(u32::MAX as u64) as u32;
        h.abuse = h.abuse.saturating_sub(leaked) + 1;
        h.abuse_tick = now;
        if h.abuse <= ABUSE_MAX {
            return Ok(());
        }
        let n = &mut self.counters;
        match why {
            Flood::Reset => n.h2_flood_reset += 1,
            Flood::Control => n.h2_flood_control += 1,
            Flood::MadeYouReset => n.h2_flood_made_you_reset += 1,
        }
        Err(Code::EnhanceYourCalm)
    }

    /// Queue GOAWAY (once per code; NO_ERROR only once at all).
    pub(super) fn h2_goaway(&mut self, p: ConnId, code: Code) {
        let Some(h) = self.h2c_mut(p) else {
            return;
        };
        if h.goaway_sent && code == Code::NoError {
            return;
        }
        h.goaway_sent = true;
        wire::goaway(&mut h.ctrl, h.last_sid, code);
        let n = &mut self.counters;
        n.h2_goaway_sent += 1;
        match code {
            Code::NoError => n.h2_goaway_shutdown += 1,
            Code::FrameSize => n.h2_goaway_frame_size += 1,
            Code::FlowControl => n.h2_goaway_flow_control += 1,
            Code::Compression => n.h2_goaway_compression += 1,
            Code::EnhanceYourCalm => n.h2_goaway_calm += 1,
            _ => n.h2_goaway_protocol += 1,
        }
        self.mark_ready(p);
    }

    /// A connection error: GOAWAY with `code`, every stream ends, and the connection
    /// closes once the GOAWAY is written.
    pub(super) fn h2_fail(&mut self, p: ConnId, code: Code) {
        tracing::debug!(
            worker = self.id,
            conn = p,
            code = code.as_str(),
            "h2 connection error"
        );
        self.h2_goaway(p, code);
        let Some(h) = self.h2c_mut(p) else {
            return;
        };
        h.dead = true;
        h.inbuf = Vec::new();
        h.partial = None;
        let streams: Vec<ConnId> = h.streams.iter().map(|&(_, c)| c).collect();
        for c in streams {
            self.set_reason(c, super::auth::EndReason::Error);
            self.close(c);
        }
        self.h2_close_when_flushed(p);
    }

    /// Close `p` once what is queued for it is written.
    fn h2_close_when_flushed(&mut self, p: ConnId) {
        let Some(conn) = self.conns.get_mut(p as usize) else {
            return;
        };
        conn.flags |= flag::TLS_CLOSE;
        if conn.has(flag::WRITING) || self.has_pending(p) {
            self.mark_ready(p);
        } else {
            self.close(p);
        }
    }

    // ---- streams ending -----------------------------------------------------------------

    /// A response on stream `c` is done (`after_idle`): it ends with END_STREAM.
    pub(super) fn h2_stream_done(&mut self, c: ConnId) {
        if let Some(s) = self.h2s_mut(c) {
            s.st |= st::CLEAN;
        }
        self.close(c);
    }

    /// Split `closing` into what the backend closes (connections) and what ends here
    /// (streams: RST_STREAM or END_STREAM, then released once none of their frames is in
    /// a write).
    pub(super) fn h2_take_closing(&mut self, out: &mut Vec<ConnId>) {
        let mut i = 0;
        while i < out.len() {
            let c = out[i];
            let Some(conn) = self.conns.get(c as usize) else {
                i += 1;
                continue;
            };
            if conn.has(flag::H2S) {
                out.swap_remove(i);
                self.h2_stream_closed(c);
                continue;
            }
            if conn.has(flag::H2) {
                self.h2_conn_closing(c);
            }
            i += 1;
        }
    }

    fn h2_stream_closed(&mut self, c: ConnId) {
        let Some(s) = self.h2s(c) else {
            return;
        };
        let (sid, p, state, rst, in_plan) = (s.sid, s.parent, s.st, s.rst, s.in_plan);
        let final_ = self
            .conns
            .get(c as usize)
            .is_some_and(|cn| cn.has(flag::FINAL));
        self.h2_hold_done(p, c);
        let now = self.now_tick;
        let parent_open = self
            .conns
            .get(p as usize)
            .is_some_and(|cn| cn.phase != Phase::Closing);
        let mut resets = 0;
        if let Some(h) = self.h2c_mut(p).filter(|h| !h.dead && parent_open) {
            if state & st::RESET == 0 {
                let clean = rst.is_none() && (state & st::CLEAN != 0 || final_);
                if clean {
                    if state & st::END_SENT == 0 {
                        wire::frame(&mut h.ctrl, kind::DATA, fl::END_STREAM, sid, &[]);
                    }
                    if state & st::REMOTE_END == 0 {
                        // Answered before the request was all in: stop the rest of it.
                        wire::rst_stream(&mut h.ctrl, sid, Code::NoError);
                        resets += 1;
                    }
                } else {
                    wire::rst_stream(&mut h.ctrl, sid, rst.unwrap_or(Code::Cancel));
                    resets += 1;
                }
            }
            h.streams.retain(|&(_, x)| x != c);
            h.blocked.retain(|&x| x != c);
            h.recent.rotate_right(1);
            h.recent[0] = sid;
            if in_plan > 0 {
                h.zombies.push(c);
            }
            let idle = h.streams.is_empty();
            if idle {
                h.idle_since = now;
            }
            let done = idle && (h.goaway_sent || h.peer_goaway);
            self.counters.h2_resets_sent += resets;
            self.mark_ready(p);
            if done {
                self.h2_close_when_flushed(p);
            }
        } else if let Some(h) = self.h2c_mut(p) {
            h.streams.retain(|&(_, x)| x != c);
            if in_plan > 0 {
                h.zombies.push(c);
            }
        }
        if let Some(s) = self.h2s_mut(c) {
            s.st |= st::RESET | st::END_SENT;
        }
        if in_plan == 0 {
            self.h2_release_stream(c);
        }
    }

    /// Connection `p` goes to the backend to close: its streams end with it (released
    /// with it, after every write on it is over).
    fn h2_conn_closing(&mut self, p: ConnId) {
        let Some(h) = self.h2c_mut(p) else {
            return;
        };
        h.dead = true;
        let streams: Vec<ConnId> = h.streams.iter().map(|&(_, c)| c).collect();
        for c in streams {
            self.set_reason(c, super::auth::EndReason::Client);
            if let Some(cn) = self.conns.get_mut(c as usize) {
                cn.phase = Phase::Closing;
            }
        }
    }

    /// Forget stream `c`.
    fn h2_release_stream(&mut self, c: ConnId) {
        if !self.conns.contains(c as usize) {
            return;
        }
        if let Some(p) = self.h2s(c).map(|s| s.parent) {
            if let Some(h) = self.h2c_mut(p) {
                h.zombies.retain(|&z| z != c);
                h.streams.retain(|&(_, x)| x != c);
            }
        }
        self.info_released(c);
        self.detach(c);
        self.wheel.remove(c);
        self.set_side(c, None);
        self.conns.remove(c as usize);
        self.counters.h2_streams_open = self.counters.h2_streams_open.saturating_sub(1);
    }

    /// `release` of connection `p`: its streams go with it.
    pub(super) fn h2_release_conn(&mut self, p: ConnId) {
        let Some(h) = self.h2c_mut(p) else {
            return;
        };
        let mut all: Vec<ConnId> = h.streams.iter().map(|&(_, c)| c).collect();
        all.append(&mut h.zombies);
        h.plan.clear();
        for c in all {
            self.set_reason(c, super::auth::EndReason::Client);
            self.h2_release_stream(c);
        }
        self.set_side(p, None);
    }

    // ---- responses ----------------------------------------------------------------------

    /// Stream `c`'s response head (built for HTTP/1.1) becomes its HEADERS frame; the
    /// body, if any, is its first pending frame.
    pub(super) fn h2_response(&mut self, c: ConnId, bytes: Vec<u8>) {
        if self.h2s(c).is_none() {
            return;
        }
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n");
        let cached = match (&self.h2_head, end) {
            (Some(hc), Some(i)) if hc.0[..] == bytes[..i + 4] => Some((hc.1.clone(), i + 4)),
            _ => None,
        };
        let encoded = cached.or_else(|| {
            let (block, at) = wire::response_block(&bytes, wire::DEFAULT_MAX_FRAME)?;
            let block = Bytes::from(block);
            // A burst of new streams on one topic share one block (refcounted).
            self.h2_head = Some(Box::new((bytes[..at].to_vec(), block.clone())));
            Some((block, at))
        });
        let Some((block, body_at)) = encoded else {
            tracing::warn!(
                worker = self.id,
                conn = c,
                "h2: a response head could not be encoded"
            );
            if let Some(s) = self.h2s_mut(c) {
                s.rst = Some(Code::Internal);
            }
            return self.close(c);
        };
        if let Some(s) = self.h2s_mut(c) {
            s.extra().head = Some(block);
            if s.st & st::REMOTE_END == 0 {
                // The rest of a request body answered early is not wanted.
                s.st |= st::DISCARD;
            }
        }
        if let Some(conn) = self.conns.get_mut(c as usize) {
            if body_at < bytes.len() {
                // Its own copy: a slice would keep the whole HTTP/1.1 head alive until the
                // body is written, and a burst of new streams would hold hundreds of them.
                conn.pre
                    .push_back(Bytes::copy_from_slice(&bytes[body_at..]));
            }
        }
    }

    /// Whether stream `c` still has its HEADERS frame to send.
    pub(super) fn h2_head_pending(&self, c: ConnId) -> bool {
        self.h2s(c).is_some_and(H2Stream::has_head)
    }

    // ---- writes -------------------------------------------------------------------------

    /// `begin_write` on a stream: it never writes itself; its connection carries it.
    pub(super) fn h2_stream_ready(&mut self, c: ConnId) -> bool {
        let now = self.now_tick;
        let stall = self.ticks(self.shared.config.write_timeout);
        let Some(s) = self.h2s(c) else {
            return false;
        };
        let (p, blocked) = (s.parent, s.st & st::BLOCKED != 0);
        let alive = self
            .conns
            .get(p as usize)
            .is_some_and(|cn| cn.phase != Phase::Closing)
            && self.h2c(p).is_some_and(|h| !h.dead);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return false;
        };
        if !alive || conn.phase == Phase::Closing || conn.has(flag::WRITING) {
            conn.flags &= !flag::READY;
            return false;
        }
        if !blocked {
            // As for a socket write: the stall clock starts when the stream has something
            // to send, not at its last write an hour ago.
            conn.progress = now as u32;
        }
        let stream = conn.phase == Phase::Stream
            || (conn.phase == Phase::Drain && conn.has(flag::DRAIN_DUE));
        if stream && self.wheel.deadline(c).is_none_or(|d| d > now + stall) {
            self.wheel.insert(c, now + stall);
        }
        if let Some(h) = self.h2c_mut(p) {
            h.ready.push(c);
        }
        self.mark_ready(p);
        false
    }

    /// Bytes pending for stream `c`, counted up to `cap`.
    fn pending_upto(&self, c: ConnId, cap: usize) -> usize {
        let mut total = 0usize;
        self.walk_pending(c, |s| {
            total += s.len();
            total < cap
        });
        total.min(cap)
    }

    /// Before a write on connection `p`: once the last plan is all written, make the next
    /// from the queued control frames and the ready streams, within the windows.
    pub(super) fn h2_build(&mut self, p: ConnId) {
        let Some(h) = self.h2c_mut(p) else {
            return;
        };
        if h.plan_idx < h.plan.len() {
            return;
        }
        h.plan.clear();
        h.plan_idx = 0;
        h.plan_off = 0;
        if !h.ctrl.is_empty() {
            let ctrl = std::mem::take(&mut h.ctrl);
            h.plan.push(Seg::Frames(Bytes::from(ctrl)));
        }
        if h.dead {
            h.ready.clear();
            return;
        }
        let ready = std::mem::take(&mut h.ready);
        let max_frame = h.peer_max_frame as usize;
        let mut budget = PLAN_BYTES;
        let mut idle = Vec::new();
        let mut requeue = Vec::new();
        for c in ready {
            let Some(conn) = self.conns.get_mut(c as usize) else {
                continue;
            };
            if !conn.has(flag::H2S) || conn.phase == Phase::Closing || conn.has(flag::WRITING) {
                conn.flags &= !flag::READY;
                continue;
            }
            let segs = self.h2c(p).map_or(0, |h| h.plan.len());
            if budget == 0 || segs + 2 > PLAN_SEGS {
                requeue.push(c);
                continue;
            }
            self.conns[c as usize].flags &= !flag::READY;
            self.feed_replay(c);
            let Some(s) = self.h2s_mut(c) else {
                continue;
            };
            let sid = s.sid;
            let head = s.take_head();
            if head.is_some() {
                s.st |= st::HEAD_SENT;
            }
            let head_sent = s.st & st::HEAD_SENT != 0;
            let stream_window = s.send_window.max(0) as usize;
            if let Some(block) = head {
                if let Some(h) = self.h2c_mut(p) {
                    let hdr = wire::head(block.len(), kind::HEADERS, fl::END_HEADERS, sid);
                    h.plan.push(Seg::Hdr(hdr));
                    h.plan.push(Seg::Frames(block));
                }
            }
            if !head_sent {
                idle.push(c);
                continue;
            }
            let conn_window = self.h2c(p).map_or(0, |h| h.send_window.max(0) as usize);
            let avail = stream_window.min(conn_window).min(budget);
            let total = self.pending_upto(c, avail.saturating_add(1));
            let n = total.min(avail);
            let more = total > n;
            let mut frames = 0u16;
            if n > 0 {
                let h = self.h2c_mut(p).expect("checked above");
                let mut left = n;
                while left > 0 && h.plan.len() + 2 <= PLAN_SEGS {
                    let k = left.min(max_frame);
                    h.plan.push(Seg::Hdr(wire::head(k, kind::DATA, 0, sid)));
                    h.plan.push(Seg::Data {
                        child: c,
                        len: k as u32,
                    });
                    left -= k;
                    frames += 1;
                }
                let sent = n - left;
                h.wu_credit = (h.wu_credit + 2 * frames as u32).min(WU_CREDIT_MAX);
                h.send_window -= sent as i64;
                budget -= sent;
                let s = self.h2s_mut(c).expect("checked above");
                s.send_window -= sent as i32;
                s.in_plan += frames;
                self.conns[c as usize].flags |= flag::WRITING;
            }
            if frames == 0 && more {
                if avail == 0 && budget > 0 {
                    // Out of window: waits for a WINDOW_UPDATE (or its stall timer).
                    let s = self.h2s_mut(c).expect("checked above");
                    if s.st & st::BLOCKED == 0 {
                        s.st |= st::BLOCKED;
                        if let Some(h) = self.h2c_mut(p) {
                            h.blocked.push(c);
                        }
                    }
                } else {
                    requeue.push(c);
                }
            } else if frames == 0 && !self.has_plain_pending(c) {
                idle.push(c);
            }
        }
        if let Some(h) = self.h2c_mut(p) {
            for &c in &requeue {
                h.ready.push(c);
            }
        }
        for c in requeue {
            if let Some(conn) = self.conns.get_mut(c as usize) {
                conn.flags |= flag::READY;
            }
        }
        for c in idle {
            self.after_idle(c);
        }
    }

    /// Whether connection `p` has frames to write.
    pub(super) fn h2_plain_pending(&self, p: ConnId) -> bool {
        self.h2c(p).is_some_and(|h| {
            h.plan_idx < h.plan.len() || !h.ctrl.is_empty() || (!h.dead && !h.ready.is_empty())
        })
    }

    /// Walk connection `p`'s plan in write order (see `walk_pending`).
    pub(super) fn h2_walk<'a>(&'a self, p: ConnId, f: &mut dyn FnMut(&'a [u8]) -> bool) {
        let Some(h) = self.h2c(p) else {
            return;
        };
        let mut off = h.plan_off;
        // Bytes of the same stream already walked in this plan (its DATA segments are
        // consecutive but for the frame headers between them).
        let mut run: Option<(ConnId, usize)> = None;
        for seg in &h.plan[h.plan_idx..] {
            let skip_seg = std::mem::take(&mut off);
            match seg {
                Seg::Hdr(b) => {
                    if !f(&b[skip_seg..]) {
                        return;
                    }
                }
                Seg::Frames(b) => {
                    if !f(&b[skip_seg..]) {
                        return;
                    }
                }
                Seg::Data { child, len } => {
                    let mut skip = match run {
                        Some((rc, n)) if rc == *child => n,
                        _ => 0,
                    };
                    let mut left = *len as usize - skip_seg;
                    let want = left;
                    let mut go = true;
                    self.walk_pending(*child, |s| {
                        if skip >= s.len() {
                            skip -= s.len();
                            return true;
                        }
                        let s = &s[skip..];
                        skip = 0;
                        let k = s.len().min(left);
                        left -= k;
                        go = f(&s[..k]);
                        go && left > 0
                    });
                    if !go {
                        return;
                    }
                    let before = match run {
                        Some((rc, n)) if rc == *child => n,
                        _ => 0,
                    };
                    run = Some((*child, before + want));
                }
            }
        }
    }

    /// `n` bytes of connection `p`'s plan are written: move the plan, and each stream in it
    /// past what of its frames went out.
    pub(super) fn h2_consume(&mut self, p: ConnId, n: usize) {
        let now = self.now_tick as u32;
        if let Some(conn) = self.conns.get_mut(p as usize) {
            conn.progress = now;
        }
        let mut left = n;
        let mut finished = Vec::new();
        while left > 0 {
            let Some(h) = self.h2c_mut(p) else {
                break;
            };
            let Some(seg) = h.plan.get(h.plan_idx) else {
                break;
            };
            let seg_len = seg.len();
            let k = (seg_len - h.plan_off).min(left);
            let data_child = match seg {
                Seg::Data { child, .. } => Some(*child),
                _ => None,
            };
            h.plan_off += k;
            left -= k;
            let done = h.plan_off == seg_len;
            if done {
                h.plan_idx += 1;
                h.plan_off = 0;
            }
            if let Some(c) = data_child {
                if k > 0 {
                    self.consume(c, k);
                    if !self.info.is_empty() {
                        self.info_written(c, k);
                    }
                }
                if done {
                    if let Some(s) = self.h2s_mut(c) {
                        s.in_plan = s.in_plan.saturating_sub(1);
                        if s.in_plan == 0 {
                            finished.push(c);
                        }
                    }
                }
            }
        }
        if let Some(h) = self.h2c_mut(p) {
            if h.plan_idx >= h.plan.len() {
                // A connection that went quiet keeps no plan: a burst's plan (tens of bytes
                // per stream) would otherwise stay with it for good.
                if h.plan.capacity() > PLAN_KEEP {
                    h.plan = Vec::new();
                } else {
                    h.plan.clear();
                }
                if h.blocked.is_empty() && h.blocked.capacity() > 0 {
                    h.blocked = Vec::new();
                }
                h.plan_idx = 0;
                h.plan_off = 0;
            }
        }
        for c in finished {
            let closing = match self.conns.get_mut(c as usize) {
                Some(cn) => {
                    cn.flags &= !flag::WRITING;
                    cn.phase == Phase::Closing
                }
                None => continue,
            };
            let zombie = self.h2c(p).is_some_and(|h| h.zombies.contains(&c));
            if zombie {
                self.h2_release_stream(c);
            } else if !closing {
                self.after_write(c);
            }
        }
    }

    // ---- timers -------------------------------------------------------------------------

    /// The timer of connection `p`: a write that is not getting out, or no stream for a
    /// head timeout.
    pub(super) fn h2_conn_timer(&mut self, p: ConnId, stalled: bool) {
        let now = self.now_tick;
        let head_ticks = self.ticks(self.shared.config.head_timeout);
        let stall = self.ticks(self.shared.config.write_timeout);
        if stalled {
            self.counters.slow_consumer_disconnects += 1;
            return self.close_for(p, super::auth::EndReason::Stall);
        }
        let Some(h) = self.h2c(p) else {
            return;
        };
        if h.streams.is_empty() && now.saturating_sub(h.idle_since) >= head_ticks {
            if h.goaway_sent {
                return self.close(p);
            }
            self.h2_goaway(p, Code::NoError);
            self.h2_close_when_flushed(p);
            self.wheel.insert(p, now + stall);
            return;
        }
        let next = if h.streams.is_empty() {
            h.idle_since + head_ticks
        } else {
            now + stall.min(head_ticks)
        };
        self.wheel.insert(p, next.max(now + 1));
    }

    /// Stream `c`'s write is stalled: its window stayed shut (a slow stream: reset), or
    /// its connection's did (a slow connection: GOAWAY).
    pub(super) fn h2_stream_stalled(&mut self, c: ConnId) {
        self.counters.slow_consumer_disconnects += 1;
        self.counters.h2_slow_streams += 1;
        let p = self.h2s(c).map(|s| s.parent);
        let conn_shut = p
            .and_then(|p| self.h2c(p))
            .is_some_and(|h| h.send_window <= 0);
        self.close_for(c, super::auth::EndReason::Stall);
        if let (Some(p), true) = (p, conn_shut) {
            self.h2_fail(p, Code::EnhanceYourCalm);
        }
    }

    /// The drain reached connection `p`: GOAWAY now; it closes when its streams are done.
    pub(super) fn h2_drain(&mut self, p: ConnId) {
        self.h2_goaway(p, Code::NoError);
        if self.h2c(p).is_some_and(|h| h.streams.is_empty()) {
            self.h2_close_when_flushed(p);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_idle_stream_record_stays_small() {
        // With the child's connection record, the side-table slot and its entry in the
        // connection's stream list, this is what an idle h2 stream adds over an HTTP/1.1
        // subscriber (the bench measures the whole of it).
        assert!(std::mem::size_of::<super::H2Stream>() <= 72);
        assert!(std::mem::size_of::<Option<super::H2Side>>() <= 16);
    }
}
