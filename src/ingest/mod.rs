//! Ingest: NDJSON framing and parsing, and the thread that serves publishers.

pub mod listener;
pub mod ndjson;
