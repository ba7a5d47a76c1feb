//! A real `redis-server` for the cluster tests: started on a free loopback port in a
//! temporary directory with an fsync-always AOF (so what Redis acknowledged survives a stop,
//! even a `kill -9`), stopped with SIGTERM or SIGKILL and restarted on the same port and
//! directory, killed when dropped. Commands go over a raw RESP socket: no Redis client crate.
//!
//! redis-server comes from Debian's `redis-server` package, which
//! `scripts/install-test-deps.sh` installs; without it the tests fail (never pass silently).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long redis-server gets to answer PING after a start, or to exit after a signal.
const REDIS_WAIT: Duration = Duration::from_secs(20);

/// A reply in RESP2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The reply as text (simple or bulk string), if it is one.
    pub fn text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) => Some(s.clone()),
            Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).to_string()),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Resp::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// The redis-server binary, or a failure telling how to get it.
pub fn redis_server_bin() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("redis-server"));
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "redis-server not found (the cluster tests need a real one): \
         run scripts/install-test-deps.sh, which installs Debian's redis-server package"
    );
}

/// A redis-server child process with its own port and data directory.
pub struct Redis {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    /// How many times this server was started (1 after `start`).
    pub starts: usize,
    /// `--requirepass`, sent with AUTH before every command.
    pub password: Option<String>,
}

impl Redis {
    /// Start redis-server on a free port in a new temporary directory; returns once it
    /// answers PING.
    pub fn start() -> Redis {
        Redis::start_with(None)
    }

    /// Start redis-server that requires this password (`--requirepass`).
    pub fn start_with_password(pw: &str) -> Redis {
        Redis::start_with(Some(pw.to_string()))
    }

    fn start_with(password: Option<String>) -> Redis {
        let bin = redis_server_bin();
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "herald-test-redis-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("create the redis test directory");
        // A free port can be taken by someone else between our probe and redis' bind:
        // try a few.
        let mut last = String::new();
        for _ in 0..5 {
            let port = super::free_port();
            let mut r = Redis {
                port,
                dir: dir.clone(),
                child: None,
                starts: 0,
                password: password.clone(),
            };
            match r.spawn(&bin) {
                Ok(()) => return r,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn spawn(&mut self, bin: &Path) -> Result<(), String> {
        assert!(self.child.is_none(), "redis-server is already running");
        let log = self.dir.join("redis.log");
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(["--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .args(["--logfile", log.to_str().unwrap()])
            .args(
                self.password
                    .as_deref()
                    .map(|p| vec!["--requirepass", p])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + REDIS_WAIT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "redis-server exited with {status} on port {}; its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            // PONG only once the AOF is loaded (-LOADING before).
            if let Ok(Resp::Simple(s)) = self.try_cmd(&["PING"]) {
                if s == "PONG" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = self.child.as_mut().unwrap().kill();
                let _ = self.child.as_mut().unwrap().wait();
                self.child = None;
                return Err(format!(
                    "redis-server on port {} did not answer PING in {REDIS_WAIT:?}; its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `redis://127.0.0.1:PORT` (database 0).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// Stop with SIGTERM (Redis flushes its AOF and exits) and wait for the exit.
    pub fn stop(&mut self) {
        self.signal_and_wait("-TERM");
    }

    /// Stop with SIGKILL: a crash. The fsync-always AOF still holds every write Redis
    /// acknowledged.
    pub fn kill9(&mut self) {
        self.signal_and_wait("-KILL");
    }

    fn signal_and_wait(&mut self, sig: &str) {
        let mut child = self.child.take().expect("redis-server is running");
        let ok = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill {sig} redis-server");
        let deadline = Instant::now() + REDIS_WAIT;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server did not exit on {sig} in {REDIS_WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // The port is closed once the process is gone.
        assert!(
            TcpStream::connect(self.addr()).is_err(),
            "nothing listens on the redis port once it is stopped"
        );
    }

    /// Start again on the same port and directory (the AOF brings the data back); returns
    /// once it answers PING.
    pub fn restart(&mut self) {
        let bin = redis_server_bin();
        let deadline = Instant::now() + REDIS_WAIT;
        // The port was just released; a TIME_WAIT does not stop a listener (Redis sets
        // SO_REUSEADDR), but retry a little in case the bind races the old exit.
        loop {
            match self.spawn(&bin) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("redis-server restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    pub fn flushall(&self) {
        let r = self.cmd(&["FLUSHALL"]);
        assert_eq!(r, Resp::Simple("OK".into()), "FLUSHALL");
    }

    /// Run one command; panics if Redis is unreachable or answers an error.
    pub fn cmd(&self, args: &[&str]) -> Resp {
        match self.try_cmd(args) {
            Ok(Resp::Error(e)) => panic!("redis {args:?}: {e}"),
            Ok(r) => r,
            Err(e) => panic!("redis {args:?}: {e}"),
        }
    }

    /// Run one command on a fresh connection (database 0).
    pub fn try_cmd(&self, args: &[&str]) -> Result<Resp, String> {
        self.try_cmd_in(0, args)
    }

    /// Run one command in database `db`; panics on an error reply.
    pub fn cmd_in(&self, db: u32, args: &[&str]) -> Resp {
        match self.try_cmd_in(db, args) {
            Ok(Resp::Error(e)) => panic!("redis (db {db}) {args:?}: {e}"),
            Ok(r) => r,
            Err(e) => panic!("redis (db {db}) {args:?}: {e}"),
        }
    }

    /// Run one command on a fresh connection in database `db`, after AUTH when the server
    /// has a password.
    pub fn try_cmd_in(&self, db: u32, args: &[&str]) -> Result<Resp, String> {
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = BufReader::new(s.try_clone().map_err(|e| format!("clone: {e}"))?);
        let db = db.to_string();
        let mut pre: Vec<Vec<&str>> = Vec::new();
        if let Some(pw) = &self.password {
            pre.push(vec!["AUTH", pw]);
        }
        if db != "0" {
            pre.push(vec!["SELECT", &db]);
        }
        for p in pre {
            s.write_all(&encode(&p))
                .map_err(|e| format!("write: {e}"))?;
            match read_resp(&mut r)? {
                Resp::Simple(ok) if ok == "OK" => {}
                other => return Ok(other),
            }
        }
        s.write_all(&encode(args))
            .map_err(|e| format!("write: {e}"))?;
        read_resp(&mut r)
    }

    /// Stream length of `key` (XLEN).
    pub fn xlen(&self, key: &str) -> i64 {
        self.cmd(&["XLEN", key])
            .int()
            .expect("XLEN answers an integer")
    }

    /// The redis-server log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_line(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    let n = r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("connection closed".into());
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn read_resp(r: &mut impl BufRead) -> Result<Resp, String> {
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(1);
    let num = |s: &str| {
        s.parse::<i64>()
            .map_err(|_| format!("bad RESP line {line:?}"))
    };
    Ok(match kind {
        "+" => Resp::Simple(rest.to_string()),
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Int(num(rest)?),
        "$" => {
            let n = num(rest)?;
            if n < 0 {
                Resp::Bulk(None)
            } else {
                let mut b = vec![0u8; n as usize + 2];
                r.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
                b.truncate(n as usize);
                Resp::Bulk(Some(b))
            }
        }
        "*" => {
            let n = num(rest)?;
            if n < 0 {
                Resp::Array(None)
            } else {
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(read_resp(r)?);
                }
                Resp::Array(Some(items))
            }
        }
        _ => return Err(format!("bad RESP line {line:?}")),
    })
}
