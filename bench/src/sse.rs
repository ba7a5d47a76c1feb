//! Sans-IO decoder for one subscriber stream as the load generator sees it: the HTTP
//! response head, optional chunked framing, then events split on `\n\n`. Only the first
//! `data:` line is parsed (`"<seq> <publish ns>"`); bytes are copied only when an event
//! straddles two reads (into a per-connection carry buffer whose capacity is reused).

use memchr::memmem;

/// Largest response head accepted, bytes.
const MAX_HEAD: usize = 16 * 1024;
/// Largest partial event carried between reads, bytes.
const MAX_EVENT: usize = 1 << 20;

/// One thing found in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    /// `200` response head received; the stream is open.
    Opened,
    /// An event whose data starts with `"<seq> <ns>"`.
    Event { seq: u64, ts_ns: u64 },
    /// A block of comment lines only (keep-alive or greeting).
    Comment,
    /// An event whose data is not ours (or has no data line).
    Foreign,
}

/// Why a stream cannot go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fail {
    /// The response status was not 200.
    Status(u16),
    /// Unparseable head or chunk framing, or an oversized head/event.
    Malformed,
}

/// What the caller should do after a `feed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    More,
    /// The terminal chunk was seen: the server ended the stream.
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size line; `val` so far.
    Size {
        val: usize,
    },
    /// Skipping a chunk extension up to LF.
    Ext {
        val: usize,
    },
    /// Inside chunk data, `left` bytes to go.
    Data {
        left: usize,
    },
    /// Expecting the CRLF after chunk data.
    DataEnd,
    Done,
}

/// Per-connection decoder state.
#[derive(Debug)]
pub struct Decoder {
    in_head: bool,
    chunked: bool,
    chunk: Chunk,
    carry: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            in_head: true,
            chunked: false,
            chunk: Chunk::Size { val: 0 },
            carry: Vec::new(),
        }
    }
}

impl Decoder {
    /// A decoder for a body without HTTP/1.1 head or chunked framing (an h2 stream's
    /// DATA, whose status came in its HEADERS frame).
    pub fn body() -> Decoder {
        Decoder {
            in_head: false,
            ..Decoder::default()
        }
    }

    /// Feed bytes just read; `f` sees each item in order.
    pub fn feed<F: FnMut(Item)>(&mut self, input: &[u8], f: &mut F) -> Result<Flow, Fail> {
        if !self.in_head {
            return self.feed_body(input, f);
        }
        let from = self.carry.len().saturating_sub(3);
        self.carry.extend_from_slice(input);
        let Some(p) = memmem::find(&self.carry[from..], b"\r\n\r\n") else {
            return if self.carry.len() > MAX_HEAD {
                Err(Fail::Malformed)
            } else {
                Ok(Flow::More)
            };
        };
        let end = from + p + 4;
        let (status, chunked) = parse_head(&self.carry[..end])?;
        if status != 200 {
            return Err(Fail::Status(status));
        }
        self.chunked = chunked;
        self.in_head = false;
        f(Item::Opened);
        // Once per connection: move the bytes after the head out of the carry.
        let rest = self.carry.split_off(end);
        self.carry.clear();
        self.feed_body(&rest, f)
    }

    fn feed_body<F: FnMut(Item)>(&mut self, input: &[u8], f: &mut F) -> Result<Flow, Fail> {
        if !self.chunked {
            self.feed_sse(input, f)?;
            return Ok(Flow::More);
        }
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.chunk {
                Chunk::Size { val } | Chunk::Ext { val } => {
                    i += 1;
                    let in_ext = matches!(self.chunk, Chunk::Ext { .. });
                    self.chunk = match b {
                        b'\n' if val == 0 => Chunk::Done,
                        b'\n' => Chunk::Data { left: val },
                        _ if in_ext => Chunk::Ext { val },
                        b'\r' => Chunk::Size { val },
                        b';' | b' ' | b'\t' => Chunk::Ext { val },
                        _ => {
                            let d = (b as char).to_digit(16).ok_or(Fail::Malformed)? as usize;
                            let v = val.checked_mul(16).ok_or(Fail::Malformed)? + d;
                            Chunk::Size { val: v }
                        }
                    };
                }
                Chunk::Data { left } => {
                    let n = left.min(input.len() - i);
                    self.feed_sse(&input[i..i + n], f)?;
                    i += n;
                    self.chunk = if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data { left: left - n }
                    };
                }
                Chunk::DataEnd => {
                    i += 1;
                    match b {
                        b'\r' => {}
                        b'\n' => self.chunk = Chunk::Size { val: 0 },
                        _ => return Err(Fail::Malformed),
                    }
                }
                Chunk::Done => return Ok(Flow::End),
            }
        }
        Ok(if self.chunk == Chunk::Done {
            Flow::End
        } else {
            Flow::More
        })
    }

    fn feed_sse<F: FnMut(Item)>(&mut self, data: &[u8], f: &mut F) -> Result<(), Fail> {
        if self.carry.is_empty() {
            let used = scan(data, f);
            self.carry.extend_from_slice(&data[used..]);
        } else {
            self.carry.extend_from_slice(data);
            let used = scan(&self.carry, f);
            self.carry.drain(..used);
        }
        if self.carry.len() > MAX_EVENT {
            return Err(Fail::Malformed);
        }
        Ok(())
    }
}

