//! TLS on a worker's connections, sans-IO: rustls' unbuffered server connection driven by
//! the backend's own reads and writes, with no thread and no socket of its own.
//!
//! Reads: ciphertext is appended to the connection's `incoming` (freed once every record
//! in it is processed), records are decrypted, and the plaintext goes to the HTTP side as
//! if it had been read from a plain socket.
//!
//! Writes keep encode-once: the pending frames are still the shared event bytes. At write
//! time they are gathered (up to [`TLS_WRITE_MAX`]) and encrypted, as few records as fit,
//! into one buffer from the worker's pool, which is the only thing the write sends. The
//! buffer goes back to the pool once fully written, and only then are the frames it
//! carries consumed, so a partial write resumes from the ciphertext, never re-encrypts.
//! An idle TLS stream holds its session state and nothing else.
//!
//! Session state: rustls runs the handshake. Once it is over and its last flight encoded,
//! the session is sealed: taken out of rustls with its keys into `tls::record::Sealed`
//! (about 200 bytes), which seals and opens records from then on. A session that cannot
//! be sealed (its TLS 1.3 traffic secrets were not seen) stays whole in rustls, which
//! works the same, only larger.
//!
//! Kernel TLS (where the start-up probe found it, `KtlsMode::Kernel`): once a sealed
//! session's userspace ciphertext is all written, its sending keys are installed in the
//! kernel (`TCP_ULP "tls"`, `TLS_TX`) by the backend, and from then on the connection
//! writes like a plaintext one: the shared event bytes go to the socket as they are and
//! the kernel seals them. The few records herald still sends itself (an alert, a
//! close_notify, a TLS 1.3 KeyUpdate) are queued in `extra` as plaintext records and sent
//! one per write with their record type in a control message. After a KeyUpdate the new
//! keys are installed once it is out, before any more data. Receiving stays in userspace
//! (a subscriber sends little: its request and the odd key update), so reads need no
//! control-message handling.

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};

use super::{flag, ConnId, Core, Phase};
use crate::tls::record::{self, Fault, KernelKeys, Sealed, KERNEL_RECORD_HEADER};
use crate::tls::KtlsMode;

/// Where a sealed session's sending is, with kernel TLS (`TlsConn::ktx`).
mod ktx {
    /// Sealed in userspace (no kernel TLS, or the kernel refused it).
    pub const OFF: u8 = 0;
    /// Keys to install in the kernel once what userspace sealed is written.
    pub const DUE: u8 = 1;
    /// The backend is installing them; writes wait.
    pub const BUSY: u8 = 2;
    /// The kernel seals what the connection sends.
    pub const ON: u8 = 3;
}

/// Most plaintext encrypted for one write: four full records.
pub const TLS_WRITE_MAX: usize = 4 * RECORD_MAX;
/// Largest TLS plaintext record.
const RECORD_MAX: usize = 16 << 10;
/// Bound on what a record adds to its plaintext (header, explicit nonce, tag, content
/// type; TLS 1.2 AES-GCM's 29 bytes is the largest of the suites offered).
const RECORD_OVERHEAD: usize = 64;
/// Pool buffers: small ones serve the usual write (a few events), large ones a backlog.
const SMALL_BUF: usize = 4 << 10;
const POOL_MAX: usize = 64;
/// The most ciphertext a connection may have queued beyond the write in flight (handshake
/// flights, tickets, alerts): a handshake flight with a long chain is a few KiB.
const EXTRA_MAX: usize = 64 << 10;
/// Most unprocessed ciphertext held for one connection (one record and a bit).
const INCOMING_MAX: usize = 2 * RECORD_MAX + 4096;

/// Why a TLS connection was refused or ended early (each is counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// Plain HTTP sent to the TLS port: answered 400 in plaintext.
    PlainHttp,
    /// Not TLS, a malformed record or message, or a protocol violation.
    Protocol,
    /// No common version, suite, group, or ALPN protocol.
    Incompatible,
    /// A name no certificate covers.
    UnknownName,
    /// Decryption failed (a corrupted or forged record).
    Decrypt,
    /// Anything else rustls refused.
    Other,
}

/// A connection's session: rustls' during the handshake, herald's record layer after.
/// The sealed state is inline on purpose: it is what an idle stream keeps, and inline it
/// costs no allocation of its own (the whole `TlsConn` is boxed).
#[allow(clippy::large_enum_variant)]
enum Session {
    Shake(Box<UnbufferedServerConnection>),
    Sealed(Sealed),
    /// Between the two, for the moment of the hand-over.
    Spent,
}

