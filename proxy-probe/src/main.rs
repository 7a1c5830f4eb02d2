//! The in-kernel half of splice-proxy: once userspace has put both sockets of a
//! connection into `SPLICED` and each into `PEER_OF` under the other's cookie, every byte
//! either socket receives is handed to its peer's egress here, without a copy to userspace.
//!
//! Userspace fills `PEER_OF` before `SPLICED`, so by the time a socket's bytes reach the
//! verdict its peer is already a valid redirect target: a redirect to an empty slot would
//! drop bytes TCP has already acknowledged (docs/kernel.md, "Insert the upstream first").
//!
//! A redirect has no backpressure of its own: the kernel acknowledges the bytes to their
//! sender at once and queues them for the peer's kworker without limit (docs/kernel.md, "A
//! redirect has no backpressure"). So each direction redirects only within a credit that
//! userspace grants from what the peer has really sent (`CREDIT`, counted in `FLOW`).
//! Partway through it the verdict asks for more (`ASKS`); a message beyond it is not
//! redirected but parked in its own socket's receive queue (`SK_PASS`), where it is charged
//! to that socket and closes its TCP window, and every later message parks behind it until
//! userspace has moved them all.
//!
//! The kernel hands the verdict each skb whole as TCP queued it, and TCP queues a
//! retransmission that starts before what it has already received (but ends after it)
//! whole too: `tcp_read_skb` does not skip the part the socket has handled, so
//! [`cut_resent_bytes`] does (docs/kernel.md, "Retransmissions in verdict-only mode").
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use proxy_probe::{
    ASKS_BYTES, COUNTER_ASKS, COUNTER_ASKS_REFUSED, COUNTER_DROPPED_BYTES, COUNTER_PARKED_BYTES,
    COUNTER_REDIRECT_FAILURES, COUNTER_REDIRECTED_BYTES, COUNTER_REDIRECTED_MESSAGES,
    COUNTER_RESENT_BYTES_CUT, COUNTER_RESENT_BYTES_PASSED, COUNTER_SLOTS,
    COUNTER_UNSEQUENCED_MESSAGES, COUNTER_UNTRACKED_MESSAGES, Credit, DEFAULT_MAP_CAPACITY,
    FLOWING, Flow, PARKING, PARKING_ANNOUNCED,
};

#[map]
static SPLICED: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAP_CAPACITY, 0);

#[map]
static PEER_OF: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAP_CAPACITY, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

// Not preallocated: a deleted or replaced entry is freed only after every program that
// may still hold it has finished, so a verdict never writes into another socket's entry,
// and the maps take memory only for the sockets that exist. Userspace creates a socket's
// `FLOW` record before the socket joins and deletes it after it closed; the verdict only
// updates it, so a verdict that runs late cannot leave a record behind.
#[map]
static FLOW: HashMap<u64, Flow> =
    HashMap::with_max_entries(DEFAULT_MAP_CAPACITY, BPF_F_NO_PREALLOC);

#[map]
static CREDIT: HashMap<u64, Credit> =
    HashMap::with_max_entries(DEFAULT_MAP_CAPACITY, BPF_F_NO_PREALLOC);

#[map]
static ASKS: RingBuf = RingBuf::with_byte_size(ASKS_BYTES, 0);

#[stream_verdict]
fn splice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the socket the skb belongs to; `ctx.skb.skb` is the
    // context pointer the kernel passed to this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN, which verdict-only mode hands over as an empty skb. The socket has
        // taken note of it already, and an empty skb in a kworker's queue stops that
        // socket's transmit for good (`sk_psock_backlog` takes the 0 its send or
        // receive returns for a hard error), dropping every byte redirected to it
        // after: so neither redirect it nor park it.
        return SK_DROP;
    }
    let Some(flow) = FLOW.get_ptr_mut(cookie) else {
        // The join found no room for the record (the pair is copied instead), or the
        // pair has ended.
        count(COUNTER_UNTRACKED_MESSAGES, 1);
        return redirect(&ctx, cookie, len);
    };
    // SAFETY: the entry is not preallocated, so it stays valid while this program runs
    // even if userspace deletes it; only this socket's verdict writes it, and the kernel
    // runs that under the socket's lock, one message at a time.
    let flow = unsafe { &mut *flow };
    let Some(len) = cut_resent_bytes(&ctx, flow) else {
        // Every byte of it was handled before: nothing to send, and dropping an empty
        // skb reads nothing more off the socket.
        return SK_DROP;
    };
    let credit = credit_of(cookie, flow);

    if flow.state != FLOWING {
        if credit.unparked != flow.parked {
            return park(flow, cookie, len);
        }
        // Userspace has written every parked byte to the peer: a redirect from here on
        // queues behind them.
        flow.state = FLOWING;
    }
    if flow.redirected + len > credit.limit {
        flow.state = PARKING;
        return park(flow, cookie, len);
    }
    let verdict = redirect(&ctx, cookie, len);
    if verdict == SK_PASS {
        flow.redirected += len;
        if flow.redirected >= credit.ask_at && flow.asked_at != credit.ask_at && ask(cookie) {
            flow.asked_at = credit.ask_at;
        }
    }
    verdict
}

