//! The loaded eBPF probe: its stream verdict attached to the `SPLICED` SockHash, and typed
//! handles on its maps. [`Probe`] owns the program (dropping it detaches it, and every
//! spliced connection then stops moving: KERNEL-NOTES pitfall 8); [`SpliceMaps`] are
//! per-thread handles that carry out the order in which a pair joins and leaves the maps.

use std::{
    fmt, io,
    os::fd::{AsFd, BorrowedFd},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, SockHash},
    programs::{ProgramError, SkSkb},
};
use proxy_probe::{
    COUNTER_DROPPED_BYTES, COUNTER_REDIRECT_FAILURES, COUNTER_REDIRECTED_BYTES,
    COUNTER_REDIRECTED_MESSAGES, COUNTER_RESENT_BYTES_CUT, COUNTER_RESENT_BYTES_PASSED,
    COUNTER_UNSEQUENCED_MESSAGES, COUNTERS_MAP, NEXT_SEQ_MAP, PEER_OF_MAP, SPLICED_MAP,
    VERDICT_PROGRAM,
};

use crate::socket;

/// The object built from proxy-probe/ by build.rs (from source, or the checked prebuilt).
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-probe"));

/// Each variant's cause is its `source()`, not repeated in its message: print the chain
/// (anyhow's `{:#}`) to see both.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "loading the probe object into the kernel failed (needs root, or CAP_BPF and CAP_NET_ADMIN; kernels before 5.11 also need RLIMIT_MEMLOCK to cover the maps)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("the probe object has no {kind} named {name}: it was built from other sources")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("duplicating the descriptor of map {name}")]
    Duplicate {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Sums over all CPUs of the probe's counters, since it was loaded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub redirected_bytes: u64,
    pub redirected_messages: u64,
    pub redirect_failures: u64,
    pub dropped_bytes: u64,
    /// Retransmitted bytes the verdict cut because the socket had handled them already.
    pub resent_bytes_cut: u64,
    /// Retransmitted bytes it could not cut, which reached the peer a second time.
    pub resent_bytes_passed: u64,
    /// Skbs the kernel gave the verdict without sequence numbers, unchecked for
    /// retransmitted bytes.
    pub unsequenced_messages: u64,
}

pub struct Probe {
    /// Owns the program and its attachment to `SPLICED`.
    _ebpf: Ebpf,
    spliced: SockHash<MapData, u64>,
    peer_of: SockHash<MapData, u64>,
    next_seq: HashMap<MapData, u64, u64>,
    counters: PerCpuArray<MapData, u64>,
}

impl Probe {
    /// Loads the stream verdict and attaches it to `SPLICED`, with no stream parser in
    /// front of it (docs/kernel.md, "Why there is no stream-parser mode"). `capacity` is
    /// the number of sockets each SockHash can hold: two per spliced connection.
    pub fn load(capacity: u32) -> Result<Probe, ProbeError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(SPLICED_MAP, capacity)
            .map_max_entries(PEER_OF_MAP, capacity)
            .map_max_entries(NEXT_SEQ_MAP, capacity)
            .load(PROBE_OBJECT)?;
        let spliced = sock_hash(take_map(&mut ebpf, SPLICED_MAP)?, SPLICED_MAP)?;
        let peer_of = sock_hash(take_map(&mut ebpf, PEER_OF_MAP)?, PEER_OF_MAP)?;
        let next_seq = next_seq(take_map(&mut ebpf, NEXT_SEQ_MAP)?)?;
        let counters =
            PerCpuArray::try_from(take_map(&mut ebpf, COUNTERS_MAP)?).map_err(|source| {
                ProbeError::Map {
                    name: COUNTERS_MAP,
                    source,
                }
            })?;

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

