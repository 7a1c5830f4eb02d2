//! What the probe (`src/main.rs`, built for the BPF target) and its userspace loader
//! (`proxy/probe.rs`) must agree on: map and program names, the counter slots, and the
//! layout of the flow-control records both sides read.
//!
//! This library target also exists so that cargo can build the package for the host: the
//! userspace crate depends on it, both to share these definitions and so that aya-build
//! finds the probe through cargo metadata.
#![no_std]

/// SockHash keyed by a socket's own cookie. The verdict program is attached to this map,
/// so a socket's received bytes go through the verdict once it is a member.
pub const SPLICED_MAP: &str = "SPLICED";

/// SockHash keyed by a socket's cookie whose value is that socket's *peer*: the verdict
/// redirects the bytes received on socket `c` to `PEER_OF[c]`. No programs are attached,
/// so being a member does not change how a socket receives.
pub const PEER_OF_MAP: &str = "PEER_OF";

/// Per-CPU array of `u64` counters, indexed by the `COUNTER_*` slots.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Hash from a source socket's cookie to its [`Flow`]. Userspace creates an entry, with
/// the socket's [`Flow::first_limit`], before the socket joins and deletes it at
/// teardown; in between only the verdict writes it.
pub const FLOW_MAP: &str = "FLOW";

/// Hash from a source socket's cookie to its [`Credit`]. Only userspace writes it; a
/// socket without an entry has the credit of its [`Flow::first_limit`].
pub const CREDIT_MAP: &str = "CREDIT";

/// Ring buffer of credit requests: each record is the `u64` cookie of a source socket
/// whose [`Flow`] reached its [`Credit::ask_at`] or started parking.
pub const ASKS_MAP: &str = "ASKS";

/// Bytes the ring of credit requests holds in the object (16 bytes a record): the least
/// the loader gives it, which sizes it to the maps' capacity (proxy/probe.rs).
pub const ASKS_BYTES: u32 = 1 << 18;

/// The `stream_verdict` program: redirect to the peer's egress within the credit.
pub const VERDICT_PROGRAM: &str = "splice_verdict";

/// Bytes handed to a peer's egress.
pub const COUNTER_REDIRECTED_BYTES: u32 = 0;
/// Messages (skbs) handed to a peer's egress.
pub const COUNTER_REDIRECTED_MESSAGES: u32 = 1;
/// Messages dropped because the socket had no peer in `PEER_OF`.
pub const COUNTER_REDIRECT_FAILURES: u32 = 2;
/// Bytes in those dropped messages.
pub const COUNTER_DROPPED_BYTES: u32 = 3;
/// Bytes parked in their own socket's receive queue because the direction had no credit
/// left (or was still parking), for userspace to move.
pub const COUNTER_PARKED_BYTES: u32 = 4;
/// Credit requests written to `ASKS`.
pub const COUNTER_ASKS: u32 = 5;
/// Credit requests the full ring refused; the verdict asks again on the next message.
pub const COUNTER_ASKS_REFUSED: u32 = 6;
/// Messages of spliced sockets without a `FLOW` record: redirected without a bound.
pub const COUNTER_UNTRACKED_MESSAGES: u32 = 7;
/// Bytes cut off the front of skbs because the socket had handled them already: a
/// retransmission that overlapped what had arrived before it (docs/kernel.md,
/// "Retransmissions in verdict-only mode").
pub const COUNTER_RESENT_BYTES_CUT: u32 = 8;
/// Bytes of such overlaps that could not be cut and went on a second time.
pub const COUNTER_RESENT_BYTES_PASSED: u32 = 9;
/// Messages whose sequence numbers the kernel did not give the verdict, so that an
/// overlap could not be seen.
pub const COUNTER_UNSEQUENCED_MESSAGES: u32 = 10;
/// Number of counter slots.
pub const COUNTER_SLOTS: u32 = 11;

/// Entries each SockHash holds unless the loader asks for another size: two per spliced
/// connection. `FLOW` and `CREDIT` hold as many.
pub const DEFAULT_MAP_CAPACITY: u32 = 1 << 18;

/// What the verdict did with one source socket's bytes since it joined the maps. Apart
/// from [`Flow::first_limit`], which userspace sets when it creates the record, only the
/// verdict writes it, one message at a time (the kernel runs a socket's verdict under its
/// lock), so userspace reads totals that only grow.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    /// Bytes redirected to the peer's egress, where the peer's kworker sends them.
    pub redirected: u64,
    /// Bytes parked in the socket's own receive queue, for userspace to read.
    pub parked: u64,
    /// The [`Credit::ask_at`] the verdict last asked at, so that it asks once for it.
    pub asked_at: u64,
    /// [`FLOWING`], [`PARKING`] or [`PARKING_ANNOUNCED`].
    pub state: u32,
    /// The TCP sequence number just past the last byte the verdict handled; 0 before
    /// the first (a retransmission that overlaps it is cut).
    pub next_seq: u32,
    /// The socket's credit limit until userspace writes a credit into `CREDIT` (the
    /// verdict asks for more at a quarter of it): set per socket at the join, because
    /// every socket's first credit is taken from a budget shared by all of them. Only
    /// the limit (8 bytes, where a whole [`Credit`] is 24): two records per spliced
    /// connection, and held connections are counted in their hundreds of thousands.
    pub first_limit: u64,
}

/// Where a first credit (a socket's [`Flow::first_limit`], with no entry in `CREDIT`)
/// has the verdict ask for more at the latest: it asks at a quarter of the limit, or
/// here if that comes first. 128 KiB is the receive buffer a spliced socket joins with:
/// the engine grows a source's window only when it hears of the source, so a first ask
/// a quarter of the default bound (4 MiB) away held a sender on a real round trip to
/// its first window for megabytes.
pub const FIRST_ASK_AT: u64 = 128 * 1024;

/// Bytes are redirected while the credit lasts.
pub const FLOWING: u32 = 0;
/// The credit ran out: every message parks until userspace has moved all parked bytes
/// (so that none overtakes another), and the verdict has yet to announce it.
pub const PARKING: u32 = 1;
/// As [`PARKING`], and a request is in the ring.
pub const PARKING_ANNOUNCED: u32 = 2;

/// What userspace lets the verdict do with one source socket's bytes. Only userspace
/// writes it; each field only grows, so a verdict that reads an old value (or, while
/// userspace writes, one old field and one new) errs on the side of parking.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Credit {
    /// The verdict redirects a message only if [`Flow::redirected`] stays within this.
    pub limit: u64,
    /// Once [`Flow::redirected`] reaches this, the verdict asks for more credit.
    pub ask_at: u64,
    /// Parked bytes userspace has read and written to the peer: when it equals
    /// [`Flow::parked`], a parking direction may flow again.
    pub unparked: u64,
}

impl Credit {
    /// The credit of a socket with no entry in `CREDIT`, whose [`Flow::first_limit`] is
    /// `first_limit`: the verdict applies it, and the engine, which must know what the
    /// verdict applied, computes it here too. It asks for more once a quarter is used,
    /// early enough that a direction whose reader keeps up gets more before it parks, or
    /// at [`FIRST_ASK_AT`] if that comes first.
    #[inline(always)]
    pub fn first(first_limit: u64) -> Credit {
        Credit {
            limit: first_limit,
            ask_at: (first_limit / 4).min(FIRST_ASK_AT),
            unparked: 0,
        }
    }
}
