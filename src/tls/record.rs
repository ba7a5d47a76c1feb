//! The TLS record layer of an established connection, after rustls has done the handshake.
//!
//! An idle TLS subscriber should cost its keys, not a TLS library's whole session (about
//! 2 KiB of rustls state and two expanded AEAD key schedules). So once the handshake is
//! over and its last flight is encoded, the session is taken out of rustls through the
//! API it offers for kernel TLS (`dangerous_into_kernel_connection`) and what is left is
//! [`Sealed`]: per direction the AEAD key, the IV, the record sequence number and, for
//! TLS 1.3, the traffic secret that the next key update derives from — about 200 bytes.
//! This is the job the kernel does with kTLS, done in userspace: records are sealed and
//! opened with `ring`'s AEAD (the crypto rustls itself uses here), and the key schedule
//! (RFC 8446 §7.1–7.2) with `ring`'s HKDF. The AEAD key is expanded for each write or
//! read and dropped with it, so nothing larger stays with an idle stream.
//!
//! What an established connection can receive is small, and everything else is refused
//! with a fatal alert: application data, a close_notify or other alert, and in TLS 1.3 a
//! KeyUpdate (answered with ours when the peer asks). A TLS 1.2 handshake message after
//! the handshake (renegotiation) is refused. Sending keeps under each cipher's
//! confidentiality limit: TLS 1.3 updates its keys; TLS 1.2, which cannot, ends the
//! connection with a close_notify first.
//!
//! The TLS 1.3 traffic secrets are not part of what rustls extracts (it keeps them for its
//! own key updates); they reach herald through the server configuration's `KeyLog`
//! ([`TrafficCapture`]), which rustls calls on the worker thread while it runs that
//! connection's handshake. They are held in a per-thread slot, taken by the connection
//! right after the call, checked against the keys rustls hands over, and never written
//! anywhere.

use std::cell::RefCell;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{self, KeyType};
use rustls::{CipherSuite, ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion};
use zeroize::Zeroize;

/// Largest plaintext in one record.
pub const MAX_FRAGMENT: usize = 16 << 10;
/// Largest ciphertext a peer may send in one record (TLS 1.3: 2^14 + 256; TLS 1.2 allows
/// 2^14 + 2048, more than any AEAD suite can produce).
const MAX_CIPHERTEXT_13: usize = MAX_FRAGMENT + 256;
const MAX_CIPHERTEXT_12: usize = MAX_FRAGMENT + 2048;
const HEADER: usize = 5;
const TAG: usize = 16;
const GCM_EXPLICIT: usize = 8;

const CT_ALERT: u8 = 21;
pub(crate) const CT_HANDSHAKE: u8 = 22;
const CT_DATA: u8 = 23;
const HS_KEY_UPDATE: u8 = 24;

/// Alert descriptions herald sends.
pub const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const DECODE_ERROR: u8 = 50;
const ILLEGAL_PARAMETER: u8 = 47;
const USER_CANCELED: u8 = 90;

/// Records sealed under one key before it is replaced (TLS 1.3) or the connection ends
/// (TLS 1.2): half of AES-GCM's 2^24 limit as rustls counts it, to leave a wide margin.
const GCM_LIMIT: u64 = 1 << 23;
/// KeyUpdates, empty records or ignored warnings accepted in a row without application
/// data between them: more is a flood.
const IN_A_ROW_MAX: u8 = 32;

/// Why an established connection was ended (the matching alert has been sealed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A malformed or unexpected record or message, a refused renegotiation, a flood.
    Protocol,
    /// A record failed authentication.
    Decrypt,
    /// The peer sent a fatal alert.
    AlertReceived,
    /// The peer asked for a key update that the kernel sealing this connection's records
    /// cannot make (a close_notify has been queued).
    Rekey,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    fn alg(self) -> &'static aead::Algorithm {
        match self {
            Cipher::Aes128Gcm => &aead::AES_128_GCM,
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn key_len(self) -> usize {
        self.alg().key_len()
    }

    fn limit(self) -> u64 {
        match self {
            Cipher::Chacha20Poly1305 => u64::MAX - 1,
            _ => GCM_LIMIT,
        }
    }
}

