//! HTTP/2 wire pieces for the sans-IO core (RFC 9113): frame headers, the control frames
//! herald sends, HPACK encoding of its responses (static table and literals, no dynamic
//! table, no Huffman), and the mapping between an h2 request's decoded header list and the
//! HTTP/1.1 request head the rest of herald already parses. Decoding HPACK is the
//! `loona-hpack` crate's job; the connection logic lives in `core::h2`.
//!
//! The mapping keeps one request path for both protocols: a validated h2 request is
//! written out as an HTTP/1.1 head (`:authority` as `Host`, cookies joined) and fed to the
//! same parser, router, limits and authorization; a response built for HTTP/1.1 is read
//! back with `httparse` and its status and headers, minus the connection-specific ones,
//! become a HEADERS frame.

use std::fmt::Write as _;

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const FRAME_HEADER_LEN: usize = 9;
/// The frame size every peer accepts, and the largest herald accepts.
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
pub const DEFAULT_WINDOW: i64 = 65_535;
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
/// The HPACK dynamic table size herald advertises (the default; bounds the decoder).
pub const HEADER_TABLE_SIZE: usize = 4096;

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

pub mod flags {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 1;
    pub const ENABLE_PUSH: u16 = 2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 3;
    pub const INITIAL_WINDOW_SIZE: u16 = 4;
    pub const MAX_FRAME_SIZE: u16 = 5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 6;
}

/// Error codes (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    NoError = 0,
    Protocol = 1,
    Internal = 2,
    FlowControl = 3,
    StreamClosed = 5,
    FrameSize = 6,
    RefusedStream = 7,
    Cancel = 8,
    Compression = 9,
    EnhanceYourCalm = 0xb,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::NoError => "no_error",
            Code::Protocol => "protocol_error",
            Code::Internal => "internal_error",
            Code::FlowControl => "flow_control_error",
            Code::StreamClosed => "stream_closed",
            Code::FrameSize => "frame_size_error",
            Code::RefusedStream => "refused_stream",
            Code::Cancel => "cancel",
            Code::Compression => "compression_error",
            Code::EnhanceYourCalm => "enhance_your_calm",
        }
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub sid: u32,
}

impl Head {
    pub fn parse(b: &[u8]) -> Option<Head> {
        let b: &[u8; 9] = b.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        Some(Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            sid: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        })
    }

    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

pub fn head(len: usize, kind: u8, flags: u8, sid: u32) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    let s = sid.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

/// Append a whole frame to `out`.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, sid: u32, payload: &[u8]) {
    out.extend_from_slice(&head(payload.len(), kind, flags, sid));
    out.extend_from_slice(payload);
}

pub fn settings(out: &mut Vec<u8>, list: &[(u16, u32)]) {
    let mut p = Vec::with_capacity(list.len() * 6);
    for (id, v) in list {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(out, kind::SETTINGS, 0, 0, &p);
}

pub fn rst_stream(out: &mut Vec<u8>, sid: u32, code: Code) {
    frame(out, kind::RST_STREAM, 0, sid, &(code as u32).to_be_bytes());
}

pub fn goaway(out: &mut Vec<u8>, last_sid: u32, code: Code) {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&last_sid.to_be_bytes());
    p[4..].copy_from_slice(&(code as u32).to_be_bytes());
    frame(out, kind::GOAWAY, 0, 0, &p);
}

pub fn window_update(out: &mut Vec<u8>, sid: u32, inc: u32) {
    frame(out, kind::WINDOW_UPDATE, 0, sid, &inc.to_be_bytes());
}

/// The payload of a HEADERS or DATA frame without its padding (and, for HEADERS, the
/// priority fields). None if the padding is longer than the frame.
pub fn unpad<'a>(h: &Head, mut p: &'a [u8]) -> Option<&'a [u8]> {
    let mut pad = 0usize;
    if h.has(flags::PADDED) {
        pad = *p.first()? as usize;
        p = &p[1..];
    }
    if h.kind == kind::HEADERS && h.has(flags::PRIORITY) {
        p = p.get(5..)?;
    }
    p.get(..p.len().checked_sub(pad)?)
}

// ---- HPACK encoding (responses) -----------------------------------------------------

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

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// Static-table index of a response header name herald sends (RFC 7541 Appendix A).
fn static_name(name: &str) -> Option<usize> {
    Some(match name {
        "access-control-allow-origin" => 20,
        "allow" => 22,
        "cache-control" => 24,
        "content-length" => 28,
        "content-type" => 31,
        "retry-after" => 53,
        "strict-transport-security" => 56,
        "vary" => 59,
        "www-authenticate" => 61,
        _ => return None,
    })
}

