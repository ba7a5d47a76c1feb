//! TLS setup shared by every worker: the certificate store (chosen by SNI, reloaded on
//! SIGHUP), the rustls server configuration (TLS 1.3 and 1.2 only, rotating session-ticket
//! keys, ALPN) and the kernel-TLS probe. The per-connection record work is in
//! `core::tls`, sans-IO, over each backend's own reads and writes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

pub mod record;

/// ALPN protocols offered, most preferred first.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// One certificate chain and its key, as configured (`--tls-cert`, `--tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The loaded certificates: the first is the default (a client that sends no SNI).
struct CertSet {
    keys: Vec<Arc<CertifiedKey>>,
}

/// Picks the certificate for a handshake by SNI. A name that no certificate covers is
/// refused (the client gets an alert), and counted; no SNI gets the default.
pub struct CertStore {
    pairs: Vec<CertPair>,
    set: RwLock<Arc<CertSet>>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("CertStore")
            .field("pairs", &self.pairs)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    fn current(&self) -> Arc<CertSet> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Read every pair again; on success the new set serves every handshake from now on
    /// (connections already open keep their keys). On failure nothing changes.
    pub fn reload(&self) -> Result<usize, String> {
        match load_set(&self.pairs) {
            Ok(set) => {
                let n = set.keys.len();
                *self.set.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads.load(Ordering::Relaxed),
            self.reload_failures.load(Ordering::Relaxed),
        )
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current();
        let Some(name) = hello.server_name() else {
            return set.keys.first().cloned();
        };
        let found = ServerName::try_from(name).ok().and_then(|sn| {
            set.keys.iter().find(|k| {
                k.end_entity_cert().ok().is_some_and(|der| {
                    webpki::EndEntityCert::try_from(der)
                        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&sn).is_ok())
                })
            })
        });
        if found.is_none() {
            // Counted by the worker (herald_tls_unknown_name_total), from rustls' error.
            tracing::debug!(sni = name, "TLS handshake for a name no certificate covers");
        }
        found.cloned()
    }
}

fn load_set(pairs: &[CertPair]) -> Result<CertSet, String> {
    let provider = provider::default_provider();
    let mut keys = Vec::with_capacity(pairs.len());
    for p in pairs {
        keys.push(Arc::new(load_pair(p, &provider)?));
    }
    if keys.is_empty() {
        return Err("no certificate configured (--tls-cert/--tls-key)".into());
    }
    Ok(CertSet { keys })
}

fn load_pair(
    p: &CertPair,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = read_chain(&p.cert)?;
    // The key's bytes are never put into an error or a log line, only its path.
    let key = PrivateKeyDer::from_pem_file(&p.key)
        .map_err(|e| format!("{}: no usable private key ({e})", p.key.display()))?;
    let ck = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| format!("{} with {}: {e}", p.cert.display(), p.key.display()))?;
    let ee = ck
        .end_entity_cert()
        .map_err(|e| format!("{}: {e}", p.cert.display()))?;
    webpki::EndEntityCert::try_from(ee)
        .map_err(|e| format!("{}: not a usable certificate ({e})", p.cert.display()))?;
    Ok(ck)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(chain)
}

/// How a worker hands established connections to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtlsMode {
    /// Records are encrypted in userspace, per write.
    Userspace,
    /// After the handshake the kernel seals what a connection sends (`TLS_TX`): the
    /// send path is then the plaintext one, a shared event's bytes for every socket.
    /// `rekey`: the kernel takes new TLS 1.3 sending keys (Linux 6.14 and later).
    Kernel { rekey: bool },
}

