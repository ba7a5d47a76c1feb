//! Scale-out on Redis Streams (`--cluster redis://HOST:PORT[/DB]`).
//!
//! Every node appends what it is given to publish (ingest lines, `POST /publish`, `close`
//! and `disconnect` controls) to one Redis Stream, `{prefix}:events`, through a small Lua
//! script that also keeps the data's epoch in `{prefix}:epoch` (created when missing, so a
//! Redis that lost its data starts a new epoch). A publish is answered only once Redis has
//! accepted it. Each node runs one reader thread that `XREAD`s the stream from its last id
//! and feeds the local hub exactly as ingest does without a cluster, so every node
//! delivers every event in one order with one id: `{ms}-{n}-{epoch}`, the entry's stream
//! id plus the epoch. Fan-out stays local; workers never talk to Redis.
//!
//! What can go wrong, and what a client sees:
//! - Redis unreachable: publishers get an error (the ingest error line, HTTP 503), open
//!   streams stay open with their keep-alives, the reader reconnects with backoff and
//!   jitter and resumes from its last id, so nothing Redis kept is lost.
//! - Redis lost data the node had not read (a new epoch after a restart without
//!   persistence, a failover, `FLUSHALL`; or entries trimmed before the node read them):
//!   every open stream gets a live `herald-gap` event, and a resume from before it gets a
//!   `herald-gap` too. Never a silent gap.
//!
//! At start a node reads everything the stream retains into its local history before it
//! serves, so a client may resume on any node, a freshly started one included.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::{RedisResult, Value};

use crate::auth::Revoke;
use crate::core::Shared;
use crate::fanout::bus::BusMsg;
use crate::fanout::bus::{gap_frame, ReplayBatch, REPLAY_BATCH_BYTES, REPLAY_BATCH_EVENTS};
use crate::fanout::table::{EventId, TopicName};
use crate::fanout::topic::{cluster_entry, Event};
use crate::sse::encode::encode_event;
use crate::sse::event::{Publish, PublishError};

/// Entries one `XREAD` takes.
const READ_COUNT: usize = 1024;
/// How long one `XREAD` blocks; an idle reader checks the epoch this often.
const BLOCK_MS: u64 = 500;
/// How long the reader waits for a reply (a blocked `XREAD` answers within BLOCK_MS).
const READ_TIMEOUT: Duration = Duration::from_millis(BLOCK_MS + 2000);
/// How long a connect may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a publisher waits for Redis's answer before the publish fails.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect backoff bounds (jittered).
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Entries one run of the publish script appends, at most (a run blocks Redis while it
/// lasts) ...
const ENTRIES_PER_RUN: usize = 256;
/// ... and bytes of event data in one run, about.
const BYTES_PER_RUN: usize = 1 << 20;
/// HTTP publishes taken into one pipeline, at most.
const HTTP_BATCH: usize = 256;

/// The publish script: keep (or make) the epoch, append a batch of entries, trim; one
/// script run (atomic, one Lua call) per batch, not per event. `KEYS`: stream, epoch key.
/// `ARGV`: approximate max length, minimum age to keep in ms (0: none), then per entry
/// its count of field/value strings and those strings. Returns the epoch, then each
/// entry's id.
const PUBLISH_LUA: &str = r#"
local e = redis.call('GET', KEYS[2])
if not e then
  local t = redis.call('TIME')
  local n = (tonumber(t[1]) * 1000000 + tonumber(t[2])) % 2176782336
  local digits = '0123456789abcdefghijklmnopqrstuvwxyz'
  e = ''
  for _ = 1, 6 do
    local d = n % 36
    e = string.sub(digits, d + 1, d + 1) .. e
    n = math.floor(n / 36)
  end
  redis.call('SET', KEYS[2], e)
end
local out = {e}
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  out[#out + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', e,
    unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
local age = tonumber(ARGV[2])
if age > 0 then
  local t = redis.call('TIME')
  local min = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - age
  if min > 0 then
    redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%d', min))
  end
end
return out
"#;

/// `--cluster` and its companions, validated.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://[:password@]HOST:PORT[/DB]`; never logged as given (it may hold the
    /// password).
    pub url: String,
    pub prefix: String,
    pub password_file: Option<PathBuf>,
    /// Approximate most entries the stream keeps (`XADD MAXLEN ~`).
    pub max_len: usize,
}

/// What the cluster counts (for `/metrics` and `/healthz`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// The reader's link to Redis is up.
    pub link_up: AtomicBool,
    /// Wall time between the last entry read and its being read, in ms (0 when idle).
    pub lag_ms: AtomicU64,
    pub reconnects: AtomicU64,
    /// Live gap signals: Redis lost entries this node had not read.
    pub gaps: AtomicU64,
    /// Publishes refused because Redis did not accept them.
    pub publish_errors: AtomicU64,
    /// Publishes Redis accepted from this node.
    pub publishes: AtomicU64,
    /// Entries the reader took from the stream.
    pub events_read: AtomicU64,
}

/// One thing to publish through Redis.
#[derive(Debug, Clone)]
pub enum Item {
    Publish(Publish),
    Close(String),
    Revoke(Revoke),
}

/// Why a publish was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PubError {
    #[error(transparent)]
    Invalid(#[from] PublishError),
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
}

/// A `POST /publish` handed over by a worker; its answer goes back to the worker's inbox.
pub struct Job {
    pub worker: usize,
    pub conn: u32,
    pub gen: u32,
    pub keep: bool,
    /// The CORS headers of the answer.
    pub cors: String,
    pub publish: Publish,
}

/// The answer to a `POST /publish` a worker handed over, sent back to its inbox.
#[derive(Debug)]
pub struct Answer {
    pub conn: u32,
    /// The connection's generation when it asked (a closed-and-reused slot ignores it).
    pub gen: u32,
    pub keep: bool,
    /// Redis accepted the event.
    pub ok: bool,
    /// The whole HTTP response.
    pub response: Vec<u8>,
}