/// One direction's keys.
struct Dir {
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
    /// TLS 1.3: the current traffic secret (SHA-256 or SHA-384 long).
    secret: [u8; 48],
}

impl Drop for Dir {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
        self.secret.zeroize();
    }
}

impl Dir {
    fn from_extracted(seq: u64, s: ConnectionTrafficSecrets) -> (Cipher, Dir) {
        let (cipher, key, iv) = match s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            // A variant added by a later rustls: not sealed here.
            #[allow(unreachable_patterns)]
            _ => unreachable!("checked by Sealed::new"),
        };
        let mut d = Dir {
            key: [0; 32],
            iv: [0; 12],
            seq,
            secret: [0; 48],
        };
        d.key[..key.as_ref().len()].copy_from_slice(key.as_ref());
        d.iv.copy_from_slice(iv.as_ref());
        (cipher, d)
    }

    fn nonce(&self, seq: u64) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }

    fn aead(&self, cipher: Cipher) -> LessSafeKey {
        let k = UnboundKey::new(cipher.alg(), &self.key[..cipher.key_len()])
            .expect("key length matches the cipher");
        LessSafeKey::new(k)
    }
}

/// HKDF-Expand-Label with an empty context (RFC 8446 §7.1).
fn expand_label(hash: hkdf::Algorithm, secret: &[u8], label: &[u8], out: &mut [u8]) {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = hkdf::Prk::new_less_safe(hash, secret);
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&len, &label_len, b"tls13 ", label, &[0]];
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("output lengths are within HKDF's limit");
}

/// The TLS 1.3 application traffic secrets of one handshake, as rustls derives them.
pub struct Traffic {
    client: Option<([u8; 48], usize)>,
    server: Option<([u8; 48], usize)>,
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for (s, _) in [&mut self.client, &mut self.server].into_iter().flatten() {
            s.zeroize();
        }
    }
}

thread_local! {
    static CAPTURED: RefCell<Traffic> = const { RefCell::new(Traffic { client: None, server: None }) };
}

const CLIENT_LABEL: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_LABEL: &str = "SERVER_TRAFFIC_SECRET_0";

/// The `KeyLog` of herald's server configuration: keeps the two TLS 1.3 application
/// traffic secrets of the handshake this thread is running, for [`take_captured`]. It
/// logs nothing and asks for nothing else.
#[derive(Debug)]
pub struct TrafficCapture;

impl rustls::KeyLog for TrafficCapture {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if secret.len() > 48 {
            return;
        }
        let mut s = [0u8; 48];
        s[..secret.len()].copy_from_slice(secret);
        CAPTURED.with(|c| {
            let mut c = c.borrow_mut();
            match label {
                CLIENT_LABEL => c.client = Some((s, secret.len())),
                SERVER_LABEL => c.server = Some((s, secret.len())),
                _ => {}
            }
        });
        s.zeroize();
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_LABEL || label == SERVER_LABEL
    }
}

/// Forget whatever this thread captured (before a handshake step of another connection).
pub fn clear_captured() {
    CAPTURED.with(|c| {
        let mut c = c.borrow_mut();
        c.client = None;
        c.server = None;
    });
}

/// Take the secrets captured on this thread, once both are there.
pub fn take_captured() -> Option<Box<Traffic>> {
    CAPTURED.with(|c| {
        let mut c = c.borrow_mut();
        if c.client.is_none() || c.server.is_none() {
            return None;
        }
        Some(Box::new(Traffic {
            client: c.client.take(),
            server: c.server.take(),
        }))
    })
}

/// An established connection's record layer (server side).
pub struct Sealed {
    cipher: Cipher,
    /// TLS 1.3 (else 1.2), and for TLS 1.3 the suite's hash.
    hash: Option<hkdf::Algorithm>,
    tx: Dir,
    rx: Dir,
    /// A handshake message split over records (TLS 1.3 KeyUpdate: 5 bytes).
    hs: [u8; 5],
    hs_len: u8,
    /// Key updates, empty records or warnings since the last application data.
    in_a_row: u8,
    /// A close_notify was sealed: nothing more is.
    done: bool,
    /// KeyUpdates followed since [`Sealed::take_key_updates`] was last called.
    key_updates: u16,
    /// Sending is done by the kernel (kTLS `TLS_TX`): application data is not sealed
    /// here, and the records herald must send itself (alerts, KeyUpdates) are queued as
    /// plaintext records for the backend to send with their record type (see
    /// [`Sealed::to_kernel`]).
    kernel: Option<KernelTx>,
}

