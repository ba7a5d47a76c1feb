//! The load generator's HTTP/2 client side (RFC 9113), written by hand and sans-IO: what a
//! subscriber connection sends (preface, SETTINGS, a connection WINDOW_UPDATE, one
//! HEADERS frame per stream, ACKs, WINDOW_UPDATEs) and a frame parser for what the server
//! sends back. The child's mio loop owns the sockets (and rustls); this module only turns
//! bytes into per-stream events and queues the bytes to write in `Conn::out`.
//!
//! Client choices, all to keep the server's figures the server's own:
//! - SETTINGS: ENABLE_PUSH 0 and INITIAL_WINDOW_SIZE 2^31-1, and the connection window
//!   raised to 2^31-1 at once, so flow control never holds the server back; received
//!   DATA is returned with one WINDOW_UPDATE per `WINDOW_REFILL` bytes (per stream and
//!   per connection: large increments, never a "tiny window update").
//! - Requests: HPACK without the dynamic table or Huffman (indexed `:method GET` and
//!   `:scheme`, literals without indexing, names from the static table where it has
//!   them); the block is built once per topic, only the stream id differs.
//! - Responses: HEADERS + CONTINUATION gathered and decoded with `loona-hpack` (the
//!   server may use its dynamic table, so every block is decoded to keep it in step);
//!   only `:status` is kept. DATA payloads go to the stream's SSE decoder straight from
//!   the input slice (padding skipped), without copying, in as many pieces as they arrive.
//! - PING → PING ACK, SETTINGS → SETTINGS ACK; RST_STREAM, GOAWAY and END_STREAM end
//!   streams (the child counts them as the HTTP/1.1 path counts closes).
//!
//! Nothing here allocates per DATA frame: the output buffer and the control-frame
//! payload buffer keep their capacity.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::tls::TlsClient;
use super::Target;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
/// Largest frame payload accepted: the default SETTINGS_MAX_FRAME_SIZE, which this client
/// does not change.
pub const MAX_FRAME: usize = 16_384;
/// Largest flow-control window.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
const DEFAULT_WINDOW: u32 = 65_535;
/// DATA bytes received (per stream, per connection) before they are returned in one
/// WINDOW_UPDATE; the windows start at 2^31-1, so this never throttles.
pub const WINDOW_REFILL: u32 = 8 << 20;
/// Largest response header block (HEADERS + CONTINUATION) accepted.
const MAX_BLOCK: usize = 64 << 10;

pub mod kind {
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
}

pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

const SETTINGS_ENABLE_PUSH: u16 = 2;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 4;

/// The short name of an error code (RFC 9113 §7), as failures and GOAWAYs are counted.
pub fn code_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "UNKNOWN_CODE",
    }
}

/// Append one frame.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & MAX_WINDOW).to_be_bytes());
    out.extend_from_slice(payload);
}

pub fn window_update(out: &mut Vec<u8>, stream: u32, inc: u32) {
    frame(
        out,
        kind::WINDOW_UPDATE,
        0,
        stream,
        &(inc & MAX_WINDOW).to_be_bytes(),
    );
}

