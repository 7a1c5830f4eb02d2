//! The in-kernel half of splice-proxy: once userspace has put both sockets of a
//! connection into `SPLICED` and each into `PEER_OF` under the other's cookie, every byte
//! either socket receives is handed to its peer's egress here, without a copy to userspace.
//!
//! Userspace fills `PEER_OF` before `SPLICED`, so by the time a socket's bytes reach the
//! verdict its peer is already a valid redirect target: a redirect to an empty slot would
//! drop bytes TCP has already acknowledged (KERNEL-NOTES pitfall 6).
//!
//! With no stream parser attached (docs/kernel.md, "Why there is no stream-parser mode")
//! the kernel hands the verdict each skb whole as TCP queued it, and TCP queues a
//! retransmission that starts before what it has already received (but ends after it)
//! whole too: `tcp_read_skb` does not skip the part the socket has handled, so without
//! [`cut_resent_bytes`] those bytes would reach the peer twice (docs/kernel.md,
//! "Retransmissions in verdict-only mode").
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use proxy_probe::{
    COUNTER_DROPPED_BYTES, COUNTER_REDIRECT_FAILURES, COUNTER_REDIRECTED_BYTES,
    COUNTER_REDIRECTED_MESSAGES, COUNTER_RESENT_BYTES_CUT, COUNTER_RESENT_BYTES_PASSED,
    COUNTER_SLOTS, COUNTER_UNSEQUENCED_MESSAGES, DEFAULT_MAP_CAPACITY, SEQ_KNOWN,
};

#[map]
static SPLICED: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAP_CAPACITY, 0);

#[map]
static PEER_OF: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAP_CAPACITY, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Per socket cookie, the TCP sequence number just past the last byte the verdict
/// handled (`SEQ_KNOWN` set), or 0 before the first; userspace creates and deletes the
/// entries, one pair at a time, not up front.
#[map]
static NEXT_SEQ: HashMap<u64, u64> =
    HashMap::with_max_entries(DEFAULT_MAP_CAPACITY, BPF_F_NO_PREALLOC);

/// The most `bpf_skb_adjust_room` removes from an sk_skb in one call. The verdict calls
/// it up to 32 times per skb, 128 KiB: more than a loopback or GSO skb holds.
const MAX_CUT: u32 = 0xfff;

#[stream_verdict]
fn splice_verdict(ctx: SkBuffContext) -> u32 {
    let cookie = cookie_of(&ctx);
    if !cut_resent_bytes(&ctx, cookie) {
        // Every byte of it was handled before: nothing to send, and dropping an empty
        // skb reads nothing more off the socket.
        return SK_DROP;
    }
    redirect(&ctx, cookie)
}

#[inline(always)]
fn cookie_of(ctx: &SkBuffContext) -> u64 {
    // SAFETY: the helper only reads the socket the skb belongs to; `ctx.skb.skb` is the
    // context pointer the kernel passed to this program.
    unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) }
}

#[inline(always)]
fn redirect(ctx: &SkBuffContext, cookie: u64) -> u32 {
    let len = u64::from(ctx.len());
    // Flags 0: out of the peer's egress, not into its receive queue (BPF_F_INGRESS).
    let verdict = PEER_OF.redirect_skb(ctx, cookie, 0);
    if verdict == i64::from(SK_PASS) {
        count(COUNTER_REDIRECTED_BYTES, len);
        count(COUNTER_REDIRECTED_MESSAGES, 1);
    } else {
        count(COUNTER_REDIRECT_FAILURES, 1);
        count(COUNTER_DROPPED_BYTES, len);
    }
    verdict as u32
}

/// Cuts off the front of the skb the bytes this socket's verdict has handled before;
/// false if nothing is left. With no stream parser attached an sk_skb program's `cb` is
/// the start of the kernel's `skb->cb`, where TCP keeps the skb's sequence numbers
/// (`TCP_SKB_CB(skb)->seq` and `->end_seq`).
#[inline(always)]
fn cut_resent_bytes(ctx: &SkBuffContext, cookie: u64) -> bool {
    let cb = ctx.cb();
    let (seq, end_seq) = (cb[0], cb[1]);
    // A kernel that maps `cb` elsewhere (older ones map it past the start of `skb->cb`)
    // does not give the span of the skb's bytes (one more with a FIN): leave it whole.
    let span = end_seq.wrapping_sub(seq);
    if span != ctx.len() && span != ctx.len() + 1 {
        count(COUNTER_UNSEQUENCED_MESSAGES, 1);
        return true;
    }
    let Some(next) = NEXT_SEQ.get_ptr_mut(cookie) else {
        // The pair has ended, or its join found no room (which the engine logs).
        return true;
    };
    // SAFETY: `next` points into this socket's entry, which only this program writes, and
    // the kernel runs it for one socket at a time (under the socket's lock); entries are
    // not preallocated, so this one stays valid while the program runs even if userspace
    // deletes it.
    let known = unsafe { *next };
    if known & SEQ_KNOWN == 0 {
        // The socket's first skb since it joined: userspace read up to a whole skb's end
        // before the join (pair.rs, settle_client_queue), so this one starts fresh.
        // SAFETY: as above.
        unsafe { *next = SEQ_KNOWN | u64::from(end_seq) };
        return true;
    }
    let handled_to = known as u32;
    if (end_seq.wrapping_sub(handled_to) as i32) > 0 {
        // SAFETY: as above.
        unsafe { *next = SEQ_KNOWN | u64::from(end_seq) };
    }
    let overlap = handled_to.wrapping_sub(seq) as i32;
    if overlap <= 0 {
        return true;
    }
    let resent = (overlap as u32).min(ctx.len());
    let mut left = resent;
    // Unrolled: a loop whose counter the compiler rewrites is one the verifier cannot
    // bound without CAP_PERFMON ("the sequence of 8193 jumps is too complex").
    macro_rules! cut {
        () => {
            if left > 0 {
                let cut = left.min(MAX_CUT);
                if ctx.adjust_room(-(cut as i32), 0, 0).is_ok() {
                    left -= cut;
                }
            }
        };
    }
    macro_rules! cut_8 {
        () => {
            cut!();
            cut!();
            cut!();
            cut!();
            cut!();
            cut!();
            cut!();
            cut!();
        };
    }
    cut_8!();
    cut_8!();
    cut_8!();
    cut_8!();
    count(COUNTER_RESENT_BYTES_CUT, u64::from(resent - left));
    count(COUNTER_RESENT_BYTES_PASSED, u64::from(left));
    ctx.len() > 0
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
