//! HTTP/1.x heads in and out, sans-IO: `request` turns bytes into a typed
//! `Request` or a status; `response` builds the bytes to write back.
pub mod h2;
pub mod request;
pub mod response;
