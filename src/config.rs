//! `herald serve` settings: command-line flags and `herald.toml`, merged once into a
//! validated [`Config`]. Every flag has a TOML key of the same name; a flag wins over the
//! file, unknown keys are rejected, and every value is parsed into its typed form here so
//! nothing downstream re-validates ("parse, don't validate").

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use ipnet::IpNet;
use serde::Deserialize;

/// Which I/O backend the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// io_uring when the kernel allows it, else epoll (the reason is logged).
    Auto,
    /// io_uring only; fail to start if the ring cannot be set up.
    Uring,
    /// epoll (mio) only.
    Epoll,
}

/// Kernel TLS use (`--ktls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KtlsChoice {
    /// Hand connections to the kernel when its probe passes (logged either way).
    Auto,
    /// Always encrypt in userspace.
    Off,
}

/// A TOML value that is one path or a list of paths.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<PathBuf>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(Some(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    }))
}

/// Flags of `herald serve`, and the keys of `herald.toml` (same names).
/// Everything is optional here so that a flag can override the file.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Address for subscribers (SSE over HTTP/1.1, or h2c with prior knowledge), or "off" when --tls-listen is set
    /// [default: 0.0.0.0:8080]
    #[arg(long)]
    pub listen: Option<String>,
    /// Address that serves everything --listen serves, over TLS [default: off]
    #[arg(long)]
    pub tls_listen: Option<String>,
    /// PEM certificate chain for --tls-listen; repeat with --tls-key for more names
    /// (chosen by SNI, the first is the default)
    #[arg(long)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub tls_cert: Option<Vec<PathBuf>>,
    /// PEM private key of the --tls-cert at the same position
    #[arg(long)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub tls_key: Option<Vec<PathBuf>>,
    /// TLS handshakes in progress per worker; beyond it a new TLS connection is closed
    /// [default: 1024]
    #[arg(long)]
    pub tls_max_handshakes: Option<usize>,
    /// Concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS); more are
    /// refused with RST_STREAM [default: 128]
    #[arg(long)]
    pub h2_max_streams: Option<u32>,
    /// Kernel TLS: "auto" uses it when the kernel's probe passes, "off" never [default: auto]
    #[arg(long, value_enum)]
    pub ktls: Option<KtlsChoice>,
    /// Send `Strict-Transport-Security: max-age=...` on TLS responses, e.g. 180d; 0 = off
    /// [default: off]
    #[arg(long)]
    pub hsts: Option<String>,
    /// TCP address of the NDJSON ingest socket, or "off" [default: 127.0.0.1:7070]
    #[arg(long)]
    pub ingest: Option<String>,
    /// Path of an NDJSON ingest Unix socket [default: none]
    #[arg(long)]
    pub ingest_unix: Option<PathBuf>,
    /// Close an ingest connection after this long without a byte read or written,
    /// 0 = never [default: 5m]
    #[arg(long)]
    pub ingest_idle_timeout: Option<String>,
    /// Open ingest connections (TCP and Unix together); beyond it a new one gets one
    /// error line and is closed [default: 1024]
    #[arg(long)]
    pub ingest_max_connections: Option<usize>,
    /// Worker threads, one pinned per CPU [default: online CPUs]
    #[arg(long)]
    pub workers: Option<usize>,
    /// I/O backend [default: auto]
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
    /// Keep-alive comment interval on idle streams, e.g. 15s, 500ms [default: 15s]
    #[arg(long)]
    pub keepalive: Option<String>,
    /// Deadline for a client to send its request head (slow-loris guard) [default: 10s]
    #[arg(long)]
    pub head_timeout: Option<String>,
    /// A write that makes no progress for this long marks a slow consumer [default: 30s]
    #[arg(long)]
    pub write_timeout: Option<String>,
    /// Per-connection backlog cap; past it the subscriber is disconnected [default: 1MiB]
    #[arg(long)]
    pub max_backlog: Option<String>,
    /// Open connections per process; beyond it new ones get 503 [default: 1000000]
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// New connections accepted per second per process, 0 = unlimited [default: 0]
    #[arg(long)]
    pub accept_rate: Option<u32>,
    /// Largest request head accepted; beyond it 431 [default: 8KiB]
    #[arg(long)]
    pub max_head: Option<String>,
    /// Most topics in one subscription [default: 32]
    #[arg(long)]
    pub max_topics: Option<usize>,
    /// Largest publish: HTTP body or ingest line [default: 1MiB]
    #[arg(long)]
    pub max_event: Option<String>,
    /// Events retained per topic for Last-Event-ID resume [default: 1000]
    #[arg(long)]
    pub history_events: Option<usize>,
    /// Bytes retained per topic [default: 4MiB]
    #[arg(long)]
    pub history_bytes: Option<String>,
    /// Most topics herald keeps history for; a publish that would create one more is
    /// refused [default: 250000]
    #[arg(long)]
    pub history_topics: Option<usize>,
    /// Age after which retained events are dropped, e.g. 1h [default: 1h]
    #[arg(long)]
    pub history_age: Option<String>,
    /// Save retained history here on shutdown and load it at start, so clients resume
    /// across a restart without a gap [default: none]
    #[arg(long)]
    pub history_file: Option<PathBuf>,
    /// `retry:` hint (ms) sent at the start of each stream [default: none]
    #[arg(long)]
    pub retry: Option<u32>,
    /// Window over which streams are closed on shutdown [default: 2s]
    #[arg(long)]
    pub drain_window: Option<String>,
    /// Allowed CORS origins, comma-separated; "*" = any, without credentials [default: *]
    #[arg(long, value_delimiter = ',')]
    pub cors_origins: Option<Vec<String>>,
    /// Send Access-Control-Allow-Credentials for listed origins [default: false]
    #[arg(long)]
    pub cors_credentials: Option<bool>,
    /// Networks allowed to POST /publish, comma-separated [default: 127.0.0.0/8,::1/128]
    #[arg(long, value_delimiter = ',')]
    pub publish_allow: Option<Vec<String>>,
    /// Serve the demo page at GET / [default: true]
    #[arg(long)]
    pub demo: Option<bool>,
    /// JWT verification keys: a JWKS file or PEM public keys (RS*, PS*, ES256, ES384,
    /// EdDSA) [default: none]
    #[arg(long)]
    pub auth_keys: Option<PathBuf>,
    /// HMAC secret for HS256/384/512 tokens: the file's bytes, one trailing newline
    /// stripped [default: none]
    #[arg(long)]
    pub auth_secret_file: Option<PathBuf>,
    /// JWKS URL, fetched on a side thread and refreshed [default: none]
    #[arg(long)]
    pub auth_jwks_url: Option<String>,
    /// How often the JWKS URL is fetched again [default: 5m]
    #[arg(long)]
    pub auth_jwks_refresh: Option<String>,
    /// Required `iss` of tokens [default: not checked]
    #[arg(long)]
    pub auth_issuer: Option<String>,
    /// Required `aud` of tokens [default: not checked]
    #[arg(long)]
    pub auth_audience: Option<String>,
    /// Cookie that may carry the token [default: herald_token]
    #[arg(long)]
    pub auth_cookie: Option<String>,
    /// Query parameter that may carry the token (it leaks into proxy logs and browser
    /// history; never logged by herald) [default: off]
    #[arg(long)]
    pub auth_query_param: Option<String>,
    /// Topic patterns readable without a token, comma-separated (`*` any run, e.g.
    /// "news,public/*") [default: "*" without keys, none with keys]
    #[arg(long, value_delimiter = ',')]
    pub public_topics: Option<Vec<String>>,
    /// How long before a stream's token-imposed end it gets `event: herald-auth-expiring`
    /// [default: 30s]
    #[arg(long)]
    pub auth_expiry_notice: Option<String>,
    /// Longest token lifetime accepted (`exp` - `iat`); revocations are kept this long
    /// [default: 7d]
    #[arg(long)]
    pub auth_max_lifetime: Option<String>,
    /// Open streams per token subject (`sub`), process-wide, 0 = no limit; beyond it 429
    /// [default: 0]
    #[arg(long)]
    pub max_streams_per_user: Option<usize>,
    /// Permissions of the --ingest-unix socket, octal (e.g. 0660) [default: from umask]
    #[arg(long)]
    pub ingest_unix_mode: Option<String>,
    /// JSON access log: "stderr", a file path, or "off"; SIGHUP reopens the file
    /// [default: off]
    #[arg(long)]
    pub access_log: Option<String>,
    /// Scale out over a Redis Stream: redis://[:PASSWORD@]HOST:PORT[/DB]; every node
    /// delivers what any node published, with the same ids [default: off]
    #[arg(long)]
    pub cluster: Option<String>,
    /// Prefix of the Redis keys (`PREFIX:events`, `PREFIX:epoch`) [default: herald]
    #[arg(long)]
    pub cluster_prefix: Option<String>,
    /// File holding the Redis password (instead of putting it in the URL) [default: none]
    #[arg(long)]
    pub cluster_password_file: Option<PathBuf>,
    /// Approximate most entries the Redis Stream keeps (besides --history-age)
    /// [default: 100000]
    #[arg(long)]
    pub cluster_max_len: Option<usize>,
    /// io_uring: direct descriptors per ring; a worker opens another ring when one is
    /// full [default: the open-files limit, the kernel's cap]
    #[arg(long)]
    pub uring_table: Option<u32>,
    /// io_uring: most rings per worker [default: 64]
    #[arg(long)]
    pub uring_rings: Option<usize>,
}

