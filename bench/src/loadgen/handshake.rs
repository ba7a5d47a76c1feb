//! `--handshakes N`: the TLS handshake rate. `--handshake-concurrency` threads of the
//! parent each open connections one after another (blocking sockets, source addresses
//! spread as for subscribers), complete a handshake (a full one: no resumption unless
//! `--tls-resume`), send `GET --handshake-path` with `Connection: close`, read the
//! response and the server's close, and count how it closed. The server's CPU over the
//! whole run is divided by the connections that completed. An http:// --url runs the
//! same exchange without TLS, as the baseline.
//!
//! `--starts N` runs the same loop as stream starts: the subscribe request of the
//! --url topic (with --bearer/--cookie), the response head read (a 200 counts, any
//! other status is a failure named `http_<status>`), then a half-close (TLS: with
//! close_notify) and a read to the server's close, so the server's whole work for a
//! stream (accept, request, authentication, head, registration, end, close) falls
//! inside the measured window.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use memchr::memmem;

use super::child::new_socket;
use super::proto::new_hist;
use super::report::{HandshakeReport, Percentiles, Report, StartReport};
use super::tls::{self, Session, SessionTally, TlsClient};
use super::{subscribe_request, Opt, Target};
use crate::procfs::{
    clk_tck, cpu_busy_ticks, io_error_name, mono_ns, Machine, ProcCpu, SysCounters,
};

/// Per-socket I/O deadline: a stalled server shows up as a `WouldBlock`/timeout failure.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One thread's tally, merged at the end.
struct Tally {
    tcp: Histogram<u64>,
    hs: Histogram<u64>,
    head: Histogram<u64>,
    total: Histogram<u64>,
    ok: u64,
    failed: BTreeMap<String, u64>,
    statuses: BTreeMap<String, u64>,
    sessions: SessionTally,
    close_notify: u64,
    unclean: u64,
    first_ns: u64,
    last_ns: u64,
    /// CPU time of the threads, ns.
    cpu_ns: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            tcp: new_hist(),
            hs: new_hist(),
            head: new_hist(),
            total: new_hist(),
            ok: 0,
            failed: BTreeMap::new(),
            statuses: BTreeMap::new(),
            sessions: SessionTally::default(),
            close_notify: 0,
            unclean: 0,
            first_ns: u64::MAX,
            last_ns: 0,
            cpu_ns: 0,
        }
    }
}

/// How the server ended the connection after its response.
enum Closed {
    Notify,
    Unclean,
    /// Plain TCP: the FIN.
    Plain,
}

struct Done {
    tcp_ns: u64,
    hs_ns: u64,
    /// connect start → response head (stream-start mode; else = total_ns).
    head_ns: u64,
    total_ns: u64,
    status: u16,
    session: Option<Session>,
    closed: Closed,
}

fn one(
    i: usize,
    opt: &Opt,
    target: &Target,
    client: Option<&TlsClient>,
    req: &[u8],
    start: bool,
) -> Result<Done, String> {
    let t0 = mono_ns();
    let sources = if target.addr.ip().is_loopback() {
        usize::from(opt.sources)
    } else {
        0
    };
    let sock = new_socket(i, sources, opt.rcvbuf, false).map_err(|e| io_error_name(&e))?;
    sock.connect_timeout(&target.addr.into(), IO_TIMEOUT)
        .map_err(|e| io_error_name(&e))?;
    let mut tcp = TcpStream::from(sock);
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(IO_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(IO_TIMEOUT));
    let t_tcp = mono_ns();
    let Some(client) = client else {
        if start {
            return stream_start(&mut tcp, None, req, t0, t_tcp, t_tcp);
        }
        return plain(tcp, req, t0, t_tcp);
    };
    let mut tc = client.connect().map_err(|e| tls::error_name(&e))?;
    while tc.is_handshaking() {
        tc.complete_io(&mut tcp).map_err(|e| tls_io_name(&e))?;
    }
    let t_hs = mono_ns();
    let session = Session::of(&tc);
    if start {
        return stream_start(&mut tcp, Some(&mut tc), req, t0, t_tcp, t_hs).map(|mut d| {
            d.session = Some(session);
            d
        });
    }
    let mut s = rustls::Stream::new(&mut tc, &mut tcp);
    s.write_all(req).map_err(|e| tls_io_name(&e))?;
    // Read to the end: Connection: close, so the server closes after its response.
    let mut resp = Vec::with_capacity(1024);
    let mut tmp = [0u8; 4096];
    let closed = loop {
        match s.read(&mut tmp) {
            Ok(0) => break Closed::Notify,
            Ok(n) => resp.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Closed::Unclean,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // A reset after a complete response is the close, not a failure.
                if complete_response(&resp).is_some()
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    )
                {
                    break Closed::Unclean;
                }
                return Err(tls_io_name(&e));
            }
        }
        if resp.len() > 1 << 20 {
            return Err("response_too_large".into());
        }
    };
    let t_end = mono_ns();
    let status = complete_response(&resp).ok_or_else(|| {
        if resp.is_empty() {
            "no_response".to_string()
        } else {
            "truncated_response".to_string()
        }
    })?;
    // No close_notify back: the server has closed its socket already, and an alert
    // arriving there would only be answered with a reset.
    Ok(Done {
        tcp_ns: t_tcp - t0,
        hs_ns: t_hs - t0,
        head_ns: t_end - t0,
        total_ns: t_end - t0,
        status,
        session: Some(session),
        closed,
    })
}

