//! The few raw libc calls the engine needs outside io_uring: the open-files limit, an
//! eventfd used to wake a parked worker, and handing freed heap pages back to the kernel. Each is a thin, documented wrapper so the rest of
//! the engine stays safe code.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the resulting soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit that outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit read by the call only.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

/// A non-blocking eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant flags; no memory is passed.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attach the kernel's `tls` upper-layer protocol to a connected TCP socket (the first
/// step of kernel TLS; ENOENT when the kernel has no TLS module).
pub fn set_tcp_ulp_tls(fd: RawFd) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: `name` is a live 3-byte buffer read by the call only; `fd` is borrowed from
    // an open socket the caller holds.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Install a fixed TLS 1.2 AES-GCM-128 key for one direction (`libc::TLS_TX` or
/// `libc::TLS_RX`) on a socket with the `tls` ULP: both ends of the probe use the same
/// key, so a record sent on one must decrypt on the other. Used by the kernel-TLS probe
/// only; never with a real session's keys.
pub fn set_ktls_probe_keys(fd: RawFd, direction: libc::c_int) -> io::Result<()> {
    let info = libc::tls12_crypto_info_aes_gcm_128 {
        info: libc::tls_crypto_info {
            version: libc::TLS_1_2_VERSION,
            cipher_type: libc::TLS_CIPHER_AES_GCM_128,
        },
        iv: [7; libc::TLS_CIPHER_AES_GCM_128_IV_SIZE],
        key: [42; libc::TLS_CIPHER_AES_GCM_128_KEY_SIZE],
        salt: [3; libc::TLS_CIPHER_AES_GCM_128_SALT_SIZE],
        rec_seq: [0; libc::TLS_CIPHER_AES_GCM_128_REC_SEQ_SIZE],
    };
    // SAFETY: `info` is a live, fully initialised struct of the size passed, read by the
    // call only; `fd` is borrowed from an open socket the caller holds.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TLS,
            direction,
            (&info as *const libc::tls12_crypto_info_aes_gcm_128).cast(),
            std::mem::size_of_val(&info) as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Hand a TLS connection's sending to the kernel: attach the `tls` ULP (when `ulp`) and
/// install `keys` (a `tls12_crypto_info_*` as bytes, from `Sealed::kernel_keys`) as its
/// `TLS_TX` state. A second call with `ulp` false replaces the keys (TLS 1.3 rekey).
pub fn install_ktls_tx(fd: RawFd, ulp: bool, keys: &[u8]) -> io::Result<()> {
    if ulp {
        set_tcp_ulp_tls(fd)?;
    }
    // SAFETY: `keys` is a live buffer of the length passed, read by the call only; `fd`
    // is borrowed from an open socket the caller holds.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TLS,
            libc::TLS_TX,
            keys.as_ptr().cast(),
            keys.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Room for one `TLS_SET_RECORD_TYPE` control message (a one-byte payload), aligned as
/// `cmsghdr` needs.
#[repr(C, align(8))]
pub struct RecordTypeCmsg([u8; 32]);

impl RecordTypeCmsg {
    pub const fn new() -> RecordTypeCmsg {
        RecordTypeCmsg([0; 32])
    }

    /// Point `msg`'s control data at this buffer, holding record type `typ`: a kTLS
    /// socket then sends the message's data as one record of that type (an alert, a
    /// handshake message) instead of application data.
    pub fn attach(&mut self, msg: &mut libc::msghdr, typ: u8) {
        // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
        let (space, len) = unsafe { (libc::CMSG_SPACE(1) as usize, libc::CMSG_LEN(1) as usize) };
        debug_assert!(space <= self.0.len());
        self.0 = [0; 32];
        msg.msg_control = self.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at this buffer, which is 8-aligned and at least
        // CMSG_SPACE(1) long, so CMSG_FIRSTHDR returns a header inside it, and its data
        // byte is inside it too. The buffer lives as long as `self`, which the caller
        // keeps until the send that uses `msg` has completed.
        unsafe {
            let h = libc::CMSG_FIRSTHDR(msg);
            (*h).cmsg_level = libc::SOL_TLS;
            (*h).cmsg_type = libc::TLS_SET_RECORD_TYPE;
            (*h).cmsg_len = len as _;
            *libc::CMSG_DATA(h) = typ;
        }
    }
}

impl Default for RecordTypeCmsg {
    fn default() -> RecordTypeCmsg {
        RecordTypeCmsg::new()
    }
}

/// Send `data` on a kTLS socket as one record of type `typ` (non-blocking, no SIGPIPE).
pub fn send_record(fd: RawFd, typ: u8, data: &[u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let mut cmsg = RecordTypeCmsg::new();
    cmsg.attach(&mut msg, typ);
    // SAFETY: `msg` points at `iov` (over `data`) and `cmsg`, all live across the call,
    // which only reads them; `fd` is borrowed from an open socket the caller holds.
    let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Give the kernel back the pages of freed heap memory (glibc `malloc_trim`, which
/// `madvise`s every whole free page in every arena). A burst of new connections leaves
/// its short-lived allocations (request heads, first frames, handshake state) freed but
/// resident between the long-lived ones; a worker calls this when it goes idle after
/// much connection churn (see `Core::heap_trim_due`). A no-op where glibc is absent.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only walks glibc's own free lists under
    // their locks, so no memory of ours is touched or freed by it.
    unsafe {
        libc::malloc_trim(0);
    }
}
