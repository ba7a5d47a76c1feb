//! Authentication end to end, over real sockets on the backend under test: tokens minted
//! by a JWT library (jsonwebtoken) for every algorithm herald accepts, every refusal case,
//! grants, token sources, the 401/403/429 statuses, expiry with its notice, revocation by
//! `sub` and `jti` among 1,000 open streams, JWKS refetch on an unknown `kid`, publishing
//! with a token, and the access log's lines for every end reason with no token in them.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use herald::config::AuthConfig;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A fresh directory for one test's key files.
fn tmpdir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("herald-auth-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Signing keys for every algorithm family, made once per test process.
struct Keys {
    secret: Vec<u8>,
    rsa_private: String,
    rsa_public: String,
    p256: (String, String),
    p384: (String, String),
    ed25519: (String, String),
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        // herald's verifier (ring) must be the process's before jsonwebtoken picks its
        // default on the first signing, so these tests check the verifier herald runs.
        assert!(herald::auth::ring_verify::install());
        let rsa = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let ec = |alg: &'static rcgen::SignatureAlgorithm| {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            (kp.serialize_pem(), kp.public_key_pem())
        };
        Keys {
            secret: b"0123456789abcdef0123456789abcdef-herald-test".to_vec(),
            rsa_private: rsa.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            rsa_public: rsa
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
            p256: ec(&rcgen::PKCS_ECDSA_P256_SHA256),
            p384: ec(&rcgen::PKCS_ECDSA_P384_SHA384),
            ed25519: ec(&rcgen::PKCS_ED25519),
        }
    })
}

fn encoding_key(alg: Algorithm) -> EncodingKey {
    let k = keys();
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(&k.secret)
        }
        Algorithm::ES256 => EncodingKey::from_ec_pem(k.p256.0.as_bytes()).unwrap(),
        Algorithm::ES384 => EncodingKey::from_ec_pem(k.p384.0.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(k.ed25519.0.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(k.rsa_private.as_bytes()).unwrap(),
    }
}

fn mint_with(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, &encoding_key(alg)).unwrap()
}

/// A token for `sub` granting `subscribe`, valid for `ttl` seconds.
fn mint(alg: Algorithm, sub: &str, subscribe: &[&str], ttl: u64) -> String {
    let t = now();
    mint_with(
        alg,
        None,
        &json!({"sub": sub, "iat": t, "exp": t + ttl, "herald": {"subscribe": subscribe}}),
    )
}

/// Write every public key (one PEM file) and the secret; return an AuthConfig using them.
fn auth_files(tag: &str) -> AuthConfig {
    let k = keys();
    let d = tmpdir(tag);
    let pem = [&k.rsa_public, &k.p256.1, &k.p384.1, &k.ed25519.1]
        .map(|s| s.as_str())
        .join("\n");
    std::fs::write(d.join("keys.pem"), pem).unwrap();
    let mut secret = k.secret.clone();
    secret.push(b'\n');
    std::fs::write(d.join("secret"), secret).unwrap();
    AuthConfig {
        keys: Some(d.join("keys.pem")),
        secret_file: Some(d.join("secret")),
        ..base_auth()
    }
}

