//! A model of the kernel's TLS transmit side, for tests (this machine's kernel has no
//! `tls` ULP to test against).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

use super::{CT_DATA, KERNEL_RECORD_HEADER, TAG};

/// What the kernel does with the `TLS_TX` state herald installs, written from the uapi
/// structs (`libc`'s layouts) and the kernel's record rules, not from `Sealed`: this
/// machine's kernel has no `tls` ULP, so the hand-over's keys are checked against this
/// model and rustls' client instead.
#[derive(Debug)]
pub(crate) struct KernelModel {
    tls13: bool,
    alg: &'static aead::Algorithm,
    key: Vec<u8>,
    salt: Vec<u8>,
    iv: Vec<u8>,
    seq: [u8; 8],
}

impl KernelModel {
    pub(crate) fn install(b: &[u8]) -> KernelModel {
        use std::mem::{offset_of, size_of};
        let version = u16::from_ne_bytes([b[0], b[1]]);
        let cipher = u16::from_ne_bytes([b[2], b[3]]);
        assert!(version == libc::TLS_1_3_VERSION || version == libc::TLS_1_2_VERSION);
        macro_rules! take {
            ($t:ty, $alg:expr) => {{
                assert_eq!(b.len(), size_of::<$t>(), "struct size");
                let f = |o: usize, n: usize| b[o..o + n].to_vec();
                let iv_off = offset_of!($t, iv);
                let key_off = offset_of!($t, key);
                let salt_off = offset_of!($t, salt);
                let seq_off = offset_of!($t, rec_seq);
                assert_eq!(size_of::<$t>() - seq_off, 8, "rec_seq is last");
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&b[seq_off..seq_off + 8]);
                KernelModel {
                    tls13: version == libc::TLS_1_3_VERSION,
                    alg: $alg,
                    key: f(key_off, salt_off - key_off),
                    salt: f(salt_off, seq_off - salt_off),
                    iv: f(iv_off, key_off - iv_off),
                    seq,
                }
            }};
        }
        match cipher as i32 as u16 {
            c if c == libc::TLS_CIPHER_AES_GCM_128 => {
                take!(libc::tls12_crypto_info_aes_gcm_128, &aead::AES_128_GCM)
            }
            c if c == libc::TLS_CIPHER_AES_GCM_256 => {
                take!(libc::tls12_crypto_info_aes_gcm_256, &aead::AES_256_GCM)
            }
            c if c == libc::TLS_CIPHER_CHACHA20_POLY1305 => {
                take!(
                    libc::tls12_crypto_info_chacha20_poly1305,
                    &aead::CHACHA20_POLY1305
                )
            }
            c => panic!("cipher {c}"),
        }
    }

    pub(crate) fn seal(&mut self, typ: u8, body: &[u8], out: &mut Vec<u8>) {
        let key = LessSafeKey::new(UnboundKey::new(self.alg, &self.key).unwrap());
        let gcm12 = !self.tls13 && !self.salt.is_empty();
        let mut nonce = [0u8; 12];
        nonce[..self.salt.len()].copy_from_slice(&self.salt);
        nonce[self.salt.len()..].copy_from_slice(&self.iv);
        if !gcm12 {
            for (n, s) in nonce[4..].iter_mut().zip(self.seq) {
                *n ^= s;
            }
        }
        let nonce = Nonce::assume_unique_for_key(nonce);
        if self.tls13 {
            let mut inner = body.to_vec();
            inner.push(typ);
            let len = inner.len() + TAG;
            let header = [CT_DATA, 3, 3, (len >> 8) as u8, len as u8];
            key.seal_in_place_append_tag(nonce, Aad::from(header), &mut inner)
                .unwrap();
            out.extend_from_slice(&header);
            out.extend_from_slice(&inner);
        } else {
            let explicit = if gcm12 { self.iv.clone() } else { Vec::new() };
            let len = explicit.len() + body.len() + TAG;
            let mut aad = self.seq.to_vec();
            aad.extend_from_slice(&[typ, 3, 3]);
            aad.extend_from_slice(&(body.len() as u16).to_be_bytes());
            let mut data = body.to_vec();
            key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut data)
                .unwrap();
            out.extend_from_slice(&[typ, 3, 3, (len >> 8) as u8, len as u8]);
            out.extend_from_slice(&explicit);
            out.extend_from_slice(&data);
            // TLS 1.2 AES-GCM: the explicit nonce goes up by one per record.
            if gcm12 {
                increment(&mut self.iv);
            }
        }
        increment(&mut self.seq);
    }

    /// Seal every record `Sealed` queued for the kernel (`[type, len, body]`).
    pub(crate) fn seal_queued(&mut self, mut queued: &[u8], out: &mut Vec<u8>) {
        while !queued.is_empty() {
            let len = u16::from_be_bytes([queued[1], queued[2]]) as usize;
            let (rec, rest) = queued.split_at(KERNEL_RECORD_HEADER + len);
            self.seal(rec[0], &rec[KERNEL_RECORD_HEADER..], out);
            queued = rest;
        }
    }
}

fn increment(b: &mut [u8]) {
    for x in b.iter_mut().rev() {
        *x = x.wrapping_add(1);
        if *x != 0 {
            break;
        }
    }
}