/// What a connection sends first: the preface, SETTINGS (no push, stream windows
/// 2^31-1) and a WINDOW_UPDATE raising the connection window to 2^31-1.
pub fn client_start(out: &mut Vec<u8>) {
    out.extend_from_slice(PREFACE);
    let mut s = Vec::with_capacity(12);
    for (id, v) in [
        (SETTINGS_ENABLE_PUSH, 0u32),
        (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
    ] {
        s.extend_from_slice(&id.to_be_bytes());
        s.extend_from_slice(&v.to_be_bytes());
    }
    frame(out, kind::SETTINGS, 0, 0, &s);
    window_update(out, 0, MAX_WINDOW - DEFAULT_WINDOW);
}

/// A GET's HEADERS frame on `stream` (END_HEADERS | END_STREAM: no body).
pub fn request(out: &mut Vec<u8>, stream: u32, block: &[u8]) {
    frame(
        out,
        kind::HEADERS,
        flag::END_HEADERS | flag::END_STREAM,
        stream,
        block,
    );
}

/// Stream id of the k-th stream a connection opens (1, 3, 5, …).
pub fn stream_id(k: usize) -> u32 {
    2 * k as u32 + 1
}

/// HPACK integer with an N-bit prefix (RFC 7541 §5.1); `first` holds the pattern bits.
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
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

/// HPACK string literal, no Huffman.
fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// Literal header field without indexing (RFC 7541 §6.2.2), the name by its static-table
/// index when it has one.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    let index = match name {
        ":authority" => 1,
        ":path" => 4,
        "accept" => 19,
        "authorization" => 23,
        "cache-control" => 24,
        "cookie" => 32,
        "user-agent" => 58,
        _ => 0,
    };
    if index > 0 {
        hpack_int(out, 0, 4, index);
    } else {
        out.push(0);
        hpack_str(out, name.as_bytes());
    }
    hpack_str(out, value);
}

/// The HPACK block of a subscribe request: `GET path` with `:scheme`, `:authority`,
/// `accept: text/event-stream`, `cache-control: no-cache` and `extra` (name, value)
/// pairs (names lower-cased here), as the HTTP/1.1 request carries them.
pub fn request_block(
    https: bool,
    authority: &str,
    path: &str,
    extra: &[(String, String)],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + path.len());
    b.push(0x80 | 2); // :method GET
    b.push(0x80 | if https { 7 } else { 6 }); // :scheme https / http
    hpack_literal(&mut b, ":path", path.as_bytes());
    hpack_literal(&mut b, ":authority", authority.as_bytes());
    hpack_literal(&mut b, "accept", b"text/event-stream");
    hpack_literal(&mut b, "cache-control", b"no-cache");
    for (n, v) in extra {
        hpack_literal(&mut b, &n.to_ascii_lowercase(), v.as_bytes());
    }
    b
}

/// What happened on one of the connection's streams (k = its index, 0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A response header block with this `:status` (`end`: END_STREAM on it).
    Status { status: u16, end: bool },
    /// A piece of DATA payload (padding removed).
    Data(&'a [u8]),
    /// END_STREAM on DATA, or a trailer block.
    End,
    /// RST_STREAM with this error code.
    Reset(u32),
}

