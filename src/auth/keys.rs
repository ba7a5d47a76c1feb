//! Verification keys and the algorithms each one allows. The algorithm is fixed by the key,
//! never by the token: an HMAC secret allows HS256/384/512 only, an RSA key RS* and PS*, a
//! P-256 key ES256, a P-384 key ES384, an Ed25519 key EdDSA. So a token that names `HS256`
//! and is signed with an RSA public key's bytes finds no key that allows it.

use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};

/// One verification key.
pub struct Key {
    /// `kid` from a JWKS (PEM keys and secrets have none).
    pub kid: Option<String>,
    pub algs: Vec<Algorithm>,
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algs", &self.algs)
            .finish()
    }
}

const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The HMAC secret of `--auth-secret-file`: the file's bytes, one trailing newline stripped.
pub fn load_secret(path: &Path) -> Result<Key, String> {
    let mut bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.len() < 32 {
        // RFC 7518 §3.2: a key at least as long as the hash output (HS256: 32 bytes).
        return Err(format!(
            "{}: an HMAC secret must be at least 32 bytes (it has {})",
            path.display(),
            bytes.len()
        ));
    }
    Ok(Key {
        kid: None,
        algs: HMAC.to_vec(),
        key: DecodingKey::from_secret(&bytes),
    })
}

/// `--auth-keys`: a JWKS (JSON) file, or PEM public keys (`PUBLIC KEY`, `RSA PUBLIC KEY`,
/// or a `CERTIFICATE`, whose public key is used; its validity is not checked).
pub fn load_keys_file(path: &Path) -> Result<Vec<Key>, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let first = text.iter().find(|b| !b.is_ascii_whitespace());
    let keys = if first == Some(&b'{') {
        parse_jwks(&text)
    } else {
        parse_pem(&text)
    }
    .map_err(|e| format!("{}: {e}", path.display()))?;
    if keys.is_empty() {
        return Err(format!("{}: no usable key", path.display()));
    }
    Ok(keys)
}

/// Keys of a JWKS document. Keys for encryption (`use: enc`) or of kinds herald cannot
/// verify with are skipped; an unreadable document is an error.
pub fn parse_jwks(text: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut out = Vec::new();
    for jwk in &set.keys {
        match jwk_key(jwk) {
            Ok(Some(k)) => out.push(k),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(kid = ?jwk.common.key_id, error = %e, "JWKS key skipped")
            }
        }
    }
    Ok(out)
}

fn jwk_key(jwk: &Jwk) -> Result<Option<Key>, String> {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return Ok(None);
    }
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA.to_vec(),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err("unsupported curve".into()),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => return Err("unsupported curve".into()),
        },
        AlgorithmParameters::OctetKey(_) => HMAC.to_vec(),
    };
    // A key that names its algorithm allows that one only (if its kind agrees).
    let algs = match jwk.common.key_algorithm {
        Some(ka) => {
            let Ok(alg) = ka.to_string().parse::<Algorithm>() else {
                return Ok(None);
            };
            if !family.contains(&alg) {
                return Err(format!("alg {ka} does not fit the key type"));
            }
            vec![alg]
        }
        None => family,
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    Ok(Some(Key {
        kid: jwk.common.key_id.clone(),
        algs,
        key,
    }))
}

/// Every public key in a PEM file.
fn parse_pem(text: &[u8]) -> Result<Vec<Key>, String> {
    use spki::der::Decode as _;
    use spki::SubjectPublicKeyInfoRef;
    let text = std::str::from_utf8(text).map_err(|_| "neither JSON nor PEM".to_string())?;
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let Some(end_at) = block.find("-----END ") else {
            return Err("unterminated PEM block".into());
        };
        let tail = &block[end_at + 9..];
        let close = tail.find("-----").ok_or("unterminated PEM block")? + 5;
        let pem = &block[..end_at + 9 + close];
        rest = &tail[close..];
        let label = pem["-----BEGIN ".len()..]
            .split("-----")
            .next()
            .unwrap_or("");
        match label {
            "RSA PUBLIC KEY" => out.push(Key {
                kid: None,
                algs: RSA.to_vec(),
                key: DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| e.to_string())?,
            }),
            "PUBLIC KEY" => {
                let der = spki::Document::from_pem(pem)
                    .map_err(|e| format!("bad PUBLIC KEY block: {e}"))?
                    .1;
                let info = SubjectPublicKeyInfoRef::from_der(der.as_bytes())
                    .map_err(|e| format!("bad PUBLIC KEY block: {e}"))?;
                out.push(spki_key(pem, &info)?);
            }
            "CERTIFICATE" => {
                use rustls::pki_types::pem::PemObject as _;
                let cert = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| format!("bad CERTIFICATE block: {e}"))?;
                let ee = webpki::EndEntityCert::try_from(&cert)
                    .map_err(|e| format!("bad CERTIFICATE block: {e}"))?;
                let spki_der = ee.subject_public_key_info();
                let doc = spki::Document::try_from(spki_der.as_ref())
                    .map_err(|e| format!("bad certificate public key: {e}"))?;
                let spki_pem = doc
                    .to_pem("PUBLIC KEY", spki::der::pem::LineEnding::LF)
                    .map_err(|e| format!("bad certificate public key: {e}"))?;
                let info = SubjectPublicKeyInfoRef::from_der(doc.as_bytes())
                    .map_err(|e| format!("bad certificate public key: {e}"))?;
                out.push(spki_key(&spki_pem, &info)?);
            }
            "PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY" | "ENCRYPTED PRIVATE KEY" => {
                return Err("holds a private key: give herald only public keys".into())
            }
            other => return Err(format!("unexpected PEM block `{other}`")),
        }
    }
    Ok(out)
}

fn spki_key(pem: &str, info: &spki::SubjectPublicKeyInfoRef<'_>) -> Result<Key, String> {
    use spki::ObjectIdentifier as Oid;
    const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
    const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    const P256: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
    const P384: Oid = Oid::new_unwrap("1.3.132.0.34");
    const ED25519: Oid = Oid::new_unwrap("1.3.101.112");
    let oid = info.algorithm.oid;
    let (algs, key) = if oid == RSA_ENCRYPTION {
        (RSA.to_vec(), DecodingKey::from_rsa_pem(pem.as_bytes()))
    } else if oid == EC_PUBLIC_KEY {
        let curve = info
            .algorithm
            .parameters_oid()
            .map_err(|_| "EC key without a named curve")?;
        let alg = match curve {
            c if c == P256 => Algorithm::ES256,
            c if c == P384 => Algorithm::ES384,
            c => return Err(format!("unsupported EC curve {c}")),
        };
        (vec![alg], DecodingKey::from_ec_pem(pem.as_bytes()))
    } else if oid == ED25519 {
        (
            vec![Algorithm::EdDSA],
            DecodingKey::from_ed_pem(pem.as_bytes()),
        )
    } else {
        return Err(format!("unsupported public key algorithm {oid}"));
    };
    Ok(Key {
        kid: None,
        algs,
        key: key.map_err(|e| e.to_string())?,
    })
}
