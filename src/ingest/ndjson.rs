//! NDJSON ingest: `LineFramer` cuts a publisher's byte stream into numbered
//! lines and `parse_line` turns one line into a `Command` or a `LineError`.
//! Invariant: a connection buffers at most `max_line + 1` bytes of any line
//! (plus one push), and every line, blank or bad, advances the line number.

use crate::sse::event::{Publish, PublishError};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Default longest ingest line, in bytes (1 MiB).
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

/// What one valid ingest line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Publish(Publish),
    /// `{"topic":"x","control":"close"}`: end every stream of the topic.
    CloseTopic(String),
    /// `{"control":"disconnect","sub":"42"}` or `{"control":"disconnect","jti":"…"}`:
    /// end those streams and refuse the tokens concerned from now on.
    Disconnect(crate::auth::Revoke),
}

/// Why a line was skipped; rendered for the publisher by `error_reply`.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LineError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("line is not a JSON object")]
    NotAnObject,
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{0}` must be {expected}", expected = expected(.0))]
    WrongType(&'static str),
    #[error("line longer than {max} bytes")]
    LineTooLong { max: usize },
    #[error("unknown control `{0}` (expected \"close\" or \"disconnect\")")]
    UnknownControl(String),
    #[error("a disconnect names exactly one of `sub` and `jti`, a non-empty string")]
    BadDisconnect,
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Invalid(#[from] PublishError),
}

fn expected(field: &str) -> &'static str {
    match field {
        "retry" => "a non-negative integer (milliseconds) below 2^32",
        "topic" | "data" | "control" | "sub" | "jti" => "a string",
        _ => "a string or null",
    }
}

/// Parses one line (without its `\n`; a trailing `\r` is ignored).
pub fn parse_line(line: &[u8]) -> Result<Command, LineError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let first = line.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Tell "valid JSON but not an object" apart from garbage.
        return match serde_json::from_slice::<IgnoredAny>(line) {
            Ok(_) => Err(LineError::NotAnObject),
            Err(e) => Err(LineError::InvalidJson(e.to_string())),
        };
    }
    let mut raw: Raw =
        serde_json::from_slice(line).map_err(|e| LineError::InvalidJson(e.to_string()))?;
    if matches!(&raw.control, Loose::Str(c) if c == "disconnect") {
        let sub = string_field(std::mem::take(&mut raw.sub), "sub")?;
        let jti = string_field(std::mem::take(&mut raw.jti), "jti")?;
        return match (sub, jti) {
            (Some(s), None) if !s.is_empty() => {
                Ok(Command::Disconnect(crate::auth::Revoke::Sub(s.into())))
            }
            (None, Some(j)) if !j.is_empty() => {
                Ok(Command::Disconnect(crate::auth::Revoke::Jti(j.into())))
            }
            _ => Err(LineError::BadDisconnect),
        };
    }
    let topic = string_field(raw.topic, "topic")?.ok_or(LineError::MissingField("topic"))?;
    match raw.control {
        Loose::Absent | Loose::Null => {}
        Loose::Str(control) => {
            if control != "close" {
                return Err(LineError::UnknownControl(control));
            }
            crate::sse::event::validate_topic(&topic)?;
            return Ok(Command::CloseTopic(topic));
        }
        _ => return Err(LineError::WrongType("control")),
    }
    let data = string_field(raw.data, "data")?.ok_or(LineError::MissingField("data"))?;
    let retry = match raw.retry {
        Loose::Absent | Loose::Null => None,
        Loose::UInt(n) => Some(u32::try_from(n).map_err(|_| LineError::WrongType("retry"))?),
        _ => return Err(LineError::WrongType("retry")),
    };
    let publish = Publish {
        topic,
        data,
        event: optional_string(raw.event, "event")?,
        id: optional_string(raw.id, "id")?,
        retry,
    };
    publish.validate()?;
    Ok(Command::Publish(publish))
}

/// `{"error":"<message>","line":N}\n`, JSON-escaped.
pub fn error_reply(err: &LineError, line_no: u64) -> Vec<u8> {
    #[derive(Serialize)]
    struct Reply<'a> {
        error: &'a str,
        line: u64,
    }
    let message = err.to_string();
    let reply = Reply {
        error: &message,
        line: line_no,
    };
    // INVARIANT: serialising a struct of a str and a u64 cannot fail.
    let mut out = serde_json::to_vec(&reply).expect("plain struct serialises");
    out.push(b'\n');
    out
}

/// The fields herald reads; every value is accepted loosely so a wrong type
/// becomes a precise `WrongType` rather than a serde message.
#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    topic: Loose,
    #[serde(default)]
    data: Loose,
    #[serde(default)]
    event: Loose,
    #[serde(default)]
    id: Loose,
    #[serde(default)]
    retry: Loose,
    #[serde(default)]
    control: Loose,
    #[serde(default)]
    sub: Loose,
    #[serde(default)]
    jti: Loose,
}

/// Any JSON value, keeping only what herald can use; `Absent` when the key is
/// missing (distinct from an explicit `null`).
#[derive(Debug, Default)]
enum Loose {
    #[default]
    Absent,
    Str(String),
    UInt(u64),
    Null,
    Other,
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor)
    }
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
        Ok(Loose::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Loose, E> {
        Ok(Loose::Str(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose, E> {
        Ok(Loose::UInt(v))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Loose, E> {
        Ok(Loose::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Loose, E> {
        Ok(Loose::Other)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose, E> {
        Ok(Loose::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Loose::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Loose::Other)
    }
}

/// A required-string field: absent is `None`, anything but a string (null
/// included) is `WrongType`.
fn string_field(v: Loose, field: &'static str) -> Result<Option<String>, LineError> {
    match v {
        Loose::Absent => Ok(None),
        Loose::Str(s) => Ok(Some(s)),
        _ => Err(LineError::WrongType(field)),
    }
}

/// An optional-string field: absent and null both mean "not given".
fn optional_string(v: Loose, field: &'static str) -> Result<Option<String>, LineError> {
    match v {
        Loose::Absent | Loose::Null => Ok(None),
        Loose::Str(s) => Ok(Some(s)),
        _ => Err(LineError::WrongType(field)),
    }
}

/// One item out of a `LineFramer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed<'a> {
    /// A non-blank line, without its `\n`; `no` counts from 1.
    Line { no: u64, line: &'a [u8] },
    /// Line `no` exceeded the limit; its bytes were dropped.
    TooLong { no: u64 },
}