impl Answer {
    fn for_publish(
        conn: u32,
        gen: u32,
        keep: bool,
        cors: &str,
        r: Result<EventId, PubError>,
    ) -> Answer {
        use crate::http::response::simple;
        let json = "application/json";
        let (ok, response) = match r {
            Ok(id) => {
                let body = format!("{}\n", serde_json::json!({ "id": &*id }));
                (true, simple(200, json, body.as_bytes(), cors, keep, false))
            }
            Err(PubError::Invalid(e @ PublishError::TooManyTopics { .. })) => {
                let body = format!("{}\n", serde_json::json!({ "error": e.to_string() }));
                let extra = format!("Retry-After: 60\r\n{cors}");
                (
                    false,
                    simple(503, json, body.as_bytes(), &extra, keep, false),
                )
            }
            Err(PubError::Invalid(e)) => {
                let body = format!("{}\n", serde_json::json!({ "error": e.to_string() }));
                (false, simple(400, json, body.as_bytes(), cors, keep, false))
            }
            Err(e @ PubError::Unavailable(_)) => {
                let body = format!("{}\n", serde_json::json!({ "error": e.to_string() }));
                let extra = format!("Retry-After: 1\r\n{cors}");
                (
                    false,
                    simple(503, json, body.as_bytes(), &extra, keep, false),
                )
            }
        };
        Answer {
            conn,
            gen,
            keep,
            ok,
            response,
        }
    }
}

/// A worker's request for the next batch of a replay from Redis (its history lost part
/// of the range the client asked for).
pub struct Fetch {
    pub worker: usize,
    pub conn: u32,
    pub gen: u32,
    pub topics: Vec<TopicName>,
    /// Everything with `after < seq <= upto` is still to come.
    pub after: u64,
    pub upto: u64,
    /// The last id the client has (for a gap signal).
    pub last_id: EventId,
    /// The first batch: check first whether Redis lost any of the range.
    pub first: bool,
}

/// One batch fetched for a [`Fetch`], back in the worker's inbox.
#[derive(Debug)]
pub struct Fetched {
    pub conn: u32,
    pub gen: u32,
    pub batch: crate::fanout::bus::ReplayBatch,
    /// Where the next batch starts (the last entry looked at).
    pub after: u64,
    pub last_id: EventId,
}

/// A connection to Redis with its reconnect backoff.
struct Link {
    con: Option<redis::Connection>,
    /// No new attempt before this (after a failure).
    retry_at: Instant,
    backoff: Duration,
    /// The publish script is known to this connection's server.
    loaded: bool,
    /// The reader's session count when this connection was made (see
    /// [`Cluster::connected`]).
    session: u64,
    timeout: Option<Duration>,
    rng: u64,
}

impl Link {
    fn new(timeout: Option<Duration>) -> Link {
        Link {
            con: None,
            retry_at: Instant::now(),
            backoff: BACKOFF_MIN,
            loaded: false,
            session: 0,
            timeout,
            rng: seed(),
        }
    }

    /// The connection, made if there is none and the backoff allows.
    fn get(&mut self, client: &redis::Client) -> Result<&mut redis::Connection, String> {
        if self.con.is_none() {
            let now = Instant::now();
            if now < self.retry_at {
                return Err("redis unreachable (retrying)".into());
            }
            match connect(client, self.timeout) {
                Ok(c) => {
                    self.con = Some(c);
                    self.backoff = BACKOFF_MIN;
                    self.loaded = false;
                }
                Err(e) => {
                    self.failed();
                    return Err(e);
                }
            }
        }
        Ok(self.con.as_mut().expect("just made"))
    }

    /// Drop the connection; the next attempt waits a jittered backoff.
    fn failed(&mut self) {
        self.con = None;
        let wait = jitter(&mut self.rng, self.backoff);
        self.retry_at = Instant::now() + wait;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }
}

fn connect(client: &redis::Client, timeout: Option<Duration>) -> Result<redis::Connection, String> {
    let con = client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(|e| describe(&e))?;
    con.set_read_timeout(timeout).map_err(|e| describe(&e))?;
    con.set_write_timeout(timeout.or(Some(PUBLISH_TIMEOUT)))
        .map_err(|e| describe(&e))?;
    Ok(con)
}

/// A Redis error for a log line or an error reply: its kind and detail, never the URL.
fn describe(e: &redis::RedisError) -> String {
    if e.is_connection_refusal() {
        "connection refused".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else if e.is_connection_dropped() {
        "connection lost".into()
    } else {
        e.to_string()
    }
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ (std::process::id() as u64).rotate_left(32)) | 1
}