/// Encode `:status` and `headers` (lowercase names) as an HPACK block: indexed where the
/// static table has the whole field, otherwise literals without indexing, so the peer's
/// dynamic table never holds anything of ours.
pub fn encode_block(out: &mut Vec<u8>, status: u16, headers: &[(String, &[u8])]) {
    match status {
        200 => out.push(0x88),
        204 => out.push(0x89),
        206 => out.push(0x8a),
        304 => out.push(0x8b),
        400 => out.push(0x8c),
        404 => out.push(0x8d),
        500 => out.push(0x8e),
        s => {
            // Literal without indexing, name `:status` (index 8).
            out.push(0x08);
            hpack_str(out, s.to_string().as_bytes());
        }
    }
    for (name, value) in headers {
        match static_name(name) {
            Some(i) => hpack_int(out, 0x00, 4, i),
            None => {
                out.push(0x00);
                hpack_str(out, name.as_bytes());
            }
        }
        hpack_str(out, value);
    }
}

/// Headers that mean something only for one HTTP/1.1 connection (RFC 9113 §8.2.2).
fn connection_specific(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
    )
}

/// A response built for HTTP/1.1 as an h2 HEADERS frame on stream `sid` (END_STREAM when
/// `end`), and the offset of its body in `h1`. None if `h1` is not a whole response head.
pub fn response_frame(h1: &[u8], sid: u32, end: bool, max_frame: u32) -> Option<(Vec<u8>, usize)> {
    let (block, body_at) = response_block(h1, max_frame)?;
    let mut f = Vec::with_capacity(FRAME_HEADER_LEN + block.len());
    let fl = flags::END_HEADERS | if end { flags::END_STREAM } else { 0 };
    frame(&mut f, kind::HEADERS, fl, sid, &block);
    Some((f, body_at))
}

/// A response built for HTTP/1.1 as an HPACK block (the payload of its HEADERS frame),
/// and the offset of its body in `h1`. The block depends on nothing but `h1`'s head.
pub fn response_block(h1: &[u8], max_frame: u32) -> Option<(Vec<u8>, usize)> {
    let mut hs = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut hs);
    let httparse::Status::Complete(body_at) = r.parse(h1).ok()? else {
        return None;
    };
    let status = r.code?;
    let headers: Vec<(String, &[u8])> = r
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value))
        .filter(|(n, _)| !connection_specific(n))
        .collect();
    let mut block = Vec::with_capacity(128);
    encode_block(&mut block, status, &headers);
    if block.len() > max_frame as usize {
        // herald's own heads are a few hundred bytes; never split one.
        return None;
    }
    Some((block, body_at))
}

// ---- requests -------------------------------------------------------------------------

/// Why a decoded header list is not a request herald takes (a stream error, PROTOCOL_ERROR).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("pseudo-header after a regular header, repeated, or unknown")]
    Pseudo,
    #[error("missing :method, :path or :scheme")]
    Missing,
    #[error("uppercase or invalid header name")]
    Name,
    #[error("invalid header value")]
    Value,
    #[error("connection-specific header")]
    ConnectionSpecific,
    #[error("CONNECT is not served")]
    Connect,
}

/// A request's fields, collected while its block is decoded.
#[derive(Debug, Default)]
pub struct Fields {
    method: Option<Vec<u8>>,
    path: Option<Vec<u8>>,
    scheme: Option<Vec<u8>>,
    authority: Option<Vec<u8>>,
    regular: Vec<(Vec<u8>, Vec<u8>)>,
    cookies: Vec<Vec<u8>>,
    pub content_length: Option<Vec<u8>>,
    /// Decoded size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (name + value + 32 each).
    pub size: usize,
    /// The first problem found (later fields are still decoded, for the HPACK state).
    error: Option<Malformed>,
    /// Stop keeping fields past this size (an HPACK bomb is measured, never stored).
    keep_limit: usize,
}

impl Fields {
    pub fn new(keep_limit: usize) -> Fields {
        Fields {
            keep_limit,
            ..Fields::default()
        }
    }

