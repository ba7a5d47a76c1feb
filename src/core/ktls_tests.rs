//! The kernel-TLS hand-over driven by hand: the core with `KtlsMode::Kernel`, a rustls
//! client at the far end, and the harness's model of the kernel sealing what the socket
//! sends once keys are installed (this machine's kernel has no `tls` ULP). What is
//! checked: the keys go to the kernel only once what userspace sealed is written, the
//! stream then carries the shared event bytes as they are, a short write resumes, our own
//! records (KeyUpdate, close_notify) go as typed records, a rekey installs new keys
//! before more data, and a refused hand-over leaves the session working in userspace.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConnection;

use super::harness::{event_data, parse_chunked_stream, Harness};
use super::ConnId;
use crate::tls::{CertPair, KtlsMode, Tls};

/// A TLS harness whose kernel "has" TLS (`rekey`: it takes new TLS 1.3 keys), and a
/// client configuration that trusts its certificate.
fn setup(tag: &str, rekey: bool) -> (Harness, Arc<rustls::ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("herald-ktls-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pair = CertPair {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&pair.cert, ck.cert.pem()).unwrap();
    std::fs::write(&pair.key, ck.signing_key.serialize_pem()).unwrap();
    let mut tls = Tls::new(&[pair], crate::config::KtlsChoice::Off, None).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    tls.mode = KtlsMode::Kernel { rekey };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let cc = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    (Harness::with_tls(|_| {}, tls), Arc::new(cc))
}

/// The client's end: what it has read of the server's bytes, and the plaintext so far.
struct Client {
    tls: ClientConnection,
    read: usize,
    plain: Vec<u8>,
    /// The server's close_notify arrived.
    closed: bool,
}

impl Client {
    fn new(cc: &Arc<rustls::ClientConfig>) -> Client {
        Client {
            tls: ClientConnection::new(cc.clone(), "localhost".try_into().unwrap()).unwrap(),
            read: 0,
            plain: Vec::new(),
            closed: false,
        }
    }

    /// Send what the client has to send, let the server settle, and read everything it
    /// wrote (every record must decrypt).
    fn pump(&mut self, h: &mut Harness, c: ConnId) {
        let mut wire = Vec::new();
        while self.tls.wants_write() {
            self.tls.write_tls(&mut wire).unwrap();
        }
        if !wire.is_empty() {
            h.send(c, &wire);
        }
        h.settle();
        self.take(h, c);
    }

    fn take(&mut self, h: &Harness, c: ConnId) {
        let out = h.output(c);
        let mut rd = &out[self.read..];
        self.read = out.len();
        while !rd.is_empty() {
            self.tls.read_tls(&mut rd).unwrap();
            self.tls
                .process_new_packets()
                .expect("every record decrypts");
        }
        let mut b = [0u8; 4096];
        loop {
            match self.tls.reader().read(&mut b) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => self.plain.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn events(&self) -> Vec<String> {
        event_data(&parse_chunked_stream(&self.plain).unwrap().body)
    }
}

/// A TLS subscriber to `/events/k`, its handshake done and its response head read.
fn subscribe(h: &mut Harness, cc: &Arc<rustls::ClientConfig>) -> (ConnId, Client) {
    let c = h.connect_tls();
    let mut cl = Client::new(cc);
    for _ in 0..8 {
        cl.pump(h, c);
        if !cl.tls.is_handshaking() {
            break;
        }
    }
    assert!(!cl.tls.is_handshaking(), "handshake done");
    cl.tls
        .writer()
        .write_all(b"GET /events/k HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    cl.pump(h, c);
    assert!(
        cl.plain.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&cl.plain)
    );
    (c, cl)
}

#[test]
fn a_stream_handed_to_the_kernel_survives_short_writes_key_updates_and_the_drain() {
    let (mut h, cc) = setup("stream", true);
    let (c, mut cl) = subscribe(&mut h, &cc);
    assert_eq!(
        h.core.counters.tls_kernel_sessions, 1,
        "keys went to the kernel"
    );
    assert!(h.core.conns[c as usize].has(super::flag::KTX));
    assert!(
        h.core.tls_held == 0,
        "nothing is sealed in userspace any more"
    );

    h.publish("k", "one", None);
    cl.pump(&mut h, c);
    assert_eq!(cl.events(), ["one"]);

    // A short write: the kernel took 7 bytes of the event; the rest follows.
    h.publish("k", &"x".repeat(300), None);
    h.turn();
    let len = h.inflight_len(c);
    assert!(len > 300, "the event is written as it is ({len} bytes)");
    h.complete(c, 7);
    cl.pump(&mut h, c);
    assert_eq!(cl.events().last().unwrap(), &"x".repeat(300));

    // The client asks for new keys: our KeyUpdate goes out under the old ones, the new
    // ones are installed, and only then does the next event go.
    cl.tls.refresh_traffic_keys().unwrap();
    h.publish("k", "after the update", None);
    cl.pump(&mut h, c);
    h.publish("k", "and another", None);
    cl.pump(&mut h, c);
    assert_eq!(h.core.counters.tls_key_updates, 1);
    assert_eq!(h.core.counters.tls_kernel_rekeys, 1);
    assert_eq!(
        cl.events()[2..],
        ["after the update".to_string(), "and another".to_string()]
    );

    // Shutdown: the drain trailer, then a close_notify (sealed by the kernel), then the
    // close.
    h.stop();
    for _ in 0..400 {
        h.advance(Duration::from_millis(50));
        h.settle();
        if !h.is_open(c) {
            break;
        }
    }
    assert!(!h.is_open(c), "the drain ended the stream");
    cl.take(&h, c);
    assert!(cl.closed, "a close_notify ended the stream");
    assert!(parse_chunked_stream(&cl.plain).unwrap().ended);
}

#[test]
fn a_kernel_that_refuses_the_keys_leaves_the_session_in_userspace() {
    let (mut h, cc) = setup("refused", true);
    h.refuse_ktls = true;
    let (c, mut cl) = subscribe(&mut h, &cc);
    assert_eq!(h.core.counters.tls_kernel_failures, 1);
    assert_eq!(h.core.counters.tls_kernel_sessions, 0);
    assert!(!h.core.conns[c as usize].has(super::flag::KTX));
    h.publish("k", "still sealed here", None);
    cl.pump(&mut h, c);
    assert_eq!(cl.events(), ["still sealed here"]);
    cl.tls.refresh_traffic_keys().unwrap();
    h.publish("k", "and after a key update", None);
    cl.pump(&mut h, c);
    assert_eq!(cl.events()[1], "and after a key update");
}

#[test]
fn a_key_update_the_kernel_cannot_make_ends_the_stream_with_close_notify() {
    let (mut h, cc) = setup("norekey", false);
    let (c, mut cl) = subscribe(&mut h, &cc);
    assert_eq!(h.core.counters.tls_kernel_sessions, 1);
    h.publish("k", "one", None);
    cl.pump(&mut h, c);
    cl.tls.refresh_traffic_keys().unwrap();
    cl.pump(&mut h, c);
    assert!(!h.is_open(c), "closed");
    assert!(cl.closed, "with a close_notify");
    assert_eq!(cl.events(), ["one"]);
}

/// A kernel-TLS stream that has had event "one"; then the client asks for new keys (and
/// says goodbye too when `close`), all in one read, and our KeyUpdate's write is in flight.
fn key_update_in_flight(tag: &str, close: bool) -> (Harness, ConnId, Client) {
    let (mut h, cc) = setup(tag, true);
    let (c, mut cl) = subscribe(&mut h, &cc);
    h.publish("k", "one", None);
    cl.pump(&mut h, c);
    cl.tls.refresh_traffic_keys().unwrap();
    if close {
        cl.tls.send_close_notify();
    }
    let mut wire = Vec::new();
    while cl.tls.wants_write() {
        cl.tls.write_tls(&mut wire).unwrap();
    }
    h.send(c, &wire);
    h.turn();
    assert_eq!(
        h.core.ktls_record_type(c),
        Some(crate::tls::record::CT_HANDSHAKE),
        "our KeyUpdate goes first"
    );
    assert!(h.inflight_len(c) > 0);
    (h, c, cl)
}

#[test]
fn a_close_notify_queued_behind_our_key_update_goes_under_the_new_keys() {
    // In one read: the client asks for new keys and says goodbye. Our KeyUpdate and our
    // close_notify are then queued together, and the new keys must go in between them.
    let (mut h, c, mut cl) = key_update_in_flight("ku-cn", true);
    let ku = h.inflight_len(c);
    // A short write of the KeyUpdate: no keys may change before the rest of it.
    h.complete(c, ku / 2);
    h.turn();
    assert_eq!(
        h.core.counters.tls_kernel_rekeys, 0,
        "KeyUpdate half written"
    );
    h.settle();
    assert_eq!(h.core.counters.tls_kernel_rekeys, 1);
    assert!(!h.is_open(c), "closed after our close_notify");
    cl.take(&h, c);
    assert!(cl.closed, "our close_notify decrypted under the new keys");
    assert_eq!(cl.events(), ["one"]);
}

#[test]
fn our_key_update_on_a_full_socket_is_sent_again_whole_and_typed_before_any_data() {
    let (mut h, c, mut cl) = key_update_in_flight("ku-full", false);
    let sent = h.output(c).len();
    // epoll: the socket is full, the KeyUpdate's sendmsg took nothing (EAGAIN).
    h.block(c, 0);
    h.publish("k", "behind the update", None);
    h.turn();
    assert_eq!(
        h.inflight_len(c),
        0,
        "nothing is written until there is room"
    );
    assert_eq!(h.output(c).len(), sent);
    h.writable(c);
    h.turn();
    assert_eq!(
        h.core.ktls_record_type(c),
        Some(crate::tls::record::CT_HANDSHAKE),
        "the KeyUpdate again, as a handshake record, before the event"
    );
    h.settle();
    cl.take(&h, c);
    assert_eq!(h.core.counters.tls_kernel_rekeys, 1);
    assert_eq!(cl.events(), ["one", "behind the update"]);
}