/// The same exchange without TLS (an http:// --url): the baseline a TLS run is
/// compared with (what the server spends on a connection and a request alone).
fn plain(mut tcp: TcpStream, req: &[u8], t0: u64, t_tcp: u64) -> Result<Done, String> {
    tcp.write_all(req).map_err(|e| io_error_name(&e))?;
    let mut resp = Vec::with_capacity(1024);
    let mut tmp = [0u8; 4096];
    loop {
        match tcp.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A reset after a complete response is the close.
            Err(_) if complete_response(&resp).is_some() => break,
            Err(e) => return Err(io_error_name(&e)),
        }
        if resp.len() > 1 << 20 {
            return Err("response_too_large".into());
        }
    }
    let t_end = mono_ns();
    let status = complete_response(&resp).ok_or("truncated_response")?;
    Ok(Done {
        tcp_ns: t_tcp - t0,
        hs_ns: t_tcp - t0,
        head_ns: t_end - t0,
        total_ns: t_end - t0,
        status,
        session: None,
        closed: Closed::Plain,
    })
}

/// A stream start on a connected socket (`tc`: the TLS session, handshake done): send
/// the subscribe request, read up to the end of the response head, half-close (TLS:
/// close_notify first) and read whatever follows until the server closes.
fn stream_start(
    tcp: &mut TcpStream,
    mut tc: Option<&mut rustls::ClientConnection>,
    req: &[u8],
    t0: u64,
    t_tcp: u64,
    t_hs: u64,
) -> Result<Done, String> {
    let mut resp = Vec::with_capacity(1024);
    let mut tmp = [0u8; 4096];
    let status = {
        let mut io: Box<dyn ReadWrite + '_> = match tc.as_deref_mut() {
            Some(tc) => Box::new(rustls::Stream::new(tc, &mut *tcp)),
            None => Box::new(&mut *tcp),
        };
        io.write_all(req).map_err(|e| tls_io_name(&e))?;
        loop {
            if let Some(st) = head_status(&resp) {
                break st;
            }
            match io.read(&mut tmp) {
                Ok(0) => {
                    return Err(if resp.is_empty() {
                        "no_response".into()
                    } else {
                        "truncated_response".into()
                    })
                }
                Ok(n) => resp.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(tls_io_name(&e)),
            }
            if resp.len() > 64 << 10 {
                return Err("response_head_too_large".into());
            }
        }
    };
    let t_head = mono_ns();
    if let Some(tc) = tc {
        tc.send_close_notify();
        while tc.wants_write() {
            if tc.write_tls(tcp).is_err() {
                break;
            }
        }
    }
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    // To the server's close; a reset (unread data at its end) is a close too.
    loop {
        match tcp.read(&mut tmp) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                break
            }
            Err(e) => return Err(format!("close_{}", io_error_name(&e))),
        }
    }
    let t_end = mono_ns();
    Ok(Done {
        tcp_ns: t_tcp - t0,
        hs_ns: t_hs - t0,
        head_ns: t_head - t0,
        total_ns: t_end - t0,
        status,
        session: None,
        closed: Closed::Plain,
    })
}

/// Read + Write, for one code path over a plain or a TLS stream.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The status of a response whose head is complete in `b`, or None.
fn head_status(b: &[u8]) -> Option<u16> {
    let end = memmem::find(b, b"\r\n\r\n")?;
    std::str::from_utf8(b.get(9..12.min(end))?)
        .ok()?
        .parse()
        .ok()
}

/// The status of a complete response in `b` (head, and a body as long as its
/// Content-Length, if it has one), or None.
fn complete_response(b: &[u8]) -> Option<u16> {
    let end = memmem::find(b, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&b[..end]).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (b.len() >= end + len).then_some(status)
}

/// CPU time of the calling thread, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// rustls reports TLS errors from `complete_io`/`Stream` as InvalidData wrapping a
/// `rustls::Error`: name that, else the errno.
fn tls_io_name(e: &io::Error) -> String {
    if let Some(inner) = e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>()) {
        return tls::error_name(inner);
    }
    io_error_name(e)
}