/// One connection's TLS state.
pub(crate) struct TlsConn {
    session: Session,
    /// The TLS 1.3 traffic secrets seen during the handshake, until the session is sealed.
    traffic: Option<Box<record::Traffic>>,
    /// Ciphertext received and not yet processed; freed when empty.
    incoming: Vec<u8>,
    /// Ciphertext being written: `out[sent..]` is still to go.
    out: Vec<u8>,
    sent: usize,
    /// Plaintext bytes of the connection's pending frames that `out` carries.
    covers: usize,
    /// Ciphertext made while `out` was in flight, sent after it.
    extra: Vec<u8>,
    pub(crate) handshaking: bool,
    /// A close_notify has been queued: nothing more is encrypted.
    closed: bool,
    /// Nothing has been read yet (plain-HTTP detection).
    first: bool,
    /// The session stays with rustls (counted once).
    kept: bool,
    /// Kernel TLS state (`ktx::*`).
    ktx: u8,
    /// The `tls` ULP is on the socket (a rekey installs only `TLS_TX`).
    ulp: bool,
    /// The write in flight is the first record queued in `extra`, for the kernel to seal.
    ctl_write: bool,
    /// Buffer bytes this connection holds, as last counted in `Core::tls_held`.
    held: usize,
}

impl TlsConn {
    /// The capacity of the buffers this connection holds.
    fn buffers(&self) -> usize {
        self.incoming.capacity() + self.out.capacity() + self.extra.capacity()
    }
}

/// The per-worker TLS buffers.
#[derive(Default)]
pub(crate) struct TlsBufs {
    small: Vec<Vec<u8>>,
    large: Vec<Vec<u8>>,
    /// Gathered plaintext of one write, reused.
    plain: Vec<u8>,
}

impl TlsBufs {
    fn take(&mut self, need: usize) -> Vec<u8> {
        let pool = if need <= SMALL_BUF {
            &mut self.small
        } else {
            &mut self.large
        };
        let mut b = pool.pop().unwrap_or_default();
        b.clear();
        b.reserve(need);
        b
    }

    fn give(&mut self, mut b: Vec<u8>) {
        if b.capacity() == 0 {
            return;
        }
        b.clear();
        let pool = if b.capacity() <= SMALL_BUF {
            &mut self.small
        } else {
            &mut self.large
        };
        if pool.len() < POOL_MAX && b.capacity() <= TLS_WRITE_MAX + 8 * RECORD_OVERHEAD {
            pool.push(b);
        }
    }
}

/// Append an encoding step's output to `buf`, growing it as rustls asks.
fn encode_into(
    buf: &mut Vec<u8>,
    mut step: impl FnMut(&mut [u8]) -> Result<usize, usize>,
) -> Result<(), ()> {
    let mut room = 512;
    loop {
        let at = buf.len();
        buf.resize(at + room, 0);
        match step(&mut buf[at..]) {
            Ok(n) => {
                buf.truncate(at + n);
                return Ok(());
            }
            Err(need) if need > room && need <= EXTRA_MAX + TLS_WRITE_MAX => {
                buf.truncate(at);
                room = need;
            }
            Err(_) => {
                buf.truncate(at);
                return Err(());
            }
        }
    }
}

fn encode_err(e: EncodeError) -> usize {
    match e {
        EncodeError::InsufficientSize(s) => s.required_size,
        _ => usize::MAX,
    }
}

fn encrypt_err(e: EncryptError) -> usize {
    match e {
        EncryptError::InsufficientSize(s) => s.required_size,
        _ => usize::MAX,
    }
}

fn classify(e: &rustls::Error) -> TlsFailure {
    use rustls::Error as E;
    match e {
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::PeerMisbehaved(_)
        | E::AlertReceived(_) => TlsFailure::Protocol,
        E::PeerIncompatible(_) | E::NoApplicationProtocol => TlsFailure::Incompatible,
        E::DecryptError => TlsFailure::Decrypt,
        E::General(m) if m.contains("certificate") => TlsFailure::UnknownName,
        _ => TlsFailure::Other,
    }
}

/// Whether `b` starts an HTTP request rather than a TLS record (which starts 0x14–0x18).
fn looks_like_http(b: u8) -> bool {
    b.is_ascii_uppercase()
}

const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
    Content-Type: text/plain\r\n\
    Content-Length: 53\r\n\
    Connection: close\r\n\r\n\
    This port speaks TLS: use https:// to reach it here.\n";

