//! The access log (`--access-log`): one JSON object per line for every stream start, every
//! stream end and every other request. Workers never write it: each appends its lines to
//! its own buffer and hands the buffer over once per loop turn; a side thread writes. If
//! the writer falls behind by more than [`MAX_QUEUED`] bytes, lines are dropped and
//! counted rather than held without bound or waited for.
//!
//! Nothing here ever sees a token: lines are built from fields the worker chose (topics,
//! `sub`, the path without its query), never from raw request bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use crate::config::AccessLogTarget;

/// Most bytes handed over and not yet written.
pub const MAX_QUEUED: usize = 16 << 20;

pub struct AccessLog {
    tx: Mutex<Option<Sender<Vec<u8>>>>,
    queued: AtomicUsize,
    pub lines: AtomicU64,
    pub dropped: AtomicU64,
    pub write_errors: AtomicU64,
    reopen: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

enum Sink {
    Stderr,
    File(PathBuf, File),
}

fn open(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl AccessLog {
    /// Open the target (a file is created or appended to) and start the writer thread.
    pub fn start(target: &AccessLogTarget) -> io::Result<std::sync::Arc<AccessLog>> {
        let sink = match target {
            AccessLogTarget::Stderr => Sink::Stderr,
            AccessLogTarget::File(p) => Sink::File(p.clone(), open(p)?),
        };
        let (tx, rx) = channel::<Vec<u8>>();
        let log = std::sync::Arc::new(AccessLog {
            tx: Mutex::new(Some(tx)),
            queued: AtomicUsize::new(0),
            lines: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let me = log.clone();
        let t = std::thread::Builder::new()
            .name("herald-access-log".into())
            .spawn(move || me.write_loop(sink, rx))?;
        *log.thread.lock().expect("fresh mutex") = Some(t);
        Ok(log)
    }

    /// Hand over a worker's buffer of whole lines (`lines` of them). Never blocks on I/O.
    pub fn submit(&self, buf: Vec<u8>, lines: u64) {
        let len = buf.len();
        if self.queued.load(Ordering::Relaxed) + len > MAX_QUEUED {
            self.dropped.fetch_add(lines, Ordering::Relaxed);
            return;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        let sent = self
            .tx
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|tx| tx.send(buf).is_ok()))
            .unwrap_or(false);
        if sent {
            self.lines.fetch_add(lines, Ordering::Relaxed);
        } else {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.dropped.fetch_add(lines, Ordering::Relaxed);
        }
    }

    /// Reopen the file before the next write (SIGHUP, after a log rotation).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        // An empty buffer wakes the writer.
        if let Ok(g) = self.tx.lock() {
            if let Some(tx) = g.as_ref() {
                let _ = tx.send(Vec::new());
            }
        }
    }

    /// Write everything handed over so far, then stop the writer (at shutdown, after the
    /// workers are gone).
    pub fn finish(&self) {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut g| g.take()) {
            let _ = t.join();
        }
    }

    fn write_loop(&self, mut sink: Sink, rx: Receiver<Vec<u8>>) {
        while let Ok(first) = rx.recv() {
            if self.reopen.swap(false, Ordering::AcqRel) {
                if let Sink::File(path, f) = &mut sink {
                    match open(path) {
                        Ok(nf) => *f = nf,
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "access log reopen failed; writing to the old file")
                        }
                    }
                }
            }
            let mut batch = first;
            // Take whatever else is queued, so a burst is one write.
            while let Ok(more) = rx.try_recv() {
                batch.extend_from_slice(&more);
            }
            let len = batch.len();
            if len == 0 {
                continue;
            }
            let r = match &mut sink {
                Sink::Stderr => io::stderr().lock().write_all(&batch),
                Sink::File(_, f) => f.write_all(&batch),
            };
            if r.is_err() {
                self.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            self.queued.fetch_sub(len, Ordering::Relaxed);
        }
    }
}

/// One worker's pending lines.
#[derive(Default)]
pub struct LineBuf {
    pub buf: Vec<u8>,
    pub lines: u64,
}

impl LineBuf {
    /// Append `v` as one JSON line.
    pub fn push(&mut self, v: &serde_json::Value) {
        if serde_json::to_writer(&mut self.buf, v).is_ok() {
            self.buf.push(b'\n');
            self.lines += 1;
        }
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