        Ok(Probe {
            _ebpf: ebpf,
            spliced,
            peer_of,
            next_seq,
            counters,
        })
    }

    /// Handles on the maps for one thread: inserts need `&mut`, and separate handles
    /// (over duplicated descriptors of the same maps) let threads insert without a lock.
    pub fn maps(&self) -> Result<SpliceMaps, ProbeError> {
        Ok(SpliceMaps {
            spliced: duplicate_sock_hash(&self.spliced, SPLICED_MAP)?,
            peer_of: duplicate_sock_hash(&self.peer_of, PEER_OF_MAP)?,
            next_seq: next_seq(Map::HashMap(duplicate(
                self.next_seq.map().fd().as_fd(),
                NEXT_SEQ_MAP,
            )?))?,
        })
    }

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

    /// Sockets whose sequence the verdict tracks (`NEXT_SEQ`): 0 once every pair that
    /// joined the maps has ended.
    pub fn tracked_sequences(&self) -> usize {
        self.next_seq.keys().count()
    }
}

/// Why a pair could not be put into the maps. In every case the maps hold nothing of the
/// pair afterwards and no byte has been lost, so the caller can copy in userspace instead.
#[derive(Debug, thiserror::Error)]
#[error("the kernel refused to splice the {side} socket")]
pub struct JoinError {
    pub side: Side,
    #[source]
    pub source: MapError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
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

/// One socket as the maps know it.
#[derive(Clone, Copy)]
pub struct MapSocket<'a> {
    pub fd: BorrowedFd<'a>,
    pub cookie: u64,
}