/// What the record layer tracks once the kernel seals its records.
#[derive(Clone, Copy, Debug)]
struct KernelTx {
    /// The kernel can replace its sending key (TLS 1.3 rekey, Linux 6.14 and later).
    rekey: bool,
    /// Records the kernel may have sealed under its current key (an upper bound).
    records: u64,
    /// The sending keys changed (a KeyUpdate was queued): the kernel needs the new ones
    /// once that record is out.
    changed: bool,
}

/// A `struct tls12_crypto_info_*` for `setsockopt(SOL_TLS, TLS_TX)`, as bytes in the
/// kernel's layout (`include/uapi/linux/tls.h`): the version and cipher (native-endian
/// u16s), then iv, key, salt and the big-endian record sequence number.
#[derive(Clone)]
pub struct KernelKeys {
    bytes: [u8; 56],
    len: usize,
}

impl KernelKeys {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Drop for KernelKeys {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

/// A record queued for the kernel to seal, as the backend sends it: its content type,
/// then its plaintext (`[type, len_hi, len_lo, body…]`).
pub const KERNEL_RECORD_HEADER: usize = 3;

/// Why a session could not be sealed (it then stays with rustls).
#[derive(Debug)]
pub enum NotSealed {
    Version,
    Suite,
    /// TLS 1.3 without both traffic secrets, or with ones that do not give rustls' keys.
    Secrets,
}

impl Sealed {
    /// The record layer for a finished handshake: the keys rustls handed over, its
    /// suite and version, and for TLS 1.3 the captured traffic secrets.
    pub fn new(
        secrets: ExtractedSecrets,
        suite: CipherSuite,
        version: ProtocolVersion,
        traffic: Option<Box<Traffic>>,
    ) -> Result<Sealed, NotSealed> {
        let hash = match version {
            ProtocolVersion::TLSv1_3 => Some(match suite {
                CipherSuite::TLS13_AES_256_GCM_SHA384 => hkdf::HKDF_SHA384,
                CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => hkdf::HKDF_SHA256,
                _ => return Err(NotSealed::Suite),
            }),
            ProtocolVersion::TLSv1_2 => None,
            _ => return Err(NotSealed::Version),
        };
        for s in [&secrets.tx.1, &secrets.rx.1] {
            if !matches!(
                s,
                ConnectionTrafficSecrets::Aes128Gcm { .. }
                    | ConnectionTrafficSecrets::Aes256Gcm { .. }
                    | ConnectionTrafficSecrets::Chacha20Poly1305 { .. }
            ) {
                return Err(NotSealed::Suite);
            }
        }
        let ExtractedSecrets { tx, rx } = secrets;
        let (cipher, mut txd) = Dir::from_extracted(tx.0, tx.1);
        let (rx_cipher, mut rxd) = Dir::from_extracted(rx.0, rx.1);
        if cipher != rx_cipher {
            return Err(NotSealed::Suite);
        }
        if let Some(hash) = hash {
            let t = traffic.ok_or(NotSealed::Secrets)?;
            let (Some((server, slen)), Some((client, clen))) = (t.server, t.client) else {
                return Err(NotSealed::Secrets);
            };
            let want = hash.len();
            if slen != want || clen != want {
                return Err(NotSealed::Secrets);
            }
            txd.secret = server;
            rxd.secret = client;
            // The secrets must give exactly the keys rustls uses, or they are not this
            // connection's.
            for d in [&txd, &rxd] {
                let (key, iv) = derive(hash, cipher, &d.secret[..want]);
                if key[..cipher.key_len()] != d.key[..cipher.key_len()] || iv != d.iv {
                    return Err(NotSealed::Secrets);
                }
            }
        }
        Ok(Sealed {
            cipher,
            hash,
            tx: txd,
            rx: rxd,
            hs: [0; 5],
            hs_len: 0,
            in_a_row: 0,
            done: false,
            key_updates: 0,
            kernel: None,
        })
    }

