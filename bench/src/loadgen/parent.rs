//! The parent: spawns the children (re-exec with `--child`), drives the phases (connect,
//! settle, idle memory, hold, publish, drain, report), samples /proc around each phase
//! and merges the children's reports into one `Report`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use super::proto::{merge, new_hist, ChildMsg, ChildReport, ChildStatus};
use super::publish::Publisher;
use super::report::*;
use super::tls::TlsClient;
use super::{Opt, PublishVia, Target};
use crate::procfs::{
    self, clk_tck, cpu_busy_ticks, mono_ns, threads, vm_rss_kib, Machine, ProcCpu, SysCounters,
};

/// Children, their stdin pipes and what they have told us so far.
struct Fleet {
    procs: Vec<Child>,
    stdin: Vec<ChildStdin>,
    rx: Receiver<(usize, ChildMsg)>,
    /// Per child: (subscribers streaming, failed, connections with one streaming).
    connected: Vec<Option<(u64, u64, u64)>>,
    armed: Vec<bool>,
    done: Vec<bool>,
    exited: Vec<bool>,
    status: Vec<Option<ChildStatus>>,
    reports: Vec<Option<ChildReport>>,
}

impl Fleet {
    fn spawn(opt: &Opt) -> Result<Fleet> {
        let n = opt.subscribers;
        let per = opt.per_child.clamp(1, 19_000);
        let count = n.div_ceil(per).max(1);
        let exe = std::env::current_exe()?;
        let (tx, rx) = channel();
        let mut fleet = Fleet {
            procs: Vec::new(),
            stdin: Vec::new(),
            rx,
            connected: vec![None; count],
            armed: vec![false; count],
            done: vec![false; count],
            exited: vec![false; count],
            status: vec![None; count],
            reports: (0..count).map(|_| None).collect(),
        };
        for i in 0..count {
            let first = i * per;
            let mine = per.min(n - first.min(n));
            let mut cmd = Command::new(&exe);
            cmd.args([
                "--child",
                "--child-first",
                &first.to_string(),
                "--child-count",
                &mine.to_string(),
            ])
            .args([
                "--url",
                &opt.url,
                "-n",
                &n.to_string(),
                "--per-child",
                &per.to_string(),
            ])
            .args([
                "--topics",
                &opt.topics.to_string(),
                "--sources",
                &opt.sources.to_string(),
            ])
            .args(["--connect-rate", &opt.connect_rate.to_string()])
            .args([
                "--max-inflight",
                &opt.max_inflight.to_string(),
                "--rcvbuf",
                &opt.rcvbuf.to_string(),
            ])
            .args(["--tls-inflight", &opt.tls_inflight.to_string()]);
            if let Some(ca) = &opt.cacert {
                cmd.arg("--cacert").arg(ca);
            }
            if let Some(name) = &opt.tls_server_name {
                cmd.args(["--tls-server-name", name]);
            }
            if let Some(v) = opt.tls_version.to_possible_value() {
                cmd.args(["--tls-version", v.get_name()]);
            }
            if opt.tls_resume {
                cmd.arg("--tls-resume");
            }
            if let Some(v) = opt.tls_suite.to_possible_value() {
                cmd.args(["--tls-suite", v.get_name()]);
            }
            if opt.tls_verify_every {
                cmd.arg("--tls-verify-every");
            }
            if opt.h2 {
                cmd.args([
                    "--h2",
                    "--streams-per-conn",
                    &opt.streams_per_conn.to_string(),
                ]);
            }
            if let Some(t) = &opt.bearer {
                cmd.args(["--bearer", t]);
            }
            if let Some(p) = &opt.bearer_file {
                cmd.arg("--bearer-file").arg(p);
            }
            if let Some(c) = &opt.cookie {
                cmd.args(["--cookie", c]);
            }
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd.spawn().context("spawning a child load generator")?;
            fleet.stdin.push(child.stdin.take().context("child stdin")?);
            let out = child.stdout.take().context("child stdout")?;
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<ChildMsg>(&line) {
                        Ok(m) => {
                            if tx.send((i, m)).is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("child {i}: bad message ({e}): {:.200}", line),
                    }
                }
                let _ = tx.send((i, ChildMsg::Exited));
            });
            fleet.procs.push(child);
        }
        Ok(fleet)
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Child::id).collect()
    }

    fn tell(&mut self, cmd: &str) {
        for (i, s) in self.stdin.iter_mut().enumerate() {
            if !self.exited[i] {
                let _ = writeln!(s, "{cmd}");
                let _ = s.flush();
            }
        }
    }

    /// Process messages until `cond` holds or `deadline` passes; returns whether it held.
    fn wait(&mut self, deadline: Instant, cond: impl Fn(&Fleet) -> bool) -> bool {
        loop {
            if cond(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.rx.recv_timeout(left) {
                Ok((i, m)) => self.handle(i, m),
                Err(RecvTimeoutError::Timeout) => return cond(self),
                Err(RecvTimeoutError::Disconnected) => return cond(self),
            }
        }
    }

    fn handle(&mut self, i: usize, m: ChildMsg) {
        match m {
            ChildMsg::Connected { ok, failed, conns } => {
                self.connected[i] = Some((ok, failed, conns))
            }
            ChildMsg::Armed => self.armed[i] = true,
            ChildMsg::Done => self.done[i] = true,
            ChildMsg::Status(s) => self.status[i] = Some(s),
            ChildMsg::Report(r) => self.reports[i] = Some(*r),
            ChildMsg::Exited => {
                if !self.exited[i] {
                    eprintln!("child {i} exited");
                }
                self.exited[i] = true;
            }
        }
    }

    fn all(&self, f: impl Fn(usize) -> bool) -> bool {
        (0..self.procs.len()).all(|i| self.exited[i] || f(i))
    }

    fn status(&mut self) -> ChildStatus {
        self.status.iter_mut().for_each(|s| *s = None);
        self.tell("status");
        self.wait(Instant::now() + Duration::from_secs(10), |f| {
            f.all(|i| f.status[i].is_some())
        });
        let mut sum = ChildStatus::default();
        for s in self.status.iter().flatten() {
            sum.live += s.live;
            sum.comments += s.comments;
            sum.dropped += s.dropped;
            sum.deliveries += s.deliveries;
        }
        sum
    }

    fn stop(&mut self) {
        self.tell("quit");
        self.stdin.clear();
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.procs {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    Ok(None) => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| vm_rss_kib(p).ok()).sum()
}

fn server_threads(opt: &Opt) -> Vec<procfs::ThreadCpu> {
    opt.server_pid
        .iter()
        .flat_map(|&p| threads(p, &opt.thread_prefix))
        .collect()
}

/// Peak server RSS and TCP memory while the publisher runs, sampled every 100 ms.
fn spawn_sampler(pids: Vec<u32>, stop: Arc<AtomicBool>) -> thread::JoinHandle<(u64, u64)> {
    thread::spawn(move || {
        let (mut rss, mut mem) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            rss = rss.max(rss_kib(&pids));
            mem = mem.max(SysCounters::read().tcp_mem_pages);
            thread::sleep(Duration::from_millis(100));
        }
        (rss, mem)
    })
}