/// `client` is None for an http:// --url: connections and requests without TLS.
pub fn run(opt: &Opt, target: &Target, client: Option<&TlsClient>) -> Result<()> {
    let pids = opt.server_pid.clone();
    for &p in &pids {
        ProcCpu::read(p).with_context(|| format!("--server-pid {p}: no such process"))?;
    }
    let start_mode = opt.starts > 0;
    let n = if start_mode {
        opt.starts
    } else {
        opt.handshakes
    };
    let threads = opt.handshake_concurrency.clamp(1, 1024).min(n as usize);
    let req = if start_mode {
        subscribe_request(target, &target.base_topic, &opt.auth_headers()?)
    } else {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            opt.handshake_path, target.host
        )
        .into_bytes()
    };
    let mut rep = Report {
        tool: "herald-bench",
        label: opt.label.clone(),
        unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: Machine::read(),
        server_pids: pids.clone(),
        options: serde_json::to_value(opt)?,
        ..Report::default()
    };
    let sys0 = SysCounters::read();
    let busy0 = cpu_busy_ticks(&opt.server_cpus);
    let srv0 = ProcCpu::read_all(&pids);
    let next = AtomicU64::new(0);
    let merged = Mutex::new(Tally::new());
    thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| {
                let mut t = Tally::new();
                let cpu0 = thread_cpu_ns();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let start = mono_ns();
                    t.first_ns = t.first_ns.min(start);
                    match one(i as usize, opt, target, client, &req, start_mode) {
                        Ok(d) if start_mode && d.status != 200 => {
                            *t.statuses.entry(d.status.to_string()).or_default() += 1;
                            *t.failed.entry(format!("http_{}", d.status)).or_default() += 1;
                        }
                        Ok(d) => {
                            t.ok += 1;
                            t.tcp.saturating_record(d.tcp_ns.max(1));
                            t.hs.saturating_record(d.hs_ns.max(1));
                            t.head.saturating_record(d.head_ns.max(1));
                            t.total.saturating_record(d.total_ns.max(1));
                            *t.statuses.entry(d.status.to_string()).or_default() += 1;
                            if let Some(s) = d.session {
                                t.sessions.add(s);
                            }
                            match d.closed {
                                Closed::Notify => t.close_notify += 1,
                                Closed::Unclean => t.unclean += 1,
                                Closed::Plain => {}
                            }
                        }
                        Err(cause) => *t.failed.entry(cause).or_default() += 1,
                    }
                    t.last_ns = mono_ns();
                }
                let mut m = merged.lock().unwrap_or_else(|e| e.into_inner());
                let _ = m.tcp.add(&t.tcp);
                let _ = m.hs.add(&t.hs);
                let _ = m.head.add(&t.head);
                let _ = m.total.add(&t.total);
                m.ok += t.ok;
                for (k, v) in t.failed {
                    *m.failed.entry(k).or_default() += v;
                }
                for (k, v) in t.statuses {
                    *m.statuses.entry(k).or_default() += v;
                }
                m.sessions.merge(&t.sessions);
                m.close_notify += t.close_notify;
                m.unclean += t.unclean;
                m.first_ns = m.first_ns.min(t.first_ns);
                m.last_ns = m.last_ns.max(t.last_ns);
                // The thread's own CPU: schedstat of the process misses exited threads.
                m.cpu_ns += thread_cpu_ns() - cpu0;
            });
        }
    });
    let srv1 = ProcCpu::read_all(&pids);
    let busy1 = cpu_busy_ticks(&opt.server_cpus);
    let sys1 = SysCounters::read();
    let m = merged.into_inner().unwrap_or_else(|e| e.into_inner());
    let seconds = m.last_ns.saturating_sub(m.first_ns) as f64 / 1e9;
    let ok = m.ok.max(1) as f64;
    let sched = srv1.delta_ns(&srv0).0;
    let busy_us = (!opt.server_cpus.is_empty())
        .then(|| ((busy1 - busy0) * (1_000_000_000 / clk_tck())) as f64 / 1e3 / ok);
    if start_mode {
        let st = StartReport {
            requested: n,
            concurrency: threads,
            path: format!("{}{}", target.prefix, target.base_topic),
            tls: client.is_some(),
            bearer: opt.bearer.is_some() || opt.bearer_file.is_some(),
            cookie: opt.cookie.is_some(),
            ok: m.ok,
            failed: m.failed,
            statuses: m.statuses,
            tls_sessions: m.sessions.to_map(),
            seconds,
            per_second: m.ok as f64 / seconds.max(1e-9),
            tcp_connect_us: Percentiles::us(&m.tcp),
            handshake_us: Percentiles::us(&m.hs),
            head_us: Percentiles::us(&m.head),
            closed_us: Percentiles::us(&m.total),
            server_cpu_ms: sched as f64 / 1e6,
            server_cpu_us_per_start: sched as f64 / 1e3 / ok,
            server_starts_per_cpu_second: if sched > 0 {
                ok * 1e9 / sched as f64
            } else {
                0.0
            },
            server_cores_busy_us_per_start: busy_us,
            loadgen_cpu_us_per_start: m.cpu_ns as f64 / 1e3 / ok,
        };
        if st.ok < n {
            rep.warnings.push(format!(
                "only {} of {n} stream starts got a 200 head: {:?}",
                st.ok, st.failed
            ));
        }
        if !pids.is_empty() && st.loadgen_cpu_us_per_start > st.server_cpu_us_per_start {
            rep.warnings.push(
                "load generator used more CPU per start than the server: starts/s is the load generator's limit when its core is full; see starts per server CPU-second".into(),
            );
        }
        rep.starts = Some(st);
        return finish(opt, rep, sys0, sys1);
    }
    let h = HandshakeReport {
        requested: n,
        concurrency: threads,
        path: opt.handshake_path.clone(),
        ok: m.ok,
        failed: m.failed,
        statuses: m.statuses,
        tls_sessions: m.sessions.to_map(),
        server_close_notify: m.close_notify,
        server_close_unclean: m.unclean,
        seconds,
        per_second: m.ok as f64 / seconds.max(1e-9),
        tcp_connect_us: Percentiles::us(&m.tcp),
        handshake_us: Percentiles::us(&m.hs),
        total_us: Percentiles::us(&m.total),
        server_cpu_ms: sched as f64 / 1e6,
        server_cpu_us_per_handshake: sched as f64 / 1e3 / ok,
        server_handshakes_per_cpu_second: if sched > 0 {
            ok * 1e9 / sched as f64
        } else {
            0.0
        },
        server_cores_busy_us_per_handshake: busy_us,
        loadgen_cpu_us_per_handshake: m.cpu_ns as f64 / 1e3 / ok,
    };
    if h.ok < n {
        rep.warnings
            .push(format!("only {} of {n} handshakes completed", h.ok));
    }
    if !pids.is_empty() && h.loadgen_cpu_us_per_handshake > h.server_cpu_us_per_handshake {
        rep.warnings.push(
            "load generator used more CPU per handshake than the server: handshakes/s is the load generator's limit when its core is full; see handshakes per server CPU-second".into(),
        );
    }
    if h.server_close_unclean > 0 {
        rep.warnings.push(format!(
            "{} connection(s) closed by the server without close_notify",
            h.server_close_unclean
        ));
    }
    rep.handshakes = Some(h);
    finish(opt, rep, sys0, sys1)
}

