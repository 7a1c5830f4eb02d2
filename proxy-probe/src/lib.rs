//! What the probe (`src/main.rs`, built for the BPF target) and its userspace loader
//! (`proxy/probe.rs`) must agree on: map and program names, and the counter slots.
//!
//! This library target also exists so that cargo can build the package for the host: the
//! userspace crate depends on it, both to share these constants and so that aya-build
//! finds the probe through cargo metadata.
#![no_std]

/// SockHash keyed by a socket's own cookie. The stream verdict is attached to this map,
/// so a socket's received bytes go through it once the socket is a member.
pub const SPLICED_MAP: &str = "SPLICED";

/// SockHash keyed by a socket's cookie whose value is that socket's *peer*: the verdict
/// redirects the bytes received on socket `c` to `PEER_OF[c]`. No programs are attached,
/// so being a member does not change how a socket receives.
pub const PEER_OF_MAP: &str = "PEER_OF";

/// Per-CPU array of `u64` counters, indexed by the `COUNTER_*` slots.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Hash from a socket's cookie to the TCP sequence number just past the last byte the
/// verdict handled for it, with [`SEQ_KNOWN`] set once it has handled one (0 before).
/// Userspace creates a socket's entry when the pair joins the maps and deletes it when
/// the pair ends; the verdict only updates entries, so one that runs after the end (the
/// socket can outlive the engine's descriptor by an asynchronous close) cannot leave
/// one behind.
pub const NEXT_SEQ_MAP: &str = "NEXT_SEQ";

/// The `stream_verdict` program, attached with no stream parser in front of it: cut what
/// the socket has already handled off the front of an skb, then redirect the rest to the
/// peer's egress.
pub const VERDICT_PROGRAM: &str = "splice_verdict";

/// Bytes handed to a peer's egress.
pub const COUNTER_REDIRECTED_BYTES: u32 = 0;
/// Messages (skbs) handed to a peer's egress.
pub const COUNTER_REDIRECTED_MESSAGES: u32 = 1;
/// Messages dropped because the socket had no peer in `PEER_OF`.
pub const COUNTER_REDIRECT_FAILURES: u32 = 2;
/// Bytes in those dropped messages.
pub const COUNTER_DROPPED_BYTES: u32 = 3;
/// Bytes cut off the front of skbs because the socket had handled them already: a
/// retransmission that overlapped what had arrived before it.
pub const COUNTER_RESENT_BYTES_CUT: u32 = 4;
/// Bytes of such overlaps that could not be cut and went to the peer a second time.
pub const COUNTER_RESENT_BYTES_PASSED: u32 = 5;
/// Skbs the kernel gave the verdict without their sequence numbers, so that an overlap
/// with what came before could not be seen.
pub const COUNTER_UNSEQUENCED_MESSAGES: u32 = 6;
/// Number of counter slots.
pub const COUNTER_SLOTS: u32 = 7;

/// Set in a `NEXT_SEQ` value once the verdict has handled a byte of the socket; the low
/// 32 bits are then the sequence number just past it.
pub const SEQ_KNOWN: u64 = 1 << 32;

/// Entries each SockHash holds unless the loader asks for another size: two per spliced
/// connection.
pub const DEFAULT_MAP_CAPACITY: u32 = 1 << 18;
