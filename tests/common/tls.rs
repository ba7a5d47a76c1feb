//! TLS test helpers: a throwaway CA and leaf certificates written to a temporary
//! directory, rustls client configurations trusting that CA (never a verifier that
//! accepts anything), a blocking TLS SSE client and a many-subscriber TLS crowd.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::{feed_stream, read_head, Event, SseParser, WAIT};

/// A CA and the certificates it issued, as PEM files in a directory removed on drop.
pub struct Pki {
    pub dir: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    pub fn new() -> Pki {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "herald-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "herald test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, cert.pem()).unwrap();
        Pki {
            dir,
            ca_params: params,
            ca_key: key,
            ca_der: cert.der().clone(),
            ca_pem,
        }
    }

    /// Issue a leaf for `names` (DNS names or IP addresses); writes `<tag>.pem` and
    /// `<tag>.key`. Returns (cert path, key path, leaf DER).
    pub fn leaf(&self, names: &[&str], tag: &str) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, tag);
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{tag}.pem")),
            self.dir.join(format!("{tag}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, cert.der().clone())
    }

    /// A client configuration trusting this CA only.
    pub fn client(&self) -> ClientBuilder {
        ClientBuilder {
            roots: {
                let mut r = RootCertStore::empty();
                r.add(self.ca_der.clone()).unwrap();
                r
            },
            alpn: vec![b"http/1.1".to_vec()],
            versions: vec![&rustls::version::TLS13, &rustls::version::TLS12],
        }
    }
}

pub struct ClientBuilder {
    roots: RootCertStore,
    alpn: Vec<Vec<u8>>,
    versions: Vec<&'static rustls::SupportedProtocolVersion>,
}

impl ClientBuilder {
    pub fn alpn(mut self, protos: &[&[u8]]) -> Self {
        self.alpn = protos.iter().map(|p| p.to_vec()).collect();
        self
    }

    pub fn versions(mut self, v: &[&'static rustls::SupportedProtocolVersion]) -> Self {
        self.versions = v.to_vec();
        self
    }

    pub fn build(self) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&self.versions)
            .unwrap()
            .with_root_certificates(self.roots)
            .with_no_client_auth();
        cfg.alpn_protocols = self.alpn;
        Arc::new(cfg)
    }
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Connect and complete the handshake (or return its error).
pub fn connect(
    addr: SocketAddr,
    name: &str,
    cfg: &Arc<ClientConfig>,
) -> Result<TlsStream, io::Error> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(WAIT))?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    let conn = ClientConnection::new(cfg.clone(), name).unwrap();
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// The leaf certificate the server presented.
pub fn peer_leaf(s: &TlsStream) -> CertificateDer<'static> {
    s.conn.peer_certificates().expect("a certificate")[0].clone()
}

/// An SSE client over TLS: the plaintext client's reading, on a rustls stream.
pub type TlsClient = super::Client<TlsStream>;

impl super::Client<TlsStream> {
    pub fn tls_get(
        addr: SocketAddr,
        name: &str,
        cfg: &Arc<ClientConfig>,
        path: &str,
        extra: &str,
    ) -> TlsClient {
        let stream = connect(addr, name, cfg).expect("TLS handshake");
        super::Client::request(stream, name, path, extra)
    }

    pub fn tls_subscribe(addr: SocketAddr, cfg: &Arc<ClientConfig>, path: &str) -> TlsClient {
        let c = TlsClient::tls_get(addr, "localhost", cfg, path, "");
        assert_eq!(c.status, 200, "subscribe {path}");
        c
    }
}

/// One HTTPS request with `Connection: close`; returns (status, headers, body).
pub fn https_get(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    path: &str,
) -> (u16, std::collections::HashMap<String, String>, Vec<u8>) {
    let mut s = connect(addr, "localhost", cfg).expect("TLS handshake");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.flush().unwrap();
    let (status, headers, mut body) = read_head(&mut s);
    let _ = s.read_to_end(&mut body);
    (status, headers, body)
}

/// Many TLS subscribers driven by one mio poller.
pub struct TlsCrowd {
    poll: mio::Poll,
    pub conns: Vec<CrowdTls>,
}

pub struct CrowdTls {
    sock: mio::net::TcpStream,
    tls: ClientConnection,
    head: Option<Vec<u8>>,
    pub parser: SseParser,
    pub events: Vec<Event>,
    pub closed: bool,
}

impl TlsCrowd {
    pub fn connect(addr: SocketAddr, cfg: &Arc<ClientConfig>, path: &str, n: usize) -> TlsCrowd {
        let poll = mio::Poll::new().unwrap();
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let s = TcpStream::connect(addr).expect("connect");
            s.set_nonblocking(true).unwrap();
            let mut sock = mio::net::TcpStream::from_std(s);
            poll.registry()
                .register(&mut sock, mio::Token(i), mio::Interest::READABLE)
                .unwrap();
            let mut tls =
                ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap())
                    .unwrap();
            // Buffered by rustls until the handshake is done.
            write!(
                tls.writer(),
                "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"
            )
            .unwrap();
            let mut c = CrowdTls {
                sock,
                tls,
                head: Some(Vec::new()),
                parser: SseParser::new(true),
                events: Vec::new(),
                closed: false,
            };
            c.flush();
            conns.push(c);
        }
        TlsCrowd { poll, conns }
    }

    /// Pump until `done(conns)` or `timeout`; returns whether `done` held.
    pub fn pump_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[CrowdTls]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut events = mio::Events::with_capacity(4096);
        while !done(&self.conns) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            self.poll
                .poll(
                    &mut events,
                    Some((deadline - now).min(Duration::from_millis(100))),
                )
                .unwrap();
            for ev in events.iter() {
                self.conns[ev.token().0].on_readable();
            }
        }
        true
    }
}

impl CrowdTls {
    fn flush(&mut self) {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Small writes on loopback: spin until the socket takes them.
                    std::thread::yield_now();
                }
                Err(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn on_readable(&mut self) {
        loop {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => {
                    self.closed = true;
                    return;
                }
                Ok(_) => {
                    if self.tls.process_new_packets().is_err() {
                        self.closed = true;
                        return;
                    }
                    let mut plain = Vec::new();
                    let mut buf = [0u8; 16384];
                    loop {
                        match self.tls.reader().read(&mut buf) {
                            Ok(0) => {
                                self.closed = true;
                                break;
                            }
                            Ok(n) => plain.extend_from_slice(&buf[..n]),
                            Err(_) => break,
                        }
                    }
                    self.feed(&plain);
                    self.flush();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        feed_stream(&mut self.head, &mut self.parser, &mut self.events, bytes);
    }

    /// The response head has arrived (the stream is established).
    pub fn streaming(&self) -> bool {
        self.head.is_none()
    }
}
