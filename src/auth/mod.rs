//! Authentication: JWT access tokens checked once per stream start (never per delivery),
//! per-topic grants, revocation, and the per-user stream limit. Shared by all workers;
//! every lock here is taken at a stream start or a revocation, never on the fan-out path.
//!
//! Keys come from `--auth-keys` (JWKS or PEM), `--auth-secret-file` (HMAC) and
//! `--auth-jwks-url`, which a side thread fetches and refreshes; a worker never waits on
//! the network. A token naming a `kid` herald does not know asks that thread for one early
//! refetch (at most once per 10 s); its request waits for the answer, bounded, instead of
//! being refused, so a key rotation does not end every browser's EventSource for good.

pub mod keys;
pub mod pattern;
pub mod ring_verify;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use crate::config::AuthConfig;
use keys::Key;

/// Clock skew allowed on `nbf` and `iat` (the bound). `exp` gets none: a stream
/// never outlives its token.
pub const LEEWAY_S: u64 = 5;
/// Longest token accepted, in bytes (a JWT with a few grants is well under 1 KiB).
pub const MAX_TOKEN: usize = 4096;
/// An unknown `kid` triggers at most one JWKS refetch per this long.
pub const KID_REFETCH_EVERY: Duration = Duration::from_secs(10);
/// A failed JWKS fetch is retried this soon (the last good set stays in use meanwhile).
const JWKS_RETRY: Duration = Duration::from_secs(10);
/// Most revocations kept at once; past it a revocation is refused with an error line.
pub const MAX_REVOCATIONS: usize = 100_000;
/// Most bytes of a JWKS document.
const MAX_JWKS: u64 = 1 << 20;

/// Why a token was not accepted. The descriptions go to the client in
/// `error_description` and never quote the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token where one is needed: 401 without an error code.
    Missing,
    /// 401 `invalid_token`.
    Invalid(&'static str),
    /// The token names a key herald may learn from its JWKS URL: wait for the refetch.
    UnknownKid,
    /// 403 `insufficient_scope`.
    Scope,
    /// 429: over `--max-streams-per-user`.
    Limit,
}

/// What herald keeps of an accepted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub sub: Option<String>,
    pub jti: Option<String>,
    /// Unix seconds.
    pub exp: u64,
    pub iat: Option<u64>,
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
}

impl Claims {
    pub fn may_subscribe(&self, topic: &str) -> bool {
        pattern::any_matches(&self.subscribe, self.sub.as_deref(), topic)
    }

    pub fn may_publish(&self, topic: &str) -> bool {
        pattern::any_matches(&self.publish, self.sub.as_deref(), topic)
    }
}

#[derive(Deserialize)]
struct RawClaims {
    /// Required; jsonwebtoken reports it missing before this is read.
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    iat: Option<f64>,
    #[serde(default, deserialize_with = "string_or_number")]
    sub: Option<String>,
    #[serde(default, deserialize_with = "string_or_number")]
    jti: Option<String>,
    #[serde(default)]
    herald: Grants,
}

/// A string claim that some issuers send as a number (`"sub": 42`).
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Null => None,
        _ => return Err(serde::de::Error::custom("expected a string")),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Grants {
    subscribe: Vec<String>,
    publish: Vec<String>,
}

/// Process-wide authentication figures for `/metrics`.
#[derive(Debug, Default)]
pub struct AuthStats {
    pub jwks_fetches: AtomicU64,
    pub jwks_fetch_failures: AtomicU64,
    pub jwks_keys: AtomicU64,
    pub revocations: AtomicU64,
    pub revocations_refused: AtomicU64,
}

/// A revocation from an ingest control line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoke {
    Sub(Arc<str>),
    Jti(Arc<str>),
}

#[derive(Default)]
struct Revocations {
    /// Subject → unix second of its latest revocation.
    subs: HashMap<Arc<str>, u64>,
    /// Token id → unix second of its revocation.
    jtis: HashMap<Arc<str>, u64>,
    /// (forget at, what, revoked at) in the order they were made.
    queue: VecDeque<(u64, Revoke, u64)>,
}

impl Revocations {
    fn prune(&mut self, now: u64) {
        while let Some((until, _, _)) = self.queue.front() {
            if *until > now {
                break;
            }
            let (_, what, at) = self.queue.pop_front().expect("front exists");
            let map = match &what {
                Revoke::Sub(_) => &mut self.subs,
                Revoke::Jti(_) => &mut self.jtis,
            };
            let key = match &what {
                Revoke::Sub(s) | Revoke::Jti(s) => s,
            };
            // A later revocation of the same subject keeps its own entry.
            if map.get(key) == Some(&at) {
                map.remove(key);
            }
        }
    }