    /// From now on the kernel seals what this connection sends (its `TLS_TX` is set with
    /// [`Sealed::kernel_keys`]). `rekey`: the kernel can take new sending keys (TLS 1.3
    /// key updates).
    pub fn to_kernel(&mut self, rekey: bool) {
        self.kernel = Some(KernelTx {
            rekey: rekey && self.hash.is_some(),
            records: 0,
            changed: false,
        });
    }

    /// Whether the kernel seals this connection's records.
    pub fn in_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    /// The sending keys changed since the kernel last took them (a KeyUpdate is queued
    /// ahead of any new data): install [`Sealed::kernel_keys`] once it is out.
    pub fn kernel_changed(&self) -> bool {
        self.kernel.is_some_and(|k| k.changed)
    }

    /// The kernel took the current sending keys. Until then no further KeyUpdate is
    /// queued: the one queued answers every request that came meanwhile (RFC 8446
    /// §4.6.3), and the kernel holds one generation of keys at a time.
    pub fn kernel_took_keys(&mut self) {
        if let Some(k) = self.kernel.as_mut() {
            k.changed = false;
        }
    }

    /// The sending direction's keys for the kernel, at the next record to send.
    pub fn kernel_keys(&self) -> KernelKeys {
        let (version, cipher, key_len, salt_len) = match (self.hash.is_some(), self.cipher) {
            (true, Cipher::Aes128Gcm) => (0x0304u16, 51u16, 16, 4),
            (true, Cipher::Aes256Gcm) => (0x0304, 52, 32, 4),
            (true, Cipher::Chacha20Poly1305) => (0x0304, 54, 32, 0),
            (false, Cipher::Aes128Gcm) => (0x0303, 51, 16, 4),
            (false, Cipher::Aes256Gcm) => (0x0303, 52, 32, 4),
            (false, Cipher::Chacha20Poly1305) => (0x0303, 54, 32, 0),
        };
        let d = &self.tx;
        let mut b = [0u8; 56];
        b[..2].copy_from_slice(&version.to_ne_bytes());
        b[2..4].copy_from_slice(&cipher.to_ne_bytes());
        let mut at = 4;
        let mut put = |x: &[u8]| {
            b[at..at + x.len()].copy_from_slice(x);
            at += x.len();
        };
        if salt_len == 0 {
            // ChaCha20-Poly1305: the whole 12-byte IV; the kernel XORs in the sequence.
            put(&d.iv);
            put(&d.key[..key_len]);
        } else if self.hash.is_some() {
            // TLS 1.3 AES-GCM: salt ‖ iv is the static IV the sequence is XORed into.
            put(&d.iv[4..]);
            put(&d.key[..key_len]);
            put(&d.iv[..4]);
        } else {
            // TLS 1.2 AES-GCM: `iv` is the explicit nonce of the next record, which the
            // kernel then increments per record. Start it where this layer's nonces
            // (IV XOR sequence) would be, so it follows on from them.
            put(&self.tx.nonce(d.seq).as_ref()[4..]);
            put(&d.key[..key_len]);
            put(&d.iv[..4]);
        }
        put(&d.seq.to_be_bytes());
        KernelKeys { bytes: b, len: at }
    }

    /// The kernel sealed about `records` more records of application data. Before its
    /// cipher's limit: TLS 1.3 with a kernel that can rekey queues a KeyUpdate (new keys
    /// to install), otherwise a close_notify is queued and false says the connection
    /// ends.
    pub fn kernel_sent(&mut self, records: u64, out: &mut Vec<u8>) -> bool {
        let limit = self.cipher.limit();
        let Some(k) = self.kernel.as_mut() else {
            return true;
        };
        k.records = k.records.saturating_add(records);
        if k.records + 64 < limit || self.done {
            return !self.done;
        }
        if k.rekey {
            if !k.changed {
                self.queue_kernel(CT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 0], out);
                self.update_tx();
            }
            true
        } else {
            self.alert(CLOSE_NOTIFY, out);
            false
        }
    }

    fn queue_kernel(&mut self, typ: u8, body: &[u8], out: &mut Vec<u8>) {
        out.push(typ);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }

    /// Whether this is TLS 1.3.
    pub fn is_tls13(&self) -> bool {
        self.hash.is_some()
    }