/// The defaults `--auth-*` flags give.
fn base_auth() -> AuthConfig {
    AuthConfig {
        jwks_refresh: Duration::from_secs(300),
        cookie: "herald_token".into(),
        expiry_notice: Duration::from_secs(30),
        max_lifetime: Duration::from_secs(7 * 86400),
        ..AuthConfig::default()
    }
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// A subscription attempt: (status, WWW-Authenticate).
fn try_subscribe(addr: SocketAddr, path: &str, extra: &str) -> (u16, Option<String>) {
    let c = Client::get(addr, path, extra);
    (c.status, c.headers.get("www-authenticate").cloned())
}

fn publish(ingest_addr: SocketAddr, topic: &str, data: &str) {
    let replies = ingest(ingest_addr, &[event_line(topic, data)]);
    assert!(replies.is_empty(), "ingest refused: {replies:?}");
}

const ALL_ALGS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[test]
fn a_token_of_every_algorithm_opens_its_stream_and_gets_events() {
    let auth = auth_files("algs");
    let Some(s) = start(|c| c.auth = auth) else {
        return;
    };
    let mut clients: Vec<(Algorithm, Client)> = ALL_ALGS
        .iter()
        .map(|&alg| {
            let sub = format!("{alg:?}");
            let token = mint(alg, &sub, &["user/{sub}/*"], 600);
            let c = Client::get(s.addr, &format!("/events/user/{sub}/feed"), &bearer(&token));
            assert_eq!(c.status, 200, "{alg:?}");
            (alg, c)
        })
        .collect();
    wait_streams(s.addr, ALL_ALGS.len() as u64);
    for (alg, _) in &clients {
        publish(
            s.ingest,
            &format!("user/{alg:?}/feed"),
            &format!("for {alg:?}"),
        );
    }
    for (alg, c) in &mut clients {
        let ev = &c.wait_events(1)[0];
        assert_eq!(ev.data, format!("for {alg:?}"));
    }
    assert_eq!(metric(s.addr, "herald_auth_streams_total"), 12);
}

#[test]
fn every_bad_token_is_refused_with_invalid_token_and_counted() {
    let mut auth = auth_files("refuse");
    auth.issuer = Some("https://idp.test".into());
    auth.audience = Some("herald".into());
    let Some(s) = start(|c| c.auth = auth) else {
        return;
    };
    let t = now();
    let ok_claims = |extra: Value| {
        let mut c = json!({"sub": "9", "iat": t, "exp": t + 600, "iss": "https://idp.test",
            "aud": "herald", "herald": {"subscribe": ["*"]}});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let good = mint_with(Algorithm::ES256, None, &ok_claims(json!({})));
    assert_eq!(
        try_subscribe(s.addr, "/events/x", &bearer(&good)).0,
        200,
        "the control token"
    );

    let b64 = |v: &Value| base64_url::encode(&v.to_string());
    // `alg: none`, unsigned.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&ok_claims(json!({})))
    );
    // Algorithm confusion: HS256 keyed with the RSA public key's PEM bytes, on a server
    // whose HMAC secret is something else.
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &ok_claims(json!({})),
        &EncodingKey::from_secret(keys().rsa_public.as_bytes()),
    )
    .unwrap();
    // A valid ES256 signature from a key herald does not know.
    let stranger = {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &ok_claims(json!({})),
            &EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let mut tampered = good.clone().into_bytes();
    let at = tampered.len() - 5;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", none, "malformed token"),
        ("algorithm confusion", confused, ""),
        ("unknown signer", stranger, "bad signature"),
        ("tampered signature", tampered, "bad signature"),
        (
            "expired",
            mint_with(Algorithm::ES256, None, &ok_claims(json!({"exp": t - 1}))),
            "token expired",
        ),
        (
            "not yet valid",
            mint_with(Algorithm::ES256, None, &ok_claims(json!({"nbf": t + 120}))),
            "token not yet valid",
        ),
        (
            "wrong issuer",
            mint_with(
                Algorithm::ES256,
                None,
                &ok_claims(json!({"iss": "https://evil.test"})),
            ),
            "wrong issuer",
        ),
        (
            "wrong audience",
            mint_with(
                Algorithm::ES256,
                None,
                &ok_claims(json!({"aud": "someone-else"})),
            ),
            "wrong audience",
        ),
        (
            "no exp",
            mint_with(Algorithm::ES256, None, &ok_claims(json!({"exp": null}))),
            "exp is required",
        ),
        (
            "lifetime over the limit",
            mint_with(
                Algorithm::ES256,
                None,
                &ok_claims(json!({"exp": t + 30 * 86400})),
            ),
            "token lifetime over --auth-max-lifetime",
        ),
        ("garbage", "not-a-jwt".into(), "malformed token"),
        (
            "oversized",
            format!("{}.{}.x", "a".repeat(3000), "b".repeat(2000)),
            "token too long",
        ),
    ];
    let n = cases.len() as u64;
    for (what, token, why) in cases {
        let (status, challenge) = try_subscribe(s.addr, "/events/x", &bearer(&token));
        assert_eq!(status, 401, "{what}");
        let challenge = challenge.unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer realm=\"herald\", error=\"invalid_token\""),
            "{what}: {challenge}"
        );
        assert!(
            challenge.contains(why),
            "{what}: {challenge} (wanted {why})"
        );
        assert!(
            !challenge.contains(&token),
            "{what}: the token must not be echoed"
        );
    }
    // Missing: a bare challenge, no error code (RFC 6750 §3.1).
    let (status, challenge) = try_subscribe(s.addr, "/events/x", "");
    assert_eq!(
        (status, challenge.as_deref()),
        (401, Some("Bearer realm=\"herald\""))
    );
    let refused = metric(s.addr, "herald_auth_refused_invalid_total")
        + metric(s.addr, "herald_auth_refused_expired_total");
    assert_eq!(refused, n);
    assert_eq!(metric(s.addr, "herald_auth_refused_missing_total"), 1);
    assert_eq!(metric(s.addr, "herald_http_401_total"), n + 1);
    // Nothing else was disturbed: the control token still streams.
    let mut c = Client::get(s.addr, "/events/x", &bearer(&good));
    assert_eq!(c.status, 200);
    wait_streams(s.addr, 1);
    publish(s.ingest, "x", "still here");
    assert_eq!(c.wait_events(1)[0].data, "still here");
}