/// Everything the workers need for TLS.
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub certs: Arc<CertStore>,
    pub mode: KtlsMode,
    /// `Strict-Transport-Security` header line (with CRLF) for TLS responses, if set.
    pub hsts: Option<String>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("certs", &self.certs)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Load the certificates and build the server configuration; decide the kernel-TLS
    /// mode (logged with its reason).
    pub fn new(
        pairs: &[CertPair],
        ktls: crate::config::KtlsChoice,
        hsts: Option<std::time::Duration>,
    ) -> Result<Tls, String> {
        let set = load_set(pairs)?;
        let certs = Arc::new(CertStore {
            pairs: pairs.to_vec(),
            set: RwLock::new(Arc::new(set)),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        });
        let provider = Arc::new(provider::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        // Resumption by tickets whose key rotates (every 6 hours, the previous key still
        // accepted for one period); no server-side session cache to fill.
        config.ticketer = provider::Ticketer::new().map_err(|e| e.to_string())?;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.max_early_data_size = 0;
        // After the handshake the session leaves rustls for herald's record layer
        // (`record`): rustls hands over the keys, and its key log (which herald only
        // keeps in memory, never writes) gives the TLS 1.3 traffic secrets.
        config.enable_secret_extraction = true;
        config.key_log = Arc::new(record::TrafficCapture);
        let mode = match ktls {
            crate::config::KtlsChoice::Off => {
                tracing::info!("userspace TLS: --ktls off");
                KtlsMode::Userspace
            }
            crate::config::KtlsChoice::Auto => match probe_ktls() {
                Err(why) => {
                    tracing::info!("userspace TLS: {why}");
                    KtlsMode::Userspace
                }
                Ok(()) => {
                    let rekey = kernel_can_rekey();
                    if rekey {
                        tracing::info!("kernel TLS: the kernel seals what connections send after the handshake (tls ULP, TLS_TX; TLS 1.3 key updates installed in the kernel)");
                    } else {
                        tracing::info!("kernel TLS: the kernel seals what connections send after the handshake (tls ULP, TLS_TX); this kernel cannot take new TLS 1.3 keys (before 6.14), so a connection is closed before its cipher's record limit or when its peer asks for a key update");
                    }
                    KtlsMode::Kernel { rekey }
                }
            },
        };
        Ok(Tls {
            config: Arc::new(config),
            certs,
            mode,
            hsts: hsts.map(|d| format!("Strict-Transport-Security: max-age={}\r\n", d.as_secs())),
        })
    }
}

/// Whether the running kernel takes new TLS 1.3 keys on a kTLS socket (key update
/// support: Linux 6.14 and later), from its release string.
fn kernel_can_rekey() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    release_at_least(&release, (6, 14))
}

/// Whether a kernel release string (`6.18.44-foo`) is at least `major.minor`.
pub fn release_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut it = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

/// Whether the kernel can run TLS records on a socket: attach the `tls` ULP to a
/// loopback connection, install AES-GCM-128 keys for sending on one end and receiving on
/// the other, and check that a record round-trips.
pub fn probe_ktls() -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("probe socket: {e}"))?;
    let mut tx = TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| format!("probe connect: {e}"))?;
    let (mut rx, _) = l.accept().map_err(|e| format!("probe accept: {e}"))?;
    for s in [&tx, &rx] {
        crate::engine::sys::set_tcp_ulp_tls(s.as_raw_fd()).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                "kernel has no tls ULP".to_string()
            } else {
                format!("tls ULP refused: {e}")
            }
        })?;
    }
    crate::engine::sys::set_ktls_probe_keys(tx.as_raw_fd(), libc::TLS_TX)
        .map_err(|e| format!("TLS_TX refused: {e}"))?;
    crate::engine::sys::set_ktls_probe_keys(rx.as_raw_fd(), libc::TLS_RX)
        .map_err(|e| format!("TLS_RX refused: {e}"))?;
    let msg = b"herald ktls probe";
    tx.write_all(msg).map_err(|e| format!("kTLS send: {e}"))?;
    let mut got = [0u8; 17];
    rx.set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    rx.read_exact(&mut got)
        .map_err(|e| format!("kTLS receive: {e}"))?;
    if &got != msg {
        return Err("kTLS record did not round-trip".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::release_at_least;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(release_at_least("6.18.44-fc-v1098\n", (6, 14)));
        assert!(release_at_least("6.14.0", (6, 14)));
        assert!(!release_at_least("6.13.12-arch1", (6, 14)));
        assert!(!release_at_least("5.19.0", (6, 14)));
        assert!(release_at_least("7.0-rc1", (6, 14)));
        assert!(!release_at_least("garbage", (6, 14)));
    }
}