    /// Ciphertext bytes that `n` bytes of plaintext become, at most.
    pub fn sealed_len(n: usize) -> usize {
        n.div_ceil(MAX_FRAGMENT).max(1) * (HEADER + GCM_EXPLICIT + TAG + 1) + n
    }

    /// Seal `plain` as application data onto `out`, in as few records as fit. False if
    /// nothing more may be sealed: a TLS 1.2 connection at its cipher's limit (a
    /// close_notify has then been sealed instead), or one already closed.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> bool {
        if self.done {
            return false;
        }
        let key = self.tx.aead(self.cipher);
        let mut key = Some(key);
        for chunk in plain.chunks(MAX_FRAGMENT) {
            if self.tx.seq + 1 >= self.cipher.limit() {
                match self.hash {
                    Some(_) => {
                        self.seal_record(
                            key.as_ref().unwrap(),
                            CT_HANDSHAKE,
                            &[HS_KEY_UPDATE, 0, 0, 1, 0],
                            out,
                        );
                        self.update_tx();
                        key = Some(self.tx.aead(self.cipher));
                    }
                    None => {
                        self.seal_record(key.as_ref().unwrap(), CT_ALERT, &[1, CLOSE_NOTIFY], out);
                        self.done = true;
                        return false;
                    }
                }
            }
            self.seal_record(key.as_ref().unwrap(), CT_DATA, chunk, out);
        }
        true
    }

    /// Seal an alert (a close_notify, level warning; anything else fatal). Nothing is
    /// sealed after it.
    pub fn alert(&mut self, desc: u8, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        let level = if desc == CLOSE_NOTIFY { 1 } else { 2 };
        let key = self.tx.aead(self.cipher);
        self.seal_record(&key, CT_ALERT, &[level, desc], out);
        self.done = true;
    }

