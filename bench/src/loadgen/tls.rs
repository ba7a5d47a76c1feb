//! The load generator's TLS client: one rustls `ClientConfig` per process (roots from
//! `--cacert`, ALPN http/1.1 (h2 with `--h2`), browser-like suite order, full handshakes unless
//! `--tls-resume`), the server name to verify, and short names for failures and
//! negotiated sessions as the report counts them.
//!
//! Certificate checks: the first chain a process sees is verified in full (webpki: path
//! to --cacert, validity, name); a later connection that presents the very same chain
//! bytes for the same name skips re-building that path (`--tls-verify-every` turns the
//! shortcut off). The handshake's own signature (CertificateVerify, proof that the
//! server holds the key) is checked on every connection. This keeps the load generator's
//! cost per handshake below the server's, so a handshake-rate run measures the server.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::{Opt, Target, TlsSuite, TlsVersion};

/// Everything a process needs to open TLS connections to the target.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsClient {
    /// `None` for an http:// target.
    pub fn from_opt(opt: &Opt, target: &Target) -> Result<Option<TlsClient>> {
        // An http:// target ignores the TLS flags (so a script can switch the URL only).
        if !target.tls {
            return Ok(None);
        }
        let ca = opt.cacert.as_deref().context(
            "an https:// --url needs --cacert PEM (the CA that signed the server's certificate)",
        )?;
        let roots = load_roots(ca)?;
        let versions: &[&rustls::SupportedProtocolVersion] = match opt.tls_version {
            TlsVersion::Auto => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V12 => &[&rustls::version::TLS12],
            TlsVersion::V13 => &[&rustls::version::TLS13],
        };
        let mut prov = provider::default_provider();
        let order: [&str; 3] = match opt.tls_suite {
            // Chrome's and Firefox's TLS 1.3 preference: AES-128-GCM (SHA-256) first.
            TlsSuite::Browser => ["AES_128_GCM", "AES_256_GCM", "CHACHA20"],
            TlsSuite::Aes256 => ["AES_256_GCM", "AES_128_GCM", "CHACHA20"],
            TlsSuite::Chacha20 => ["CHACHA20", "AES_128_GCM", "AES_256_GCM"],
        };
        prov.cipher_suites.sort_by_key(|s| {
            let name = format!("{:?}", s.suite());
            order
                .iter()
                .position(|p| name.contains(p))
                .unwrap_or(order.len())
        });
        let prov = Arc::new(prov);
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), prov.clone())
            .build()
            .context("certificate verifier")?;
        let verifier: Arc<dyn ServerCertVerifier> = if opt.tls_verify_every {
            webpki
        } else {
            Arc::new(ChainCache {
                inner: webpki,
                seen: Mutex::new(None),
            })
        };
        let mut config = ClientConfig::builder_with_provider(prov)
            .with_protocol_versions(versions)
            .context("TLS versions")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // --h2 offers h2 alone: a server without it selects nothing, which the run reports.
        config.alpn_protocols = vec![if opt.h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        if !opt.tls_resume {
            config.resumption = Resumption::disabled();
        }
        let name = opt
            .tls_server_name
            .clone()
            .unwrap_or_else(|| target.hostname.clone());
        let name = ServerName::try_from(name.clone())
            .with_context(|| format!("{name:?} is not a valid TLS server name"))?;
        Ok(Some(TlsClient {
            config: Arc::new(config),
            name,
        }))
    }

    /// A new client session (its ClientHello is queued for `write_tls`).
    pub fn connect(&self) -> Result<ClientConnection, rustls::Error> {
        ClientConnection::new(self.config.clone(), self.name.clone())
    }
}

/// The webpki verifier, with the last chain that passed it remembered (see the module
/// comment): a byte-identical chain for the same name is accepted without rebuilding its
/// path; every handshake signature still goes to webpki.
#[derive(Debug)]
struct ChainCache {
    inner: Arc<WebPkiServerVerifier>,
    /// (server name, end entity + intermediates) of the last verified chain.
    seen: Mutex<Option<(String, Vec<Vec<u8>>)>>,
}

