//! HTTP/1.x request heads: bytes in, a typed `Request` (or a status) out, via
//! `httparse`. Sans-IO. Invariant: anything a peer sends ends as `Partial`,
//! `Done` or an `HttpError` with a status; topics in a `Route` are decoded,
//! validated and de-duplicated.

use crate::sse::event::{validate_topic, Publish};
use percent_encoding::percent_decode;

/// Most topics one subscribe request may name.
pub const MAX_TOPICS_DEFAULT: usize = 32;
/// Most header lines in a head (httparse is given this many slots).
pub const MAX_HEADERS: usize = 64;
/// Default head size limit, in bytes.
pub const MAX_HEAD_DEFAULT: usize = 8192;
/// Default publish body limit, in bytes (1 MiB).
pub const MAX_BODY_DEFAULT: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest request head, in bytes.
    pub max_head: usize,
    pub max_topics: usize,
    /// Longest publish body, in bytes.
    pub max_body: usize,
    /// With authentication on: the cookie that may carry a token.
    pub token_cookie: Option<String>,
    /// The query parameter that may carry a token (`--auth-query-param`).
    pub token_param: Option<String>,
    /// Keep the path of each request (for the access log).
    pub keep_path: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: MAX_HEAD_DEFAULT,
            max_topics: MAX_TOPICS_DEFAULT,
            max_body: MAX_BODY_DEFAULT,
            token_cookie: None,
            token_param: None,
            keep_path: false,
        }
    }
}

/// Where a request's token came from (the first found, in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Cookie,
    Query,
}

/// A bearer token as the client sent it. Never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub value: String,
    pub source: TokenSource,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({:?}, {} bytes)", self.source, self.value.len())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /events/{topic}` or `GET /events?topic=a&topic=b`.
    Subscribe {
        topics: Vec<String>,
        last_event_id: Option<String>,
    },
    /// `POST /publish/{topic}?event=&id=&retry=`.
    Publish {
        topic: String,
        event: Option<String>,
        id: Option<String>,
        retry: Option<u32>,
    },
    /// `GET /healthz`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// `GET /` and `GET /index.html`.
    Demo,
    /// `OPTIONS` on any known path.
    Preflight,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub route: Route,
    /// Bytes consumed by the head; the body starts here.
    pub head_len: usize,
    pub http10: bool,
    /// Per HTTP version and the `Connection` header.
    pub keep_alive: bool,
    pub origin: Option<String>,
    /// Declared body length in bytes, 0 if absent.
    pub content_length: usize,
    /// `Transfer-Encoding: chunked` body.
    pub chunked_body: bool,
    /// `HEAD`: answer like `GET`, without the body.
    pub head_only: bool,
    /// The token, when authentication is on and the request carries one.
    pub token: Option<Token>,
    /// The method, for the access log.
    pub method: &'static str,
    /// The path without its query (only with `Limits::keep_path`).
    pub path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request")]
    BadRequest,
    /// Content-Length / Transfer-Encoding that do not give one certain body length
    /// (RFC 9112 §6.3): refused, so no body bytes are ever read as a request.
    #[error("ambiguous message framing")]
    BadFraming,
    /// A body on a method that has none (only `POST /publish` takes one).
    #[error("{method} request must not have a body")]
    UnexpectedBody { method: &'static str },
    #[error("invalid topic name")]
    InvalidTopic,
    #[error("no topic given")]
    NoTopic,
    #[error("more than {max} topics")]
    TooManyTopics { max: usize },
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request header fields too large")]
    HeadersTooLarge,
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("HTTP version not supported")]
    VersionNotSupported,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest
            | HttpError::BadFraming
            | HttpError::UnexpectedBody { .. }
            | HttpError::InvalidTopic
            | HttpError::NoTopic
            | HttpError::TooManyTopics { .. } => 400,
            HttpError::NotFound => 404,
            HttpError::MethodNotAllowed => 405,
            HttpError::PayloadTooLarge => 413,
            HttpError::HeadersTooLarge => 431,
            HttpError::VersionNotSupported => 505,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet; read more.
    Partial,
    Done(Request),
}