#[test]
fn an_hmac_token_keyed_with_the_rsa_public_key_is_refused_by_an_rsa_only_server() {
    let d = tmpdir("confusion");
    std::fs::write(d.join("rsa.pem"), &keys().rsa_public).unwrap();
    let Some(s) = start(|c| {
        c.auth = AuthConfig {
            keys: Some(d.join("rsa.pem")),
            ..base_auth()
        }
    }) else {
        return;
    };
    let t = now();
    let claims = json!({"sub": "x", "iat": t, "exp": t + 60, "herald": {"subscribe": ["*"]}});
    let rs = mint_with(Algorithm::RS256, None, &claims);
    assert_eq!(try_subscribe(s.addr, "/events/x", &bearer(&rs)).0, 200);
    for secret in [
        keys().rsa_public.as_bytes(),
        keys().rsa_public.trim_end().as_bytes(),
    ] {
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap();
        let (status, challenge) = try_subscribe(s.addr, "/events/x", &bearer(&forged));
        assert_eq!(status, 401);
        assert!(challenge
            .unwrap()
            .contains("no key allows the token's algorithm"));
    }
}

/// base64url without padding, for hand-made tokens.
mod base64_url {
    pub fn encode(s: &str) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |acc, &x| acc << 8 | x as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}

#[test]
fn grants_with_sub_and_star_and_public_topics() {
    let mut auth = auth_files("grants");
    auth.public_topics = vec!["public/*".into()];
    let Some(s) = start(|c| c.auth = auth) else {
        return;
    };
    let token = mint(Algorithm::HS256, "42", &["user/{sub}/*", "news"], 600);
    let h = bearer(&token);
    let cases: &[(&str, &str, u16)] = &[
        ("own topic", "/events/user/42/orders", 200),
        ("own topic, deeper", "/events/user/42/a/b", 200),
        ("someone else's", "/events/user/43/orders", 403),
        ("a prefix of the sub", "/events/user/4/orders", 403),
        ("a literal grant", "/events/news", 200),
        ("not the literal", "/events/news2", 403),
        (
            "one topic not granted",
            "/events?topic=user/42/a&topic=secret",
            403,
        ),
        (
            "public and granted",
            "/events?topic=user/42/a&topic=public/x",
            200,
        ),
    ];
    for &(what, path, want) in cases {
        let (status, challenge) = try_subscribe(s.addr, path, &h);
        assert_eq!(status, want, "{what}");
        if want == 403 {
            assert!(
                challenge
                    .unwrap_or_default()
                    .contains("error=\"insufficient_scope\""),
                "{what}"
            );
        }
    }
    // Public topics need no token, and a bad token there is ignored.
    assert_eq!(try_subscribe(s.addr, "/events/public/lobby", "").0, 200);
    assert_eq!(
        try_subscribe(s.addr, "/events/public/lobby", &bearer("garbage")).0,
        200
    );
    // Non-public without a token.
    assert_eq!(try_subscribe(s.addr, "/events/news", "").0, 401);
    // A token without `sub` gets nothing from a `{sub}` pattern.
    let t = now();
    let anon = mint_with(
        Algorithm::HS256,
        None,
        &json!({"iat": t, "exp": t + 60, "herald": {"subscribe": ["user/{sub}/*"]}}),
    );
    assert_eq!(
        try_subscribe(s.addr, "/events/user/42/orders", &bearer(&anon)).0,
        403
    );
    assert_eq!(metric(s.addr, "herald_auth_refused_scope_total"), 5);
}