/// Incremental line framer for one ingest connection: feed bytes, get
/// complete lines.
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out; drained on the next `push`.
    start: usize,
    /// INVARIANT: `buf[start..scanned]` holds no `\n`, so no byte is searched twice.
    scanned: usize,
    /// Start of the unterminated last line in `buf` (after the last `\n`).
    tail_start: usize,
    /// Number the next line will get.
    next_no: u64,
    /// Longest line kept, in bytes (without the `\n`).
    max_line: usize,
    /// The tail line went over `max_line`: its first `max_line + 1` bytes are
    /// kept (so it still reads as too long) and the rest is dropped up to `\n`.
    discarding: bool,
}

impl LineFramer {
    pub fn new(max_line: usize) -> Self {
        LineFramer {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            tail_start: 0,
            next_no: 1,
            max_line,
            discarding: false,
        }
    }

    /// Appends incoming bytes, dropping what lies past `max_line + 1` bytes of
    /// an unterminated line.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.tail_start = self.tail_start.saturating_sub(self.start);
            self.start = 0;
        }
        let mut input = bytes;
        if self.discarding {
            match input.iter().position(|&b| b == b'\n') {
                None => return,
                Some(i) => {
                    self.discarding = false;
                    input = &input[i..];
                }
            }
        }
        // Searching from the end only walks the new tail line.
        let (tail_start, tail_len) = match input.iter().rposition(|&b| b == b'\n') {
            Some(j) => (self.buf.len() + j + 1, input.len() - j - 1),
            None => (
                self.tail_start,
                self.buf.len() - self.tail_start + input.len(),
            ),
        };
        let keep_tail = self.max_line + 1;
        if tail_len > keep_tail {
            let cut = input.len() - (tail_len - keep_tail);
            self.buf.extend_from_slice(&input[..cut]);
            self.discarding = true;
        } else {
            self.buf.extend_from_slice(input);
        }
        self.tail_start = tail_start;
    }

    /// The next complete line, or the report of an overlong one. Blank and
    /// whitespace-only lines are skipped but still counted.
    pub fn next_line(&mut self) -> Option<Framed<'_>> {
        let (no, a, b) = self.advance(false)?;
        Some(self.framed(no, a, b))
    }

    /// At EOF: the remaining complete lines, then a final unterminated line.
    pub fn finish(&mut self) -> Option<Framed<'_>> {
        let (no, a, b) = self.advance(true)?;
        Some(self.framed(no, a, b))
    }

    /// Number of lines handed out or skipped so far.
    pub fn lines_seen(&self) -> u64 {
        self.next_no - 1
    }

    fn framed(&self, no: u64, a: usize, b: usize) -> Framed<'_> {
        if b - a > self.max_line {
            Framed::TooLong { no }
        } else {
            Framed::Line {
                no,
                line: &self.buf[a..b],
            }
        }
    }

    /// Finds the next line to report as `(no, start, end)` in `buf`.
    fn advance(&mut self, eof: bool) -> Option<(u64, usize, usize)> {
        loop {
            let (a, b) = match self.buf[self.scanned..].iter().position(|&c| c == b'\n') {
                Some(i) => {
                    let (a, b) = (self.start, self.scanned + i);
                    self.start = b + 1;
                    (a, b)
                }
                None if eof && self.start < self.buf.len() => {
                    let (a, b) = (self.start, self.buf.len());
                    self.start = b;
                    self.discarding = false;
                    (a, b)
                }
                None => {
                    self.scanned = self.buf.len();
                    return None;
                }
            };
            self.scanned = self.start;
            let no = self.next_no;
            self.next_no += 1;
            // An overlong line is reported even if its kept prefix is blank.
            if b - a <= self.max_line && self.buf[a..b].iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some((no, a, b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(
        topic: &str,
        data: &str,
        event: Option<&str>,
        id: Option<&str>,
        retry: Option<u32>,
    ) -> Command {
        Command::Publish(Publish {
            topic: topic.into(),
            data: data.into(),
            event: event.map(Into::into),
            id: id.map(Into::into),
            retry,
        })
    }

    #[test]
    fn parse_lines() {
        use LineError::*;
        let cases: Vec<(&str, Result<Command, LineError>)> = vec![
            (
                r#"{"topic":"scores","event":"goal","data":"El Shaarawy","id":"42","retry":3000}"#,
                Ok(publish(
                    "scores",
                    "El Shaarawy",
                    Some("goal"),
                    Some("42"),
                    Some(3000),
                )),
            ),
            (
                r#"{"topic":"t","data":"a\nb"}"#,
                Ok(publish("t", "a\nb", None, None, None)),
            ),
            (
                r#"{"topic":"t","data":""}"#,
                Ok(publish("t", "", None, None, None)),
            ),
            (
                "{\"topic\":\"t\",\"data\":\"x\"}\r",
                Ok(publish("t", "x", None, None, None)),
            ),
            (
                r#" {"data":"x","topic":"t","extra":[1,{"a":2}],"event":null,"id":null,"retry":null}"#,
                Ok(publish("t", "x", None, None, None)),
            ),
            (
                r#"{"topic":"x","control":"close"}"#,
                Ok(Command::CloseTopic("x".into())),
            ),
            (
                r#"{"topic":"x","control":"open"}"#,
                Err(UnknownControl("open".into())),
            ),
            (r#"{"topic":"x","control":1}"#, Err(WrongType("control"))),
            (
                r#"{"topic":"x","control":null,"data":"d"}"#,
                Ok(publish("x", "d", None, None, None)),
            ),
            (
                r#"{"topic":"bad topic","control":"close"}"#,
                Err(Invalid(PublishError::InvalidTopic { max: 200 })),
            ),
            (r#"{"data":"x"}"#, Err(MissingField("topic"))),
            (r#"{"topic":"t"}"#, Err(MissingField("data"))),
            (r#"{"topic":"t","data":5}"#, Err(WrongType("data"))),
            (r#"{"topic":"t","data":null}"#, Err(WrongType("data"))),
            (r#"{"topic":7,"data":"x"}"#, Err(WrongType("topic"))),
            (r#"{"topic":"t","data":"x","id":4}"#, Err(WrongType("id"))),
            (
                r#"{"topic":"t","data":"x","event":true}"#,
                Err(WrongType("event")),
            ),
            (
                r#"{"topic":"t","data":"x","retry":-1}"#,
                Err(WrongType("retry")),
            ),
            (
                r#"{"topic":"t","data":"x","retry":1.5}"#,
                Err(WrongType("retry")),
            ),
            (
                r#"{"topic":"t","data":"x","retry":"10"}"#,
                Err(WrongType("retry")),
            ),
            (
                r#"{"topic":"t","data":"x","retry":4294967296}"#,
                Err(WrongType("retry")),
            ),
            (
                r#"{"topic":"t","data":"x","retry":4294967295}"#,
                Ok(publish("t", "x", None, None, Some(u32::MAX))),
            ),
            (
                r#"{"topic":"a b","data":"x"}"#,
                Err(Invalid(PublishError::InvalidTopic { max: 200 })),
            ),
            (
                r#"{"topic":"t","data":"x","id":"1\n2"}"#,
                Err(Invalid(PublishError::ControlChar { field: "id" })),
            ),
            (
                r#"{"topic":"t","data":"x","event":""}"#,
                Err(Invalid(PublishError::EmptyEventType)),
            ),
            ("[1,2]", Err(NotAnObject)),
            ("\"str\"", Err(NotAnObject)),
            ("42", Err(NotAnObject)),
        ];
        for (line, want) in cases {
            assert_eq!(parse_line(line.as_bytes()), want, "{line}");
        }
        for bad in [
            "{",
            "{\"topic\":}",
            "nope",
            "{\"topic\":\"t\",\"data\":\"\\ud800\"}",
            "{} x",
        ] {
            assert!(
                matches!(parse_line(bad.as_bytes()), Err(InvalidJson(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_line(b"{\"topic\":\"t\",\"data\":\"\xff\"}"),
            Err(InvalidJson(_))
        ));
    }

    #[test]
    fn replies() {
        let cases: Vec<(LineError, u64, &str)> = vec![
            (
                LineError::MissingField("data"),
                3,
                r#"{"error":"missing field `data`","line":3}"#,
            ),
            (
                LineError::InvalidJson("bad \"quote\"\n".into()),
                1,
                r#"{"error":"invalid JSON: bad \"quote\"\n","line":1}"#,
            ),
            (
                LineError::LineTooLong { max: 10 },
                9,
                r#"{"error":"line longer than 10 bytes","line":9}"#,
            ),
            (
                LineError::WrongType("data"),
                2,
                r#"{"error":"field `data` must be a string","line":2}"#,
            ),
            (
                LineError::Invalid(PublishError::ControlChar { field: "id" }),
                5,
                r#"{"error":"id must not contain CR, LF or NUL","line":5}"#,
            ),
        ];
        for (err, no, want) in cases {
            let got = error_reply(&err, no);
            assert_eq!(String::from_utf8(got).unwrap(), format!("{want}\n"));
        }
    }

    /// Owned copy of a `Framed`, for comparing sequences.
    #[derive(Debug, PartialEq, Clone)]
    enum Out {
        Line(u64, Vec<u8>),
        TooLong(u64),
    }

    fn own(f: Framed<'_>) -> Out {
        match f {
            Framed::Line { no, line } => Out::Line(no, line.to_vec()),
            Framed::TooLong { no } => Out::TooLong(no),
        }
    }

    fn run(max: usize, pushes: &[&[u8]]) -> Vec<Out> {
        let mut f = LineFramer::new(max);
        let mut out = Vec::new();
        for p in pushes {
            f.push(p);
            assert!(
                f.buf.len() <= max + 1 + p.len() + 1,
                "buffered {} bytes",
                f.buf.len()
            );
            while let Some(x) = f.next_line() {
                out.push(own(x));
            }
        }
        while let Some(x) = f.finish() {
            out.push(own(x));
        }
        out
    }

    /// Naive oracle: split everything on `\n` at once.
    fn oracle(max: usize, input: &[u8]) -> Vec<Out> {
        let mut parts: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
        if parts.last().is_some_and(|l| l.is_empty()) {
            parts.pop();
        }
        parts
            .into_iter()
            .enumerate()
            .filter(|(_, l)| l.len() > max || !l.iter().all(u8::is_ascii_whitespace))
            .map(|(i, l)| {
                let no = i as u64 + 1;
                if l.len() > max {
                    Out::TooLong(no)
                } else {
                    Out::Line(no, l.to_vec())
                }
            })
            .collect()
    }

    #[test]
    fn framing_table() {
        use Out::*;
        let l = |no, s: &str| Line(no, s.as_bytes().to_vec());
        /// (max_line, pushes, expected output)
        type Case<'a> = (usize, Vec<&'a [u8]>, Vec<Out>);
        let cases: Vec<Case> = vec![
            (10, vec![b"a\nb\n"], vec![l(1, "a"), l(2, "b")]),
            (10, vec![b"a", b"b", b"\nc"], vec![l(1, "ab"), l(2, "c")]),
            (10, vec![b"\n  \n\t\r\nx\n"], vec![l(4, "x")]),
            (10, vec![b"x\r\n"], vec![l(1, "x\r")]),
            (3, vec![b"abcd\nok\n"], vec![TooLong(1), l(2, "ok")]),
            (3, vec![b"abc\n"], vec![l(1, "abc")]),
            (
                3,
                vec![b"ab", b"cdef", b"ghij", b"k\nz"],
                vec![TooLong(1), l(2, "z")],
            ),
            (
                3,
                vec![b"a\nbcdefgh", b"ijk", b"\n", b"c\n"],
                vec![l(1, "a"), TooLong(2), l(3, "c")],
            ),
            (3, vec![b"abcdefgh"], vec![TooLong(1)]),
            (3, vec![b"abcdefgh\n"], vec![TooLong(1)]),
            (
                3,
                vec![b"x\nabcdefgh\ny\nlonglonglong"],
                vec![l(1, "x"), TooLong(2), l(3, "y"), TooLong(4)],
            ),
            (10, vec![b""], vec![]),
            (10, vec![b"   "], vec![]),
            (2, vec![b"     \n"], vec![TooLong(1)]),
        ];
        for (max, pushes, want) in cases {
            assert_eq!(run(max, &pushes), want, "{pushes:?}");
        }
    }

    #[test]
    fn overlong_is_not_buffered() {
        let mut f = LineFramer::new(16);
        for _ in 0..1000 {
            f.push(&[b'x'; 100]);
            assert!(f.next_line().is_none());
            assert!(f.buf.len() <= 17);
        }
        f.push(b"\n{}\n");
        assert_eq!(f.next_line(), Some(Framed::TooLong { no: 1 }));
        assert_eq!(f.next_line(), Some(Framed::Line { no: 2, line: b"{}" }));
        assert_eq!(f.next_line(), None);
        assert_eq!(f.lines_seen(), 2);
    }

    proptest::proptest! {
        #[test]
        fn framer_matches_oracle(
            input in proptest::collection::vec(proptest::sample::select(vec![b'a', b' ', b'\n', b'\r']), 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..8),
            max in 0usize..12,
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.push(0);
            cuts.push(input.len());
            cuts.sort_unstable();
            let pushes: Vec<&[u8]> = cuts.windows(2).map(|w| &input[w[0]..w[1]]).collect();
            proptest::prop_assert_eq!(run(max, &pushes), oracle(max, &input));
        }

        /// Arbitrary bytes in arbitrary chunks frame exactly as the same bytes in one
        /// push: same lines, same numbers, nothing lost or joined across a cut.
        #[test]
        fn any_bytes_in_any_chunks_frame_as_whole(
            input in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            cuts in proptest::collection::vec(0usize..600, 0..16),
            max in 0usize..64,
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.push(0);
            cuts.push(input.len());
            cuts.sort_unstable();
            let pushes: Vec<&[u8]> = cuts.windows(2).map(|w| &input[w[0]..w[1]]).collect();
            let whole = run(max, &[input.as_slice()]);
            proptest::prop_assert_eq!(run(max, &pushes), whole.clone());
            proptest::prop_assert_eq!(whole, oracle(max, &input));
        }

        #[test]
        fn parse_line_never_panics(line in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_line(&line);
        }

        /// JSON-shaped lines (the fields herald reads, any value type, odd escapes)
        /// never panic, and an accepted publish always passes validation.
        #[test]
        fn json_like_lines_never_panic(pieces in proptest::collection::vec(
            proptest::sample::select(vec![
                "{", "}", "[", "]", ",", ":", "\"topic\"", "\"data\"", "\"event\"",
                "\"id\"", "\"retry\"", "\"control\"", "\"close\"", "\"t\"", "\"a\\nb\"",
                "\"\\u0000\"", "\"\\ud800\"", "null", "true", "-1", "4294967296", "1.5",
                "1e400", " ", "\r", "\u{feff}", "\"\u{10ffff}\"",
            ]),
            0..24,
        )) {
            let line = pieces.concat();
            if let Ok(Command::Publish(p)) = parse_line(line.as_bytes()) {
                proptest::prop_assert!(p.validate().is_ok());
            }
        }
    }
}