    /// One decoded field, in order.
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        self.size += name.len() + value.len() + 32;
        if self.size > self.keep_limit || self.error.is_some() {
            return;
        }
        if value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0)
            || value.first().is_some_and(|b| *b == b' ' || *b == b'\t')
            || value.last().is_some_and(|b| *b == b' ' || *b == b'\t')
        {
            self.error = Some(Malformed::Value);
            return;
        }
        if let Some(p) = name.strip_prefix(b":") {
            if !self.regular.is_empty() || !self.cookies.is_empty() {
                self.error = Some(Malformed::Pseudo);
                return;
            }
            let slot = match p {
                b"method" => &mut self.method,
                b"path" => &mut self.path,
                b"scheme" => &mut self.scheme,
                b"authority" => &mut self.authority,
                _ => {
                    self.error = Some(Malformed::Pseudo);
                    return;
                }
            };
            if slot.is_some() {
                self.error = Some(Malformed::Pseudo);
                return;
            }
            *slot = Some(value.to_vec());
            return;
        }
        if name.is_empty()
            || !name.iter().all(|&b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
            })
        {
            self.error = Some(Malformed::Name);
            return;
        }
        let n = std::str::from_utf8(name).unwrap_or("");
        if connection_specific(n) || (n == "te" && value != b"trailers") {
            self.error = Some(Malformed::ConnectionSpecific);
            return;
        }
        match n {
            "cookie" => self.cookies.push(value.to_vec()),
            "content-length" => self.content_length = Some(value.to_vec()),
            // The request target comes from :authority; a Host beside it is dropped.
            "host" if self.authority.is_some() => {}
            "host" => self.authority = Some(value.to_vec()),
            _ => self.regular.push((name.to_vec(), value.to_vec())),
        }
    }

    pub fn method(&self) -> &[u8] {
        self.method.as_deref().unwrap_or_default()
    }

    /// The request as an HTTP/1.1 head (ending in the empty line) for herald's parser,
    /// with `Content-Length: body_len` when given. The head says `Connection: close`: an
    /// h2 stream carries one request.
    pub fn to_h1(&self, body_len: Option<usize>) -> Result<Vec<u8>, Malformed> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.method.as_deref() == Some(b"CONNECT") {
            return Err(Malformed::Connect);
        }
        let (Some(method), Some(path)) = (&self.method, &self.path) else {
            return Err(Malformed::Missing);
        };
        if self.scheme.is_none() || path.is_empty() {
            return Err(Malformed::Missing);
        }
        let mut h = Vec::with_capacity(256);
        h.extend_from_slice(method);
        h.push(b' ');
        h.extend_from_slice(path);
        h.extend_from_slice(b" HTTP/1.1\r\n");
        if let Some(a) = &self.authority {
            h.extend_from_slice(b"host: ");
            h.extend_from_slice(a);
            h.extend_from_slice(b"\r\n");
        }
        for (n, v) in &self.regular {
            h.extend_from_slice(n);
            h.extend_from_slice(b": ");
            h.extend_from_slice(v);
            h.extend_from_slice(b"\r\n");
        }
        if !self.cookies.is_empty() {
            h.extend_from_slice(b"cookie: ");
            h.extend_from_slice(&self.cookies.join(&b"; "[..]));
            h.extend_from_slice(b"\r\n");
        }
        let mut line = String::new();
        if let Some(n) = body_len {
            let _ = write!(line, "content-length: {n}\r\n");
        }
        line.push_str("connection: close\r\n\r\n");
        h.extend_from_slice(line.as_bytes());
        Ok(h)
    }
}

