//! The loaded eBPF probe: its verdict program attached to the `SPLICED` SockHash, and typed
//! handles on its maps. [`Probe`] owns the program (dropping it detaches it, and every
//! spliced connection then stops moving: docs/kernel.md, "The probe lives with the
//! process"); [`SpliceMaps`] are per-thread handles that carry out the order in which a
//! pair joins and leaves the maps, and read and grant each direction's flow-control credit;
//! [`Asks`] is the ring on which the verdict asks for more.

use std::{
    fmt, io,
    os::fd::{AsFd, BorrowedFd},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    programs::{ProgramError, SkSkb},
};
use proxy_probe::{
    ASKS_BYTES, ASKS_MAP, COUNTER_ASKS, COUNTER_ASKS_REFUSED, COUNTER_DROPPED_BYTES,
    COUNTER_PARKED_BYTES, COUNTER_REDIRECT_FAILURES, COUNTER_REDIRECTED_BYTES,
    COUNTER_REDIRECTED_MESSAGES, COUNTER_RESENT_BYTES_CUT, COUNTER_RESENT_BYTES_PASSED,
    COUNTER_UNSEQUENCED_MESSAGES, COUNTER_UNTRACKED_MESSAGES, COUNTERS_MAP, CREDIT_MAP, FLOW_MAP,
    PEER_OF_MAP, SPLICED_MAP, VERDICT_PROGRAM,
};
pub use proxy_probe::{Credit, FLOWING, Flow};

use crate::{
    budget::{Backlog, Budget},
    socket,
};

/// The object built from proxy-probe/ by build.rs (from source, or the checked prebuilt).
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-probe"));

/// Each variant's cause is its `source()`, not repeated in its message: print the chain
/// (anyhow's `{:#}`) to see both.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The kernel refused the object, or a map of it.
    #[error(
        "loading the probe object into the kernel failed (needs root, or CAP_BPF and CAP_NET_ADMIN; kernels before 5.11 also need RLIMIT_MEMLOCK to cover the maps)"
    )]
    Load(#[from] aya::EbpfError),
    /// The object lacks a program or map this build expects.
    #[error("the probe object has no {kind} named {name}: it was built from other sources")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name in the object.
        name: &'static str,
    },
    /// Loading or attaching the verdict program failed.
    #[error("program {name}")]
    Program {
        /// Its name in the object.
        name: &'static str,
        /// Why it failed.
        #[source]
        source: ProgramError,
    },
    /// Reading or writing a map failed.
    #[error("map {name}")]
    Map {
        /// Its name in the object.
        name: &'static str,
        /// Why it failed.
        #[source]
        source: MapError,
    },
    /// Duplicating a map's descriptor for a worker failed.
    #[error("duplicating the descriptor of map {name}")]
    Duplicate {
        /// Its name in the object.
        name: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Sums over all CPUs of the probe's counters, since it was loaded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Bytes the verdict redirected to a peer socket.
    pub redirected_bytes: u64,
    /// Messages (skbs) it redirected.
    pub redirected_messages: u64,
    /// Messages it dropped because their socket had no peer in the maps.
    pub redirect_failures: u64,
    /// The bytes of those messages.
    pub dropped_bytes: u64,
    /// Bytes the verdict parked in their own socket for want of credit.
    pub parked_bytes: u64,
    /// Credit requests the verdict put in the ring.
    pub asks: u64,
    /// Credit requests a full ring refused (the verdict asks again).
    pub asks_refused: u64,
    /// Messages of spliced sockets without a `FLOW` record, redirected without a bound.
    pub untracked_messages: u64,
    /// Retransmitted bytes the verdict cut because the socket had handled them already.
    pub resent_bytes_cut: u64,
    /// Retransmitted bytes it could not cut, which reached the peer a second time.
    pub resent_bytes_passed: u64,
    /// Messages the kernel gave the verdict without sequence numbers, unchecked for
    /// retransmitted bytes.
    pub unsequenced_messages: u64,
}

/// The running kernel's release, e.g. "6.1.0-57-amd64"; `None` if /proc does not say.
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|release| release.trim().to_owned())
}

/// Whether [`Backlog`] is tested to bound a spliced direction on kernel `release`: from
/// 6.1 on, the oldest kernel on which tests/backpressure.rs passes (README,
/// "Requirements"; docs/flow-control.md says what 5.10 does instead). The binary's
/// `--mode auto` copies every connection where this is false. A release that does not
/// start with major.minor is taken as new: every kernel this project was run on starts
/// that way.
pub fn bound_is_tested_on(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (6, 1),
        _ => true,
    }
}