/// Receiver of stream events, called in wire order.
pub trait Sink {
    fn stream(&mut self, k: usize, ev: Event<'_>);
}

/// A connection-level failure: the connection cannot go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The server answered the preface with an HTTP/1.x response (no h2c there).
    Http1Response,
    /// The server's first frame was not SETTINGS.
    NoSettings,
    /// A frame larger than MAX_FRAME, or a control frame of the wrong length.
    FrameSize,
    /// A frame on a stream this client never opened, PUSH_PROMISE, a broken
    /// CONTINUATION sequence, bad padding.
    Protocol(&'static str),
    /// The response header block did not decode.
    Hpack,
}

impl Error {
    /// Counter name, e.g. `h2_protocol_continuation`.
    pub fn name(&self) -> String {
        match self {
            Error::Http1Response => "h2c_http1_response".into(),
            Error::NoSettings => "h2_first_frame_not_settings".into(),
            Error::FrameSize => "h2_frame_size".into(),
            Error::Protocol(w) => format!("h2_protocol_{w}"),
            Error::Hpack => "h2_hpack".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// Gathering the 9-byte frame header.
    Head,
    /// DATA with PADDED: the pad-length byte.
    PadLen,
    /// DATA payload (`left` bytes to go, the last `pad` of them padding).
    Data,
    /// A non-DATA frame's payload, gathered into `payload`.
    Payload,
}

/// Client state of one h2 connection: frame parser, HPACK decoder, bytes to send,
/// flow-control bookkeeping and what the server said about the connection.
pub struct Conn {
    streams: usize,
    part: Part,
    head: [u8; FRAME_HEADER],
    have: usize,
    first_frame: bool,
    kind: u8,
    flags: u8,
    sid: u32,
    left: usize,
    pad: usize,
    payload: Vec<u8>,
    block: Vec<u8>,
    block_sid: u32,
    block_end: bool,
    in_block: bool,
    hpack: loona_hpack::Decoder<'static>,
    conn_unacked: u32,
    unacked: Vec<u32>,
    /// Bytes to send (the child moves them to the socket or to rustls).
    pub out: Vec<u8>,
    /// The server's SETTINGS arrived.
    pub got_settings: bool,
    /// The last GOAWAY not yet taken by the child: (last stream id, error code).
    pub goaway: Option<(u32, u32)>,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS, if it sent one.
    pub server_max_streams: Option<u32>,
    /// PINGs answered and WINDOW_UPDATEs sent since the child last took them.
    pub pings: u64,
    pub window_updates: u64,
    /// Child-side bookkeeping: streams not yet streaming nor failed; streams streaming;
    /// whether a stream has opened; ALPN checked (TLS); the cause to give the streams
    /// left when the connection ends after a GOAWAY.
    pub pending: usize,
    pub live: usize,
    pub established: bool,
    pub alpn_checked: bool,
    pub end_cause: Option<String>,
}

impl Conn {
    pub fn new(streams: usize) -> Conn {
        let mut hpack = loona_hpack::Decoder::new();
        // The table size this client allows (the default: it sends no HEADER_TABLE_SIZE).
        hpack.set_max_allowed_table_size(4096);
        Conn {
            streams,
            part: Part::Head,
            head: [0; FRAME_HEADER],
            have: 0,
            first_frame: true,
            kind: 0,
            flags: 0,
            sid: 0,
            left: 0,
            pad: 0,
            payload: Vec::new(),
            block: Vec::new(),
            block_sid: 0,
            block_end: false,
            in_block: false,
            hpack,
            conn_unacked: 0,
            unacked: vec![0; streams],
            out: Vec::new(),
            got_settings: false,
            goaway: None,
            server_max_streams: None,
            pings: 0,
            window_updates: 0,
            pending: streams,
            live: 0,
            established: false,
            alpn_checked: false,
            end_cause: None,
        }
    }

    /// The stream index of a frame's stream id, which must be one this client opened.
    fn index(&self, sid: u32) -> Result<usize, Error> {
        if sid == 0 || sid % 2 == 0 {
            return Err(Error::Protocol("stream_id"));
        }
        let k = (sid as usize - 1) / 2;
        if k >= self.streams {
            return Err(Error::Protocol("stream_id"));
        }
        Ok(k)
    }

    /// Decode bytes received; stream events go to `sink` in order.
    pub fn feed<S: Sink>(&mut self, mut input: &[u8], sink: &mut S) -> Result<(), Error> {
        while !input.is_empty() {
            match self.part {
                Part::Head => {
                    let n = (FRAME_HEADER - self.have).min(input.len());
                    self.head[self.have..self.have + n].copy_from_slice(&input[..n]);
                    self.have += n;
                    input = &input[n..];
                    if self.have == FRAME_HEADER {
                        self.have = 0;
                        self.frame_start(sink)?;
                    }
                }
                Part::PadLen => {
                    self.pad = usize::from(input[0]);
                    input = &input[1..];
                    self.left -= 1;
                    if self.pad > self.left {
                        return Err(Error::Protocol("padding"));
                    }
                    self.part = Part::Data;
                    if self.left == 0 {
                        self.data_end(sink)?;
                    }
                }
                Part::Data => {
                    let data = self.left - self.pad;
                    let n = if data > 0 {
                        let n = data.min(input.len());
                        let k = self.index(self.sid)?;
                        sink.stream(k, Event::Data(&input[..n]));
                        n
                    } else {
                        // Padding: `left` = `pad` from here on.
                        let n = self.left.min(input.len());
                        self.pad -= n;
                        n
                    };
                    input = &input[n..];
                    self.left -= n;
                    if self.left == 0 {
                        self.data_end(sink)?;
                    }
                }
                Part::Payload => {
                    let n = self.left.min(input.len());
                    self.payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.left -= n;
                    if self.left == 0 {
                        self.part = Part::Head;
                        self.control(sink)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn frame_start<S: Sink>(&mut self, sink: &mut S) -> Result<(), Error> {
        let h = self.head;
        if self.first_frame {
            if h.starts_with(b"HTTP/1.") {
                return Err(Error::Http1Response);
            }
            if h[3] != kind::SETTINGS {
                return Err(Error::NoSettings);
            }
            self.first_frame = false;
        }
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        self.kind = h[3];
        self.flags = h[4];
        self.sid = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & MAX_WINDOW;
        self.left = len;
        if len > MAX_FRAME {
            return Err(Error::FrameSize);
        }
        if self.in_block && self.kind != kind::CONTINUATION {
            return Err(Error::Protocol("continuation"));
        }
        if self.kind != kind::DATA {
            self.payload.clear();
            self.part = Part::Payload;
            if len == 0 {
                self.part = Part::Head;
                self.control(sink)?;
            }
            return Ok(());
        }
        let k = self.index(self.sid)?;
        // Flow control counts the whole payload, padding included.
        let l = len as u32;
        self.conn_unacked += l;
        if self.conn_unacked >= WINDOW_REFILL {
            window_update(&mut self.out, 0, self.conn_unacked);
            self.conn_unacked = 0;
            self.window_updates += 1;
        }
        self.unacked[k] += l;
        if self.unacked[k] >= WINDOW_REFILL {
            window_update(&mut self.out, self.sid, self.unacked[k]);
            self.unacked[k] = 0;
            self.window_updates += 1;
        }
        self.pad = 0;
        if self.flags & flag::PADDED != 0 {
            if len == 0 {
                return Err(Error::Protocol("padding"));
            }
            self.part = Part::PadLen;
        } else {
            self.part = Part::Data;
            if len == 0 {
                self.data_end(sink)?;
            }
        }
        Ok(())
    }

    fn data_end<S: Sink>(&mut self, sink: &mut S) -> Result<(), Error> {
        self.part = Part::Head;
        if self.flags & flag::END_STREAM != 0 {
            let k = self.index(self.sid)?;
            sink.stream(k, Event::End);
        }
        Ok(())
    }

    /// A complete non-DATA frame is in `payload`.
    fn control<S: Sink>(&mut self, sink: &mut S) -> Result<(), Error> {
        let p = &self.payload;
        match self.kind {
            kind::HEADERS => {
                self.index(self.sid)?;
                let mut frag = &p[..];
                if self.flags & flag::PADDED != 0 {
                    let pad = usize::from(*frag.first().ok_or(Error::Protocol("padding"))?);
                    frag = &frag[1..];
                    if pad > frag.len() {
                        return Err(Error::Protocol("padding"));
                    }
                    frag = &frag[..frag.len() - pad];
                }
                if self.flags & flag::PRIORITY != 0 {
                    frag = frag.get(5..).ok_or(Error::FrameSize)?;
                }
                self.block.clear();
                self.block.extend_from_slice(frag);
                self.block_sid = self.sid;
                self.block_end = self.flags & flag::END_STREAM != 0;
                if self.flags & flag::END_HEADERS != 0 {
                    self.header_block(sink)?;
                } else {
                    self.in_block = true;
                }
            }
            kind::CONTINUATION => {
                if !self.in_block || self.sid != self.block_sid {
                    return Err(Error::Protocol("continuation"));
                }
                self.block.extend_from_slice(p);
                if self.block.len() > MAX_BLOCK {
                    return Err(Error::Protocol("header_block_size"));
                }
                if self.flags & flag::END_HEADERS != 0 {
                    self.in_block = false;
                    self.header_block(sink)?;
                }
            }
            kind::RST_STREAM => {
                if p.len() != 4 {
                    return Err(Error::FrameSize);
                }
                let code = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                let k = self.index(self.sid)?;
                sink.stream(k, Event::Reset(code));
            }
            kind::SETTINGS => {
                if self.sid != 0 {
                    return Err(Error::Protocol("settings_stream"));
                }
                if self.flags & flag::ACK != 0 {
                    if !p.is_empty() {
                        return Err(Error::FrameSize);
                    }
                    return Ok(());
                }
                if p.len() % 6 != 0 {
                    return Err(Error::FrameSize);
                }
                for s in p.chunks_exact(6) {
                    let id = u16::from_be_bytes([s[0], s[1]]);
                    let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                    if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                        self.server_max_streams = Some(v);
                    }
                    // HEADER_TABLE_SIZE bounds our encoder's table: it has none. The
                    // server's window and frame size only matter to a client sending DATA.
                }
                self.got_settings = true;
                frame(&mut self.out, kind::SETTINGS, flag::ACK, 0, &[]);
            }
            kind::PING => {
                if p.len() != 8 {
                    return Err(Error::FrameSize);
                }
                if self.flags & flag::ACK == 0 {
                    let mut data = [0u8; 8];
                    data.copy_from_slice(p);
                    frame(&mut self.out, kind::PING, flag::ACK, 0, &data);
                    self.pings += 1;
                }
            }
            kind::GOAWAY => {
                if p.len() < 8 {
                    return Err(Error::FrameSize);
                }
                let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & MAX_WINDOW;
                let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                self.goaway = Some((last, code));
            }
            kind::PUSH_PROMISE => return Err(Error::Protocol("push_promise")),
            // WINDOW_UPDATE: this client sends no DATA. PRIORITY and unknown kinds: ignored.
            _ => {}
        }
        Ok(())
    }

    /// Decode a complete response header block (always, to keep the HPACK table in step)
    /// and report its `:status`, or the end of the stream for a trailer block.
    fn header_block<S: Sink>(&mut self, sink: &mut S) -> Result<(), Error> {
        let mut status = None;
        self.hpack
            .decode_with_cb(&self.block, |n, v| {
                if &*n == b":status" {
                    status = std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok());
                }
            })
            .map_err(|_| Error::Hpack)?;
        let k = self.index(self.block_sid)?;
        match status {
            Some(status) => sink.stream(
                k,
                Event::Status {
                    status,
                    end: self.block_end,
                },
            ),
            None if self.block_end => sink.stream(k, Event::End),
            None => {}
        }
        Ok(())
    }
}

/// Before a subscriber run: one blocking connection that checks the server speaks h2 —
/// over TLS that it selects ALPN `h2`, then (both) that it answers the preface with
/// SETTINGS. Returns how h2 was reached ("ALPN h2" / "prior knowledge").
pub fn probe(target: &Target, tls: Option<&TlsClient>) -> Result<&'static str> {
    let timeout = Duration::from_secs(10);
    let mut tcp = TcpStream::connect_timeout(&target.addr, timeout)
        .with_context(|| format!("h2 probe: connecting to {}", target.addr))?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let mut start = Vec::new();
    client_start(&mut start);
    let mut h2 = Conn::new(0);
    struct Ignore;
    impl Sink for Ignore {
        fn stream(&mut self, _: usize, _: Event<'_>) {}
    }
    let mut buf = [0u8; 4096];
    let how = match tls {
        Some(client) => {
            let mut tc = client.connect().context("h2 probe: TLS session")?;
            while tc.is_handshaking() {
                if let Err(e) = tc.complete_io(&mut tcp) {
                    let alert = e
                        .get_ref()
                        .and_then(|x| x.downcast_ref::<rustls::Error>())
                        .is_some_and(|x| {
                            matches!(
                                x,
                                rustls::Error::AlertReceived(
                                    rustls::AlertDescription::NoApplicationProtocol
                                )
                            )
                        });
                    if alert {
                        bail!(
                            "{}: the server refused ALPN h2 (no_application_protocol alert); is HTTP/2 enabled on its TLS listener?",
                            target.addr
                        );
                    }
                    return Err(e).context("h2 probe: TLS handshake");
                }
            }
            match tc.alpn_protocol() {
                Some(b"h2") => {}
                other => bail!(
                    "{}: the server did not select ALPN h2 (selected: {}); is HTTP/2 enabled on its TLS listener?",
                    target.addr,
                    other.map_or("none".to_string(), |p| String::from_utf8_lossy(p).into_owned())
                ),
            }
            let mut s = rustls::Stream::new(&mut tc, &mut tcp);
            s.write_all(&start)
                .context("h2 probe: writing the preface")?;
            while !h2.got_settings {
                let n = s.read(&mut buf).context("h2 probe: reading")?;
                if n == 0 {
                    bail!("h2 probe: the server closed the connection after the preface");
                }
                h2.feed(&buf[..n], &mut Ignore)
                    .map_err(|e| anyhow::anyhow!("h2 probe: {}", e.name()))?;
            }
            let _ = s.write_all(&goaway_frame());
            tc.send_close_notify();
            let _ = tc.complete_io(&mut tcp);
            "ALPN h2"
        }
        None => {
            tcp.write_all(&start)
                .context("h2 probe: writing the preface")?;
            while !h2.got_settings {
                let n = match tcp.read(&mut buf) {
                    Ok(0) => bail!(
                        "h2 probe: {} closed the connection after the preface (no h2c prior knowledge there?)",
                        target.addr
                    ),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).context("h2 probe: reading"),
                };
                h2.feed(&buf[..n], &mut Ignore).map_err(|e| match e {
                    Error::Http1Response => anyhow::anyhow!(
                        "h2 probe: {} answered the h2 preface with HTTP/1.x: it does not speak h2c by prior knowledge",
                        target.addr
                    ),
                    e => anyhow::anyhow!("h2 probe: {}", e.name()),
                })?;
            }
            let _ = tcp.write_all(&goaway_frame());
            "prior knowledge"
        }
    };
    Ok(how)
}

/// GOAWAY(last stream 0, NO_ERROR): the client's polite close.
fn goaway_frame() -> Vec<u8> {
    let mut v = Vec::with_capacity(17);
    frame(&mut v, kind::GOAWAY, 0, 0, &[0; 8]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec(Vec<(usize, String)>);

    impl Sink for Rec {
        fn stream(&mut self, k: usize, ev: Event<'_>) {
            let s = match ev {
                Event::Data(d) => format!("data {}", String::from_utf8_lossy(d)),
                other => format!("{other:?}"),
            };
            // Data pieces of one stream in a row are joined: splitting is not an event.
            if let (Some(last), true) = (self.0.last_mut(), s.starts_with("data ")) {
                if last.0 == k && last.1.starts_with("data ") {
                    last.1.push_str(&s[5..]);
                    return;
                }
            }
            self.0.push((k, s));
        }
    }

    fn settings(max_streams: Option<u32>) -> Vec<u8> {
        let mut p = Vec::new();
        if let Some(m) = max_streams {
            p.extend_from_slice(&SETTINGS_MAX_CONCURRENT_STREAMS.to_be_bytes());
            p.extend_from_slice(&m.to_be_bytes());
        }
        let mut v = Vec::new();
        frame(&mut v, kind::SETTINGS, 0, 0, &p);
        v
    }

    /// `:status 200` indexed (0x88), content-type literal with incremental indexing (the
    /// dynamic table is used), then `:status 200` again from the dynamic table's neighbour.
    fn server_stream(v: &mut Vec<u8>) {
        let mut block = vec![0x88, 0x40 | 31];
        hpack_str(&mut block, b"text/event-stream");
        frame(v, kind::HEADERS, flag::END_HEADERS, 1, &block);
        // Stream 3: status 200 and the content-type from the dynamic table (index 62),
        // split over HEADERS + CONTINUATION.
        frame(v, kind::HEADERS, 0, 3, &[0x88]);
        frame(v, kind::CONTINUATION, flag::END_HEADERS, 3, &[0x80 | 62]);
        frame(v, kind::DATA, 0, 1, b": hello\n\ndata: 0 5\n\n");
        // Padded DATA: pad length 3, "data: 1 6\n\n", 3 bytes of padding.
        let mut p = vec![3];
        p.extend_from_slice(b"data: 1 6\n\n");
        p.extend_from_slice(&[0, 0, 0]);
        frame(v, kind::DATA, flag::PADDED, 3, &p);
        frame(v, kind::PING, 0, 0, b"12345678");
        frame(v, kind::DATA, flag::END_STREAM, 1, b"data: 2 7\n\n");
        frame(v, kind::RST_STREAM, 0, 3, &7u32.to_be_bytes());
    }

    fn want() -> Vec<(usize, String)> {
        vec![
            (0, "Status { status: 200, end: false }".into()),
            (1, "Status { status: 200, end: false }".into()),
            (0, "data : hello\n\ndata: 0 5\n\n".into()),
            (1, "data data: 1 6\n\n".into()),
            (0, "data data: 2 7\n\n".into()),
            (0, "End".into()),
            (1, "Reset(7)".into()),
        ]
    }

    #[test]
    fn frames_in_one_piece_and_byte_by_byte() {
        let mut all = settings(Some(100));
        server_stream(&mut all);
        for step in [all.len(), 1, 2, 7] {
            let mut c = Conn::new(2);
            let mut rec = Rec::default();
            for piece in all.chunks(step) {
                c.feed(piece, &mut rec).unwrap();
            }
            assert_eq!(rec.0, want(), "step {step}");
            assert!(c.got_settings);
            assert_eq!(c.server_max_streams, Some(100));
            assert_eq!(c.pings, 1);
            // SETTINGS ACK then PING ACK echoing the payload.
            let mut out = Vec::new();
            frame(&mut out, kind::SETTINGS, flag::ACK, 0, &[]);
            frame(&mut out, kind::PING, flag::ACK, 0, b"12345678");
            assert_eq!(c.out, out);
        }
    }

    #[test]
    fn connection_errors() {
        let mut rec = Rec::default();
        let mut c = Conn::new(1);
        assert_eq!(
            c.feed(b"HTTP/1.1 400 Bad Request\r\n\r\n", &mut rec),
            Err(Error::Http1Response)
        );
        let mut c = Conn::new(1);
        let mut v = Vec::new();
        frame(&mut v, kind::PING, 0, 0, b"12345678");
        assert_eq!(c.feed(&v, &mut rec), Err(Error::NoSettings));
        // DATA on a stream never opened (stream 3 with one stream), on an even stream.
        for sid in [3, 2] {
            let mut c = Conn::new(1);
            let mut v = settings(None);
            frame(&mut v, kind::DATA, 0, sid, b"x");
            assert_eq!(c.feed(&v, &mut rec), Err(Error::Protocol("stream_id")));
        }
        // A frame other than CONTINUATION inside a header block.
        let mut c = Conn::new(1);
        let mut v = settings(None);
        frame(&mut v, kind::HEADERS, 0, 1, &[0x88]);
        frame(&mut v, kind::PING, 0, 0, b"12345678");
        assert_eq!(c.feed(&v, &mut rec), Err(Error::Protocol("continuation")));
        let mut c = Conn::new(1);
        let mut v = settings(None);
        v.extend_from_slice(&[0, 0x40, 1, kind::DATA, 0, 0, 0, 0, 1]);
        assert_eq!(c.feed(&v, &mut rec), Err(Error::FrameSize));
        let mut c = Conn::new(1);
        let mut v = settings(None);
        frame(
            &mut v,
            kind::HEADERS,
            flag::END_HEADERS,
            1,
            &[0xff, 0xff, 0xff],
        );
        assert_eq!(c.feed(&v, &mut rec), Err(Error::Hpack));
    }

    #[test]
    fn goaway_and_status() {
        let mut c = Conn::new(3);
        let mut rec = Rec::default();
        let mut v = settings(None);
        // 503 (index 14 is :status 500; 503 as a literal with the name indexed: 8).
        let mut block = vec![0x08];
        hpack_str(&mut block, b"503");
        frame(
            &mut v,
            kind::HEADERS,
            flag::END_HEADERS | flag::END_STREAM,
            5,
            &block,
        );
        let mut g = 3u32.to_be_bytes().to_vec();
        g.extend_from_slice(&0xbu32.to_be_bytes());
        frame(&mut v, kind::GOAWAY, 0, 0, &g);
        c.feed(&v, &mut rec).unwrap();
        assert_eq!(rec.0, vec![(2, "Status { status: 503, end: true }".into())]);
        assert_eq!(c.goaway, Some((3, 0xb)));
        assert_eq!(code_name(0xb), "ENHANCE_YOUR_CALM");
    }

    #[test]
    fn window_updates_follow_consumption() {
        let mut c = Conn::new(1);
        let mut rec = Rec::default();
        c.feed(&settings(None), &mut rec).unwrap();
        c.out.clear();
        let chunk = vec![b':'; MAX_FRAME];
        let mut v = Vec::new();
        frame(&mut v, kind::HEADERS, flag::END_HEADERS, 1, &[0x88]);
        c.feed(&v, &mut rec).unwrap();
        let frames = WINDOW_REFILL as usize / MAX_FRAME;
        for _ in 0..frames {
            v.clear();
            frame(&mut v, kind::DATA, 0, 1, &chunk);
            c.feed(&v, &mut rec).unwrap();
        }
        let mut want = Vec::new();
        window_update(&mut want, 0, WINDOW_REFILL);
        window_update(&mut want, 1, WINDOW_REFILL);
        assert_eq!(c.out, want);
        assert_eq!(c.window_updates, 2);
    }

    #[test]
    fn request_block_decodes() {
        let extra = vec![
            ("Authorization".to_string(), "Bearer a.b.c".to_string()),
            ("Cookie".to_string(), "herald_token=x".to_string()),
            ("X-Long".to_string(), "v".repeat(300)),
        ];
        let b = request_block(true, "127.0.0.1:8443", "/events/bench-1", &extra);
        let mut d = loona_hpack::Decoder::new();
        let got: Vec<(String, String)> = d
            .decode(&b)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect();
        let want: Vec<(String, String)> = [
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/events/bench-1"),
            (":authority", "127.0.0.1:8443"),
            ("accept", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("authorization", "Bearer a.b.c"),
            ("cookie", "herald_token=x"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .chain([("x-long".to_string(), "v".repeat(300))])
        .collect();
        assert_eq!(got, want);
        let plain = request_block(false, "h", "/e/t", &[]);
        assert_eq!(&plain[..2], &[0x82, 0x86]);
    }

    #[test]
    fn client_start_bytes() {
        let mut v = Vec::new();
        client_start(&mut v);
        assert!(v.starts_with(PREFACE));
        let s = &v[PREFACE.len()..];
        assert_eq!(&s[..9], &[0, 0, 12, kind::SETTINGS, 0, 0, 0, 0, 0]);
        let w = &s[9 + 12..];
        assert_eq!(&w[..9], &[0, 0, 4, kind::WINDOW_UPDATE, 0, 0, 0, 0, 0]);
        assert_eq!(
            u32::from_be_bytes([w[9], w[10], w[11], w[12]]),
            MAX_WINDOW - DEFAULT_WINDOW
        );
        let mut r = Vec::new();
        request(&mut r, stream_id(2), &[0x82]);
        assert_eq!(&r[..9], &[0, 0, 1, kind::HEADERS, 0x5, 0, 0, 0, 5]);
    }
}
