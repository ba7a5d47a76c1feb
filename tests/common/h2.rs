//! A small blocking HTTP/2 client for the tests, written from RFC 9113 (not from herald's
//! code): raw frames in and out, HPACK requests as literals, responses decoded with an
//! independent decoder, and per-stream SSE parsing. It can also send any malformed frame.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{Event, SseParser, WAIT};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const PRIORITY: u8 = 2;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PUSH_PROMISE: u8 = 5;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 1;
pub const ACK: u8 = 1;
pub const END_HEADERS: u8 = 4;

pub const NO_ERROR: u32 = 0;
pub const PROTOCOL_ERROR: u32 = 1;
pub const FLOW_CONTROL_ERROR: u32 = 3;
pub const STREAM_CLOSED: u32 = 5;
pub const FRAME_SIZE_ERROR: u32 = 6;
pub const REFUSED_STREAM: u32 = 7;
pub const CANCEL: u32 = 8;
pub const COMPRESSION_ERROR: u32 = 9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

pub const INITIAL_WINDOW_SIZE: u16 = 4;

#[derive(Default)]
pub struct Stream {
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub parser: SseParser,
    pub events: Vec<Event>,
    pub ended: bool,
    pub reset: Option<u32>,
}

impl Stream {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct H2<S: Read + Write = TcpStream> {
    pub s: S,
    dec: loona_hpack::Decoder<'static>,
    inbuf: Vec<u8>,
    pub next_sid: u32,
    pub streams: BTreeMap<u32, Stream>,
    /// (last stream id, error code) of the GOAWAY received.
    pub goaway: Option<(u32, u32)>,
    pub settings: Vec<(u16, u32)>,
    pub settings_acks: usize,
    pub ping_acks: usize,
    pub closed: bool,
    /// Send WINDOW_UPDATEs for DATA received (off to hold a window shut).
    pub auto_window: bool,
    /// Streams whose window is never given back (a stalled reader).
    pub hold: Vec<u32>,
    pub frames_in: usize,
}

pub fn frame(kind: u8, flags: u8, sid: u32, payload: &[u8]) -> Vec<u8> {
    let l = (payload.len() as u32).to_be_bytes();
    let mut f = vec![l[1], l[2], l[3], kind, flags];
    f.extend_from_slice(&sid.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn settings_payload(list: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in list {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    p
}

fn hpack_int(out: &mut Vec<u8>, first: u8, bits: u8, mut v: usize) {
    let max = (1usize << bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal field without indexing, new name (RFC 7541 §6.2.2).
pub fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// A literal field with incremental indexing (enters the peer's dynamic table).
pub fn literal_indexed(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x40);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// An indexed field (static 1..61, dynamic from 62).
pub fn indexed(out: &mut Vec<u8>, i: usize) {
    hpack_int(out, 0x80, 7, i);
}

/// A request header block.
pub fn request_block(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", method.as_bytes());
    literal(&mut b, ":scheme", b"http");
    literal(&mut b, ":authority", b"localhost");
    literal(&mut b, ":path", path.as_bytes());
    for (n, v) in extra {
        literal(&mut b, n, v.as_bytes());
    }
    b
}

impl H2<TcpStream> {
    /// Prior knowledge over cleartext, with a large window unless `settings` say otherwise.
    pub fn connect(addr: SocketAddr) -> H2 {
        Self::connect_with(addr, &[(INITIAL_WINDOW_SIZE, 1 << 30)], 1 << 30)
    }

    pub fn connect_with(addr: SocketAddr, settings: &[(u16, u32)], conn_window_inc: u32) -> H2 {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        short_timeouts(&s);
        H2::handshake(s, settings, conn_window_inc)
    }
}

impl<S: Read + Write> H2<S> {
    /// Send the preface, our SETTINGS and a connection WINDOW_UPDATE over `s` (whose
    /// reads should time out, e.g. after 50 ms).
    pub fn handshake(s: S, settings: &[(u16, u32)], conn_window_inc: u32) -> H2<S> {
        let mut h = H2::wrap(s);
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &settings_payload(settings)));
        if conn_window_inc > 0 {
            out.extend(frame(WINDOW_UPDATE, 0, 0, &conn_window_inc.to_be_bytes()));
        }
        h.send(&out);
        h
    }

    /// A client over `s` that has sent nothing yet.
    pub fn wrap(s: S) -> H2<S> {
        H2 {
            s,
            dec: loona_hpack::Decoder::new(),
            inbuf: Vec::new(),
            next_sid: 1,
            streams: BTreeMap::new(),
            goaway: None,
            settings: Vec::new(),
            settings_acks: 0,
            ping_acks: 0,
            closed: false,
            auto_window: true,
            hold: Vec::new(),
            frames_in: 0,
        }
    }

    /// Write raw bytes (errors are ignored: the server may have closed on purpose).
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
        let _ = self.s.flush();
    }

    pub fn send_frame(&mut self, kind: u8, flags: u8, sid: u32, payload: &[u8]) {
        self.send(&frame(kind, flags, sid, payload));
    }

    /// Open a stream with a GET (END_STREAM); returns its id.
    pub fn get(&mut self, path: &str, extra: &[(&str, &str)]) -> u32 {
        let sid = self.next_sid;
        self.next_sid += 2;
        let block = request_block("GET", path, extra);
        self.send_frame(HEADERS, END_HEADERS | END_STREAM, sid, &block);
        self.streams.insert(sid, Stream::default());
        sid
    }

    /// A POST with `body` in one DATA frame.
    pub fn post(&mut self, path: &str, body: &[u8], with_length: bool) -> u32 {
        let sid = self.next_sid;
        self.next_sid += 2;
        let len = body.len().to_string();
        let extra: Vec<(&str, &str)> = if with_length {
            vec![("content-length", &len)]
        } else {
            vec![]
        };
        let block = request_block("POST", path, &extra);
        let mut out = frame(HEADERS, END_HEADERS, sid, &block);
        out.extend(frame(DATA, END_STREAM, sid, body));
        self.send(&out);
        self.streams.insert(sid, Stream::default());
        sid
    }

    /// Read and handle what is there (up to one read timeout).
    pub fn poll(&mut self) {
        if self.closed {
            std::thread::sleep(Duration::from_millis(5));
            return;
        }
        let mut buf = [0u8; 65536];
        match self.s.read(&mut buf) {
            Ok(0) => self.closed = true,
            Ok(n) => {
                self.inbuf.extend_from_slice(&buf[..n]);
                self.process();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => self.closed = true,
        }
    }

    fn process(&mut self) {
        loop {
            if self.inbuf.len() < 9 {
                return;
            }
            let len = u32::from_be_bytes([0, self.inbuf[0], self.inbuf[1], self.inbuf[2]]) as usize;
            if self.inbuf.len() < 9 + len {
                return;
            }
            let kind = self.inbuf[3];
            let flags = self.inbuf[4];
            let sid =
                u32::from_be_bytes([self.inbuf[5], self.inbuf[6], self.inbuf[7], self.inbuf[8]])
                    & 0x7fff_ffff;
            let payload: Vec<u8> = self.inbuf[9..9 + len].to_vec();
            self.inbuf.drain(..9 + len);
            self.frames_in += 1;
            self.handle(kind, flags, sid, &payload);
        }
    }

    fn handle(&mut self, kind: u8, flags: u8, sid: u32, p: &[u8]) {
        match kind {
            SETTINGS if flags & ACK != 0 => self.settings_acks += 1,
            SETTINGS => {
                for s in p.chunks_exact(6) {
                    self.settings.push((
                        u16::from_be_bytes([s[0], s[1]]),
                        u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                    ));
                }
                self.send_frame(SETTINGS, ACK, 0, &[]);
            }
            PING if flags & ACK != 0 => self.ping_acks += 1,
            PING => self.send_frame(PING, ACK, 0, p),
            GOAWAY => {
                let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
                let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                self.goaway = Some((last, code));
            }
            RST_STREAM => {
                let code = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                self.streams.entry(sid).or_default().reset = Some(code);
            }
            HEADERS => {
                assert!(flags & END_HEADERS != 0, "herald sends whole header blocks");
                let mut fields = Vec::new();
                self.dec
                    .decode_with_cb(p, |n, v| {
                        fields.push((
                            String::from_utf8_lossy(&n).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        ))
                    })
                    .expect("herald's HPACK decodes");
                let st = self.streams.entry(sid).or_default();
                for (n, v) in fields {
                    if n == ":status" {
                        st.status = v.parse().ok();
                    } else {
                        st.headers.push((n, v));
                    }
                }
                if flags & END_STREAM != 0 {
                    st.ended = true;
                }
            }
            DATA => {
                let st = self.streams.entry(sid).or_default();
                st.body.extend_from_slice(p);
                let mut evs = Vec::new();
                st.parser.feed(p, &mut evs);
                st.events.extend(evs);
                if flags & END_STREAM != 0 {
                    st.ended = true;
                }
                if self.auto_window && !p.is_empty() {
                    let inc = (p.len() as u32).to_be_bytes();
                    let mut out = frame(WINDOW_UPDATE, 0, 0, &inc);
                    if !self.hold.contains(&sid) {
                        out.extend(frame(WINDOW_UPDATE, 0, sid, &inc));
                    }
                    self.send(&out);
                }
            }
            _ => {}
        }
    }

    /// Pump until `cond` holds (panics after the test wait).
    pub fn until(&mut self, what: &str, mut cond: impl FnMut(&H2<S>) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; goaway {:?}, closed {}",
                self.goaway,
                self.closed
            );
            self.poll();
        }
    }

    /// Pump until the server closes the connection; returns its GOAWAY, if any.
    pub fn until_closed(&mut self) -> Option<(u32, u32)> {
        self.until("the connection to close", |h| h.closed);
        self.goaway
    }

    pub fn stream(&self, sid: u32) -> &Stream {
        self.streams.get(&sid).expect("stream known")
    }

    pub fn events(&self, sid: u32) -> usize {
        self.streams.get(&sid).map_or(0, |s| s.events.len())
    }
}

/// Read timeouts for a raw h2 socket.
pub fn short_timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
}