impl ChainCache {
    fn matches(
        &self,
        name: &str,
        end_entity: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
    ) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.as_ref().is_some_and(|(n, chain)| {
            n == name
                && chain.len() == 1 + inter.len()
                && std::iter::once(end_entity)
                    .chain(inter)
                    .zip(chain)
                    .all(|(c, k)| c.as_ref() == k.as_slice())
        })
    }
}

impl ServerCertVerifier for ChainCache {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = server_name.to_str();
        if self.matches(&name, end_entity, intermediates) {
            return Ok(ServerCertVerified::assertion());
        }
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.as_ref().to_vec())
            .collect();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some((name.into_owned(), chain));
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading --cacert {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing --cacert {}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (ok, bad) = roots.add_parsable_certificates(certs);
    if ok == 0 {
        bail!(
            "--cacert {}: no usable CA certificate ({bad} refused)",
            path.display()
        );
    }
    Ok(roots)
}

/// A short counter name for a TLS failure, e.g. `tls_InvalidCertificate_UnknownIssuer`,
/// `tls_AlertReceived_HandshakeFailure` (variant names, no payloads).
pub fn error_name(e: &rustls::Error) -> String {
    let dbg = format!("{e:?}");
    // Keep the variant path, drop struct payloads ("{ expected: .. }") and strings.
    let cut = dbg.find([' ', '{', '"']).unwrap_or(dbg.len());
    let mut name = String::from("tls_");
    let mut sep = false;
    for ch in dbg[..cut].chars() {
        if ch.is_ascii_alphanumeric() {
            if sep && !name.ends_with('_') {
                name.push('_');
            }
            sep = false;
            name.push(ch);
        } else {
            sep = true;
        }
        if name.len() >= 64 {
            break;
        }
    }
    name
}

/// What was negotiated, as counted per connection: version, suite, full/resumed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Session {
    version: Option<rustls::ProtocolVersion>,
    suite: Option<rustls::CipherSuite>,
    kind: Option<rustls::HandshakeKind>,
}

impl Session {
    pub fn of(c: &ClientConnection) -> Session {
        Session {
            version: c.protocol_version(),
            suite: c.negotiated_cipher_suite().map(|s| s.suite()),
            kind: c.handshake_kind(),
        }
    }

    /// `"TLSv1_3 TLS13_AES_256_GCM_SHA384 Full"`.
    pub fn name(&self) -> String {
        let kind = match self.kind {
            Some(rustls::HandshakeKind::Full) => "full",
            Some(rustls::HandshakeKind::FullWithHelloRetryRequest) => "full+HRR",
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            None => "?",
        };
        let v = self.version.map_or("?".into(), |v| format!("{v:?}"));
        let s = self.suite.map_or("?".into(), |s| format!("{s:?}"));
        format!("{v} {s} {kind}")
    }
}

/// Per-process tally of sessions without allocating per connection (a handful of kinds).
#[derive(Default)]
pub struct SessionTally(Vec<(Session, u64)>);

impl SessionTally {
    pub fn add(&mut self, s: Session) {
        match self.0.iter_mut().find(|(k, _)| *k == s) {
            Some((_, n)) => *n += 1,
            None => self.0.push((s, 1)),
        }
    }

    pub fn merge(&mut self, other: &SessionTally) {
        for &(s, n) in &other.0 {
            match self.0.iter_mut().find(|(k, _)| *k == s) {
                Some((_, m)) => *m += n,
                None => self.0.push((s, n)),
            }
        }
    }

    pub fn to_map(&self) -> std::collections::BTreeMap<String, u64> {
        let mut m = std::collections::BTreeMap::new();
        for (s, n) in &self.0 {
            *m.entry(s.name()).or_default() += n;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_are_short() {
        use rustls::{AlertDescription, CertificateError, Error};
        assert_eq!(
            error_name(&Error::InvalidCertificate(CertificateError::UnknownIssuer)),
            "tls_InvalidCertificate_UnknownIssuer"
        );
        assert_eq!(
            error_name(&Error::AlertReceived(AlertDescription::HandshakeFailure)),
            "tls_AlertReceived_HandshakeFailure"
        );
        assert_eq!(error_name(&Error::General("x y".into())), "tls_General");
    }
}