#[test]
fn the_token_comes_from_the_header_then_the_cookie_then_the_query_if_configured() {
    let mut auth = auth_files("sources");
    auth.cookie = "sess".into();
    auth.query_param = Some("access_token".into());
    let Some(s) = start(|c| c.auth = auth) else {
        return;
    };
    let good = mint(Algorithm::ES256, "7", &["t"], 600);
    let cookie = |v: &str| format!("Cookie: theme=dark; sess={v}; other=1\r\n");
    let cases: Vec<(&str, String, String, u16)> = vec![
        ("header", "/events/t".into(), bearer(&good), 200),
        ("cookie", "/events/t".into(), cookie(&good), 200),
        (
            "quoted cookie",
            "/events/t".into(),
            cookie(&format!("\"{good}\"")),
            200,
        ),
        (
            "query",
            format!("/events/t?access_token={good}"),
            String::new(),
            200,
        ),
        (
            "header wins over a bad cookie",
            "/events/t".into(),
            bearer(&good) + &cookie("bad"),
            200,
        ),
        (
            "a bad header wins over a good cookie",
            "/events/t".into(),
            bearer("bad") + &cookie(&good),
            401,
        ),
        (
            "cookie wins over a bad query",
            "/events/t?access_token=bad".to_string(),
            cookie(&good),
            200,
        ),
        (
            "another cookie name",
            "/events/t".into(),
            format!("Cookie: herald_token={good}\r\n"),
            401,
        ),
        (
            "another scheme",
            "/events/t".into(),
            format!("Authorization: Basic {good}\r\n"),
            401,
        ),
    ];
    for (what, path, extra, want) in cases {
        assert_eq!(try_subscribe(s.addr, &path, &extra).0, want, "{what}");
    }
}

#[test]
fn the_query_parameter_is_ignored_unless_configured() {
    let auth = auth_files("noquery");
    let Some(s) = start(|c| c.auth = auth) else {
        return;
    };
    let good = mint(Algorithm::ES256, "7", &["t"], 600);
    assert_eq!(
        try_subscribe(s.addr, &format!("/events/t?access_token={good}"), "").0,
        401
    );
}

#[test]
fn streams_per_user_are_limited_with_429_and_freed_when_a_stream_ends() {
    let mut auth = auth_files("limit");
    auth.max_streams_per_user = 2;
    let Some(s) = start(|c| c.auth = auth) else {
        return;
    };
    let token = mint(Algorithm::HS256, "u1", &["*"], 600);
    let other = mint(Algorithm::HS256, "u2", &["*"], 600);
    let a = Client::get(s.addr, "/events/a", &bearer(&token));
    let b = Client::get(s.addr, "/events/b", &bearer(&token));
    assert_eq!((a.status, b.status), (200, 200));
    let third = Client::get(s.addr, "/events/c", &bearer(&token));
    assert_eq!(third.status, 429);
    assert!(third.headers.contains_key("retry-after"));
    assert_eq!(
        Client::get(s.addr, "/events/c", &bearer(&other)).status,
        200,
        "another user"
    );
    drop(a);
    wait_for("the limit to free a slot", || {
        Client::get(s.addr, "/events/c", &bearer(&token)).status == 200
    });
    assert!(metric(s.addr, "herald_http_429_total") >= 1);
}

#[test]
fn a_stream_gets_its_expiry_notice_then_ends_before_exp_with_a_retry_hint() {
    let mut auth = auth_files("expiry");
    auth.expiry_notice = Duration::from_secs(1);
    let Some(s) = start(|c| c.auth = auth) else {
        return;
    };
    let token = mint(Algorithm::ES256, "e", &["exp"], 5);
    let exp = now() + 5;
    let mut c = Client::get(s.addr, "/events/exp", &bearer(&token));
    assert_eq!(c.status, 200);
    wait_streams(s.addr, 1);
    publish(s.ingest, "exp", "before");
    c.wait_events(2);
    let notice_at = Instant::now();
    assert_eq!(c.events[0].data, "before");
    assert_eq!(c.events[1].event, "herald-auth-expiring");
    let data: Value = serde_json::from_str(&c.events[1].data).unwrap();
    assert!(data["exp"].as_u64().unwrap().abs_diff(exp) <= 1, "{data}");
    assert_eq!(
        c.events[1].id, c.events[0].id,
        "the notice carries no id: lastEventId stays the last event's"
    );
    c.read_to_end();
    let ended = now();
    assert!(
        ended <= exp,
        "the stream outlived its token: ended {ended}, exp {exp}"
    );
    assert!(
        notice_at.elapsed() >= Duration::from_millis(800),
        "the notice came {:?} before the end",
        notice_at.elapsed()
    );
    assert!(c.parser.retry.is_some(), "a retry: hint before the end");
    assert_eq!(metric(s.addr, "herald_auth_streams_expired_total"), 1);
    assert_eq!(metric(s.addr, "herald_auth_expiry_notices_total"), 1);
}