impl<H: Default> Core<H> {
    /// A connection accepted on the TLS listener. Returns false when the worker already
    /// has `--tls-max-handshakes` in progress (the connection is then closed at once).
    pub(super) fn start_tls(&mut self, c: ConnId) -> bool {
        let Some(tls) = self.shared.tls.as_ref() else {
            return false;
        };
        if self.tls_handshaking >= self.shared.config.tls_max_handshakes {
            self.counters.tls_handshakes_refused += 1;
            return false;
        }
        let conn = match UnbufferedServerConnection::new(tls.config.clone()) {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(worker = self.id, error = %e, "TLS connection setup failed");
                return false;
            }
        };
        let i = c as usize;
        if self.tls.len() <= i {
            self.tls.resize_with(i + 1, || None);
        }
        self.tls[i] = Some(Box::new(TlsConn {
            session: Session::Shake(Box::new(conn)),
            traffic: None,
            incoming: Vec::new(),
            out: Vec::new(),
            sent: 0,
            covers: 0,
            extra: Vec::new(),
            handshaking: true,
            closed: false,
            first: true,
            kept: false,
            ktx: ktx::OFF,
            ulp: false,
            ctl_write: false,
            held: 0,
        }));
        self.tls_handshaking += 1;
        self.conns[i].flags |= flag::TLS;
        true
    }

    /// How many more TLS connections this worker may take now (`--tls-max-handshakes`
    /// less the handshakes in progress). A backend arms or makes TLS accepts only within
    /// it, so a connect storm waits in the listen queue instead of being refused.
    pub fn tls_accept_room(&self) -> usize {
        self.shared
            .config
            .tls_max_handshakes
            .saturating_sub(self.tls_handshaking)
    }

    /// A backend held back TLS accepts at the handshake limit (counted per pause).
    pub fn note_tls_accepts_deferred(&mut self) {
        self.counters.tls_accepts_deferred += 1;
    }

    /// The connection is being forgotten: return its buffers, drop its session.
    pub(super) fn drop_tls(&mut self, c: ConnId) {
        let Some(t) = self.tls.get_mut(c as usize).and_then(Option::take) else {
            return;
        };
        if t.handshaking {
            self.tls_handshaking -= 1;
        }
        self.tls_held -= t.held;
        let t = *t;
        self.tls_bufs.give(t.out);
        self.tls_bufs.give(t.extra);
    }

    pub(super) fn tls_handshaking(&self, c: ConnId) -> bool {
        self.tls
            .get(c as usize)
            .and_then(Option::as_ref)
            .is_some_and(|t| t.handshaking)
    }

    /// Put `t` back as connection `c`'s session, counting the buffers it now holds.
    fn put_tls(&mut self, c: ConnId, mut t: Box<TlsConn>) {
        let now = t.buffers();
        self.tls_held = self.tls_held + now - t.held;
        t.held = now;
        self.tls[c as usize] = Some(t);
    }

    fn count_tls_failure(&mut self, why: TlsFailure) {
        let n = &mut self.counters;
        match why {
            TlsFailure::PlainHttp => n.tls_plain_http += 1,
            TlsFailure::Protocol => n.tls_protocol_errors += 1,
            TlsFailure::Incompatible => n.tls_incompatible += 1,
            TlsFailure::UnknownName => n.tls_unknown_name += 1,
            TlsFailure::Decrypt => n.tls_decrypt_errors += 1,
            TlsFailure::Other => n.tls_other_errors += 1,
        }
    }

    /// Ciphertext arrived on TLS connection `c`. A large read (epoll reads up to 64 KiB)
    /// is processed a record's worth at a time, so what is held unprocessed stays under
    /// [`INCOMING_MAX`] whatever the read size.
    pub(super) fn tls_read(&mut self, c: ConnId, data: &[u8]) -> super::ReadOutcome {
        let mut outcome = super::ReadOutcome::Continue;
        for chunk in data.chunks(RECORD_MAX) {
            outcome = self.tls_read_some(c, chunk);
            if outcome == super::ReadOutcome::Stop {
                break;
            }
        }
        outcome
    }

    fn tls_read_some(&mut self, c: ConnId, data: &[u8]) -> super::ReadOutcome {
        use super::ReadOutcome;
        let Some(mut t) = self.tls.get_mut(c as usize).and_then(Option::take) else {
            return ReadOutcome::Stop;
        };
        if t.first && !data.is_empty() {
            t.first = false;
            if looks_like_http(data[0]) {
                self.count_tls_failure(TlsFailure::PlainHttp);
                t.extra.extend_from_slice(PLAIN_HTTP_ANSWER);
                t.closed = true;
                return self.tls_close_after_output(c, t);
            }
        }
        if t.incoming.len() + data.len() > INCOMING_MAX {
            self.count_tls_failure(TlsFailure::Protocol);
            self.put_tls(c, t);
            self.close(c);
            return ReadOutcome::Stop;
        }
        t.incoming.extend_from_slice(data);
        let mut plain: Vec<u8> = Vec::new();
        let mut peer_closed = false;
        let mut failure: Option<TlsFailure> = None;
        let TlsConn {
            session,
            incoming,
            extra,
            traffic,
            handshaking,
            ktx: kstate,
            ..
        } = &mut *t;
        match session {
            Session::Sealed(s) => match s.open(incoming, &mut plain, extra) {
                Ok((used, closed)) => {
                    incoming.drain(..used);
                    peer_closed = closed;
                    self.counters.tls_key_updates += u64::from(s.take_key_updates());
                    if s.kernel_changed() {
                        // Our KeyUpdate is queued: the kernel takes the new keys after it.
                        *kstate = ktx::DUE;
                    }
                }
                Err(f) => {
                    failure = Some(match f {
                        Fault::Decrypt => TlsFailure::Decrypt,
                        Fault::Protocol | Fault::AlertReceived => TlsFailure::Protocol,
                        Fault::Rekey => TlsFailure::Other,
                    });
                    tracing::debug!(worker = self.id, conn = c, fault = ?f, "TLS connection failed");
                }
            },
            Session::Shake(conn) => {
                let e = shake_read(
                    conn,
                    incoming,
                    extra,
                    traffic,
                    *handshaking,
                    &mut plain,
                    &mut peer_closed,
                );
                if let Some(e) = e {
                    failure = Some(classify(&e));
                    tracing::debug!(worker = self.id, conn = c, error = %e, "TLS connection failed");
                    // rustls queued the alert, if one is due: encode it behind what is
                    // queued.
                    for _ in 0..4 {
                        let UnbufferedStatus { state, .. } = conn.process_tls_records(incoming);
                        let Ok(ConnectionState::EncodeTlsData(mut enc)) = state else {
                            break;
                        };
                        if encode_into(extra, |b| enc.encode(b).map_err(encode_err)).is_err() {
                            break;
                        }
                    }
                }
            }
            Session::Spent => failure = Some(TlsFailure::Other),
        }
        if t.incoming.is_empty() {
            t.incoming = Vec::new();
        }
        let mut h2 = false;
        if let Session::Shake(conn) = &t.session {
            if t.handshaking && !conn.is_handshaking() {
                t.handshaking = false;
                self.tls_handshaking -= 1;
                self.counters.tls_handshakes += 1;
                h2 = conn.alpn_protocol() == Some(b"h2");
            }
        }
        if failure.is_none() && !t.handshaking && !self.seal_session(c, &mut t) {
            failure = Some(TlsFailure::Other);
        }
        if let Some(why) = failure {
            self.count_tls_failure(why);
            t.closed = true;
            return self.tls_close_after_output(c, t);
        }
        let has_extra = !t.extra.is_empty();
        self.put_tls(c, t);
        if has_extra {
            self.mark_ready(c);
        }
        if h2 {
            self.h2_start(c);
        }
        let mut outcome = ReadOutcome::Continue;
        if !plain.is_empty() {
            outcome = self.handle_plain(c, &plain);
        }
        if peer_closed {
            outcome = ReadOutcome::Stop;
            let answering = self
                .conns
                .get(c as usize)
                .is_some_and(|cn| cn.phase == Phase::Respond);
            if answering {
                // The answer goes first; its last write carries our close_notify.
                self.handle_eof(c);
            } else if let Some(mut t) = self.tls.get_mut(c as usize).and_then(Option::take) {
                // Answer the client's close_notify with ours, then close.
                let TlsConn { session, extra, .. } = &mut *t;
                close_notify(session, extra);
                t.closed = true;
                return self.tls_close_after_output(c, t);
            }
        }
        outcome
    }

    /// Send what is queued (an alert, the plain-HTTP answer, a close_notify), then close.
    fn tls_close_after_output(&mut self, c: ConnId, t: Box<TlsConn>) -> super::ReadOutcome {
        let has_extra = !t.extra.is_empty();
        self.put_tls(c, t);
        if let Some(conn) = self.conns.get_mut(c as usize) {
            conn.flags |= flag::TLS_CLOSE;
            // Nothing of the HTTP side goes out any more.
            conn.phase = if conn.phase == Phase::Closing {
                Phase::Closing
            } else {
                Phase::Respond
            };
        }
        if has_extra {
            self.mark_ready(c);
        } else {
            self.close(c);
        }
        super::ReadOutcome::Stop
    }

    /// Whether TLS connection `c` has ciphertext to write, or plaintext to encrypt.
    pub(super) fn tls_pending(&self, c: ConnId, plain_pending: bool) -> bool {
        let Some(t) = self.tls.get(c as usize).and_then(Option::as_ref) else {
            return false;
        };
        t.sent < t.out.len()
            || !t.extra.is_empty()
            || (plain_pending && !t.handshaking && !t.closed)
            // Keys to hand to the kernel: the install goes through the write path.
            || (t.ktx == ktx::DUE && !t.closed)
    }

    /// Before a write on TLS connection `c`: if the last ciphertext is all written, make
    /// the next: what was queued beyond it, then the pending frames encrypted.
    pub(super) fn tls_prepare(&mut self, c: ConnId) {
        let Some(mut t) = self.tls.get_mut(c as usize).and_then(Option::take) else {
            return;
        };
        if t.sent >= t.out.len() {
            let done = std::mem::take(&mut t.out);
            self.tls_bufs.give(done);
            t.sent = 0;
            t.covers = 0;
            let extra = std::mem::take(&mut t.extra);
            if !t.handshaking && !t.closed {
                self.gather_plain(c);
            }
            let plain_len = self.tls_bufs.plain.len();
            if extra.is_empty() {
                t.out = self
                    .tls_bufs
                    .take(plain_len + records(plain_len) * RECORD_OVERHEAD + 64);
            } else {
                t.out = extra;
            }
            if plain_len > 0 {
                let plain = std::mem::take(&mut self.tls_bufs.plain);
                if self.encrypt(&mut t, &plain) {
                    t.covers = plain.len();
                }
                self.tls_bufs.plain = plain;
                self.tls_bufs.plain.clear();
                // The connection ends with this write: say so in TLS too.
                if t.covers > 0 && self.ends_after(c, t.covers) {
                    let TlsConn { session, out, .. } = &mut *t;
                    close_notify(session, out);
                    t.closed = true;
                }
                if t.closed && t.covers == 0 {
                    // The session could seal nothing more (a TLS 1.2 session at its
                    // cipher's limit, whose close_notify is in `out`): close once out.
                    if let Some(conn) = self.conns.get_mut(c as usize) {
                        conn.flags |= flag::TLS_CLOSE;
                    }
                }
            }
        }
        self.put_tls(c, t);
    }

    /// Encrypt `plain` onto `t.out`. False (nothing added) if rustls refused, which ends
    /// the connection.
    fn encrypt(&mut self, t: &mut TlsConn, plain: &[u8]) -> bool {
        let TlsConn { session, out, .. } = t;
        match session {
            Session::Sealed(s) => {
                out.reserve(Sealed::sealed_len(plain.len()));
                if s.seal(plain, out) {
                    return true;
                }
                // At the cipher's limit: the session ended itself with a close_notify.
                t.closed = true;
                false
            }
            Session::Shake(conn) => {
                let ok = flush_output(conn, out)
                    && match conn.process_tls_records(&mut []).state {
                        Ok(ConnectionState::WriteTraffic(mut w)) => {
                            encode_into(out, |b| w.encrypt(plain, b).map_err(encrypt_err)).is_ok()
                        }
                        _ => false,
                    };
                if !ok {
                    self.counters.tls_other_errors += 1;
                }
                ok
            }
            Session::Spent => false,
        }
    }

    /// After the handshake: hand the session over to the record layer, once rustls has
    /// nothing left to send. False if the hand-over lost the session (the connection
    /// must close); a session that cannot be sealed stays with rustls.
    fn seal_session(&mut self, c: ConnId, t: &mut TlsConn) -> bool {
        let Session::Shake(conn) = &mut t.session else {
            return true;
        };
        if conn.is_handshaking() || !flush_output(conn, &mut t.extra) {
            return true;
        }
        let (Some(suite), Some(version)) =
            (conn.negotiated_cipher_suite(), conn.protocol_version())
        else {
            return true;
        };
        if version == rustls::ProtocolVersion::TLSv1_3 && t.traffic.is_none() {
            // Without its traffic secrets a TLS 1.3 session could not follow a key update.
            if !t.kept {
                t.kept = true;
                self.counters.tls_sessions_kept += 1;
            }
            return true;
        }
        let Session::Shake(conn) = std::mem::replace(&mut t.session, Session::Spent) else {
            return true;
        };
        let sealed = conn
            .dangerous_into_kernel_connection()
            .map_err(|e| e.to_string())
            .and_then(|(secrets, _kernel)| {
                Sealed::new(secrets, suite.suite(), version, t.traffic.take())
                    .map_err(|e| format!("{e:?}"))
            });
        t.traffic = None;
        match sealed {
            Ok(s) => {
                t.session = Session::Sealed(s);
                self.counters.tls_sessions_sealed += 1;
                if self.ktls_mode().is_some() {
                    t.ktx = ktx::DUE;
                    self.mark_ready(c);
                }
                true
            }
            Err(e) => {
                tracing::warn!(worker = self.id, conn = c, error = %e, "TLS session hand-over failed; closing the connection");
                false
            }
        }
    }

    /// Kernel TLS, if the probe found it: whether the kernel can rekey.
    fn ktls_mode(&self) -> Option<bool> {
        match self.shared.tls.as_ref()?.mode {
            KtlsMode::Kernel { rekey } => Some(rekey),
            KtlsMode::Userspace => None,
        }
    }

    /// Before a write on TLS connection `c`: true if it must wait for its keys to go to
    /// the kernel. Keys due are queued for the backend once nothing userspace sealed is
    /// left to write (the kernel continues the record sequence from there); the
    /// connection counts as writing until [`Core::ktls_installed`].
    pub(super) fn ktls_hold(&mut self, c: ConnId) -> bool {
        let in_kernel = self
            .conns
            .get(c as usize)
            .is_some_and(|cn| cn.has(flag::KTX));
        let Some(t) = self.tls.get_mut(c as usize).and_then(Option::as_mut) else {
            return false;
        };
        // First hand-over: everything userspace sealed is written. A rekey: our KeyUpdate
        // is written (what was queued after it must go under the new keys).
        let ready = if in_kernel {
            !queued_records(&t.extra).any(|typ| typ == record::CT_HANDSHAKE)
        } else {
            t.sent >= t.out.len() && t.extra.is_empty() && !t.closed
        };
        match t.ktx {
            ktx::BUSY => true,
            ktx::DUE if ready => {
                t.ktx = ktx::BUSY;
                self.ktls_installs.push(c);
                if let Some(conn) = self.conns.get_mut(c as usize) {
                    conn.flags |= flag::WRITING;
                }
                true
            }
            _ => false,
        }
    }

    /// Sending keys for the backend to install (`TLS_TX`), with whether the socket needs
    /// the `tls` ULP first. Each must be answered with [`Core::ktls_installed`].
    pub fn take_ktls_installs(&mut self, out: &mut Vec<(ConnId, KernelKeys, bool)>) {
        for c in std::mem::take(&mut self.ktls_installs) {
            let Some(t) = self.tls.get(c as usize).and_then(Option::as_ref) else {
                continue;
            };
            if let Session::Sealed(s) = &t.session {
                out.push((c, s.kernel_keys(), !t.ulp));
            }
        }
    }

    /// The backend installed (or failed to install) `c`'s sending keys in the kernel.
    /// A refused first hand-over leaves the session in userspace; a refused rekey ends
    /// the connection (the peer already expects the new keys).
    pub fn ktls_installed(&mut self, c: ConnId, ok: bool) {
        let rekey = self.ktls_mode().unwrap_or(false);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        conn.flags &= !flag::WRITING;
        let in_kernel = conn.has(flag::KTX);
        let Some(t) = self.tls.get_mut(c as usize).and_then(Option::as_mut) else {
            return;
        };
        if t.ktx != ktx::BUSY {
            return;
        }
        if ok {
            t.ktx = ktx::ON;
            t.ulp = true;
            if let Session::Sealed(s) = &mut t.session {
                if !s.in_kernel() {
                    s.to_kernel(rekey);
                }
                s.kernel_took_keys();
            }
            if in_kernel {
                self.counters.tls_kernel_rekeys += 1;
            } else {
                self.counters.tls_kernel_sessions += 1;
                self.conns[c as usize].flags |= flag::KTX;
            }
        } else {
            self.counters.tls_kernel_failures += 1;
            t.ktx = ktx::OFF;
            if in_kernel {
                tracing::warn!(
                    worker = self.id,
                    conn = c,
                    "the kernel refused new TLS sending keys; closing the connection"
                );
                return self.close(c);
            }
        }
        self.after_write(c);
    }

    /// Whether kernel-TLS connection `c` has a record of its own or data to send.
    pub(super) fn ktls_pending(&self, c: ConnId, plain_pending: bool) -> bool {
        let Some(t) = self.tls.get(c as usize).and_then(Option::as_ref) else {
            return false;
        };
        !t.extra.is_empty() || (plain_pending && !t.closed)
    }

    /// A write starts on kernel-TLS connection `c`: a record of herald's own if one is
    /// queued (it goes before any data), else its pending frames as they are.
    pub(super) fn ktls_begin(&mut self, c: ConnId) {
        if let Some(t) = self.tls.get_mut(c as usize).and_then(Option::as_mut) {
            t.ctl_write = !t.extra.is_empty();
        }
    }

    /// The record type the backend must send the current write of `c` as (a control
    /// message `TLS_SET_RECORD_TYPE`), when it is one of herald's own records.
    pub fn ktls_record_type(&self, c: ConnId) -> Option<u8> {
        let t = self.tls.get(c as usize)?.as_ref()?;
        (t.ctl_write && self.conns.get(c as usize)?.has(flag::KTX)).then(|| t.extra[0])
    }

    /// The plaintext of the record `c`'s current write carries (after `ktls_begin`).
    pub(super) fn ktls_record(&self, c: ConnId) -> &[u8] {
        match self.tls.get(c as usize).and_then(Option::as_ref) {
            Some(t) if t.ctl_write && t.extra.len() >= KERNEL_RECORD_HEADER => {
                let len = u16::from_be_bytes([t.extra[1], t.extra[2]]) as usize;
                &t.extra[KERNEL_RECORD_HEADER..KERNEL_RECORD_HEADER + len]
            }
            _ => &[],
        }
    }

    /// `n` bytes of kernel-TLS connection `c`'s write reached the socket. Returns the
    /// bytes of its frames written (to consume). Data written counts toward the cipher's
    /// record limit, which may queue a KeyUpdate (then new keys) or end the connection.
    pub(super) fn ktls_written(&mut self, c: ConnId, n: usize) -> usize {
        let Some(t) = self.tls.get_mut(c as usize).and_then(Option::as_mut) else {
            return 0;
        };
        if t.ctl_write {
            let len = u16::from_be_bytes([t.extra[1], t.extra[2]]) as usize;
            let n = n.min(len);
            if n == len {
                t.extra.drain(..KERNEL_RECORD_HEADER + len);
                if t.extra.is_empty() {
                    t.extra = Vec::new();
                }
            } else {
                // The rest goes as another record of the same type.
                t.extra
                    .drain(KERNEL_RECORD_HEADER..KERNEL_RECORD_HEADER + n);
                let left = ((len - n) as u16).to_be_bytes();
                t.extra[1..3].copy_from_slice(&left);
            }
            return 0;
        }
        if n == 0 {
            return 0;
        }
        let Session::Sealed(s) = &mut t.session else {
            return n;
        };
        let records = n.div_ceil(record::MAX_FRAGMENT) as u64;
        if !s.kernel_sent(records, &mut t.extra) {
            // At the record limit on a kernel that cannot rekey: close_notify, then close.
            t.closed = true;
            if let Some(conn) = self.conns.get_mut(c as usize) {
                conn.flags |= flag::TLS_CLOSE;
            }
        }
        if s.kernel_changed() {
            t.ktx = ktx::DUE;
        }
        n
    }

    /// Kernel-TLS connection `c` is done and about to close: queue its close_notify
    /// first (the kernel seals it). True if it was queued (the close follows its write).
    pub(super) fn ktls_close_notify_first(&mut self, c: ConnId) -> bool {
        let Some(t) = self.tls.get_mut(c as usize).and_then(Option::as_mut) else {
            return false;
        };
        if t.closed {
            return false;
        }
        let TlsConn { session, extra, .. } = &mut **t;
        close_notify(session, extra);
        t.closed = true;
        let queued = !t.extra.is_empty();
        if let Some(conn) = self.conns.get_mut(c as usize) {
            conn.flags |= flag::TLS_CLOSE;
        }
        if queued {
            self.mark_ready(c);
        }
        queued
    }

    /// Whether the connection closes once `covered` bytes of its pending frames are out:
    /// a last response, or a drain trailer, with nothing after it.
    fn ends_after(&self, c: ConnId, covered: usize) -> bool {
        let Some(conn) = self.conns.get(c as usize) else {
            return false;
        };
        let last = match conn.phase {
            Phase::Respond => {
                !conn.has(flag::KEEP_ALIVE)
                    || (conn.has(flag::PEER_EOF)
                        && conn.rbuf.as_ref().is_none_or(|rb| rb.buf.is_empty()))
            }
            Phase::Drain => conn.has(flag::FINAL),
            _ => false,
        };
        last && covered >= self.pending_len(c)
    }

    /// Bytes pending in `c`'s frames (after what is already written), up to the cap.
    fn pending_len(&self, c: ConnId) -> usize {
        let mut total = 0usize;
        self.walk_pending(c, |s| {
            total += s.len();
            total <= TLS_WRITE_MAX
        });
        total
    }

    /// Copy `c`'s pending frames, in write order, into the worker's plaintext buffer, up
    /// to [`TLS_WRITE_MAX`].
    fn gather_plain(&mut self, c: ConnId) {
        let mut plain = std::mem::take(&mut self.tls_bufs.plain);
        plain.clear();
        self.walk_pending(c, |s| {
            let room = TLS_WRITE_MAX - plain.len();
            plain.extend_from_slice(&s[..s.len().min(room)]);
            plain.len() < TLS_WRITE_MAX
        });
        self.tls_bufs.plain = plain;
    }

    /// The ciphertext to write for TLS connection `c` (after [`Core::tls_prepare`]).
    pub(super) fn tls_out(&self, c: ConnId) -> &[u8] {
        match self.tls.get(c as usize).and_then(Option::as_ref) {
            Some(t) => &t.out[t.sent.min(t.out.len())..],
            None => &[],
        }
    }

    /// `n` bytes of TLS connection `c`'s ciphertext were written. Returns the plaintext
    /// bytes of its frames now fully sent (to consume), if the buffer is done.
    pub(super) fn tls_written(&mut self, c: ConnId, n: usize) -> usize {
        let Some(t) = self.tls.get_mut(c as usize).and_then(Option::as_mut) else {
            return 0;
        };
        t.sent += n;
        if t.sent < t.out.len() {
            return 0;
        }
        let covers = std::mem::take(&mut t.covers);
        let done = std::mem::take(&mut t.out);
        t.sent = 0;
        let now = t.buffers();
        self.tls_held = self.tls_held + now - t.held;
        t.held = now;
        self.tls_bufs.give(done);
        covers
    }
}

