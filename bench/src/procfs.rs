//! Readers for the /proc figures the benchmark reports: process and thread CPU time,
//! VmRSS, slab and socket memory, softnet drops and TCP retransmits. Each reader parses
//! one file once; none is on the per-event path.

use std::collections::BTreeMap;
use std::fs;
use std::io;

/// CLOCK_MONOTONIC in nanoseconds (same clock the publisher writes into each event).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Kernel clock ticks per second (utime/stime unit in /proc/PID/stat).
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Fields after the `(comm)` of a /proc stat line; index 0 is field 3 (`state`).
fn stat_fields(text: &str) -> Option<(String, Vec<&str>)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    Some((comm, text[close + 1..].split_whitespace().collect()))
}

/// CPU time of a process (all threads, dead ones included for `stat_ticks`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProcCpu {
    /// utime + stime from /proc/PID/stat, in clock ticks.
    pub stat_ticks: u64,
    /// Sum of /proc/PID/task/*/schedstat run time, in ns (live threads only; precise).
    pub sched_ns: u64,
}

impl ProcCpu {
    pub fn read(pid: u32) -> io::Result<ProcCpu> {
        let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let (_, f) = stat_fields(&text).ok_or_else(|| io::Error::other("bad stat"))?;
        let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        let sched_ns = threads(pid, "").iter().map(|t| t.cpu_ns).sum();
        Ok(ProcCpu {
            stat_ticks: ticks,
            sched_ns,
        })
    }

    pub fn read_all(pids: &[u32]) -> ProcCpu {
        let mut sum = ProcCpu::default();
        for &p in pids {
            if let Ok(c) = ProcCpu::read(p) {
                sum.stat_ticks += c.stat_ticks;
                sum.sched_ns += c.sched_ns;
            }
        }
        sum
    }

    /// CPU time elapsed since `before`, in ns, by both measures: (schedstat, stat).
    pub fn delta_ns(&self, before: &ProcCpu) -> (u64, u64) {
        let tick_ns = 1_000_000_000 / clk_tck();
        (
            self.sched_ns.saturating_sub(before.sched_ns),
            self.stat_ticks.saturating_sub(before.stat_ticks) * tick_ns,
        )
    }
}

/// One thread of a process and its run time.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ThreadCpu {
    pub tid: u32,
    pub name: String,
    /// Run time from /proc/PID/task/TID/schedstat, ns.
    pub cpu_ns: u64,
    /// CPU the thread last ran on.
    pub processor: i64,
}

/// Threads of `pid` whose name starts with `prefix` ("" = all).
pub fn threads(pid: u32, prefix: &str) -> Vec<ThreadCpu> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let base = format!("/proc/{pid}/task/{tid}");
        let Ok(stat) = fs::read_to_string(format!("{base}/stat")) else {
            continue;
        };
        let Some((name, f)) = stat_fields(&stat) else {
            continue;
        };
        if !name.starts_with(prefix) {
            continue;
        }
        let cpu_ns = fs::read_to_string(format!("{base}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let processor = f.get(36).and_then(|p| p.parse().ok()).unwrap_or(-1);
        out.push(ThreadCpu {
            tid,
            name,
            cpu_ns,
            processor,
        });
    }
    out.sort_by_key(|t| t.tid);
    out
}

/// VmRSS of a process, KiB.
pub fn vm_rss_kib(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    kib_field(&text, "VmRSS:").ok_or_else(|| io::Error::other("no VmRSS"))
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// System-wide counters sampled around each phase.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SysCounters {
    /// `Slab` from /proc/meminfo, KiB.
    pub slab_kib: u64,
    /// /proc/net/sockstat `TCP: ... mem` (pages).
    pub tcp_mem_pages: u64,
    /// /proc/net/sockstat `TCP: inuse`.
    pub tcp_inuse: u64,
    /// Sum of column 2 (dropped) of /proc/net/softnet_stat over CPUs.
    pub softnet_drops: u64,
    /// `Tcp: RetransSegs` from /proc/net/snmp.
    pub retrans_segs: u64,
    /// `TcpExt: ListenOverflows` + `ListenDrops` from /proc/net/netstat.
    pub listen_drops: u64,
}