/// The paths herald knows, before the method is checked.
enum Path<'a> {
    Events(Option<&'a str>),
    Publish(Option<&'a str>),
    Health,
    Metrics,
    Demo,
}

pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Parsed, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head => {
            return Err(HttpError::HeadersTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadersTooLarge),
        Err(httparse::Error::Version) if names_http_version(buf) => {
            return Err(HttpError::VersionNotSupported)
        }
        Err(_) => return Err(HttpError::BadRequest),
    };
    if head_len > limits.max_head {
        return Err(HttpError::HeadersTooLarge);
    }
    // INVARIANT: httparse fills method, path and version on Complete.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HttpError::BadRequest);
    };
    let http10 = version == 0;
    let h = Headers::read(req.headers, http10, limits.token_cookie.as_deref())?;
    if method != "POST" && (h.content_length > 0 || h.transfer_encoding) {
        // The body would otherwise be read as the next request (smuggling).
        return Err(HttpError::UnexpectedBody {
            method: bodiless_method(method),
        });
    }
    if h.content_length > limits.max_body {
        return Err(HttpError::PayloadTooLarge);
    }

    let (path, query) = split_target(target)?;
    let kind = match path {
        "/" | "/index.html" => Path::Demo,
        "/healthz" => Path::Health,
        "/metrics" => Path::Metrics,
        "/events" => Path::Events(None),
        "/publish" => Path::Publish(None),
        _ => {
            if let Some(t) = path.strip_prefix("/events/") {
                Path::Events(Some(t))
            } else if let Some(t) = path.strip_prefix("/publish/") {
                Path::Publish(Some(t))
            } else {
                return Err(HttpError::NotFound);
            }
        }
    };
    let head_only = method == "HEAD";
    let mut query_token = None;
    let route = match (method, kind) {
        ("OPTIONS", _) => Route::Preflight,
        ("GET", Path::Events(topic)) => {
            subscribe(topic, query, h.last_event_id, limits, &mut query_token)?
        }
        ("POST", Path::Publish(topic)) => publish(topic, query)?,
        ("GET" | "HEAD", Path::Health) => Route::Health,
        ("GET" | "HEAD", Path::Metrics) => Route::Metrics,
        ("GET" | "HEAD", Path::Demo) => Route::Demo,
        _ => return Err(HttpError::MethodNotAllowed),
    };
    let token = limits.token_cookie.as_ref().and_then(|_| {
        let found = |value: Option<String>, source| value.map(|value| Token { value, source });
        found(h.bearer, TokenSource::Header)
            .or_else(|| found(h.cookie_token, TokenSource::Cookie))
            .or_else(|| found(query_token, TokenSource::Query))
    });
    Ok(Parsed::Done(Request {
        route,
        head_len,
        http10,
        keep_alive: h.keep_alive,
        origin: h.origin,
        content_length: h.content_length,
        chunked_body: h.chunked,
        head_only,
        token,
        method: known_method(method),
        path: limits.keep_path.then(|| path.to_owned()),
    }))
}

/// Whether the request line ends in an `HTTP/` version token httparse
/// refused (505 rather than 400).
fn names_http_version(buf: &[u8]) -> bool {
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let line = buf[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&buf[..line_end]);
    line.rsplit(|&b| b == b' ')
        .next()
        .is_some_and(|v| v.starts_with(b"HTTP/") && v.len() > 5 && v[5].is_ascii_digit())
}

/// The method's name for an error message, without keeping the peer's bytes.
fn bodiless_method(method: &str) -> &'static str {
    [
        "GET", "HEAD", "OPTIONS", "DELETE", "PUT", "PATCH", "TRACE", "CONNECT",
    ]
    .into_iter()
    .find(|m| *m == method)
    .unwrap_or("this")
}

/// The method's name for the access log, without keeping the peer's bytes.
fn known_method(method: &str) -> &'static str {
    match method {
        "POST" => "POST",
        m => match bodiless_method(m) {
            "this" => "other",
            known => known,
        },
    }
}

/// What herald reads from the header lines. bare CR, obs-fold and whitespace before
/// the colon never get here: httparse refuses them (pinned by `framing` below).
struct Headers {
    keep_alive: bool,
    origin: Option<String>,
    content_length: usize,
    chunked: bool,
    /// Any `Transfer-Encoding` header was present.
    transfer_encoding: bool,
    last_event_id: Option<String>,
    /// `Authorization: Bearer` credentials (only looked for with authentication on).
    bearer: Option<String>,
    /// The token cookie's value.
    cookie_token: Option<String>,
}

