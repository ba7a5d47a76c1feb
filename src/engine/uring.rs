//! io_uring backend (placeholder while the driver is written).
#![allow(unsafe_code)]
use super::worker::Shared;
use std::io;
use std::net::TcpListener;
use std::sync::Arc;
pub fn run(id: usize, shared: Arc<Shared>, listener: TcpListener) -> io::Result<()> {
    super::epoll::run(id, shared, listener)
}