/// The validated configuration every part of herald reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// Plaintext listener; `None` with `--listen off`.
    pub listen: Option<SocketAddr>,
    /// TLS listener (`--tls-listen`).
    pub tls_listen: Option<SocketAddr>,
    /// Certificate/key pairs, the first the default.
    pub tls_certs: Vec<crate::tls::CertPair>,
    pub tls_max_handshakes: usize,
    pub h2_max_streams: u32,
    pub ktls: KtlsChoice,
    pub hsts: Option<Duration>,
    pub ingest: Option<SocketAddr>,
    pub ingest_unix: Option<PathBuf>,
    /// None: ingest connections never time out.
    pub ingest_idle_timeout: Option<Duration>,
    pub ingest_max_connections: usize,
    pub workers: usize,
    pub backend: BackendChoice,
    pub keepalive: Duration,
    pub head_timeout: Duration,
    pub write_timeout: Duration,
    pub max_backlog: usize,
    pub max_connections: usize,
    pub accept_rate: u32,
    pub max_head: usize,
    pub max_topics: usize,
    pub max_event: usize,
    pub history_events: usize,
    pub history_topics: usize,
    pub history_bytes: usize,
    pub history_age: Duration,
    pub history_file: Option<PathBuf>,
    pub retry: Option<u32>,
    pub drain_window: Duration,
    pub cors_origins: Vec<String>,
    pub cors_credentials: bool,
    pub publish_allow: Vec<IpNet>,
    pub demo: bool,
    pub auth: AuthConfig,
    /// Mode bits of the --ingest-unix socket.
    pub ingest_unix_mode: Option<u32>,
    pub access_log: Option<AccessLogTarget>,
    pub uring_table: Option<u32>,
    pub uring_rings: usize,
    /// `--cluster`: the Redis URL (it may hold the password: never log it).
    pub cluster: Option<String>,
    pub cluster_prefix: String,
    pub cluster_password_file: Option<PathBuf>,
    pub cluster_max_len: usize,
}

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stderr,
    File(PathBuf),
}