/// Subscribers whose requests each carry their own headers.
fn crowd_with(addr: SocketAddr, reqs: &[(String, String)]) -> Crowd {
    let poll = mio::Poll::new().unwrap();
    let mut conns = Vec::new();
    for (i, (path, extra)) in reqs.iter().enumerate() {
        let mut st = std::net::TcpStream::connect(addr).expect("connect");
        write!(st, "GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n").unwrap();
        st.set_nonblocking(true).unwrap();
        let mut stream = mio::net::TcpStream::from_std(st);
        poll.registry()
            .register(&mut stream, mio::Token(i), mio::Interest::READABLE)
            .unwrap();
        conns.push(CrowdConn::new(stream));
    }
    Crowd::from_parts(poll, conns)
}

#[test]
fn revocation_by_sub_and_by_jti_ends_exactly_those_streams_among_1000() {
    let auth = auth_files("revoke");
    let Some(s) = start(|c| c.auth = auth) else {
        return;
    };
    let t = now();
    let token = |sub: usize, k: usize| {
        mint_with(
            Algorithm::HS256,
            None,
            &json!({"sub": sub.to_string(), "jti": format!("{sub}-{k}"), "iat": t - 2,
                "exp": t + 600, "herald": {"subscribe": ["user/{sub}"]}}),
        )
    };
    // 100 users with 10 streams each.
    let reqs: Vec<(String, String)> = (0..1000)
        .map(|i| {
            (
                format!("/events/user/{}", i / 10),
                bearer(&token(i / 10, i % 10)),
            )
        })
        .collect();
    let mut crowd = crowd_with(s.addr, &reqs);
    wait_streams(s.addr, 1000);
    let revoke = |line: Value| {
        let r = ingest(s.ingest, &[line.to_string()]);
        assert!(r.is_empty(), "{r:?}");
    };
    revoke(json!({"control": "disconnect", "sub": "7"}));
    revoke(json!({"control": "disconnect", "jti": "8-3"}));
    let gone = |i: usize| i / 10 == 7 || i == 83;
    assert!(
        crowd.pump_until(WAIT, |cs| cs
            .iter()
            .enumerate()
            .all(|(i, c)| c.closed == gone(i))),
        "exactly the revoked streams end"
    );
    for u in 0..100 {
        publish(s.ingest, &format!("user/{u}"), &format!("to {u}"));
    }
    assert!(
        crowd.pump_until(WAIT, |cs| {
            cs.iter()
                .enumerate()
                .all(|(i, c)| gone(i) || c.events.len() == 1)
        }),
        "every other stream still gets its events"
    );
    assert!(crowd
        .conns
        .iter()
        .enumerate()
        .all(|(i, c)| gone(i) || !c.closed));
    assert_eq!(metric(s.addr, "herald_auth_streams_revoked_total"), 11);
    // The revoked tokens are refused from now on; the others still work, and so does a
    // token for sub 7 issued after the revocation.
    let (status, challenge) = try_subscribe(s.addr, "/events/user/7", &bearer(&token(7, 0)));
    assert_eq!(status, 401);
    assert!(challenge.unwrap().contains("token revoked"));
    assert_eq!(
        try_subscribe(s.addr, "/events/user/8", &bearer(&token(8, 3))).0,
        401
    );
    assert_eq!(
        try_subscribe(s.addr, "/events/user/8", &bearer(&token(8, 4))).0,
        200
    );
    let fresh = mint_with(
        Algorithm::HS256,
        None,
        &json!({"sub": "7", "iat": now() + 1, "exp": now() + 600, "herald": {"subscribe": ["user/{sub}"]}}),
    );
    assert_eq!(
        try_subscribe(s.addr, "/events/user/7", &bearer(&fresh)).0,
        200
    );
    // Bad control lines get an error line.
    let r = ingest(s.ingest, &[json!({"control": "disconnect"}).to_string()]);
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].contains("exactly one of"), "{r:?}");
    assert_eq!(metric(s.addr, "herald_auth_revocations"), 2);
}