impl Headers {
    fn read(
        headers: &[httparse::Header<'_>],
        http10: bool,
        token_cookie: Option<&str>,
    ) -> Result<Self, HttpError> {
        let mut out = Headers {
            keep_alive: !http10,
            origin: None,
            content_length: 0,
            chunked: false,
            transfer_encoding: false,
            last_event_id: None,
            bearer: None,
            cookie_token: None,
        };
        let mut length: Option<usize> = None;
        // Codings over every Transfer-Encoding line, in order; `chunked` must be the
        // last one and appear once (RFC 9112 §6.1).
        let mut chunked_seen = 0usize;
        for h in headers {
            let name = h.name;
            if name.eq_ignore_ascii_case("connection") {
                for token in text(h.value)?.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        out.keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                        out.keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("origin") {
                out.origin = Some(text(h.value)?.to_owned());
            } else if name.eq_ignore_ascii_case("last-event-id") {
                let id = text(h.value)?.trim();
                out.last_event_id = (!id.is_empty()).then(|| id.to_owned());
            } else if name.eq_ignore_ascii_case("content-length") {
                // Repeats are allowed only if they agree (RFC 9112 §6.3, item 5).
                for v in text(h.value)?.split(',').map(str::trim) {
                    let n = parse_content_length(v)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(HttpError::BadFraming);
                    }
                    length = Some(n);
                }
            } else if token_cookie.is_some() && name.eq_ignore_ascii_case("authorization") {
                // RFC 6750 §2.1; another scheme is no bearer token.
                let v = text(h.value)?.trim();
                if let Some((scheme, cred)) = v.split_once(' ') {
                    if scheme.eq_ignore_ascii_case("bearer") && out.bearer.is_none() {
                        let cred = cred.trim();
                        out.bearer = (!cred.is_empty()).then(|| cred.to_owned());
                    }
                }
            } else if let Some(want) = token_cookie.filter(|_| name.eq_ignore_ascii_case("cookie"))
            {
                if out.cookie_token.is_none() {
                    out.cookie_token = cookie_value(text(h.value)?, want);
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                out.transfer_encoding = true;
                for coding in text(h.value)?.split(',').map(str::trim) {
                    out.chunked = coding.eq_ignore_ascii_case("chunked");
                    chunked_seen += usize::from(out.chunked);
                }
            }
        }
        if out.transfer_encoding && (!out.chunked || chunked_seen > 1 || length.is_some() || http10)
        {
            // A body whose length we cannot trust: refuse rather than desync.
            return Err(HttpError::BadFraming);
        }
        out.content_length = length.unwrap_or(0);
        Ok(out)
    }
}

/// The value of cookie `name` in a `Cookie` header (RFC 6265 §5.4), quotes removed.
fn cookie_value(header: &str, name: &str) -> Option<String> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if k.trim() != name {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        (!v.is_empty()).then(|| v.to_owned())
    })
}

fn text(value: &[u8]) -> Result<&str, HttpError> {
    std::str::from_utf8(value).map_err(|_| HttpError::BadRequest)
}

/// A Content-Length value: decimal digits only, no sign, no overflow.
fn parse_content_length(v: &str) -> Result<usize, HttpError> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::BadFraming);
    }
    v.parse().map_err(|_| HttpError::BadFraming)
}

fn parse_length(v: &str) -> Result<usize, HttpError> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::BadRequest);
    }
    // Overflowing lengths are far beyond any body limit.
    Ok(v.parse().unwrap_or(usize::MAX))
}

/// Splits a request target into path and query; absolute-form targets
/// (`http://host/path`) are reduced to their path.
fn split_target(target: &str) -> Result<(&str, &str), HttpError> {
    let mut target = target;
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            target = rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    if !target.starts_with('/') {
        return Err(HttpError::BadRequest);
    }
    Ok(match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    })
}

/// Query pairs, `+` as space, percent-decoded. Non-UTF-8 is a 400.
fn query_pairs(query: &str) -> impl Iterator<Item = Result<(String, String), HttpError>> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        Ok((decode_query(k)?, decode_query(v)?))
    })
}

fn decode_query(s: &str) -> Result<String, HttpError> {
    let plus = s.replace('+', " ");
    decode(&plus)
}