/// Authentication settings (`--auth-*`, `--public-topics`, `--max-streams-per-user`).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub keys: Option<PathBuf>,
    pub secret_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    pub jwks_refresh: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub cookie: String,
    pub query_param: Option<String>,
    /// Readable without a token.
    pub public_topics: Vec<String>,
    pub expiry_notice: Duration,
    pub max_lifetime: Duration,
    /// 0 = no limit.
    pub max_streams_per_user: usize,
}

impl AuthConfig {
    /// Whether any key source is configured (tokens can be verified).
    pub fn enabled(&self) -> bool {
        self.keys.is_some() || self.secret_file.is_some() || self.jwks_url.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Toml {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{key}: {message}")]
    Value { key: &'static str, message: String },
}

impl Default for Config {
    fn default() -> Self {
        Config::from_settings(Settings::default()).expect("defaults are valid")
    }
}

impl Config {
    /// The `--cluster` settings, when it is on.
    pub fn cluster_config(&self) -> Option<crate::cluster::ClusterConfig> {
        Some(crate::cluster::ClusterConfig {
            url: self.cluster.clone()?,
            prefix: self.cluster_prefix.clone(),
            password_file: self.cluster_password_file.clone(),
            max_len: self.cluster_max_len,
        })
    }

    /// Merge flags over the TOML file at `path` (if any) over the defaults.
    pub fn load(flags: Settings, path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                toml::from_str::<Settings>(&text).map_err(|e| ConfigError::Toml {
                    path: p.to_path_buf(),
                    source: Box::new(e),
                })?
            }
            None => Settings::default(),
        };
        Config::from_settings(flags.over(file))
    }

    /// Validate settings (unset values take their defaults).
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let auth = auth_config(&s)?;
        let ingest = match s.ingest.as_deref().unwrap_or("127.0.0.1:7070") {
            "off" | "" => None,
            a => Some(a.parse().map_err(|e| value("ingest", e))?),
        };
        let workers = match s.workers.unwrap_or(0) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let publish_allow = match s.publish_allow {
            Some(list) => list
                .iter()
                .map(|n| parse_net(n).map_err(|m| value("publish-allow", m)))
                .collect::<Result<_, _>>()?,
            None => vec![
                "127.0.0.0/8".parse().expect("literal"),
                "::1/128".parse().expect("literal"),
            ],
        };
        let cfg = Config {
            listen: addr_or_off("listen", s.listen.as_deref(), Some("0.0.0.0:8080"))?,
            tls_listen: addr_or_off("tls-listen", s.tls_listen.as_deref(), None)?,
            tls_certs: cert_pairs(s.tls_cert, s.tls_key)?,
            tls_max_handshakes: s.tls_max_handshakes.unwrap_or(1024),
            h2_max_streams: s.h2_max_streams.unwrap_or(128),
            ktls: s.ktls.unwrap_or(KtlsChoice::Auto),
            hsts: Some(duration("hsts", s.hsts.as_deref(), "0s")?).filter(|d| !d.is_zero()),
            ingest,
            ingest_unix: s.ingest_unix,
            ingest_idle_timeout: Some(duration(
                "ingest-idle-timeout",
                s.ingest_idle_timeout.as_deref(),
                "5m",
            )?)
            .filter(|d| !d.is_zero()),
            ingest_max_connections: s.ingest_max_connections.unwrap_or(1024),
            workers,
            backend: s.backend.unwrap_or(BackendChoice::Auto),
            keepalive: duration("keepalive", s.keepalive.as_deref(), "15s")?,
            head_timeout: duration("head-timeout", s.head_timeout.as_deref(), "10s")?,
            write_timeout: duration("write-timeout", s.write_timeout.as_deref(), "30s")?,
            max_backlog: size("max-backlog", s.max_backlog.as_deref(), "1MiB")?,
            max_connections: s.max_connections.unwrap_or(1_000_000),
            accept_rate: s.accept_rate.unwrap_or(0),
            max_head: size("max-head", s.max_head.as_deref(), "8KiB")?,
            max_topics: s.max_topics.unwrap_or(32),
            max_event: size("max-event", s.max_event.as_deref(), "1MiB")?,
            history_events: s.history_events.unwrap_or(1000),
            history_topics: s.history_topics.unwrap_or(250_000),
            history_bytes: size("history-bytes", s.history_bytes.as_deref(), "4MiB")?,
            history_age: duration("history-age", s.history_age.as_deref(), "1h")?,
            history_file: s.history_file,
            retry: s.retry,
            drain_window: duration("drain-window", s.drain_window.as_deref(), "2s")?,
            cors_origins: s.cors_origins.unwrap_or_else(|| vec!["*".to_string()]),
            cors_credentials: s.cors_credentials.unwrap_or(false),
            publish_allow,
            demo: s.demo.unwrap_or(true),
            auth,
            ingest_unix_mode: s
                .ingest_unix_mode
                .as_deref()
                .map(|m| {
                    u32::from_str_radix(m.trim().trim_start_matches("0o"), 8)
                        .ok()
                        .filter(|m| *m <= 0o777)
                        .ok_or_else(|| {
                            value(
                                "ingest-unix-mode",
                                format!("{m:?} is not an octal mode like 0660"),
                            )
                        })
                })
                .transpose()?,
            access_log: match s.access_log.as_deref().map(str::trim) {
                None | Some("off" | "") => None,
                Some("stderr") => Some(AccessLogTarget::Stderr),
                Some(p) => Some(AccessLogTarget::File(PathBuf::from(p))),
            },
            uring_table: s.uring_table,
            uring_rings: s.uring_rings.unwrap_or(64),
            cluster: s.cluster.filter(|u| !u.is_empty() && u != "off"),
            cluster_prefix: s.cluster_prefix.unwrap_or_else(|| "herald".to_string()),
            cluster_password_file: s.cluster_password_file,
            cluster_max_len: s.cluster_max_len.unwrap_or(100_000),
        };
        if let Some(u) = &cfg.cluster {
            if !u.starts_with("redis://") {
                return Err(value(
                    "cluster",
                    "must be a redis://[:PASSWORD@]HOST:PORT[/DB] URL",
                ));
            }
            if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u.as_str()) {
                // The error names the part that is wrong, never the password.
                return Err(value("cluster", format!("not a Redis URL: {:?}", e.kind())));
            }
        }
        if cfg.cluster_prefix.is_empty()
            || !cfg
                .cluster_prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
        {
            return Err(value(
                "cluster-prefix",
                "must be printable ASCII without spaces or braces",
            ));
        }
        if cfg.cluster_max_len < 1000 {
            return Err(value("cluster-max-len", "must be at least 1000"));
        }
        if cfg.cluster.is_none() && cfg.cluster_password_file.is_some() {
            return Err(value("cluster-password-file", "needs --cluster"));
        }
        match (cfg.listen, cfg.tls_listen, cfg.tls_certs.is_empty()) {
            (None, None, _) => {
                return Err(value(
                    "listen",
                    "off needs --tls-listen: nothing would be served",
                ))
            }
            (_, Some(_), true) => {
                return Err(value("tls-listen", "needs --tls-cert and --tls-key"))
            }
            (_, None, false) => {
                return Err(value("tls-cert", "needs --tls-listen"));
            }
            _ => {}
        }
        if cfg.ingest_unix_mode.is_some() && cfg.ingest_unix.is_none() {
            return Err(value("ingest-unix-mode", "needs --ingest-unix"));
        }
        if cfg.h2_max_streams == 0 {
            return Err(value("h2-max-streams", "must be at least 1"));
        }
        if cfg.tls_max_handshakes == 0 {
            return Err(value("tls-max-handshakes", "must be at least 1"));
        }
        if cfg.keepalive < Duration::from_millis(10) {
            return Err(value("keepalive", "must be at least 10ms"));
        }
        if cfg.max_head < 256 {
            return Err(value("max-head", "must be at least 256 bytes"));
        }
        if cfg.ingest_max_connections == 0 {
            return Err(value("ingest-max-connections", "must be at least 1"));
        }
        if cfg.max_topics == 0 {
            return Err(value("max-topics", "must be at least 1"));
        }
        if cfg.uring_table.is_some_and(|t| t < 16) || !(1..=256).contains(&cfg.uring_rings) {
            return Err(value(
                "uring-table",
                "at least 16 per ring, and 1 to 256 rings",
            ));
        }
        if cfg.workers > 1024 {
            return Err(value("workers", "at most 1024"));
        }
        Ok(cfg)
    }
}

