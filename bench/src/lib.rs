//! Capacity-benchmark tooling for herald: the `herald-bench` load generator (parent and
//! child processes), sans-IO SSE stream decoding and /proc sampling. The comparison
//! servers (`axum-sse`, `uring-floor`) are self-contained binaries in `src/bin/`.
//! Invariant kept by the load generator: nothing on the per-event path allocates.

pub mod loadgen;
pub mod procfs;
pub mod sse;