/// `base` scaled by a random factor in [0.5, 1.5) (xorshift; no shared RNG needed).
fn jitter(rng: &mut u64, base: Duration) -> Duration {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let f = 0.5 + (*rng % 1000) as f64 / 1000.0;
    base.mul_f64(f)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A stream entry id `ms-n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StreamId {
    pub ms: u64,
    pub n: u64,
}

impl StreamId {
    pub fn parse(s: &str) -> Option<StreamId> {
        let (ms, n) = s.split_once('-')?;
        Some(StreamId {
            ms: ms.parse().ok()?,
            n: n.parse().ok()?,
        })
    }

    /// The hub sequence of this entry: ordered like the ids (see
    /// [`crate::fanout::topic::position_of`]).
    pub fn seq(self) -> u64 {
        crate::fanout::topic::cluster_seq(self.ms, self.n)
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.n)
    }
}

/// What [`Cluster::catch_up`] hands to the reader thread: its position and connection.
pub struct ReaderStart {
    pos: ReaderPos,
    link: Link,
}

/// `XINFO STREAM`'s figures that tell whether entries were removed before a node read
/// them.
#[derive(Debug, Default, Clone, Copy)]
struct StreamInfo {
    length: u64,
    /// Entries ever added (`entries-added`).
    added: u64,
    first: Option<StreamId>,
    last_generated: StreamId,
    /// The highest id removed by `XDEL` (trimming does not move it).
    max_deleted: StreamId,
}

impl StreamInfo {
    /// Entries removed so far (trimming removes the oldest).
    fn removed(&self) -> u64 {
        self.added.saturating_sub(self.length)
    }

    /// Anything at or below this may have been removed (None: nothing ever was).
    fn lost_before(&self) -> Option<StreamId> {
        if self.removed() == 0 && self.max_deleted == StreamId::default() {
            return None;
        }
        Some(match self.first {
            Some(f) if f.n > 0 => StreamId {
                ms: f.ms,
                n: f.n - 1,
            },
            Some(f) => StreamId {
                ms: f.ms.saturating_sub(1),
                n: u64::MAX >> 1,
            },
            None => self.last_generated,
        })
    }

    /// Whether an entry after `id` was removed, as far as ids alone tell: deleted after
    /// it, or trimmed up to past it (which may also be a false alarm when `id` itself was
    /// the last one trimmed: a gap signal too many, never one too few).
    fn lost_after_id(&self, id: StreamId) -> bool {
        self.max_deleted > id
            || match self.first {
                Some(f) => f > id && self.removed() > 0,
                None => self.last_generated > id && self.removed() > 0,
            }
    }

    /// Whether the reader at `pos` lost an entry: its count of entries accounted for
    /// (read or removed before it started) says exactly when trimming took unread ones.
    fn lost_after(&self, pos: &ReaderPos) -> bool {
        if self.max_deleted > pos.last {
            return true;
        }
        let trimmed_past = match self.first {
            Some(f) => f > pos.last,
            None => self.last_generated > pos.last,
        };
        if !trimmed_past || self.removed() == 0 {
            return false;
        }
        match pos.added {
            Some(accounted) => self.removed() > accounted,
            None => true,
        }
    }
}

/// Where the reader is: the last entry it took and the epoch that entry belonged to.
#[derive(Debug, Default, Clone)]
pub struct ReaderPos {
    /// Entries of the stream accounted for up to `last`: read, or removed before the
    /// reader started (None: not known, after an epoch change).
    pub added: Option<u64>,
    pub last: StreamId,
    /// None before the first entry (or after the epoch vanished, already signalled).
    pub epoch: Option<String>,
}

pub struct Cluster {
    client: redis::Client,
    stream: String,
    epoch_key: String,
    max_len: usize,
    /// `--history-age` in ms: entries older than that are trimmed (`MINID ~`).
    min_age_ms: u64,
    script: redis::Script,
    /// `host:port/db`, for logs.
    pub endpoint: String,
    pub stats: ClusterStats,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    fetches: Mutex<Option<mpsc::Sender<Fetch>>>,
    /// Times the reader has connected to Redis (its sessions).
    sessions: AtomicU64,
    /// Wall time (ms) when this node was set up: entries older than that are history.
    started_ms: u64,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Cluster {
    pub fn new(cfg: &ClusterConfig, history_age: Duration) -> Result<Cluster, String> {
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())
                .map_err(|e| format!("--cluster: {e}"))?;
        if let Some(path) = &cfg.password_file {
            let pw = std::fs::read_to_string(path)
                .map_err(|e| format!("--cluster-password-file {}: {e}", path.display()))?;
            let pw = pw.strip_suffix('\n').unwrap_or(&pw);
            let pw = pw.strip_suffix('\r').unwrap_or(pw);
            let redis_info = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(redis_info);
        }
        let endpoint = format!("{}/{}", info.addr(), info.redis_settings().db());
        let client = redis::Client::open(info).map_err(|e| format!("--cluster: {e}"))?;
        Ok(Cluster {
            client,
            stream: format!("{}:events", cfg.prefix),
            epoch_key: format!("{}:epoch", cfg.prefix),
            max_len: cfg.max_len,
            min_age_ms: history_age.as_millis() as u64,
            script: redis::Script::new(PUBLISH_LUA),
            endpoint,
            stats: ClusterStats::default(),
            jobs: Mutex::new(None),
            fetches: Mutex::new(None),
            sessions: AtomicU64::new(0),
            started_ms: now_ms(),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        })
    }

    pub fn link_up(&self) -> bool {
        self.stats.link_up.load(Ordering::Relaxed)
    }

    // ---- publishing ---------------------------------------------------------------

    /// Append `items` in order, in one round trip; each gets the id its event carries
    /// (the publisher's own, or the entry's `{ms}-{n}-{epoch}`), or why it was refused.
    fn publish_on(&self, link: &mut Link, items: &[Item]) -> Vec<Result<EventId, PubError>> {
        let mut out: Vec<Option<Result<EventId, PubError>>> = items
            .iter()
            .map(|it| match it {
                Item::Publish(p) => p.validate().err().map(|e| Err(e.into())),
                Item::Close(t) => crate::sse::event::validate_topic(t)
                    .err()
                    .map(|e| Err(e.into())),
                Item::Revoke(_) => None,
            })
            .collect();
        if out.iter().all(Option::is_some) {
            return out.into_iter().flatten().collect();
        }
        for attempt in 0..2 {
            if let Err(e) = self.connected(link) {
                return self.fail_rest(out, &e);
            }
            if !link.loaded {
                let con = link.con.as_mut().expect("connected above");
                if let Err(e) = self.script.prepare_invoke().load(con) {
                    let why = describe(&e);
                    link.failed();
                    return self.fail_rest(out, &why);
                }
                link.loaded = true;
            }
            // One script run per chunk of the batch, the chunks pipelined.
            let pending: Vec<usize> = (0..items.len()).filter(|&k| out[k].is_none()).collect();
            let chunks = chunked(&pending, items);
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for chunk in &chunks {
                self.append_cmd(&mut pipe, chunk.iter().map(|&k| &items[k]));
            }
            let con = link.con.as_mut().expect("connected above");
            let replies: Vec<RedisResult<Value>> = match pipe.query(con) {
                Ok(r) => r,
                Err(e) => {
                    // The outcome of what was sent is unknown: report it refused.
                    let why = describe(&e);
                    link.failed();
                    return self.fail_rest(out, &why);
                }
            };
            if attempt == 0
                && replies
                    .iter()
                    .any(|r| matches!(r, Err(e) if e.code() == Some("NOSCRIPT")))
            {
                // A Redis that restarted without our connection noticing (or a SCRIPT
                // FLUSH): nothing was appended by a NOSCRIPT reply; load and send again.
                link.loaded = false;
                continue;
            }
            for (chunk, reply) in chunks.iter().zip(replies) {
                let ids = reply.map(|v| accepted(&v, chunk.len()));
                for (j, &k) in chunk.iter().enumerate() {
                    out[k] = Some(match &ids {
                        Ok(Some((epoch, sids))) => {
                            self.stats.publishes.fetch_add(1, Ordering::Relaxed);
                            Ok(match &items[k] {
                                Item::Publish(Publish { id: Some(id), .. }) => EventId::new(id),
                                _ => EventId::new(format!("{}-{epoch}", sids[j])),
                            })
                        }
                        Ok(None) => {
                            self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                            Err(PubError::Unavailable("unexpected reply from redis".into()))
                        }
                        Err(e) => {
                            self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                            Err(PubError::Unavailable(describe(e)))
                        }
                    });
                }
            }
            break;
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(PubError::Unavailable("not sent".into()))))
            .collect()
    }

    /// A publisher's or fetcher's connection: while the reader's link is up, Redis is
    /// known to answer, so a backoff left from an outage is cut short.
    /// A connection made before the reader last lost Redis and found it again is to a
    /// server that may be gone (a restart): it is replaced before use, not failed on.
    fn connected<'l>(&self, link: &'l mut Link) -> Result<&'l mut redis::Connection, String> {
        let session = self.sessions.load(Ordering::Acquire);
        if link.con.is_some() && link.session < session {
            link.con = None;
            link.retry_at = Instant::now();
        }
        if link.con.is_none() && self.link_up() {
            link.retry_at = Instant::now();
        }
        if link.con.is_none() {
            link.get(&self.client)?;
            link.session = session;
        }
        link.get(&self.client)
    }

    fn fail_rest(
        &self,
        out: Vec<Option<Result<EventId, PubError>>>,
        why: &str,
    ) -> Vec<Result<EventId, PubError>> {
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                    Err(PubError::Unavailable(why.to_string()))
                })
            })
            .collect()
    }

    /// One script run appending `items` in order.
    fn append_cmd<'a>(&self, pipe: &mut redis::Pipeline, items: impl Iterator<Item = &'a Item>) {
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(self.script.get_hash())
            .arg(2)
            .arg(&self.stream)
            .arg(&self.epoch_key)
            .arg(self.max_len)
            .arg(self.min_age_ms);
        for it in items {
            match it {
                Item::Publish(p) => {
                    let n = 6 + 2
                        * (usize::from(p.event.is_some())
                            + usize::from(p.id.is_some())
                            + usize::from(p.retry.is_some()));
                    cmd.arg(n)
                        .arg("k")
                        .arg("p")
                        .arg("t")
                        .arg(&p.topic)
                        .arg("d")
                        .arg(&p.data);
                    if let Some(v) = &p.event {
                        cmd.arg("v").arg(v);
                    }
                    if let Some(i) = &p.id {
                        cmd.arg("i").arg(i);
                    }
                    if let Some(r) = p.retry {
                        cmd.arg("r").arg(r);
                    }
                }
                Item::Close(t) => {
                    cmd.arg(4).arg("k").arg("c").arg("t").arg(t);
                }
                Item::Revoke(Revoke::Sub(s)) => {
                    cmd.arg(4).arg("k").arg("s").arg("t").arg(&**s);
                }
                Item::Revoke(Revoke::Jti(j)) => {
                    cmd.arg(4).arg("k").arg("j").arg("t").arg(&**j);
                }
            }
        }
    }

    /// A publisher's own link (the ingest thread keeps one): waits at most
    /// [`PUBLISH_TIMEOUT`] for Redis.
    pub fn publisher(self: &Arc<Self>) -> Publisher {
        Publisher {
            cluster: self.clone(),
            link: Link::new(Some(PUBLISH_TIMEOUT)),
        }
    }

    /// Hand a worker's `POST /publish` to the publishing thread; false if it has stopped.
    pub fn submit(&self, job: Job) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Hand a replay batch request to the fetching thread; false if it has stopped.
    pub fn fetch(&self, f: Fetch) -> bool {
        let tx = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
        tx.as_ref().is_some_and(|tx| tx.send(f).is_ok())
    }

    /// The fetching thread: replays from Redis, batch by batch, as subscribers take them.
    fn fetch_loop(self: Arc<Self>, shared: Arc<Shared>, rx: mpsc::Receiver<Fetch>) {
        let mut link = Link::new(Some(PUBLISH_TIMEOUT));
        while let Ok(f) = rx.recv() {
            let epoch = shared.hub.epoch();
            let (batch, after, last_id) = match self.fetch_batch(&mut link, &f, epoch.as_deref()) {
                Ok(r) => r,
                Err(e) => {
                    // The range cannot be had: the client is told, then goes on live.
                    link.failed();
                    tracing::debug!(error = %describe(&e), "cluster: replay fetch failed");
                    let batch = ReplayBatch {
                        gap: Some(gap_frame(&f.last_id, None)),
                        events: Vec::new(),
                        done: true,
                    };
                    (batch, f.upto, f.last_id.clone())
                }
            };
            if batch.gap.is_some() {
                shared.hub.stats.gaps.fetch_add(1, Ordering::Relaxed);
            }
            shared
                .hub
                .stats
                .replayed_events
                .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
            let out = Fetched {
                conn: f.conn,
                gen: f.gen,
                batch,
                after,
                last_id,
            };
            shared.hub.deliver(f.worker, BusMsg::Replay(Box::new(out)));
        }
    }

    /// One batch of `f`'s range: the events of its topics in `(after, upto]`, at most a
    /// replay batch's worth, scanning at most a bounded number of entries per call.
    fn fetch_batch(
        &self,
        link: &mut Link,
        f: &Fetch,
        epoch: Option<&str>,
    ) -> RedisResult<(ReplayBatch, u64, EventId)> {
        let con = self
            .connected(link)
            .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
        let mut out = ReplayBatch::default();
        let mut last_id = f.last_id.clone();
        let (ms, n) = cluster_entry(f.after);
        let after_id = StreamId { ms, n };
        if f.first && self.info(con)?.lost_after_id(after_id) {
            out.gap = Some(gap_frame(&f.last_id, None));
        }
        let (ms, n) = cluster_entry(f.upto);
        let end = StreamId { ms, n }.to_string();
        let mut cursor = after_id;
        let mut bytes = 0;
        let mut scanned = 0;
        loop {
            let v: Value = redis::cmd("XRANGE")
                .arg(&self.stream)
                .arg(format!("({cursor}"))
                .arg(&end)
                .arg("COUNT")
                .arg(READ_COUNT)
                .query(con)?;
            let Value::Array(entries) = v else {
                out.done = true;
                break;
            };
            for e in &entries {
                let Some((sid, fields)) = entry(e) else {
                    continue;
                };
                cursor = sid;
                scanned += 1;
                if fields.get("e").map(String::as_str) != epoch {
                    // Not the data the client's position belongs to any more.
                    out.gap.get_or_insert_with(|| gap_frame(&last_id, None));
                    out.done = true;
                    return Ok((out, sid.seq(), last_id));
                }
                let Some(ev) = event_of(sid, &fields) else {
                    continue;
                };
                if !f.topics.contains(&ev.topic) {
                    continue;
                }
                bytes += ev.wire_len();
                last_id = ev.id.clone();
                out.events.push(ev);
                if out.events.len() >= REPLAY_BATCH_EVENTS || bytes >= REPLAY_BATCH_BYTES {
                    return Ok((out, sid.seq(), last_id));
                }
            }
            if entries.len() < READ_COUNT {
                out.done = true;
                break;
            }
            if scanned >= 64 * READ_COUNT {
                // Enough for one turn of this thread; the rest comes with the next ask.
                break;
            }
        }
        Ok((out, cursor.seq(), last_id))
    }

    // ---- reading ------------------------------------------------------------------

    /// Read everything the stream retains into the hub (before the workers start), so
    /// resumes work on this node at once. Returns where the reader goes on from.
    pub fn catch_up(&self, shared: &Shared) -> ReaderStart {
        let mut pos = ReaderPos::default();
        let mut link = Link::new(Some(READ_TIMEOUT));
        let con = match link.get(&self.client) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(redis = %self.endpoint, error = %e, "cluster: redis unreachable at start; serving without history, the reader keeps trying");
                return ReaderStart { pos, link };
            }
        };
        let t0 = Instant::now();
        let mut n = 0usize;
        match self.start_reading(con, shared, &mut pos, true) {
            Ok(()) => loop {
                match self.read_once(con, shared, &mut pos, None) {
                    Ok(k) => {
                        n += k;
                        if k < READ_COUNT {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %describe(&e), "cluster: catch-up read failed; the reader goes on from there");
                        break;
                    }
                }
            },
            Err(e) => {
                tracing::warn!(error = %describe(&e), "cluster: cannot inspect the stream at start")
            }
        }
        self.stats.link_up.store(true, Ordering::Relaxed);
        tracing::info!(
            redis = %self.endpoint,
            stream = %self.stream,
            entries = n,
            epoch = pos.epoch.as_deref().unwrap_or("none yet"),
            ms = t0.elapsed().as_millis() as u64,
            "cluster: history read from redis"
        );
        ReaderStart { pos, link }
    }

    /// On a (re)connection: notice an epoch change or entries trimmed past our position,
    /// and (at start) mark what Redis no longer retains as lost.
    fn start_reading(
        &self,
        con: &mut redis::Connection,
        shared: &Shared,
        pos: &mut ReaderPos,
        boot: bool,
    ) -> RedisResult<()> {
        let epoch: Option<String> = redis::cmd("GET").arg(&self.epoch_key).query(con)?;
        if boot {
            shared.hub.set_epoch(epoch.as_deref());
            pos.epoch = epoch;
        } else if pos.epoch.is_some() && epoch != pos.epoch {
            self.epoch_changed(shared, pos, epoch.as_deref());
            return Ok(());
        }
        let info = self.info(con)?;
        if boot {
            // Everything before the first entry retained may be lost; what is retained
            // is read from its start, each entry counted from there.
            pos.added = Some(info.removed());
            if let Some(upto) = info.lost_before() {
                shared.hub.mark_lost_upto(upto.seq());
            }
        } else if info.lost_after(pos) {
            self.gap(shared, pos, "trimmed");
            pos.added = Some(info.removed());
        }
        Ok(())
    }

    /// What `XINFO STREAM` says of the stream (all zero when there is none).
    fn info(&self, con: &mut redis::Connection) -> RedisResult<StreamInfo> {
        let exists: bool = redis::cmd("EXISTS").arg(&self.stream).query(con)?;
        if !exists {
            return Ok(StreamInfo::default());
        }
        let v: Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&self.stream)
            .query(con)?;
        let id = |name| field_of(&v, name).and_then(|v| StreamId::parse(&text(v)?));
        let num = |name| {
            field_of(&v, name).and_then(|v| match v {
                Value::Int(i) => u64::try_from(*i).ok(),
                other => text(other)?.parse().ok(),
            })
        };
        Ok(StreamInfo {
            length: num("length").unwrap_or(0),
            added: num("entries-added").unwrap_or(0),
            first: match field_of(&v, "first-entry") {
                Some(Value::Array(e)) => e.first().and_then(text).and_then(|t| StreamId::parse(&t)),
                _ => None,
            },
            last_generated: id("last-generated-id").unwrap_or_default(),
            max_deleted: id("max-deleted-entry-id").unwrap_or_default(),
        })
    }

    /// Redis lost data this node had not read (or cannot prove otherwise): every open
    /// stream is told, and a resume from before this point is told too.
    fn gap(&self, shared: &Shared, pos: &ReaderPos, reason: &str) {
        self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(reason, after = %pos.last, "cluster: redis lost entries this node had not read; streams get a herald-gap");
        shared.hub.live_gap(reason);
    }

    fn epoch_changed(&self, shared: &Shared, pos: &mut ReaderPos, now: Option<&str>) {
        tracing::warn!(
            was = pos.epoch.as_deref().unwrap_or("none"),
            now = now.unwrap_or("none yet"),
            "cluster: the redis data's epoch changed"
        );
        self.gap(shared, pos, "epoch");
        // Everything in the new epoch is new to us.
        pos.last = StreamId::default();
        pos.added = None;
        pos.epoch = now.map(str::to_string);
        shared.hub.set_epoch(now);
    }

    /// One `XREAD` (blocking `block` ms, or not at all) and the hub fed with what it
    /// returned. Returns how many entries were read.
    fn read_once(
        &self,
        con: &mut redis::Connection,
        shared: &Shared,
        pos: &mut ReaderPos,
        block: Option<u64>,
    ) -> RedisResult<usize> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(READ_COUNT);
        if let Some(ms) = block {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS")
            .arg(&self.stream)
            .arg(pos.last.to_string());
        let v: Value = cmd.query(con)?;
        let entries = match &v {
            Value::Array(streams) => streams
                .first()
                .and_then(|s| match s {
                    Value::Array(kv) => kv.get(1),
                    _ => None,
                })
                .and_then(|e| match e {
                    Value::Array(list) => Some(list.as_slice()),
                    _ => None,
                })
                .unwrap_or(&[]),
            Value::Map(m) => m
                .first()
                .and_then(|(_, e)| match e {
                    Value::Array(list) => Some(list.as_slice()),
                    _ => None,
                })
                .unwrap_or(&[]),
            _ => &[],
        };
        if entries.is_empty() {
            self.stats.lag_ms.store(0, Ordering::Relaxed);
            return Ok(0);
        }
        let n = entries.len();
        self.stats
            .events_read
            .fetch_add(n as u64, Ordering::Relaxed);
        let mut batch = shared.hub.batch();
        for e in entries {
            let Some((sid, fields)) = entry(e) else {
                continue;
            };
            let epoch = fields.get("e").cloned();
            if pos.epoch.is_some() && epoch != pos.epoch {
                // A new epoch under our feet (FLUSHALL, then a publish): what we skipped
                // of it is read again from its start.
                batch.flush();
                drop(batch);
                self.epoch_changed(shared, pos, epoch.as_deref());
                return Ok(n);
            }
            if pos.epoch.is_none() {
                shared.hub.set_epoch(epoch.as_deref());
            }
            pos.epoch = epoch;
            pos.last = sid;
            pos.added = pos.added.map(|a| a + 1);
            match fields.get("k").map(String::as_str) {
                Some("p") => {
                    let Some((p, id)) = publish_of(sid, &fields) else {
                        continue;
                    };
                    // Published before this node served anyone: history, not news (a
                    // node that started while Redis was down catches up with it later).
                    let past = sid.ms < self.started_ms;
                    if let Err(e) = batch.publish_at(sid.seq(), id, p, past) {
                        tracing::debug!(id = %sid, error = %e, "cluster: stream entry refused");
                    }
                }
                Some("c") => {
                    batch.flush();
                    if let Some(t) = fields.get("t") {
                        shared.hub.close_topic(t);
                    }
                }
                Some(k @ ("s" | "j")) => {
                    batch.flush();
                    let what = fields.get("t").map(|t| {
                        if k == "s" {
                            Revoke::Sub(t.as_str().into())
                        } else {
                            Revoke::Jti(t.as_str().into())
                        }
                    });
                    if let (Some(what), Some(auth)) = (what, shared.auth.as_deref()) {
                        if let Ok(at) = auth.revoke(&what) {
                            shared.hub.revoke(&what, at);
                        }
                    }
                }
                _ => tracing::debug!(id = %sid, "cluster: stream entry of no known kind skipped"),
            }
        }
        let lag = now_ms().saturating_sub(pos.last.ms);
        self.stats.lag_ms.store(lag, Ordering::Relaxed);
        Ok(n)
    }

    /// The reader thread's loop: connect, check, read until stopped; reconnect on error.
    fn read_loop(self: Arc<Self>, shared: Arc<Shared>, start: ReaderStart) {
        let ReaderStart { mut pos, mut link } = start;
        // The catch-up's connection is the first session; it needs no check.
        let mut sessions = u64::from(link.con.is_some());
        self.sessions.store(sessions, Ordering::Release);
        let mut fresh = link.con.is_some();
        while !self.stop.load(Ordering::Acquire) {
            let con = match link.get(&self.client) {
                Ok(c) => c,
                Err(_) => {
                    self.stats.link_up.store(false, Ordering::Relaxed);
                    let wait = link.retry_at.saturating_duration_since(Instant::now());
                    self.sleep(wait.max(Duration::from_millis(10)));
                    continue;
                }
            };
            if !std::mem::take(&mut fresh) {
                // A node that never read anything adopts what it finds, like at start.
                let boot = sessions == 0 && pos.epoch.is_none();
                if let Err(e) = self.start_reading(con, &shared, &mut pos, boot) {
                    tracing::debug!(error = %describe(&e), "cluster: redis check failed");
                    link.failed();
                    continue;
                }
                if sessions > 0 {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                sessions += 1;
                self.sessions.store(sessions, Ordering::Release);
                tracing::info!(redis = %self.endpoint, from = %pos.last, "cluster: reader connected");
            }
            self.stats.link_up.store(true, Ordering::Relaxed);
            loop {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                match self.read_once(con, &shared, &mut pos, Some(BLOCK_MS)) {
                    Ok(0) => {
                        // Idle: has the epoch vanished or changed (FLUSHALL, no publish
                        // since)?
                        let epoch: RedisResult<Option<String>> =
                            redis::cmd("GET").arg(&self.epoch_key).query(con);
                        match epoch {
                            Ok(e) if pos.epoch.is_some() && e != pos.epoch => {
                                self.epoch_changed(&shared, &mut pos, e.as_deref())
                            }
                            Ok(_) => {}
                            Err(e) => {
                                self.lost(&e);
                                break;
                            }
                        }
                    }
                    Ok(n) if n >= READ_COUNT => {
                        // Behind: make sure nothing was trimmed before we got to it.
                        match self.info(con) {
                            Ok(info) if info.lost_after(&pos) => {
                                self.gap(&shared, &pos, "trimmed");
                                pos.added = Some(info.removed());
                            }
                            Ok(_) => {}
                            Err(e) => {
                                self.lost(&e);
                                break;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.lost(&e);
                        break;
                    }
                }
            }
            link.failed();
        }
    }

    fn lost(&self, e: &redis::RedisError) {
        self.stats.link_up.store(false, Ordering::Relaxed);
        tracing::warn!(redis = %self.endpoint, error = %describe(e), "cluster: redis link lost; reconnecting");
    }

    /// Sleep up to `d`, waking early on stop.
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stop.load(Ordering::Acquire) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    /// The HTTP publishing thread: takes what workers hand over, in pipelines.
    fn http_loop(self: Arc<Self>, shared: Arc<Shared>, rx: mpsc::Receiver<Job>) {
        let mut publisher = self.publisher();
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while jobs.len() < HTTP_BATCH {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let items: Vec<Item> = jobs
                .iter()
                .map(|j| Item::Publish(j.publish.clone()))
                .collect();
            let results = publisher.publish(&items);
            for (job, r) in jobs.into_iter().zip(results) {
                let answer = Answer::for_publish(job.conn, job.gen, job.keep, &job.cors, r);
                shared
                    .hub
                    .deliver(job.worker, BusMsg::Answer(Box::new(answer)));
            }
        }
    }

    /// Start the reader and the HTTP publishing thread.
    pub fn spawn(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        start: ReaderStart,
    ) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel();
        *self.jobs.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let (me, sh) = (self.clone(), shared.clone());
        threads.push(
            std::thread::Builder::new()
                .name("herald-cluster-read".into())
                .spawn(move || me.read_loop(sh, start))?,
        );
        let (me, sh) = (self.clone(), shared.clone());
        threads.push(
            std::thread::Builder::new()
                .name("herald-cluster-pub".into())
                .spawn(move || me.http_loop(sh, rx))?,
        );
        let (ftx, frx) = mpsc::channel();
        *self.fetches.lock().unwrap_or_else(|p| p.into_inner()) = Some(ftx);
        let (me, sh) = (self.clone(), shared.clone());
        threads.push(
            std::thread::Builder::new()
                .name("herald-cluster-fetch".into())
                .spawn(move || me.fetch_loop(sh, frx))?,
        );
        Ok(())
    }

    /// Stop both threads (after the workers have drained).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.fetches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// A publishing thread's handle on the cluster: its own connection.
pub struct Publisher {
    cluster: Arc<Cluster>,
    link: Link,
}

impl Publisher {
    /// Publish `items` in order in one round trip (see [`Cluster::publish_on`]).
    pub fn publish(&mut self, items: &[Item]) -> Vec<Result<EventId, PubError>> {
        if items.is_empty() {
            return Vec::new();
        }
        self.cluster.publish_on(&mut self.link, items)
    }
}

/// The publish a stream entry carries, with its wire id.
fn publish_of(sid: StreamId, fields: &Fields) -> Option<(Publish, EventId)> {
    if fields.get("k").map(String::as_str) != Some("p") {
        return None;
    }
    let p = Publish {
        topic: fields.get("t").cloned().unwrap_or_default(),
        data: fields.get("d").cloned().unwrap_or_default(),
        event: fields.get("v").cloned(),
        id: fields.get("i").cloned(),
        retry: fields.get("r").and_then(|r| r.parse().ok()),
    };
    let id = match &p.id {
        Some(id) => EventId::new(id),
        None => EventId::new(format!("{sid}-{}", fields.get("e").map_or("", |e| e))),
    };
    Some((p, id))
}

/// A stream entry's event, encoded (a replay fetched from Redis).
fn event_of(sid: StreamId, fields: &Fields) -> Option<Arc<Event>> {
    let (p, id) = publish_of(sid, fields)?;
    p.validate().ok()?;
    Some(Arc::new(Event {
        seq: sid.seq(),
        topic: TopicName::new(&p.topic),
        frame: encode_event(p.event.as_deref(), &id, p.retry, &p.data),
        retry: p.retry,
        id,
        at: Instant::now(),
    }))
}

/// The script's reply `[epoch, id...]` for `n` entries.
fn accepted(v: &Value, n: usize) -> Option<(String, Vec<StreamId>)> {
    match v {
        Value::Array(a) if a.len() == n + 1 => {
            let ids = a[1..]
                .iter()
                .map(|v| StreamId::parse(&text(v)?))
                .collect::<Option<Vec<_>>>()?;
            Some((text(&a[0])?, ids))
        }
        _ => None,
    }
}

/// `pending` (indexes into `items`) cut into script runs of at most
/// [`ENTRIES_PER_RUN`] entries and about [`BYTES_PER_RUN`] bytes of data.
fn chunked(pending: &[usize], items: &[Item]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0;
    for &k in pending {
        let size = match &items[k] {
            Item::Publish(p) => p.data.len() + p.topic.len(),
            _ => 64,
        };
        match out.last_mut() {
            Some(c) if c.len() < ENTRIES_PER_RUN && bytes + size <= BYTES_PER_RUN => {
                c.push(k);
                bytes += size;
            }
            _ => {
                out.push(vec![k]);
                bytes = size;
            }
        }
    }
    out
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// `name`'s value in a flat `[k, v, k, v...]` array or a map (XINFO's reply).
fn field_of<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match v {
        Value::Array(a) => a
            .chunks(2)
            .find(|kv| kv.len() == 2 && text(&kv[0]).as_deref() == Some(name))
            .map(|kv| &kv[1]),
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(name))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// An `XREAD` entry `[id, [field, value, ...]]`.
fn entry(v: &Value) -> Option<(StreamId, Fields)> {
    let Value::Array(a) = v else { return None };
    let id = StreamId::parse(&text(a.first()?)?)?;
    let mut f = Fields::default();
    match a.get(1)? {
        Value::Array(kv) => {
            for pair in kv.chunks(2) {
                if let [k, v] = pair {
                    if let (Some(k), Some(v)) = (text(k), text(v)) {
                        f.0.push((k, v));
                    }
                }
            }
        }
        Value::Map(m) => {
            for (k, v) in m {
                if let (Some(k), Some(v)) = (text(k), text(v)) {
                    f.0.push((k, v));
                }
            }
        }
        _ => return None,
    }
    Some((id, f))
}

/// An entry's fields (a handful: a scan beats a map).
#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl Fields {
    fn get(&self, k: &str) -> Option<&String> {
        self.0.iter().find(|(f, _)| f == k).map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_like_their_sequences() {
        let a = StreamId::parse("1764694812345-0").unwrap();
        let b = StreamId::parse("1764694812345-7").unwrap();
        let c = StreamId::parse("1764694812346-0").unwrap();
        assert!(a < b && b < c);
        assert!(a.seq() < b.seq() && b.seq() < c.seq());
        assert_eq!(a.to_string(), "1764694812345-0");
        assert_eq!(StreamId::parse("x-1"), None);
        assert_eq!(StreamId::parse("12"), None);
    }

    fn id(ms: u64, n: u64) -> StreamId {
        StreamId { ms, n }
    }

    #[test]
    fn trimming_counts_as_a_loss_only_when_it_took_entries_not_read() {
        // 10 entries added, the oldest 4 trimmed: entries 5..=10 (ids 105..=110) remain.
        let info = StreamInfo {
            length: 6,
            added: 10,
            first: Some(id(105, 0)),
            last_generated: id(110, 0),
            max_deleted: StreamId::default(),
        };
        assert_eq!(info.lost_before(), Some(id(104, u64::MAX >> 1)));
        // A reader that read up to entry 4 (the last one trimmed) lost nothing ...
        let at4 = ReaderPos {
            added: Some(4),
            last: id(104, 0),
            epoch: None,
        };
        assert!(!info.lost_after(&at4));
        // ... one that read 3 lost entry 4; one whose count is unknown is told too.
        let at3 = ReaderPos {
            added: Some(3),
            last: id(103, 0),
            ..at4.clone()
        };
        assert!(info.lost_after(&at3));
        assert!(info.lost_after(&ReaderPos { added: None, ..at3 }));
        // A reader inside the retained range lost nothing, whatever its count.
        let at7 = ReaderPos {
            added: None,
            last: id(107, 0),
            epoch: None,
        };
        assert!(!info.lost_after(&at7));
        // An XDEL after the reader's position is a loss.
        let deleted = StreamInfo {
            max_deleted: id(108, 0),
            ..info
        };
        assert!(deleted.lost_after(&at7));
        // Ids alone (a resume): inside the range fine, before it a (maybe false) alarm.
        assert!(!info.lost_after_id(id(106, 0)));
        assert!(info.lost_after_id(id(103, 0)));
        // Nothing ever removed: never a loss, nothing lost before.
        let whole = StreamInfo {
            length: 10,
            first: Some(id(101, 0)),
            ..info
        };
        assert_eq!(whole.lost_before(), None);
        assert!(!whole.lost_after_id(id(50, 0)));
    }

    #[test]
    fn backoff_is_jittered_within_half_to_one_and_a_half() {
        let mut rng = seed();
        let base = Duration::from_millis(100);
        let waits: Vec<Duration> = (0..100).map(|_| jitter(&mut rng, base)).collect();
        assert!(waits.iter().all(|w| *w >= base / 2 && *w < base * 3 / 2));
        assert!(waits.iter().any(|w| *w != waits[0]), "no jitter at all");
    }
}