impl<'a> MapSocket<'a> {
    /// `fd` under its socket cookie, the key the maps know it by.
    pub fn new(fd: BorrowedFd<'a>) -> io::Result<MapSocket<'a>> {
        Ok(MapSocket {
            fd,
            cookie: socket::cookie(fd)?,
        })
    }

    /// Makes the kernel run the verdict over bytes that arrived before the socket joined
    /// the maps (KERNEL-NOTES pitfall 1): call it right after [`SpliceMaps::join`] or
    /// [`SpliceMaps::loop_back`].
    pub fn kick_receive_queue(&self) -> io::Result<()> {
        socket::kick_receive_queue(self.fd)
    }

    /// The kernel's byte counts for this socket, from which a program that drives the
    /// maps itself can tell when the redirect has caught up with a FIN (pitfall 2).
    pub fn byte_counts(&self) -> io::Result<ByteCounts> {
        // Written first: a byte received between the two reads is in `received` only, so
        // the redirect can look behind but never ahead of what it owes.
        let written = socket::bytes_written(self.fd)?;
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

/// One thread's handles on `SPLICED` and `PEER_OF`.
pub struct SpliceMaps {
    spliced: SockHash<MapData, u64>,
    peer_of: SockHash<MapData, u64>,
    next_seq: HashMap<MapData, u64, u64>,
}

impl SpliceMaps {
    /// Splices `client` and `upstream`. Both become redirect targets (`PEER_OF`) before
    /// either's ingress goes through the verdict (`SPLICED`), so no byte is ever
    /// redirected to an empty slot. The caller must have written the first message to the
    /// upstream completely (pitfall 7) and must kick the receive queues afterwards.
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
    ) -> Result<JoinOutcome, JoinError> {
        let refused = |side| move |source| JoinError { side, source };
        self.peer_of
            .insert(client.cookie, upstream.fd, 0)
            .map_err(refused(Side::Upstream))?;
        if let Err(source) = self.peer_of.insert(upstream.cookie, client.fd, 0) {
            self.forget(&[client.cookie]);
            return Err(JoinError {
                side: Side::Client,
                source,
            });
        }
        self.track_sequences(&[client.cookie, upstream.cookie]);
        if let Err(source) = self.spliced.insert(upstream.cookie, upstream.fd, 0) {
            self.forget(&[client.cookie, upstream.cookie]);
            self.ended(client.cookie, upstream.cookie);
            return Err(JoinError {
                side: Side::Upstream,
                source,
            });
        }
        if let Err(source) = self.spliced.insert(client.cookie, client.fd, 0) {
            tracing::debug!("client refused after the upstream was spliced: {source}");
            return Ok(JoinOutcome::UpstreamOnly);
        }
        Ok(JoinOutcome::Both)
    }

    /// Makes `socket` its own peer: every byte it receives is sent back out of it by the
    /// kernel, an echo server without userspace reads (examples/echo.rs). `PEER_OF`
    /// before `SPLICED`, as in [`join`](SpliceMaps::join); the caller must kick the
    /// receive queue afterwards. An error leaves nothing in the maps; `leave(cookie,
    /// cookie)` takes the socket out again.
    pub fn loop_back(&mut self, socket: MapSocket<'_>) -> Result<(), JoinError> {
        let refused = |source| JoinError {
            side: Side::Client,
            source,
        };
        self.peer_of
            .insert(socket.cookie, socket.fd, 0)
            .map_err(refused)?;
        self.track_sequences(&[socket.cookie]);
        if let Err(source) = self.spliced.insert(socket.cookie, socket.fd, 0) {
            self.forget(&[socket.cookie]);
            self.ended(socket.cookie, socket.cookie);
            return Err(refused(source));
        }
        Ok(())
    }

    /// Removes a pair from both maps, for a pair whose sockets stay open (set up
    /// halfway, then copied). Closing a socket removes it from the maps by itself.
    pub fn leave(&mut self, client: u64, upstream: u64) {
        for cookie in [client, upstream] {
            let _ = self.spliced.remove(&cookie);
        }
        self.forget(&[client, upstream]);
        self.ended(client, upstream);
    }

    /// Gives each socket an entry in `NEXT_SEQ` before it joins `SPLICED`: the verdict
    /// only updates entries, so that one running after the pair ended (its socket can
    /// outlive the engine's descriptor) cannot create one nobody deletes. A socket
    /// without an entry (the map full, which its capacity, that of the SockHashes, makes
    /// unlikely) is spliced without the cut of retransmitted bytes.
    fn track_sequences(&mut self, cookies: &[u64]) {
        for &cookie in cookies {
            if let Err(e) = self.next_seq.insert(cookie, 0, 0) {
                tracing::warn!(
                    "NEXT_SEQ refused a socket ({e}): retransmitted bytes on it are not cut"
                );
            }
        }
    }

    /// Forgets the sequence the verdict tracked for a pair's sockets, once they are
    /// closed or out of `SPLICED`: unlike the SockHashes, nothing removes it by itself.
    pub fn ended(&mut self, client: u64, upstream: u64) {
        for cookie in [client, upstream] {
            let _ = self.next_seq.remove(&cookie);
        }
    }

    fn forget(&mut self, cookies: &[u64]) {
        for cookie in cookies {
            let _ = self.peer_of.remove(cookie);
        }
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, ProbeError> {
    ebpf.take_map(name)
        .ok_or(ProbeError::Missing { kind: "map", name })
}

fn sock_hash(map: Map, name: &'static str) -> Result<SockHash<MapData, u64>, ProbeError> {
    SockHash::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

fn duplicate_sock_hash(
    map: &SockHash<MapData, u64>,
    name: &'static str,
) -> Result<SockHash<MapData, u64>, ProbeError> {
    sock_hash(Map::SockHash(duplicate(map.fd().as_fd(), name)?), name)
}

fn duplicate(fd: BorrowedFd<'_>, name: &'static str) -> Result<MapData, ProbeError> {
    let fd = fd
        .try_clone_to_owned()
        .map_err(|source| ProbeError::Duplicate { name, source })?;
    MapData::from_fd(fd).map_err(|source| ProbeError::Map { name, source })
}

fn next_seq(map: Map) -> Result<HashMap<MapData, u64, u64>, ProbeError> {
    HashMap::try_from(map).map_err(|source| ProbeError::Map {
        name: NEXT_SEQ_MAP,
        source,
    })
}
