//! Deterministic payloads and their SHA-256 hashes, which the tests compare instead of
//! the bytes.

use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// `len` bytes that differ at every offset and between seeds, so that a lost, repeated
/// or reordered block changes the hash.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `payload(len, seed)`, generated once per process and shared: the big payloads take a
/// noticeable time to generate and several tests send the same one.
pub fn shared_payload(len: usize, seed: u64) -> Arc<Vec<u8>> {
    type Cache = std::collections::BTreeMap<(usize, u64), Arc<Vec<u8>>>;
    static CACHE: Mutex<Cache> = Mutex::new(Cache::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(
        cache
            .entry((len, seed))
            .or_insert_with(|| Arc::new(payload(len, seed))),
    )
}

/// SHA-256 of the concatenation of `parts`.
pub fn sha256_concat(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}
