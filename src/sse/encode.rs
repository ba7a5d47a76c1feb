//! SSE wire encoding: an event becomes one `Bytes`, allocated once, that already
//! carries its HTTP/1.1 chunk framing (`{hex len}\r\n{sse}\r\n`); HTTP/1.0
//! streams write the inner sub-range. Invariant: data is split on CR, LF and
//! CRLF into `data:` lines, so nothing in it can add a field or end the event.

use bytes::{BufMut, Bytes, BytesMut};

/// A keep-alive comment (`:\n\n`) with its chunk framing.
pub const KEEPALIVE_CHUNKED: &[u8] = b"3\r\n:\n\n\r\n";
/// A keep-alive comment without framing, for HTTP/1.0 streams.
pub const KEEPALIVE_BODY: &[u8] = b":\n\n";
/// The last chunk of a chunked body.
pub const CHUNKED_TERMINATOR: &[u8] = b"0\r\n\r\n";

/// One pre-encoded, chunk-framed piece of an SSE stream, cheap to clone.
///
/// INVARIANT: either `bytes` is empty (an empty chunk, which must never be
/// written since `0\r\n\r\n` would end the body), or it is
/// `{hex len}\r\n{body}\r\n` with the body at `bytes[body_start..len - 2]`.
#[derive(Debug, Clone)]
pub struct Frame {
    pub bytes: Bytes,
    pub body_start: u32,
}

impl Frame {
    /// The whole chunk, framing included (HTTP/1.1).
    pub fn chunked(&self) -> &[u8] {
        &self.bytes
    }

    /// The inner SSE bytes (HTTP/1.0).
    pub fn body(&self) -> &[u8] {
        if self.bytes.is_empty() {
            return &[];
        }
        &self.bytes[self.body_start as usize..self.bytes.len() - 2]
    }

    /// The inner SSE bytes as a `Bytes` sharing this frame's allocation.
    pub fn body_bytes(&self) -> Bytes {
        if self.bytes.is_empty() {
            return Bytes::new();
        }
        self.bytes
            .slice(self.body_start as usize..self.bytes.len() - 2)
    }

    /// Length of the chunk, framing included.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True only for the empty frame `chunk(b"")` returns.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The static keep-alive comment as a frame (no allocation).
pub fn keepalive() -> Frame {
    Frame {
        bytes: Bytes::from_static(KEEPALIVE_CHUNKED),
        body_start: 3,
    }
}

/// Encodes one event: `event:` (if any), `id:`, `retry:` (if any), one `data:`
/// line per line of `data`, then a blank line. `event` and `id` must already be
/// validated (`Publish::validate`); they are written verbatim.
pub fn encode_event(event: Option<&str>, id: &str, retry: Option<u32>, data: &str) -> Frame {
    let mut body_len = 0;
    if let Some(event) = event {
        body_len += b"event: \n".len() + event.len();
    }
    body_len += b"id: \n".len() + id.len();
    if let Some(retry) = retry {
        body_len += b"retry: \n".len() + dec_digits(retry);
    }
    body_len += lines(data)
        .map(|line| b"data: \n".len() + line.len())
        .sum::<usize>();
    body_len += 1;

    build(body_len, |buf| {
        if let Some(event) = event {
            put_field(buf, b"event: ", event.as_bytes());
        }
        put_field(buf, b"id: ", id.as_bytes());
        if let Some(retry) = retry {
            put_retry(buf, retry);
        }
        for line in lines(data) {
            put_field(buf, b"data: ", line.as_bytes());
        }
        buf.put_u8(b'\n');
    })
}

/// Encodes a comment `: text\n\n`; CR and LF in `text` become spaces so the
/// comment cannot end early or smuggle a field.
pub fn encode_comment(text: &str) -> Frame {
    let body_len = b": \n\n".len() + text.len();
    build(body_len, |buf| {
        buf.put_slice(b": ");
        buf.extend(
            text.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        buf.put_slice(b"\n\n");
    })
}

/// Encodes a bare `retry: N\n\n` block (sent while draining at shutdown).
pub fn encode_retry(retry_ms: u32) -> Frame {
    let body_len = b"retry: \n\n".len() + dec_digits(retry_ms);
    build(body_len, |buf| {
        put_retry(buf, retry_ms);
        buf.put_u8(b'\n');
    })
}

/// Frames arbitrary bytes as one chunk. An empty `body` gives an empty frame
/// (writing `0\r\n\r\n` would terminate the stream).
pub fn chunk(body: &[u8]) -> Frame {
    if body.is_empty() {
        return Frame {
            bytes: Bytes::new(),
            body_start: 0,
        };
    }
    build(body.len(), |buf| buf.put_slice(body))
}

/// Allocates `{hex}\r\n` + `body_len` + `\r\n` once and lets `fill` write the
/// body, which must be exactly `body_len` bytes.
fn build(body_len: usize, fill: impl FnOnce(&mut BytesMut)) -> Frame {
    let digits = hex_digits(body_len);
    let total = digits + 2 + body_len + 2;
    let mut buf = BytesMut::with_capacity(total);
    for shift in (0..digits).rev() {
        let nibble = (body_len >> (shift * 4)) & 0xf;
        buf.put_u8(b"0123456789abcdef"[nibble]);
    }
    buf.put_slice(b"\r\n");
    let body_start = buf.len();
    fill(&mut buf);
    debug_assert_eq!(buf.len() - body_start, body_len, "body length mismatch");
    buf.put_slice(b"\r\n");
    debug_assert_eq!(buf.len(), total, "frame reallocated");
    Frame {
        bytes: buf.freeze(),
        // A hex prefix plus CRLF is at most 18 bytes.
        body_start: body_start as u32,
    }
}

fn put_field(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.put_slice(name);
    buf.put_slice(value);
    buf.put_u8(b'\n');
}

fn put_retry(buf: &mut BytesMut, retry: u32) {
    buf.put_slice(b"retry: ");
    let mut digits = [0u8; 10];
    let n = dec_digits(retry);
    let mut v = retry;
    for slot in digits[..n].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    buf.put_slice(&digits[..n]);
    buf.put_u8(b'\n');
}

fn hex_digits(n: usize) -> usize {
    let bits = usize::BITS - n.leading_zeros();
    (bits as usize).div_ceil(4).max(1)
}

fn dec_digits(mut n: u32) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Splits on `\r\n`, `\r` and `\n` (CRLF counts once). Always yields at least
/// one line, and a trailing break yields a final empty line, so the lines
/// joined with `\n` give back the data with normalised breaks.
fn lines(data: &str) -> Lines<'_> {
    Lines { rest: Some(data) }
}

struct Lines<'a> {
    rest: Option<&'a str>,
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest?;
        match rest.bytes().position(|b| b == b'\r' || b == b'\n') {
            None => {
                self.rest = None;
                Some(rest)
            }
            Some(i) => {
                // CR and LF are ASCII, so these are char boundaries.
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                self.rest = Some(&rest[i + skip..]);
                Some(&rest[..i])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Default, PartialEq)]
    struct Parsed {
        event_type: String,
        data: String,
        id: Option<String>,
        retry: Option<String>,
        other_fields: Vec<String>,
    }