impl Settings {
    /// `self` (flags) wins over `file` key by key.
    fn over(self, file: Settings) -> Settings {
        macro_rules! merge {
            ($($f:ident),* $(,)?) => { Settings { $($f: self.$f.or(file.$f)),* } };
        }
        merge!(
            listen,
            tls_listen,
            tls_cert,
            tls_key,
            tls_max_handshakes,
            h2_max_streams,
            ktls,
            hsts,
            ingest,
            ingest_unix,
            ingest_idle_timeout,
            ingest_max_connections,
            workers,
            backend,
            keepalive,
            head_timeout,
            write_timeout,
            max_backlog,
            max_connections,
            accept_rate,
            max_head,
            max_topics,
            max_event,
            history_events,
            history_topics,
            history_bytes,
            history_age,
            history_file,
            retry,
            drain_window,
            cors_origins,
            cors_credentials,
            publish_allow,
            demo,
            auth_keys,
            auth_secret_file,
            auth_jwks_url,
            auth_jwks_refresh,
            auth_issuer,
            auth_audience,
            auth_cookie,
            auth_query_param,
            public_topics,
            auth_expiry_notice,
            auth_max_lifetime,
            max_streams_per_user,
            ingest_unix_mode,
            access_log,
            uring_table,
            uring_rings,
            cluster,
            cluster_prefix,
            cluster_password_file,
            cluster_max_len,
        )
    }
}