/// The verdict program, loaded and attached to `SPLICED`, and its maps. Dropping it
/// detaches the program: spliced sockets stop moving.
pub struct Probe {
    /// Owns the program and its attachment to `SPLICED`.
    _ebpf: Ebpf,
    spliced: SockHash<MapData, u64>,
    peer_of: SockHash<MapData, u64>,
    flow: HashMap<MapData, u64, FlowRecord>,
    credit: HashMap<MapData, u64, CreditRecord>,
    asks: Mutex<Option<RingBuf<MapData>>>,
    /// Shared with every [`SpliceMaps`], which read one counter.
    counters: Arc<PerCpuArray<MapData, u64>>,
    /// The bounds on what the kernel may hold and the account of it, shared with every
    /// [`SpliceMaps`] so that a reload reaches the workers' grants.
    budget: Arc<Budget>,
}

/// Bytes of the ring of credit requests for maps that hold `capacity` sockets: room for
/// two requests from every socket at once. A source socket asks once per credit the
/// engine writes (`Flow::asked_at`) and once per park, and the engine writes a credit
/// or ends a park almost always in answer to an ask it has taken out of the ring, so a
/// socket seldom has more than two waiting. At the object's own 256 KiB (16,384 asks),
/// asks beyond that in one burst were refused and left to the once-a-second sweep for
/// lost parks (splice/mod.rs), which stays for what is left. A record takes 16 bytes
/// (header and cookie), and the kernel wants a power of two of pages: 8 MiB for the
/// default capacity.
fn asks_ring_bytes(capacity: u32) -> u32 {
    let needed = u64::from(capacity) * 2 * 16;
    u32::try_from(needed.next_power_of_two())
        .unwrap_or(1 << 31)
        .max(ASKS_BYTES)
}

impl Probe {
    /// Loads the verdict program and attaches it to `SPLICED`. `capacity` is the number
    /// of sockets each SockHash can hold: two per spliced connection. `backlog` bounds
    /// every spliced direction and all of them together (see [`Backlog`]).
    ///
    /// The verdict runs alone, without the stream parser (kernel 5.13 or later): a
    /// direction whose reader falls behind parks its bytes in its own receive queue, and
    /// behind a strparser those bytes did not reliably reach it (README, "Flow control
    /// of the spliced path").
    pub fn load(capacity: u32, backlog: Backlog) -> Result<Probe, ProbeError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(ASKS_MAP, asks_ring_bytes(capacity))
            .map_max_entries(SPLICED_MAP, capacity)
            .map_max_entries(PEER_OF_MAP, capacity)
            .map_max_entries(FLOW_MAP, capacity)
            .map_max_entries(CREDIT_MAP, capacity)
            .load(PROBE_OBJECT)?;
        let spliced = sock_hash(take_map(&mut ebpf, SPLICED_MAP)?, SPLICED_MAP)?;
        let peer_of = sock_hash(take_map(&mut ebpf, PEER_OF_MAP)?, PEER_OF_MAP)?;
        let flow = typed(take_map(&mut ebpf, FLOW_MAP)?, FLOW_MAP)?;
        let credit = typed(take_map(&mut ebpf, CREDIT_MAP)?, CREDIT_MAP)?;
        let asks = typed(take_map(&mut ebpf, ASKS_MAP)?, ASKS_MAP)?;
        let counters = typed(take_map(&mut ebpf, COUNTERS_MAP)?, COUNTERS_MAP)?;

        let name = VERDICT_PROGRAM;
        let program: &mut SkSkb = ebpf
            .program_mut(name)
            .ok_or(ProbeError::Missing {
                kind: "program",
                name,
            })?
            .try_into()
            .map_err(|source| ProbeError::Program { name, source })?;
        program
            .load()
            .and_then(|()| program.attach(spliced.fd()))
            .map_err(|source| ProbeError::Program { name, source })?;