/// Flags 0: out of the peer's egress, not into its receive queue (BPF_F_INGRESS).
#[inline(always)]
fn redirect(ctx: &SkBuffContext, cookie: u64, len: u64) -> u32 {
    let verdict = PEER_OF.redirect_skb(ctx, cookie, 0) as u32;
    if verdict == SK_PASS {
        count(COUNTER_REDIRECTED_BYTES, len);
        count(COUNTER_REDIRECTED_MESSAGES, 1);
    } else {
        count(COUNTER_REDIRECT_FAILURES, 1);
        count(COUNTER_DROPPED_BYTES, len);
    }
    verdict
}

/// `SK_PASS` without a redirect: the kernel queues the message on the socket's own
/// receive queue, charged to its receive buffer, where userspace reads it.
#[inline(always)]
fn park(flow: &mut Flow, cookie: u64, len: u64) -> u32 {
    flow.parked += len;
    count(COUNTER_PARKED_BYTES, len);
    if flow.state == PARKING && ask(cookie) {
        flow.state = PARKING_ANNOUNCED;
    }
    SK_PASS
}

/// The most `bpf_skb_adjust_room` removes from an sk_skb in one call. The verdict calls
/// it up to 32 times per skb, 128 KiB: more than a loopback or GSO skb holds.
const MAX_CUT: u32 = 0xfff;

/// Cuts off the front of the skb the bytes this socket's verdict has handled before
/// (docs/kernel.md, "Retransmissions in verdict-only mode"); the length left, or None if
/// nothing is. An sk_skb program's `cb` is the start of the kernel's `skb->cb`, where TCP
/// keeps the skb's sequence numbers (`TCP_SKB_CB(skb)->seq` and `->end_seq`).
#[inline(always)]
fn cut_resent_bytes(ctx: &SkBuffContext, flow: &mut Flow) -> Option<u64> {
    let cb = ctx.cb();
    let (seq, end_seq) = (cb[0], cb[1]);
    // A kernel that maps `cb` elsewhere (older ones map it past the start of `skb->cb`)
    // does not give the span of the skb's bytes (one more with a FIN): leave it whole.
    let span = end_seq.wrapping_sub(seq);
    if span != ctx.len() && span != ctx.len() + 1 {
        count(COUNTER_UNSEQUENCED_MESSAGES, 1);
        return Some(u64::from(ctx.len()));
    }
    let handled_to = flow.next_seq;
    if handled_to == 0 || (end_seq.wrapping_sub(handled_to) as i32) > 0 {
        // The first skb since the socket joined starts fresh: userspace read up to a
        // whole skb's end before the join (pair.rs, settle_client_queue).
        flow.next_seq = end_seq;
    }
    let overlap = handled_to.wrapping_sub(seq) as i32;
    if handled_to == 0 || overlap <= 0 {
        return Some(u64::from(ctx.len()));
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
    let len = u64::from(ctx.len());
    (len > 0).then_some(len)
}

#[inline(always)]
fn credit_of(cookie: u64, flow: &Flow) -> Credit {
    match CREDIT.get_ptr(cookie) {
        // SAFETY: a not-preallocated entry stays valid while this program runs; a copy
        // taken while userspace replaces it is the old value or the new one.
        Some(credit) => unsafe { *credit },
        None => Credit::first(flow.first_limit),
    }
}

/// Puts the cookie in the ring of credit requests; false if the ring is full.
#[inline(always)]
fn ask(cookie: u64) -> bool {
    match ASKS.output(cookie, 0) {
        Ok(()) => {
            count(COUNTER_ASKS, 1);
            true
        }
        Err(_) => {
            count(COUNTER_ASKS_REFUSED, 1);
            false
        }
    }
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
