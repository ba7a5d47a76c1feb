//! Capacity-benchmark tooling for herald: the `herald-bench` load generator (parent and
//! child processes), sans-IO SSE stream decoding and /proc sampling. The comparison
//! servers (`axum-sse`, `uring-floor`, `blocking-floor`) are binaries in `src/bin/`; the
//! two floors share [`floor_frame`].
//! Invariant kept by the load generator: nothing on the per-event path allocates.

pub mod loadgen;
pub mod procfs;
pub mod sse;

/// The floors' event frame, into `out` (cleared first): one HTTP/1.1 chunk holding
/// `id: k\ndata: ..\n\n`, the data split on newlines into `data:` lines.
pub fn floor_frame(out: &mut Vec<u8>, id: u64, data: &str) {
    use std::io::Write;
    let mut body = format!("id: {id}\n");
    for line in data.split('\n') {
        body.push_str("data: ");
        body.push_str(line);
        body.push('\n');
    }
    body.push('\n');
    out.clear();
    let _ = write!(out, "{:x}\r\n", body.len());
    out.extend_from_slice(body.as_bytes());
    out.extend_from_slice(b"\r\n");
}
