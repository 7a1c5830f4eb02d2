//! The in-kernel half of splice-proxy: once userspace has put both sockets of a
//! connection into `SPLICED` and each into `PEER_OF` under the other's cookie, every byte
//! either socket receives is handed to its peer's egress here, without a copy to userspace.
//!
//! Userspace fills `PEER_OF` before `SPLICED`, so by the time a socket's bytes reach the
//! verdict its peer is already a valid redirect target: a redirect to an empty slot would
//! drop bytes TCP has already acknowledged (KERNEL-NOTES pitfall 6).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_parser, stream_verdict},
    maps::{PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use proxy_probe::{
    COUNTER_DROPPED_BYTES, COUNTER_REDIRECT_FAILURES, COUNTER_REDIRECTED_BYTES,
    COUNTER_REDIRECTED_MESSAGES, COUNTER_SLOTS, DEFAULT_MAP_CAPACITY,
};

#[map]
static SPLICED: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAP_CAPACITY, 0);

#[map]
static PEER_OF: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAP_CAPACITY, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Only used in parser + verdict mode: each skb is a whole message, so the strparser
/// never waits for more bytes before the verdict runs.
#[stream_parser]
fn splice_parser(ctx: SkBuffContext) -> u32 {
    ctx.len()
}

#[stream_verdict]
fn splice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the socket the skb belongs to; `ctx.skb.skb` is the
    // context pointer the kernel passed to this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = u64::from(ctx.len());
    // Flags 0: out of the peer's egress, not into its receive queue (BPF_F_INGRESS).
    let verdict = PEER_OF.redirect_skb(&ctx, cookie, 0);
    if verdict == i64::from(SK_PASS) {
        count(COUNTER_REDIRECTED_BYTES, len);
        count(COUNTER_REDIRECTED_MESSAGES, 1);
    } else {
        count(COUNTER_REDIRECT_FAILURES, 1);
        count(COUNTER_DROPPED_BYTES, len);
    }
    verdict as u32
}

#[inline(always)]
fn count(slot: u32, by: u64) {
    if let Some(counter) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the slot is this CPU's own copy and the program cannot be preempted on
        // it by another run of itself, so a plain add does not race.
        unsafe { *counter += by };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