fn decode(s: &str) -> Result<String, HttpError> {
    percent_decode(s.as_bytes())
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| HttpError::BadRequest)
}

fn subscribe(
    path_topic: Option<&str>,
    query: &str,
    header_id: Option<String>,
    limits: &Limits,
    token: &mut Option<String>,
) -> Result<Route, HttpError> {
    let mut topics: Vec<String> = Vec::new();
    let mut query_id = None;
    let mut add = |topic: String| -> Result<(), HttpError> {
        validate_topic(&topic).map_err(|_| HttpError::InvalidTopic)?;
        if !topics.contains(&topic) {
            if topics.len() == limits.max_topics {
                return Err(HttpError::TooManyTopics {
                    max: limits.max_topics,
                });
            }
            topics.push(topic);
        }
        Ok(())
    };
    if let Some(t) = path_topic {
        add(decode(t)?)?;
    }
    for pair in query_pairs(query) {
        let (k, v) = pair?;
        match k.as_str() {
            "topic" => add(v)?,
            "lastEventId" | "last_event_id" if !v.is_empty() => query_id = Some(v),
            k if limits.token_param.as_deref() == Some(k) && !v.is_empty() => *token = Some(v),
            _ => {}
        }
    }
    if topics.is_empty() {
        return Err(HttpError::NoTopic);
    }
    Ok(Route::Subscribe {
        topics,
        last_event_id: header_id.or(query_id),
    })
}