/// Status code and whether the body is chunked.
fn parse_head(head: &[u8]) -> Result<(u16, bool), Fail> {
    let line_end = memchr::memchr(b'\n', head).ok_or(Fail::Malformed)?;
    let line = &head[..line_end];
    if !line.starts_with(b"HTTP/1.") || line.len() < 12 {
        return Err(Fail::Malformed);
    }
    let code = std::str::from_utf8(&line[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Fail::Malformed)?;
    let chunked = head[line_end..].split(|&b| b == b'\n').any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with(b"transfer-encoding:") && memmem::find(&l, b"chunked").is_some()
    });
    Ok((code, chunked))
}

/// Report every complete event in `buf`; returns the bytes consumed.
fn scan<F: FnMut(Item)>(buf: &[u8], f: &mut F) -> usize {
    let mut start = 0;
    for end in memmem::find_iter(buf, b"\n\n") {
        if end < start {
            continue; // "\n\n\n": the overlapping match inside the previous separator
        }
        f(classify(&buf[start..end]));
        start = end + 2;
    }
    start
}

/// One event block (lines without the blank line that ends it).
fn classify(block: &[u8]) -> Item {
    let mut only_comments = true;
    for line in block.split(|&b| b == b'\n') {
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            return match parse_two(rest) {
                Some((seq, ts_ns)) => Item::Event { seq, ts_ns },
                None => Item::Foreign,
            };
        }
        if !line.starts_with(b":") {
            only_comments = false;
        }
    }
    if only_comments {
        Item::Comment
    } else {
        Item::Foreign
    }
}

/// `"<u64> <u64>"` followed by anything that is not a digit.
fn parse_two(s: &[u8]) -> Option<(u64, u64)> {
    let (a, n) = parse_u64(s)?;
    let s = s[n..].strip_prefix(b" ")?;
    let (b, _) = parse_u64(s)?;
    Some((a, b))
}

fn parse_u64(s: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        n += 1;
    }
    (n > 0).then_some((v, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";

    fn chunk(body: &str) -> Vec<u8> {
        let mut v = format!("{:x}\r\n", body.len()).into_bytes();
        v.extend_from_slice(body.as_bytes());
        v.extend_from_slice(b"\r\n");
        v
    }

    fn run(parts: &[&[u8]]) -> (Vec<Item>, Result<Flow, Fail>) {
        let mut d = Decoder::default();
        let mut items = Vec::new();
        let mut last = Ok(Flow::More);
        for p in parts {
            last = d.feed(p, &mut |i| items.push(i));
            if last.is_err() {
                break;
            }
        }
        (items, last)
    }

    #[test]
    fn whole_stream_in_one_read_and_byte_by_byte() {
        let mut all = HEAD.to_vec();
        all.extend(chunk(": herald\n\n"));
        all.extend(chunk("id: 17\ndata: 3 123456\n\n"));
        all.extend(chunk("event: x\ndata: hello\n\n"));
        all.extend(chunk(":\n\n"));
        all.extend(chunk("id: 18\ndata: 4 99 padding\n\nid: 19\ndata: 5 1\n\n"));
        all.extend(b"0\r\n\r\n");
        let want = vec![
            Item::Opened,
            Item::Comment,
            Item::Event {
                seq: 3,
                ts_ns: 123456,
            },
            Item::Foreign,
            Item::Comment,
            Item::Event { seq: 4, ts_ns: 99 },
            Item::Event { seq: 5, ts_ns: 1 },
        ];
        let (items, flow) = run(&[&all]);
        assert_eq!((items, flow), (want.clone(), Ok(Flow::End)));
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        let (items, flow) = run(&bytes);
        assert_eq!((items, flow), (want, Ok(Flow::End)));
    }

    #[test]
    fn body_decoder_has_no_head() {
        let mut d = Decoder::body();
        let mut items = Vec::new();
        let r = d.feed(b": hi\n\ndata: 7 8\n\ndata: 9", &mut |i| items.push(i));
        assert_eq!(r, Ok(Flow::More));
        d.feed(b" 10\n\n", &mut |i| items.push(i)).unwrap();
        assert_eq!(
            items,
            vec![
                Item::Comment,
                Item::Event { seq: 7, ts_ns: 8 },
                Item::Event { seq: 9, ts_ns: 10 }
            ]
        );
    }

    #[test]
    fn not_chunked_and_bad_status() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1 2\n\n";
        assert_eq!(
            run(&[head]).0,
            vec![Item::Opened, Item::Event { seq: 1, ts_ns: 2 }]
        );
        let busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n";
        assert_eq!(run(&[busy]).1, Err(Fail::Status(503)));
        assert_eq!(run(&[b"garbage\r\n\r\n"]).1, Err(Fail::Malformed));
        let mut bad = HEAD.to_vec();
        bad.extend(b"zz\r\n");
        assert_eq!(run(&[&bad]).1, Err(Fail::Malformed));
    }
}