        let probe = Probe {
            _ebpf: ebpf,
            spliced,
            peer_of,
            flow,
            credit,
            asks: Mutex::new(Some(asks)),
            counters: Arc::new(counters),
            budget: Arc::new(Budget::new(backlog)),
        };
        Ok(probe)
    }

    /// The bounds for pairs that join from now on and for every grant (a reload changes
    /// them this way).
    pub fn set_backlog(&self, backlog: Backlog) {
        self.budget.set(backlog);
    }

    /// The account of what spliced directions may hold, for the metrics.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The ring of credit requests. It has one reader: the first call takes it, later
    /// calls get `None`.
    pub fn take_asks(&self) -> Option<Asks> {
        self.asks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .map(|ring| Asks { ring })
    }

    /// Handles on the maps for one thread: inserts need `&mut`, and separate handles
    /// (over duplicated descriptors of the same maps) let threads insert without a lock.
    pub fn maps(&self) -> Result<SpliceMaps, ProbeError> {
        Ok(SpliceMaps {
            spliced: duplicate(self.spliced.fd().as_fd(), SPLICED_MAP)?,
            peer_of: duplicate(self.peer_of.fd().as_fd(), PEER_OF_MAP)?,
            flow: duplicate(map_data(&self.flow).fd().as_fd(), FLOW_MAP)?,
            credit: duplicate(map_data(&self.credit).fd().as_fd(), CREDIT_MAP)?,
            counters: Arc::clone(&self.counters),
            budget: Arc::clone(&self.budget),
        })
    }

    /// The counters summed over every CPU, read now.
    pub fn counters(&self) -> Result<Counters, ProbeError> {
        let sum = |slot: u32| -> Result<u64, ProbeError> {
            let per_cpu = self
                .counters
                .get(&slot, 0)
                .map_err(|source| ProbeError::Map {
                    name: COUNTERS_MAP,
                    source,
                })?;
            Ok(per_cpu.iter().sum())
        };
        Ok(Counters {
            redirected_bytes: sum(COUNTER_REDIRECTED_BYTES)?,
            redirected_messages: sum(COUNTER_REDIRECTED_MESSAGES)?,
            redirect_failures: sum(COUNTER_REDIRECT_FAILURES)?,
            dropped_bytes: sum(COUNTER_DROPPED_BYTES)?,
            parked_bytes: sum(COUNTER_PARKED_BYTES)?,
            asks: sum(COUNTER_ASKS)?,
            asks_refused: sum(COUNTER_ASKS_REFUSED)?,
            untracked_messages: sum(COUNTER_UNTRACKED_MESSAGES)?,
            resent_bytes_cut: sum(COUNTER_RESENT_BYTES_CUT)?,
            resent_bytes_passed: sum(COUNTER_RESENT_BYTES_PASSED)?,
            unsequenced_messages: sum(COUNTER_UNSEQUENCED_MESSAGES)?,
        })
    }

    /// Sockets currently in `SPLICED` and in `PEER_OF`: both are 0 when no connection is
    /// spliced, which is how tests prove that teardown left nothing behind.
    pub fn entries(&self) -> (usize, usize) {
        (self.spliced.keys().count(), self.peer_of.keys().count())
    }

    /// Entries in `FLOW` and in `CREDIT`: 0 when no connection is spliced.
    pub fn flow_entries(&self) -> (usize, usize) {
        (self.flow.keys().count(), self.credit.keys().count())
    }
}

/// The records the probe shares with userspace, as aya copies them: `Flow` and `Credit`
/// are plain `repr(C)` integers, valid for any bytes.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct FlowRecord(Flow);
// SAFETY: a repr(C) struct of integers with explicit padding: every bit pattern is valid.
unsafe impl Pod for FlowRecord {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct CreditRecord(Credit);
// SAFETY: a repr(C) struct of three u64: every bit pattern is valid.
unsafe impl Pod for CreditRecord {}

/// The ring on which the verdict asks for credit: each record is the cookie of a source
/// socket that used part of its credit or started parking. Wait for it to become readable
/// (its fd polls like a socket), then [`drain`](Asks::drain) it.
pub struct Asks {
    ring: RingBuf<MapData>,
}

impl Asks {
    /// The ring's descriptor, readable when a request waits.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }

