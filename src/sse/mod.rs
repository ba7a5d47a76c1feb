//! Server-Sent Events: publish-time validation (`event`) and the one-shot wire
//! encoding (`encode`). Invariant: an event's bytes are produced once and shared.
pub mod encode;
pub mod event;
