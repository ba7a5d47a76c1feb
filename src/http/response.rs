//! Response heads and small complete responses as bytes, plus CORS policy.
//! Sans-IO. Invariant: every header block ends in exactly one blank line,
//! carries a correct `Content-Length` (or chunked framing, or none for 204),
//! and echoes an `Origin` only when it is configured.

use crate::http::request::HttpError;
use crate::sse::encode;

/// Which origins may read herald's responses from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// `*` was configured: any origin may read (never with credentials).
    any: bool,
    /// Explicitly listed origins, without trailing `/`.
    origins: Vec<String>,
    /// Send `Access-Control-Allow-Credentials: true` to listed origins.
    credentials: bool,
}

impl Default for Cors {
    fn default() -> Self {
        Cors::any()
    }
}

impl Cors {
    /// `Access-Control-Allow-Origin: *`, no credentials.
    pub fn any() -> Self {
        Cors {
            any: true,
            origins: Vec::new(),
            credentials: false,
        }
    }

    /// `"*"` in `origins` allows any origin; listed origins are echoed, with
    /// credentials if `allow_credentials`.
    pub fn new(origins: &[String], allow_credentials: bool) -> Self {
        let any = origins.iter().any(|o| o.trim() == "*");
        let origins = origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty() && o != "*")
            .collect();
        Cors {
            any,
            origins,
            credentials: allow_credentials,
        }
    }

    /// The `Access-Control-*` (and `Vary`) header lines for a request with
    /// this `Origin`, each ending in `\r\n`; possibly empty.
    pub fn headers(&self, origin: Option<&str>) -> String {
        let listed = origin.filter(|o| self.origins.iter().any(|l| l == o));
        let vary = if self.origins.is_empty() {
            ""
        } else {
            "Vary: Origin\r\n"
        };
        match listed {
            Some(o) => {
                let creds = if self.credentials {
                    "Access-Control-Allow-Credentials: true\r\n"
                } else {
                    ""
                };
                format!("Access-Control-Allow-Origin: {o}\r\n{vary}{creds}")
            }
            None if self.any => format!("Access-Control-Allow-Origin: *\r\n{vary}"),
            None => vary.to_owned(),
        }
    }
}

/// First comment of every stream, so proxies and clients see bytes at once.
const HELLO: &[u8] = b": herald\n\n";

/// Head of an SSE stream plus its first chunk (`: herald` and an optional
/// `retry:`), ready to write. HTTP/1.1 is chunked and kept alive; HTTP/1.0 is
/// close-delimited.
pub fn stream_head(http10: bool, cors: &str, retry_ms: Option<u32>) -> Vec<u8> {
    let mut head = String::with_capacity(256 + cors.len());
    head.push_str(
        "HTTP/1.1 200 OK\r\n\
         Content-Type: text/event-stream; charset=utf-8\r\n\
         Cache-Control: no-cache\r\n\
         X-Accel-Buffering: no\r\n",
    );
    if http10 {
        head.push_str("Connection: close\r\n");
    } else {
        head.push_str("Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n");
    }
    head.push_str(cors);
    head.push_str("\r\n");

    let mut first = HELLO.to_vec();
    if let Some(ms) = retry_ms {
        first.extend_from_slice(format!("retry: {ms}\n\n").as_bytes());
    }
    let mut out = head.into_bytes();
    if http10 {
        out.extend_from_slice(&first);
    } else {
        out.extend_from_slice(encode::chunk(&first).chunked());
    }
    out
}

/// A complete response with a body. `extra_headers` are whole lines (each
/// ending `\r\n`); an empty `content_type` sends none. 1xx/204/304 get neither
/// `Content-Length` nor body.
pub fn simple(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra_headers: &str,
    keep_alive: bool,
    head_only: bool,
) -> Vec<u8> {
    let bodiless = status < 200 || status == 204 || status == 304;
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if !content_type.is_empty() && !bodiless {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if !bodiless {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n"
    } else {
        "Connection: close\r\n"
    });
    head.push_str(extra_headers);
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if !head_only && !bodiless {
        out.extend_from_slice(body);
    }
    out
}

/// The response for a refused request: plain-text message, `Connection: close`,
/// and an `Allow` header for 405.
pub fn error(err: &HttpError) -> Vec<u8> {
    let status = err.status();
    let extra = if status == 405 {
        "Allow: GET, HEAD, POST, OPTIONS\r\n"
    } else {
        ""
    };
    let body = format!("{err}\n");
    simple(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        extra,
        false,
        false,
    )
}

/// 204 for a closed topic: tells `EventSource` to stop reconnecting. No
/// `Connection` header: the connection follows the request's keep-alive.
pub fn no_content(cors: &str) -> Vec<u8> {
    format!("HTTP/1.1 204 No Content\r\n{cors}\r\n").into_bytes()
}

/// 503 over the connection limit, with `Retry-After` in seconds.
pub fn unavailable(retry_after_s: u32) -> Vec<u8> {
    let extra = format!("Retry-After: {retry_after_s}\r\n");
    simple(
        503,
        "text/plain; charset=utf-8",
        b"service unavailable\n",
        &extra,
        false,
        false,
    )
}

/// 204 answer to a CORS preflight. No `Connection` header: the connection
/// follows the request's keep-alive.
pub fn preflight(cors: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 204 No Content\r\n{cors}\
         Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n\
         Access-Control-Allow-Headers: Last-Event-ID, Cache-Control, Content-Type, Authorization\r\n\
         Access-Control-Max-Age: 86400\r\n\r\n"
    )
    .into_bytes()
}