    fn len(&self) -> usize {
        self.subs.len() + self.jtis.len()
    }
}

struct FetchState {
    /// A worker asked for an early refetch (an unknown `kid`).
    wanted: bool,
    last_kid_fetch: Option<Instant>,
    stop: bool,
}

pub struct Auth {
    pub cfg: AuthConfig,
    /// Keys from files, fixed for the process.
    keys: Vec<Key>,
    /// Keys from `--auth-jwks-url`: the last good set.
    jwks: RwLock<Arc<Vec<Key>>>,
    /// Bumped after every JWKS fetch attempt; requests waiting for a `kid` retry then.
    jwks_epoch: AtomicU64,
    fetch: Mutex<FetchState>,
    fetch_cv: Condvar,
    base: Validation,
    revoked: Mutex<Revocations>,
    users: Mutex<HashMap<String, u32>>,
    pub stats: AuthStats,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("keys", &self.keys).finish()
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Auth {
    /// Load the configured keys; None when no key source is configured (authentication
    /// off). A bad key file is an error: herald does not start half-protected.
    pub fn new(cfg: &AuthConfig) -> Result<Option<Auth>, String> {
        if !cfg.enabled() {
            return Ok(None);
        }
        if !ring_verify::install() {
            tracing::debug!("token signatures are checked by jsonwebtoken's own provider");
        }
        let mut keys = Vec::new();
        if let Some(p) = &cfg.keys {
            keys.extend(keys::load_keys_file(p)?);
        }
        if let Some(p) = &cfg.secret_file {
            keys.push(keys::load_secret(p)?);
        }
        let mut base = Validation::new(Algorithm::HS256);
        base.leeway = LEEWAY_S;
        base.validate_exp = true;
        base.validate_nbf = true;
        base.set_required_spec_claims(&["exp"]);
        match &cfg.issuer {
            Some(iss) => base.set_issuer(&[iss]),
            None => base.iss = None,
        }
        match &cfg.audience {
            Some(aud) => base.set_audience(&[aud]),
            // No audience configured: a token's `aud` is not checked (jsonwebtoken would
            // otherwise refuse every token that has one).
            None => base.validate_aud = false,
        }
        tracing::info!(
            keys = keys.len(),
            jwks = cfg.jwks_url.is_some(),
            issuer = cfg.issuer.is_some(),
            audience = cfg.audience.is_some(),
            "authentication on"
        );
        Ok(Some(Auth {
            cfg: cfg.clone(),
            keys,
            jwks: RwLock::new(Arc::new(Vec::new())),
            jwks_epoch: AtomicU64::new(0),
            fetch: Mutex::new(FetchState {
                wanted: false,
                last_kid_fetch: None,
                stop: false,
            }),
            fetch_cv: Condvar::new(),
            base,
            revoked: Mutex::default(),
            users: Mutex::default(),
            stats: AuthStats::default(),
        }))
    }

    /// Whether `topic` is readable without a token.
    pub fn is_public(&self, topic: &str) -> bool {
        pattern::any_matches(&self.cfg.public_topics, None, topic)
    }

    pub fn jwks_epoch(&self) -> u64 {
        self.jwks_epoch.load(Ordering::Acquire)
    }

    /// Check a token's signature and claims, and that it is not revoked.
    pub fn verify(&self, token: &str) -> Result<Claims, Refusal> {
        self.verify_at(token, unix_now())
    }

    pub fn verify_at(&self, token: &str, now: u64) -> Result<Claims, Refusal> {
        if token.len() > MAX_TOKEN {
            return Err(Refusal::Invalid("token too long"));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| Refusal::Invalid("malformed token"))?;
        let alg = header.alg;
        let jwks = self.jwks.read().map(|g| g.clone()).unwrap_or_default();
        let kid = header.kid.as_deref();
        let mut tried = 0;
        let mut error = Refusal::Invalid("no key allows the token's algorithm");
        for key in self.keys.iter().chain(jwks.iter()) {
            if !key.algs.contains(&alg) || (key.kid.is_some() && key.kid.as_deref() != kid) {
                continue;
            }
            tried += 1;
            let mut v = self.base.clone();
            v.algorithms = vec![alg];
            match jsonwebtoken::decode::<RawClaims>(token, &key.key, &v) {
                Ok(data) => return self.accept(data.claims, now),
                Err(e) => {
                    error = Refusal::Invalid(describe(e.kind()));
                    // A claim failure is the token's, whichever key: stop there.
                    if !matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature
                            | ErrorKind::InvalidEcdsaKey
                            | ErrorKind::InvalidRsaKey(_)
                            | ErrorKind::InvalidEddsaKey
                            | ErrorKind::InvalidKeyFormat
                            | ErrorKind::InvalidAlgorithm
                    ) {
                        return Err(error);
                    }
                }
            }
        }
        if let Some(kid) = kid {
            let known = self
                .keys
                .iter()
                .chain(jwks.iter())
                .any(|k| k.kid.as_deref() == Some(kid));
            if !known && self.cfg.jwks_url.is_some() {
                return Err(Refusal::UnknownKid);
            }
            if !known && tried == 0 {
                return Err(Refusal::Invalid("unknown key id"));
            }
        }
        Err(error)
    }