pub fn run(opt: &Opt) -> Result<()> {
    let target = Target::parse(&opt.url)?;
    if !opt.allow_remote && !target.addr.ip().is_loopback() {
        bail!(
            "{} is not a loopback address; pass --allow-remote to load a remote host",
            target.addr
        );
    }
    if opt.subscribers == 0 {
        bail!("--subscribers must be at least 1");
    }
    // Fail here, not in every child, on a bad --cacert or server name.
    let tls = TlsClient::from_opt(opt, &target)?;
    // Fail here too on an unreadable --bearer-file or a bad token.
    opt.auth_headers()?;
    if opt.handshakes > 0 || opt.starts > 0 {
        return super::handshake::run(opt, &target, tls.as_ref());
    }
    let topics = target.topics(opt.topics);
    let mut publisher = if opt.events > 0 {
        Some(Publisher::connect(opt, &target)?)
    } else {
        None
    };
    let pids = opt.server_pid.clone();
    for &p in &pids {
        vm_rss_kib(p).with_context(|| format!("--server-pid {p}: no such process"))?;
    }
    // --h2: stop here, clearly, if the server does not speak h2 (before the baseline
    // memory sample, so the probe's connection is in it).
    let h2_negotiation = if opt.h2 {
        Some(super::h2::probe(&target, tls.as_ref())?)
    } else {
        None
    };
    let m = opt.streams_per_conn() as u64;
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
    rep.memory.server_rss_before_kib = rss_kib(&pids);

    // Connect.
    let t_connect = Instant::now();
    let mut fleet = Fleet::spawn(opt)?;
    let deadline = t_connect + secs(opt.connect_timeout);
    if !fleet.wait(deadline, |f| f.all(|i| f.connected[i].is_some())) {
        eprintln!(
            "connect timeout after {} s: abandoning pending connections",
            opt.connect_timeout
        );
        fleet.tell("abandon");
        fleet.wait(Instant::now() + Duration::from_secs(10), |f| {
            f.all(|i| f.connected[i].is_some())
        });
    }
    let connected: u64 = fleet.connected.iter().flatten().map(|c| c.0).sum();
    let tcp_conns: u64 = fleet.connected.iter().flatten().map(|c| c.2).sum();
    thread::sleep(secs(opt.settle));
    let sys_idle = SysCounters::read();
    rep.memory.server_rss_idle_kib = rss_kib(&pids);
    rep.memory.loadgen_rss_idle_kib = rss_kib(&fleet.pids());
    rep.memory.tcp_connections = tcp_conns;
    rep.memory.streams = connected;
    // Per TCP connection and per subscriber (stream); the same without --h2.
    let per = |d: i64, n: u64| if n > 0 { d as f64 / n as f64 } else { 0.0 };
    let rss_delta =
        (rep.memory.server_rss_idle_kib as i64 - rep.memory.server_rss_before_kib as i64) * 1024;
    rep.memory.server_rss_per_conn_bytes = per(rss_delta, tcp_conns);
    rep.memory.server_rss_per_stream_bytes = per(rss_delta, connected);
    rep.memory.slab_delta_kib = sys_idle.slab_kib as i64 - sys0.slab_kib as i64;
    rep.memory.kernel_slab_per_conn_bytes = per(rep.memory.slab_delta_kib * 1024, tcp_conns);
    rep.memory.kernel_slab_per_stream_bytes = per(rep.memory.slab_delta_kib * 1024, connected);
    rep.memory.tcp_mem_delta_pages = sys_idle.tcp_mem_pages as i64 - sys0.tcp_mem_pages as i64;
    rep.memory.tcp_mem_per_conn_bytes = per(rep.memory.tcp_mem_delta_pages * 4096, tcp_conns);
    rep.memory.tcp_inuse_idle = sys_idle.tcp_inuse;
    rep.memory.note = "kernel figures are system-wide deltas: on loopback both ends of each connection are counted";

    // Hold.
    if opt.hold > 0.0 {
        let s0 = fleet.status();
        let cpu0 = ProcCpu::read_all(&pids);
        let t0 = Instant::now();
        fleet.wait(t0 + secs(opt.hold), |f| f.all(|_| false));
        let s1 = fleet.status();
        let cpu1 = ProcCpu::read_all(&pids);
        let held = t0.elapsed().as_secs_f64();
        let cpu_ms = cpu1.delta_ns(&cpu0).0 as f64 / 1e6;
        rep.hold = Some(HoldReport {
            seconds: held,
            keepalives: s1.comments - s0.comments,
            keepalives_expected_15s: s0.live as f64 * held / 15.0,
            streams_dropped: s1.dropped - s0.dropped,
            live_at_end: s1.live,
            server_cpu_ms: cpu_ms,
            server_cpu_pct: cpu_ms / 1e3 / held * 100.0,
        });
    }

    // Publish.
    let sys_measure0 = if opt.hold > 0.0 {
        sys_idle
    } else {
        SysCounters::read()
    };
    if let Some(publisher) = publisher.as_mut() {
        fleet.tell(&format!("arm {}", opt.events));
        fleet.wait(Instant::now() + Duration::from_secs(30), |f| {
            f.all(|i| f.armed[i])
        });
        let child_pids = fleet.pids();
        let busy0 = cpu_busy_ticks(&opt.server_cpus);
        let srv0 = ProcCpu::read_all(&pids);
        let thr0 = server_threads(opt);
        let lg0 = ProcCpu::read_all(&child_pids);
        let me0 = ProcCpu::read(std::process::id())?;
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = spawn_sampler(pids.clone(), stop.clone());
        let p_start = mono_ns();
        match opt.total_rate {
            Some(r) if !opt.burst => publisher.run_round_robin(&topics, opt.events, r),
            _ => publisher.run(&topics, opt.events, opt.rate, opt.burst),
        }
        let p_end = mono_ns();
        let complete = fleet.wait(Instant::now() + secs(opt.drain_timeout), |f| {
            f.all(|i| f.done[i])
        });
        let w_end = mono_ns();
        let srv1 = ProcCpu::read_all(&pids);
        let thr1 = server_threads(opt);
        let lg1 = ProcCpu::read_all(&child_pids);
        let me1 = ProcCpu::read(std::process::id())?;
        let busy1 = cpu_busy_ticks(&opt.server_cpus);
        stop.store(true, Ordering::Relaxed);
        let (peak_rss, peak_mem) = sampler.join().unwrap_or((0, 0));
        publisher.finish();
        fleet.tell("report");
        fleet.wait(Instant::now() + Duration::from_secs(30), |f| {
            f.all(|i| f.reports[i].is_some())
        });

        let mut p = PublishReport {
            via: match opt.publish {
                PublishVia::Ingest => "ingest".into(),
                PublishVia::Http => "http".into(),
            },
            topics: topics.len(),
            events_per_topic: opt.events,
            rate: opt.rate,
            burst: opt.burst,
            publisher: publisher.stats.clone(),
            publish_seconds: (p_end - p_start) as f64 / 1e9,
            complete,
            peak_server_rss_kib: peak_rss,
            peak_tcp_mem_pages: peak_mem,
            ..PublishReport::default()
        };
        let mut lat = new_hist();
        let (mut fan, mut first) = (new_hist(), new_hist());
        let e = opt.events as usize;
        let mut seq_max = vec![0u64; e];
        let mut seq_min = vec![u64::MAX; e];
        let mut last_delivery = 0;
        let mut live_at_arm = 0;
        for r in fleet.reports.iter().flatten() {
            p.deliveries += r.deliveries;
            p.missing += r.missing;
            p.duplicates += r.duplicates;
            p.out_of_order += r.out_of_order;
            p.out_of_range += r.out_of_range;
            p.foreign_events += r.foreign;
            live_at_arm += r.live_at_arm;
            last_delivery = last_delivery.max(r.last_delivery_ns);
            for (k, v) in &r.dropped {
                *p.streams_dropped.entry(k.clone()).or_default() += v;
            }
            merge(&mut lat, &r.latency_hist);
            for s in 0..e.min(r.seq_max_ns.len()) {
                if r.seq_count[s] > 0 {
                    seq_max[s] = seq_max[s].max(r.seq_max_ns[s]);
                    seq_min[s] = seq_min[s].min(r.seq_min_ns[s]);
                }
            }
        }
        for s in 0..e {
            if seq_min[s] != u64::MAX {
                fan.saturating_record(seq_max[s].max(1));
                first.saturating_record(seq_min[s].max(1));
            }
        }
        p.expected_deliveries = live_at_arm * opt.events;
        let window_end = if complete {
            last_delivery.max(p_end)
        } else {
            w_end
        };
        p.window_seconds = (window_end.saturating_sub(p_start)) as f64 / 1e9;
        let d = p.deliveries.max(1) as f64;
        p.deliveries_per_s = p.deliveries as f64 / p.window_seconds.max(1e-9);
        p.latency_us = Percentiles::us(&lat);
        p.fanout_completion_us = Percentiles::us(&fan);
        p.first_delivery_us = Percentiles::us(&first);
        let (sched, stat) = srv1.delta_ns(&srv0);
        p.server_cpu_ms = sched as f64 / 1e6;
        p.server_cpu_us_per_delivery = sched as f64 / 1e3 / d;
        p.server_cpu_stat_us_per_delivery = stat as f64 / 1e3 / d;
        for t in &thr1 {
            let before = thr0.iter().find(|b| b.tid == t.tid).map_or(0, |b| b.cpu_ns);
            let ns = t.cpu_ns.saturating_sub(before);
            p.server_threads.push(ThreadReport {
                name: t.name.clone(),
                tid: t.tid,
                cpu: t.processor,
                cpu_ms: ns as f64 / 1e6,
                us_per_delivery: ns as f64 / 1e3 / d,
            });
        }
        if !opt.server_cpus.is_empty() {
            let ns = (busy1 - busy0) * (1_000_000_000 / clk_tck());
            p.server_cores_busy_us_per_delivery = Some(ns as f64 / 1e3 / d);
        }
        let lg = lg1.delta_ns(&lg0).0;
        p.loadgen_cpu_ms = lg as f64 / 1e6;
        p.loadgen_cpu_us_per_delivery = lg as f64 / 1e3 / d;
        p.publisher_cpu_ms = me1.delta_ns(&me0).0 as f64 / 1e6;
        p.loadgen_cheaper_than_server = pids.is_empty() || lg < sched;
        if !complete {
            rep.warnings.push(format!(
                "deliveries incomplete after --drain-timeout {} s",
                opt.drain_timeout
            ));
        }
        if p.missing + p.duplicates + p.out_of_order > 0 {
            rep.warnings.push(format!(
                "event loss/order: missing {} dup {} out-of-order {}",
                p.missing, p.duplicates, p.out_of_order
            ));
        }
        if !p.publisher.errors.is_empty() {
            rep.warnings
                .push(format!("publish errors {:?}", p.publisher.errors));
        }
        if !p.loadgen_cheaper_than_server && !pids.is_empty() {
            rep.warnings.push("load generator used more CPU per delivery than the server (expected only when lo RPS steers the receive softirq onto the load generator's CPU)".into());
        }
        rep.publish = Some(p);
    } else {
        fleet.tell("report");
        fleet.wait(Instant::now() + Duration::from_secs(30), |f| {
            f.all(|i| f.reports[i].is_some())
        });
    }

    // Connect figures from the children's reports.
    let mut setup = new_hist();
    let (mut first_ns, mut last_ns) = (u64::MAX, 0);
    let mut lg_start_kib = 0;
    let mut h2 = h2_negotiation.map(|how| H2Report {
        negotiation: how.to_string(),
        streams_per_conn: m as usize,
        connections_requested: opt.subscribers as u64,
        connections_established: tcp_conns,
        ..H2Report::default()
    });
    for r in fleet.reports.iter().flatten() {
        merge(&mut setup, &r.connect_hist);
        lg_start_kib += r.rss_start_kib;
        if let Some(h) = h2.as_mut() {
            for (k, v) in &r.h2_goaway {
                *h.goaway.entry(k.clone()).or_default() += v;
            }
            if let Some(v) = r.h2_server_max_streams {
                h.server_max_concurrent_streams =
                    Some(h.server_max_concurrent_streams.map_or(v, |x| x.min(v)));
            }
            h.pings_answered += r.h2_pings;
            h.window_updates_sent += r.h2_window_updates;
        }
        for (k, v) in &r.tls_sessions {
            *rep.connect.tls_sessions.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.connect_fail {
            *rep.connect.failed.entry(k.clone()).or_default() += v;
        }
        if r.first_connect_ns > 0 {
            first_ns = first_ns.min(r.first_connect_ns);
        }
        last_ns = last_ns.max(r.last_open_ns);
    }
    if fleet.reports.iter().any(Option::is_none) {
        rep.warnings.push("some children did not report".into());
    }
    if let Some(max) = h2.as_ref().and_then(|h| h.server_max_concurrent_streams) {
        if u64::from(max) < m {
            rep.warnings.push(format!(
                "--streams-per-conn {m} is above the server's SETTINGS_MAX_CONCURRENT_STREAMS {max}: streams beyond it are refused"
            ));
        }
    }
    rep.connect.h2 = h2;
    rep.connect.requested = opt.subscribers as u64 * m;
    rep.connect.connected = connected;
    rep.connect.children = fleet.procs.len();
    rep.connect.seconds = if last_ns > first_ns {
        (last_ns - first_ns) as f64 / 1e9
    } else {
        0.0
    };
    rep.connect.per_second = connected as f64 / rep.connect.seconds.max(1e-9);
    rep.connect.setup_us = Percentiles::us(&setup);
    let lg_delta = (rep.memory.loadgen_rss_idle_kib as i64 - lg_start_kib as i64) * 1024;
    rep.memory.loadgen_rss_per_conn_bytes = per(lg_delta, tcp_conns);
    rep.memory.loadgen_rss_per_stream_bytes = per(lg_delta, connected);
    fleet.stop();

    let sys_end = SysCounters::read();
    let n = &mut rep.network;
    n.softnet_drops = sys_end.softnet_drops - sys0.softnet_drops;
    n.retrans_connect_phase = sys_measure0.retrans_segs - sys0.retrans_segs;
    n.retrans_measured_phase = sys_end.retrans_segs - sys_measure0.retrans_segs;
    n.listen_drops_connect_phase = sys_measure0.listen_drops - sys0.listen_drops;
    n.listen_drops_measured_phase = sys_end.listen_drops - sys_measure0.listen_drops;
    n.before = sys0;
    n.after = sys_end;
    if n.softnet_drops > 0 {
        rep.invalid_reasons.push(format!(
            "{} softnet drops (raise net.core.netdev_max_backlog)",
            n.softnet_drops
        ));
    }
    if n.retrans_measured_phase > 0 {
        rep.invalid_reasons.push(format!(
            "{} TCP retransmits while measuring",
            n.retrans_measured_phase
        ));
    }
    if n.retrans_connect_phase + n.listen_drops_connect_phase > 0 {
        rep.warnings.push(format!(
            "{} retransmits / {} listen drops while connecting (connect figures only; lower --connect-rate or raise somaxconn)",
            n.retrans_connect_phase, n.listen_drops_connect_phase
        ));
    }
    if connected < opt.subscribers as u64 * m {
        rep.warnings.push(format!(
            "only {connected} of {} subscribers connected",
            opt.subscribers as u64 * m
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