    fn seal_record(&mut self, key: &LessSafeKey, typ: u8, body: &[u8], out: &mut Vec<u8>) {
        if self.kernel.is_some() {
            return self.queue_kernel(typ, body, out);
        }
        let seq = self.tx.seq;
        self.tx.seq += 1;
        let nonce = self.tx.nonce(seq);
        let at = out.len();
        if self.hash.is_some() {
            let len = body.len() + 1 + TAG;
            out.extend_from_slice(&[CT_DATA, 3, 3, (len >> 8) as u8, len as u8]);
            out.extend_from_slice(body);
            out.push(typ);
            let mut aad = [0u8; HEADER];
            aad.copy_from_slice(&out[at..at + HEADER]);
            let tag = key
                .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[at + HEADER..])
                .expect("a record is within the AEAD's limits");
            out.extend_from_slice(tag.as_ref());
        } else {
            let explicit = if self.cipher == Cipher::Chacha20Poly1305 {
                0
            } else {
                GCM_EXPLICIT
            };
            let len = explicit + body.len() + TAG;
            out.extend_from_slice(&[typ, 3, 3, (len >> 8) as u8, len as u8]);
            if explicit > 0 {
                out.extend_from_slice(&nonce.as_ref()[4..]);
            }
            out.extend_from_slice(body);
            let aad = tls12_aad(seq, typ, body.len());
            let from = at + HEADER + explicit;
            let tag = key
                .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[from..])
                .expect("a record is within the AEAD's limits");
            out.extend_from_slice(tag.as_ref());
        }
    }

    fn update_tx(&mut self) {
        let hash = self.hash.expect("TLS 1.3");
        update(hash, self.cipher, &mut self.tx);
        if let Some(k) = self.kernel.as_mut() {
            k.records = 0;
            k.changed = true;
        }
    }

    /// Open every complete record at the front of `incoming`: application data is
    /// appended to `plain`, anything herald must answer (a KeyUpdate, a fatal alert) is
    /// sealed onto `out`. Returns how many bytes of `incoming` were used and whether the
    /// peer sent its close_notify (nothing after it is read).
    pub fn open(
        &mut self,
        incoming: &mut [u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(usize, bool), Fault> {
        let mut at = 0;
        let mut key: Option<LessSafeKey> = None;
        while incoming.len() - at >= HEADER {
            let h = &incoming[at..at + HEADER];
            let (typ, major, len) = (h[0], h[1], u16::from_be_bytes([h[3], h[4]]) as usize);
            let max = if self.hash.is_some() {
                MAX_CIPHERTEXT_13
            } else {
                MAX_CIPHERTEXT_12
            };
            if major != 3 {
                return Err(self.fail(UNEXPECTED_MESSAGE, Fault::Protocol, out));
            }
            if len > max {
                return Err(self.fail(RECORD_OVERFLOW, Fault::Protocol, out));
            }
            if incoming.len() - at < HEADER + len {
                break;
            }
            let mut header = [0u8; HEADER];
            header.copy_from_slice(h);
            let body = &mut incoming[at + HEADER..at + HEADER + len];
            at += HEADER + len;
            let k = key.get_or_insert_with(|| self.rx.aead(self.cipher));
            let seq = self.rx.seq;
            if seq == u64::MAX {
                return Err(self.fail(UNEXPECTED_MESSAGE, Fault::Protocol, out));
            }
            let (typ, content) = if self.hash.is_some() {
                if typ != CT_DATA {
                    return Err(self.fail(UNEXPECTED_MESSAGE, Fault::Protocol, out));
                }
                let Ok(inner) = k.open_in_place(self.rx.nonce(seq), Aad::from(header), body) else {
                    return Err(self.fail(BAD_RECORD_MAC, Fault::Decrypt, out));
                };
                // Strip the padding: the last non-zero byte is the real content type.
                let Some(end) = inner.iter().rposition(|&b| b != 0) else {
                    return Err(self.fail(UNEXPECTED_MESSAGE, Fault::Protocol, out));
                };
                if end > MAX_FRAGMENT {
                    return Err(self.fail(RECORD_OVERFLOW, Fault::Protocol, out));
                }
                (inner[end], &inner[..end])
            } else {
                let explicit = if self.cipher == Cipher::Chacha20Poly1305 {
                    0
                } else {
                    GCM_EXPLICIT
                };
                if body.len() < explicit + TAG {
                    return Err(self.fail(BAD_RECORD_MAC, Fault::Decrypt, out));
                }
                let nonce = if explicit > 0 {
                    let mut n = [0u8; 12];
                    n[..4].copy_from_slice(&self.rx.iv[..4]);
                    n[4..].copy_from_slice(&body[..GCM_EXPLICIT]);
                    Nonce::assume_unique_for_key(n)
                } else {
                    self.rx.nonce(seq)
                };
                let aad = tls12_aad(seq, typ, body.len() - explicit - TAG);
                let Ok(inner) = k.open_within(nonce, Aad::from(aad), body, explicit..) else {
                    return Err(self.fail(BAD_RECORD_MAC, Fault::Decrypt, out));
                };
                if inner.len() > MAX_FRAGMENT {
                    return Err(self.fail(RECORD_OVERFLOW, Fault::Protocol, out));
                }
                (typ, &*inner)
            };
            self.rx.seq += 1;
            if self.hs_len > 0 && typ != CT_HANDSHAKE {
                // A handshake message may not be interleaved with other records.
                return Err(self.fail(UNEXPECTED_MESSAGE, Fault::Protocol, out));
            }
            match typ {
                CT_DATA => {
                    if content.is_empty() {
                        self.flood_check(out)?;
                    } else {
                        self.in_a_row = 0;
                        plain.extend_from_slice(content);
                    }
                }
                CT_ALERT => {
                    if content.len() != 2 {
                        return Err(self.fail(DECODE_ERROR, Fault::Protocol, out));
                    }
                    match (content[0], content[1]) {
                        (_, CLOSE_NOTIFY) => return Ok((at, true)),
                        // TLS 1.2 warnings (and user_canceled, which is followed by a
                        // close_notify) are noted and passed over; TLS 1.3 has no other
                        // warnings.
                        (1, d) if self.hash.is_none() || d == USER_CANCELED => {
                            self.flood_check(out)?;
                        }
                        _ => {
                            self.done = true;
                            return Err(Fault::AlertReceived);
                        }
                    }
                }
                CT_HANDSHAKE if self.hash.is_some() => {
                    if content.is_empty() {
                        return Err(self.fail(UNEXPECTED_MESSAGE, Fault::Protocol, out));
                    }
                    let mut rest = content;
                    while !rest.is_empty() {
                        let take = (5 - self.hs_len as usize).min(rest.len());
                        let (now, later) = rest.split_at(take);
                        let n = self.hs_len as usize;
                        self.hs[n..n + take].copy_from_slice(now);
                        self.hs_len += take as u8;
                        rest = later;
                        if self.hs[0] != HS_KEY_UPDATE {
                            // Nothing but a KeyUpdate may follow a TLS 1.3 handshake here.
                            return Err(self.fail(UNEXPECTED_MESSAGE, Fault::Protocol, out));
                        }
                        if self.hs_len >= 4 && self.hs[1..4] != [0, 0, 1] {
                            return Err(self.fail(DECODE_ERROR, Fault::Protocol, out));
                        }
                        if self.hs_len < 5 {
                            continue;
                        }
                        self.hs_len = 0;
                        // A key change ends the record it is in.
                        if !rest.is_empty() {
                            return Err(self.fail(UNEXPECTED_MESSAGE, Fault::Protocol, out));
                        }
                        let requested = match self.hs[4] {
                            0 => false,
                            1 => true,
                            _ => return Err(self.fail(ILLEGAL_PARAMETER, Fault::Protocol, out)),
                        };
                        self.flood_check(out)?;
                        let hash = self.hash.expect("TLS 1.3");
                        update(hash, self.cipher, &mut self.rx);
                        self.key_updates = self.key_updates.saturating_add(1);
                        key = None;
                        if requested && self.kernel.is_some_and(|k| !k.rekey) {
                            // The kernel cannot take new sending keys, so the update the
                            // peer asks for cannot be made: end the connection cleanly.
                            self.alert(CLOSE_NOTIFY, out);
                            return Err(Fault::Rekey);
                        }
                        if requested && !self.done && !self.kernel_changed() {
                            let k = self.tx.aead(self.cipher);
                            self.seal_record(&k, CT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 0], out);
                            self.update_tx();
                        }
                    }
                }
                // TLS 1.2 renegotiation, a CCS, or an unknown type.
                _ => {
                    return Err(self.fail(UNEXPECTED_MESSAGE, Fault::Protocol, out));
                }
            }
        }
        Ok((at, false))
    }

    /// How many KeyUpdates were followed since the last call (for the counters).
    pub fn take_key_updates(&mut self) -> u16 {
        std::mem::take(&mut self.key_updates)
    }

    /// Whether a close_notify (or fatal alert) has been sealed.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn flood_check(&mut self, out: &mut Vec<u8>) -> Result<(), Fault> {
        self.in_a_row += 1;
        if self.in_a_row > IN_A_ROW_MAX {
            return Err(self.fail(UNEXPECTED_MESSAGE, Fault::Protocol, out));
        }
        Ok(())
    }

    fn fail(&mut self, desc: u8, why: Fault, out: &mut Vec<u8>) -> Fault {
        self.alert(desc, out);
        why
    }
}