    /// Calls `ask` with each cookie in the ring, oldest first, until it is empty.
    pub fn drain(&mut self, mut ask: impl FnMut(Cookie)) {
        while let Some(record) = self.ring.next() {
            if let Ok(bytes) = <[u8; 8]>::try_from(&record[..]) {
                ask(Cookie(u64::from_ne_bytes(bytes)));
            }
        }
    }
}

/// Why a pair could not be put into the maps. In every case the maps hold nothing of the
/// pair afterwards and no byte has been lost, so the caller can copy in userspace instead.
#[derive(Debug, thiserror::Error)]
#[error("the kernel refused {refused}")]
pub struct JoinError {
    /// What the kernel refused.
    pub refused: Refused,
    /// The map update's error.
    #[source]
    pub source: MapError,
}

/// What [`JoinError`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The pair's `FLOW` records, created before either socket joins (the map is full,
    /// or the kernel is out of memory).
    FlowRecords,
    /// One socket's `PEER_OF` or `SPLICED` entry.
    Socket(Side),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::FlowRecords => f.write_str("the pair's flow records"),
            Refused::Socket(side) => write!(f, "to splice the {side} socket"),
        }
    }
}

/// One of the two sockets of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The socket accepted from the client.
    Client,
    /// The socket connected to the backend.
    Upstream,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// Which directions the kernel moves after [`SpliceMaps::join`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinOutcome {
    /// Both: the pair is spliced.
    Both,
    /// Only upstream-to-client; the client's remaining bytes must be copied.
    UpstreamOnly,
}

/// A socket's cookie (`SO_COOKIE`): the kernel's name for a socket while it lives, never
/// given to another, and the key every map of the probe knows a socket by. Typed, so that
/// a byte count or a slot index cannot be passed where a socket is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cookie(u64);

impl Cookie {
    /// What the sockets of a pair that is only ever copied carry: the kernel numbers
    /// cookies from 1, so no map holds a socket under 0.
    pub(crate) const UNMAPPED: Cookie = Cookie(0);

    /// `fd`'s cookie.
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<Cookie> {
        Ok(Cookie(socket::cookie(fd)?))
    }

    /// A cookie for tests that never reach the maps.
    #[cfg(test)]
    pub(crate) const fn fake(raw: u64) -> Cookie {
        Cookie(raw)
    }
}

/// One socket as the maps know it.
#[derive(Clone, Copy)]
pub struct MapSocket<'a> {
    /// The socket.
    pub fd: BorrowedFd<'a>,
    /// Its key in the maps.
    pub cookie: Cookie,
}

impl<'a> MapSocket<'a> {
    /// `fd` under its socket cookie, the key the maps know it by.
    pub fn new(fd: BorrowedFd<'a>) -> io::Result<MapSocket<'a>> {
        Ok(MapSocket {
            fd,
            cookie: Cookie::of(fd)?,
        })
    }

    /// Makes the kernel run the verdict over bytes that arrived before the socket joined
    /// the maps (docs/kernel.md, "Bytes queued before the insert"): call it right after
    /// [`SpliceMaps::join`] or [`SpliceMaps::loop_back`].
    pub fn kick_receive_queue(&self) -> io::Result<()> {
        Ok(socket::kick_receive_queue(self.fd)?)
    }

    /// The kernel's byte counts for this socket, from which a program that drives the maps
    /// itself can tell when the redirect has caught up with a FIN (docs/kernel.md, "The
    /// redirect is asynchronous").
    pub fn byte_counts(&self) -> io::Result<ByteCounts> {
        // Written first: a byte received between the two reads is in `received` only, so
        // the redirect can look behind but never ahead of what it owes. Settled, so
        // that `written` can serve as a base (socket.rs).
        let written = socket::settled_bytes_written(self.fd)?;
        let received = socket::tcp_info(self.fd)?.bytes_received;
        Ok(ByteCounts { received, written })
    }
}

/// See [`MapSocket::byte_counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteCounts {
    /// Bytes received in sequence, counting a received FIN as one.
    pub received: u64,
    /// Bytes ever written into the send queue (acknowledged, in flight or not yet sent),
    /// by this process or by the kernel's redirect; compare differences, not totals.
    pub written: u64,
}

/// One thread's handles on `SPLICED`, `PEER_OF`, `FLOW` and `CREDIT`.
pub struct SpliceMaps {
    spliced: SockHash<MapData, u64>,
    peer_of: SockHash<MapData, u64>,
    flow: HashMap<MapData, u64, FlowRecord>,
    credit: HashMap<MapData, u64, CreditRecord>,
    counters: Arc<PerCpuArray<MapData, u64>>,
    budget: Arc<Budget>,
}

impl SpliceMaps {
    /// Credit requests the probe's ring refused so far (all CPUs): each one a direction
    /// that may have parked without its ask reaching the engine.
    pub fn asks_refused(&self) -> Result<u64, MapError> {
        Ok(self.counters.get(&COUNTER_ASKS_REFUSED, 0)?.iter().sum())
    }

