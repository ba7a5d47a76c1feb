//! `--handshakes N`: the TLS handshake rate. `--handshake-concurrency` threads of the
//! parent each open connections one after another (blocking sockets, source addresses
//! spread as for subscribers), complete a handshake (a full one: no resumption unless
//! `--tls-resume`), send `GET --handshake-path` with `Connection: close`, read the
//! response and the server's close, and count how it closed. The server's CPU over the
//! whole run is divided by the connections that completed. An http:// --url runs the
//! same exchange without TLS, as the baseline.

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
use super::report::{HandshakeReport, Percentiles, Report};
use super::tls::{self, Session, SessionTally, TlsClient};
use super::{Opt, Target};
use crate::procfs::{
    clk_tck, cpu_busy_ticks, io_error_name, mono_ns, Machine, ProcCpu, SysCounters,
};

/// Per-socket I/O deadline: a stalled server shows up as a `WouldBlock`/timeout failure.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One thread's tally, merged at the end.
struct Tally {
    tcp: Histogram<u64>,
    hs: Histogram<u64>,
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
        return plain(tcp, req, t0, t_tcp);
    };
    let mut tc = client.connect().map_err(|e| tls::error_name(&e))?;
    while tc.is_handshaking() {
        tc.complete_io(&mut tcp).map_err(|e| tls_io_name(&e))?;
    }
    let t_hs = mono_ns();
    let session = Session::of(&tc);
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
        total_ns: t_end - t0,
        status,
        session: None,
        closed: Closed::Plain,
    })
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
    let n = opt.handshakes;
    let threads = opt.handshake_concurrency.clamp(1, 1024).min(n as usize);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        opt.handshake_path, target.host
    )
    .into_bytes();
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
                    match one(i as usize, opt, target, client, &req) {
                        Ok(d) => {
                            t.ok += 1;
                            t.tcp.saturating_record(d.tcp_ns.max(1));
                            t.hs.saturating_record(d.hs_ns.max(1));
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
        server_cores_busy_us_per_handshake: (!opt.server_cpus.is_empty())
            .then(|| ((busy1 - busy0) * (1_000_000_000 / clk_tck())) as f64 / 1e3 / ok),
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
            "{} retransmits / {} listen drops (handshake times include them)",
            net.retrans_measured_phase, net.listen_drops_measured_phase
        ));
    }
    rep.valid = rep.invalid_reasons.is_empty();
    rep.handshakes = Some(h);
    print!("{}", rep.table());
    if let Some(path) = &opt.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rep)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::complete_response;

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