/// The authentication settings, validated: without a key source, only the options that
/// make sense without one are accepted.
fn auth_config(s: &Settings) -> Result<AuthConfig, ConfigError> {
    let mut a = AuthConfig {
        keys: s.auth_keys.clone(),
        secret_file: s.auth_secret_file.clone(),
        jwks_url: s.auth_jwks_url.clone().filter(|u| !u.is_empty()),
        jwks_refresh: duration("auth-jwks-refresh", s.auth_jwks_refresh.as_deref(), "5m")?,
        issuer: s.auth_issuer.clone().filter(|v| !v.is_empty()),
        audience: s.auth_audience.clone().filter(|v| !v.is_empty()),
        cookie: s
            .auth_cookie
            .clone()
            .unwrap_or_else(|| "herald_token".to_string()),
        query_param: s
            .auth_query_param
            .clone()
            .filter(|v| !v.is_empty() && v != "off"),
        public_topics: Vec::new(),
        expiry_notice: duration("auth-expiry-notice", s.auth_expiry_notice.as_deref(), "30s")?,
        max_lifetime: duration("auth-max-lifetime", s.auth_max_lifetime.as_deref(), "7d")?,
        max_streams_per_user: s.max_streams_per_user.unwrap_or(0),
    };
    a.public_topics = match &s.public_topics {
        Some(list) => list
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty() && p != "none")
            .collect(),
        None if a.enabled() => Vec::new(),
        None => vec!["*".to_string()],
    };
    if let Some(u) = &a.jwks_url {
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            return Err(value("auth-jwks-url", "must be an http:// or https:// URL"));
        }
    }
    if a.jwks_refresh < Duration::from_secs(1) {
        return Err(value("auth-jwks-refresh", "must be at least 1s"));
    }
    if a.cookie.is_empty()
        || !a
            .cookie
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return Err(value(
            "auth-cookie",
            "must be a cookie name (an HTTP token)",
        ));
    }
    if a.query_param
        .as_deref()
        .is_some_and(|q| ["topic", "lastEventId", "last_event_id"].contains(&q))
    {
        return Err(value(
            "auth-query-param",
            "must not be a parameter herald already reads (topic, lastEventId, last_event_id)",
        ));
    }
    if a.max_lifetime < Duration::from_secs(1) {
        return Err(value("auth-max-lifetime", "must be at least 1s"));
    }
    if !a.enabled() {
        let needs_keys = [
            ("auth-issuer", a.issuer.is_some()),
            ("auth-audience", a.audience.is_some()),
            ("auth-query-param", a.query_param.is_some()),
            ("max-streams-per-user", a.max_streams_per_user > 0),
        ];
        if let Some((key, _)) = needs_keys.iter().find(|(_, set)| *set) {
            return Err(value(
                key,
                "needs --auth-keys, --auth-secret-file or --auth-jwks-url",
            ));
        }
    }
    Ok(a)
}