/// Network counters, validity, the table and --json: the end of either mode.
fn finish(opt: &Opt, mut rep: Report, sys0: SysCounters, sys1: SysCounters) -> Result<()> {
    let net = &mut rep.network;
    net.softnet_drops = sys1.softnet_drops - sys0.softnet_drops;
    net.retrans_measured_phase = sys1.retrans_segs - sys0.retrans_segs;
    net.listen_drops_measured_phase = sys1.listen_drops - sys0.listen_drops;
    net.before = sys0;
    net.after = sys1;
    if net.softnet_drops > 0 {
        rep.invalid_reasons
            .push(format!("{} softnet drops", net.softnet_drops));
    }
    if net.retrans_measured_phase + net.listen_drops_measured_phase > 0 {
        rep.warnings.push(format!(
            "{} retransmits / {} listen drops (connection times include them)",
            net.retrans_measured_phase, net.listen_drops_measured_phase
        ));
    }
    rep.valid = rep.invalid_reasons.is_empty();
    print!("{}", rep.table());
    if let Some(path) = &opt.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rep)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{complete_response, head_status};

    #[test]
    fn head_status_needs_the_blank_line() {
        assert_eq!(
            head_status(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"),
            None
        );
        assert_eq!(
            head_status(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n5\r\n"),
            Some(200)
        );
        assert_eq!(
            head_status(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n\r\n"),
            Some(401)
        );
        assert_eq!(head_status(b"HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn response_is_complete_with_its_body() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(complete_response(head), None);
        let mut all = head.to_vec();
        all.extend_from_slice(b"ok\n");
        assert_eq!(complete_response(&all), Some(200));
        assert_eq!(
            complete_response(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n"),
            Some(404)
        );
        assert_eq!(complete_response(b"HTTP/1.1 200 OK\r\n"), None);
    }
}