fn publish(path_topic: Option<&str>, query: &str) -> Result<Route, HttpError> {
    let mut p = Publish {
        topic: match path_topic {
            Some(t) => decode(t)?,
            None => String::new(),
        },
        data: String::new(),
        event: None,
        id: None,
        retry: None,
    };
    for pair in query_pairs(query) {
        let (k, v) = pair?;
        match k.as_str() {
            "topic" if path_topic.is_none() => p.topic = v,
            "event" => p.event = (!v.is_empty()).then_some(v),
            "id" => p.id = (!v.is_empty()).then_some(v),
            "retry" => {
                p.retry = Some(
                    parse_length(&v)?
                        .try_into()
                        .map_err(|_| HttpError::BadRequest)?,
                );
            }
            _ => {}
        }
    }
    if p.topic.is_empty() {
        return Err(HttpError::NoTopic);
    }
    validate_topic(&p.topic).map_err(|_| HttpError::InvalidTopic)?;
    p.validate().map_err(|_| HttpError::BadRequest)?;
    Ok(Route::Publish {
        topic: p.topic,
        event: p.event,
        id: p.id,
        retry: p.retry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(topics: &[&str], id: Option<&str>) -> Route {
        Route::Subscribe {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            last_event_id: id.map(str::to_owned),
        }
    }

    fn route(head: &str) -> Result<Route, HttpError> {
        match parse_head(head.as_bytes(), &Limits::default())? {
            Parsed::Done(r) => Ok(r.route),
            Parsed::Partial => panic!("partial: {head:?}"),
        }
    }

    #[test]
    fn routes() {
        use HttpError::*;
        let max = MAX_TOPICS_DEFAULT;
        let many: String = (0..=max).map(|i| format!("topic=t{i}&")).collect();
        let exactly: String = (0..max)
            .map(|i| format!("topic=t{i}&topic=t{i}&"))
            .collect();
        let publish = |topic: &str, event: Option<&str>, id: Option<&str>, retry| Route::Publish {
            topic: topic.into(),
            event: event.map(Into::into),
            id: id.map(Into::into),
            retry,
        };
        let cases: Vec<(String, Result<Route, HttpError>)> = vec![
            ("GET /events/scores".into(), Ok(sub(&["scores"], None))),
            ("GET /events/a/b".into(), Ok(sub(&["a/b"], None))),
            ("GET /events/a%2Fb%40c".into(), Ok(sub(&["a/b@c"], None))),
            (
                "GET /events?topic=a&topic=b&topic=a".into(),
                Ok(sub(&["a", "b"], None)),
            ),
            (
                "GET /events/a?topic=b&x=1".into(),
                Ok(sub(&["a", "b"], None)),
            ),
            (
                "GET /events?topic=a&lastEventId=7".into(),
                Ok(sub(&["a"], Some("7"))),
            ),
            (
                "GET /events?topic=a&last_event_id=x+y%21".into(),
                Ok(sub(&["a"], Some("x y!"))),
            ),
            (
                format!("GET /events?{exactly}"),
                Ok(Route::Subscribe {
                    topics: (0..max).map(|i| format!("t{i}")).collect(),
                    last_event_id: None,
                }),
            ),
            (format!("GET /events?{many}"), Err(TooManyTopics { max })),
            ("GET /events".into(), Err(NoTopic)),
            ("GET /events/".into(), Err(InvalidTopic)),
            ("GET /events?topic=".into(), Err(InvalidTopic)),
            ("GET /events?topic=a+b".into(), Err(InvalidTopic)),
            ("GET /events/a%20b".into(), Err(InvalidTopic)),
            ("GET /events/%ff".into(), Err(BadRequest)),
            (
                format!("GET /events/{}", "a".repeat(201)),
                Err(InvalidTopic),
            ),
            ("POST /events/x".into(), Err(MethodNotAllowed)),
            ("HEAD /events/x".into(), Err(MethodNotAllowed)),
            (
                "POST /publish/scores".into(),
                Ok(publish("scores", None, None, None)),
            ),
            (
                "POST /publish/s?event=goal&id=42&retry=3000&other=1".into(),
                Ok(publish("s", Some("goal"), Some("42"), Some(3000))),
            ),
            (
                "POST /publish?topic=s&event=".into(),
                Ok(publish("s", None, None, None)),
            ),
            ("POST /publish/s?retry=-1".into(), Err(BadRequest)),
            ("POST /publish/s?retry=99999999999".into(), Err(BadRequest)),
            ("POST /publish/s?id=a%0Ab".into(), Err(BadRequest)),
            ("POST /publish/bad%20topic".into(), Err(InvalidTopic)),
            ("POST /publish".into(), Err(NoTopic)),
            ("GET /publish/x".into(), Err(MethodNotAllowed)),
            ("GET /healthz".into(), Ok(Route::Health)),
            ("HEAD /healthz?x=1".into(), Ok(Route::Health)),
            ("GET /metrics".into(), Ok(Route::Metrics)),
            ("GET /".into(), Ok(Route::Demo)),
            ("GET /index.html".into(), Ok(Route::Demo)),
            ("GET http://example.com/healthz".into(), Ok(Route::Health)),
            ("DELETE /healthz".into(), Err(MethodNotAllowed)),
            ("OPTIONS /events/x".into(), Ok(Route::Preflight)),
            ("OPTIONS /publish/x".into(), Ok(Route::Preflight)),
            ("OPTIONS /nope".into(), Err(NotFound)),
            ("GET /nope".into(), Err(NotFound)),
            ("GET /healthz/".into(), Err(NotFound)),
            ("GET *".into(), Err(BadRequest)),
        ];
        for (line, want) in cases {
            let head = format!("{line} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(route(&head), want, "{line}");
        }
    }

    #[test]
    fn header_handling() {
        /// (http10, keep_alive, origin, content_length, chunked, head_only)
        type Fields = (bool, bool, Option<&'static str>, usize, bool, bool);
        struct Case {
            head: &'static str,
            want: Result<Fields, HttpError>,
        }
        let cases = [
            Case { head: "GET /healthz HTTP/1.1\r\n\r\n", want: Ok((false, true, None, 0, false, false)) },
            Case { head: "GET /healthz HTTP/1.0\r\n\r\n", want: Ok((true, false, None, 0, false, false)) },
            Case {
                head: "GET /healthz HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
                want: Ok((true, true, None, 0, false, false)),
            },
            Case {
                head: "HEAD / HTTP/1.1\r\nConnection: foo, close\r\nOrigin: https://a.example\r\n\r\n",
                want: Ok((false, false, Some("https://a.example"), 0, false, true)),
            },
            Case {
                head: "POST /publish/t HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello",
                want: Ok((false, true, None, 5, false, false)),
            },
            Case {
                head: "POST /publish/t HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                want: Ok((false, true, None, 0, true, false)),
            },
            Case { head: "POST /publish/t HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n", want: Err(HttpError::BadFraming) },
            Case { head: "POST /publish/t HTTP/1.1\r\nContent-Length: +5\r\n\r\n", want: Err(HttpError::BadFraming) },
            Case { head: "POST /publish/t HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", want: Err(HttpError::BadFraming) },
            Case {
                head: "POST /publish/t HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                want: Err(HttpError::BadFraming),
            },
            Case {
                head: "POST /publish/t HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n",
                want: Err(HttpError::PayloadTooLarge),
            },
            Case {
                head: "POST /publish/t HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                want: Err(HttpError::BadFraming),
            },
            Case { head: "GET /healthz HTTP/2.0\r\n\r\n", want: Err(HttpError::VersionNotSupported) },
            Case { head: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", want: Err(HttpError::VersionNotSupported) },
            Case { head: "GET /healthz FOO\r\n\r\n", want: Err(HttpError::BadRequest) },
            Case { head: "GET /healthz HTTP/1.1\r\nBad Header: x\r\n\r\n", want: Err(HttpError::BadRequest) },
            Case { head: "\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03\r\n\r\n", want: Err(HttpError::BadRequest) },
        ];
        for case in cases {
            let got = parse_head(case.head.as_bytes(), &Limits::default()).map(|p| match p {
                Parsed::Done(r) => (
                    r.http10,
                    r.keep_alive,
                    r.origin,
                    r.content_length,
                    r.chunked_body,
                    r.head_only,
                ),
                Parsed::Partial => panic!("partial {:?}", case.head),
            });
            let want = case
                .want
                .map(|(a, b, o, l, c, h)| (a, b, o.map(str::to_owned), l, c, h));
            assert_eq!(got, want, "{:?}", case.head);
        }
    }

    #[test]
    fn last_event_id_header_wins() {
        let cases = [
            (
                "GET /events/a?lastEventId=q HTTP/1.1\r\nLast-Event-ID: h\r\n\r\n",
                Some("h"),
            ),
            (
                "GET /events/a?last_event_id=q HTTP/1.1\r\nlast-event-id:  \r\n\r\n",
                Some("q"),
            ),
            (
                "GET /events/a HTTP/1.1\r\nLast-Event-ID: 42\r\n\r\n",
                Some("42"),
            ),
            ("GET /events/a?lastEventId= HTTP/1.1\r\n\r\n", None),
        ];
        for (head, want) in cases {
            assert_eq!(route(head), Ok(sub(&["a"], want)), "{head:?}");
        }
    }

    #[test]
    fn partial_and_limits() {
        let limits = Limits {
            max_head: 64,
            max_topics: 2,
            max_body: 10,
            ..Limits::default()
        };
        let head = b"GET /events/a HTTP/1.1\r\nHost: x\r\n\r\nbody";
        let full = head.len() - 4;
        for cut in 0..full {
            assert_eq!(
                parse_head(&head[..cut], &limits),
                Ok(Parsed::Partial),
                "cut {cut}"
            );
        }
        match parse_head(head, &limits) {
            Ok(Parsed::Done(r)) => assert_eq!(r.head_len, full),
            other => panic!("{other:?}"),
        }
        let big = format!("GET /healthz HTTP/1.1\r\nX: {}\r\n", "y".repeat(60));
        assert_eq!(
            parse_head(big.as_bytes(), &limits),
            Err(HttpError::HeadersTooLarge)
        );
        let big_done = format!("GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(60));
        assert_eq!(
            parse_head(big_done.as_bytes(), &limits),
            Err(HttpError::HeadersTooLarge)
        );
        let many: String = (0..65).map(|i| format!("X{i}: v\r\n")).collect();
        let many = format!("GET /healthz HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse_head(many.as_bytes(), &Limits::default()),
            Err(HttpError::HeadersTooLarge)
        );
        assert_eq!(
            parse_head(
                b"GET /events?topic=a&topic=b&topic=c HTTP/1.1\r\n\r\n",
                &limits
            ),
            Err(HttpError::TooManyTopics { max: 2 })
        );
    }

    #[test]
    fn statuses() {
        let cases = [
            (HttpError::BadRequest, 400),
            (HttpError::BadFraming, 400),
            (HttpError::UnexpectedBody { method: "GET" }, 400),
            (HttpError::InvalidTopic, 400),
            (HttpError::NoTopic, 400),
            (HttpError::TooManyTopics { max: 1 }, 400),
            (HttpError::NotFound, 404),
            (HttpError::MethodNotAllowed, 405),
            (HttpError::PayloadTooLarge, 413),
            (HttpError::HeadersTooLarge, 431),
            (HttpError::VersionNotSupported, 505),
        ];
        for (err, status) in cases {
            assert_eq!(err.status(), status, "{err:?}");
        }
    }

    /// RFC 9112 §6 framing: anything that could make a body be read as a request is
    /// refused. Rows marked "httparse" pin what the crate refuses for us, so an
    /// upgrade that relaxes it fails here.
    #[test]
    fn framing() {
        use HttpError::*;
        let get = |m: &'static str| Err(UnexpectedBody { method: m });
        /// Ok((content_length, chunked)), or the refusal.
        type Want = Result<(usize, bool), HttpError>;
        let cases: Vec<(&str, Want)> = vec![
            ("GET /healthz HTTP/1.1\r\nContent-Length: 31\r\n\r\n", get("GET")),
            ("GET /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n", Ok((0, false))),
            ("HEAD /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\n", get("HEAD")),
            ("OPTIONS /events/x HTTP/1.1\r\nContent-Length: 5\r\n\r\n", get("OPTIONS")),
            ("DELETE /healthz HTTP/1.1\r\nContent-Length: 1\r\n\r\n", get("DELETE")),
            ("BREW /healthz HTTP/1.1\r\nContent-Length: 1\r\n\r\n", get("this")),
            ("GET /nope HTTP/1.1\r\nContent-Length: 5\r\n\r\n", get("GET")),
            ("GET /events/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", get("GET")),
            ("GET /healthz HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nContent-Length: 5\r\n\r\n", Ok((5, false))),
            ("POST /publish/t HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", Ok((5, false))),
            ("POST /publish/t HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nContent-Length: -5\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nContent-Length: 5x\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nContent-Length:\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nContent-Length: 5,\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nTransfer-Encoding: Chunked \r\n\r\n", Ok((0, true))),
            ("POST /publish/t HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nTransfer-Encoding: chunked;x=1\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n", Err(BadFraming)),
            ("POST /publish/t HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", Err(BadFraming)),
            // httparse: obs-fold, bare CR, whitespace before the colon.
            ("GET /healthz HTTP/1.1\r\nX: a\r\n b\r\n\r\n", Err(BadRequest)),
            ("GET /healthz HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n", Err(BadRequest)),
            ("GET /healthz HTTP/1.1\r\n Content-Length: 5\r\n\r\n", Err(BadRequest)),
            ("GET /healthz HTTP/1.1\r\nX: a\rContent-Length: 5\r\n\r\n", Err(BadRequest)),
            ("GET /healthz HTTP/1.1\r\nX: a\r\r\n\r\n", Err(BadRequest)),
            ("GET /healthz HTTP/1.1\rX: a\r\n\r\n", Err(BadRequest)),
            ("GET /healthz HTTP/1.1\r\nX: a\r\n\r\r\n", Err(BadRequest)),
            ("GET /heal\rthz HTTP/1.1\r\n\r\n", Err(BadRequest)),
            ("POST /publish/t HTTP/1.1\r\nContent-Length : 5\r\n\r\n", Err(BadRequest)),
            ("POST /publish/t HTTP/1.1\r\nTransfer-Encoding\t: chunked\r\n\r\n", Err(BadRequest)),
            ("GET /healthz HTTP/1.1\r\nX: a\0b\r\n\r\n", Err(BadRequest)),
            // A bare LF line end is allowed (RFC 9112 §2.2) and frames the same.
            ("GET /healthz HTTP/1.1\nHost: x\n\n", Ok((0, false))),
        ];
        for (head, want) in cases {
            let got = parse_head(head.as_bytes(), &Limits::default()).map(|p| match p {
                Parsed::Done(r) => (r.content_length, r.chunked_body),
                Parsed::Partial => panic!("partial {head:?}"),
            });
            assert_eq!(got, want, "{head:?}");
        }
    }

    /// Heads that parse, for the desync properties.
    const VALID_HEADS: &[&str] = &[
        "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
        "HEAD /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "GET /events?topic=a&topic=b HTTP/1.1\r\nLast-Event-ID: 3\r\n\r\n",
        "OPTIONS /events/a HTTP/1.1\r\nOrigin: https://a.example\r\n\r\n",
        "POST /publish/t?id=1 HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
        "POST /publish/t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET / HTTP/1.0\nConnection: keep-alive\n\n",
    ];

    /// Bytes an attacker would try: request-line pieces, framing headers, line ends.
    fn http_fragment() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let pieces: Vec<&'static [u8]> = vec![
            b"GET ",
            b"POST ",
            b"HEAD ",
            b"OPTIONS ",
            b"/healthz",
            b"/publish/t",
            b"/events/a",
            b" HTTP/1.1",
            b" HTTP/1.0",
            b"\r\n",
            b"\n",
            b"\r",
            b" ",
            b"\t",
            b":",
            b",",
            b"Content-Length: ",
            b"Transfer-Encoding: ",
            b"chunked",
            b"5",
            b"0",
            b"-1",
            b"Connection: close",
            b"\0",
            b"\xff",
            b"X",
        ];
        prop_oneof![
            proptest::sample::select(pieces).prop_map(<[u8]>::to_vec),
            any::<u8>().prop_map(|b| vec![b]),
        ]
    }

    /// A valid head built from random header lines (printable values, token names).
    fn random_head() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let method = proptest::sample::select(vec!["GET", "HEAD", "OPTIONS"]);
        let path = proptest::sample::select(vec!["/healthz", "/metrics", "/", "/events/a"]);
        let header = ("X-[A-Za-z0-9-]{0,12}", "[ -~]{0,24}");
        (method, path, proptest::collection::vec(header, 0..6)).prop_map(|(m, p, hs)| {
            let p = if m != "GET" && p == "/events/a" {
                "/healthz"
            } else {
                p
            };
            let mut head = format!("{m} {p} HTTP/1.1\r\n");
            for (n, v) in hs {
                head.push_str(&format!("{n}: {}\r\n", v.trim()));
            }
            head.push_str("\r\n");
            head
        })
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_head(&bytes, &Limits::default());
        }

        /// Near-miss requests never panic, never claim more bytes than given, and only
        /// a publish (the one route with a body) is accepted with a body.
        #[test]
        fn near_misses_never_desync(pieces in proptest::collection::vec(http_fragment(), 0..40)) {
            let bytes = pieces.concat();
            if let Ok(Parsed::Done(r)) = parse_head(&bytes, &Limits::default()) {
                proptest::prop_assert!(r.head_len <= bytes.len());
                if !matches!(r.route, Route::Publish { .. }) {
                    proptest::prop_assert_eq!((r.content_length, r.chunked_body), (0, false));
                }
            }
        }

        /// Whatever follows a head (a body, a smuggled request, garbage) does not
        /// change how the head parses, and is never consumed.
        #[test]
        fn bytes_after_a_head_are_not_consumed(
            which in 0..VALID_HEADS.len(),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
        ) {
            let head = VALID_HEADS[which].as_bytes();
            let alone = parse_head(head, &Limits::default());
            let mut buf = head.to_vec();
            buf.extend_from_slice(&tail);
            let with_tail = parse_head(&buf, &Limits::default());
            proptest::prop_assert!(
                matches!(&alone, Ok(Parsed::Done(r)) if r.head_len == head.len()),
                "{:?}", alone
            );
            proptest::prop_assert_eq!(with_tail, alone);
        }

        /// Split at every byte boundary: each prefix is `Partial`, the whole is the
        /// same `Done` as parsed in one go.
        #[test]
        fn every_prefix_is_partial_then_the_same_done(head in random_head()) {
            let head = head.as_bytes();
            let whole = parse_head(head, &Limits::default());
            proptest::prop_assert!(matches!(&whole, Ok(Parsed::Done(r)) if r.head_len == head.len()), "{:?}", whole);
            for cut in 0..head.len() {
                proptest::prop_assert_eq!(parse_head(&head[..cut], &Limits::default()), Ok(Parsed::Partial), "cut {}", cut);
            }
        }
    }

    #[test]
    fn valid_heads_split_anywhere() {
        for head in VALID_HEADS {
            let head = head.as_bytes();
            let whole = parse_head(head, &Limits::default());
            assert!(matches!(&whole, Ok(Parsed::Done(_))), "{whole:?}");
            for cut in 0..head.len() {
                assert_eq!(
                    parse_head(&head[..cut], &Limits::default()),
                    Ok(Parsed::Partial),
                    "cut {cut}"
                );
            }
        }
    }
}