/// An address, or "off" (also "") for none; `default` when unset.
fn addr_or_off(
    key: &'static str,
    v: Option<&str>,
    default: Option<&str>,
) -> Result<Option<SocketAddr>, ConfigError> {
    match v.or(default) {
        None | Some("off" | "") => Ok(None),
        Some(a) => a.parse().map(Some).map_err(|e| value(key, e)),
    }
}

/// `--tls-cert`/`--tls-key` paired by position.
fn cert_pairs(
    certs: Option<Vec<PathBuf>>,
    keys: Option<Vec<PathBuf>>,
) -> Result<Vec<crate::tls::CertPair>, ConfigError> {
    let (certs, keys) = (certs.unwrap_or_default(), keys.unwrap_or_default());
    if certs.len() != keys.len() {
        return Err(value(
            "tls-cert",
            format!(
                "{} certificate(s) but {} key(s): give --tls-cert and --tls-key in pairs",
                certs.len(),
                keys.len()
            ),
        ));
    }
    Ok(certs
        .into_iter()
        .zip(keys)
        .map(|(cert, key)| crate::tls::CertPair { cert, key })
        .collect())
}

fn value(key: &'static str, e: impl ToString) -> ConfigError {
    ConfigError::Value {
        key,
        message: e.to_string(),
    }
}