#[test]
fn disconnect_without_authentication_is_an_error_line() {
    let Some(s) = start(|_| {}) else {
        return;
    };
    let r = ingest(
        s.ingest,
        &[json!({"control": "disconnect", "sub": "1"}).to_string()],
    );
    assert_eq!(r.len(), 1);
    assert!(r[0].contains("needs authentication"), "{r:?}");
}

/// A JWKS endpoint: serves the current document, counts requests.
struct Jwks {
    addr: SocketAddr,
    doc: Arc<Mutex<(u16, String)>>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl Jwks {
    fn serve(doc: String) -> Jwks {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let doc = Arc::new(Mutex::new((200u16, doc)));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (d, h) = (doc.clone(), hits.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (status, body) = d.lock().unwrap().clone();
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Jwks { addr, doc, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A JWKS document with the P-256 test key under each of `kids`.
fn jwks_doc(kids: &[&str]) -> String {
    let key = EncodingKey::from_ec_pem(keys().p256.0.as_bytes()).unwrap();
    let keys: Vec<Value> = kids
        .iter()
        .map(|kid| {
            let mut jwk = serde_json::to_value(
                jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap(),
            )
            .unwrap();
            jwk["kid"] = json!(kid);
            jwk
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

#[test]
fn an_unknown_kid_waits_for_one_jwks_refetch_and_a_failed_fetch_keeps_the_old_keys() {
    let jwks = Jwks::serve(jwks_doc(&["k1"]));
    let url = format!("http://{}/keys.json", jwks.addr);
    let Some(s) = start(|c| {
        c.auth = AuthConfig {
            jwks_url: Some(url),
            ..base_auth()
        }
    }) else {
        return;
    };
    let t = now();
    let claims = json!({"sub": "j", "iat": t, "exp": t + 600, "herald": {"subscribe": ["*"]}});
    let k1 = mint_with(Algorithm::ES256, Some("k1"), &claims);
    let k2 = mint_with(Algorithm::ES256, Some("k2"), &claims);
    let k3 = mint_with(Algorithm::ES256, Some("k3"), &claims);
    // The first fetch happens at start; a request racing it would wait for it.
    wait_for("the first JWKS fetch", || {
        metric(s.addr, "herald_auth_jwks_keys") == 1
    });
    assert_eq!(try_subscribe(s.addr, "/events/a", &bearer(&k1)).0, 200);
    let before = jwks.hits();
    // Rotation: k2 appears. Its first request waits for one refetch and gets in.
    *jwks.doc.lock().unwrap() = (200, jwks_doc(&["k1", "k2"]));
    assert_eq!(try_subscribe(s.addr, "/events/a", &bearer(&k2)).0, 200);
    assert_eq!(jwks.hits(), before + 1, "one refetch for the unknown kid");
    // Another unknown kid within 10 s: no second refetch, refused at once.
    let started = Instant::now();
    let (status, challenge) = try_subscribe(s.addr, "/events/a", &bearer(&k3));
    assert_eq!(status, 401);
    assert!(challenge.unwrap().contains("unknown key id"));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(jwks.hits(), before + 1);
    assert!(metric(s.addr, "herald_auth_waits_total") >= 1);
    // The endpoint fails: the next scheduled or requested fetch keeps the last good set.
    *jwks.doc.lock().unwrap() = (500, "oops".into());
    assert_eq!(try_subscribe(s.addr, "/events/a", &bearer(&k2)).0, 200);
}

#[test]
fn publishing_with_a_token_works_from_any_address_and_only_for_granted_topics() {
    let auth = auth_files("publish");
    let Some(s) = start(|c| {
        c.auth = auth;
        // No address may publish without a token.
        c.publish_allow = vec!["192.0.2.1/32".parse().unwrap()];
    }) else {
        return;
    };
    let t = now();
    let token = mint_with(
        Algorithm::ES256,
        None,
        &json!({"sub": "p", "iat": t, "exp": t + 600,
            "herald": {"publish": ["user/{sub}/*"], "subscribe": ["user/{sub}/*"]}}),
    );
    let mut sub = Client::get(s.addr, "/events/user/p/in", &bearer(&token));
    assert_eq!(sub.status, 200);
    wait_streams(s.addr, 1);
    let post = |topic: &str, extra: &str| {
        let req = format!(
            "POST /publish/{topic} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}Content-Length: 5\r\n\r\nhello"
        );
        raw_request(s.addr, req.as_bytes())
    };
    assert_eq!(
        post("user/p/in", "").status,
        403,
        "no token, address not allowed"
    );
    assert_eq!(post("user/p/in", &bearer(&token)).status, 200);
    assert_eq!(sub.wait_events(1)[0].data, "hello");
    let r = post("user/q/in", &bearer(&token));
    assert_eq!(r.status, 403);
    assert!(r.headers["www-authenticate"].contains("insufficient_scope"));
    assert_eq!(post("user/p/in", &bearer("garbage")).status, 401);
    assert_eq!(
        post("user/p/in", &format!("Cookie: herald_token={token}\r\n")).status,
        403,
        "a cookie never publishes"
    );
    assert_eq!(metric(s.addr, "herald_auth_publishes_total"), 1);
}

#[test]
fn the_access_log_has_a_line_for_every_end_reason_and_never_a_token() {
    let pki = common::tls::Pki::new();
    let (cert, key, _) = pki.leaf(&["localhost", "127.0.0.1"], "leaf");
    let dir = tmpdir("log");
    let log_path = dir.join("access.log");
    let mut auth = auth_files("log");
    auth.expiry_notice = Duration::from_millis(200);
    auth.query_param = Some("access_token".into());
    auth.public_topics = vec!["pub/*".into()];
    let log = log_path.clone();
    let Some(s) = start(move |c| {
        c.auth = auth;
        c.access_log = Some(herald::config::AccessLogTarget::File(log));
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_certs = vec![herald::tls::CertPair { cert, key }];
        c.write_timeout = Duration::from_millis(500);
        c.max_backlog = 8 << 20;
        c.drain_window = Duration::from_millis(300);
    }) else {
        return;
    };
    let tls_addr = s.tls.unwrap();
    let long = mint(Algorithm::HS256, "logger", &["*"], 600);
    let short = mint(Algorithm::HS256, "short", &["*"], 3);
    let revoked = mint(Algorithm::HS256, "gone", &["*"], 600);
    let mut secrets = vec![long.clone(), short.clone(), revoked.clone()];

    // client: leaves by itself.
    let c = Client::get(s.addr, "/events/pub/client", "");
    assert_eq!(c.status, 200);
    // expired.
    let mut expired = Client::get(s.addr, "/events/short", &bearer(&short));
    assert_eq!(expired.status, 200);
    // revoked.
    let mut rev = Client::get(
        s.addr,
        &format!("/events/rev?access_token={revoked}&lastEventId=5"),
        "",
    );
    assert_eq!(rev.status, 200);
    // topic-closed.
    let mut closed = Client::get(
        s.addr,
        "/events/pub/closed",
        &format!("Cookie: herald_token={long}\r\n"),
    );
    assert_eq!(closed.status, 200);
    // slow and stall: subscribers that never read, with a tiny receive window.
    let stuck = |topic: &str| {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&s.addr.into()).unwrap();
        let mut st: TcpStream = sock.into();
        write!(
            st,
            "GET /events/{topic} HTTP/1.1\r\nHost: t\r\n{}\r\n",
            bearer(&long)
        )
        .unwrap();
        st
    };
    let slow = stuck("slow");
    let stall = stuck("stall");
    // error: a TLS stream whose client then sends garbage records.
    let cfg = pki.client().build();
    let mut tls =
        common::tls::TlsClient::tls_get(tls_addr, "localhost", &cfg, "/events/pub/tls", "");
    assert_eq!(tls.status, 200);
    // drain: open until shutdown.
    let drain = Client::get(s.addr, "/events/pub/drain", "");
    assert_eq!(drain.status, 200);
    // A refused request and a plain request.
    assert_eq!(
        try_subscribe(s.addr, "/events/private", &bearer("garbage-token-value")).0,
        401
    );
    secrets.push("garbage-token-value".into());
    assert_eq!(http_get(s.addr, "/healthz").status, 200);
    wait_streams(s.addr, 8);

    drop(c);
    let big = "x".repeat(1 << 20);
    for _ in 0..20 {
        publish(s.ingest, "slow", &big);
    }
    for _ in 0..6 {
        publish(s.ingest, "stall", &big);
    }
    ingest(
        s.ingest,
        &[json!({"control": "disconnect", "sub": "gone"}).to_string()],
    );
    ingest(
        s.ingest,
        &[json!({"topic": "pub/closed", "control": "close"}).to_string()],
    );
    tls.stream
        .sock
        .write_all(b"\x17\x03\x03\x00\x05garbage")
        .unwrap();
    expired.read_to_end();
    rev.read_to_end();
    closed.read_to_end();
    let _ = tls.read_to_close();
    wait_for("slow and stalled streams to be cut", || {
        metric(s.addr, "herald_slow_consumer_disconnects_total") >= 2
    });
    wait_streams_at_most(s.addr, 1);
    s.stop();
    drop((slow, stall, drain));

    let text = std::fs::read_to_string(&log_path).unwrap();
    for secret in &secrets {
        assert!(
            !text.contains(secret.as_str()),
            "a token is in the access log"
        );
        let sig = secret.rsplit('.').next().unwrap();
        assert!(
            sig.len() < 8 || !text.contains(sig),
            "a token's signature is in the access log"
        );
    }
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ends: Vec<&Value> = lines.iter().filter(|l| l["ev"] == "end").collect();
    let mut reasons: Vec<&str> = ends.iter().map(|l| l["reason"].as_str().unwrap()).collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "client",
            "drain",
            "error",
            "expired",
            "revoked",
            "slow",
            "stall",
            "topic-closed"
        ],
        "{text}"
    );
    for l in &lines {
        for key in ["ts", "worker", "conn", "remote", "proto", "status"] {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
        }
    }
    let starts = lines.iter().filter(|l| l["ev"] == "start").count();
    assert_eq!(starts, 8, "{text}");
    for e in &ends {
        for key in [
            "topics",
            "sub",
            "last_event_id",
            "duration_ms",
            "events",
            "bytes",
        ] {
            assert!(e.get(key).is_some(), "{key} missing in {e}");
        }
    }
    let by_reason = |r: &str| *ends.iter().find(|l| l["reason"] == r).unwrap();
    assert_eq!(by_reason("revoked")["sub"], "gone");
    assert_eq!(by_reason("revoked")["last_event_id"], "5");
    assert_eq!(by_reason("revoked")["topics"], json!(["rev"]));
    assert_eq!(by_reason("expired")["sub"], "short");
    assert_eq!(by_reason("error")["tls"], true);
    assert!(by_reason("slow")["bytes"].as_u64().unwrap() > 0);
    let requests: Vec<&Value> = lines.iter().filter(|l| l["ev"] == "request").collect();
    assert!(requests
        .iter()
        .any(|l| l["status"] == 401 && l["path"] == "/events/private"));
    assert!(requests
        .iter()
        .any(|l| l["status"] == 200 && l["path"] == "/healthz"));
    assert!(
        !text.contains("access_token"),
        "the query string is never logged"
    );
}

/// Wait until at most `n` streams are open.
fn wait_streams_at_most(addr: SocketAddr, n: u64) {
    wait_for(&format!("at most {n} open streams"), || {
        metric(addr, "herald_streams_open") <= n
    });
}

#[test]
fn a_certificate_pem_gives_its_public_key_and_a_numeric_sub_is_a_string() {
    let kp = rcgen::KeyPair::from_pem(&keys().p256.0).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["issuer.test".to_string()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    let d = tmpdir("cert");
    std::fs::write(d.join("issuer.crt"), cert.pem()).unwrap();
    let Some(s) = start(|c| {
        c.auth = AuthConfig {
            keys: Some(d.join("issuer.crt")),
            ..base_auth()
        }
    }) else {
        return;
    };
    let t = now();
    let token = mint_with(
        Algorithm::ES256,
        None,
        &json!({"sub": 42, "iat": t, "exp": t + 60, "herald": {"subscribe": ["user/{sub}"]}}),
    );
    assert_eq!(
        try_subscribe(s.addr, "/events/user/42", &bearer(&token)).0,
        200
    );
    assert_eq!(
        try_subscribe(s.addr, "/events/user/43", &bearer(&token)).0,
        403
    );
}

#[test]
fn a_key_file_with_a_private_key_is_refused_at_start() {
    let d = tmpdir("private");
    std::fs::write(d.join("k.pem"), &keys().p256.0).unwrap();
    let cfg = AuthConfig {
        keys: Some(d.join("k.pem")),
        ..base_auth()
    };
    let err = herald::auth::Auth::new(&cfg).unwrap_err();
    assert!(err.contains("private key"), "{err}");
}