/// Drive rustls over what `incoming` holds: handshake messages answered onto `extra`,
/// application data appended to `plain`. The traffic secrets rustls derives meanwhile are
/// kept in `traffic`. Returns the error that ended the connection, if one did.
fn shake_read(
    conn: &mut UnbufferedServerConnection,
    incoming: &mut Vec<u8>,
    extra: &mut Vec<u8>,
    traffic: &mut Option<Box<record::Traffic>>,
    handshaking: bool,
    plain: &mut Vec<u8>,
    peer_closed: &mut bool,
) -> Option<rustls::Error> {
    for _ in 0..1024 {
        if handshaking {
            record::clear_captured();
        }
        let UnbufferedStatus { discard, state } = conn.process_tls_records(incoming);
        if handshaking {
            if let Some(seen) = record::take_captured() {
                *traffic = Some(seen);
            }
        }
        let mut stop = false;
        let mut failure = None;
        match state {
            Err(e) => {
                failure = Some(e);
                stop = true;
            }
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                while let Some(rec) = r.next_record() {
                    match rec {
                        Ok(rec) => plain.extend_from_slice(rec.payload),
                        Err(e) => {
                            failure = Some(e);
                            stop = true;
                            break;
                        }
                    }
                }
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                if extra.len() > EXTRA_MAX
                    || encode_into(extra, |b| enc.encode(b).map_err(encode_err)).is_err()
                {
                    failure = Some(rustls::Error::General("TLS output too large".into()));
                    stop = true;
                }
            }
            Ok(ConnectionState::TransmitTlsData(tx)) => tx.done(),
            Ok(ConnectionState::PeerClosed) => *peer_closed = true,
            // WriteTraffic (nothing more to do), BlockedHandshake, Closed, early data
            // (never enabled), and states added by later rustls versions: wait for more
            // input.
            Ok(_) => stop = true,
        }
        incoming.drain(..discard);
        if failure.is_some() {
            return failure;
        }
        if stop {
            break;
        }
    }
    None
}