impl SysCounters {
    pub fn read() -> SysCounters {
        let mut c = SysCounters::default();
        if let Ok(t) = fs::read_to_string("/proc/meminfo") {
            c.slab_kib = kib_field(&t, "Slab:").unwrap_or(0);
        }
        if let Ok(t) = fs::read_to_string("/proc/net/sockstat") {
            if let Some(l) = t.lines().find(|l| l.starts_with("TCP:")) {
                let w: Vec<&str> = l.split_whitespace().collect();
                for i in 1..w.len().saturating_sub(1) {
                    match w[i] {
                        "inuse" => c.tcp_inuse = w[i + 1].parse().unwrap_or(0),
                        "mem" => c.tcp_mem_pages = w[i + 1].parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
        if let Ok(t) = fs::read_to_string("/proc/net/softnet_stat") {
            c.softnet_drops = t
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter_map(|h| u64::from_str_radix(h, 16).ok())
                .sum();
        }
        let snmp = keyed_table("/proc/net/snmp");
        c.retrans_segs = snmp.get("Tcp:RetransSegs").copied().unwrap_or(0);
        let netstat = keyed_table("/proc/net/netstat");
        c.listen_drops = netstat.get("TcpExt:ListenOverflows").copied().unwrap_or(0)
            + netstat.get("TcpExt:ListenDrops").copied().unwrap_or(0);
        c
    }
}

/// /proc/net/{snmp,netstat}: pairs of header/value lines → "Prefix:Name" → value.
fn keyed_table(path: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(t) = fs::read_to_string(path) else {
        return out;
    };
    let lines: Vec<&str> = t.lines().collect();
    for pair in lines.chunks(2) {
        if let [h, v] = pair {
            let hs: Vec<&str> = h.split_whitespace().collect();
            let vs: Vec<&str> = v.split_whitespace().collect();
            if hs.is_empty() || hs[0] != vs.first().copied().unwrap_or("") {
                continue;
            }
            for (k, val) in hs.iter().zip(vs.iter()).skip(1) {
                if let Ok(n) = val.parse::<i64>() {
                    out.insert(format!("{}{}", hs[0], k), n.max(0) as u64);
                }
            }
        }
    }
    out
}

/// Busy ticks (user+nice+system+irq+softirq) of the given CPUs from /proc/stat.
pub fn cpu_busy_ticks(cpus: &[usize]) -> u64 {
    let Ok(t) = fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let mut sum = 0;
    for l in t.lines() {
        let mut w = l.split_whitespace();
        let Some(name) = w.next() else { continue };
        let Some(n) = name
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if !cpus.contains(&n) {
            continue;
        }
        let v: Vec<u64> = w.map(|x| x.parse().unwrap_or(0)).collect();
        // user nice system idle iowait irq softirq steal ...
        if v.len() >= 7 {
            sum += v[0] + v[1] + v[2] + v[5] + v[6];
        }
    }
    sum
}

/// Host facts recorded with each result.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub hostname: String,
    pub mitigations: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("")
            .trim()
            .to_string();
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default().trim().to_string();
        let mut mitigations = String::new();
        for v in ["spectre_v2", "spec_rstack_overflow", "retbleed"] {
            let s = read(&format!("/sys/devices/system/cpu/vulnerabilities/{v}"));
            if !s.is_empty() {
                mitigations.push_str(&format!("{v}: {s}; "));
            }
        }
        Machine {
            cpu_model,
            // SAFETY: sysconf has no memory-safety preconditions. (Not available_parallelism:
            // that honours our own taskset.)
            cpus: unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(0) as usize,
            kernel: read("/proc/sys/kernel/osrelease"),
            hostname: read("/proc/sys/kernel/hostname"),
            mitigations,
        }
    }
}

/// Short name for an errno value, for failure tables.
pub fn errno_name(code: i32) -> String {
    let name = match code {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::ENOBUFS => "ENOBUFS",
        libc::ENOMEM => "ENOMEM",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EPIPE => "EPIPE",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EINVAL => "EINVAL",
        _ => return format!("errno{code}"),
    };
    name.to_string()
}

/// Errno name of an io::Error ("other" when it carries none).
pub fn io_error_name(e: &io::Error) -> String {
    e.raw_os_error()
        .map_or_else(|| format!("{:?}", e.kind()), errno_name)
}

/// Raise the soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit to fill and then pass back.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    r.rlim_cur
}