/// "15s", "500ms", "2m", "1h"; a bare number is seconds.
fn duration(key: &'static str, v: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default).trim();
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(v).map_err(|e| value(key, e))
}

/// "1MiB", "64KiB", "8k", "1048576"; K/M/G are powers of 1024.
fn size(key: &'static str, v: Option<&str>, default: &str) -> Result<usize, ConfigError> {
    let v = v.unwrap_or(default).trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| value(key, format!("{v:?} is not a size")))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(value(key, format!("unknown unit {u:?}"))),
    };
    n.checked_mul(mult)
        .ok_or_else(|| value(key, "size overflows"))
}

/// "10.0.0.0/8", or a bare address meaning that one host.
fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or network"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        assert_eq!(c.listen, Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(c.tls_listen, None);
        assert_eq!(c.ktls, KtlsChoice::Auto);
        assert_eq!(c.hsts, None);
        assert_eq!(c.ingest, Some("127.0.0.1:7070".parse().unwrap()));
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.keepalive, Duration::from_secs(15));
        assert_eq!(c.max_backlog, 1 << 20);
        assert_eq!(c.ingest_idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.ingest_max_connections, 1024);
        assert!(c.workers >= 1);
        assert!(c.publish_allow[0].contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()));
    }

    #[test]
    fn flags_win_over_file_and_unknown_keys_fail() {
        let file: Settings = toml::from_str(
            "listen = \"127.0.0.1:9000\"\nkeepalive = \"2s\"\nmax-backlog = \"64KiB\"",
        )
        .unwrap();
        let flags = Settings {
            keepalive: Some("500ms".into()),
            ..Settings::default()
        };
        let c = Config::from_settings(flags.over(file)).unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(c.keepalive, Duration::from_millis(500));
        assert_eq!(c.max_backlog, 64 << 10);
        assert!(toml::from_str::<Settings>("lisen = \"x\"").is_err());
    }

    #[test]
    fn ingest_limits_from_file_and_flags() {
        let file: Settings =
            toml::from_str("ingest-idle-timeout = \"0\"\ningest-max-connections = 8").unwrap();
        let c = Config::from_settings(Settings::default().over(file.clone())).unwrap();
        assert_eq!((c.ingest_idle_timeout, c.ingest_max_connections), (None, 8));
        let flags = Settings {
            ingest_idle_timeout: Some("30s".into()),
            ..Settings::default()
        };
        let c = Config::from_settings(flags.over(file)).unwrap();
        assert_eq!(c.ingest_idle_timeout, Some(Duration::from_secs(30)));
        assert!(Config::from_settings(Settings {
            ingest_max_connections: Some(0),
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn sizes_and_durations_parse() {
        for (s, want) in [
            ("1MiB", 1 << 20),
            ("8k", 8192),
            ("100", 100),
            ("2 GiB", 2 << 30),
        ] {
            assert_eq!(size("k", Some(s), "0").unwrap(), want, "{s}");
        }
        assert!(size("k", Some("12q"), "0").is_err());
        assert_eq!(
            duration("k", Some("1.5"), "0").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            duration("k", Some("2m"), "0").unwrap(),
            Duration::from_secs(120)
        );
        assert!(duration("k", Some("soon"), "0").is_err());
        assert!(parse_net("10.1.2.3")
            .unwrap()
            .contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
        assert!(Config::from_settings(Settings {
            ingest: Some("off".into()),
            ..Default::default()
        })
        .unwrap()
        .ingest
        .is_none());
    }

    #[test]
    fn auth_settings_default_and_validate() {
        let c = Config::default();
        assert!(!c.auth.enabled());
        assert_eq!(
            c.auth.public_topics,
            vec!["*".to_string()],
            "all public without keys"
        );
        assert_eq!(c.auth.cookie, "herald_token");
        assert_eq!(c.auth.expiry_notice, Duration::from_secs(30));
        assert_eq!(c.access_log, None);
        let file: Settings = toml::from_str(
            "auth-keys = \"k.pem\"\npublic-topics = [\"news\", \"public/*\"]\naccess-log = \"stderr\"\ningest-unix = \"/tmp/x.sock\"\ningest-unix-mode = \"0660\"",
        )
        .unwrap();
        let c = Config::from_settings(file).unwrap();
        assert!(c.auth.enabled());
        assert_eq!(c.auth.public_topics, vec!["news", "public/*"]);
        assert_eq!(c.access_log, Some(AccessLogTarget::Stderr));
        assert_eq!(c.ingest_unix_mode, Some(0o660));
        let keys_only = Settings {
            auth_secret_file: Some("s".into()),
            ..Default::default()
        };
        assert!(
            Config::from_settings(keys_only.clone())
                .unwrap()
                .auth
                .public_topics
                .is_empty(),
            "nothing public once keys are configured"
        );
        let bad: Vec<Settings> = vec![
            // Options that only mean something with a key.
            Settings {
                auth_issuer: Some("i".into()),
                ..Default::default()
            },
            Settings {
                max_streams_per_user: Some(3),
                ..Default::default()
            },
            Settings {
                auth_query_param: Some("t".into()),
                ..Default::default()
            },
            Settings {
                auth_jwks_url: Some("ftp://x".into()),
                ..Default::default()
            },
            Settings {
                auth_query_param: Some("topic".into()),
                ..keys_only.clone()
            },
            Settings {
                auth_cookie: Some("a b".into()),
                ..keys_only.clone()
            },
            Settings {
                ingest_unix_mode: Some("0660".into()),
                ..Default::default()
            },
            Settings {
                ingest_unix: Some("/tmp/x".into()),
                ingest_unix_mode: Some("rw".into()),
                ..Default::default()
            },
        ];
        for s in bad {
            assert!(Config::from_settings(s.clone()).is_err(), "{s:?}");
        }
    }

    #[test]
    fn tls_settings_pair_up_and_listen_may_be_off() {
        let file: Settings = toml::from_str(
            "listen = \"off\"\ntls-listen = \"127.0.0.1:8443\"\ntls-cert = [\"a.pem\", \"b.pem\"]\ntls-key = [\"a.key\", \"b.key\"]\nhsts = \"1d\"",
        )
        .unwrap();
        let c = Config::from_settings(file.clone()).unwrap();
        assert_eq!(c.listen, None);
        assert_eq!(c.tls_listen, Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(c.tls_certs.len(), 2);
        assert_eq!(c.tls_certs[1].key, PathBuf::from("b.key"));
        assert_eq!(c.hsts, Some(Duration::from_secs(86400)));
        // One path is also accepted in the file.
        let one: Settings = toml::from_str(
            "tls-listen = \"127.0.0.1:8443\"\ntls-cert = \"a.pem\"\ntls-key = \"a.key\"",
        )
        .unwrap();
        assert_eq!(Config::from_settings(one).unwrap().tls_certs.len(), 1);
        // Unpaired, certificate-less and listener-less settings are refused.
        let mut bad = file.clone();
        bad.tls_key = Some(vec!["a.key".into()]);
        assert!(Config::from_settings(bad).is_err());
        let mut bad = file.clone();
        bad.tls_cert = None;
        bad.tls_key = None;
        assert!(Config::from_settings(bad).is_err());
        let mut bad = file;
        bad.tls_listen = Some("off".into());
        assert!(Config::from_settings(bad).is_err());
    }
}
