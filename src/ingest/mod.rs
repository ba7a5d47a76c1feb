//! Ingest: NDJSON framing and parsing, and the loop (hosted by the first worker) that
//! serves publishers.

pub mod listener;
pub mod ndjson;
