//! Can this process use io_uring the way herald does? Checks the kernel release, builds a
//! ring with herald's setup flags, and probes every opcode the uring backend submits. The
//! answer is `Ok` or the reason to fall back to epoll, which is logged.

use io_uring::{opcode, IoUring, Probe};

/// Oldest kernel the uring backend supports (multishot recv, buffer rings, fd cancel).
pub const MIN_KERNEL: (u32, u32) = (6, 1);

/// Opcodes the uring backend submits.
const OPCODES: &[(u8, &str)] = &[
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::RecvMulti::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::SendMsg::CODE, "SENDMSG"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
    (opcode::Close::CODE, "CLOSE"),
    (opcode::Read::CODE, "READ"),
];

/// Ring with herald's setup flags (SQ entries; CQ is 4x).
pub fn build_ring(entries: u32) -> std::io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_submit_all()
        .setup_cqsize(entries * 4)
        .build(entries)
}

fn kernel_release() -> Option<(u32, u32)> {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = rel.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// `Ok(())` if the uring backend can run here, else why not. The probe ring lives on a
/// short-lived thread of its own: tearing a ring down queues task work on the thread that
/// made it, which would interrupt that thread's next blocking socket call with EINTR.
pub fn check() -> Result<(), String> {
    std::thread::Builder::new()
        .name("herald-probe".into())
        .spawn(check_here)
        .map_err(|e| format!("cannot start the probe thread: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("the io_uring probe panicked".into()))
}

fn check_here() -> Result<(), String> {
    match kernel_release() {
        Some(v) if v < MIN_KERNEL => {
            return Err(format!(
                "kernel {}.{} is older than {}.{}",
                v.0, v.1, MIN_KERNEL.0, MIN_KERNEL.1
            ))
        }
        Some(_) => {}
        None => return Err("cannot read the kernel release".into()),
    }
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() == "2" {
            return Err("io_uring is disabled (kernel.io_uring_disabled = 2)".into());
        }
    }
    let ring = build_ring(64).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    let missing: Vec<&str> = OPCODES
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!("io_uring lacks opcodes: {}", missing.join(", ")));
    }
    ring.submitter()
        .register_files_sparse(16)
        .map_err(|e| format!("cannot register a fixed-file table: {e}"))?;
    Ok(())
}