/// TLS 1.2's additional data: the sequence number, type, version and plaintext length.
fn tls12_aad(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9] = 3;
    a[10] = 3;
    a[11..].copy_from_slice(&(len as u16).to_be_bytes());
    a
}

/// A traffic secret's key and IV (RFC 8446 §7.3).
fn derive(hash: hkdf::Algorithm, cipher: Cipher, secret: &[u8]) -> ([u8; 32], [u8; 12]) {
    let mut key = [0u8; 32];
    let mut iv = [0u8; 12];
    expand_label(hash, secret, b"key", &mut key[..cipher.key_len()]);
    expand_label(hash, secret, b"iv", &mut iv);
    (key, iv)
}

/// The next generation of a direction's keys (RFC 8446 §7.2).
fn update(hash: hkdf::Algorithm, cipher: Cipher, d: &mut Dir) {
    let n = hash.len();
    let mut next = [0u8; 48];
    expand_label(hash, &d.secret[..n], b"traffic upd", &mut next[..n]);
    d.secret = next;
    next.zeroize();
    let (mut key, mut iv) = derive(hash, cipher, &d.secret[..n]);
    d.key = key;
    d.iv = iv;
    key.zeroize();
    iv.zeroize();
    d.seq = 0;
}

#[cfg(test)]
pub(crate) mod kernel_model;
#[cfg(test)]
mod tests;
