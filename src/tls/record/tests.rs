//! The record layer against rustls' own client: both directions, every suite herald
//! offers, key updates either way, partial records, and what an established connection
//! must refuse.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::{ClientConnection, SupportedCipherSuite};

use super::kernel_model::KernelModel;
use super::*;

const CT_CCS: u8 = 20;

struct Pair {
    client: ClientConnection,
    server: Sealed,
}

fn pump(s: &mut UnbufferedServerConnection, inc: &mut Vec<u8>, out: &mut Vec<u8>) {
    for _ in 0..64 {
        let UnbufferedStatus { discard, state } = s.process_tls_records(inc);
        let mut stop = false;
        match state.expect("handshake") {
            ConnectionState::EncodeTlsData(mut e) => {
                let mut b = vec![0u8; 16384];
                let n = e.encode(&mut b).unwrap();
                out.extend_from_slice(&b[..n]);
            }
            ConnectionState::TransmitTlsData(t) => t.done(),
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(x) = r.next_record() {
                    x.unwrap();
                }
            }
            _ => stop = true,
        }
        inc.drain(..discard);
        if stop {
            break;
        }
    }
}

fn handshake(suite: SupportedCipherSuite) -> Pair {
    clear_captured();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let prov = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(prov.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    sc.enable_secret_extraction = true;
    sc.key_log = Arc::new(TrafficCapture);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut cprov = rustls::crypto::ring::default_provider();
    cprov.cipher_suites = vec![suite];
    let version = suite.version();
    let cc = rustls::ClientConfig::builder_with_provider(Arc::new(cprov))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client = ClientConnection::new(Arc::new(cc), "localhost".try_into().unwrap()).unwrap();
    let mut server = UnbufferedServerConnection::new(Arc::new(sc)).unwrap();
    let (mut to_s, mut to_c) = (Vec::new(), Vec::new());
    let mut traffic = None;
    for _ in 0..10 {
        while client.wants_write() {
            client.write_tls(&mut to_s).unwrap();
        }
        pump(&mut server, &mut to_s, &mut to_c);
        if let Some(t) = take_captured() {
            traffic = Some(t);
        }
        let mut rd = &to_c[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
        to_c.clear();
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    assert!(to_s.is_empty(), "the client's flight was all processed");
    let suite_id = server.negotiated_cipher_suite().unwrap().suite();
    let version = server.protocol_version().unwrap();
    let (secrets, _kernel) = server.dangerous_into_kernel_connection().unwrap();
    let server = Sealed::new(secrets, suite_id, version, traffic).expect("sealed");
    Pair { client, server }
}

fn suites() -> Vec<SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as cs;
    vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
}

impl Pair {
    /// Feed server ciphertext to the client; return the plaintext it reads.
    fn deliver(&mut self, wire: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let mut rd = wire;
        let mut got = Vec::new();
        while !rd.is_empty() {
            self.client.read_tls(&mut rd).unwrap();
            let st = self.client.process_new_packets()?;
            if st.plaintext_bytes_to_read() > 0 {
                let mut b = vec![0u8; st.plaintext_bytes_to_read()];
                self.client.reader().read_exact(&mut b).unwrap();
                got.extend_from_slice(&b);
            }
        }
        Ok(got)
    }

    fn client_wire(&mut self) -> Vec<u8> {
        let mut w = Vec::new();
        while self.client.wants_write() {
            self.client.write_tls(&mut w).unwrap();
        }
        w
    }

    /// The client's view of the server: the same keys with the directions swapped, so a
    /// test can send what rustls' client never would.
    fn mirror(&self) -> Sealed {
        let copy = |d: &Dir| Dir {
            key: d.key,
            iv: d.iv,
            seq: d.seq,
            secret: d.secret,
        };
        Sealed {
            cipher: self.server.cipher,
            hash: self.server.hash,
            tx: copy(&self.server.rx),
            rx: copy(&self.server.tx),
            hs: [0; 5],
            hs_len: 0,
            in_a_row: 0,
            done: false,
            key_updates: 0,
            kernel: None,
        }
    }
}

fn open_all(s: &mut Sealed, wire: &mut Vec<u8>) -> (Result<bool, Fault>, Vec<u8>, Vec<u8>) {
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    match s.open(wire, &mut plain, &mut out) {
        Ok((used, closed)) => {
            wire.drain(..used);
            (Ok(closed), plain, out)
        }
        Err(f) => (Err(f), plain, out),
    }
}

#[test]
fn every_suite_round_trips_both_ways_in_full_and_partial_records() {
    for suite in suites() {
        let mut p = handshake(suite);
        // Server to client: 40 KiB, three records, one write.
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        assert!(p.server.seal(&data, &mut wire));
        assert!(wire.len() <= Sealed::sealed_len(data.len()), "{suite:?}");
        assert_eq!(p.deliver(&wire).unwrap(), data, "{suite:?}");
        // Client to server, fed a byte at a time at first (a record split over reads).
        p.client
            .writer()
            .write_all(b"GET /events/a HTTP/1.1\r\n\r\n")
            .unwrap();
        p.client.writer().write_all(&data).unwrap();
        let mut wire = p.client_wire();
        let mut got = Vec::new();
        let mut held = Vec::new();
        for (i, b) in wire.drain(..).enumerate() {
            held.push(b);
            if i > 200 && held.len() < 4000 {
                continue;
            }
            let (r, plain, out) = open_all(&mut p.server, &mut held);
            assert_eq!(r, Ok(false), "{suite:?}");
            assert!(out.is_empty());
            got.extend_from_slice(&plain);
        }
        let (r, plain, _) = open_all(&mut p.server, &mut held);
        assert_eq!(r, Ok(false));
        got.extend_from_slice(&plain);
        assert!(held.is_empty());
        let mut want = b"GET /events/a HTTP/1.1\r\n\r\n".to_vec();
        want.extend_from_slice(&data);
        assert_eq!(got, want, "{suite:?}");
    }
}

#[test]
fn a_client_key_update_is_followed_and_answered() {
    for suite in suites().into_iter().take(3) {
        let mut p = handshake(suite);
        for round in 0..3 {
            // rustls' client asks for an update of both directions.
            p.client.refresh_traffic_keys().unwrap();
            p.client.writer().write_all(b"after").unwrap();
            let mut wire = p.client_wire();
            let (r, plain, reply) = open_all(&mut p.server, &mut wire);
            assert_eq!(r, Ok(false), "{suite:?} round {round}");
            assert_eq!(plain, b"after");
            assert!(
                !reply.is_empty(),
                "the server answers with its own KeyUpdate"
            );
            let mut wire = reply;
            assert!(p.server.seal(b"under the new key", &mut wire));
            assert_eq!(p.deliver(&wire).unwrap(), b"under the new key");
        }
    }
}

#[test]
fn the_server_updates_its_keys_before_the_gcm_limit() {
    let mut p = handshake(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256);
    p.server.tx.seq = GCM_LIMIT - 2;
    let mut wire = Vec::new();
    assert!(p.server.seal(b"one", &mut wire));
    assert!(p.server.seal(b"two", &mut wire));
    assert_eq!(
        p.server.tx.seq, 1,
        "a KeyUpdate was sent and the keys replaced"
    );
    // The client's record counter does not know about the jump: reading "one" with the
    // wrong sequence number must fail, which shows the seal used it.
    assert!(p.deliver(&wire).is_err());
}

#[test]
fn a_tls12_connection_ends_with_close_notify_at_the_gcm_limit() {
    let mut p =
        handshake(rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
    let mut m = p.mirror();
    p.server.tx.seq = GCM_LIMIT - 1;
    m.rx.seq = GCM_LIMIT - 1;
    let mut wire = Vec::new();
    assert!(!p.server.seal(b"no more", &mut wire));
    let (r, plain, _) = open_all(&mut m, &mut wire);
    assert_eq!(r, Ok(true), "a close_notify, not the data");
    assert!(plain.is_empty());
    assert!(!p.server.seal(b"still no", &mut Vec::new()));
}

#[test]
fn close_notify_either_way() {
    for suite in suites() {
        let mut p = handshake(suite);
        p.client.send_close_notify();
        let mut wire = p.client_wire();
        let (r, _, _) = open_all(&mut p.server, &mut wire);
        assert_eq!(r, Ok(true), "{suite:?}");
        let mut wire = Vec::new();
        p.server.alert(CLOSE_NOTIFY, &mut wire);
        p.deliver(&wire).unwrap();
        let mut b = [0u8; 4];
        assert_eq!(p.client.reader().read(&mut b).unwrap(), 0, "clean EOF");
    }
}

#[test]
fn a_corrupted_record_is_refused_with_bad_record_mac() {
    for suite in suites() {
        let mut p = handshake(suite);
        p.client.writer().write_all(b"hello").unwrap();
        let mut wire = p.client_wire();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let (r, plain, alert) = open_all(&mut p.server, &mut wire);
        assert_eq!(r, Err(Fault::Decrypt), "{suite:?}");
        assert!(plain.is_empty());
        match p.deliver(&alert) {
            Err(rustls::Error::AlertReceived(a)) => {
                assert_eq!(a, rustls::AlertDescription::BadRecordMac)
            }
            other => panic!("{suite:?}: {other:?}"),
        }
    }
}

#[test]
fn what_an_established_connection_refuses() {
    use rustls::crypto::ring::cipher_suite as cs;
    // An oversized record, refused from its header alone.
    let mut p = handshake(cs::TLS13_AES_128_GCM_SHA256);
    let mut wire = vec![CT_DATA, 3, 3, 0x48, 0x01];
    let (r, _, alert) = open_all(&mut p.server, &mut wire);
    assert_eq!(r, Err(Fault::Protocol));
    assert!(matches!(
        p.deliver(&alert),
        Err(rustls::Error::AlertReceived(
            rustls::AlertDescription::RecordOverflow
        ))
    ));
    // A plaintext CCS or handshake record after a TLS 1.3 handshake.
    for typ in [CT_CCS, CT_HANDSHAKE, CT_ALERT] {
        let mut p = handshake(cs::TLS13_AES_128_GCM_SHA256);
        let mut wire = vec![typ, 3, 3, 0, 1, 1];
        assert_eq!(open_all(&mut p.server, &mut wire).0, Err(Fault::Protocol));
    }
    // TLS 1.2 renegotiation: a ClientHello under the session's keys.
    let mut p = handshake(cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
    let mut m = p.mirror();
    let mut wire = Vec::new();
    let k = m.tx.aead(m.cipher);
    m.seal_record(&k, CT_HANDSHAKE, &[1, 0, 0, 2, 3, 3], &mut wire);
    let (r, _, alert) = open_all(&mut p.server, &mut wire);
    assert_eq!(r, Err(Fault::Protocol));
    assert!(matches!(
        p.deliver(&alert),
        Err(rustls::Error::AlertReceived(
            rustls::AlertDescription::UnexpectedMessage
        ))
    ));
    // TLS 1.3: a handshake message other than KeyUpdate, a bad KeyUpdate, a KeyUpdate
    // not at the end of its record, and a fatal alert.
    let cases: [(&[u8], Fault); 4] = [
        (&[4, 0, 0, 1, 0], Fault::Protocol),
        (&[HS_KEY_UPDATE, 0, 0, 1, 7], Fault::Protocol),
        (&[HS_KEY_UPDATE, 0, 0, 1, 0, HS_KEY_UPDATE], Fault::Protocol),
        (&[HS_KEY_UPDATE, 0, 0, 2, 0, 0], Fault::Protocol),
    ];
    for (msg, want) in cases {
        let mut p = handshake(cs::TLS13_AES_256_GCM_SHA384);
        let mut m = p.mirror();
        let mut wire = Vec::new();
        let k = m.tx.aead(m.cipher);
        m.seal_record(&k, CT_HANDSHAKE, msg, &mut wire);
        assert_eq!(open_all(&mut p.server, &mut wire).0, Err(want), "{msg:?}");
    }
    let mut p = handshake(cs::TLS13_AES_256_GCM_SHA384);
    let mut m = p.mirror();
    let mut wire = Vec::new();
    m.alert(BAD_RECORD_MAC, &mut wire);
    assert_eq!(
        open_all(&mut p.server, &mut wire).0,
        Err(Fault::AlertReceived)
    );
}

#[test]
fn floods_of_empty_records_key_updates_or_warnings_are_cut() {
    use rustls::crypto::ring::cipher_suite as cs;
    for (suite, body, typ) in [
        (cs::TLS13_AES_128_GCM_SHA256, &[][..], CT_DATA),
        (
            cs::TLS13_AES_128_GCM_SHA256,
            &[HS_KEY_UPDATE, 0, 0, 1, 0][..],
            CT_HANDSHAKE,
        ),
        (
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            &[1, 112][..],
            CT_ALERT,
        ),
    ] {
        let mut p = handshake(suite);
        let mut m = p.mirror();
        let mut wire = Vec::new();
        for _ in 0..IN_A_ROW_MAX {
            let k = m.tx.aead(m.cipher);
            m.seal_record(&k, typ, body, &mut wire);
            if typ == CT_HANDSHAKE {
                m.update_tx();
            }
        }
        let (r, _, _) = open_all(&mut p.server, &mut wire);
        assert_eq!(r, Ok(false), "{IN_A_ROW_MAX} in a row are accepted");
        let k = m.tx.aead(m.cipher);
        m.seal_record(&k, typ, body, &mut wire);
        assert_eq!(open_all(&mut p.server, &mut wire).0, Err(Fault::Protocol));
    }
}

#[test]
fn a_handshake_message_split_over_records_is_joined() {
    let mut p = handshake(rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256);
    let mut m = p.mirror();
    let mut wire = Vec::new();
    let k = m.tx.aead(m.cipher);
    m.seal_record(&k, CT_HANDSHAKE, &[HS_KEY_UPDATE, 0], &mut wire);
    m.seal_record(&k, CT_HANDSHAKE, &[0, 1, 1], &mut wire);
    m.update_tx();
    let k = m.tx.aead(m.cipher);
    m.seal_record(&k, CT_DATA, b"new key", &mut wire);
    let (r, plain, mut reply) = open_all(&mut p.server, &mut wire);
    assert_eq!(r, Ok(false));
    assert_eq!(plain, b"new key");
    // The reply is a KeyUpdate the mirror follows.
    assert!(p.server.seal(b"and back", &mut reply));
    let (r, plain, _) = open_all(&mut m, &mut reply);
    assert_eq!(r, Ok(false));
    assert_eq!(plain, b"and back");
}

#[test]
fn secrets_from_another_handshake_are_not_accepted() {
    use rustls::crypto::ring::cipher_suite as cs;
    // Capture one handshake's secrets, then offer them for another's keys.
    let _ = handshake(cs::TLS13_AES_128_GCM_SHA256);
    let stale = Traffic {
        client: Some(([7; 48], 32)),
        server: Some(([9; 48], 32)),
    };
    let p = handshake(cs::TLS13_AES_128_GCM_SHA256);
    let secrets = ExtractedSecrets {
        tx: (
            0,
            ConnectionTrafficSecrets::Aes128Gcm {
                key: rustls::crypto::cipher::AeadKey::from([p.server.tx.key[0]; 32]),
                iv: rustls::crypto::cipher::Iv::from(p.server.tx.iv),
            },
        ),
        rx: (
            0,
            ConnectionTrafficSecrets::Aes128Gcm {
                key: rustls::crypto::cipher::AeadKey::from([0; 32]),
                iv: rustls::crypto::cipher::Iv::from(p.server.rx.iv),
            },
        ),
    };
    assert!(matches!(
        Sealed::new(
            secrets,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            ProtocolVersion::TLSv1_3,
            Some(Box::new(stale))
        ),
        Err(NotSealed::Secrets)
    ));
}

#[test]
fn kernel_keys_continue_the_session_in_the_kernel_for_every_suite() {
    for suite in suites() {
        let mut p = handshake(suite);
        // Some records sealed here first: the kernel must continue their sequence.
        for msg in [&b"HTTP/1.1 200 OK\r\n\r\n"[..], b"data: one\n\n"] {
            let mut wire = Vec::new();
            assert!(p.server.seal(msg, &mut wire));
            assert_eq!(p.deliver(&wire).unwrap(), msg, "{suite:?}");
        }
        let keys = p.server.kernel_keys();
        p.server.to_kernel(true);
        let mut k = KernelModel::install(keys.as_bytes());
        for i in 0..3 {
            let msg = format!("data: via the kernel {i}\n\n");
            let mut wire = Vec::new();
            k.seal(CT_DATA, msg.as_bytes(), &mut wire);
            assert_eq!(p.deliver(&wire).unwrap(), msg.as_bytes(), "{suite:?}");
        }
        // Receiving stays here: the client's records still open.
        p.client.writer().write_all(b"ping").unwrap();
        let mut wire = p.client_wire();
        let (r, plain, out) = open_all(&mut p.server, &mut wire);
        assert_eq!(
            (r, plain.as_slice(), out.len()),
            (Ok(false), &b"ping"[..], 0)
        );
        if p.server.is_tls13() {
            // The client asks for a key update: ours is queued for the kernel, sealed
            // under the old keys, and the new keys follow it.
            p.client.refresh_traffic_keys().unwrap();
            let mut wire = p.client_wire();
            let (r, _, queued) = open_all(&mut p.server, &mut wire);
            assert_eq!(r, Ok(false));
            assert_eq!(queued, [CT_HANDSHAKE, 0, 5, HS_KEY_UPDATE, 0, 0, 1, 0]);
            assert!(p.server.kernel_changed(), "{suite:?}: new keys to install");
            // Asked again before the kernel took the new keys: the one KeyUpdate queued
            // answers both.
            p.client.refresh_traffic_keys().unwrap();
            let mut again = p.client_wire();
            let (r, _, more) = open_all(&mut p.server, &mut again);
            assert_eq!((r, more.len()), (Ok(false), 0), "{suite:?}");
            let mut wire = Vec::new();
            k.seal_queued(&queued, &mut wire);
            k = KernelModel::install(p.server.kernel_keys().as_bytes());
            p.server.kernel_took_keys();
            assert!(!p.server.kernel_changed());
            k.seal(CT_DATA, b"under the new key", &mut wire);
            assert_eq!(p.deliver(&wire).unwrap(), b"under the new key", "{suite:?}");
        }
        // The close_notify is queued for the kernel too.
        let mut queued = Vec::new();
        p.server.alert(CLOSE_NOTIFY, &mut queued);
        assert_eq!(queued, [CT_ALERT, 0, 2, 1, CLOSE_NOTIFY]);
        let mut wire = Vec::new();
        k.seal_queued(&queued, &mut wire);
        p.deliver(&wire).unwrap();
        let mut b = [0u8; 4];
        assert_eq!(
            p.client.reader().read(&mut b).unwrap(),
            0,
            "{suite:?}: clean EOF"
        );
    }
}

#[test]
fn in_the_kernel_the_record_limit_rekeys_or_ends_the_connection() {
    use rustls::crypto::ring::cipher_suite as cs;
    // TLS 1.3, a kernel that takes new keys: a KeyUpdate is queued before the limit.
    let mut p = handshake(cs::TLS13_AES_128_GCM_SHA256);
    let mut k = KernelModel::install(p.server.kernel_keys().as_bytes());
    p.server.to_kernel(true);
    let mut queued = Vec::new();
    assert!(p.server.kernel_sent(GCM_LIMIT / 2, &mut queued));
    assert!(queued.is_empty() && !p.server.kernel_changed());
    assert!(p.server.kernel_sent(GCM_LIMIT / 2, &mut queued));
    assert_eq!(queued, [CT_HANDSHAKE, 0, 5, HS_KEY_UPDATE, 0, 0, 1, 0]);
    assert!(p.server.kernel_changed());
    // More records before the kernel has the new keys queue no second KeyUpdate.
    assert!(p.server.kernel_sent(GCM_LIMIT, &mut queued));
    assert_eq!(queued.len(), 8);
    let mut wire = Vec::new();
    k.seal_queued(&queued, &mut wire);
    let mut k = KernelModel::install(p.server.kernel_keys().as_bytes());
    k.seal(CT_DATA, b"fresh", &mut wire);
    assert_eq!(p.deliver(&wire).unwrap(), b"fresh");
    // TLS 1.3 on a kernel that cannot rekey, and TLS 1.2: a close_notify instead.
    for (suite, rekey) in [
        (cs::TLS13_AES_256_GCM_SHA384, false),
        (cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, true),
    ] {
        let mut p = handshake(suite);
        p.server.to_kernel(rekey);
        let mut queued = Vec::new();
        assert!(!p.server.kernel_sent(GCM_LIMIT, &mut queued), "{suite:?}");
        assert_eq!(queued, [CT_ALERT, 0, 2, 1, CLOSE_NOTIFY]);
        assert!(!p.server.kernel_changed());
    }
    // ChaCha20 has no such limit.
    let mut p = handshake(cs::TLS13_CHACHA20_POLY1305_SHA256);
    p.server.to_kernel(true);
    assert!(p.server.kernel_sent(1 << 40, &mut Vec::new()));
}

#[test]
fn a_peer_key_update_a_kernel_cannot_make_ends_the_connection_cleanly() {
    let mut p = handshake(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256);
    p.server.to_kernel(false);
    p.client.refresh_traffic_keys().unwrap();
    let mut wire = p.client_wire();
    let (r, _, queued) = open_all(&mut p.server, &mut wire);
    assert_eq!(r, Err(Fault::Rekey));
    assert_eq!(queued, [CT_ALERT, 0, 2, 1, CLOSE_NOTIFY]);
}