/// Queue a close_notify for the peer onto `out`.
fn close_notify(session: &mut Session, out: &mut Vec<u8>) {
    match session {
        Session::Sealed(s) => s.alert(record::CLOSE_NOTIFY, out),
        Session::Shake(conn) => {
            if flush_output(conn, out) {
                if let Ok(ConnectionState::WriteTraffic(mut w)) =
                    conn.process_tls_records(&mut []).state
                {
                    let _ = encode_into(out, |b| w.queue_close_notify(b).map_err(encrypt_err));
                }
            }
        }
        Session::Spent => {}
    }
}

/// Encode whatever rustls has queued (a key update, tickets) onto `out`, until it is ready
/// for application data. False if it never gets there.
fn flush_output(conn: &mut UnbufferedServerConnection, out: &mut Vec<u8>) -> bool {
    for _ in 0..16 {
        match conn.process_tls_records(&mut []).state {
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                if encode_into(out, |b| enc.encode(b).map_err(encode_err)).is_err() {
                    return false;
                }
            }
            Ok(ConnectionState::TransmitTlsData(tx)) => tx.done(),
            Ok(ConnectionState::WriteTraffic(_)) => return true,
            _ => return false,
        }
    }
    false
}

/// The types of the records queued for the kernel in `extra` (`[type, len, body]`).
fn queued_records(mut q: &[u8]) -> impl Iterator<Item = u8> + '_ {
    std::iter::from_fn(move || {
        if q.len() < KERNEL_RECORD_HEADER {
            return None;
        }
        let typ = q[0];
        let len = u16::from_be_bytes([q[1], q[2]]) as usize;
        q = &q[(KERNEL_RECORD_HEADER + len).min(q.len())..];
        Some(typ)
    })
}

fn records(n: usize) -> usize {
    n.div_ceil(RECORD_MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_record_never_starts_with_an_http_method_letter() {
        for b in 0x14u8..=0x18 {
            assert!(!looks_like_http(b));
        }
        for m in ["GET", "POST", "HEAD", "OPTIONS", "PUT", "PRI"] {
            assert!(looks_like_http(m.as_bytes()[0]));
        }
    }

    #[test]
    fn the_pool_keeps_small_and_large_buffers_apart_and_bounded() {
        let mut p = TlsBufs::default();
        let b = p.take(100);
        assert!(b.capacity() >= 100);
        p.give(b);
        assert_eq!(p.small.len(), 1);
        let b = p.take(TLS_WRITE_MAX);
        p.give(b);
        assert_eq!(p.large.len(), 1);
        // A buffer grown past the largest write is not kept.
        p.give(Vec::with_capacity(4 * TLS_WRITE_MAX));
        assert_eq!(p.large.len(), 1);
        for _ in 0..2 * POOL_MAX {
            p.give(Vec::with_capacity(16));
        }
        assert_eq!(p.small.len(), POOL_MAX);
    }
}