    fn accept(&self, raw: RawClaims, now: u64) -> Result<Claims, Refusal> {
        let Some(exp) = raw.exp else {
            return Err(Refusal::Invalid("exp is required"));
        };
        if !exp.is_finite() || exp <= now as f64 {
            return Err(Refusal::Invalid("token expired"));
        }
        let exp = exp as u64;
        let iat = raw
            .iat
            .filter(|t| t.is_finite() && *t >= 0.0)
            .map(|t| t as u64);
        if iat.is_some_and(|t| t > now + LEEWAY_S) {
            return Err(Refusal::Invalid("token issued in the future"));
        }
        let lifetime = exp.saturating_sub(iat.unwrap_or(now).min(now));
        if lifetime > self.cfg.max_lifetime.as_secs() {
            return Err(Refusal::Invalid("token lifetime over --auth-max-lifetime"));
        }
        let claims = Claims {
            sub: raw.sub,
            jti: raw.jti,
            exp,
            iat,
            subscribe: raw.herald.subscribe,
            publish: raw.herald.publish,
        };
        if self.is_revoked(&claims, now) {
            return Err(Refusal::Invalid("token revoked"));
        }
        Ok(claims)
    }

    fn is_revoked(&self, c: &Claims, now: u64) -> bool {
        let Ok(mut r) = self.revoked.lock() else {
            return true;
        };
        r.prune(now);
        if r.len() == 0 {
            return false;
        }
        let by_sub = c
            .sub
            .as_deref()
            .and_then(|s| r.subs.get(s))
            // Issued before (or in the same second as) the revocation; a token without
            // `iat` cannot show it is newer.
            .is_some_and(|&at| c.iat.is_none_or(|iat| iat <= at));
        let by_jti = c.jti.as_deref().is_some_and(|j| r.jtis.contains_key(j));
        by_sub || by_jti
    }

