//! `mint-token`: prints a JWT for herald's authentication (see CONTRACT.md,
//! "Authentication (optional)"), for benchmarks and manual tests.
//!
//! Claims: `exp` (now + --ttl), `iat` (now), `sub`, `jti` (128 random bits, hex),
//! `herald: {"subscribe": [...], "publish": [...]}`, and `iss` / `aud` when given.
//! HMAC keys (HS256/384/512) are read from a secret file: its bytes with one trailing
//! newline stripped, as herald's `--auth-secret-file`. Other algorithms take a PKCS#8 PEM
//! private key (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey` writes; RS*/PS* also
//! PKCS#1 `BEGIN RSA PRIVATE KEY`).

use std::io::Read;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// Print a signed JWT with herald's claims on stdout.
///
/// Example: mint-token --alg ES256 --key es256.key --sub alice --ttl 1h --subscribe 'news,user-{sub}'
#[derive(Parser, Debug)]
#[command(name = "mint-token", version)]
struct Opt {
    /// Signing algorithm: HS256, HS384, HS512, ES256, ES384, RS256, RS384, RS512, PS256,
    /// PS384, PS512, EdDSA.
    #[arg(long, value_parser = parse_alg)]
    alg: Algorithm,
    /// HS*: secret file (its bytes, one trailing newline stripped); otherwise a PKCS#8
    /// PEM private key.
    #[arg(long)]
    key: PathBuf,
    /// The `sub` claim.
    #[arg(long)]
    sub: String,
    /// Lifetime: `exp` = now + TTL. Seconds, or a number with s, m, h or d; negative
    /// (e.g. --ttl=-1m) for an already expired token.
    #[arg(long, default_value = "1h", value_parser = parse_ttl, allow_hyphen_values = true)]
    ttl: i64,
    /// herald.subscribe: topic patterns, comma-separated (`*` any run of characters,
    /// `{sub}` the token's sub).
    #[arg(long, value_delimiter = ',')]
    subscribe: Vec<String>,
    /// herald.publish: topic patterns, comma-separated.
    #[arg(long, value_delimiter = ',')]
    publish: Vec<String>,
    /// `kid` in the header (to pick a key from a JWKS).
    #[arg(long)]
    kid: Option<String>,
    /// The `iss` claim.
    #[arg(long)]
    iss: Option<String>,
    /// The `aud` claim.
    #[arg(long)]
    aud: Option<String>,
    /// `iat` this many seconds in the past (e.g. to test revocation by `sub`, which
    /// refuses tokens issued before it).
    #[arg(long, default_value_t = 0)]
    iat_ago: u64,
}

#[derive(Serialize)]
struct Grants<'a> {
    subscribe: &'a [String],
    publish: &'a [String],
}

#[derive(Serialize)]
struct Claims<'a> {
    exp: i64,
    iat: i64,
    sub: &'a str,
    jti: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    herald: Grants<'a>,
}

fn parse_alg(s: &str) -> Result<Algorithm, String> {
    s.parse::<Algorithm>()
        .map_err(|_| format!("unknown algorithm {s:?}"))
}

/// "90", "90s", "15m", "1h", "7d", "-1m" → seconds.
fn parse_ttl(s: &str) -> Result<i64, String> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: i64 = num.trim().parse().map_err(|_| format!("bad --ttl {s:?}"))?;
    let mul = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("bad --ttl unit in {s:?} (s, m, h, d)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("--ttl {s:?} too large"))
}

/// The secret file's bytes with one trailing newline stripped.
fn secret(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(b"\n").unwrap_or(bytes)
}

