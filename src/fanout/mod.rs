//! Fan-out: the hub that turns one publish into one encoded event handed to every worker,
//! and the per-topic history used for `Last-Event-ID` resume.

pub mod bus;
pub mod table;
pub mod topic;