    /// Record a revocation (before the workers are told, so no stream can start in
    /// between). It is kept for `--auth-max-lifetime`: no token it can refuse lives longer.
    /// Returns the revocation's time (unix s), which the workers compare with `iat`.
    pub fn revoke(&self, what: &Revoke) -> Result<u64, String> {
        let now = unix_now();
        let keep = self.cfg.max_lifetime.as_secs() + LEEWAY_S;
        let mut r = self.revoked.lock().map_err(|_| "poisoned".to_string())?;
        r.prune(now);
        let (map, key) = match what {
            Revoke::Sub(s) => (&mut r.subs, s),
            Revoke::Jti(j) => (&mut r.jtis, j),
        };
        let fresh = !map.contains_key(key);
        if fresh && r.len() >= MAX_REVOCATIONS {
            self.stats
                .revocations_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "revocation list full ({MAX_REVOCATIONS} kept for --auth-max-lifetime)"
            ));
        }
        let map = match what {
            Revoke::Sub(_) => &mut r.subs,
            Revoke::Jti(_) => &mut r.jtis,
        };
        map.insert(key.clone(), now);
        r.queue.push_back((now + keep, what.clone(), now));
        self.stats
            .revocations
            .store(r.len() as u64, Ordering::Relaxed);
        Ok(now)
    }

    /// Count a stream of `sub` against `--max-streams-per-user`; false when over it.
    pub fn acquire_stream(&self, sub: &str) -> bool {
        let max = self.cfg.max_streams_per_user;
        if max == 0 {
            return true;
        }
        let Ok(mut users) = self.users.lock() else {
            return false;
        };
        let n = users.entry(sub.to_owned()).or_insert(0);
        if *n as usize >= max {
            if *n == 0 {
                users.remove(sub);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// A stream counted by [`Auth::acquire_stream`] ended.
    pub fn release_stream(&self, sub: &str) {
        if self.cfg.max_streams_per_user == 0 {
            return;
        }
        if let Ok(mut users) = self.users.lock() {
            if let Some(n) = users.get_mut(sub) {
                *n -= 1;
                if *n == 0 {
                    users.remove(sub);
                }
            }
        }
    }

    /// A request met an unknown `kid`: ask for an early JWKS refetch. False when one was
    /// made less than [`KID_REFETCH_EVERY`] ago (the token is then refused).
    pub fn request_refetch(&self) -> bool {
        let Ok(mut f) = self.fetch.lock() else {
            return false;
        };
        if f.wanted {
            return true;
        }
        if f.last_kid_fetch
            .is_some_and(|t| t.elapsed() < KID_REFETCH_EVERY)
        {
            return false;
        }
        f.wanted = true;
        self.fetch_cv.notify_all();
        true
    }

    /// Whether a refetch is asked for and not yet begun (a request that waited through a
    /// fetch begun before it asked keeps waiting for that one).
    pub fn refetch_pending(&self) -> bool {
        self.fetch.lock().is_ok_and(|f| f.wanted)
    }

    /// Start the JWKS thread when `--auth-jwks-url` is set: it fetches at once, then every
    /// `--auth-jwks-refresh`, early on request, and calls `wake` after each attempt.
    pub fn spawn_jwks(self: &Arc<Self>, wake: Box<dyn Fn() + Send>) -> Option<JoinHandle<()>> {
        let url = self.cfg.jwks_url.clone()?;
        let auth = self.clone();
        let t = std::thread::Builder::new()
            .name("herald-jwks".into())
            .spawn(move || auth.jwks_loop(&url, wake))
            .ok()?;
        Some(t)
    }

    fn jwks_loop(&self, url: &str, wake: Box<dyn Fn() + Send>) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let shown = redact_url(url);
        loop {
            // What is asked for from here on needs a fetch after this one.
            if let Ok(mut f) = self.fetch.lock() {
                if f.wanted {
                    f.last_kid_fetch = Some(Instant::now());
                }
                f.wanted = false;
            }
            self.stats.jwks_fetches.fetch_add(1, Ordering::Relaxed);
            let ok = match fetch_jwks(&agent, url) {
                Ok(keys) => {
                    tracing::info!(url = %shown, keys = keys.len(), "JWKS fetched");
                    self.stats
                        .jwks_keys
                        .store(keys.len() as u64, Ordering::Relaxed);
                    if let Ok(mut g) = self.jwks.write() {
                        *g = Arc::new(keys);
                    }
                    true
                }
                Err(e) => {
                    self.stats
                        .jwks_fetch_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(url = %shown, error = %e, "JWKS fetch failed; keeping the last good keys");
                    false
                }
            };
            let Ok(mut f) = self.fetch.lock() else {
                return;
            };
            self.jwks_epoch.fetch_add(1, Ordering::AcqRel);
            wake();
            let wait = if ok {
                self.cfg.jwks_refresh
            } else {
                self.cfg.jwks_refresh.min(JWKS_RETRY)
            };
            let deadline = Instant::now() + wait;
            while !f.wanted && !f.stop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                f = match self.fetch_cv.wait_timeout(f, left) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
            }
            if f.stop {
                return;
            }
        }
    }

    /// Stop the JWKS thread (at shutdown).
    pub fn stop(&self) {
        if let Ok(mut f) = self.fetch.lock() {
            f.stop = true;
            self.fetch_cv.notify_all();
        }
    }
}

fn fetch_jwks(agent: &ureq::Agent, url: &str) -> Result<Vec<Key>, String> {
    let mut resp = agent.get(url).call().map_err(|e| e.to_string())?;
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_JWKS)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    keys::parse_jwks(&body)
}

/// A URL without its user info and query, for logs.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.rsplit('@').next().unwrap_or(host);
    format!("{scheme}://{host}/{path}")
}

fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not yet valid",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::MissingRequiredClaim(_) => "exp is required",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "algorithm not allowed",
        ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => "malformed claims",
        _ => "malformed token",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_credentials_and_query_in_logs() {
        assert_eq!(
            redact_url("https://user:pw@idp.example/keys.json?token=s3cret"),
            "https://idp.example/keys.json"
        );
        assert_eq!(redact_url("http://h:8080/a/b"), "http://h:8080/a/b");
    }

    #[test]
    fn revocations_expire_and_keep_the_latest() {
        let mut r = Revocations::default();
        let s: Arc<str> = "42".into();
        r.subs.insert(s.clone(), 100);
        r.queue.push_back((200, Revoke::Sub(s.clone()), 100));
        r.subs.insert(s.clone(), 150);
        r.queue.push_back((250, Revoke::Sub(s.clone()), 150));
        r.prune(210);
        assert_eq!(r.subs.get("42"), Some(&150), "the later revocation stays");
        r.prune(250);
        assert_eq!(r.len(), 0);
    }
}