fn random_hex(n: usize) -> Result<String> {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn encoding_key(alg: Algorithm, bytes: &[u8]) -> Result<EncodingKey> {
    use Algorithm::*;
    Ok(match alg {
        HS256 | HS384 | HS512 => {
            let s = secret(bytes);
            if s.is_empty() {
                bail!("the secret file is empty");
            }
            EncodingKey::from_secret(s)
        }
        ES256 | ES384 => EncodingKey::from_ec_pem(bytes)?,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => EncodingKey::from_rsa_pem(bytes)?,
        EdDSA => EncodingKey::from_ed_pem(bytes)?,
    })
}

fn main() -> Result<()> {
    let opt = Opt::parse();
    let bytes =
        std::fs::read(&opt.key).with_context(|| format!("reading --key {}", opt.key.display()))?;
    let key = encoding_key(opt.alg, &bytes)
        .with_context(|| format!("--key {} as a {:?} key", opt.key.display(), opt.alg))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let claims = Claims {
        exp: now + opt.ttl,
        iat: now - opt.iat_ago as i64,
        sub: &opt.sub,
        jti: random_hex(16)?,
        iss: opt.iss.as_deref(),
        aud: opt.aud.as_deref(),
        herald: Grants {
            subscribe: &opt.subscribe,
            publish: &opt.publish,
        },
    };
    let mut header = Header::new(opt.alg);
    header.kid = opt.kid.clone();
    let token = jsonwebtoken::encode(&header, &claims, &key).context("signing")?;
    println!("{token}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("2d"), Ok(172_800));
        assert_eq!(parse_ttl("-1m"), Ok(-60));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
    }

    #[test]
    fn secret_strips_one_newline() {
        assert_eq!(secret(b"abc\n"), b"abc");
        assert_eq!(secret(b"abc\n\n"), b"abc\n");
        assert_eq!(secret(b"abc"), b"abc");
        assert_eq!(secret(b"abc\r\n"), b"abc\r");
    }

    /// base64url without padding → bytes (for the signature in `verify_cost`).
    fn b64url(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url"),
        };
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for &c in s.as_bytes() {
            acc = (acc << 6) | u32::from(val(c));
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }

    /// What verifying one token costs on this machine: jsonwebtoken 10's `decode`
    /// (RustCrypto, as herald verifies) for ES256 and HS256, and ring's ECDSA P-256
    /// verification of the same ES256 signature (ring is already in the build for TLS).
    /// `cargo test --release -p herald-bench --bin mint-token -- --ignored --nocapture verify_cost`
    #[test]
    #[ignore]
    fn verify_cost() {
        use jsonwebtoken::{decode, DecodingKey, Validation};
        use ring::signature::{self, EcdsaKeyPair, KeyPair};
        use std::time::Instant;
        let rng = ring::rand::SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let subs = vec!["bench".to_string()];
        let claims = Claims {
            exp: 4_000_000_000,
            iat: 1,
            sub: "bench",
            jti: random_hex(16).unwrap(),
            iss: None,
            aud: None,
            herald: Grants {
                subscribe: &subs,
                publish: &[],
            },
        };
        let es = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_der(pkcs8.as_ref()),
        )
        .unwrap();
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        let n = 2000;
        let time = |name: &str, f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
            println!("{name:<44} {us:>8.1} µs per token");
        };
        let es_key = DecodingKey::from_ec_der(kp.public_key().as_ref());
        let es_val = Validation::new(Algorithm::ES256);
        time("jsonwebtoken decode ES256 (RustCrypto p256)", &mut || {
            decode::<serde_json::Value>(&es, &es_key, &es_val).unwrap();
        });
        let hs_key = DecodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let hs_val = Validation::new(Algorithm::HS256);
        time("jsonwebtoken decode HS256", &mut || {
            decode::<serde_json::Value>(&hs, &hs_key, &hs_val).unwrap();
        });
        let (input, sig) = es.rsplit_once('.').unwrap();
        let sig = b64url(sig);
        let pk = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            kp.public_key().as_ref().to_vec(),
        );
        time("ring ECDSA P-256 verify (same signature)", &mut || {
            pk.verify(input.as_bytes(), &sig).unwrap();
        });
    }

    #[test]
    fn hs256_round_trip() {
        use jsonwebtoken::{decode, DecodingKey, Validation};
        let key = encoding_key(Algorithm::HS256, b"s3cret\n").unwrap();
        let subs = vec!["bench".to_string()];
        let claims = Claims {
            exp: 4_000_000_000,
            iat: 1,
            sub: "u",
            jti: random_hex(16).unwrap(),
            iss: None,
            aud: None,
            herald: Grants {
                subscribe: &subs,
                publish: &[],
            },
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        let v: serde_json::Value = decode(
            &t,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::new(Algorithm::HS256),
        )
        .unwrap()
        .claims;
        assert_eq!(v["herald"]["subscribe"][0], "bench");
        assert_eq!(v["herald"]["publish"], serde_json::json!([]));
        assert_eq!(v["jti"].as_str().unwrap().len(), 32);
        assert!(v.get("iss").is_none());
    }
}
