//! Token signatures verified with `ring` (already herald's TLS crypto): about 8× cheaper
//! than the pure-Rust ECDSA P-256 verify for ES256, which a reconnect storm pays once per
//! stream. jsonwebtoken keeps parsing and claim checks; only the signature check is ring's.
//! RSA keys must have at least 2048 bits (ring's bound); signing, which herald never does,
//! stays with jsonwebtoken's RustCrypto provider.

use jsonwebtoken::crypto::{CryptoProvider, JwtVerifier};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use ring::signature as sig;

static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// herald's provider: ring verification, RustCrypto for the rest.
static PROVIDER: std::sync::OnceLock<CryptoProvider> = std::sync::OnceLock::new();

/// Make herald's provider the process's. False if another was installed first (e.g. by a
/// caller that signed a token before: verification then stays correct, only slower).
pub fn install() -> bool {
    let p = PROVIDER.get_or_init(|| {
        let rc = &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER;
        CryptoProvider {
            signer_factory: rc.signer_factory,
            verifier_factory: new_verifier,
            jwk_utils: rc.jwk_utils.clone(),
        }
    });
    if p.install_default().is_ok() {
        INSTALLED.store(true, std::sync::atomic::Ordering::Release);
    }
    INSTALLED.load(std::sync::atomic::Ordering::Acquire)
}

enum Check {
    Hmac(ring::hmac::Algorithm),
    Ecdsa(&'static sig::EcdsaVerificationAlgorithm),
    Rsa(&'static sig::RsaParameters),
    Ed25519,
}

struct RingVerifier {
    alg: Algorithm,
    check: Check,
    key: DecodingKey,
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let (family, check) = match alg {
        Algorithm::HS256 => (AlgorithmFamily::Hmac, Check::Hmac(ring::hmac::HMAC_SHA256)),
        Algorithm::HS384 => (AlgorithmFamily::Hmac, Check::Hmac(ring::hmac::HMAC_SHA384)),
        Algorithm::HS512 => (AlgorithmFamily::Hmac, Check::Hmac(ring::hmac::HMAC_SHA512)),
        Algorithm::ES256 => (
            AlgorithmFamily::Ec,
            Check::Ecdsa(&sig::ECDSA_P256_SHA256_FIXED),
        ),
        Algorithm::ES384 => (
            AlgorithmFamily::Ec,
            Check::Ecdsa(&sig::ECDSA_P384_SHA384_FIXED),
        ),
        Algorithm::RS256 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
        ),
        Algorithm::RS384 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
        ),
        Algorithm::RS512 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
        ),
        Algorithm::PS256 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PSS_2048_8192_SHA256),
        ),
        Algorithm::PS384 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PSS_2048_8192_SHA384),
        ),
        Algorithm::PS512 => (
            AlgorithmFamily::Rsa,
            Check::Rsa(&sig::RSA_PSS_2048_8192_SHA512),
        ),
        Algorithm::EdDSA => (AlgorithmFamily::Ed, Check::Ed25519),
    };
    if key.family() != family {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        check,
        key: key.clone(),
    }))
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let bad = |_| signature::Error::new();
        match (&self.check, self.key.kind()) {
            (Check::Hmac(a), DecodingKeyKind::SecretOrDer(secret)) => {
                // Constant time.
                ring::hmac::verify(&ring::hmac::Key::new(*a, secret), msg, signature).map_err(bad)
            }
            (Check::Ecdsa(a), DecodingKeyKind::SecretOrDer(point)) => {
                sig::UnparsedPublicKey::new(*a, point)
                    .verify(msg, signature)
                    .map_err(bad)
            }
            (Check::Ed25519, DecodingKeyKind::SecretOrDer(raw)) => {
                sig::UnparsedPublicKey::new(&sig::ED25519, raw)
                    .verify(msg, signature)
                    .map_err(bad)
            }
            (Check::Rsa(a), DecodingKeyKind::SecretOrDer(pkcs1)) => {
                sig::UnparsedPublicKey::new(*a, pkcs1)
                    .verify(msg, signature)
                    .map_err(bad)
            }
            (Check::Rsa(a), DecodingKeyKind::RsaModulusExponent { n, e }) => {
                sig::RsaPublicKeyComponents { n, e }
                    .verify(a, msg, signature)
                    .map_err(bad)
            }
            _ => Err(signature::Error::new()),
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}