    /// The WHATWG EventSource stream rules, minus the browser: returns each
    /// dispatched event with the fields it saw.
    fn parse_stream(body: &[u8]) -> Vec<Parsed> {
        let text = std::str::from_utf8(body).expect("utf-8 body");
        let mut out = Vec::new();
        let mut cur = Parsed::default();
        let mut data = String::new();
        let mut rest = text;
        while !rest.is_empty() {
            let Some(i) = rest.find(['\r', '\n']) else {
                // An unterminated final line is discarded, as in a browser.
                break;
            };
            let line = &rest[..i];
            let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
            rest = &rest[i + skip..];
            if line.is_empty() {
                if !data.is_empty() {
                    if data.ends_with('\n') {
                        data.pop();
                    }
                    cur.data = std::mem::take(&mut data);
                    out.push(std::mem::take(&mut cur));
                } else {
                    cur = Parsed::default();
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (name, value) = match line.find(':') {
                Some(c) => {
                    let v = &line[c + 1..];
                    (&line[..c], v.strip_prefix(' ').unwrap_or(v))
                }
                None => (line, ""),
            };
            match name {
                "event" => cur.event_type = value.to_owned(),
                "data" => {
                    data.push_str(value);
                    data.push('\n');
                }
                "id" => cur.id = Some(value.to_owned()),
                "retry" => cur.retry = Some(value.to_owned()),
                other => cur.other_fields.push(other.to_owned()),
            }
        }
        out
    }

    fn check_framing(frame: &Frame) {
        let bytes = frame.chunked();
        let crlf = bytes.windows(2).position(|w| w == b"\r\n").unwrap();
        let len = usize::from_str_radix(std::str::from_utf8(&bytes[..crlf]).unwrap(), 16).unwrap();
        assert_eq!(frame.body_start as usize, crlf + 2);
        assert_eq!(len, frame.body().len());
        assert!(bytes.ends_with(b"\r\n"));
        assert_eq!(frame.len(), crlf + 2 + len + 2);
        assert_eq!(&frame.body_bytes()[..], frame.body());
    }

    #[test]
    fn exact_wire_bytes() {
        /// (event, id, retry, data, bytes the body must contain)
        type Case<'a> = (Option<&'a str>, &'a str, Option<u32>, &'a str, &'a [u8]);
        let cases: &[Case] = &[
            (None, "1", None, "hi", b"10\r\nid: 1\ndata: hi\n\n\r\n"),
            (Some("goal"), "42", Some(3000), "El Shaarawy", b"id: 42\n"),
            (None, "7", None, "", b"e\r\nid: 7\ndata: \n\n\r\n"),
            (
                None,
                "7",
                None,
                "a\r\nb\rc\nd",
                b"id: 7\ndata: a\ndata: b\ndata: c\ndata: d\n\n",
            ),
            (None, "7", None, "x\n", b"id: 7\ndata: x\ndata: \n\n"),
            (
                None,
                "7",
                None,
                "\r\n\r\n",
                b"id: 7\ndata: \ndata: \ndata: \n\n",
            ),
            (None, "7", Some(0), "y", b"id: 7\nretry: 0\ndata: y\n\n"),
        ];
        for (event, id, retry, data, want) in cases {
            let frame = encode_event(*event, id, *retry, data);
            check_framing(&frame);
            let hay = frame.chunked();
            assert!(
                hay.windows(want.len()).any(|w| w == *want),
                "{:?} lacks {:?}",
                String::from_utf8_lossy(hay),
                String::from_utf8_lossy(want)
            );
        }
        let full = encode_event(Some("goal"), "42", Some(3000), "El Shaarawy");
        assert_eq!(
            full.body(),
            b"event: goal\nid: 42\nretry: 3000\ndata: El Shaarawy\n\n"
        );
    }

    #[test]
    fn comments_retry_and_chunks() {
        let cases: &[(Frame, &[u8])] = &[
            (encode_comment("herald"), b"a\r\n: herald\n\n\r\n"),
            (encode_comment("a\r\nb\nc"), b"a\r\n: a  b c\n\n\r\n"),
            (encode_comment(""), b"4\r\n: \n\n\r\n"),
            (encode_retry(1000), b"d\r\nretry: 1000\n\n\r\n"),
            (encode_retry(u32::MAX), b"13\r\nretry: 4294967295\n\n\r\n"),
            (chunk(b"abc"), b"3\r\nabc\r\n"),
            (keepalive(), KEEPALIVE_CHUNKED),
        ];
        for (frame, want) in cases {
            assert_eq!(
                frame.chunked(),
                *want,
                "{:?}",
                String::from_utf8_lossy(want)
            );
            check_framing(frame);
        }
        assert_eq!(keepalive().body(), KEEPALIVE_BODY);
        let empty = chunk(b"");
        assert!(empty.is_empty());
        assert_eq!(empty.body(), b"");
        let big = chunk(&[b'x'; 0x1234]);
        assert!(big.chunked().starts_with(b"1234\r\n"));
        check_framing(&big);
    }

    #[test]
    fn helpers() {
        for (n, want) in [
            (0, 1),
            (1, 1),
            (15, 1),
            (16, 2),
            (255, 2),
            (256, 3),
            (usize::MAX, 16),
        ] {
            assert_eq!(hex_digits(n), want, "hex {n}");
        }
        for (n, want) in [(0, 1), (9, 1), (10, 2), (99, 2), (100, 3), (u32::MAX, 10)] {
            assert_eq!(dec_digits(n), want, "dec {n}");
        }
        let split: &[(&str, &[&str])] = &[
            ("", &[""]),
            ("a", &["a"]),
            ("a\n", &["a", ""]),
            ("a\r\nb", &["a", "b"]),
            ("a\n\rb", &["a", "", "b"]),
            ("\r\r\n", &["", "", ""]),
        ];
        for (data, want) in split {
            assert_eq!(lines(data).collect::<Vec<_>>(), *want, "{data:?}");
        }
    }

    fn field_value() -> impl Strategy<Value = String> {
        // Anything validation lets through: no CR, LF or NUL.
        "[^\r\n\u{0}]{0,40}"
    }

    fn data_value() -> impl Strategy<Value = String> {
        // `any::<String>()` avoids control characters, so mix in the ones
        // that matter: line breaks, colons, spaces, NUL.
        prop_oneof![
            any::<String>(),
            "[a:\r\n \u{0}\u{e9}]{0,30}",
            proptest::collection::vec(any::<char>(), 0..30).prop_map(String::from_iter),
        ]
    }

    proptest! {
        #[test]
        fn any_data_parses_back(
            data in data_value(),
            event in proptest::option::of(field_value().prop_filter("non-empty", |s| !s.is_empty())),
            id in field_value(),
            retry in proptest::option::of(any::<u32>()),
        ) {
            let frame = encode_event(event.as_deref(), &id, retry, &data);
            check_framing(&frame);
            let events = parse_stream(frame.body());
            prop_assert_eq!(events.len(), 1);
            let want_data = data.replace("\r\n", "\n").replace('\r', "\n");
            let got = &events[0];
            prop_assert_eq!(&got.data, &want_data);
            prop_assert_eq!(&got.event_type, event.as_deref().unwrap_or(""));
            // Parsers strip only the one space after the colon that we wrote,
            // so values starting with a space survive.
            prop_assert_eq!(got.id.as_deref(), Some(id.as_str()));
            prop_assert_eq!(got.retry.clone(), retry.map(|r| r.to_string()));
            prop_assert!(got.other_fields.is_empty());
        }

        #[test]
        fn lines_rejoin_to_normalised(data in "[a\r\n]{0,20}") {
            let joined = lines(&data).collect::<Vec<_>>().join("\n");
            prop_assert_eq!(joined, data.replace("\r\n", "\n").replace('\r', "\n"));
        }
    }
}