/// `200 {"id":"..."}` for an HTTP publish.
pub fn publish_ok(id: &str, extra_headers: &str, keep_alive: bool) -> Vec<u8> {
    let mut body = serde_json::json!({ "id": id }).to_string();
    body.push('\n');
    simple(
        200,
        "application/json",
        body.as_bytes(),
        extra_headers,
        keep_alive,
        false,
    )
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: Vec<u8>) -> String {
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn cors_modes() {
        let listed = |creds| {
            Cors::new(
                &["https://a.example/".into(), "https://b.example".into()],
                creds,
            )
        };
        let a = Some("https://a.example");
        let evil = Some("https://evil.example");
        let cases: Vec<(Cors, Option<&str>, &str)> = vec![
            (Cors::any(), None, "Access-Control-Allow-Origin: *\r\n"),
            (Cors::any(), evil, "Access-Control-Allow-Origin: *\r\n"),
            (
                Cors::new(&["*".into()], true),
                a,
                "Access-Control-Allow-Origin: *\r\n",
            ),
            (
                listed(false),
                a,
                "Access-Control-Allow-Origin: https://a.example\r\nVary: Origin\r\n",
            ),
            (
                listed(true),
                a,
                "Access-Control-Allow-Origin: https://a.example\r\nVary: Origin\r\n\
                 Access-Control-Allow-Credentials: true\r\n",
            ),
            (listed(true), evil, "Vary: Origin\r\n"),
            (listed(true), None, "Vary: Origin\r\n"),
            (
                Cors::new(&["*".into(), "https://a.example".into()], true),
                evil,
                "Access-Control-Allow-Origin: *\r\nVary: Origin\r\n",
            ),
            (
                Cors::new(&["*".into(), "https://a.example".into()], true),
                a,
                "Access-Control-Allow-Origin: https://a.example\r\nVary: Origin\r\n\
                 Access-Control-Allow-Credentials: true\r\n",
            ),
        ];
        for (cors, origin, want) in cases {
            assert_eq!(cors.headers(origin), want, "{cors:?} {origin:?}");
        }
    }

    #[test]
    fn stream_heads() {
        let cors = "Access-Control-Allow-Origin: *\r\n";
        let common = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\
                      Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n";
        let cases = [
            (
                false,
                None,
                format!("{common}Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n{cors}\r\na\r\n: herald\n\n\r\n"),
            ),
            (
                false,
                Some(2000),
                format!(
                    "{common}Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n{cors}\r\n\
                     17\r\n: herald\n\nretry: 2000\n\n\r\n"
                ),
            ),
            (true, None, format!("{common}Connection: close\r\n{cors}\r\n: herald\n\n")),
            (true, Some(5), format!("{common}Connection: close\r\n{cors}\r\n: herald\n\nretry: 5\n\n")),
        ];
        for (http10, retry, want) in cases {
            assert_eq!(s(stream_head(http10, cors, retry)), want);
        }
    }

    #[test]
    fn complete_responses() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                simple(200, "text/plain", b"ok\n", "", true, false),
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n",
            ),
            (
                simple(200, "text/plain", b"ok\n", "X: y\r\n", false, true),
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\nX: y\r\n\r\n",
            ),
            (simple(204, "text/plain", b"x", "", true, false), "HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"),
            (
                error(&HttpError::MethodNotAllowed),
                "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: 19\r\nConnection: close\r\nAllow: GET, HEAD, POST, OPTIONS\r\n\r\n\
                 method not allowed\n",
            ),
            (
                error(&HttpError::HeadersTooLarge),
                "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: 32\r\nConnection: close\r\n\r\nrequest header fields too large\n",
            ),
            (
                no_content("Access-Control-Allow-Origin: *\r\n"),
                "HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: *\r\n\r\n",
            ),
            (
                unavailable(1),
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: 20\r\nConnection: close\r\nRetry-After: 1\r\n\r\nservice unavailable\n",
            ),
            (
                preflight(""),
                "HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Methods: GET, POST, OPTIONS\r\n\
                 Access-Control-Allow-Headers: Last-Event-ID, Cache-Control, Content-Type, Authorization\r\n\
                 Access-Control-Max-Age: 86400\r\n\r\n",
            ),
            (
                publish_ok("4\"2", "", true),
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\
                 Connection: keep-alive\r\n\r\n{\"id\":\"4\\\"2\"}\n",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(s(got), want);
        }
    }

    #[test]
    fn every_error_is_well_formed() {
        let errors = [
            HttpError::BadRequest,
            HttpError::BadFraming,
            HttpError::UnexpectedBody { method: "GET" },
            HttpError::InvalidTopic,
            HttpError::NoTopic,
            HttpError::TooManyTopics { max: 32 },
            HttpError::NotFound,
            HttpError::MethodNotAllowed,
            HttpError::HeadersTooLarge,
            HttpError::PayloadTooLarge,
            HttpError::VersionNotSupported,
        ];
        for err in errors {
            let text = s(error(&err));
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                head.starts_with(&format!("HTTP/1.1 {} ", err.status())),
                "{head}"
            );
            assert_ne!(reason(err.status()), "Unknown");
            assert!(
                head.contains(&format!("Content-Length: {}\r\n", body.len())),
                "{head}"
            );
            assert_eq!(body, format!("{err}\n"));
        }
    }
}