/// The declared content length, if any and well-formed.
pub fn content_length(v: &[u8]) -> Option<usize> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        loona_hpack::Decoder::new()
            .decode(block)
            .expect("valid HPACK")
    }

    #[test]
    fn frame_headers_round_trip_and_the_reserved_bit_is_ignored() {
        let h = head(16_384, kind::DATA, flags::END_STREAM, 7);
        assert_eq!(
            Head::parse(&h),
            Some(Head {
                len: 16_384,
                kind: kind::DATA,
                flags: 1,
                sid: 7
            })
        );
        let mut r = h;
        r[5] |= 0x80;
        assert_eq!(Head::parse(&r).map(|h| h.sid), Some(7));
        assert_eq!(Head::parse(&h[..8]), None);
    }

    #[test]
    fn a_response_block_decodes_with_an_independent_decoder() {
        let h1 = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\
            Cache-Control: no-cache\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\
            X-Accel-Buffering: no\r\nAccess-Control-Allow-Origin: *\r\n\r\n: herald\n\n";
        let (f, body_at) = response_frame(h1, 3, false, 16_384).expect("a head");
        assert_eq!(&h1[body_at..], b": herald\n\n");
        let h = Head::parse(&f).expect("header");
        assert_eq!(
            (h.kind, h.sid, h.flags),
            (kind::HEADERS, 3, flags::END_HEADERS)
        );
        assert_eq!(h.len as usize, f.len() - 9);
        let fields = decode(&f[9..]);
        let names: Vec<&[u8]> = fields.iter().map(|(n, _)| &n[..]).collect();
        assert_eq!(
            names,
            [
                &b":status"[..],
                b"content-type",
                b"cache-control",
                b"x-accel-buffering",
                b"access-control-allow-origin"
            ]
        );
        assert_eq!(fields[0].1, b"200");
        assert_eq!(fields[1].1, b"text/event-stream; charset=utf-8");
    }

    #[test]
    fn statuses_outside_the_static_table_are_literals() {
        for s in [200u16, 204, 401, 403, 413, 429, 431, 503] {
            let mut b = Vec::new();
            encode_block(&mut b, s, &[("retry-after".into(), b"1")]);
            let f = decode(&b);
            assert_eq!(f[0], (b":status".to_vec(), s.to_string().into_bytes()));
            assert_eq!(f[1], (b"retry-after".to_vec(), b"1".to_vec()));
        }
        // Long values need the multi-byte integer form.
        let long = vec![b'a'; 300];
        let mut b = Vec::new();
        encode_block(&mut b, 200, &[("x-long".into(), &long)]);
        assert_eq!(decode(&b)[1].1, long);
    }

    fn fields(list: &[(&str, &str)]) -> Fields {
        let mut f = Fields::new(1 << 20);
        for (n, v) in list {
            f.add(n.as_bytes(), v.as_bytes());
        }
        f
    }

    #[test]
    fn a_request_becomes_an_http11_head_with_host_and_joined_cookies() {
        let f = fields(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "example.com"),
            (":path", "/events/a?x=1"),
            ("cookie", "a=1"),
            ("last-event-id", "42"),
            ("cookie", "b=2"),
        ]);
        let h1 = String::from_utf8(f.to_h1(None).unwrap()).unwrap();
        assert_eq!(
            h1,
            "GET /events/a?x=1 HTTP/1.1\r\nhost: example.com\r\nlast-event-id: 42\r\n\
             cookie: a=1; b=2\r\nconnection: close\r\n\r\n"
        );
        let f = fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/publish/t"),
        ]);
        assert!(String::from_utf8(f.to_h1(Some(5)).unwrap())
            .unwrap()
            .contains("content-length: 5\r\n"));
    }

    #[test]
    fn malformed_requests_are_refused() {
        let base = [(":method", "GET"), (":scheme", "https"), (":path", "/")];
        let with = |extra: &[(&str, &str)]| {
            let mut l: Vec<(&str, &str)> = base.to_vec();
            l.extend_from_slice(extra);
            fields(&l).to_h1(None)
        };
        assert!(with(&[]).is_ok());
        assert_eq!(with(&[("Upper", "x")]), Err(Malformed::Name));
        assert_eq!(
            with(&[("connection", "close")]),
            Err(Malformed::ConnectionSpecific)
        );
        assert_eq!(with(&[("te", "gzip")]), Err(Malformed::ConnectionSpecific));
        assert!(with(&[("te", "trailers")]).is_ok());
        assert_eq!(with(&[("x", "a\r\nb: c")]), Err(Malformed::Value));
        assert_eq!(with(&[("x", "a\0")]), Err(Malformed::Value));
        assert_eq!(with(&[("x", "1"), (":path", "/b")]), Err(Malformed::Pseudo));
        assert_eq!(with(&[(":method", "GET")]), Err(Malformed::Pseudo));
        assert_eq!(with(&[(":status", "200")]), Err(Malformed::Pseudo));
        assert_eq!(
            fields(&[(":method", "GET"), (":path", "/")]).to_h1(None),
            Err(Malformed::Missing)
        );
        assert_eq!(
            fields(&[(":method", "CONNECT"), (":authority", "a:1")]).to_h1(None),
            Err(Malformed::Connect)
        );
    }

    #[test]
    fn a_header_list_past_the_keep_limit_is_measured_not_kept() {
        let mut f = Fields::new(100);
        for _ in 0..1000 {
            f.add(b"x-big", &[b'a'; 100]);
        }
        assert_eq!(f.size, 1000 * (5 + 100 + 32));
        assert!(f.regular.len() <= 1);
    }

    #[test]
    fn padding_and_priority_are_stripped() {
        let h = Head {
            len: 0,
            kind: kind::HEADERS,
            flags: flags::PADDED | flags::PRIORITY,
            sid: 1,
        };
        let p = [2u8, 0, 0, 0, 0, 16, b'a', b'b', 0, 0];
        assert_eq!(unpad(&h, &p), Some(&b"ab"[..]));
        let bad = [9u8, 0, 0, 0, 0, 16, b'a'];
        assert_eq!(unpad(&h, &bad), None);
    }
}