    /// The bounds on what the kernel may hold, and the account the engine's grants are
    /// promised from.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Splices `client` and `upstream`. Both become redirect targets (`PEER_OF`) before
    /// either's ingress goes through the verdict (`SPLICED`), so no byte is ever
    /// redirected to an empty slot. The caller must have written the first message to the
    /// upstream completely (docs/kernel.md, "Insert the upstream first") and must kick the
    /// receive queues afterwards. Each socket's bytes may be redirected up to `first_limit`
    /// (asking for more at a quarter of it) until the caller [`grant`](Self::grant)s a
    /// credit.
    ///
    /// An error leaves nothing in the maps. The kernel only admits ESTABLISHED sockets,
    /// so a client whose FIN lands between the upstream's insert and its own is refused
    /// after the upstream's bytes may already be on their way to it: that pair stays
    /// half-spliced ([`JoinOutcome::UpstreamOnly`]), because taking the client out of
    /// `PEER_OF` would discard what the kernel has queued for it.
    pub fn join(
        &mut self,
        client: MapSocket<'_>,
        upstream: MapSocket<'_>,
        first_limit: u64,
    ) -> Result<JoinOutcome, JoinError> {
        let refused = |refused| move |source| JoinError { refused, source };
        self.track(&[client.cookie, upstream.cookie], first_limit)
            .map_err(refused(Refused::FlowRecords))?;
        if let Err(source) = self.peer_of.insert(client.cookie.0, upstream.fd, 0) {
            self.forget_flows(&[client.cookie, upstream.cookie]);
            return Err(refused(Refused::Socket(Side::Upstream))(source));
        }
        if let Err(source) = self.peer_of.insert(upstream.cookie.0, client.fd, 0) {
            self.forget(&[client.cookie, upstream.cookie]);
            return Err(refused(Refused::Socket(Side::Client))(source));
        }
        if let Err(source) = self.spliced.insert(upstream.cookie.0, upstream.fd, 0) {
            self.forget(&[client.cookie, upstream.cookie]);
            return Err(refused(Refused::Socket(Side::Upstream))(source));
        }
        if let Err(source) = self.spliced.insert(client.cookie.0, client.fd, 0) {
            tracing::debug!("client refused after the upstream was spliced: {source}");
            return Ok(JoinOutcome::UpstreamOnly);
        }
        Ok(JoinOutcome::Both)
    }

    /// Makes `socket` its own peer: every byte it receives is sent back out of it by the
    /// kernel, an echo server without userspace reads (examples/echo.rs). `PEER_OF`
    /// before `SPLICED`, as in [`join`](SpliceMaps::join); the caller must kick the
    /// receive queue afterwards. An error leaves nothing in the maps; `leave(cookie,
    /// cookie)` takes the socket out again. Its bytes may be redirected up to
    /// `first_limit` until the caller [`grant`](Self::grant)s a credit.
    pub fn loop_back(&mut self, socket: MapSocket<'_>, first_limit: u64) -> Result<(), JoinError> {
        let refused = |refused| move |source| JoinError { refused, source };
        self.track(&[socket.cookie], first_limit)
            .map_err(refused(Refused::FlowRecords))?;
        if let Err(source) = self.peer_of.insert(socket.cookie.0, socket.fd, 0) {
            self.forget_flows(&[socket.cookie]);
            return Err(refused(Refused::Socket(Side::Client))(source));
        }
        if let Err(source) = self.spliced.insert(socket.cookie.0, socket.fd, 0) {
            self.forget(&[socket.cookie]);
            return Err(refused(Refused::Socket(Side::Client))(source));
        }
        Ok(())
    }

    /// Removes a pair from the maps, flow records included, for a pair whose sockets stay
    /// open (set up halfway, then copied). Closing a socket removes it from the two
    /// SockHashes by itself, not from `FLOW` and `CREDIT` ([`forget_flows`](Self::forget_flows)).
    pub fn leave(&mut self, client: Cookie, upstream: Cookie) {
        for cookie in [client, upstream] {
            let _ = self.spliced.remove(&cookie.0);
        }
        self.forget(&[client, upstream]);
    }

    /// Creates `cookies`' flow records before their sockets join `SPLICED`: the verdict
    /// only updates records, so one that runs after the pair has ended (and its records
    /// are gone) cannot leave a new one behind. All or none.
    fn track(&mut self, cookies: &[Cookie], first_limit: u64) -> Result<(), MapError> {
        let record = FlowRecord(Flow {
            first_limit,
            ..Flow::default()
        });
        for (i, cookie) in cookies.iter().enumerate() {
            if let Err(e) = self.flow.insert(cookie.0, record, 0) {
                self.forget_flows(&cookies[..i]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Takes `cookies` out of `PEER_OF` and deletes their flow records; removing what is
    /// not there is harmless.
    fn forget(&mut self, cookies: &[Cookie]) {
        for cookie in cookies {
            let _ = self.peer_of.remove(&cookie.0);
        }
        self.forget_flows(cookies);
    }

    /// What the verdict has done with `cookie`'s bytes; all zero before its first message.
    pub fn flow(&self, cookie: Cookie) -> Result<Flow, MapError> {
        match self.flow.get(&cookie.0, 0) {
            Ok(FlowRecord(flow)) => Ok(flow),
            Err(MapError::KeyNotFound) => Ok(Flow::default()),
            Err(e) => Err(e),
        }
    }

    /// Replaces `cookie`'s credit; each field must be at least what it was.
    pub fn grant(&mut self, cookie: Cookie, credit: Credit) -> Result<(), MapError> {
        self.credit.insert(cookie.0, CreditRecord(credit), 0)
    }

    /// Removes `cookies`' flow records. Call after their sockets are closed: a socket
    /// still in `SPLICED` would get a new record with its next message. A direction's
    /// credit record exists only once [`grant`](Self::grant) wrote one: remove it with
    /// [`forget_credit`](Self::forget_credit).
    pub fn forget_flows(&mut self, cookies: &[Cookie]) {
        for cookie in cookies {
            let _ = self.flow.remove(&cookie.0);
        }
    }

    /// Removes the credit [`grant`](Self::grant) wrote for `cookie`.
    pub fn forget_credit(&mut self, cookie: Cookie) {
        let _ = self.credit.remove(&cookie.0);
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, ProbeError> {
    ebpf.take_map(name)
        .ok_or(ProbeError::Missing { kind: "map", name })
}

fn sock_hash(map: Map, name: &'static str) -> Result<SockHash<MapData, u64>, ProbeError> {
    SockHash::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

fn typed<T: TryFrom<Map, Error = MapError>>(map: Map, name: &'static str) -> Result<T, ProbeError> {
    T::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

fn map_data<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> &MapData {
    IterableMap::map(map)
}

/// A second handle on a map, for a thread of its own.
fn duplicate<T: TryFrom<Map, Error = MapError>>(
    fd: BorrowedFd<'_>,
    name: &'static str,
) -> Result<T, ProbeError> {
    let fd = fd
        .try_clone_to_owned()
        .map_err(|source| ProbeError::Duplicate { name, source })?;
    let data = MapData::from_fd(fd).map_err(|source| ProbeError::Map { name, source })?;
    let map = match name {
        SPLICED_MAP | PEER_OF_MAP => Map::SockHash(data),
        _ => Map::HashMap(data),
    };
    typed(map, name)
}

#[cfg(test)]
mod tests {
    use super::{ASKS_BYTES, asks_ring_bytes, bound_is_tested_on};

    #[test]
    fn the_ring_of_asks_holds_two_per_socket_in_a_power_of_two() {
        assert_eq!(asks_ring_bytes(proxy_probe::DEFAULT_MAP_CAPACITY), 8 << 20);
        assert_eq!(asks_ring_bytes(100_000), 4 << 20);
        assert_eq!(asks_ring_bytes(1000), ASKS_BYTES);
        assert_eq!(asks_ring_bytes(u32::MAX), 1 << 31);
    }

    #[test]
    fn the_bound_is_tested_from_6_1() {
        assert!(!bound_is_tested_on("5.10.0-32-amd64"));
        assert!(!bound_is_tested_on("5.15.0-91-generic"));
        assert!(!bound_is_tested_on("6.0.12"));
        assert!(bound_is_tested_on("6.1.0-57-amd64"));
        assert!(bound_is_tested_on("6.12.118+deb12-amd64"));
        assert!(bound_is_tested_on("6.18.44"));
        assert!(bound_is_tested_on("7.0-rc1"));
        assert!(bound_is_tested_on("unknown"));
    }
}
